"""The page cache and its policy: what stays when the budget (``cache_size``) is full.

Keys name an immutable frame (file identity + offset), so entries never go stale: a newer version
of a page lives at another key and old ones age out. A value is the decoded page, or — when the
page compresses to at most 3/4 of its size — its LZ4 block, decoded again on each hit by the page
store (~1 µs): the byte budget then holds up to ~2x the pages of typical application data
(measured: docs/benchmarks.md, "Decoded or compressed"). The cache only counts bytes.

SQLite's own page cache sits above this one, so what reaches us is SQLite's misses. Three
segments share the byte budget:

* **interior** — interior b-tree pages (page type 0x02 or 0x05; < 2 % of a database, on every
  lookup's path). LRU, up to :data:`INTERIOR_SHARE` of the budget before they compete.
* **main** — pages a reader asked for by a random miss (a point lookup, the start of a range).
  LRU: for random access nothing does reliably better.
* **scan** — pages fetched by a sequential stream (a table or index scan, and its readahead) and
  pages seeded from files that arrived whole. FIFO, a probationary segment: a page read again
  there (a second reference) is promoted to main. While the scan segment holds more than
  :data:`SCAN_SHARE` of the budget it is evicted first, so a full scan of a database larger than
  the cache passes through without evicting the hot set — the idea of PostgreSQL's ring buffer for
  sequential scans and of 2Q's probationary queue (Johnson & Shasha, VLDB 1994).

Eviction happens only when the total exceeds the budget, so until then every segment may use the
free room (a repeated pass over a working set that fits never misses).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: Share of the budget the scan segment keeps before main pages are evicted for it.
SCAN_SHARE = 0.25
#: Share of the budget interior pages may take before they compete with the rest.
INTERIOR_SHARE = 0.125

SCAN, MAIN, INTERIOR = 0, 1, 2
_INTERIOR_TYPES = (0x02, 0x05)
_SQLITE_HEADER = b"SQLite format 3\x00"


def is_interior(page: bytes) -> bool:
    """An interior b-tree page (page 1's b-tree header starts after the 100-byte file header)."""
    if not page:
        return False
    if page[:16] == _SQLITE_HEADER:
        return len(page) > 100 and page[100] in _INTERIOR_TYPES
    return page[0] in _INTERIOR_TYPES


class PageCache:
    """Decoded pages keyed by frame location, bounded in bytes. Thread-safe."""

    def __init__(self, capacity_bytes: int, scan_share: float = SCAN_SHARE,
                 interior_share: float = INTERIOR_SHARE) -> None:
        self.capacity = max(capacity_bytes, 1)
        self._scan_budget = self.capacity * scan_share
        self._interior_budget = self.capacity * interior_share
        # Per segment: key -> page, in eviction order (oldest first).
        self._segs: tuple[OrderedDict[tuple, bytes], ...] = (OrderedDict(), OrderedDict(),
                                                              OrderedDict())
        self._seg_bytes = [0, 0, 0]
        self._where: dict[tuple, int] = {}
        self._referenced: set[tuple] = set()  # scan pages read once since they came in
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.promotions = self.evictions = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            seg = self._where.get(key)
            if seg is None:
                self.misses += 1
                return None
            self.hits += 1
            pages = self._segs[seg]
            if seg != SCAN:
                pages.move_to_end(key)
                return pages[key]
            if key not in self._referenced:
                self._referenced.add(key)  # the scan itself reading its readahead: stays
                return pages[key]
            page = pages.pop(key)  # a second reference: worth keeping
            self._referenced.discard(key)
            self._seg_bytes[SCAN] -= len(page)
            self._insert(key, page, MAIN)
            self.promotions += 1
            return page

    def peek(self, key: tuple) -> bytes | None:
        """The page if cached, without counting a hit or miss or changing its place: for
        background work (hydration) that must not skew what readers' statistics and order say."""
        with self._lock:
            seg = self._where.get(key)
            return None if seg is None else self._segs[seg][key]

    def put(self, key: tuple, page: bytes, sequential: bool = False,
            interior: bool | None = None) -> None:
        """Add a page (or its compressed form: then say whether it is ``interior``) fetched by a
        random miss (``sequential=False``) or by a sequential stream or readahead (``True``: the
        scan segment). Interior pages always go to their segment."""
        if interior is None:
            interior = is_interior(page)
        seg = INTERIOR if interior else SCAN if sequential else MAIN
        with self._lock:
            old = self._where.get(key)
            if old is not None:
                if old >= seg:
                    return  # already there, as valuable or more
                self._remove(key, old)
            self._insert(key, page, seg)
            self._evict()

    def _insert(self, key: tuple, page: bytes, seg: int) -> None:
        self._segs[seg][key] = page
        self._where[key] = seg
        self._seg_bytes[seg] += len(page)
        self._bytes += len(page)
        if seg != SCAN:
            self._evict()

    def _remove(self, key: tuple, seg: int) -> None:
        page = self._segs[seg].pop(key)
        del self._where[key]
        self._referenced.discard(key)
        self._seg_bytes[seg] -= len(page)
        self._bytes -= len(page)

    def _evict(self) -> None:
        segs, sizes = self._segs, self._seg_bytes
        while self._bytes > self.capacity and len(self._where) > 1:
            if sizes[INTERIOR] > self._interior_budget and segs[INTERIOR]:
                seg = INTERIOR
            elif segs[SCAN] and (sizes[SCAN] > self._scan_budget or not segs[MAIN]):
                seg = SCAN
            elif segs[MAIN]:
                seg = MAIN
            elif segs[SCAN]:
                seg = SCAN
            else:
                seg = INTERIOR
            key = next(iter(segs[seg]))
            self._remove(key, seg)
            self.evictions += 1

    def clear(self) -> None:
        """Drop every entry (the replica's history was replaced)."""
        with self._lock:
            for seg in self._segs:
                seg.clear()
            self._seg_bytes = [0, 0, 0]
            self._where.clear()
            self._referenced.clear()
            self._bytes = 0

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def bytes(self) -> int:
        return self._bytes

    def segment_bytes(self) -> dict[str, int]:
        """Bytes per segment (``litestream_stats``)."""
        with self._lock:
            return {"scan": self._seg_bytes[SCAN], "main": self._seg_bytes[MAIN],
                    "interior": self._seg_bytes[INTERIOR]}
