"""The ``ltxvfs`` command: restore, list LTX files, and a self-contained demo.

Every command has ``--help`` with examples. Errors print one line (``ltxvfs: error: ...``) and
exit with status 1; bad arguments exit with status 2, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

from . import __version__
from .errors import LitestreamError
from .plan import compute_plan, list_levels
from .storage import open_replica
from .storage.base import SNAPSHOT_LEVEL, FileInfo, ReplicaClient, format_txid


class CommandError(Exception):
    """A command cannot run as asked (not a library error): printed as one line, exit status 1."""


def _open_checked(url: str) -> ReplicaClient:
    """The replica's client, after a check that its root exists (a file:// directory, an S3
    bucket): a mistyped path is an error, never an empty listing."""
    client = open_replica(url)
    try:
        client.check()
    except BaseException:
        client.close()
        raise
    return client


def parse_txid(text: str) -> int:
    """A TXID as Litestream prints it: up to 16 hex digits."""
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid TXID {text!r}: expected hex, e.g. 000000000000002a") from None
    if not (1 <= value < 1 << 64) or len(text) > 16:
        raise argparse.ArgumentTypeError(f"invalid TXID {text!r}: out of range")
    return value


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 time; a time without an offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid timestamp {text!r}: expected RFC 3339, e.g. 2026-01-02T15:04:05Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def format_time(t: datetime) -> str:
    """Go's RFC3339 in UTC, as ``litestream ltx`` prints it."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with two spaces between them (Go's tabwriter, as Litestream uses)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _file_rows(files: Sequence[FileInfo], with_name: bool = False) -> list[list[str]]:
    head = ["level"] + (["file"] if with_name else []) + ["min_txid", "max_txid", "size"]
    rows = [head + ["timestamp" if with_name else "created"]]
    for f in files:
        rows.append([str(f.level)] + ([f.name] if with_name else []) + [
            format_txid(f.min_txid), format_txid(f.max_txid), str(f.size),
            format_time(f.created_at)])
    return rows


def cmd_ltx(args: argparse.Namespace) -> int:
    with _open_checked(args.url) as client:
        levels = list(range(SNAPSHOT_LEVEL + 1)) if args.level == "all" else [int(args.level)]
        listing = list_levels(client, levels=levels)
    files = [f for lvl in levels for f in listing[lvl]]
    if args.json:
        print(json.dumps([{"level": f.level, "min_txid": format_txid(f.min_txid),
                           "max_txid": format_txid(f.max_txid), "size": f.size,
                           "timestamp": format_time(f.created_at)} for f in files], indent=2))
    else:
        print(format_table(_file_rows(files)))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .restore import restore

    with _open_checked(args.url) as client:
        plan = compute_plan(client, txid=args.txid, timestamp=args.timestamp)
        if args.dry_run:
            print("Restore plan:")
            print(f"  source: {client.url}")
            print(f"  target: {args.output}")
            print(f"  txid range: {format_txid(plan.files[0].min_txid)} - {format_txid(plan.txid)}")
            print()
            print("Files to fetch:")
            print(format_table(_file_rows(plan.files, with_name=True)))
            return 0
        progress = _progress_bar if args.progress else None
        result = restore(client, args.output, plan=plan, force=args.force, progress=progress)
    if args.progress:
        print(file=sys.stderr)
    print(f"restored {result.path} at TXID {format_txid(result.txid)} "
          f"({result.commit} pages of {result.page_size} bytes, {len(result.plan)} LTX files)")
    return 0


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} bytes")
    sys.stderr.flush()


