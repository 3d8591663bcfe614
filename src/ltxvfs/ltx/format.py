"""The LTX format's pieces: constants, CRC-64, header, page index, page frames, page-number rules.

The layout and the two page encodings are described in the package docstring (``ltxvfs.ltx``).
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import fastcrc
import lz4.block
import lz4.frame

from ..errors import (
    InvalidHeaderError,
    InvalidMagicError,
    MalformedIndexError,
    PageFrameError,
    PageOrderError,
    TruncatedError,
)
from ..gcpause import paused_gc

MAGIC = b"LTX1"
HEADER_SIZE = 100
PAGE_HEADER_SIZE = 6
TRAILER_SIZE = 16
HEADER_FLAG_NO_CHECKSUM = 0x00000002
PAGE_FLAG_SIZE = 0x0001
CHECKSUM_FLAG = 1 << 63
PENDING_BYTE = 0x40000000
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 512, 65536
#: How much of a file's end the VFS fetches to find the page index in one request.
ESTIMATED_INDEX_TAIL = 32768

_HEADER = struct.Struct(">4sIIIQQqQqqIIQ")  # 80 bytes, then 20 reserved bytes
PAGE_HEADER = struct.Struct(">IH")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
END_OF_PAGES = bytes(PAGE_HEADER_SIZE)
# A compressed page can exceed the page size (LZ4 bound); anything far beyond it is hostile.
MAX_BLOCK_OVERHEAD = 1024


def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-64/GO-ISO (Go's ``crc64.ISO``), continuing from ``crc`` so it can be streamed."""
    return fastcrc.crc64.go_iso(data, initial=crc)


def is_valid_page_size(page_size: int) -> bool:
    return MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0


def lock_pgno(page_size: int) -> int:
    """The page holding SQLite's PENDING_BYTE; it is never stored in LTX files."""
    return PENDING_BYTE // page_size + 1


@dataclass(frozen=True)
class Header:
    """The 100-byte LTX header. ``timestamp`` is milliseconds since the Unix epoch (UTC)."""

    page_size: int
    commit: int
    min_txid: int
    max_txid: int
    timestamp: int
    flags: int = HEADER_FLAG_NO_CHECKSUM
    pre_apply_checksum: int = 0
    wal_offset: int = 0
    wal_size: int = 0
    wal_salt1: int = 0
    wal_salt2: int = 0
    node_id: int = 0

    @property
    def is_snapshot(self) -> bool:
        """A snapshot holds every page 1..commit (Litestream: MinTXID == 1)."""
        return self.min_txid == 1

    def validate(self) -> None:
        """The checks Go's ``Header.Validate`` makes; raises InvalidHeaderError."""
        if self.flags & ~HEADER_FLAG_NO_CHECKSUM:
            raise InvalidHeaderError(f"invalid flags: 0x{self.flags:08x}")
        if not is_valid_page_size(self.page_size):
            raise InvalidHeaderError(f"invalid page size: {self.page_size}")
        if self.min_txid == 0 or self.max_txid == 0:
            raise InvalidHeaderError("minimum transaction id required")
        if self.min_txid > self.max_txid:
            raise InvalidHeaderError(
                f"transaction ids out of order: ({self.min_txid},{self.max_txid})")
        if self.wal_offset < 0 or self.wal_size < 0:
            raise InvalidHeaderError("negative WAL offset or size")
        if (self.wal_salt1 or self.wal_salt2) and self.wal_offset == 0:
            raise InvalidHeaderError("WAL salts set without a WAL offset")
        if self.wal_offset == 0 and self.wal_size != 0:
            raise InvalidHeaderError("WAL size set without a WAL offset")
        no_checksum = bool(self.flags & HEADER_FLAG_NO_CHECKSUM)
        if self.is_snapshot and self.pre_apply_checksum != 0:
            raise InvalidHeaderError("pre-apply checksum must be zero on snapshots")
        if not self.is_snapshot:
            if no_checksum and self.pre_apply_checksum != 0:
                raise InvalidHeaderError("pre-apply checksum not allowed")
            if not no_checksum and not self.pre_apply_checksum & CHECKSUM_FLAG:
                raise InvalidHeaderError("pre-apply checksum required")

    def pack(self) -> bytes:
        self.validate()
        return _HEADER.pack(
            MAGIC, self.flags, self.page_size, self.commit, self.min_txid, self.max_txid,
            self.timestamp, self.pre_apply_checksum, self.wal_offset, self.wal_size,
            self.wal_salt1, self.wal_salt2, self.node_id) + bytes(HEADER_SIZE - _HEADER.size)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        """Decode and validate the first 100 bytes of ``data``."""
        if len(data) < HEADER_SIZE:
            if bytes(data[:4]) != MAGIC[:len(data[:4])]:
                raise InvalidMagicError("invalid LTX file: wrong magic")
            raise TruncatedError(f"LTX header truncated: {len(data)} of {HEADER_SIZE} bytes")
        fields = _HEADER.unpack_from(data, 0)
        if fields[0] != MAGIC:
            raise InvalidMagicError(f"invalid LTX file: magic {fields[0]!r}, expected {MAGIC!r}")
        header = cls(page_size=fields[2], commit=fields[3], min_txid=fields[4],
                     max_txid=fields[5], timestamp=fields[6], flags=fields[1],
                     pre_apply_checksum=fields[7], wal_offset=fields[8], wal_size=fields[9],
                     wal_salt1=fields[10], wal_salt2=fields[11], node_id=fields[12])
        header.validate()
        return header


