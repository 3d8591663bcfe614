"""The compact page index: where the newest frame of each page lives, in flat arrays.

Two pieces:

* :class:`FilePages` — one LTX file's page index (pgno -> offset, size). Frames are written one
  after the other, so offsets are running sums of sizes: a file keeps ``n + 1`` frame boundaries
  (4 bytes each below 4 GiB, else 8) and no sizes. A snapshot holds every page in order (except
  SQLite's lock page, which LTX skips), so its page numbers are implicit too: the first page and
  the one skipped. A sparse file (an L0 or L1 file) keeps its page numbers (4 bytes each).
* :class:`StateIndex` — the index of one database state, persistent: an immutable stack of
  layers (the snapshot's :class:`FilePages`, newer files, small dicts for small files), each
  with a cut (pages above it are hidden: the database shrank since the layer was added). A new
  state shares every layer of the old one and adds its own: applying a one-page L0 file costs
  that page, not a copy of the database's index. Small layers merge geometrically (few layers,
  amortised O(log) per page); when overlays hold more than 1/16 of the base's pages, everything
  is compacted into one dense layer (per page: file number, offset, size).

Decoding an index (varints) is bulk: with numpy (optional, the ``large`` extra) for large indexes,
vectorised in chunks of 256 KiB; in pure Python otherwise. Both check exactly what
:func:`ltxvfs.ltx.parse_page_index` checks; on anything odd the numpy path hands over to the pure
one, so a malformed index raises the same error with the same message either way.
"""

from __future__ import annotations

import operator
import re
import sys
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, islice
from typing import Any

from .errors import MalformedIndexError, TruncatedError
from .gcpause import paused_gc
from .ltx.format import (
    HEADER_SIZE,
    PAGE_HEADER_SIZE,
    check_entries,
    index_span,
    uvarints,
)
from .storage.base import FileInfo

#: Where one page's frame lives: (file, offset of the frame, frame size).
PageRef = tuple[FileInfo, int, int]

#: Use numpy (when installed) to decode indexes of at least this many bytes (~50,000 pages): below
#: that, importing it costs more than it saves. Tests switch numpy off with ``numpy_enabled``.
NUMPY_MIN_BYTES = 512 * 1024
numpy_enabled = True
#: Bytes of varints decoded per numpy pass (temporaries stay in the CPU caches).
_CHUNK = 128 * 1024
#: Files with at most this many pages become dict layers (fast lookups, ~170 B per page).
SMALL_FILE = 2048
#: Overlays are compacted into one dense layer beyond max(COMPACT_MIN, base pages // COMPACT_RATIO).
COMPACT_MIN = 4096
COMPACT_RATIO = 16
#: At most this many layers above the base (more are compacted).
MAX_LAYERS = 24

_INF = 1 << 63


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


def _code(maximum: int, small: str = "I") -> str:
    if maximum < 1 << 16 and small == "H":
        return "H"
    return "I" if maximum < 1 << 32 else "Q"


# --- one file's page index -------------------------------------------------------------------


