"""Every code block of README.md and docs/*.md runs as written (issue 15 item 14).

Python blocks of one document run in order in one fresh interpreter (a later block may use what
an earlier one defined, as a reader would), against moto's S3 server: ``LITESTREAM_S3_ENDPOINT``
points the docs' own ``s3://my-bucket/db``-style URLs at it, whose buckets hold the replicas the
examples expect (``users`` with 42 = 0x2a transactions, the oldest before 2026-01-02, the newest a
minute ago; an empty ``app`` replica to write). Shell blocks run their ``ltxvfs`` lines with bash
(``sqlite> `` lines are the shell's input). The only substitution is a replica URL that names a
local directory (``file:///var/backups/db``), replaced by a test directory.

A block that cannot run here carries ``<!-- not run: why -->`` on the line before it; they are
counted, so a new example is either run or marked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

from replicas import FakePrimary, rows_of

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Blocks marked "not run", by document: installs, the test suite, the benchmark, an app.
NOT_RUN = {"README.md": 3, "benchmarks.md": 2, "getting-started.md": 1, "hydration.md": 1}
#: Lines of run shell blocks that are not ltxvfs commands and are skipped: placeholders.
SKIPPED_LINES = {"export AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…"}
#: Local replica directories named by the docs -> the test's directory for them.
LOCAL_URLS = ("file:///var/backups/db",)
#: Buckets the docs' URLs name.
BUCKETS = ("my-bucket", "bucket")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, if marked


def blocks() -> list[Block]:
    out = []
    fence = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
    for path in DOCS:
        text = path.read_text()
        for m in fence.finditer(text):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = re.fullmatch(r"<!-- not run: (.+) -->", before.strip())
            out.append(Block(path.name, text[:m.start()].count("\n") + 1, m.group(1),
                             m.group(2), marker.group(1) if marker else None))
    return out


ALL = blocks()
PYTHON_DOCS = sorted({b.doc for b in ALL if b.lang == "python" and not b.not_run})
SHELL_BLOCKS = [b for b in ALL if b.lang == "sh" and not b.not_run]


def test_every_code_block_is_run_or_marked():
    for b in ALL:
        assert b.lang in ("python", "sh", ""), f"{b.doc}:{b.line}: unknown block language {b.lang!r}"
        if b.lang == "":
            # Untagged blocks are output or listings, never something to type.
            assert not b.not_run and not re.search(r"^\s*(\$ |import |ltxvfs )", b.code, re.M), \
                f"{b.doc}:{b.line}: untagged block looks like code: tag it sh/python"
    counted: dict[str, int] = {}
    for b in ALL:
        if b.not_run:
            counted[b.doc] = counted.get(b.doc, 0) + 1
    assert counted == NOT_RUN
    assert len(PYTHON_DOCS) >= 4 and len(SHELL_BLOCKS) >= 4


# --- the replicas the examples expect ------------------------------------------------------------


def _users_replica(client, tmp_path: Path, name: str) -> None:
    """``users`` with 42 transactions (TXID 0x2a): the first on 2026-01-01 (before the README's
    --timestamp 2026-01-02T15:04:05Z) or 3 days ago, then a minute apart, then 30 minutes and
    1 minute ago (so '1 hour ago' and '5 minutes ago' have a past to show)."""
    now = datetime.now(UTC)
    base = min(datetime(2026, 1, 1, tzinfo=UTC), now - timedelta(days=3))
    p = FakePrimary(tmp_path / f"{name}.db", client)
    for txid in range(1, 43):
        when = {41: now - timedelta(minutes=30), 42: now - timedelta(minutes=1)}.get(
            txid, base + timedelta(minutes=txid))
        first = ["CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)"] if txid == 1 else []
        p.commit(*first, f"INSERT INTO users VALUES ({txid}, 'user {txid}')",
                 timestamp_ms=int(when.timestamp() * 1000))


@pytest.fixture(scope="module")
def doc_replicas(s3_server, s3_admin, tmp_path_factory):
    """The replicas the examples read, made once: (environment, local URL substitutions)."""
    tmp = tmp_path_factory.mktemp("doc-replicas")
    for name in BUCKETS:
        try:
            s3_admin.create_bucket(Bucket=name)
        except s3_admin.exceptions.BucketAlreadyOwnedByYou:
            pass
        _delete_prefix(s3_admin, name, "")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LITESTREAM_", "AWS_"))}
    env.update(AWS_ACCESS_KEY_ID=os.environ["AWS_ACCESS_KEY_ID"],
               AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"],
               AWS_EC2_METADATA_DISABLED="true", LITESTREAM_S3_ENDPOINT=s3_server)
    for url in ("s3://my-bucket/db", "s3://bucket/tenants/42"):
        with open_replica(f"{url}?endpoint={s3_server}") as client:
            _users_replica(client, tmp, url.rsplit("/", 1)[-1])
    local = {}
    for i, url in enumerate(LOCAL_URLS):
        local[url] = (tmp / f"local{i}").as_uri()
        with open_replica(local[url]) as client:
            _users_replica(client, tmp, f"local{i}")
    return env, local


def _delete_prefix(s3_admin, bucket: str, prefix: str) -> None:
    for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            s3_admin.delete_object(Bucket=bucket, Key=obj["Key"])


@pytest.fixture
def docs_env(doc_replicas, s3_admin, tmp_path):
    """Per test: empty replicas to write (``app``), a fresh state and home directory."""
    env, local = doc_replicas
    for name in BUCKETS:
        _delete_prefix(s3_admin, name, "app/")
    (tmp_path / "home").mkdir()
    return {**env, "XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path / "home")}, local


def _substitute(code: str, local: dict[str, str]) -> str:
    for doc_url, test_url in local.items():
        code = code.replace(doc_url, test_url)
    return code


# --- running them --------------------------------------------------------------------------------

_RUNNER = textwrap.dedent("""
    import json, sys, traceback
    blocks = json.load(open(sys.argv[1]))
    namespace = {"__name__": "__main__"}
    for name, code in blocks:
        try:
            exec(compile(code, name, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"FAILED: {name}")
""")


@pytest.mark.parametrize("doc", PYTHON_DOCS)
def test_python_blocks_run(doc, docs_env, tmp_path):
    env, local = docs_env
    work = tmp_path / "work"
    work.mkdir()
    # The README's decoder example opens an LTX file the reader has at hand: the replica's first.
    (work / "0000000000000001-0000000000000001.ltx").write_bytes(
        (Path(local[LOCAL_URLS[0]].removeprefix("file://")) / "ltx" / "0"
         / "0000000000000001-0000000000000001.ltx").read_bytes())
    code = [(f"{b.doc}:{b.line}", _substitute(b.code, local))
            for b in ALL if b.doc == doc and b.lang == "python" and not b.not_run]
    (tmp_path / "blocks.json").write_text(json.dumps(code))
    (tmp_path / "runner.py").write_text(_RUNNER)
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # What the examples did, where they leave something to see.
    if doc == "README.md":
        assert rows_of(work / "restored.db", "SELECT max(id) FROM users") == [(0x2A,)]
    if doc in ("README.md", "write-mode.md"):
        url = {"README.md": "s3://my-bucket/app", "write-mode.md": "s3://bucket/app"}[doc]
        restore(open_replica(url + "?endpoint=" + env["LITESTREAM_S3_ENDPOINT"]),
                tmp_path / "app.db")
        assert rows_of(tmp_path / "app.db", "SELECT kind FROM events") == [("signup",)]
    if doc == "integrations.md":  # the peewee and Django examples' writes, restored
        restore(open_replica("s3://my-bucket/app?endpoint=" + env["LITESTREAM_S3_ENDPOINT"]),
                tmp_path / "app.db")
        assert rows_of(tmp_path / "app.db", "SELECT title, done FROM task ORDER BY id") == [
            ("write docs", 0), ("ship", 0)]
        assert "41\n42\n" in proc.stdout and "attempt to write a readonly database" in proc.stdout
        # the Django example's read through the replica and its write through the writer
        assert "('user 42',)\n0 000000000000002a\n" in proc.stdout
        assert rows_of(tmp_path / "app.db", "SELECT path FROM visits") == [("/",)]


def _commands(block: Block) -> list[tuple[str, str]]:
    """(command line, its standard input) for each ltxvfs line of a shell block."""
    commands: list[tuple[str, str]] = []
    for line in block.code.splitlines():
        if line.startswith("sqlite> "):
            assert commands, f"{block.doc}:{block.line}: input before any command"
            cmd, stdin = commands[-1]
            commands[-1] = (cmd, stdin + line.removeprefix("sqlite> ") + "\n")
        elif re.match(r"^([A-Z_]+=\S+ )*ltxvfs ", line):
            commands.append((line, ""))
        else:
            assert line in SKIPPED_LINES, f"{block.doc}:{block.line}: cannot run {line!r}"
    assert commands, f"{block.doc}:{block.line}: no ltxvfs command: mark it <!-- not run: ... -->"
    return commands


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[f"{b.doc}:{b.line}" for b in SHELL_BLOCKS])
def test_shell_blocks_run(block, docs_env, tmp_path):
    env, local = docs_env
    work = tmp_path / "work"
    work.mkdir()
    for line, stdin in _commands(block):
        command = _substitute(line, local)
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, input=stdin,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        assert proc.stderr == "", f"{line}\n{proc.stderr}"
        if (m := re.search(r"ltxvfs restore \S+ -o (\S+)", command)):
            # What the restore made: the latest state (TXID 0x2a, 42 users), TXID 0x2a, the
            # state of 2026-01-02T15:04:05Z (40 users), or nothing for a dry run.
            out = work / m.group(1)
            if "--dry-run" in command:
                assert not out.exists() and "Restore plan:" in proc.stdout
            else:
                users = 42
                if "--timestamp 2026-01-02T15:04:05Z" in command:  # TXIDs 41, 42 are later
                    then = datetime(2026, 1, 2, 15, 4, 5, tzinfo=UTC)
                    users = 40 if datetime.now(UTC) - timedelta(minutes=30) > then else 42
                assert rows_of(out, "SELECT count(*) FROM users") == [(users,)], line


# --- claims the docs make about the code (issue 15 item 15) ---------------------------------------


def _doc(name: str) -> str:
    return " ".join((ROOT / "docs" / name).read_text().split())


def test_thread_counts_in_configuration_md_are_the_code_s():
    from ltxvfs.jobs import JOB_THREADS, POOL_THREADS

    text = _doc("configuration.md")
    assert f"a pool of {JOB_THREADS} job threads (`ltxvfs.jobs.JOB_THREADS`)" in text
    assert f"another pool of {POOL_THREADS} I/O threads (`ltxvfs.jobs.POOL_THREADS`)" in text


def test_default_buffer_locations_are_the_documented_ones(tmp_path, monkeypatch):
    """write-mode.md's list, in order: $XDG_STATE_HOME, ~/.local/state, the temp dir."""
    import tempfile

    from ltxvfs.buffer import replica_id
    from ltxvfs.writer import default_buffer_path

    name = f"{replica_id('file:/r'):016x}.buffer"
    text = _doc("write-mode.md")
    for claim in ("`$XDG_STATE_HOME/ltxvfs/buffers/`, when `XDG_STATE_HOME` is set and its parent "
                  "directory is writable",
                  "`~/.local/state/ltxvfs/buffers/`, when the home directory exists and is writable",
                  "otherwise `<temp dir>/ltxvfs-<uid>/ltxvfs/buffers/`", "may not survive a reboot"):
        assert claim in text, claim
    home, temp = tmp_path / "home", tmp_path / "temp"
    home.mkdir()
    temp.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_buffer_path("file:/r") == tmp_path / "state" / "ltxvfs" / "buffers" / name
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_buffer_path("file:/r") == home / ".local" / "state" / "ltxvfs" / "buffers" / name
    monkeypatch.setenv("HOME", str(tmp_path / "no-such-home"))
    assert default_buffer_path("file:/r") == temp / f"ltxvfs-{os.getuid()}" / "ltxvfs" / "buffers" / name
    (temp / f"ltxvfs-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(temp / f"ltxvfs-{os.getuid()}", 0o777)  # world-writable: someone else's trap
    from ltxvfs import WriteBufferError

    with pytest.raises(WriteBufferError, match="is not a private directory of this user"):
        default_buffer_path("file:/r")


def test_a_buffer_in_the_temp_dir_is_warned_about(tmp_path, monkeypatch, caplog):
    import logging
    import tempfile

    from ltxvfs.writer import default_buffer_path

    monkeypatch.setenv("HOME", str(tmp_path / "no-such-home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ltxvfs"):
        path = default_buffer_path("file:/r")
    assert str(path).startswith(str(tmp_path))
    assert any(r.levelno == logging.WARNING and str(path.parent) in r.getMessage()
               and "reboot" in r.getMessage() for r in caplog.records)


def test_every_directory_a_buffer_creates_is_private(tmp_path):
    from ltxvfs.buffer import WriteBuffer, replica_id

    path = tmp_path / "a" / "b" / "buffers" / "x.buffer"
    buf = WriteBuffer(path, replica_id("file:/r"))
    buf.open()
    try:
        modes = {d.name: d.stat().st_mode & 0o777 for d in (path.parent, path.parent.parent,
                                                            path.parent.parent.parent)}
        assert modes == {"buffers": 0o700, "b": 0o700, "a": 0o700}
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        buf.close()