@dataclass(frozen=True)
class Trailer:
    post_apply_checksum: int
    file_checksum: int


# --- page index ------------------------------------------------------------------------------

#: pgno -> (offset of the frame from the start of the file, frame size in bytes)
PageIndex = dict[int, tuple[int, int]]


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def page_index_start(tail: bytes | memoryview, file_size: int) -> int:
    """Absolute offset where the page index begins, from the last >= 24 bytes of the file."""
    if file_size < HEADER_SIZE + PAGE_HEADER_SIZE + 1 + 8 + TRAILER_SIZE:
        raise TruncatedError(f"ltx file too short to contain a page index: {file_size} bytes")
    if len(tail) < 24:
        raise TruncatedError(f"need the last 24 bytes of the file, got {len(tail)}")
    (length,) = U64.unpack_from(tail, len(tail) - 24)
    start = file_size - TRAILER_SIZE - 8 - length
    if length < 1 or start < HEADER_SIZE + PAGE_HEADER_SIZE:
        raise MalformedIndexError(f"page index length {length} does not fit a {file_size}-byte file")
    return start


def index_span(tail: bytes | memoryview, file_size: int, data_offset: int,
               page_size: int | None = None) -> tuple[int, int, int, int]:
    """Where the index's varints are, from a tail of the file that starts at ``data_offset``:
    (start, stop) as offsets in the file (terminator included, length and trailer not), where
    the page frames end, and the largest plausible frame. Raises TruncatedError if the index
    starts before ``data_offset``."""
    start = page_index_start(tail, file_size)
    if start < data_offset:
        raise TruncatedError(f"page index starts at {start}, before the fetched tail at {data_offset}")
    max_frame = (page_size or MAX_PAGE_SIZE) + MAX_BLOCK_OVERHEAD + 10
    return start, file_size - TRAILER_SIZE - 8, start - PAGE_HEADER_SIZE, max_frame


def index_body(data: bytes | memoryview, file_size: int, data_offset: int | None = None,
               page_size: int | None = None) -> tuple[memoryview, int, int]:
    """The index's varints in ``data`` (the bytes ``[data_offset, file_size)`` of a file), where
    the page frames end, and the largest plausible frame; raises as :func:`parse_page_index`."""
    if data_offset is None:
        data_offset = file_size - len(data)
    if data_offset + len(data) != file_size:
        raise TruncatedError("page index data does not reach the end of the file")
    start, stop, frames_end, max_frame = index_span(data, file_size, data_offset, page_size)
    return memoryview(data)[start - data_offset:stop - data_offset], frames_end, max_frame


