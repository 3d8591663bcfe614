"""The ``litestream`` APSW VFS: SQLite's file calls translated onto replicas. Policy lives below.

* Main databases open on a :class:`~ltxvfs.follow.Replica` (one per replica URL, shared by its
  connections: one cache, one poller). Journals and temp files are ordinary local files (the
  base VFS); WAL files are refused, and page 1 always says rollback-journal mode.
* A read transaction sees one state: the latest state is adopted when SQLite takes the SHARED
  lock, and the file change counter in page 1 changes only then, so SQLite keeps its own page
  cache between transactions while nothing changes.
* Package errors become apsw errors here: transient storage failures -> BusyError, corrupt
  data -> CorruptError, a bad PRAGMA -> SQLError.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import apsw

from .config import URI_PARAMETERS, ConfigError, VFSConfig
from .errors import (
    LitestreamError,
    LTXError,
    ObjectNotFoundError,
    StorageError,
    TxNotAvailableError,
)
from .follow import Replica
from .jobs import POOL_THREADS, Scheduler
from .pages import DatabaseState, PageNotFoundError, PageStore, build_state
from .plan import compute_plan
from .pragmas import PragmaError, format_time, handle_pragma
from .storage import open_replica

log = logging.getLogger("ltxvfs")

_MAIN_DB = apsw.SQLITE_OPEN_MAIN_DB
_LOCK_NONE, _LOCK_SHARED, _LOCK_RESERVED = (
    apsw.SQLITE_LOCK_NONE, apsw.SQLITE_LOCK_SHARED, apsw.SQLITE_LOCK_RESERVED)


def to_apsw_error(err: Exception) -> apsw.Error:
    """The apsw exception SQLite should see for one of ours (the original stays chained)."""
    if isinstance(err, (PageNotFoundError, LTXError)):
        return apsw.CorruptError(str(err))
    if isinstance(err, StorageError):
        return apsw.BusyError(f"object storage unavailable: {err}")
    return apsw.IOError(str(err))


class LitestreamVFS(apsw.VFS):
    """Register with :func:`ltxvfs.register`; keep a reference (APSW drops unreferenced VFSes)."""

    def __init__(self, name: str = "litestream", config: VFSConfig | None = None,
                 makedefault: bool = False) -> None:
        self.name = name
        self.config = config or VFSConfig.from_env()
        log.setLevel(logging.DEBUG if self.config.log_level == "DEBUG" else logging.INFO)
        self._replicas: dict[str, Replica] = {}
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="ltxvfs")
        self.scheduler = Scheduler(self.pool)
        super().__init__(name, base="", makedefault=makedefault)

    # --- opening ------------------------------------------------------------------------------

    def xOpen(self, name, flags):  # noqa: N802 - apsw's name
        if flags[0] & _MAIN_DB:
            try:
                cfg = self._config_for(name)
                replica = self._acquire(cfg)
            except (LitestreamError, ConfigError) as err:
                log.error("cannot open %s: %s", self._display(name), err)
                raise apsw.CantOpenError(f"litestream: {err}") from err
            flags[1] = (flags[0] & ~(apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)) \
                | apsw.SQLITE_OPEN_READONLY
            return LitestreamFile(self, replica)
        if flags[0] & apsw.SQLITE_OPEN_WAL:
            raise apsw.CantOpenError("litestream: WAL mode is not supported (rollback journal only)")
        return super().xOpen(name, flags)

    def xAccess(self, pathname, flags):  # noqa: N802
        if pathname.endswith(("-wal", "-journal", "-shm")):
            return False  # no hot journal or WAL ever lives next to a replica
        return super().xAccess(pathname, flags)

    def xFullPathname(self, name):  # noqa: N802
        return name

    def _display(self, name) -> str:
        return name.filename() if isinstance(name, apsw.URIFilename) else str(name)

    def _config_for(self, name) -> VFSConfig:
        cfg = self.config
        if isinstance(name, apsw.URIFilename):
            params = {k: name.uri_parameter(k) for k in URI_PARAMETERS
                      if name.uri_parameter(k) is not None}
            cfg = cfg.with_params(params)
        if not cfg.replica_url:
            raise ConfigError("no replica: set LITESTREAM_REPLICA_URL or the replica_url URI "
                              "parameter (file:db?vfs=litestream&replica_url=s3://bucket/path)")
        return cfg

    def _acquire(self, cfg: VFSConfig) -> Replica:
        key = cfg.replica_url
        assert key is not None
        with self._lock:
            replica = self._replicas.get(key)
            if replica is not None:
                replica.refcount += 1
                return replica
        replica = self._open_replica(cfg)
        with self._lock:
            existing = self._replicas.get(key)
            if existing is not None:  # another thread opened it meanwhile: use theirs
                existing.refcount += 1
                replica.client.close()
                return existing
            replica.refcount = 1
            self._replicas[key] = replica
        self.scheduler.add(("poll", id(replica)), replica.poll, replica.poll_interval)
        return replica

    def _open_replica(self, cfg: VFSConfig) -> Replica:
        client = open_replica(cfg.replica_url)  # type: ignore[arg-type]
        try:
            deadline = time.monotonic() + cfg.open_timeout
            while True:
                try:
                    plan = compute_plan(client)
                    break
                except TxNotAvailableError:
                    if time.monotonic() >= deadline:
                        raise TxNotAvailableError(
                            f"replica {client.url} has no LTX files after waiting "
                            f"{cfg.open_timeout:g}s (open_timeout)") from None
                    time.sleep(min(cfg.poll_interval, max(deadline - time.monotonic(), 0.01)))
            store = PageStore(client, cfg.cache_size)
            state = build_state(client, plan, self.pool, store)
        except BaseException:
            client.close()
            raise
        log.info("opened %s at TXID %016x (%d pages of %d bytes, %d LTX files)", client.url,
                 state.txid, state.commit, state.page_size, len(plan))
        return Replica(client, store, self.pool, state, cfg.poll_interval)

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.refcount -= 1
            if replica.refcount > 0:
                return
            self._replicas = {k: r for k, r in self._replicas.items() if r is not replica}
        self.scheduler.remove(("poll", id(replica)))
        replica.client.close()

    def replicas(self) -> list[Replica]:
        with self._lock:
            return list(self._replicas.values())

    def close(self) -> None:
        """Stop background work and unregister."""
        self.scheduler.stop()
        self.unregister()
        self.pool.shutdown(wait=False, cancel_futures=True)


class LitestreamFile:
    """A main database file on a replica. One per connection."""

    def __init__(self, vfs: LitestreamVFS, replica: Replica) -> None:
        self._vfs = vfs
        self.replica = replica
        self._store = replica.store
        self._state: DatabaseState = replica.state
        self._next: DatabaseState | None = None  # adopted at the next transaction start
        self._pinned: DatabaseState | None = None
        self._pinned_time: datetime | None = None
        self._pinned_txid: int | None = None
        self._lock_level = _LOCK_NONE
        self._version = 1
        self._page1: tuple[bytes | None, int, bytes] = (None, 0, b"")
        self._closed = False

    # --- reads --------------------------------------------------------------------------------

    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802
        for attempt in range(3):
            state = self._state
            try:
                return self._read(state, amount, offset)
            except ObjectNotFoundError as err:
                # A file of our state was removed (retention after compaction). A compacted
                # file covering it holds the same pages: carry on from there, same snapshot.
                pgno = offset // state.page_size + 1
                missing = state.index[pgno][0] if pgno in state.index else None
                fixed = self.replica.recover(state, missing) if missing and attempt < 2 else None
                if fixed is None:
                    raise apsw.BusyError(f"litestream: {err}; the replica moved on, "
                                         "retry the transaction") from err
                if self._pinned is state:
                    self._pinned = fixed
                self._state = fixed
            except LitestreamError as err:
                raise to_apsw_error(err) from err
        raise AssertionError("unreachable")

    def _read(self, state: DatabaseState, amount: int, offset: int) -> bytes:
        page_size = state.page_size
        if offset >= state.size:
            return b""
        pgno, start = divmod(offset, page_size)
        pgno += 1
        if start + amount <= page_size:
            page = self._store.read_page(state, pgno)
            if pgno == 1:
                page = self._patch_header(page)
            return page[start:start + amount]
        out = bytearray()
        while len(out) < amount and offset + len(out) < state.size:
            pos = offset + len(out)
            pgno, start = divmod(pos, page_size)
            page = self._store.read_page(state, pgno + 1)
            if pgno == 0:
                page = self._patch_header(page)
            out += page[start:start + amount - len(out)]
        return bytes(out)

    def _patch_header(self, page: bytes) -> bytes:
        """Rollback-journal mode, and a change counter (also 'version valid for') that moves
        only when the state does, so SQLite's cache survives between transactions."""
        cached = self._page1
        if cached[0] is page and cached[1] == self._version:
            return cached[2]  # SQLite reads the header at every transaction start
        p = bytearray(page)
        p[18] = p[19] = 1
        counter = self._version.to_bytes(4, "big")
        p[24:28] = counter
        p[92:96] = counter
        patched = bytes(p)
        self._page1 = (page, self._version, patched)
        return patched

    def xFileSize(self) -> int:  # noqa: N802
        return self._state.size

    # --- locks: a read transaction pins a state -----------------------------------------------

    def xLock(self, level: int) -> None:  # noqa: N802
        if level >= _LOCK_RESERVED:
            raise apsw.ReadOnlyError("litestream: the database is read-only")
        if level == _LOCK_SHARED and self._lock_level == _LOCK_NONE:
            target = self._next or self._pinned or self.replica.state
            self._next = None
            if target is not self._state:
                self._state = target
                self._version = (self._version + 1) & 0x7FFFFFFF or 1
        self._lock_level = level

    def xUnlock(self, level: int) -> None:  # noqa: N802
        self._lock_level = level

    def xCheckReservedLock(self) -> bool:  # noqa: N802
        return False

    # --- writes are refused in read mode ------------------------------------------------------

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802
        raise apsw.ReadOnlyError("litestream: the database is read-only")

    def xTruncate(self, newsize: int) -> None:  # noqa: N802
        raise apsw.ReadOnlyError("litestream: the database is read-only")

    def xSync(self, flags: int) -> None:  # noqa: N802
        pass

    def xSectorSize(self) -> int:  # noqa: N802
        return 0

    def xDeviceCharacteristics(self) -> int:  # noqa: N802
        return 0

    def xClose(self) -> None:  # noqa: N802
        if not self._closed:
            self._closed = True
            self._vfs.release(self.replica)

    # --- PRAGMAs ------------------------------------------------------------------------------

    def xFileControl(self, op: int, ptr: int) -> bool:  # noqa: N802
        if op != apsw.SQLITE_FCNTL_PRAGMA:
            return False
        pragma = apsw.VFSFcntlPragma(ptr)
        try:
            result = handle_pragma(self, pragma.name, pragma.value, self._pinned_txid)
        except (PragmaError, LitestreamError) as err:
            raise apsw.SQLError(str(err)) from err
        if result is None:
            return False
        pragma.result = result
        return True

    def _view(self) -> DatabaseState:
        """The state a read would see now: inside a transaction its own, else the next one."""
        if self._lock_level != _LOCK_NONE:
            return self._state
        return self._next or self._pinned or self.replica.state

    def txid(self) -> int:
        return self._view().txid

    def lag(self) -> int:
        return self.replica.lag_seconds()

    def time_text(self) -> str:
        if self._pinned_time is not None:
            return format_time(self._pinned_time)
        return format_time(self._view().created_at)

    def travel_to(self, when: datetime | None = None, txid: int | None = None) -> None:
        """Read the database as of ``when`` or ``txid`` (both None: follow the latest again).
        Takes effect at once outside a transaction, else at the next one."""
        if when is None and txid is None:
            state = self.replica.state
            self._pinned, self._pinned_time, self._pinned_txid = None, None, None
        else:
            state = self.replica.state_at(txid=txid, timestamp=when)
            self._pinned, self._pinned_time, self._pinned_txid = state, when, txid
        if self._lock_level == _LOCK_NONE:
            if state is not self._state:
                self._state = state
                self._version = (self._version + 1) & 0x7FFFFFFF or 1
        else:
            self._next = state

    def hydration_progress(self) -> str:
        return "0"

    def hydration_file(self) -> str:
        return ""

    def write_enabled(self) -> bool:
        return False

    def set_write_enabled(self, enabled: bool) -> None:
        if enabled:
            raise PragmaError("write mode is not available in this version of ltxvfs")


