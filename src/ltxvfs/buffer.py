"""The write buffer: a local, self-describing log of pages written since the last sync.

File layout (all integers big-endian)::

    header   "LTXVFSB1" | u32 version | u32 header length | u64 base TXID | u32 page size
             | u64 replica id | crc32 of the preceding bytes
    records  u8 type | u32 payload length | payload | u32 crc32(type, length, payload)

Records:

* PAGE (1): u32 pgno, then the page bytes — written by ``xWrite``.
* TRUNCATE (2): u32 size in pages — written by ``xTruncate``.
* COMMIT (3): u32 size in pages, u64 sequence — the end of a SQLite transaction. Everything
  before the last COMMIT is committed; anything after it is discarded on recovery. A rolled-back
  transaction's records (pages SQLite spilled, then its journal's playback) are cut off the
  file when SQLite unlocks.
* SYNC (4): u64 TXID, u64 end offset, u64 LTX file checksum — "the committed records up to this
  offset are being uploaded as TXID": after a crash it tells our own upload from someone else's.

Every record is appended with ``os.write`` before the SQLite call returns, so a process crash
loses nothing committed; ``fsync`` happens when SQLite asks (``xSync``), so ``PRAGMA synchronous``
keeps its meaning. After a successful upload the buffer is rewritten atomically (temp file, fsync,
rename) with the new base TXID and only the records that came after the upload.

Recovery keeps the committed transactions up to the first record that fails its check. That is
the torn end a crash leaves; a bad record with a committed transaction after it is damage, and the
buffer is refused (kept as it is) rather than silently cut short there.

Scans and rewrites read the file ``CHUNK`` bytes at a time (a buffer may be larger than memory, and
one ``pread`` returns at most ~2 GiB on Linux); a rewrite switches to the new file as soon as it is
renamed into place, so no append ever goes to an unlinked file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WriteBufferError as BufferError  # the name this module has always used

MAGIC = b"LTXVFSB1"
VERSION = 1
PAGE, TRUNCATE, COMMIT, SYNC = 1, 2, 3, 4
_HEADER = struct.Struct(">8sIIQIQ")
_REC = struct.Struct(">BI")
_CRC = struct.Struct(">I")
_U32 = struct.Struct(">I")
_COMMIT = struct.Struct(">IQ")
_SYNC = struct.Struct(">QQQ")
#: Largest payload a record may claim (a 64 KiB page plus its number): guards against garbage.
_MAX_PAYLOAD = 65536 + 4
#: Where records start (after the header and its CRC).
RECORDS_START = _HEADER.size + 4
#: Bytes read (or written) per system call when scanning or rewriting the buffer.
CHUNK = 1 << 20


@dataclass
class Pages:
    """Where each page's newest copy sits in the buffer file, and the database size."""

    offsets: dict[int, int] = field(default_factory=dict)  # pgno -> offset of the page bytes
    size: int | None = None  # database size in pages, None if never set

    def copy(self) -> Pages:
        return Pages(dict(self.offsets), self.size)

    def truncate(self, size: int) -> None:
        self.offsets = {p: o for p, o in self.offsets.items() if p <= size}
        self.size = size


@dataclass
class SyncMark:
    txid: int
    end: int
    checksum: int


@dataclass
class Scan:
    """What a buffer file holds."""

    base_txid: int
    page_size: int
    committed: Pages
    pending: Pages  # committed plus any records after the last COMMIT
    commits: int
    sync: SyncMark | None  # the last SYNC mark
    last_commit_end: int  # offset just past the last COMMIT (or the header)
    end: int  # offset just past the last valid record
    commit_ends: list[int]  # offset just past each COMMIT
    marks: list[SyncMark] = field(default_factory=list)  # every SYNC mark, oldest first

    def commits_after(self, offset: int) -> int:
        return sum(1 for e in self.commit_ends if e > offset)