def parse_page_index(data: bytes | memoryview, file_size: int, data_offset: int | None = None,
                     page_size: int | None = None) -> PageIndex:
    """Parse the page index from ``data``, the bytes ``[data_offset, file_size)`` of a file.

    ``data_offset`` defaults to ``file_size - len(data)`` (a tail). Raises TruncatedError if the
    index starts before ``data_offset`` (fetch more), MalformedIndexError if it is inconsistent.
    (``ltxvfs.index`` decodes the same bytes into flat arrays, with the same checks.)
    """
    body, frames_end, max_frame = index_body(data, file_size, data_offset, page_size)
    with paused_gc():
        pgnos, offsets, sizes = check_entries(uvarints(bytes(body)), frames_end, max_frame)
        return dict(zip(pgnos, zip(offsets, sizes, strict=True), strict=True))


def check_entries(values: list[int], frames_end: int, max_frame: int
                  ) -> tuple[list[int], list[int], list[int]]:
    """The index's varints checked and split into columns: (pgnos, offsets, sizes)."""
    if not values or values[-1] != 0 or len(values) % 3 != 1:
        raise MalformedIndexError("page index: terminator is not at the recorded index length")
    # Checked column by column with builtins (C loops): a 50,000-page snapshot's index is
    # parsed on every cold open, and a Python loop per entry cost ~30 ms of it.
    pgnos, offsets, sizes = values[0:-1:3], values[1:-1:3], values[2:-1:3]
    if pgnos and (pgnos[0] < 1 or not all(map(operator.lt, pgnos, pgnos[1:]))):
        prev, pgno = next((a, b) for a, b in zip([0, *pgnos], pgnos, strict=False) if b <= a)
        raise MalformedIndexError(f"page index: pgno {pgno} after {prev}")
    if pgnos and (min(offsets) < HEADER_SIZE or min(sizes) <= PAGE_HEADER_SIZE
                  or max(sizes) > max_frame or max(map(operator.add, offsets, sizes)) > frames_end):
        pgno, offset, size = next(
            (p, o, z) for p, o, z in zip(pgnos, offsets, sizes, strict=True)
            if o < HEADER_SIZE or z <= PAGE_HEADER_SIZE or z > max_frame or o + z > frames_end)
        raise MalformedIndexError(
            f"page index: frame of page {pgno} at {offset}+{size} is outside the page data")
    return pgnos, offsets, sizes


def uvarints(buf: bytes) -> list[int]:
    """Every varint of ``buf``, which must end exactly at the end of one.

    One tight loop rather than a call per varint: a 50,000-page snapshot's index has 150,000
    of them, parsed on every cold open."""
    values: list[int] = []
    append = values.append
    value = shift = 0
    for b in buf:
        if b < 0x80:
            append(value | (b << shift))
            value = shift = 0
        else:
            value |= (b & 0x7F) << shift
            shift += 7
            if shift > 63:
                raise MalformedIndexError("page index: varint too long")
    if shift:
        raise MalformedIndexError("page index: varint runs past the index")
    return values


