"""One LTX file's page index in flat arrays (:class:`FilePages`); see the package doc."""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, islice
from typing import Any

_INF = 1 << 63


def _code(maximum: int, small: str = "I") -> str:
    if maximum < 1 << 16 and small == "H":
        return "H"
    return "I" if maximum < 1 << 32 else "Q"



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