class FilePages(Mapping[int, tuple[int, int]]):
    """pgno -> (offset, size) of one LTX file's frames, in flat arrays (see the module doc).

    ``pgnos`` is None when the pages are a run ``first..`` with at most one page (``skip``)
    missing; ``offs`` holds ``n + 1`` frame boundaries when ``sizes`` is None (frames back to
    back), else ``n`` offsets.
    """

    __slots__ = ("first", "n", "offs", "pgnos", "sizes", "skip")

    def __init__(self, n: int, first: int, skip: int, pgnos: array | None, offs: array,
                 sizes: array | None) -> None:
        self.n, self.first, self.skip, self.pgnos, self.offs, self.sizes = \
            n, first, skip, pgnos, offs, sizes

    # construction

    @classmethod
    def from_columns(cls, pgnos: Sequence[int], offsets: Sequence[int], sizes: Sequence[int]
                     ) -> FilePages:
        """From checked columns (ascending pgnos), in pure Python."""
        n = len(pgnos)
        if not n:
            return cls(0, 1, 0, None, array("I", [0]), None)
        first, last = pgnos[0], pgnos[-1]
        gap = last - first + 1 - n
        pg: array | None = None
        skip = 0
        if gap == 1:  # one page missing in the run (the lock page of a snapshot): find it
            lo, hi = 0, n - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if pgnos[mid] - first - mid >= 1:
                    hi = mid
                else:
                    lo = mid + 1
            skip = first + lo
        elif gap:
            pg = array(_code(last), pgnos)
        contiguous = all(map(operator.eq, map(operator.add, islice(offsets, n - 1), sizes),
                             islice(offsets, 1, None)))
        end = offsets[-1] + sizes[-1]
        if contiguous:
            offs = array(_code(end), offsets)
            offs.append(end)
            return cls(n, first, skip, pg, offs, None)
        return cls(n, first, skip, pg, array(_code(end), offsets), array(_code(max(sizes), "H"), sizes))

    @classmethod
    def from_mapping(cls, pages: Mapping[int, tuple[int, int]]) -> FilePages:
        if isinstance(pages, FilePages):
            return pages
        items = sorted(pages.items())
        return cls.from_columns([p for p, _ in items], [o for _, (o, _) in items],
                                [s for _, (_, s) in items])

    # lookups

    def position(self, pgno: int) -> int:
        """Where ``pgno`` is among this file's entries, or -1."""
        pg = self.pgnos
        if pg is not None:
            i = bisect_left(pg, pgno)
            return i if i < self.n and pg[i] == pgno else -1
        i = pgno - self.first
        if self.skip and pgno >= self.skip:
            if pgno == self.skip:
                return -1
            i -= 1
        return i if 0 <= i < self.n else -1

    def entry(self, i: int) -> tuple[int, int]:
        offs = self.offs
        off = offs[i]
        return (off, offs[i + 1] - off) if self.sizes is None else (off, self.sizes[i])

    def pgno_at(self, i: int) -> int:
        if self.pgnos is not None:
            return self.pgnos[i]
        p = self.first + i
        return p + 1 if self.skip and p >= self.skip else p

    def get(self, pgno: int, default: Any = None) -> Any:
        i = self.position(pgno)
        return default if i < 0 else self.entry(i)

    def __getitem__(self, pgno: int) -> tuple[int, int]:
        i = self.position(pgno)
        if i < 0:
            raise KeyError(pgno)
        return self.entry(i)

    def __contains__(self, pgno: object) -> bool:
        return isinstance(pgno, int) and self.position(pgno) >= 0

    def __len__(self) -> int:
        return self.n

    def count_upto(self, cut: int) -> int:
        """How many of the pages are <= ``cut``."""
        if self.pgnos is not None:
            return bisect_right(self.pgnos, cut)
        if cut < self.first:
            return 0
        k = cut - self.first + 1
        if self.skip and cut >= self.skip:
            k -= 1
        return min(k, self.n)

    def __iter__(self) -> Iterator[int]:
        if self.pgnos is not None:
            return iter(self.pgnos)
        first, skip, n = self.first, self.skip, self.n
        if not skip or skip >= first + n:
            return iter(range(first, first + n))
        return chain(range(first, skip), range(skip + 1, first + n + 1))

    def items(self, cut: int = _INF) -> Iterator[tuple[int, tuple[int, int]]]:  # type: ignore[override]
        k = self.count_upto(cut)  # (iterators, not slices: a caller may stop early)
        offs = self.offs
        sizes = self.sizes if self.sizes is not None else \
            map(operator.sub, islice(offs, 1, k + 1), offs)
        return zip(islice(iter(self), k), zip(offs, sizes, strict=False), strict=False)

    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.pgnos, self.offs, self.sizes)
                   if a is not None)

    def __repr__(self) -> str:
        return f"FilePages({self.n} pages)"


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


# --- layers of a state's index ---------------------------------------------------------------


class _FileLayer:
    """All pages of one file (a large one: a snapshot, a compacted file)."""

    __slots__ = ("info", "pages")

    def __init__(self, info: FileInfo, pages: FilePages) -> None:
        self.info, self.pages = info, pages

    def ref(self, pgno: int) -> PageRef | None:
        pages = self.pages
        if pages.pgnos is None:  # (FilePages.position, inlined: the read path's lookup)
            i = pgno - pages.first
            if pages.skip and pgno >= pages.skip:
                if pgno == pages.skip:
                    return None
                i -= 1
            if not 0 <= i < pages.n:
                return None
        else:
            i = pages.position(pgno)
            if i < 0:
                return None
        offs = pages.offs
        off = offs[i]
        return (self.info, off, offs[i + 1] - off if pages.sizes is None else pages.sizes[i])

    def __len__(self) -> int:
        return self.pages.n

    def keys(self) -> Iterator[int]:
        return iter(self.pages)

    def count(self, cut: int) -> int:
        return self.pages.count_upto(cut)

    def items(self, cut: int) -> Iterator[tuple[int, PageRef]]:
        info = self.info
        for p, (o, s) in self.pages.items(cut):
            yield p, (info, o, s)

    def infos(self) -> list[FileInfo]:
        return [self.info]

    def max_pgno(self) -> int:
        return self.pages.pgno_at(self.pages.n - 1) if self.pages.n else 0

    def nbytes(self) -> int:
        return self.pages.nbytes()


