"""The main database file SQLite sees: one per connection, on a shared :class:`Replica`.

* Read mode: a read transaction pins one state, adopted when SQLite takes the SHARED lock; page 1
  carries a change counter that moves only when that state changes, so SQLite keeps its page
  cache between transactions.
* Write mode: pages come from the write buffer first, then from the replica; SQLite's own change
  counter is left alone (SQLite maintains it on every commit, as on a real file). Locks follow
  SQLite's rules among this process's connections (locks.py); the writer's commit ends at the
  unlock (or at ``xSync``, which also makes it durable).
* Package errors become apsw errors here.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import apsw

from .errors import ConflictError, LitestreamError, LTXError, ObjectNotFoundError, StorageError
from .follow import Replica
from .locks import NONE, RESERVED, SHARED
from .pages import DatabaseState, PageNotFoundError
from .pragmas import PragmaError, format_time, handle_pragma

if TYPE_CHECKING:
    from .vfs import LitestreamVFS

#: Change counters of time-travel views live in their own range, apart from SQLite's.
_TRAVEL_VERSION = 0x40000000


def to_apsw_error(err: Exception) -> apsw.Error:
    """The apsw exception SQLite should see for one of ours (the original stays chained)."""
    if isinstance(err, (PageNotFoundError, LTXError)):
        return apsw.CorruptError(str(err))
    if isinstance(err, StorageError):
        return apsw.BusyError(f"object storage unavailable: {err}")
    return apsw.IOError(str(err))


class LitestreamFile:
    """A main database file on a replica."""

    def __init__(self, vfs: LitestreamVFS, replica: Replica, may_write: bool) -> None:
        self._vfs = vfs
        self.replica = replica
        self._store = replica.store
        self._may_write = may_write
        self._state: DatabaseState = replica.state
        self._next: DatabaseState | None = None  # adopted at the next transaction start
        self._pinned: DatabaseState | None = None
        self._pinned_time: datetime | None = None
        self._pinned_txid: int | None = None
        self._lock_level = NONE
        self._version = 1
        self._page1: tuple[bytes | None, int, bytes] = (None, 0, b"")
        self._closed = False

    @property
    def _writer(self):
        """The writer whose buffer this connection reads through (None: read from states)."""
        return self.replica.writer if self._pinned is None else None

    # --- reads ----------------------------------------------------------------------------------

    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802
        for attempt in range(3):
            state = self.replica.state if self._writer is not None else self._state
            try:
                return self._read(amount, offset)
            except ObjectNotFoundError as err:
                # A file of our state was removed (retention after compaction). Compacted files
                # covering it may hold the same pages: carry on from there, same snapshot.
                try:
                    fixed = self.replica.recover(state) if attempt < 2 else None
                except LitestreamError:
                    fixed = None
                if fixed is None or fixed is state:
                    raise apsw.BusyError(f"litestream: {err}; the replica moved on, "
                                         "retry the transaction") from err
                if self._pinned is state:
                    self._pinned = fixed
                if self._state is state:
                    self._state = fixed
            except LitestreamError as err:
                raise to_apsw_error(err) from err
        raise AssertionError("unreachable")

    def _page(self, pgno: int) -> bytes:
        writer = self._writer
        if writer is not None:
            page = writer.read_page(pgno)
            if page is not None:
                return page
            state = self.replica.state
        else:
            state = self._state
        hydrator = self.replica.hydrator
        if hydrator is not None:
            page = hydrator.read_page(state, pgno)
            if page is not None:
                return page
        return self._store.read_page(state, pgno)

    def _geometry(self) -> tuple[int, int]:
        """(page size, database size in bytes) as this connection sees it."""
        writer = self._writer
        if writer is not None:
            page_size = writer.page_size
            return page_size, writer.size_pages() * page_size
        return self._state.page_size, self._state.size

    def _read(self, amount: int, offset: int) -> bytes:
        page_size, size = self._geometry()
        if offset >= size:
            return b""
        pgno, start = divmod(offset, page_size)
        if start + amount <= page_size:
            page = self._page(pgno + 1)
            if pgno == 0:
                page = self._patch_header(page)
            return page[start:start + amount]
        out = bytearray()
        while len(out) < amount and offset + len(out) < size:
            pgno, start = divmod(offset + len(out), page_size)
            page = self._page(pgno + 1)
            if pgno == 0:
                page = self._patch_header(page)
            out += page[start:start + amount - len(out)]
        return bytes(out)

    def _patch_header(self, page: bytes) -> bytes:
        """Page 1 always says rollback-journal mode. In read mode its change counter (and the
        'version valid for' field) is ours: it moves only when the state does."""
        version = 0 if self._writer is not None else self._version
        cached = self._page1
        if cached[0] is page and cached[1] == version:
            return cached[2]  # SQLite reads the header at every transaction start
        p = bytearray(page)
        p[18] = p[19] = 1
        if version:
            counter = version.to_bytes(4, "big")
            p[24:28] = counter
            p[92:96] = counter
        patched = bytes(p)
        self._page1 = (page, version, patched)
        return patched

    def xFileSize(self) -> int:  # noqa: N802
        return self._geometry()[1]

    # --- locks ----------------------------------------------------------------------------------

    def xLock(self, level: int) -> None:  # noqa: N802
        if level >= RESERVED and self._lock_level < RESERVED:
            writer = self.replica.writer
            if writer is None or not self._may_write:
                raise apsw.ReadOnlyError("litestream: the database is read-only (write mode is off)")
            if self._pinned is not None:
                raise apsw.ReadOnlyError("litestream: cannot write while reading the past; "
                                         "PRAGMA litestream_time = 'latest' first")
            writer.check_writable()  # a ConflictError reaches the caller as it is
        self.replica.locks.lock(id(self), level)
        if level == SHARED and self._lock_level == NONE:
            self.replica.touched = True
            target = self._next or self._pinned or self.replica.state
            self._next = None
            if target is not self._state:
                self._state = target
                self._bump_version()
        self._lock_level = level

    def _bump_version(self) -> None:
        base = _TRAVEL_VERSION if self._pinned is not None else 0
        self._version = base | ((self._version + 1) & 0x3FFFFFFF or 1)

    def xUnlock(self, level: int) -> None:  # noqa: N802
        if self._lock_level >= RESERVED > level and self.replica.writer is not None:
            try:
                self.replica.writer.commit(fsync=False)
            except LitestreamError as err:
                raise to_apsw_error(err) from err
        self.replica.locks.unlock(id(self), level)
        self._lock_level = level

    def xCheckReservedLock(self) -> bool:  # noqa: N802
        return self.replica.locks.reserved_by_other(id(self))

    # --- writes ---------------------------------------------------------------------------------

    def _writing(self):
        writer = self.replica.writer
        if writer is None or not self._may_write or self._lock_level < RESERVED:
            raise apsw.ReadOnlyError("litestream: the database is read-only")
        return writer

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802
        writer = self._writing()
        try:
            page_size = writer.page_size or len(data)
            pgno, start = divmod(offset, page_size)
            if start or len(data) != page_size:  # a partial page: read, modify, write
                page = bytearray(self._page(pgno + 1) if offset < self._geometry()[1]
                                 else bytes(page_size))
                page[start:start + len(data)] = data
                data = bytes(page)
            writer.write_page(pgno + 1, data)
        except LitestreamError as err:
            raise to_apsw_error(err) from err

    def xTruncate(self, newsize: int) -> None:  # noqa: N802
        writer = self._writing()
        try:
            writer.truncate(newsize // max(writer.page_size, 1))
        except LitestreamError as err:
            raise to_apsw_error(err) from err

    def xSync(self, flags: int) -> None:  # noqa: N802
        writer = self.replica.writer
        if writer is not None and self._lock_level >= RESERVED:
            try:
                writer.commit(fsync=True)  # SQLite syncs the database file only to commit
            except LitestreamError as err:
                raise to_apsw_error(err) from err

    def xSectorSize(self) -> int:  # noqa: N802
        return 0

    def xDeviceCharacteristics(self) -> int:  # noqa: N802
        return 0

    def xClose(self) -> None:  # noqa: N802
        if not self._closed:
            self._closed = True
            self.replica.locks.unlock(id(self), NONE)
            self._vfs.release(self.replica)

    # --- PRAGMAs --------------------------------------------------------------------------------

    def xFileControl(self, op: int, ptr: int) -> bool:  # noqa: N802
        if op != apsw.SQLITE_FCNTL_PRAGMA:
            return False
        pragma = apsw.VFSFcntlPragma(ptr)
        try:
            result = handle_pragma(self, pragma.name, pragma.value, self._pinned_txid)
        except ConflictError:
            raise  # as it is: the caller should see exactly this
        except (PragmaError, LitestreamError) as err:
            raise apsw.SQLError(str(err)) from err
        if result is None:
            return False
        pragma.result = result
        return True

    def _view(self) -> DatabaseState:
        """The state a read would see now: inside a transaction its own, else the next one."""
        if self._lock_level != NONE:
            return self._state
        return self._next or self._pinned or self.replica.state

    def txid(self) -> int:
        if self._writer is not None:
            return self.replica.state.txid
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
        if self._lock_level >= RESERVED:
            raise PragmaError("cannot time-travel inside a write transaction")
        if when is None and txid is None:
            state = self.replica.state
            self._pinned, self._pinned_time, self._pinned_txid = None, None, None
        else:
            state = self.replica.state_at(txid=txid, timestamp=when)
            self._pinned, self._pinned_time, self._pinned_txid = state, when, txid
        if self._lock_level == NONE:
            self._state = state
            self._bump_version()
        else:
            self._next = state

    def hydration_progress(self) -> str:
        hydrator = self.replica.hydrator
        return hydrator.progress() if hydrator is not None else "0"

    def hydration_file(self) -> str:
        hydrator = self.replica.hydrator
        return str(hydrator.path) if hydrator is not None else ""

    def write_enabled(self) -> bool:
        return self.replica.writer is not None and self._may_write

    def set_write_enabled(self, enabled: bool) -> None:
        if enabled:
            self._vfs.enable_writes(self.replica)
            self._may_write = True
        else:
            if self._lock_level >= RESERVED:
                raise PragmaError("cannot turn write mode off inside a write transaction")
            self._vfs.disable_writes(self.replica)

    def sync_now(self) -> str:
        writer = self.replica.writer
        if writer is None:
            raise PragmaError("write mode is off: nothing to sync")
        txid = writer.sync()
        return "" if txid is None else f"{txid:016x}"

    def stats(self) -> dict[str, object]:
        """Counters of this database (shared by its connections in this process)."""
        replica, store = self.replica, self._store
        writer, hydrator = replica.writer, replica.hydrator
        requests = getattr(replica.client, "requests", None)
        return {
            "txid": f"{self.txid():016x}",
            "page_gets": store.gets,
            "bytes_fetched": store.bytes_fetched,
            "cache_hits": store.cache.hits,
            "cache_misses": store.cache.misses,
            "cache_bytes": store.cache.bytes,
            "indexed_pages": len(replica.state.index),
            "polls": replica.polls,
            "poll_error": replica.last_error or "",
            "syncs": writer.syncs if writer else 0,
            "conflicts": writer.conflicts if writer else 0,
            "sync_error": (writer.last_error or "") if writer else "",
            "hydration": hydrator.progress() if hydrator else "off",
            "requests": requests.snapshot() if requests is not None else {},
        }

    def sync_error(self) -> str:
        writer = self.replica.writer
        return (writer.last_error or "") if writer is not None else ""
