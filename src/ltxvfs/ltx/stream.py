"""Whole LTX files as streams: a decoder that verifies as it goes, and an encoder.

Both hold one page at a time, so a large snapshot never sits in memory twice.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import lz4.frame

from ..errors import (
    ChecksumMismatchError,
    InvalidHeaderError,
    MalformedIndexError,
    PageFrameError,
    PageOrderError,
    TruncatedError,
)
from .format import (
    CHECKSUM_FLAG,
    END_OF_PAGES,
    HEADER_FLAG_NO_CHECKSUM,
    HEADER_SIZE,
    MAX_BLOCK_OVERHEAD,
    PAGE_FLAG_SIZE,
    PAGE_HEADER,
    PAGE_HEADER_SIZE,
    TRAILER_SIZE,
    U32,
    U64,
    Header,
    PageIndex,
    PageOrder,
    Trailer,
    crc64,
    decompress_block,
    encode_page_frame,
    encode_page_index,
    page_index_start,
    parse_page_index,
)

# --- streaming decoder -----------------------------------------------------------------------


class Decoder:
    """Reads a whole LTX file from a binary stream, page by page, and verifies it at the end.

    Iterating yields ``(pgno, page bytes)``; after the last page the index and trailer are read,
    checked against the frames, and the file checksum verified (ChecksumMismatchError).
    Memory stays at one page plus the read buffer, whatever the file size.
    """

    _CHUNK = 256 * 1024

    def __init__(self, f: BinaryIO, name: str = "LTX file") -> None:
        self._f = f
        self.name = name
        self._buf = b""
        self._off = 0  # read position in self._buf
        self._pos = 0  # read position in the file
        raw = self._take(HEADER_SIZE, "header")
        self.header = Header.unpack(raw)
        self._crc = crc64(raw)
        self.index: PageIndex = {}
        self.trailer: Trailer | None = None

    def _fill(self, n: int) -> bool:
        """Make at least ``n`` unread bytes available; False at end of stream."""
        while len(self._buf) - self._off < n:
            chunk = self._f.read(max(self._CHUNK, n - (len(self._buf) - self._off)))
            if not chunk:
                return False
            self._buf = self._buf[self._off:] + chunk
            self._off = 0
        return True

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise TruncatedError(f"{self.name}: truncated in {what} at offset {self._pos}")
        out = self._buf[self._off:self._off + n]
        self._off += n
        self._pos += n
        return out

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        page_size = self.header.page_size
        order = PageOrder(self.header)
        frames: list[tuple[int, int, int]] = []
        while True:
            start = self._pos
            ph = self._take(PAGE_HEADER_SIZE, "page header")
            self._crc = crc64(ph, self._crc)
            pgno, flags = PAGE_HEADER.unpack(ph)
            if pgno == 0:
                if flags:
                    raise PageFrameError(f"{self.name}: invalid end-of-pages flags 0x{flags:04x}")
                break
            if flags & ~PAGE_FLAG_SIZE:
                raise PageFrameError(f"{self.name}: invalid page header flags: 0x{flags:04x}")
            try:
                order.check(pgno)
            except PageOrderError as err:
                raise PageOrderError(f"{self.name}: {err}") from None
            if flags & PAGE_FLAG_SIZE:
                size_field = self._take(4, f"page {pgno}")
                (n,) = U32.unpack(size_field)
                if n > page_size + MAX_BLOCK_OVERHEAD:
                    raise PageFrameError(f"{self.name}: page {pgno}: implausible size {n}")
                block = self._take(n, f"page {pgno}")
                try:
                    data = decompress_block(block, page_size, pgno)
                except PageFrameError as err:  # name the file, as every other error here does
                    raise PageFrameError(f"{self.name}: {err}") from None
                self._crc = crc64(size_field, self._crc)
            else:
                data = self._decode_lz4_frame(pgno, page_size)
            self._crc = crc64(data, self._crc)
            frames.append((pgno, start, self._pos - start))
            yield pgno, data
        order.finish()
        self._finish(frames)

    def _decode_lz4_frame(self, pgno: int, page_size: int) -> bytes:
        d = lz4.frame.LZ4FrameDecompressor()
        out = bytearray()
        while not d.eof:
            if len(self._buf) == self._off and not self._fill(1):
                raise TruncatedError(f"{self.name}: truncated in LZ4 frame of page {pgno}")
            chunk = self._buf[self._off:]
            try:  # max_length: at most one byte more than a page, whatever the frame claims
                out += d.decompress(chunk, max_length=page_size + 1 - len(out))
            except RuntimeError as err:
                raise PageFrameError(f"{self.name}: decompress frame of page {pgno}: {err}") from err
            used = len(chunk) - len(d.unused_data) if d.eof else len(chunk)
            self._off += used
            self._pos += used
            if len(out) > page_size:
                break
        if len(out) != page_size:
            raise PageFrameError(f"{self.name}: page {pgno} decompressed to {len(out)} bytes")
        return bytes(out)

    def _finish(self, frames: list[tuple[int, int, int]]) -> None:
        index_start = self._pos
        while self._fill(len(self._buf) - self._off + 1):  # the rest: index + trailer
            if len(self._buf) - self._off > 64 << 20:
                raise MalformedIndexError(f"{self.name}: implausibly large page index")
        rest = self._take(len(self._buf) - self._off, "page index")
        file_size = self._pos
        if len(rest) < 8 + TRAILER_SIZE + 1:
            raise TruncatedError(f"{self.name}: truncated in page index or trailer")
        try:
            self.index = parse_page_index(rest, file_size, index_start, self.header.page_size)
        except TruncatedError as err:
            raise MalformedIndexError(f"{self.name}: {err}") from None
        except MalformedIndexError as err:
            raise MalformedIndexError(f"{self.name}: {err}") from None
        if page_index_start(rest, file_size) != index_start:
            raise MalformedIndexError(f"{self.name}: page index length disagrees with the frames")
        if [(p, o, s) for p, (o, s) in self.index.items()] != frames:
            raise MalformedIndexError(f"{self.name}: page index does not match the page frames")
        self._crc = crc64(rest[:-8], self._crc)
        post, checksum = struct.unpack(">QQ", rest[-TRAILER_SIZE:])
        self.trailer = Trailer(post, checksum)
        if self.header.flags & HEADER_FLAG_NO_CHECKSUM and post != 0:
            raise ChecksumMismatchError(f"{self.name}: post-apply checksum must be zero")
        if checksum != CHECKSUM_FLAG | self._crc:
            raise ChecksumMismatchError(
                f"{self.name}: file checksum mismatch: stored {checksum:016x}, "
                f"computed {CHECKSUM_FLAG | self._crc:016x}")


@dataclass
class LTXFile:
    header: Header
    pages: dict[int, bytes]
    index: PageIndex
    trailer: Trailer


def decode_file(data: bytes, name: str = "LTX file") -> LTXFile:
    """Decode and verify a whole LTX file held in memory."""
    dec = Decoder(io.BytesIO(data), name)
    pages = dict(dec)
    assert dec.trailer is not None
    return LTXFile(dec.header, pages, dec.index, dec.trailer)


def read_header(f: BinaryIO) -> Header:
    return Header.unpack(f.read(HEADER_SIZE))


# --- streaming encoder -----------------------------------------------------------------------


class Encoder:
    """Writes an LTX file (block encoding, NoChecksum) to a binary stream, one page at a time."""

    def __init__(self, f: BinaryIO, header: Header) -> None:
        if header.flags != HEADER_FLAG_NO_CHECKSUM or header.pre_apply_checksum:
            # Litestream 0.5.x tracks no database checksums; its compactor would reject ours.
            raise InvalidHeaderError("ltxvfs writes NoChecksum files only (flags 0x2, checksum 0)")
        if header.commit == 0:
            raise InvalidHeaderError("commit must be at least 1")
        raw = header.pack()
        self.header = header
        self._f = f
        self._order = PageOrder(header)
        self._entries: list[tuple[int, int, int]] = []
        self._pos = 0
        self._crc = 0
        self._closed = False
        self._write(raw, raw)

    def _write(self, raw: bytes, hashed: bytes) -> None:
        self._f.write(raw)
        self._pos += len(raw)
        self._crc = crc64(hashed, self._crc)

    def write_page(self, pgno: int, data: bytes) -> None:
        if len(data) != self.header.page_size:
            raise PageFrameError(f"page {pgno} is {len(data)} bytes, not {self.header.page_size}")
        self._order.check(pgno)
        frame = encode_page_frame(pgno, data)
        self._entries.append((pgno, self._pos, len(frame)))
        self._f.write(frame)
        self._pos += len(frame)
        self._crc = crc64(data, crc64(frame[:PAGE_HEADER_SIZE + 4], self._crc))

    def close(self) -> Trailer:
        """Write the end marker, index and trailer; returns the trailer."""
        if self._closed:
            raise ValueError("encoder already closed")
        self._order.finish()
        self._write(END_OF_PAGES, END_OF_PAGES)
        index = encode_page_index(self._entries)
        self._write(index, index)
        post = U64.pack(0)
        self._write(post, post)
        checksum = CHECKSUM_FLAG | self._crc
        self._f.write(U64.pack(checksum))
        self._pos += 8
        self._closed = True
        return Trailer(0, checksum)

    @property
    def index(self) -> PageIndex:
        """pgno -> (offset, size) of every frame written so far."""
        return {p: (o, n) for p, o, n in self._entries}

    @property
    def size(self) -> int:
        return self._pos


def encode_file(header: Header, pages: Iterable[tuple[int, bytes]]) -> bytes:
    """A whole LTX file in memory; pages in ascending pgno order."""
    buf = io.BytesIO()
    enc = Encoder(buf, header)
    for pgno, data in pages:
        enc.write_page(pgno, data)
    enc.close()
    return buf.getvalue()