class _DictLayer:
    """Pages of small files (or merged small layers, or relocations): pgno -> PageRef."""

    __slots__ = ("refs",)

    def __init__(self, refs: dict[int, PageRef]) -> None:
        self.refs = refs

    def ref(self, pgno: int) -> PageRef | None:
        return self.refs.get(pgno)

    def __len__(self) -> int:
        return len(self.refs)

    def keys(self) -> Iterator[int]:
        return iter(self.refs)

    def count(self, cut: int) -> int:
        return sum(1 for p in self.refs if p <= cut)

    def items(self, cut: int) -> Iterator[tuple[int, PageRef]]:
        refs = self.refs
        return ((p, refs[p]) for p in sorted(refs) if p <= cut)

    def infos(self) -> list[FileInfo]:
        return list({id(r[0]): r[0] for r in self.refs.values()}.values())

    def max_pgno(self) -> int:
        return max(self.refs, default=0)

    def nbytes(self) -> int:
        return sys.getsizeof(self.refs) + 72 * len(self.refs)  # a tuple (64 B) + ints, roughly


class _DenseLayer:
    """A compacted index: per page (slot = pgno) a file number (0: none), an offset, a size."""

    __slots__ = ("fid", "files", "n", "offs", "sizes")

    def __init__(self, files: list[Any], fid: array, offs: array, sizes: array) -> None:
        self.files, self.fid, self.offs, self.sizes = files, fid, offs, sizes
        self.n = len(fid) - fid.count(0)

    def ref(self, pgno: int) -> PageRef | None:
        if not 0 < pgno < len(self.fid):
            return None
        f = self.fid[pgno]
        return (self.files[f], self.offs[pgno], self.sizes[pgno]) if f else None

    def __len__(self) -> int:
        return self.n

    def keys(self) -> Iterator[int]:
        return (p for p, f in enumerate(self.fid) if f)

    def count(self, cut: int) -> int:
        if cut >= len(self.fid) - 1:
            return self.n
        return cut - self.fid[1:cut + 1].count(0)

    def items(self, cut: int) -> Iterator[tuple[int, PageRef]]:
        files = self.files
        hi = min(cut, len(self.fid) - 1) + 1
        for p, f, o, s in zip(range(1, hi), self.fid[1:hi], self.offs[1:hi], self.sizes[1:hi],
                              strict=True):
            if f:
                yield p, (files[f], o, s)

    def infos(self) -> list[FileInfo]:
        return self.files[1:]

    def max_pgno(self) -> int:
        return len(self.fid) - 1

    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.fid, self.offs, self.sizes))


_Layer = _FileLayer | _DictLayer | _DenseLayer


def _layer_for(info: FileInfo, pages: FilePages) -> _Layer:
    if len(pages) <= SMALL_FILE:
        return _DictLayer({p: (info, o, s) for p, (o, s) in pages.items()})
    return _FileLayer(info, pages)


# --- the state's index -----------------------------------------------------------------------


