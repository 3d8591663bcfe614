"""Compaction (L0 -> L1 -> ... -> L8), L9 snapshots and retention, as Litestream does them.

Compacting into level ``d`` merges every file of level ``d-1`` that starts after ``d``'s newest
TXID into one file: per page the newest input wins, pages beyond the last input's commit are
dropped, and the output carries the last input's commit and timestamp. Inputs are streamed (one
page per input in memory), so compacting a large level never holds it whole. A snapshot is the
same merge over the whole restore plan, written to level 9 as ``1-<TXID>``.

Retention follows Litestream: L0 files already covered by L1 and older than ``l0_retention`` are
deleted (never the newest L0 file); snapshots older than ``snapshot_retention`` are deleted
except the newest, and then compacted files wholly below the oldest kept snapshot.

In write mode the :class:`Compactor`'s jobs take turns: a job that finds another one of the same
replica at work skips its run (the next interval comes soon), so retention never deletes a file
that a snapshot or a compaction is reading. A file can still vanish under a snapshot (another
process, a listing that lagged): the snapshot then plans again, from the compacted levels.
"""

from __future__ import annotations

import heapq
import io
import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

from .errors import LitestreamError, ObjectNotFoundError
from .ltx import Decoder, Encoder, Header
from .plan import compute_plan
from .storage.base import SNAPSHOT_LEVEL, FileInfo, RemoteFileReader, ReplicaClient, format_txid

log = logging.getLogger("ltxvfs.compact")

SPOOL_LIMIT = 16 * 1024 * 1024


def merge_files(client: ReplicaClient, files: Sequence[FileInfo], level: int) -> FileInfo:
    """Merge contiguous ``files`` into one file on ``level`` and upload it."""
    for a, b in zip(files, files[1:], strict=False):
        if not (b.min_txid <= a.max_txid + 1 and b.max_txid > a.max_txid):
            raise LitestreamError(f"non-contiguous transaction ids in input files: {a} -> {b}")
    # One read buffer per input, no larger than the input: BufferedReader allocates its whole
    # buffer up front, so 1 MiB each made merging 50 small L0 files allocate 50 MiB.
    decoders = [Decoder(io.BufferedReader(RemoteFileReader(client, f),
                                          max(min(1 << 20, f.size), io.DEFAULT_BUFFER_SIZE)), str(f))
                for f in files]
    last = decoders[-1].header
    for d in decoders:
        if d.header.page_size != last.page_size:
            raise LitestreamError(f"input files have mismatched page sizes: "
                                  f"{d.header.page_size} != {last.page_size}")
    header = Header(page_size=last.page_size, commit=last.commit, min_txid=files[0].min_txid,
                    max_txid=files[-1].max_txid, timestamp=last.timestamp)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_LIMIT) as spool:
        enc = Encoder(spool, header)
        for pgno, data in _newest_pages(decoders):
            if pgno <= header.commit:
                enc.write_page(pgno, data)
        enc.close()
        spool.seek(0)
        return client.write(level, header.min_txid, header.max_txid, spool, header.timestamp)


def _newest_pages(decoders: Sequence[Decoder]) -> Iterator[tuple[int, bytes]]:
    """Pages of all inputs in pgno order; for a pgno in several inputs, the last input's."""
    iters = [iter(d) for d in decoders]
    heap: list[tuple[int, int, bytes]] = []
    for i, it in enumerate(iters):
        first = next(it, None)
        if first is not None:
            heapq.heappush(heap, (first[0], -i, first[1]))
    while heap:
        pgno, neg, data = heapq.heappop(heap)
        chosen = data  # the newest input (largest index) pops first for equal pgno
        _advance(heap, iters, -neg)
        while heap and heap[0][0] == pgno:
            _, other, _ = heapq.heappop(heap)
            _advance(heap, iters, -other)
        yield pgno, chosen


def _advance(heap: list, iters: list, i: int) -> None:
    nxt = next(iters[i], None)
    if nxt is not None:
        heapq.heappush(heap, (nxt[0], -i, nxt[1]))


def compact_level(client: ReplicaClient, dst: int) -> FileInfo | None:
    """Merge level ``dst-1``'s new files into ``dst``. None if there is nothing to merge."""
    existing = client.list_files(dst)
    after = existing[-1].max_txid if existing else 0
    inputs = [f for f in client.list_files(dst - 1, seek=after + 1)]
    if not inputs:
        return None
    first = inputs[0].min_txid
    if first != after + 1 and not _covered_above(client, dst, after + 1, first - 1):
        # A listing can lag behind an upload (eventual consistency, a stale LIST): merging
        # past a TXID we cannot see would leave a hole that retention then makes permanent.
        # A hole that a higher level holds (snapshot retention removed files of dst-1 that
        # dst never merged) is no hole: waiting for it would stop dst for good.
        log.info("L%d compaction waits: L%d starts at %s, expected %s", dst, dst - 1,
                 format_txid(first), format_txid(after + 1))
        return None
    info = merge_files(client, inputs, dst)
    log.info("compacted %d file(s) of L%d into %s", len(inputs), dst - 1, info)
    return info


