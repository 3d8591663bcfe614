"""EXPERIMENT (bench only, not a change to ltxvfs): a readahead policy for PageStore._run.

Applied with ``python bench/run.py --ltxvfs-patch bench/experiments/readahead_streams.py`` to measure
what a fix in ``src/ltxvfs/pages.py`` would buy. Two changes against ltxvfs's policy:

1. Sequential detection per *stream*: the windows of the last 8 runs are remembered by the page
   number where each ended; a miss at most ``SLACK`` pages after one of them continues that stream
   (window doubles). ltxvfs keeps one ``_last_miss``: the interior b-tree page that SQLite reads
   between two leaf runs resets the window to 1 page, and the ramp 1, 2, 4, ... 256 costs about
   nine round trips every time.
2. (optional, ``BENCH_RA_INITIAL``) a first miss reads more than one page.
3. A run goes on across pages whose newest version lives in another file or is already cached
   (their superseded frames are read and dropped, up to ``MAX_GAP`` bytes each): one updated page
   no longer ends a 1 MB read.

Patches the class in place; the rest of the fetcher (in-flight futures, decode, cache) is
ltxvfs's own.
"""

from __future__ import annotations

import os

import ltxvfs.pages as pages

#: Window of a miss that continues no stream (ltxvfs: 1 page). BENCH_RA_INITIAL=8 tries 8.
INITIAL = int(os.environ.get("BENCH_RA_INITIAL", "1"))
SLACK = 8  # pages a stream may skip (cache hits, pages of other files)
STREAMS = 8
MAX_GAP = 64 * 1024


def _run(self, state, pgno, ref):
    streams = self.__dict__.setdefault("_bench_streams", {})
    window = INITIAL
    for last in list(streams):
        if last < pgno <= last + 1 + SLACK:
            window = min(streams.pop(last) * 2, self.MAX_READAHEAD_PAGES)
            break
    run = [(pgno, ref)]
    budget = min(window, self.MAX_READAHEAD_BYTES // state.page_size)
    info, end = ref[0], ref[1] + ref[2]
    nxt = pgno + 1
    misses = 0
    while len(run) < budget and misses <= SLACK:
        r = state.index.get(nxt)
        if r is None:
            break
        if r[0] is not info or pages._key(r) in self._inflight or pages._key(r) in self.cache:
            misses += 1  # skip it; its frame in `info` (if any) is read and dropped
            nxt += 1
            continue
        if r[1] < end or r[1] - end > MAX_GAP:
            break
        run.append((nxt, r))
        end = r[1] + r[2]
        nxt += 1
        misses = 0
    streams[run[-1][0]] = window
    while len(streams) > STREAMS:
        streams.pop(next(iter(streams)))
    self._last_miss = run[-1][0]
    return run


pages.PageStore._run = _run
