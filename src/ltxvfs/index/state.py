"""A state's page index (:class:`StateIndex`): immutable layers shared between states; see the
package doc."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..gcpause import paused_gc
from ..storage.base import FileInfo
from . import decode
from .files import _INF, FilePages, _code

#: Where one page's frame lives: (file, offset of the frame, frame size).
PageRef = tuple[FileInfo, int, int]

#: Files with at most this many pages become dict layers (fast lookups, ~170 B per page).
SMALL_FILE = 2048
#: Overlays are compacted into one dense layer beyond max(COMPACT_MIN, base pages // COMPACT_RATIO).
COMPACT_MIN = 4096
COMPACT_RATIO = 16
#: At most this many layers above the base (more are compacted).
MAX_LAYERS = 24


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
    np = decode._numpy(size * 4)
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
            fid = decode._to_array(np, np.asarray(renumber)[np.frombuffer(memoryview(fid), fid.typecode)],
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