def _covered_above(client: ReplicaClient, dst: int, lo: int, hi: int) -> bool:
    """Some file of a level above ``dst`` (a snapshot, say) holds TXIDs ``lo``..``hi``."""
    return any(f.min_txid <= lo and f.max_txid >= hi for level in range(dst + 1, SNAPSHOT_LEVEL + 1)
               for f in client.list_files(level))


def snapshot(client: ReplicaClient, attempts: int = 3) -> FileInfo | None:
    """Write the latest state as an L9 snapshot, unless the newest one already covers it.

    If a file of the plan disappears while it is read (retention after compaction), the plan is
    made again: it then takes the compacted file that replaced the lost ones."""
    for attempt in range(attempts):
        plan = compute_plan(client)
        if plan.files[-1].level == SNAPSHOT_LEVEL:
            return None  # the newest snapshot already is the latest state
        try:
            info = merge_files(client, plan.files, SNAPSHOT_LEVEL)
        except ObjectNotFoundError as err:
            if attempt == attempts - 1:
                raise
            log.info("snapshot lost an input (%s); planning again", err)
            continue
        log.info("snapshot %s (TXID %s)", info, format_txid(info.max_txid))
        return info
    raise AssertionError("unreachable")


def enforce_l0_retention(client: ReplicaClient, retention: float,
                         now: datetime | None = None) -> list[FileInfo]:
    """Delete L0 files that L1 covers and that are older than ``retention`` seconds."""
    l1 = client.list_files(1)
    if not l1:
        return []
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=retention)
    l0 = client.list_files(0)
    doomed = []
    for i, f in enumerate(l0):
        if f.created_at > cutoff or i == len(l0) - 1:
            break
        # Only what an L1 file really holds: never a TXID that compaction skipped.
        if not any(c.min_txid <= f.min_txid and f.max_txid <= c.max_txid for c in l1):
            break
        doomed.append(f)
    if doomed:
        client.delete(doomed)
    return doomed


def enforce_snapshot_retention(client: ReplicaClient, retention: float, levels: Sequence[int],
                               now: datetime | None = None) -> list[FileInfo]:
    """Delete old snapshots (keeping the newest), then compacted files below the oldest kept."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=retention)
    snaps = client.list_files(SNAPSHOT_LEVEL)
    if not snaps:
        return []
    doomed = [f for f in snaps[:-1] if f.created_at < cutoff]
    kept = [f for f in snaps if f not in doomed]
    floor = min(f.max_txid for f in kept)
    for level in levels:
        files = client.list_files(level)
        doomed += [f for f in files[:-1] if f.max_txid < floor]
    if doomed:
        client.delete(doomed)
    return doomed


class Compactor:
    """The compaction jobs of one replica in write mode (run by the shared scheduler)."""

    def __init__(self, client: ReplicaClient, intervals: Sequence[float], snapshot_interval: float,
                 snapshot_retention: float, l0_retention: float) -> None:
        self.client = client
        self.intervals = list(intervals)
        self.snapshot_interval = snapshot_interval
        self.snapshot_retention = snapshot_retention
        self.l0_retention = l0_retention
        self.last_error: str | None = None
        self.runs = 0
        #: Runs skipped because another job of this replica held the levels.
        self.skipped = 0
        self._levels = threading.Lock()

    def jobs(self) -> list[tuple[str, object, float]]:
        """(name, callable, interval) for the scheduler."""
        out: list[tuple[str, object, float]] = []
        for i, interval in enumerate(self.intervals, start=1):
            out.append((f"compact-L{i}",
                        self._exclusive(lambda lvl=i: self._run(compact_level, self.client, lvl)),
                        interval))
        if self.snapshot_interval > 0:
            out.append(("snapshot", self._exclusive(self._snapshot), self.snapshot_interval))
        if self.l0_retention > 0 and self.intervals:
            out.append(("l0-retention", self._exclusive(
                lambda: self._run(enforce_l0_retention, self.client, self.l0_retention)),
                max(min(self.l0_retention / 4, 15.0), 0.05)))
        return out

    def _exclusive(self, job):
        """``job`` run only while no other job of this replica runs (else skipped): deleting
        and reading the same levels never overlap. Skipping, not waiting, keeps the shared
        job threads free for other databases' polls and syncs."""
        def run() -> None:
            if not self._levels.acquire(blocking=False):
                self.skipped += 1
                return
            try:
                job()
            finally:
                self._levels.release()
        return run

    def _snapshot(self) -> None:
        self._run(snapshot, self.client)
        if self.snapshot_retention > 0:
            self._run(enforce_snapshot_retention, self.client, self.snapshot_retention,
                      range(1, len(self.intervals) + 1))

    def _run(self, fn, *args) -> None:
        started = time.monotonic()
        try:
            fn(*args)
            self.runs += 1
            self.last_error = None
        except LitestreamError as err:
            self.last_error = str(err)
            log.warning("%s failed after %.1fs: %s", fn.__name__, time.monotonic() - started, err)