def cmd_verify(args: argparse.Namespace) -> int:
    """Decode every file, then say "restorable" exactly when ``ltxvfs restore`` would succeed:
    the restore plan's files are applied, in plan order, with restore's own checks (nothing is
    written)."""
    import io

    from .ltx import decode_file
    from .plan import choose_plan
    from .restore import PlanApplier

    notes: dict[FileInfo, str] = {}
    with _open_checked(args.url) as client:
        listing = list_levels(client)
        try:
            plan: tuple[FileInfo, ...] = choose_plan(listing).files
            not_restorable = ""
        except LitestreamError as err:
            plan, not_restorable = (), str(err)
        applier = PlanApplier()
        in_plan = set(plan)
        # Plan files first, in plan order (each read once: decoded, then applied), then the rest.
        for f in [*plan, *(f for level in sorted(listing) for f in listing[level]
                           if f not in in_plan)]:
            data = None
            try:
                data = client.read(f.level, f.min_txid, f.max_txid)
                dec = decode_file(data, str(f))
                notes[f] = ("ok" if (dec.header.min_txid, dec.header.max_txid)
                            == (f.min_txid, f.max_txid) else "header TXIDs differ from the file name")
            except LitestreamError as err:
                notes[f] = f"{type(err).__name__}: {err}"
                if f in in_plan and not not_restorable:
                    not_restorable = str(err)  # restore stops here, with this error
            if f in in_plan and not not_restorable and data is not None:
                try:
                    applier.apply(f, io.BytesIO(data))
                except LitestreamError as err:
                    not_restorable = str(err)
        if plan and not not_restorable:
            try:
                applier.finish()
            except LitestreamError as err:
                not_restorable = str(err)
    problems = 0
    for level in sorted(listing):
        for prev, f in zip([None, *listing[level]], listing[level], strict=False):
            note = notes[f]
            if level == 0 and prev is not None and f.min_txid != prev.max_txid + 1 and note == "ok":
                note = f"gap: previous L0 file ends at {format_txid(prev.max_txid)}"
            if note != "ok":
                problems += 1
            if note != "ok" or args.verbose:
                print(f"L{level} {f.name} {f.size:>10}  {note}")
    if not_restorable:
        problems += 1
        chain = f"not restorable: {not_restorable}"
    else:
        chain = f"latest TXID {format_txid(plan[-1].max_txid)} restorable from {len(plan)} file(s)"
    total = sum(len(v) for v in listing.values())
    print(f"{total} LTX file(s) checked, {problems} problem(s); {chain}")
    return 0 if problems == 0 else 1


def cmd_info(args: argparse.Namespace) -> int:
    from datetime import datetime

    with _open_checked(args.url) as client:
        listing = list_levels(client)
        plan = compute_plan(client)
        from .ltx import Header

        last = plan.files[-1]
        header = Header.unpack(client.read(last.level, last.min_txid, last.max_txid, 0, 100))
        age = (datetime.now(UTC) - last.created_at).total_seconds()
        info = {
            "replica": client.url,
            "txid": format_txid(plan.txid),
            "page_size": header.page_size,
            "pages": header.commit,
            "size_bytes": header.page_size * header.commit,
            "restore_plan_files": len(plan),
            "files_per_level": {str(k): len(v) for k, v in listing.items() if v},
            "latest_file": str(last),
            "latest_file_time": format_time(last.created_at),
            "lag_seconds": int(age),
        }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def looks_like_replica_url(arg: str) -> bool:
    """Whether ``ltxvfs shell``'s first argument is the replica URL (else it is SQL): one word
    (no spaces) with a ``/`` in it or starting with ``file:`` -- ``s3://…``, ``file:///…``, a path
    -- that is not a dot-command or a comment. No SQL statement looks like that, and anything
    path-like is checked as a URL, so a mistyped one is reported as such, not run as SQL."""
    if not arg or any(c.isspace() for c in arg) or arg.startswith((".", "/*", "--")):
        return False
    return "/" in arg or arg.lower().startswith("file:")


def shell_banner(url: str | None) -> str:
    """The interactive shell's first lines; they end with a newline, before the first prompt."""
    where = url_for_display(url) if url else "(no replica: use .open)"
    return f"ltxvfs shell on {where}; try PRAGMA litestream_time = '5 minutes ago';\n"


def url_for_display(url: str) -> str:
    from .storage import redact_url

    return redact_url(url)


