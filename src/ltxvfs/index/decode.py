"""Decoding an LTX page index (varints) into :class:`FilePages`: numpy in chunks when it pays,
pure Python otherwise, with the codec's checks and error messages; see the package doc."""

from __future__ import annotations

import operator
import re
import sys
import threading
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import MalformedIndexError, TruncatedError
from ..gcpause import paused_gc
from ..ltx.format import HEADER_SIZE, PAGE_HEADER_SIZE, check_entries, index_span, uvarints
from .files import FilePages

#: Use numpy (when installed) to decode indexes of at least this many bytes (~50,000 pages): below
#: that, importing it costs more than it saves. Tests switch numpy off with ``numpy_enabled``.
NUMPY_MIN_BYTES = 512 * 1024
numpy_enabled = True
#: Bytes of varints decoded per numpy pass (temporaries stay in the CPU caches).
_CHUNK = 128 * 1024

#: A plan whose first file (its snapshot) is at least this large starts importing numpy in the
#: background at once (~50-200 ms): its index is likely large, and the import overlaps its GETs.
NUMPY_PREFETCH_FILE = 64 * 1024 * 1024
_prefetched = False


def prefetch_numpy() -> None:
    """Start importing numpy in a background thread (if enabled and not imported yet)."""
    global _prefetched
    if numpy_enabled and not _prefetched and "numpy" not in sys.modules:
        _prefetched = True
        threading.Thread(target=_import_numpy, name="ltxvfs-numpy", daemon=True).start()


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _numpy(nbytes: int) -> Any:
    """numpy if it is enabled, installed, and pays for itself at this size; else None. (While
    a background import runs, ``import`` waits for it.)"""
    if not numpy_enabled:
        return None
    if "numpy" in sys.modules or _prefetched:
        return _import_numpy() if nbytes >= 16 * 1024 else None
    return _import_numpy() if nbytes >= NUMPY_MIN_BYTES else None



def parse_file_pages(data: bytes | memoryview | Sequence[bytes | memoryview], file_size: int,
                     data_offset: int | None = None, page_size: int | None = None) -> FilePages:
    """A file's page index from ``data``: the bytes ``[data_offset, file_size)`` of the file, as
    one buffer or as consecutive pieces (parallel ranged GETs). Raises exactly as
    :func:`ltxvfs.ltx.parse_page_index` does."""
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    if len(pieces) > 1 and len(pieces[-1]) < 24:
        pieces = [b"".join(pieces)]
    total = sum(len(p) for p in pieces)
    if data_offset is None:
        data_offset = file_size - total
    if data_offset + total != file_size:
        raise TruncatedError("page index data does not reach the end of the file")
    start, stop, frames_end, max_frame = _span(pieces, file_size, data_offset, page_size)
    bufs = _cut(pieces, start - data_offset, stop - data_offset)
    np = _numpy(stop - start)
    if np is not None:
        pages = _decode_numpy(np, bufs, frames_end, max_frame)
        if pages is not None:
            return pages
    with paused_gc():
        if stop - start > _PURE_CHUNK:
            pages = _decode_pure(bufs, frames_end, max_frame)
            if pages is not None:
                return pages
        joined = bufs[0] if len(bufs) == 1 else b"".join(bufs)
        return FilePages.from_columns(*check_entries(uvarints(bytes(joined)), frames_end, max_frame))


#: Bytes of varints decoded per pass in pure Python (a list of ints costs ~36 B per value).
_PURE_CHUNK = 1024 * 1024
_LAST_VARINT = re.compile(rb"[\x00-\x7f][\x80-\xff]*\Z")


