"""The write buffer's file format and its streamed reading: what a buffer file holds.

File layout (all integers big-endian)::

    header   "LTXVFSB1" | u32 version | u32 header length | u64 base TXID | u32 page size
             | u64 replica id | crc32 of the preceding bytes
    records  u8 type | u32 payload length | payload | u32 crc32(type, length, payload)
    tail     zeros (the preallocated room the next records go to; none in buffers written
             before preallocation: both read the same, see below)

Records:

* PAGE (1): u32 pgno, then the page bytes.
* TRUNCATE (2): u32 size in pages.
* COMMIT (3): u32 size in pages, u64 sequence — the end of a SQLite transaction. Everything
  before the last COMMIT is committed; anything after it is discarded on recovery.
* SYNC (4): u64 TXID, u64 end offset, u64 LTX file checksum — "the committed records up to this
  offset are being uploaded as TXID": after a crash it tells our own upload from someone else's.

:func:`scan` keeps the committed transactions up to the first record that fails its check. That
is the torn end a crash leaves — a cut record, or the zeros of the preallocated tail (a zero
record header claims type 0, length 0, and its CRC field, 0, is not the CRC of five zero bytes):
so the tail needs no marker and the format did not change with it. A bad record with a committed
transaction after it is damage, and the buffer is refused (kept as it is) rather than silently
cut short there.

Scans read the file ``CHUNK`` bytes at a time (a buffer may be larger than memory, and one
``pread`` returns at most ~2 GiB on Linux).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WriteBufferError as BufferError

MAGIC = b"LTXVFSB1"
VERSION = 1
PAGE, TRUNCATE, COMMIT, SYNC = 1, 2, 3, 4
HEADER = struct.Struct(">8sIIQIQ")
REC = struct.Struct(">BI")
CRC = struct.Struct(">I")
U32 = struct.Struct(">I")
COMMIT_PAYLOAD = struct.Struct(">IQ")
SYNC_PAYLOAD = struct.Struct(">QQQ")
#: Largest payload a record may claim (a 64 KiB page plus its number): guards against garbage.
MAX_PAYLOAD = 65536 + 4
#: Where records start (after the header and its CRC).
RECORDS_START = HEADER.size + 4
#: Bytes read (or written) per system call when scanning or rewriting the buffer.
CHUNK = 1 << 20
#: The first read when looking for records after a bad one: small, since what usually follows
#: is the zero tail (a whole CHUNK there, for each record length tried, would be read for nothing).
_PROBE = 16 << 10



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
    return int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big")


def record(rtype: int, payload: bytes) -> bytes:
    """One framed record: type, length, payload, CRC."""
    head = REC.pack(rtype, len(payload))
    return head + payload + CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def header(base_txid: int, page_size: int, replica: int) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, HEADER.size + 4, base_txid, page_size, replica)
    return head + CRC.pack(zlib.crc32(head))


def scan(fd: int, path: Path, replica: int) -> Scan:
    """Read the buffer file ``fd`` (named ``path`` in errors) a chunk at a time: header, then
    records up to the first torn or corrupt one."""
    raw = pread(fd, RECORDS_START, 0)
    if len(raw) < RECORDS_START:
        raise BufferError(f"{path} is too short to be an ltxvfs write buffer")
    magic, version, _, base, page_size, owner = HEADER.unpack_from(raw, 0)
    if magic != MAGIC or version != VERSION or \
            CRC.unpack_from(raw, HEADER.size)[0] != zlib.crc32(raw[:HEADER.size]):
        raise BufferError(f"{path} is not an ltxvfs write buffer (or its header is corrupt)")
    if owner != replica:
        raise BufferError(f"{path} belongs to another replica; move it away or choose "
                          "another buffer path")
    committed = Pages()
    txn: list[tuple[int, int, int]] = []  # records since the last COMMIT, applied at COMMIT
    commits = 0
    marks: list[SyncMark] = []
    commit_ends: list[int] = []
    end = last_commit_end = RECORDS_START
    for pos, rtype, rec in records(fd, RECORDS_START):
        if rtype == PAGE:
            pgno = U32.unpack_from(rec, REC.size)[0]
            page_size = page_size or len(rec) - REC.size - 8
            txn.append((PAGE, pgno, pos + REC.size + 4))
        elif rtype == TRUNCATE:
            txn.append((TRUNCATE, U32.unpack_from(rec, REC.size)[0], 0))
        elif rtype == COMMIT:
            apply(committed, txn)
            txn.clear()
            committed.size = COMMIT_PAYLOAD.unpack_from(rec, REC.size)[0]
            commits += 1
            commit_ends.append(pos + len(rec))
            last_commit_end = pos + len(rec)
        elif rtype == SYNC:
            marks.append(SyncMark(*SYNC_PAYLOAD.unpack_from(rec, REC.size)))
        else:
            break
        end = pos + len(rec)
    size = os.fstat(fd).st_size
    if end < size and commit_after(fd, end, page_size, size):
        raise BufferError(
            f"{path} is damaged at offset {end}: a record there fails its check, and "
            "records of committed transactions come after it, which cannot be replayed "
            "without it; nothing was recovered and the buffer is kept as it is (move it "
            "away to discard its unsynced commits)")
    pending = committed.copy()
    apply(pending, txn)
    return Scan(base, page_size, committed, pending, commits, marks[-1] if marks else None,
                last_commit_end, end, commit_ends, marks)


def commit_after(fd: int, pos: int, page_size: int, size: int) -> bool:
    """Whether a COMMIT record follows the record at ``pos`` that failed its check. A crash
    tears only the end of the log (a cut record, zeros): nothing valid comes after it. Damage
    (a flipped byte) leaves valid records behind the bad one, found where it would have ended
    with its own length or any length a record has (a page, TRUNCATE, COMMIT, SYNC). Only a
    COMMIT matters: damage inside the transaction that never committed loses nothing."""
    lengths = {U32.size, COMMIT_PAYLOAD.size, SYNC_PAYLOAD.size}
    if page_size:
        lengths.add(page_size + 4)
    head = pread(fd, REC.size, pos)
    if len(head) == REC.size and REC.unpack(head)[1] <= MAX_PAYLOAD:
        lengths.add(REC.unpack(head)[1])
    for length in sorted(lengths):
        after = pos + REC.size + length + CRC.size
        if after < size and any(rtype == COMMIT for _, rtype, _ in records(fd, after,
                                                                            first=_PROBE)):
            return True
    return False


def apply(pages: Pages, recs: list[tuple[int, int, int]]) -> None:
    """Replay PAGE and TRUNCATE records (as the scan collected them) onto ``pages``."""
    for rtype, n, offset in recs:
        if rtype == PAGE:
            pages.offsets[n] = offset
            if pages.size is not None and n > pages.size:
                pages.size = n
        else:
            pages.truncate(n)


def records(fd: int, start: int, stop: int | None = None, first: int | None = None
            ) -> Iterator[tuple[int, int, memoryview]]:
    """(offset, type, whole record) of each record from ``start`` up to ``stop`` (or the end),
    stopping at the first torn or corrupt one. Reads ``CHUNK`` bytes at a time (``first`` bytes
    the first time, if given); each record view is valid until the next one is taken."""
    data = memoryview(b"")
    base = pos = start  # data holds the file's bytes [base, base + len(data))
    step = CHUNK if first is None else first

    def have(n: int) -> bool:
        nonlocal data, base, step
        if pos + n <= base + len(data):
            return True
        want = max(n, step) if stop is None else min(max(n, step), stop - pos)
        step = CHUNK
        if want < n:
            return False
        data, base = memoryview(pread(fd, want, pos)), pos
        return len(data) >= n

    while have(REC.size):
        _, length = REC.unpack_from(data, pos - base)
        size = REC.size + length + 4
        if length > MAX_PAYLOAD or not have(size):
            return
        rec = data[pos - base:pos - base + size]
        if CRC.unpack_from(rec, size - 4)[0] != zlib.crc32(rec[:size - 4]):
            return
        yield pos, rec[0], rec
        pos += size


def pread(fd: int, n: int, offset: int) -> bytes:
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


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