# --- registration and SQL functions ------------------------------------------------------------

_registered: dict[str, LitestreamVFS] = {}
_register_lock = threading.Lock()


def register(name: str = "litestream", config: VFSConfig | None = None,
             makedefault: bool = False) -> LitestreamVFS:
    """Register the VFS (once per name; later calls return the same object) and the SQL
    functions ``litestream_time()``, ``litestream_txid()``, ``litestream_lag()`` and
    ``litestream_set_time(x)`` on every connection that opens a database through it."""
    with _register_lock:
        vfs = _registered.get(name)
        if vfs is None:
            vfs = LitestreamVFS(name, config, makedefault)
            _registered[name] = vfs
            if _add_functions not in apsw.connection_hooks:
                apsw.connection_hooks.append(_add_functions)
        return vfs


def unregister(name: str = "litestream") -> None:
    with _register_lock:
        vfs = _registered.pop(name, None)
    if vfs is not None:
        vfs.close()


def _add_functions(con: apsw.Connection) -> None:
    # APSW names a non-VFSFile file by its class; that is how we know the main db is ours.
    if con.open_vfs not in _registered and \
            LitestreamFile.__qualname__ not in (con.vfsname("main") or ""):
        return

    def pragma(name: str, value: str | None = None):
        sql = f"PRAGMA {name}" if value is None else f"PRAGMA {name} = {_quote(value)}"
        rows = con.execute(sql).fetchall()
        return rows[0][0] if rows else None

    con.create_scalar_function("litestream_time", lambda: pragma("litestream_time"), 0)
    con.create_scalar_function("litestream_txid", lambda: pragma("litestream_txid"), 0)
    con.create_scalar_function("litestream_lag", lambda: int(pragma("litestream_lag")), 0)
    con.create_scalar_function(
        "litestream_set_time", lambda v: (pragma("litestream_time", str(v)), None)[1], 1,
        flags=apsw.SQLITE_DIRECTONLY)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
