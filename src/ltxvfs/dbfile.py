"""The main database file SQLite sees: one per connection, on a shared :class:`Replica`.

* Every read goes through the connection's :class:`~ltxvfs.view.View`, chosen when SQLite takes
  the SHARED lock and fixed until the lock drops to NONE (follower state, writer buffer over the
  replica's state, or a pinned past state); page 1 carries the connection's own change counter,
  which moves exactly when its view may show other bytes (view.py).
* Write mode: SQLite's writes go to the write buffer. A transaction's records become a commit at
  ``SQLITE_FCNTL_COMMIT_PHASETWO`` (every mode, including ``synchronous=OFF`` and
  ``locking_mode=EXCLUSIVE``), fsynced there if SQLite synced the file (``xSync``: not with
  ``synchronous=OFF``). Records still open at the unlock belong to a rolled-back transaction
  (spilled pages and the journal's playback, which SQLite also syncs) and are dropped.
  Locks follow SQLite's rules among this process's connections (locks.py).
* Package errors become apsw errors here.
"""

from __future__ import annotations

import errno
import logging
from datetime import datetime
from typing import TYPE_CHECKING

import apsw

from .errors import ConflictError, LitestreamError, LTXError, ObjectNotFoundError, StorageError
from .follow import Replica
from .host.frames import DiskCache
from .locks import NONE, RESERVED, SHARED
from .pages import DatabaseState, PageNotFoundError
from .pragmas import PragmaError, format_time, handle_pragma
from .view import Counter, View

if TYPE_CHECKING:
    from .vfs import LitestreamVFS
    from .writer import Writer

log = logging.getLogger("ltxvfs")

def to_apsw_error(err: Exception) -> apsw.Error:
    """The apsw exception SQLite should see for one of ours (the original stays chained)."""
    if isinstance(err, (PageNotFoundError, LTXError)):
        return apsw.CorruptError(str(err))
    if isinstance(err, StorageError):
        return apsw.BusyError(f"object storage unavailable: {err}")
    if isinstance(err, OSError):  # the write buffer's file (a full disk, an I/O error)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return apsw.FullError(f"litestream: write buffer: {err}")
        return apsw.IOError(f"litestream: write buffer: {err}")
    return apsw.IOError(str(err))