def replica_id(url: str) -> int:
    """A 64-bit tag of the replica URL, so a buffer is never applied to another replica."""
    import hashlib

    return int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big")


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
        self._end = 0
        self._last_commit_end = 0

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
        """Append a record; returns the offset of its payload."""
        head = _REC.pack(rtype, len(payload))
        rec = head + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))
        offset = self._end
        if os.pwrite(self._fd, rec, offset) != len(rec):
            raise BufferError(f"short write to {self.path}")
        self._end += len(rec)
        return offset + _REC.size

    def write_page(self, pgno: int, data: bytes) -> None:
        with self._lock:
            if not self.page_size:
                self.page_size = len(data)
                os.pwrite(self._fd, self._header(self.base_txid, self.page_size), 0)
            if len(data) != self.page_size:
                raise BufferError(f"page {pgno}: {len(data)} bytes, not {self.page_size}")
            self.pending.offsets[pgno] = self._append(PAGE, _U32.pack(pgno) + data) + 4
            if pgno > self.size_pages():
                self.pending.size = pgno
            self._dirty_txn = True

    def size_pages(self) -> int:
        """Database size in pages as the buffer sees it (the base's size until it changes)."""
        size = self.pending.size
        return self.base_size if size is None else size

    def truncate(self, size: int) -> None:
        with self._lock:
            self._append(TRUNCATE, _U32.pack(size))
            self.pending.truncate(size)
            self._dirty_txn = True

    def commit(self, fsync: bool) -> bool:
        """End of a write transaction: its records become committed. True if there were any."""
        with self._lock:
            if self._dirty_txn:
                self.commits += 1
                self._append(COMMIT, _COMMIT.pack(self.size_pages(), self.commits))
                self._last_commit_end = self._end
                self.committed = self.pending.copy()
                self._dirty_txn = False
                changed = True
            else:
                changed = False
            if fsync:
                os.fsync(self._fd)
            return changed

    def rollback(self) -> None:
        """SQLite rolled the open transaction back (its journal put the old pages back through
        :meth:`write_page`): every record since the last COMMIT is void. They are cut off the
        file — any SYNC mark among them (an upload begun meanwhile) is kept — so neither a sync
        nor recovery after a crash takes them for a commit nobody made."""
        with self._lock:
            if not self._dirty_txn:
                return
            marks = [rec for _, rtype, rec in _records(self._fd, self._last_commit_end, self._end)
                     if rtype == SYNC]
            os.ftruncate(self._fd, self._last_commit_end)
            self._end = self._last_commit_end
            for rec in marks:
                if os.pwrite(self._fd, rec, self._end) != len(rec):
                    raise BufferError(f"short write to {self.path}")
                self._end += len(rec)
            self.pending = self.committed.copy()
            self._dirty_txn = False

    def fsync(self) -> None:
        with self._lock:
            os.fsync(self._fd)

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
            data = _pread(self._fd, self.page_size, offset)
        if len(data) != self.page_size:
            raise BufferError(f"{self.path}: short read of page {pgno}")
        return data

    def read_committed(self, pages: Pages, pgno: int) -> bytes:
        """A page of a :meth:`snapshot` (valid until the next :meth:`synced`)."""
        with self._lock:
            data = _pread(self._fd, self.page_size, pages.offsets[pgno])
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
            self._append(SYNC, _SYNC.pack(txid, end, checksum))
            os.fsync(self._fd)
            self.marks.append(SyncMark(txid, end, checksum))

    def synced(self, txid: int, end: int, size: int) -> None:
        """The upload of the records up to ``end`` succeeded as ``txid`` (a database of ``size``
        pages): rebase on it, keeping what came after (later commits, an open transaction)."""
        with self._lock:
            self.base_size = size
            self._rewrite(txid, self.page_size, end, None)

    # --- file rewriting and scanning ------------------------------------------------------------

    def _header(self, base_txid: int, page_size: int) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, _HEADER.size + 4, base_txid, page_size, self.replica)
        return head + _CRC.pack(zlib.crc32(head))

    def _rewrite(self, base_txid: int, page_size: int, keep_from: int | None,
                 keep_to: int | None) -> None:
        """Atomically replace the file: new header, then the records in [keep_from, keep_to)
        (to the end if ``keep_to`` is None) without SYNC marks. The new file is complete and
        scanned before it is renamed into place; once it is, the buffer uses it — so a failure
        leaves the buffer either wholly on the old file or wholly on the new one."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out = bytearray(self._header(base_txid, page_size))
            if keep_from is not None:
                stop = self._end if keep_to is None else keep_to
                for _, rtype, rec in _records(self._fd, keep_from, stop):
                    if rtype != SYNC:  # marks belonged to the old base
                        out += rec
                        if len(out) >= CHUNK:
                            _write_all(fd, out)
                            out.clear()
            _write_all(fd, out)
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
        self._end = found.end
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
        """Read the file (``fd``, the buffer's own by default) a chunk at a time: header, then
        records up to the first torn or corrupt one."""
        fd = self._fd if fd is None else fd
        raw = _pread(fd, RECORDS_START, 0)
        if len(raw) < RECORDS_START:
            raise BufferError(f"{self.path} is too short to be an ltxvfs write buffer")
        magic, version, _, base, page_size, replica = _HEADER.unpack_from(raw, 0)
        if magic != MAGIC or version != VERSION or \
                _CRC.unpack_from(raw, _HEADER.size)[0] != zlib.crc32(raw[:_HEADER.size]):
            raise BufferError(f"{self.path} is not an ltxvfs write buffer (or its header is corrupt)")
        if replica != self.replica:
            raise BufferError(f"{self.path} belongs to another replica; move it away or choose "
                              "another buffer path")
        committed = Pages()
        txn: list[tuple[int, int, int]] = []  # records since the last COMMIT, applied at COMMIT
        commits = 0
        marks: list[SyncMark] = []
        commit_ends: list[int] = []
        end = last_commit_end = RECORDS_START
        for pos, rtype, rec in _records(fd, RECORDS_START):
            if rtype == PAGE:
                pgno = _U32.unpack_from(rec, _REC.size)[0]
                page_size = page_size or len(rec) - _REC.size - 8
                txn.append((PAGE, pgno, pos + _REC.size + 4))
            elif rtype == TRUNCATE:
                txn.append((TRUNCATE, _U32.unpack_from(rec, _REC.size)[0], 0))
            elif rtype == COMMIT:
                _apply(committed, txn)
                txn.clear()
                committed.size = _COMMIT.unpack_from(rec, _REC.size)[0]
                commits += 1
                commit_ends.append(pos + len(rec))
                last_commit_end = pos + len(rec)
            elif rtype == SYNC:
                marks.append(SyncMark(*_SYNC.unpack_from(rec, _REC.size)))
            else:
                break
            end = pos + len(rec)
        size = os.fstat(fd).st_size
        if end < size and _commit_after(fd, end, page_size, size):
            raise BufferError(
                f"{self.path} is damaged at offset {end}: a record there fails its check, and "
                "records of committed transactions come after it, which cannot be replayed "
                "without it; nothing was recovered and the buffer is kept as it is (move it "
                "away to discard its unsynced commits)")
        pending = committed.copy()
        _apply(pending, txn)
        return Scan(base, page_size, committed, pending, commits, marks[-1] if marks else None,
                    last_commit_end, end, commit_ends, marks)


def _commit_after(fd: int, pos: int, page_size: int, size: int) -> bool:
    """Whether a COMMIT record follows the record at ``pos`` that failed its check. A crash
    tears only the end of the log (a cut record, zeros): nothing valid comes after it. Damage
    (a flipped byte) leaves valid records behind the bad one, found where it would have ended
    with its own length or any length a record has (a page, TRUNCATE, COMMIT, SYNC). Only a
    COMMIT matters: damage inside the transaction that never committed loses nothing."""
    lengths = {_U32.size, _COMMIT.size, _SYNC.size}
    if page_size:
        lengths.add(page_size + 4)
    head = _pread(fd, _REC.size, pos)
    if len(head) == _REC.size and _REC.unpack(head)[1] <= _MAX_PAYLOAD:
        lengths.add(_REC.unpack(head)[1])
    for length in sorted(lengths):
        after = pos + _REC.size + length + _CRC.size
        if after < size and any(rtype == COMMIT for _, rtype, _ in _records(fd, after)):
            return True
    return False


def _apply(pages: Pages, records: list[tuple[int, int, int]]) -> None:
    """Replay PAGE and TRUNCATE records (as the scan collected them) onto ``pages``."""
    for rtype, n, offset in records:
        if rtype == PAGE:
            pages.offsets[n] = offset
            if pages.size is not None and n > pages.size:
                pages.size = n
        else:
            pages.truncate(n)


def _records(fd: int, start: int, stop: int | None = None
             ) -> Iterator[tuple[int, int, memoryview]]:
    """(offset, type, whole record) of each record from ``start`` up to ``stop`` (or the end),
    stopping at the first torn or corrupt one. Reads ``CHUNK`` bytes at a time; each record
    view is valid until the next one is taken."""
    data = memoryview(b"")
    base = pos = start  # data holds the file's bytes [base, base + len(data))

    def have(n: int) -> bool:
        nonlocal data, base
        if pos + n <= base + len(data):
            return True
        want = max(n, CHUNK) if stop is None else min(max(n, CHUNK), stop - pos)
        if want < n:
            return False
        data, base = memoryview(_pread(fd, want, pos)), pos
        return len(data) >= n

    while have(_REC.size):
        _, length = _REC.unpack_from(data, pos - base)
        size = _REC.size + length + 4
        if length > _MAX_PAYLOAD or not have(size):
            return
        rec = data[pos - base:pos - base + size]
        if _CRC.unpack_from(rec, size - 4)[0] != zlib.crc32(rec[:size - 4]):
            return
        yield pos, rec[0], rec
        pos += size


def _pread(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset``, fewer only at the end of the file: ``pread`` may return less
    than asked (at most 0x7ffff000 bytes per call on Linux)."""
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
