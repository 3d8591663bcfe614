"""Plumbing of the model-based simulation (tests/test_simulation.py): the oracle, the workload,
a storage client that fails on command, and the figures of a run.

* **Oracle**: a plain SQLite file per replica (same SQLite build: apsw's), to which every
  statement the simulation runs through ltxvfs is applied too. A database's content is compared
  by :func:`digest` (schema + every table's rows, order-free), never by bytes.
* **Workload**: :func:`statements` turns a drawn operation into SQL that gives the same result
  on both sides (no randomness, no time).
* **Faults**: :class:`FaultyClient` wraps the real client of the VFS's replica (installed by
  patching ``ltxvfs.vfs.open_replica``); the simulation arms faults for one step only.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import apsw

from ltxvfs.errors import ObjectNotFoundError, StorageError
from ltxvfs.ltx import HEADER_SIZE, Header
from ltxvfs.plan import list_levels
from ltxvfs.restore import restore
from ltxvfs.storage.base import ReplicaClient

from replicas import FakePrimary, page_bytes

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, b BLOB)"
#: Above this many pages the workload deletes instead of inserting (keeps every step cheap).
MAX_PAGES = 500
FAULT_MARK = "sim-fault"


# --- content ---------------------------------------------------------------------------------


def digest(con: apsw.Connection) -> str:
    """Schema and rows of every table (rows sorted: VACUUM may renumber implicit rowids)."""
    h = hashlib.sha256()
    schema = [tuple(r) for r in con.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
        "ORDER BY type, name")]
    h.update(repr(schema).encode())
    for kind, name, _, _ in schema:
        if kind == "table":
            rows = sorted(repr(tuple(r)) for r in con.execute(f'SELECT * FROM "{name}"'))
            h.update(f"{name}:{len(rows)}:".encode())
            for r in rows:
                h.update(r.encode())
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return digest(con)
    finally:
        con.close()


def integrity(con: apsw.Connection) -> str:
    return "\n".join(r[0] for r in con.execute("PRAGMA integrity_check"))


# --- workload --------------------------------------------------------------------------------


def _series(n: int) -> str:
    return f"WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < {n}) "


def statements(op: tuple, seq: int, pages: int) -> list[str]:
    """SQL for a drawn operation; ``seq`` makes values unique, ``pages`` is the oracle's size."""
    kind, a, b = op
    if kind in ("insert", "big") and pages > MAX_PAGES:
        return [f"DELETE FROM t WHERE id % 3 != {seq % 3}"]
    if kind == "insert":
        return [_series(a) + f"INSERT INTO t(v, b) SELECT 'r{seq}-' || x, zeroblob({b}) FROM s"]
    if kind == "big":  # many pages in one transaction: spills with cache_size=10
        return [_series(a) + f"INSERT INTO t(v, b) SELECT printf('big{seq}-%d-%.*c', x, 200, "
                             f"'x'), zeroblob(700) FROM s",
                f"UPDATE t SET v = v || '~' WHERE id % 2 = {seq % 2}"]
    if kind == "update":
        return [f"UPDATE t SET v = v || '+{seq}', b = zeroblob(length(b) + {a * 97}) "
                f"WHERE id % {a + 1} = {b % (a + 1)}"]
    if kind == "delete":
        return [f"DELETE FROM t WHERE id % {a} = {b % a}"]
    if kind == "schema":
        return [[f"CREATE TABLE IF NOT EXISTS u{a}(x INTEGER, y TEXT)",
                 f"CREATE INDEX IF NOT EXISTS i{a} ON t(v, id)",
                 f"DROP TABLE IF EXISTS u{a}",
                 f"DROP INDEX IF EXISTS i{a}"][b % 4]] + (
            [f"INSERT INTO u{a} SELECT id, v FROM t WHERE id % 5 = 0"] if b % 4 == 0 else [])
    raise AssertionError(op)


def page_count(con: apsw.Connection) -> int:
    return con.execute("PRAGMA page_count").fetchall()[0][0]


# --- faults ----------------------------------------------------------------------------------


class InjectedError(StorageError):
    pass


@dataclass
class Faults:
    """Faults armed for the calls of one step: ``kind`` for operations ``ops``, ``left`` times."""

    kind: str = ""
    ops: tuple[str, ...] = ()
    left: int = 0
    injected: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, kind: str, ops: tuple[str, ...], times: int) -> None:
        with self.lock:
            self.kind, self.ops, self.left = kind, ops, times

    def disarm(self) -> None:
        with self.lock:
            self.left = 0

    def take(self, op: str) -> str | None:
        with self.lock:
            if self.left <= 0 or op not in self.ops:
                return None
            if self.kind == "lost" and op not in ("write", "delete"):
                return None
            self.left -= 1
            self.injected[f"{self.kind}:{op}"] += 1
            return self.kind