class StateIndex(Mapping[int, PageRef]):
    """pgno -> PageRef of one database state: an immutable stack of shared layers.

    ``layers`` runs oldest to newest as (layer, cut): a layer answers for its pages up to its
    cut. A page's ref is the newest layer's that has it.
    """

    __slots__ = ("_len", "_rev", "layers", "max_txid")

    def __init__(self, layers: tuple[tuple[_Layer, int], ...] = (), max_txid: int = 0) -> None:
        self.layers = layers
        self._rev = layers[::-1]
        self.max_txid = max_txid
        self._len: int | None = None

    @classmethod
    def from_refs(cls, refs: Mapping[int, PageRef]) -> StateIndex:
        if isinstance(refs, StateIndex):
            return refs
        if not refs:
            return cls()
        return cls(((_DictLayer(dict(refs)), _INF),),
                   max(r[0].max_txid for r in refs.values()))

    # lookups

    def get(self, pgno: int, default: Any = None) -> Any:
        for layer, cut in self._rev:
            if pgno <= cut:
                r = layer.ref(pgno)
                if r is not None:
                    return r
        return default

    def __getitem__(self, pgno: int) -> PageRef:
        r = self.get(pgno) if isinstance(pgno, int) and pgno > 0 else None
        if r is None:
            raise KeyError(pgno)
        return r

    def __contains__(self, pgno: object) -> bool:
        return isinstance(pgno, int) and pgno > 0 and self.get(pgno) is not None

    def _overlay(self) -> dict[int, PageRef]:
        """What the layers above the base say, newest first wins (cuts applied)."""
        out: dict[int, PageRef] = {}
        for layer, cut in self.layers[1:]:
            if isinstance(layer, _DictLayer):
                out.update((p, r) for p, r in layer.refs.items() if p <= cut)
            else:
                out.update(layer.items(cut))
        return out

    def __len__(self) -> int:
        if self._len is None:
            if not self.layers:
                self._len = 0
            else:
                base, cut = self.layers[0]
                over = self._overlay()
                self._len = base.count(cut) + sum(
                    1 for p in over if p > cut or base.ref(p) is None)
        return self._len

    def items(self) -> Iterator[tuple[int, PageRef]]:  # type: ignore[override]
        """(pgno, ref) in ascending pgno order."""
        if not self.layers:
            return
        base, cut = self.layers[0]
        over = self._overlay()
        if not over:
            yield from base.items(cut)
            return
        keys = iter(sorted(over))
        nk = next(keys, None)
        for p, r in base.items(cut):
            while nk is not None and nk < p:
                yield nk, over[nk]
                nk = next(keys, None)
            if nk == p:
                yield p, over[p]
                nk = next(keys, None)
            else:
                yield p, r
        while nk is not None:
            yield nk, over[nk]
            nk = next(keys, None)

    def __iter__(self) -> Iterator[int]:
        return (p for p, _ in self.items())

    def values(self) -> Iterator[PageRef]:  # type: ignore[override]
        return (r for _, r in self.items())

    def nbytes(self) -> int:
        """Bytes held by the layers (shared ones counted in full)."""
        return sum(layer.nbytes() for layer, _ in self.layers)

    def __repr__(self) -> str:
        return f"StateIndex({len(self.layers)} layers)"

    # updates

    def applying(self, files: Sequence[tuple[FileInfo, FilePages]], commit: int) -> StateIndex:
        """A new index with ``files`` applied: per page the newest TXID wins (an older file's
        page never replaces a newer one), pages beyond ``commit`` are dropped. Shares every
        layer of this one; costs O(pages of ``files``) (amortised, with merging)."""
        layers = list(self.layers)
        top = self.max_txid
        with paused_gc():
            for info, pages in files:
                if not len(pages):
                    continue
                t = info.max_txid
                if t >= top:
                    layer = _layer_for(info, pages)
                else:  # an older file (a compacted one after newer L0 files): page by page
                    cur = StateIndex(tuple(layers))
                    layer = _DictLayer({p: (info, o, s) for p, (o, s) in pages.items()
                                        if (r := cur.get(p)) is None or r[0].max_txid <= t})
                layers.append((layer, _INF))
                top = max(top, t)
            return _normalized([(la, min(c, commit)) for la, c in layers if min(c, commit) > 0],
                               top)

    def with_refs(self, refs: Mapping[int, PageRef]) -> StateIndex:
        """These pages pointed elsewhere (the same page versions in other files), whatever
        their TXIDs."""
        if not refs:
            return self
        top = max([self.max_txid, *(r[0].max_txid for r in refs.values())])
        return _normalized([*self.layers, (_DictLayer(dict(refs)), _INF)], top)

    def changed(self, old: StateIndex) -> set[int] | None:
        """Pages whose ref may differ between ``old`` and this index (a superset), from the
        layers they do not share: O(pages changed). None when they share no base (compacted
        or rebuilt since): compare page by page."""
        if not self.layers or not old.layers or self.layers[0][0] is not old.layers[0][0]:
            return None
        mine = {(id(la), c) for la, c in self.layers}
        theirs = {(id(la), c) for la, c in old.layers}
        out: set[int] = set()
        for layers, other in ((self.layers, theirs), (old.layers, mine)):
            for la, c in layers[1:]:
                if (id(la), c) not in other:
                    out.update(la.keys())
        a, b = self.layers[0][1], old.layers[0][1]
        if a != b:
            out.update(range(min(a, b) + 1, min(max(a, b), self.layers[0][0].max_pgno()) + 1))
        return out