class LitestreamFile:
    """A main database file on a replica. Reads go through the connection's :class:`View`
    (view.py): chosen when SQLite takes SHARED, fixed until the lock drops to NONE."""

    def __init__(self, vfs: LitestreamVFS, replica: Replica, name: str, may_write: bool) -> None:
        self._vfs = vfs
        self.replica = replica
        self.name = name
        self._may_write = may_write
        self._view: View | None = None  # while SQLite holds a lock
        self._pinned: DatabaseState | None = None  # the pin for the next views
        self._pinned_time: datetime | None = None
        self._lock_level = NONE
        self._durable = False  # SQLite synced the file in this write transaction (xSync)
        self._counter = Counter()
        self._page1: tuple[bytes | None, int, bytes] = (None, 0, b"")
        self._closed = False

    def _choose_view(self) -> View:
        """The view a transaction starting now gets (called under the replica's lock table)."""
        if self._pinned is not None:
            return View(self._pinned, None, pinned=True)
        writer = self.replica.writer
        if writer is not None:
            return View(None, writer)
        return View(self.replica.state, None)

    def _current(self) -> View:
        """The view of the open transaction; outside one (SQLite reads under a lock, but a
        PRAGMA may ask), the view a transaction would get now."""
        return self._view if self._view is not None else self._choose_view()

    # --- reads ----------------------------------------------------------------------------------

    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802
        for attempt in range(3):
            view = self._current()
            try:
                return self._read(view, amount, offset)
            except ObjectNotFoundError as err:
                # A file of our state was removed (retention after compaction). Compacted files
                # covering it may hold the same pages: carry on from there, same snapshot.
                state = view.read_state(self.replica)
                try:
                    fixed = self.replica.recover(state) if attempt < 2 else None
                except LitestreamError:
                    fixed = None
                if fixed is None or fixed is state:
                    raise apsw.BusyError(f"litestream: {err}; the replica moved on, "
                                         "retry the transaction") from err
                if view.state is not None:  # same bytes, so the counter stays
                    self._view = View(fixed, None, view.pinned) if self._view is view else self._view
                    if self._pinned is state:
                        self._pinned = fixed
            except LitestreamError as err:
                raise to_apsw_error(err) from err
        raise AssertionError("unreachable")

    def _read(self, view: View, amount: int, offset: int) -> bytes:
        page_size, size = view.geometry()
        if offset >= size:
            return b""
        pgno, start = divmod(offset, page_size)
        if start + amount <= page_size:
            # A read within page 1's first 100 bytes is SQLite checking the file header (the
            # change counter, at every transaction start): kept out of the cache statistics.
            page = view.page(self.replica, pgno + 1, pgno == 0 and start + amount <= 100)
            if pgno == 0:
                page = self._patch_header(page)
            return page[start:start + amount]
        out = bytearray()
        while len(out) < amount and offset + len(out) < size:
            pgno, start = divmod(offset + len(out), page_size)
            page = view.page(self.replica, pgno + 1)
            if pgno == 0:
                page = self._patch_header(page)
            out += page[start:start + amount - len(out)]
        return bytes(out)

    def _patch_header(self, page: bytes) -> bytes:
        """Page 1 always says rollback-journal mode and carries this connection's counter."""
        value = self._counter.value
        cached = self._page1
        if cached[0] is page and cached[1] == value:
            return cached[2]  # SQLite reads the header at every transaction start
        patched = self._counter.patch(page)
        self._page1 = (page, value, patched)
        return patched

    def xFileSize(self) -> int:  # noqa: N802
        return self._current().geometry()[1]

    # --- locks ----------------------------------------------------------------------------------

    def xLock(self, level: int) -> None:  # noqa: N802
        if level >= RESERVED and self._lock_level < RESERVED:
            if self._pinned is not None or self._view is not None and self._view.pinned:
                raise apsw.ReadOnlyError("litestream: cannot write while reading the past; "
                                         "PRAGMA litestream_time = 'latest' first")
            if not self._may_write:
                raise apsw.ReadOnlyError("litestream: the database is read-only (write mode is off)")
        elif level == SHARED and self._lock_level == NONE and self._pinned is None:
            # A read transaction starts: its view will be the latest state, which must be no
            # older than max_lag (checked here, outside the lock table: a check does I/O).
            self.replica.ensure_fresh()
        try:
            self.replica.locks.lock(id(self), level, self._granting)
        except LitestreamError as err:
            raise to_apsw_error(err) from err
        self._lock_level = level

    def _granting(self, level: int) -> None:
        """Runs under the lock table's mutex, just before ``level`` is granted: a new read
        transaction chooses its view; a write transaction needs the writer its view reads."""
        if level == SHARED and self._lock_level == NONE:
            self.replica.touched = True
            view = self._choose_view()
            self._counter.adopt(view)
            self._view = view
            self.replica.locks.set_reads_buffer(id(self), view.writer is not None)
        elif level >= RESERVED and self._lock_level < RESERVED:
            writer = self.replica.writer
            if writer is None:
                raise apsw.ReadOnlyError("litestream: the database is read-only (write mode is off)")
            view = self._view
            if view is not None and view.writer is not writer:
                # SQLite's own code for "this read transaction is too old to write from"
                # (a message does not survive xLock; the extended code does: say why in the log).
                log.warning("a connection to %s began its read transaction before write mode "
                            "was turned on: it cannot write until that transaction ends",
                            self.replica.client.url)
                raise apsw.exception_for(apsw.SQLITE_BUSY_SNAPSHOT)
            writer.check_writable()  # a ConflictError reaches the caller as it is

    def xUnlock(self, level: int) -> None:  # noqa: N802
        if self._lock_level >= RESERVED > level:
            # Commits end at COMMIT_PHASETWO: what is still open was rolled back.
            self._durable = False
            self._rollback()
        self.replica.locks.unlock(id(self), level)
        self._lock_level = level
        if level == NONE:
            self._view = None

    def _commit(self, fsync: bool) -> None:
        """End of a write transaction: what SQLite wrote becomes a commit in the buffer."""
        self._end_transaction(lambda writer: writer.commit(fsync=fsync))

    def _rollback(self) -> None:
        """End of a write transaction SQLite did not commit: its records are void."""
        self._end_transaction(lambda writer: writer.rollback())

    def _end_transaction(self, end) -> None:
        view = self._view
        writer = view.writer if view is not None else None
        if writer is None:
            return
        try:
            end(writer)
        except (LitestreamError, OSError) as err:
            raise to_apsw_error(err) from err

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
                view = self._current()
                page = bytearray(view.page(self.replica, pgno + 1) if offset < view.geometry()[1]
                                 else bytes(page_size))
                page[start:start + len(data)] = data
                data = bytes(page)
            writer.write_page(pgno + 1, data)
        except (LitestreamError, OSError) as err:
            raise to_apsw_error(err) from err

    def _writing(self) -> Writer:
        view = self._view
        writer = view.writer if view is not None else None
        if writer is None or not self._may_write or self._lock_level < RESERVED:
            raise apsw.ReadOnlyError("litestream: the database is read-only")
        return writer

    def xTruncate(self, newsize: int) -> None:  # noqa: N802
        writer = self._writing()
        try:
            writer.truncate(newsize // max(writer.page_size, 1))
        except (LitestreamError, OSError) as err:
            raise to_apsw_error(err) from err

    def xSync(self, flags: int) -> None:  # noqa: N802
        if self._lock_level >= RESERVED:
            # SQLite syncs the database file in a commit's first phase — and after a rollback's
            # journal playback. The commit mark waits for COMMIT_PHASETWO (only commits get it)
            # and is fsynced there: one fsync per commit, none for a rollback.
            self._durable = True

    def xSectorSize(self) -> int:  # noqa: N802
        return 0

    def xDeviceCharacteristics(self) -> int:  # noqa: N802
        return 0

    def xClose(self) -> None:  # noqa: N802
        if not self._closed:
            self._closed = True
            self._view = None
            self.replica.locks.unlock(id(self), NONE)
            self._vfs.forget_local_files(self.name)
            self._vfs.release(self.replica)

    # --- file controls and PRAGMAs --------------------------------------------------------------

    def xFileControl(self, op: int, ptr: int) -> bool:  # noqa: N802
        if op == apsw.SQLITE_FCNTL_COMMIT_PHASETWO:
            # The end of every committed write transaction, in every mode: with
            # synchronous=OFF there is no xSync, with locking_mode=EXCLUSIVE no xUnlock.
            if self._lock_level >= RESERVED:
                durable, self._durable = self._durable, False
                self._commit(fsync=durable)
            return False
        if op != apsw.SQLITE_FCNTL_PRAGMA:
            return False
        pragma = apsw.VFSFcntlPragma(ptr)
        name = pragma.name.lower()
        value = (pragma.value or "").strip().lower()
        if name == "journal_mode" and value == "wal" and self._may_write:
            # Refused before SQLite writes anything: WAL needs shared memory this VFS has not
            # (read-only connections get SQLite's own answer: the mode stays 'delete').
            raise apsw.SQLError("litestream: journal_mode=WAL is not supported (rollback journal "
                                "only: DELETE, TRUNCATE, PERSIST, MEMORY or OFF)")
        if name == "page_size" and value and self._may_write:
            self._check_page_size(value)
        try:
            result = handle_pragma(self, name, pragma.value)
        except ConflictError:
            raise  # as it is: the caller should see exactly this
        except (PragmaError, LitestreamError) as err:
            raise apsw.SQLError(str(err)) from err
        if result is None:
            return False
        pragma.result = result
        return True

    def _check_page_size(self, value: str) -> None:
        """A replica's LTX files share one page size: changing it (PRAGMA page_size + VACUUM)
        is refused before anything is written, unless the database is still empty."""
        try:
            wanted = int(value)
        except ValueError:
            return  # SQLite ignores it
        writer = self.replica.writer
        page_size, size = self._current().geometry() if writer is None else \
            (writer.page_size, writer.size_pages())
        if size and page_size and wanted != page_size:
            raise apsw.SQLError(f"litestream: cannot change the page size of a replica "
                                f"({page_size} bytes) to {wanted}: its LTX files share one page "
                                "size; restore it, change it locally, and start a new replica")

    def txid(self) -> int:
        return self._current().txid

    def pinned_txid(self) -> int | None:
        """The TXID of the pinned past state (by TXID or by time), None when following."""
        return self._pinned.txid if self._pinned is not None else None

    def lag(self) -> int:
        return self.replica.lag_seconds()

    def time_text(self) -> str:
        if self._pinned_time is not None:
            return format_time(self._pinned_time)
        return format_time(self._current().read_state(self.replica).created_at)

    def travel_to(self, when: datetime | None = None, txid: int | None = None) -> None:
        """Read the database as of ``when`` or ``txid`` (both None: follow the latest again),
        from the next transaction on. Refused inside a transaction: its view is fixed, and
        under ``locking_mode=EXCLUSIVE`` (which SQLite may apply to this file without telling
        it, e.g. when attached) the transaction never ends — a deferred change would never
        apply while the PRAGMA said it had."""
        if self._lock_level >= RESERVED:
            raise PragmaError("cannot time-travel inside a write transaction")
        if self._view is not None:
            raise PragmaError("cannot time-travel inside a read transaction: end it first (with "
                              "locking_mode=EXCLUSIVE it never ends: time-travel before the "
                              "first query, or use locking_mode=NORMAL)")
        if when is None and txid is None:
            self._pinned, self._pinned_time = None, None
        else:
            state = self.replica.state_at(txid=txid, timestamp=when)
            self._pinned, self._pinned_time = state, when

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
            if not self._may_write:
                raise PragmaError("this connection was opened read-only: open it with "
                                  "SQLITE_OPEN_READWRITE to write (write mode belongs to the "
                                  "replica; read-write connections write while it is on)")
            self._vfs.enable_writes(self.replica)
        else:
            if self._lock_level >= RESERVED:
                raise PragmaError("cannot turn write mode off inside a write transaction")
            self._vfs.disable_writes(self.replica, id(self))

    def sync_now(self) -> str:
        writer = self.replica.writer
        if writer is None:
            raise PragmaError("write mode is off: nothing to sync")
        txid = writer.sync()
        return "" if txid is None else f"{txid:016x}"

    def stats(self) -> dict[str, object]:
        """Counters of this database (shared by its connections in this process)."""
        replica, store = self.replica, self.replica.store
        writer, hydrator = replica.writer, replica.hydrator
        requests = getattr(replica.client, "requests", None)
        return {
            "txid": f"{self.txid():016x}",
            "page_gets": store.gets,
            "bytes_fetched": store.bytes_fetched,
            "cache_hits": store.cache.hits,  # page 1's header checks are "header_reads"
            "header_reads": store.header_reads,
            "cache_misses": store.cache.misses,
            "cache_bytes": store.cache.bytes,
            "cache_segments": store.cache.segment_bytes(),
            "cache_promotions": store.cache.promotions,
            "cache_evictions": store.cache.evictions,
            "indexed_pages": len(replica.state.index),
            "polls": replica.polls,
            "poll_lists": replica.lists,  # LISTs our polls made ...
            "poll_shared": replica.shared_used,  # ... and polls another process's record answered
            "poll_interval": replica.interval,  # seconds; more than poll_interval while idle
            "lag_checks": replica.checks,  # read transactions that checked first (max_lag)
            "lag_checks_late": replica.checks_late,  # ... that read older data (logged)
            "poll_error": replica.last_error or "",
            "syncs": writer.syncs if writer else 0,
            "conflicts": writer.conflicts if writer else 0,
            "sync_error": (writer.last_error or "") if writer else "",
            "hydration": hydrator.progress() if hydrator else "off",
            # One copy per host: "builder" (this process writes it) or "reader" (another does).
            "hydration_role": hydrator.role if hydrator else "",
            "hydration_fetched_bytes": hydrator.fetched_bytes if hydrator else 0,
            "hydration_file_reads": hydrator.file_reads if hydrator else 0,
            "hydration_takeovers": hydrator.takeovers if hydrator else 0,
            "requests": requests.snapshot() if requests is not None else {},
            **(store.disk.stats() if store.disk is not None else DiskCache.off_stats()),
        }

    def sync_error(self) -> str:
        writer = self.replica.writer
        return (writer.last_error or "") if writer is not None else ""