class FaultyClient(ReplicaClient):
    """A replica client that fails when the simulation says so:

    * ``error``: a StorageError before the request (a reset, a 5xx, a refused connection);
    * ``throttle``: the same, as S3's SlowDown would reach us after botocore's retries;
    * ``lost``: the write or delete is applied, then its answer is lost (StorageError);
    * ``vanish``: a read finds the object gone (ObjectNotFoundError: a listing that lagged).
    """

    def __init__(self, inner: ReplicaClient, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.url = inner.url

    @property
    def identity(self) -> str:
        return self.inner.identity

    def probe_create_only(self) -> str:  # write mode's store check (issue 16): the real store's
        return self.inner.probe_create_only()

    def __getattr__(self, name):  # requests counters and the like
        return getattr(self.inner, name)

    def _before(self, op: str) -> str | None:
        kind = self.faults.take(op)
        if kind in ("error", "throttle"):
            raise InjectedError(f"{FAULT_MARK}: injected {kind} on {op}")
        if kind == "vanish":
            raise ObjectNotFoundError(f"{FAULT_MARK}: injected vanish on {op}")
        return kind

    def list_files(self, level, *, seek=0, use_metadata=False):
        self._before("list")
        return self.inner.list_files(level, seek=seek, use_metadata=use_metadata)

    def list_all(self, *, use_metadata=False):
        self._before("list")
        return self.inner.list_all(use_metadata=use_metadata)

    def read(self, level, min_txid, max_txid, offset=0, size=None):
        self._before("read")
        return self.inner.read(level, min_txid, max_txid, offset, size)

    def write(self, level, min_txid, max_txid, data, timestamp_ms, *, exclusive=False):
        kind = self._before("write")
        info = self.inner.write(level, min_txid, max_txid, data, timestamp_ms,
                                exclusive=exclusive)
        if kind == "lost":
            raise InjectedError(f"{FAULT_MARK}: answer to a PUT of {info} lost")
        return info

    def delete(self, files):
        kind = self._before("delete")
        self.inner.delete(files)
        if kind == "lost":
            raise InjectedError(f"{FAULT_MARK}: answer to a DELETE lost")

    def check(self):
        self._before("list")
        self.inner.check()

    def close(self):
        self.inner.close()


# --- one replica: its oracle, history and outside primary ------------------------------------


class ReplicaModel:
    """What one replica must hold. ``history[txid]`` is the digest of every TXID it ever held
    (of the current history: a replaced replica starts a new generation); ``committed`` is the
    state this process acknowledged (committed in write mode), ``chain`` the acknowledged
    states a not yet seen TXID may hold."""

    def __init__(self, name: str, url: str, client: ReplicaClient, root: Path,
                 page_size: int) -> None:
        self.name, self.url, self.client, self.root = name, url, client, root
        self.page_size = page_size
        self.oracle_path = root / f"{name}-oracle.db"
        self.primary = FakePrimary(root / f"{name}-primary.db", client, page_size)
        self.last_ms = 0
        self.primary.commit(SCHEMA, _series(20) + "INSERT INTO t(v, b) SELECT 'init-' || x, "
                                                  "zeroblob(x * 50) FROM s",
                            timestamp_ms=self.next_ms())
        shutil.copy(self.primary.path, self.oracle_path)
        self.oracle = apsw.Connection(str(self.oracle_path))
        self.oracle.execute("PRAGMA journal_mode = delete")
        self.history: dict[int, str] = {1: digest(self.oracle)}
        self.timestamps: dict[int, int] = {1: self._timestamp(1)}
        self.latest = 1
        self.generation = 0
        self.old_histories: list[dict[int, str]] = []
        self.committed = self.history[1]
        self.chain: list[str] = [self.committed]
        self.unsynced = False  # acknowledged commits not known to be synced
        self.follow_floor = 1  # a follower read after a clean poll sees at least this TXID
        self.restores = 0

    def next_ms(self) -> int:
        """Strictly increasing LTX timestamps for the outside primary: a file:// object is told
        apart from an earlier one of the same name by inode and mtime (the LTX timestamp, in
        ms), so a history replaced within the same millisecond (only a simulation is that fast)
        could reuse both — a known limit, not what this simulation is after."""
        self.last_ms = max(int(time.time() * 1000), self.last_ms + 1,
                           max(self.timestamps.values(), default=0) + 1
                           if hasattr(self, "timestamps") else 0)
        return self.last_ms

    def _timestamp(self, txid: int) -> int:
        for level in range(10):
            for f in self.client.list_files(level):
                if f.max_txid == txid:
                    return Header.unpack(self.client.read(level, f.min_txid, f.max_txid, 0,
                                                          HEADER_SIZE)).timestamp
        raise AssertionError(f"no file ends at TXID {txid}")

    def top(self) -> int:
        return max((f.max_txid for fs in list_levels(self.client).values() for f in fs),
                   default=0)

    def restore_digest(self, txid: int | None = None) -> str:
        out = self.root / f"restore-{self.name}.db"
        out.unlink(missing_ok=True)
        restore(self.client, out, txid=txid)
        self.restores += 1
        try:
            con = apsw.Connection(str(out), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                assert integrity(con) == "ok"
                return digest(con)
            finally:
                con.close()
        finally:
            out.unlink(missing_ok=True)

    def observe(self) -> list[int]:
        """Record TXIDs that appeared: each must hold an acknowledged state, in order."""
        top = self.top()
        assert top >= self.latest, f"{self.name}: TXID {self.latest} went back to {top}"
        new = list(range(self.latest + 1, top + 1))
        for txid in new:
            d = self.restore_digest(txid)
            assert d in self.chain, (f"{self.name}: TXID {txid} holds {d}, no acknowledged "
                                     f"state (chain {self.chain})")
            self.chain = self.chain[self.chain.index(d):]
            self.history[txid] = d
            self.timestamps[txid] = self._timestamp(txid)
        self.latest = top
        return new

    def rebase_primary(self) -> None:
        """Make the outside primary continue from the replica's latest state."""
        path = self.primary.path
        path.unlink()
        restore(self.client, path, txid=self.latest)
        self.primary.published = page_bytes(path)
        self.primary.txid = self.latest

    def outside_commit(self, sql: list[str]) -> int:
        """The outside primary commits ``sql`` and publishes it as the next TXID."""
        if self.primary.txid != self.latest:
            self.rebase_primary()
        info = self.primary.commit(*sql, timestamp_ms=self.next_ms())
        with self.oracle:
            for s in sql:
                self.oracle.execute(s)
        d = digest(self.oracle)
        assert file_digest(self.primary.path) == d
        self.history[info.max_txid] = d
        self.timestamps[info.max_txid] = self._timestamp(info.max_txid)
        self.latest = info.max_txid
        self.committed = d
        self.chain = [d]
        return info.max_txid

    def replace(self, rows: int) -> None:
        """Wipe the replica and publish a new history (a restored or replaced primary)."""
        listing = list_levels(self.client)
        self.client.delete([f for fs in listing.values() for f in fs])
        self.primary.path.unlink()
        self.primary = FakePrimary(self.primary.path, self.client, self.page_size)
        self.generation += 1
        self.old_histories.append(self.history)
        self.primary.commit(SCHEMA, _series(rows) + f"INSERT INTO t(v, b) SELECT "
                                                    f"'gen{self.generation}-' || x, zeroblob(90) FROM s",
                            timestamp_ms=self.next_ms())
        self.oracle.close()
        self.oracle_path.unlink()
        shutil.copy(self.primary.path, self.oracle_path)
        self.oracle = apsw.Connection(str(self.oracle_path))
        self.history = {1: digest(self.oracle)}
        self.timestamps = {1: self._timestamp(1)}
        self.latest = self.follow_floor = 1
        self.committed = self.history[1]
        self.chain = [self.committed]


# --- figures ---------------------------------------------------------------------------------


@dataclass
class Figures:
    """Counted over a whole run (all examples) and written to LTXVFS_RELIABILITY_LOG."""

    examples: int = 0
    steps: int = 0
    reads_checked: int = 0
    restores: int = 0
    litestream_restores: int = 0
    crashes: int = 0
    faults: collections.Counter = field(default_factory=collections.Counter)
    errors_seen: collections.Counter = field(default_factory=collections.Counter)
    rules: collections.Counter = field(default_factory=collections.Counter)
    txids: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_json(self, name: str) -> str:
        return json.dumps({
            "test": name, "examples": self.examples, "steps": self.steps,
            "reads_checked": self.reads_checked, "restores": self.restores,
            "litestream_restores": self.litestream_restores, "crashes": self.crashes,
            "txids": self.txids, "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()), "errors_seen": dict(self.errors_seen),
            "rules": dict(self.rules), "seconds": round(time.monotonic() - self.started, 1)})

    def log(self, name: str) -> None:
        path = os.environ.get("LTXVFS_RELIABILITY_LOG")
        if path:
            with open(path, "a") as fh:
                fh.write(self.as_json(name) + "\n")