def cmd_shell(args: argparse.Namespace) -> int:
    import dataclasses
    import io

    import apsw
    import apsw.shell

    from .config import VFSConfig
    from .registry import register

    sql = list(args.sql)
    url = args.url
    if url is not None and not looks_like_replica_url(url):
        sql.insert(0, url)  # SQL, with the replica from the environment
        url = None
    config = VFSConfig.from_env()
    if url:
        config = dataclasses.replace(config, replica_url=url)
    if config.replica_url:  # a bad URL or a missing bucket/directory: one line, before any open
        _open_checked(config.replica_url).close()
    elif sql and not sql[0].lstrip().startswith("."):
        raise CommandError("no replica URL: give it as the first argument (s3://bucket/path, "
                           "file:///dir) or set LITESTREAM_REPLICA_URL")
    register(config=config)
    db = None
    if config.replica_url:
        with _errors_reported_by_caller():
            db = apsw.Connection("file:db?vfs=litestream",
                                 flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    if sql:
        # Run the statements in order and stop at the first error, which main() prints as one
        # line (the shell's own report of it, with its caret diagram, is dropped).
        messages = io.StringIO()
        shell = apsw.shell.Shell(db=db, stderr=messages)
        try:
            for line in sql:
                shell.process_complete_line(line)
        except apsw.shell.Shell.Error as err:  # a bad dot-command
            raise CommandError(str(err)) from None
        sys.stderr.write(messages.getvalue())
        return 0
    shell = apsw.shell.Shell(db=db)
    shell.cmdloop(intro=shell_banner(config.replica_url))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.directory, s3=args.s3)


