"""The ideal of a workload: which pages it touches, and what a cache of a given size would miss.

The workload suite (bench/workloads.py) describes every workload as phases of SQL operations,
generated deterministically from the dataset and a seed. :func:`trace_plan` runs the same
operations on the local copy of the dataset through :class:`CountingVFS`, a shim over SQLite's
default VFS that records every ``xRead`` of the main database file, with SQLite's default page
cache in front of it (so the trace is what a VFS under SQLite sees, not every b-tree access).

The copy is converted to rollback-journal mode first (``trace.db`` next to ``local.db``), since
both VFSes present the database that way: SQLite then reads the 16 header bytes at offset 24 at
every read transaction to check the change counter, as it does through them. Those header reads
are counted apart (``header_reads``): a VFS answers them from page 1 in its cache, which makes a
hit rate look better than the cache is.

From the trace, per phase:

- ``pages``: page reads (xRead of a whole page) reaching the VFS;
- ``distinct``: pages read for the first time in the run (compulsory misses: no cache avoids them);
- ``lru_misses``: misses of an LRU of ``cache_bytes`` holding exactly the pages read (no
  readahead, nothing else), run over the whole trace in order;
- ``opt_misses``: misses of Belady's optimal replacement of the same size (the floor for any
  cache of that size without prefetching);
- ``lru_op_clean``: the share of operations that missed nothing in that LRU.
"""

from __future__ import annotations

import heapq
import shutil
import sqlite3
from collections import OrderedDict
from pathlib import Path

import apsw

LOOKUP = "SELECT k, name, payload FROM t WHERE id = ?"


class CountingFile(apsw.VFSFile):
    def __init__(self, vfs: CountingVFS, name, flags) -> None:
        super().__init__("", name, flags)  # "" = the default VFS
        self._vfs = vfs
        self._main = bool(flags[0] & apsw.SQLITE_OPEN_MAIN_DB)

    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802
        if self._main:
            self._vfs.record(amount, offset)
        return super().xRead(amount, offset)


class CountingVFS(apsw.VFS):
    """Inherits the default VFS; records (page, whole page?) for every main-db xRead."""

    def __init__(self, name: str = "bench-trace", page_size: int = 4096) -> None:
        self.vfs_name = name
        self.page_size = page_size
        self.reads: list[int] = []  # page numbers of whole-page reads
        self.header_reads = 0  # partial reads of page 1 (the change-counter check, the header)
        super().__init__(name, "")

    def record(self, amount: int, offset: int) -> None:
        if amount < self.page_size and offset < self.page_size:
            self.header_reads += 1
        else:
            for p in range(offset // self.page_size, (offset + amount - 1) // self.page_size + 1):
                self.reads.append(p + 1)

    def xOpen(self, name, flags):  # noqa: N802
        return CountingFile(self, name, flags)


def rollback_copy(local_db: str | Path) -> Path:
    """``trace.db``: the local copy in rollback-journal mode (made once, reused)."""
    src = Path(local_db)
    dst = src.with_name("trace.db")
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    tmp = src.with_name("trace.db.tmp")
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as s, sqlite3.connect(tmp) as d:
        s.backup(d)
    con = sqlite3.connect(tmp)
    con.execute("PRAGMA journal_mode=DELETE").fetchall()
    con.close()
    shutil.move(tmp, dst)
    return dst


def run_op(cur, op) -> None:
    kind = op[0]
    if kind == "lookup":
        cur.execute(LOOKUP, (op[1],)).fetchall()
    else:
        cur.execute(op[1], op[2] if len(op) > 2 else ()).fetchall()


def trace_plan(local_db: str | Path, plan: list[tuple[str, list]], page_size: int) -> list[dict]:
    """Run ``plan`` (phases of operations, one connection, as the workload's single-connection
    reference) on a rollback-mode copy of ``local_db``; per phase, per operation: page reads."""
    db = rollback_copy(local_db)
    vfs = CountingVFS(page_size=page_size)
    out = []
    try:
        con = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY, vfs=vfs.vfs_name)
        cur = con.cursor()
        for name, ops in plan:
            h0 = vfs.header_reads
            per_op = []
            for op in ops:
                n0 = len(vfs.reads)
                if op[0] == "reconnect_lookup":  # SQLite's page cache goes with the connection
                    con.close()
                    con = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY,
                                          vfs=vfs.vfs_name)
                    cur = con.cursor()
                    op = ("lookup", op[1])
                run_op(cur, op)
                per_op.append(vfs.reads[n0:])
            out.append({"phase": name, "ops": per_op, "header_reads": vfs.header_reads - h0})
        con.close()
    finally:
        vfs.unregister()
    return out


def simulate(traced: list[dict], cache_pages: int) -> list[dict]:
    """Per phase: reads, distinct (first-time) pages, LRU and OPT misses at ``cache_pages``."""
    stream = [p for ph in traced for ops in ph["ops"] for p in ops]
    opt = _opt_miss_flags(stream, cache_pages)
    lru: OrderedDict[int, None] = OrderedDict()
    seen: set[int] = set()
    i = 0
    out = []
    for ph in traced:
        reads = distinct = lru_m = opt_m = clean = 0
        for ops in ph["ops"]:
            missed = False
            for p in ops:
                reads += 1
                if p not in seen:
                    seen.add(p)
                    distinct += 1
                if p in lru:
                    lru.move_to_end(p)
                else:
                    lru_m += 1
                    missed = True
                    lru[p] = None
                    if len(lru) > cache_pages:
                        lru.popitem(last=False)
                opt_m += opt[i]
                i += 1
            clean += not missed
        n = len(ph["ops"])
        out.append({"phase": ph["phase"], "ops": n, "pages": reads, "distinct": distinct,
                    "lru_misses": lru_m, "opt_misses": opt_m,
                    "lru_hit_rate": 1 - lru_m / reads if reads else None,
                    "lru_op_clean": clean / n if n else None,
                    "header_reads": ph["header_reads"]})
    return out


def _opt_miss_flags(stream: list[int], capacity: int) -> list[int]:
    """Belady: on a miss with a full cache, evict the page whose next use is farthest away."""
    inf = len(stream) + 1
    nxt = [inf] * len(stream)
    last: dict[int, int] = {}
    for i in range(len(stream) - 1, -1, -1):
        nxt[i] = last.get(stream[i], inf)
        last[stream[i]] = i
    cached: dict[int, int] = {}  # page -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, page), lazily invalidated
    flags = []
    for i, p in enumerate(stream):
        if p in cached:
            flags.append(0)
        else:
            flags.append(1)
            if len(cached) >= capacity:
                while heap:
                    negn, q = heapq.heappop(heap)
                    if cached.get(q) == -negn:
                        del cached[q]
                        break
        cached[p] = nxt[i]
        heapq.heappush(heap, (-nxt[i], p))
    return flags