def encode_page_index(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """Index bytes for (pgno, offset, size) entries: varints, terminator, u64 length."""
    body = b"".join(_uvarint(p) + _uvarint(o) + _uvarint(s) for p, o, s in entries) + b"\x00"
    return body + U64.pack(len(body))


# --- page frames -----------------------------------------------------------------------------


def decode_page_frame(frame: bytes | memoryview, page_size: int,
                      expected_pgno: int | None = None) -> bytes:
    """Decompress one whole page frame (as located by the page index) into page bytes."""
    if len(frame) < PAGE_HEADER_SIZE:
        raise TruncatedError(f"page frame truncated: {len(frame)} bytes")
    pgno, flags = PAGE_HEADER.unpack_from(frame, 0)
    if expected_pgno is not None and pgno != expected_pgno:
        raise PageFrameError(f"page frame holds page {pgno}, expected page {expected_pgno}")
    if flags & ~PAGE_FLAG_SIZE:
        raise PageFrameError(f"invalid page header flags: 0x{flags:04x} (page {pgno})")
    if flags & PAGE_FLAG_SIZE:
        if len(frame) < PAGE_HEADER_SIZE + 4:
            raise TruncatedError(f"page frame of page {pgno} truncated")
        (n,) = U32.unpack_from(frame, PAGE_HEADER_SIZE)
        payload = frame[PAGE_HEADER_SIZE + 4:PAGE_HEADER_SIZE + 4 + n]
        if len(payload) != n:
            raise TruncatedError(f"page frame of page {pgno} truncated: {len(payload)} of {n} bytes")
        return decompress_block(payload, page_size, pgno)
    d = lz4.frame.LZ4FrameDecompressor()  # max_length: never trust the frame's content size
    try:
        data = d.decompress(bytes(frame[PAGE_HEADER_SIZE:]), max_length=page_size + 1)
    except RuntimeError as err:
        raise PageFrameError(f"decompress frame of page {pgno}: {err}") from err
    if not d.eof and len(data) == page_size:
        raise PageFrameError(f"LZ4 frame of page {pgno} is incomplete")
    if len(data) != page_size:
        raise PageFrameError(f"page {pgno} decompressed to {len(data)} bytes, not {page_size}")
    return data


def block_payload(frame: bytes | memoryview) -> bytes | None:
    """The LZ4 block of a block-encoded frame (already checked by :func:`decode_page_frame`),
    or None for an LZ4-frame-encoded one."""
    if not PAGE_HEADER.unpack_from(frame, 0)[1] & PAGE_FLAG_SIZE:
        return None
    (n,) = U32.unpack_from(frame, PAGE_HEADER_SIZE)
    return bytes(frame[PAGE_HEADER_SIZE + 4:PAGE_HEADER_SIZE + 4 + n])


def decompress_block(payload: bytes | memoryview, page_size: int, pgno: int) -> bytes:
    if len(payload) > page_size + MAX_BLOCK_OVERHEAD:
        raise PageFrameError(f"page {pgno}: compressed size {len(payload)} is implausible")
    try:
        data = lz4.block.decompress(payload, uncompressed_size=page_size)
    except (lz4.block.LZ4BlockError, ValueError) as err:
        raise PageFrameError(f"decompress block of page {pgno}: {err}") from err
    if len(data) != page_size:
        raise PageFrameError(f"page {pgno} decompressed to {len(data)} bytes, not {page_size}")
    return data


def encode_page_frame(pgno: int, data: bytes) -> bytes:
    """One frame in the block encoding (what Litestream 0.5.16+ writes)."""
    comp = lz4.block.compress(data, store_size=False)
    return PAGE_HEADER.pack(pgno, PAGE_FLAG_SIZE) + U32.pack(len(comp)) + comp


# --- page-number rules -----------------------------------------------------------------------


class PageOrder:
    """Checks the page-number rules shared by the encoder and the decoder."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self.lock = lock_pgno(header.page_size)
        self.prev = 0

    def check(self, pgno: int) -> None:
        h = self.header
        if pgno == 0 or pgno > h.commit:
            raise PageOrderError(f"page number {pgno} out-of-bounds for commit size {h.commit}")
        if pgno == self.lock:
            raise PageOrderError(f"cannot encode lock page: pgno={pgno}")
        if pgno <= self.prev:
            raise PageOrderError(f"out-of-order page numbers: {self.prev},{pgno}")
        if h.is_snapshot:
            expected = self.prev + 1
            if expected == self.lock:
                expected += 1
            if pgno != expected:
                if self.prev == 0:
                    raise PageOrderError("snapshot transaction file must start with page number 1")
                raise PageOrderError(
                    f"nonsequential page numbers in snapshot transaction: {self.prev},{pgno}")
        self.prev = pgno

    def finish(self) -> None:
        h = self.header
        if h.is_snapshot:
            last = h.commit - 1 if h.commit == self.lock else h.commit
            if self.prev != last:
                raise PageOrderError(
                    f"snapshot ends at page {self.prev} but commit is {h.commit}")