def _decode_pure(bufs: list[bytes | memoryview], frames_end: int, max_frame: int
                 ) -> FilePages | None:
    """A large index decoded in pure Python chunk by chunk (memory: the columns, not a list of
    every varint), or None when anything is unusual (the whole-index path raises the error)."""
    pg, off, sz = array("Q"), array("Q"), array("Q")
    carry: list[int] = []
    rest = b""
    try:
        for buf in bufs:
            mv = memoryview(buf)
            for lo in range(0, len(mv), _PURE_CHUNK):
                chunk = rest + bytes(mv[lo:lo + _PURE_CHUNK])
                m = _LAST_VARINT.search(chunk)
                if m is None:
                    rest = chunk
                    if len(rest) > 16:
                        return None
                    continue
                cut = m.start() + 1
                values = carry + uvarints(chunk[:cut])
                rest = chunk[cut:]
                k = len(values) // 3 * 3
                carry = values[k:]
                p, o, z = values[0:k:3], values[1:k:3], values[2:k:3]
                if p and (p[0] <= (pg[-1] if pg else 0) or not all(map(operator.lt, p, p[1:]))
                          or min(o) < HEADER_SIZE or min(z) <= PAGE_HEADER_SIZE
                          or max(z) > max_frame or max(map(operator.add, o, z)) > frames_end):
                    return None
                pg.extend(p)
                off.extend(o)
                sz.extend(z)
    except (MalformedIndexError, OverflowError):
        return None
    if rest or carry != [0]:
        return None
    return FilePages.from_columns(pg, off, sz)


def _span(pieces: list[bytes | memoryview], file_size: int, data_offset: int,
          page_size: int | None) -> tuple[int, int, int, int]:
    """:func:`index_span` over pieces: the last one gives the index length."""
    last = file_size - len(pieces[-1])
    try:
        return index_span(pieces[-1], file_size, last, page_size)
    except TruncatedError:
        if last == data_offset:
            raise
        return index_span(pieces[-1], file_size, data_offset, page_size)


def _cut(pieces: list[bytes | memoryview], start: int, stop: int) -> list[memoryview]:
    """Views of the bytes [start, stop) of the concatenation of ``pieces``."""
    out, pos = [], 0
    for p in pieces:
        lo, hi = max(start - pos, 0), min(stop - pos, len(p))
        if lo < hi:
            out.append(memoryview(p)[lo:hi])
        pos += len(p)
    return out


# --- numpy decoding --------------------------------------------------------------------------


def _decode_numpy(np: Any, bufs: list[bytes | memoryview], frames_end: int, max_frame: int
                  ) -> FilePages | None:
    """The index decoded in chunks with numpy, or None when anything is unusual (the pure path
    then decides, and raises the exact error). A run of pages with frames back to back (a
    snapshot) keeps only the frame boundaries as it goes; anything else is decoded again keeping
    every column."""
    pages = _numpy_pass(np, bufs, frames_end, max_frame, run=True)
    if pages is _NOT_A_RUN:
        pages = _numpy_pass(np, bufs, frames_end, max_frame, run=False)
    assert pages is not _NOT_A_RUN
    return pages  # type: ignore[return-value]


_NOT_A_RUN: Any = object()


def _chunks(np: Any, bufs: list[bytes | memoryview]) -> Iterator[Any]:
    """The varints of ``bufs`` as uint64 arrays of whole (pgno, offset, size) triples, then the
    rest (the terminator); None when a varint is too long for the vectorised decoder."""
    u64 = np.uint64
    carry = np.zeros(0, u64)
    rest = b""
    for buf in bufs:
        mv = memoryview(buf)
        for lo in range(0, len(mv), _CHUNK):
            chunk = bytes(rest) + bytes(mv[lo:lo + _CHUNK]) if rest else mv[lo:lo + _CHUNK]
            a = np.frombuffer(chunk, np.uint8)
            ends = np.flatnonzero(a < 0x80)
            if not len(ends):
                rest = chunk
                if len(rest) > 16:
                    yield None
                    return
                continue
            cut = int(ends[-1]) + 1
            values = _varints(np, a[:cut], ends)
            if values is None:
                yield None
                return
            rest = bytes(chunk[cut:]) if cut < len(chunk) else b""
            if len(carry):
                values = np.concatenate((carry, values))
            k = len(values) // 3 * 3
            carry = values[k:]
            if k:
                yield values[:k].reshape(-1, 3)
    yield None if rest else carry


