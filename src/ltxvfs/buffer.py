"""The write buffer: a local, self-describing log of pages written since the last sync (its file
format and streamed reading: bufferlog.py).

Appending: a transaction's records collect in memory (up to ``FLUSH`` bytes, then they are
written) and go to the file with its COMMIT record in one ``pwrite`` before the SQLite call that
ends the transaction returns — so a process crash loses nothing committed — and are
``fdatasync``-ed there when SQLite asks for durability (``PRAGMA synchronous`` keeps its
meaning). The file is kept ahead of its records by a tail of zeros, grown ``PREALLOC`` bytes at a
time by small commits: a commit then overwrites blocks that already exist, so its ``fdatasync``
flushes the data alone, with no file-size or block-allocation change to journal. (Zeros, not ``fallocate``:
writing into a filesystem's unwritten extents is itself a metadata change.) Reads of the open
transaction's pages come from memory while they are not yet written.

After a successful upload the buffer is rewritten atomically (temp file, fsync, rename) with the
new base TXID and only the records that came after the upload; a rewrite switches to the new file
as soon as it is renamed into place, so no append ever goes to an unlinked file. A ROLLBACK's
records are cut off (zeroed, the tail kept) so neither a sync nor recovery takes them for a
commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from . import bufferlog
from .bufferlog import (  # noqa: F401 - re-exported: the names callers have always used
    CHUNK,
    COMMIT,
    COMMIT_PAYLOAD,
    PAGE,
    RECORDS_START,
    SYNC,
    SYNC_PAYLOAD,
    TRUNCATE,
    U32,
    Pages,
    Scan,
    SyncMark,
    header,
    pread,
    record,
    records,
    replica_id,
    write_all,
)
from .errors import WriteBufferError as BufferError  # the name this module has always used

#: The zero tail is grown this many bytes at a time (rounded up to cover the write).
PREALLOC = 1 << 20
#: ... by commits of at most this many bytes of records. The zeros are flushed too (by the next
#: fdatasync): for small commits that costs little and spares each later one a metadata change;
#: a large commit would flush twice its size for a saving it hardly needs (it changes the size
#: once per PREALLOC at best), so it just grows the file.
SMALL_COMMIT = 64 << 10
#: An open transaction's records are written once this many bytes collect in memory.
FLUSH = 256 << 10


def _datasync(fd: int) -> None:
    """``fdatasync``: the data and what reading it back needs (the size), not the timestamps.
    Where there is none (macOS), ``fsync``."""
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


class WriteBuffer:
    """One replica's buffer file. Thread-safe; every method runs under one lock."""

    def __init__(self, path: Path, replica: int) -> None:
        self.path = Path(path)
        self.replica = replica
        self._lock = threading.RLock()
        self._fd = -1
        self.base_txid = 0
        self.page_size = 0
        self.committed = Pages()
        self.pending = Pages()  # committed + the open transaction's writes (what reads see)
        self.commits = 0  # COMMIT records since the base
        #: SYNC marks written since the base (upload attempts of the next TXID), oldest first.
        self.marks: list[SyncMark] = []
        #: Size in pages of the database at the base TXID (set by the writer from the remote).
        self.base_size = 0
        self._dirty_txn = False
        self._end = 0  # where the next record goes (the records end there)
        self._last_commit_end = 0
        self._written = 0  # the file holds the records up to here; the rest are in _mem
        self._mem = bytearray()  # the records [_written, _end), not written yet
        self._alloc = 0  # the file's size: zeros from _written (or _end) on

    # --- opening --------------------------------------------------------------------------------

    def open(self) -> Scan | None:
        """Open (private directories, a 0600 file, an exclusive lock against other processes).
        Returns what a previous process left in the file, or None for a new or empty buffer; the
        caller decides what to do with it (:meth:`adopt` or :meth:`reset`)."""
        for parent in reversed(self.path.parents):  # every directory we create is private
            if not parent.exists():
                parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BufferError(f"write buffer {self.path} is in use by another process "
                              "(one writer per buffer)") from None
        self._fd = fd
        if os.fstat(fd).st_size == 0:
            return None
        try:
            return self._scan()
        except BaseException:
            self.close()  # a refused buffer is let go: its lock must not outlive the refusal
            raise

    def reset(self, base_txid: int, base_size: int, page_size: int) -> None:
        """Start empty on top of ``base_txid`` (a database of ``base_size`` pages)."""
        with self._lock:
            self.base_size = base_size
            self._rewrite(base_txid, page_size, None, None)

    def adopt(self, found: Scan, base_txid: int, base_size: int, keep_from: int) -> None:
        """Continue a previous process's buffer: its committed records after ``keep_from`` are
        kept (to be synced on top of ``base_txid``); an unfinished transaction is dropped."""
        with self._lock:
            self.base_size = base_size
            self._rewrite(base_txid, found.page_size, keep_from, found.last_commit_end)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        """Delete the buffer file (only when everything in it is synced)."""
        with self._lock:
            self.path.unlink(missing_ok=True)
            self.close()

    # --- appending ------------------------------------------------------------------------------

    def _append(self, rtype: int, payload: bytes) -> int:
        """Append a record (in memory until :meth:`_flush`); returns the offset of its
        payload."""
        rec = record(rtype, payload)
        offset = self._end
        self._mem += rec
        self._end += len(rec)
        if len(self._mem) >= FLUSH:
            self._flush(grow=False)
        return offset + bufferlog.REC.size

    def _flush(self, grow: bool) -> None:
        """Write the records collected in memory, in one ``pwrite``; then, if they reached the
        end of the zero tail and ``grow``, grow it (by ``PREALLOC`` at least)."""
        if not self._mem:
            return
        if os.pwrite(self._fd, self._mem, self._written) != len(self._mem):
            raise BufferError(f"short write to {self.path}")
        self._written = self._end
        self._mem.clear()
        if self._end >= self._alloc:  # the write grew the file
            self._alloc = self._end
            if grow:  # a tail of zeros ahead of it
                size = -(-(self._end + PREALLOC) // PREALLOC) * PREALLOC
                self._zero(self._end, size)
                self._alloc = size

    def _zero(self, start: int, stop: int) -> None:
        """Write zeros over [start, stop) of the file."""
        zeros = bytes(min(bufferlog.CHUNK, max(stop - start, 0)))
        while start < stop:
            n = min(len(zeros), stop - start)
            if os.pwrite(self._fd, zeros if n == len(zeros) else zeros[:n], start) != n:
                raise BufferError(f"short write to {self.path}")
            start += n

    def _read_at(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the log at ``offset``: from memory if not written yet."""
        if offset >= self._written:
            return bytes(self._mem[offset - self._written:offset - self._written + n])
        return pread(self._fd, n, offset)

    def write_page(self, pgno: int, data: bytes) -> None:
        with self._lock:
            if not self.page_size:
                self.page_size = len(data)
                os.pwrite(self._fd, header(self.base_txid, self.page_size, self.replica), 0)
            if len(data) != self.page_size:
                raise BufferError(f"page {pgno}: {len(data)} bytes, not {self.page_size}")
            self.pending.offsets[pgno] = self._append(PAGE, U32.pack(pgno) + data) + 4
            if pgno > self.size_pages():
                self.pending.size = pgno
            self._dirty_txn = True

    def size_pages(self) -> int:
        """Database size in pages as the buffer sees it (the base's size until it changes)."""
        size = self.pending.size
        return self.base_size if size is None else size

    def truncate(self, size: int) -> None:
        with self._lock:
            self._append(TRUNCATE, U32.pack(size))
            self.pending.truncate(size)
            self._dirty_txn = True

    def commit(self, fsync: bool) -> bool:
        """End of a write transaction: its records become committed, written to the file
        (one ``pwrite`` for what is still in memory) and, if ``fsync``, made durable with
        ``fdatasync`` (the size does not change within the zero tail; when it does,
        ``fdatasync`` flushes it too). True if there were any records."""
        with self._lock:
            if self._dirty_txn:
                self.commits += 1
                self._append(COMMIT, COMMIT_PAYLOAD.pack(self.size_pages(), self.commits))
                self._flush(grow=self._end - self._last_commit_end <= SMALL_COMMIT)
                self._last_commit_end = self._end
                self.committed = self.pending.copy()
                self._dirty_txn = False
                changed = True
            else:
                changed = False
            if fsync:
                _datasync(self._fd)
            return changed

    def rollback(self) -> None:
        """SQLite rolled the open transaction back (its journal put the old pages back through
        :meth:`write_page`): every record since the last COMMIT is void. They are cut off the
        file — any SYNC mark among them (an upload begun meanwhile) is kept — so neither a sync
        nor recovery after a crash takes them for a commit nobody made."""
        with self._lock:
            if not self._dirty_txn:
                return
            cut = self._last_commit_end
            if self._written > cut:  # some of them are in the file: zero them there
                self._flush(grow=False)
                marks = b"".join(bytes(rec) for _, rtype, rec in records(self._fd, cut, self._end)
                                 if rtype == SYNC)
                # The marks first (a crash between the two leaves them followed by records
                # without a COMMIT, which recovery drops), then zeros over the rest.
                if marks and os.pwrite(self._fd, marks, cut) != len(marks):
                    raise BufferError(f"short write to {self.path}")
                self._zero(cut + len(marks), self._end)
                self._end = self._written = cut + len(marks)
            else:  # all in memory (a SYNC mark is always written at once: none among them)
                self._mem.clear()
                self._end = cut
            self.pending = self.committed.copy()
            self._dirty_txn = False

    def fsync(self) -> None:
        with self._lock:
            self._flush(grow=False)
            _datasync(self._fd)

    @property
    def in_transaction(self) -> bool:
        return self._dirty_txn

    @property
    def has_unsynced(self) -> bool:
        return self.commits > 0

    def read_page(self, pgno: int) -> bytes | None:
        """The buffered copy of a page (the open transaction's included), or None."""
        with self._lock:
            offset = self.pending.offsets.get(pgno)
            if offset is None:
                return None
            data = self._read_at(offset, self.page_size)
        if len(data) != self.page_size:
            raise BufferError(f"{self.path}: short read of page {pgno}")
        return data

    def read_committed(self, pages: Pages, pgno: int) -> bytes:
        """A page of a :meth:`snapshot` (valid until the next :meth:`synced`)."""
        with self._lock:
            data = self._read_at(pages.offsets[pgno], self.page_size)
        if len(data) != self.page_size:
            raise BufferError(f"{self.path}: short read of page {pgno}")
        return data

    # --- syncing --------------------------------------------------------------------------------

    def snapshot(self) -> tuple[Pages, int]:
        """The committed pages and the offset they end at, for an upload. The size is always
        set: the committed transactions' size, else the base's."""
        with self._lock:
            pages = self.committed.copy()
            if pages.size is None:
                pages.size = self.base_size
            return pages, self._last_commit_end

    def mark_sync(self, txid: int, end: int, checksum: int) -> None:
        """Durably note that the records up to ``end`` are being uploaded as ``txid``."""
        with self._lock:
            self._append(SYNC, SYNC_PAYLOAD.pack(txid, end, checksum))
            self._flush(grow=False)
            _datasync(self._fd)
            self.marks.append(SyncMark(txid, end, checksum))

    def synced(self, txid: int, end: int, size: int) -> None:
        """The upload of the records up to ``end`` succeeded as ``txid`` (a database of ``size``
        pages): rebase on it, keeping what came after (later commits, an open transaction)."""
        with self._lock:
            self.base_size = size
            self._rewrite(txid, self.page_size, end, None)

    # --- file rewriting and scanning ------------------------------------------------------------

    def _rewrite(self, base_txid: int, page_size: int, keep_from: int | None,
                 keep_to: int | None) -> None:
        """Atomically replace the file: new header, then the records in [keep_from, keep_to)
        (to the end if ``keep_to`` is None) without SYNC marks. The new file is complete and
        scanned before it is renamed into place; once it is, the buffer uses it — so a failure
        leaves the buffer either wholly on the old file or wholly on the new one."""
        if self._fd >= 0:
            self._flush(grow=False)  # the records to keep (an open transaction's too) are in the file
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out = bytearray(header(base_txid, page_size, self.replica))
            if keep_from is not None:
                stop = self._end if keep_to is None else keep_to
                for _, rtype, rec in records(self._fd, keep_from, stop):
                    if rtype != SYNC:  # marks belonged to the old base
                        out += rec
                        if len(out) >= bufferlog.CHUNK:
                            write_all(fd, out)
                            out.clear()
            write_all(fd, out)
            os.fsync(fd)
            found = self._scan(fd)
            os.replace(tmp, self.path)
        except BaseException as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(err, OSError):
                raise BufferError(f"rewriting write buffer {self.path} failed (it is unchanged): "
                                  f"{err}") from err
            raise
        # The file at self.path is the new one from here on: use it before anything can fail.
        in_flight_size = self.pending.size if keep_to is None and keep_from is not None else None
        old, self._fd = self._fd, fd
        if old >= 0:
            with contextlib.suppress(OSError):
                os.close(old)
        self.base_txid = base_txid
        self.page_size = page_size or found.page_size
        self.committed = found.committed
        self.pending = found.pending
        self.commits = found.commits
        self.marks = []
        self._dirty_txn = found.end > found.last_commit_end
        if self._dirty_txn and in_flight_size is not None:
            self.pending.size = in_flight_size  # growth of the open transaction is not in the file
        self._end = self._written = found.end
        self._mem.clear()
        self._alloc = os.fstat(fd).st_size
        self._last_commit_end = found.last_commit_end
        try:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as err:
            raise BufferError(f"write buffer {self.path} was rewritten and is in use, but its "
                              f"directory could not be synced: {err}") from err

    def _scan(self, fd: int | None = None) -> Scan:
        """What the file (``fd``, the buffer's own by default) holds: :func:`bufferlog.scan`."""
        return bufferlog.scan(self._fd if fd is None else fd, self.path, self.replica)
