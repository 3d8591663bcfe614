"""Background jobs (polls, syncs, compaction) for every open database, on one scheduler thread
and a small shared pool, so 100 open databases do not mean 100 threads.

A job runs every ``interval`` seconds; a run that is still going when the next one is due is
skipped, never queued, so slow storage cannot pile up work.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("ltxvfs.jobs")

#: Threads shared by every open database for parallel fetches (index tails, prefetches).
POOL_THREADS = 8
#: Threads shared by every open database for background jobs (polls, syncs, compaction).
JOB_THREADS = 4


class Scheduler:
    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._heap: list[tuple[float, int, Hashable]] = []
        self._jobs: dict[Hashable, tuple[Callable[[], object], float]] = {}
        self._running: set[Hashable] = set()
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, key: Hashable, fn: Callable[[], object], interval: float) -> None:
        """Run ``fn`` every ``interval`` seconds (first run after one interval)."""
        with self._cond:
            self._jobs[key] = (fn, interval)
            heapq.heappush(self._heap, (time.monotonic() + interval, next(self._seq), key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ltxvfs-jobs", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, key: Hashable, *, wait: float = 0.0) -> bool:
        """Stop scheduling ``key``. With ``wait``, also wait up to that many seconds for a run
        in progress to end, so its owner can close what the job uses (a closing writer must
        not pull the storage client from under its compaction). True if no run is going on.
        Never call it with ``wait`` from the job itself."""
        deadline = time.monotonic() + wait
        with self._cond:
            self._jobs.pop(key, None)  # its heap entry is dropped when it comes due
            while key in self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, key = heapq.heappop(self._heap)
                job = self._jobs.get(key)
                if job is None:
                    continue
                fn, interval = job
                heapq.heappush(self._heap, (time.monotonic() + interval, next(self._seq), key))
                if key in self._running:
                    continue
                self._running.add(key)
            self._pool.submit(self._call, key, fn)

    def _call(self, key: Hashable, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # a background job must never kill the scheduler
            log.exception("background job %r failed", key)
        finally:
            with self._cond:
                self._running.discard(key)
                self._cond.notify_all()