def _numpy_pass(np: Any, bufs: list[bytes | memoryview], frames_end: int, max_frame: int,
                run: bool) -> Any:
    off_code = "I" if frames_end < 1 << 32 else "Q"
    off_t = np.dtype(off_code)
    offs, pgnos, sizes = array(off_code), array("I"), array("I")
    n = first = skip = last_pg = 0
    end = -1  # where the previous frame ended
    for tri in _chunks(np, bufs):
        if tri is None or tri.ndim == 1:  # the end: exactly one value left, the terminator 0
            if tri is None or len(tri) != 1 or int(tri[0]) != 0:
                return None
            break
        pg, off, sz = tri[:, 0], tri[:, 1], tri[:, 2]
        stop = off + sz
        if (int(pg[0]) < 1 or (n and int(pg[0]) <= last_pg) or not bool((pg[1:] > pg[:-1]).all())
                or int(pg[-1]) >= 1 << 32 or int(off.min()) < HEADER_SIZE
                or int(sz.min()) <= PAGE_HEADER_SIZE or int(sz.max()) > max_frame
                or int(stop.max()) > frames_end):
            return None
        if run:
            if (n and int(off[0]) != end) or not bool((off[1:] == stop[:-1]).all()):
                return _NOT_A_RUN
            if not n:
                first = int(pg[0])
            dd = np.diff(pg, prepend=np.uint64(last_pg if n else first - 1))
            gaps = np.flatnonzero(dd != 1)
            if len(gaps):
                if skip or len(gaps) > 1 or int(dd[gaps[0]]) != 2:
                    return _NOT_A_RUN
                skip = int(pg[gaps[0]]) - 1
        else:
            pgnos.frombytes(pg.astype(np.uint32).tobytes())
            sizes.frombytes(sz.astype(np.uint32).tobytes())
        offs.frombytes(off.astype(off_t).tobytes())
        n += len(pg)
        last_pg, end = int(pg[-1]), int(stop[-1])
    if not n:
        return FilePages(0, 1, 0, None, array("I", [0]), None)
    if run:
        offs.append(end)
        return FilePages(n, first, skip, None, offs, None)
    vp = np.frombuffer(memoryview(pgnos), np.uint32)
    vo = np.frombuffer(memoryview(offs), off_t)
    vs = np.frombuffer(memoryview(sizes), np.uint32)
    first = int(vp[0])
    gap = int(vp[-1]) - first + 1 - n
    keep: array | None = pgnos
    if gap == 1:
        skip = first + int(np.argmax(vp[1:] - vp[:-1] == 2)) + 1
        keep = None
    elif gap == 0:
        keep = None
    contiguous = bool((vo[1:] == (vo[:-1] + vs[:-1])).all())
    del vp, vo, vs
    if contiguous:
        offs.append(end)
        return FilePages(n, first, skip, keep, offs, None)
    return FilePages(n, first, skip, keep, offs, sizes)


def _to_array(np: Any, a: Any, code: str) -> array:
    out = array(code)
    out.frombytes(a.astype(np.dtype(code)).tobytes())
    return out


def _varints(np: Any, a: Any, ends: Any) -> Any:
    """The varints of ``a`` (which ends with a complete one); ``ends`` = positions of their last
    bytes. Each is read as 8 little-endian bytes from its start and its 7-bit groups packed: at
    most 7 bytes (49 bits) per varint, else None."""
    u64 = np.uint64
    n = len(ends)
    starts = np.empty(n, np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts
    longest = int(lens.max())
    if longest > 6:
        return None
    pad = np.zeros(len(a) + 8, np.uint8)
    pad[:len(a)] = a
    w = np.ndarray((len(a),), "<u8", buffer=pad, strides=(1,))[starts]
    w &= (u64(1) << (u64(8) * (lens.astype(u64) + u64(1)))) - u64(1)
    r = w & u64(0x7F)
    for k in range(1, longest + 1):
        r |= (w >> u64(k)) & u64(0x7F << (7 * k))
    return r