def _normalized(layers: list[tuple[_Layer, int]], top: int) -> StateIndex:
    """Merge small top layers (geometric sizes: few layers); compact all into one dense layer
    when the overlays grow past a fraction of the base."""
    while len(layers) >= 3:
        (a, ca), (b, cb) = layers[-2], layers[-1]
        if not (isinstance(a, _DictLayer) and isinstance(b, _DictLayer) and 2 * len(b) >= len(a)):
            break
        merged = {p: r for p, r in a.refs.items() if p <= ca}
        merged.update((p, r) for p, r in b.refs.items() if p <= cb)
        layers[-2:] = [(_DictLayer(merged), cb)]
    if len(layers) > 1:
        over = sum(len(la) for la, _ in layers[1:])
        if over > max(COMPACT_MIN, len(layers[0][0]) // COMPACT_RATIO) or len(layers) > MAX_LAYERS:
            layers = [(_compact(layers), max(c for _, c in layers))]
    return StateIndex(tuple(layers), top)


def _compact(layers: list[tuple[_Layer, int]]) -> _DenseLayer:
    """Every layer written into one dense layer (oldest first, so newer pages overwrite); files
    no page points to any more are dropped."""
    size = min(max(la.max_pgno() for la, _ in layers), max(c for _, c in layers)) + 1
    files: list[Any] = [None]
    number: dict[int, int] = {}
    for la, _ in layers:
        for info in la.infos():
            if id(info) not in number:
                number[id(info)] = len(files)
                files.append(info)
    max_off = max(f.size for f in files[1:])  # offsets and sizes lie inside their file
    fid = _zeros("B" if len(files) < 256 else _code(len(files), "H"), size)
    offs = _zeros(_code(max_off), size)
    sizes = _zeros(_code(max_off, "H") if max_off < 1 << 16 else "I", size)
    np = _numpy(size * 4)
    for i, (la, cut) in enumerate(layers):
        lim = min(cut, size - 1)
        if isinstance(la, _FileLayer) and la.pages.pgnos is None and np is not None:
            _fill_dense_np(np, la, lim, number[id(la.info)], fid, offs, sizes)
        elif isinstance(la, _DenseLayer) and i == 0:  # (it numbered its files first: same numbers)
            hi = min(lim, len(la.fid) - 1) + 1
            for dst, src in ((fid, la.fid), (offs, la.offs), (sizes, la.sizes)):
                dst[1:hi] = src[1:hi] if src.typecode == dst.typecode else array(dst.typecode,
                                                                                  src[1:hi])
        else:
            for p, (info, o, s) in la.items(lim):
                fid[p] = number[id(info)]
                offs[p] = o
                sizes[p] = s
    used = set(np.unique(np.frombuffer(memoryview(fid), fid.typecode)).tolist()) \
        if np is not None else set(fid)
    if len(used | {0}) < len(files):  # renumber the files still in use
        keep = sorted(used | {0})
        renumber = [0] * len(files)
        for new, old in enumerate(keep):
            renumber[old] = new
        files = [files[k] for k in keep]
        code = "B" if len(files) < 256 else _code(len(files), "H")
        if np is not None:
            fid = _to_array(np, np.asarray(renumber)[np.frombuffer(memoryview(fid), fid.typecode)],
                            code)
        else:
            fid = array(code, map(renumber.__getitem__, fid))
    return _DenseLayer(files, fid, offs, sizes)


def _zeros(code: str, n: int) -> array:
    return array(code, bytes(n * array(code).itemsize))


def _fill_dense_np(np: Any, la: _FileLayer, lim: int, f: int, fid: array, offs: array,
                   sizes: array) -> None:
    pages = la.pages
    k = pages.count_upto(lim)
    if not k:
        return
    o = np.frombuffer(memoryview(pages.offs), pages.offs.typecode)
    off = o[:k]
    sz = (o[1:k + 1] - o[:k]) if pages.sizes is None else \
        np.frombuffer(memoryview(pages.sizes), pages.sizes.typecode)[:k]
    slots = np.arange(pages.first, pages.first + k, dtype=np.int64)
    if pages.skip:
        slots[slots >= pages.skip] += 1
    vf = np.frombuffer(memoryview(fid), fid.typecode)
    vo = np.frombuffer(memoryview(offs), offs.typecode)
    vs = np.frombuffer(memoryview(sizes), sizes.typecode)
    vf[slots] = f
    vo[slots] = off
    vs[slots] = sz