EPILOG_RESTORE = """examples:
  ltxvfs restore s3://my-bucket/db -o restored.db
  ltxvfs restore file:///var/backups/db -o old.db --txid 000000000000002a
  ltxvfs restore "s3://bucket/db?endpoint=http://127.0.0.1:9000" -o x.db --timestamp 2026-01-02T15:04:05Z
  ltxvfs restore s3://my-bucket/db -o x.db --dry-run
"""
EPILOG_LTX = """examples:
  ltxvfs ltx s3://my-bucket/db
  ltxvfs ltx file:///var/backups/db --level all --json
"""
EPILOG_SHELL = """examples:
  ltxvfs shell s3://my-bucket/db
  ltxvfs shell file:///var/backups/db "SELECT count(*) FROM users;"
  LITESTREAM_REPLICA_URL=s3://my-bucket/db ltxvfs shell "SELECT count(*) FROM users;"
  LITESTREAM_REPLICA_URL=s3://my-bucket/db ltxvfs shell
    sqlite> .open file:my.db?vfs=litestream
    sqlite> PRAGMA litestream_time = '5 minutes ago';
"""
EPILOG_VERIFY = """examples:
  ltxvfs verify s3://my-bucket/db
  ltxvfs verify file:///var/backups/db --verbose
exit status: 0 if every file verifies and the latest state is restorable, 1 otherwise
"""
EPILOG_INFO = """examples:
  ltxvfs info s3://my-bucket/db
  ltxvfs info file:///var/backups/db --json
"""
EPILOG_DEMO = """examples:
  ltxvfs demo
  ltxvfs demo --directory /tmp/ltxvfs-demo
  ltxvfs demo --s3
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltxvfs", description="Read and restore SQLite databases replicated by Litestream.",
        epilog="Run 'ltxvfs COMMAND --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"ltxvfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("restore", help="restore a replica to a local SQLite file",
                       description="Restore the database in a replica (latest, a TXID, or a "
                       "moment) to a local SQLite file.", epilog=EPILOG_RESTORE, formatter_class=fmt)
    p.add_argument("url", help="replica URL (s3://bucket/path?endpoint=... or file:///dir)")
    p.add_argument("-o", "--output", required=True, help="path of the restored database")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--txid", type=parse_txid, help="restore up to this TXID (hex), inclusive")
    when.add_argument("--timestamp", type=parse_timestamp,
                      help="restore the state before this RFC 3339 time (after the newest file: latest)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output and its sidecars")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("ltx", help="list the LTX files of a replica",
                       description="List LTX files per level with their TXIDs, sizes and times, "
                       "like 'litestream ltx'.", epilog=EPILOG_LTX, formatter_class=fmt)
    p.add_argument("url", help="replica URL")
    p.add_argument("--level", default="0", choices=[str(i) for i in range(10)] + ["all"],
                   help="level to list, 0-9 or 'all' (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ltx)

    p = sub.add_parser("verify", help="check every file's checksum and the TXID chain",
                       description="Download and fully decode every LTX file of a replica "
                       "(CRC-64 file checksums, page order, index), check that L0 has no gaps "
                       "and that the latest state is restorable.", epilog=EPILOG_VERIFY,
                       formatter_class=fmt)
    p.add_argument("url", help="replica URL")
    p.add_argument("-v", "--verbose", action="store_true", help="list every file, not only problems")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("info", help="what the VFS sees: TXID, page size, levels, lag",
                       description="Summarise a replica as the VFS would open it.",
                       epilog=EPILOG_INFO, formatter_class=fmt)
    p.add_argument("url", help="replica URL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("shell", help="an interactive SQL shell on a replica",
                       description="APSW's SQLite shell with the litestream VFS registered, on "
                       "the replica at URL (or LITESTREAM_REPLICA_URL). Extra arguments are run "
                       "as SQL or dot-commands instead of the interactive loop.",
                       epilog=EPILOG_SHELL, formatter_class=fmt)
    p.add_argument("url", nargs="?", help="replica URL (default: LITESTREAM_REPLICA_URL); a first "
                   "argument that is not a URL (s3://..., file:..., /path) is SQL")
    p.add_argument("sql", nargs="*", help="SQL statements or dot-commands to run, in order; "
                   "the first error stops them (exit status 1)")
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("demo", help="a self-contained tour on a local file:// replica",
                       description="Write a small database through the VFS (write mode), read it from "
                       "another connection while it hydrates, travel back in time, restore a past "
                       "TXID. Needs no cloud account.",
                       epilog=EPILOG_DEMO, formatter_class=fmt)
    p.add_argument("--directory", help="where to put the replica (default: a temporary directory)")
    p.add_argument("--s3", action="store_true",
                   help="use moto's S3 server on 127.0.0.1 instead of a directory (test extra)")
    p.set_defaults(func=cmd_demo)
    return parser


class _StderrHandler(logging.Handler):
    """The library's warnings on stderr as ``ltxvfs: warning: …`` lines (sys.stderr looked up at
    each record, so redirections made after setup are honoured)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.quiet_errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR and self.quiet_errors:
            return  # the caller raises this error and prints it itself: one line, not two
        try:
            print(f"ltxvfs: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # pragma: no cover - as logging.Handler.handleError
            self.handleError(record)


def _log_handler() -> _StderrHandler:
    logger = logging.getLogger("ltxvfs")
    for handler in logger.handlers:
        if isinstance(handler, _StderrHandler):
            return handler
    handler = _StderrHandler()
    logger.addHandler(handler)
    return handler


@contextmanager
def _errors_reported_by_caller() -> Iterator[None]:
    """While opening a database the VFS logs why an open failed and raises it; the CLI prints
    the raised error, so the log record would be a second line saying the same."""
    handler = _log_handler()
    handler.quiet_errors += 1
    try:
        yield
    finally:
        handler.quiet_errors -= 1


def main(argv: Sequence[str] | None = None) -> int:
    import apsw

    from .config import ConfigError

    args = build_parser().parse_args(argv)
    _log_handler()
    try:
        return args.func(args)
    except (LitestreamError, ConfigError, CommandError, apsw.Error, OSError) as err:
        print(f"ltxvfs: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


if __name__ == "__main__":  # pragma: no cover
    # python -m ltxvfs.cli: run the package's module, so that CommandError raised by ltxvfs.demo
    # (which imports ltxvfs.cli) is the class main() catches, not this __main__ copy's.
    from ltxvfs.cli import main as _main

    sys.exit(_main())
