"""One measured run: one system, one workload, one fresh process (so "cold" is really cold).

    python bench/child.py --system ltxvfs|go|local --workload NAME --spec spec.json --out r.json

``spec.json`` holds the dataset manifest, the replica URL (through the latency proxy), the proxy
endpoint (for its request counters) and the workload parameters. The result JSON has the
workload's metrics plus ``setup_s`` and ``rss_setup_kb``; the parent adds the child's peak RSS
(``ru_maxrss`` from ``wait4``).

Adding a workload = one function ``def wl_NAME(ctx) -> dict`` registered in :data:`WORKLOADS`
(write mode and hydration workloads at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apsw
import largechild
import workloads
from common import proxy_stats, stats_delta

RO_URI = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
RW_URI = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI

# --------------------------------------------------------------------------------------------
# Systems: how to open the database. Each is set up once per process.
# --------------------------------------------------------------------------------------------


class System:
    name = ""
    remote = True

    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def setup(self) -> None:
        pass

    def connect(self, **params: str) -> apsw.Connection:
        raise NotImplementedError


class Ltxvfs(System):
    """ltxvfs: ``ltxvfs.register()`` then ``file:db?vfs=litestream&replica_url=...``."""
    name = "ltxvfs"

    def setup(self) -> None:
        import ltxvfs
        self.vfs = ltxvfs.register()

    def connect(self, write: bool = False, **params: str) -> apsw.Connection:
        q = {"vfs": "litestream", "replica_url": self.spec["replica_url"], **params}
        return apsw.Connection("file:bench.db?" + urllib.parse.urlencode(q),
                               flags=RW_URI if write else RO_URI)


class GoVFS(System):
    """The Go VFS (PyPI ``litestream-vfs``) loaded as an extension; the replica comes from
    ``LITESTREAM_REPLICA_URL``, set by the parent at exec."""
    name = "go"

    def setup(self) -> None:
        import litestream_vfs
        self._loader = apsw.Connection(":memory:")
        self._loader.enable_load_extension(True)
        self._loader.load_extension(litestream_vfs.loadable_path(), "sqlite3_litestreamvfs_init")

    def connect(self, write: bool = False, **params: str) -> apsw.Connection:
        # The Go VFS takes its settings from the environment (set by run.py at exec): the
        # URI parameters meant for ltxvfs are ignored here.
        return apsw.Connection("file:bench.db?vfs=litestream", flags=RW_URI if write else RO_URI)


class Local(System):
    """A plain local SQLite file: ``litestream restore`` of the same replica."""
    name = "local"
    remote = False

    def connect(self, **params: str) -> apsw.Connection:
        return apsw.Connection(self.spec["dataset"]["local_db"], flags=apsw.SQLITE_OPEN_READONLY)


SYSTEMS: dict[str, type[System]] = {"ltxvfs": Ltxvfs, "go": GoVFS, "local": Local}

# --------------------------------------------------------------------------------------------
# Context handed to workloads
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    system: System
    spec: dict
    params: dict
    rng: random.Random
    endpoint: str | None
    marks: dict = field(default_factory=dict)

    @property
    def facts(self) -> dict:
        return self.spec["dataset"]["facts"]

    def stats(self) -> dict | None:
        """The proxy's counters now (None for the local system)."""
        return proxy_stats(self.endpoint) if self.endpoint and self.system.remote else None

    def delta(self, before: dict | None) -> dict:
        if before is None:
            return {"requests": 0, "counts": {}, "bytes_down": 0, "bytes_up": 0}
        return stats_delta(before, self.stats())

    def random_id(self) -> int:
        return self.rng.randint(1, self.facts["max_id"])

    profiler: object | None = None

    @contextlib.contextmanager
    def timed(self):
        """Wrap the measured part of a workload: under ``--profile`` only it is profiled."""
        prof = self.profiler
        if prof is not None and not prof.is_running:
            prof.start()
            try:
                yield
            finally:
                prof.stop()
        else:
            yield


LOOKUP = "SELECT k, name, payload FROM t WHERE id = ?"


def rss_now_kb() -> int:
    """Current resident set size (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _lookup(cur, i: int):
    return cur.execute(LOOKUP, (i,)).fetchall()


# --------------------------------------------------------------------------------------------
# Read workloads
# --------------------------------------------------------------------------------------------


def wl_cold_lookup(ctx: Ctx) -> dict:
    """Cold open -> first point lookup: time and requests (open = apsw.Connection())."""
    s0 = ctx.stats()
    rss0 = rss_now_kb()
    with ctx.timed():
        t0 = time.perf_counter()
        con = ctx.system.connect()
        t1 = time.perf_counter()
        s1 = ctx.stats()
        t1b = time.perf_counter()  # the counter read is not part of the measurement
        rows = _lookup(con.cursor(), ctx.random_id())
        t2 = time.perf_counter()
    d_all = ctx.delta(s0)
    d_open = stats_delta(s0, s1) if s0 is not None else d_all
    assert rows, "lookup found nothing"
    rss_growth = rss_now_kb() - rss0
    con.close()
    return {"rss_open_kb": rss_growth, "open_s": t1 - t0, "first_row_s": (t1 - t0) + (t2 - t1b),
            "requests": d_all["requests"],
            "requests_open": d_open["requests"], "req_counts": d_all["counts"],
            "bytes": d_all["bytes_down"]}


def _scan(ctx: Ctx, sql: str, pages_needed: int) -> dict:
    """A cold full scan with a time budget. The Go VFS fetches one page per ranged GET, so when
    it exceeds ``scan_budget_s`` it is interrupted and its time extrapolated from the share of
    pages fetched (``completed: false``). Other systems only have a safety cap
    (``scan_cap_s``); hitting it gives a lower bound (``incomplete: true``)."""
    con = ctx.system.connect()
    extrapolate = ctx.system.name == "go"
    budget = float(ctx.params.get("scan_budget_s" if extrapolate else "scan_cap_s") or 0)
    s0 = ctx.stats()
    # A watchdog, not a progress handler: count(*) runs inside one VDBE opcode (BtreeCount),
    # where progress handlers never fire, but sqlite3_interrupt() is still checked.
    timer = threading.Timer(budget, con.interrupt) if budget else None
    t0 = time.perf_counter()
    if timer is not None:
        timer.start()
    completed = True
    result = None
    try:
        with ctx.timed():
            result = con.execute(sql).fetchall()[0][0]
    except apsw.InterruptError:
        completed = False
    t1 = time.perf_counter()
    if timer is not None:
        timer.cancel()
    d = ctx.delta(s0)
    out = {"time_s": t1 - t0, "completed": completed, "requests": d["requests"],
           "req_counts": d["counts"], "bytes": d["bytes_down"], "result": result,
           "pages_needed": pages_needed}
    if not completed and not extrapolate:
        out["incomplete"] = True  # time_s is a lower bound
    elif not completed:
        gets = d["counts"].get("GET_RANGE", 0) + d["counts"].get("GET", 0)
        frac = min(1.0, gets / max(1, pages_needed))
        out["fraction_done"] = frac
        out["measured_s"] = t1 - t0
        out["time_s"] = (t1 - t0) / max(frac, 1e-9)
        out["requests"] = round(d["requests"] / max(frac, 1e-9))
        out["bytes"] = round(d["bytes_down"] / max(frac, 1e-9))
    con.close()
    return out


def wl_scan_count(ctx: Ctx) -> dict:
    """Cold ``SELECT count(*) FROM t`` (SQLite walks the smallest b-tree: index t_k)."""
    return _scan(ctx, "SELECT count(*) FROM t", ctx.facts.get("pages_t_k", 1) + 1)


def wl_scan_sum(ctx: Ctx) -> dict:
    """Cold ``SELECT sum(length(payload)) FROM t``: every leaf page of the table."""
    return _scan(ctx, "SELECT sum(length(payload)) FROM t", ctx.facts.get("pages_t", 1) + 1)


def wl_warm_lookups(ctx: Ctx) -> dict:
    """N point lookups (autocommit, one read transaction each) of keys drawn at random from a
    hot set, after one untimed pass over the hot set; µs per lookup. The N lookups are timed
    ``passes`` times (the median pass is reported): one pass lasts only ~20 ms, and a background
    poll landing in it (a LIST through boto3 holds the GIL for ~2-5 ms) would otherwise decide
    the result."""
    n = int(ctx.params.get("lookups", 1000))
    passes = int(ctx.params.get("passes", 5))
    hot = [ctx.random_id() for _ in range(int(ctx.params.get("hot_keys", 200)))]
    con = ctx.system.connect()
    cur = con.cursor()
    s0 = ctx.stats()
    t0 = time.perf_counter()
    for i in hot:
        _lookup(cur, i)
    t1 = time.perf_counter()
    warm = ctx.delta(s0)
    keys = [ctx.rng.choice(hot) for _ in range(n)]
    s1 = ctx.stats()
    per_pass = []
    with ctx.timed():
        for _ in range(passes):
            t2 = time.perf_counter()
            for i in keys:
                _lookup(cur, i)
            per_pass.append((time.perf_counter() - t2) / n * 1e6)
    d = ctx.delta(s1)
    con.close()
    per_pass.sort()
    return {"us_per_lookup": per_pass[len(per_pass) // 2], "us_per_lookup_best": per_pass[0],
            "lookups": n, "passes": passes, "requests": d["requests"],
            "req_counts": d["counts"], "warmup_s": t1 - t0, "warmup_requests": warm["requests"]}


def wl_range_scans(ctx: Ctx) -> dict:
    """R cold range scans of L consecutive rows (rowid ranges) at random places; ms per scan."""
    r = int(ctx.params.get("range_scans", 10))
    length = int(ctx.params.get("range_rows", 500))
    con = ctx.system.connect()
    cur = con.cursor()
    _lookup(cur, 1)  # open + schema outside the timing
    starts = [ctx.rng.randint(1, max(1, ctx.facts["max_id"] - length)) for _ in range(r)]
    s0 = ctx.stats()
    times = []
    with ctx.timed():
        for a in starts:
            t0 = time.perf_counter()
            cur.execute("SELECT count(*), sum(length(payload)) FROM t WHERE id >= ? AND id < ?",
                        (a, a + length)).fetchall()
            times.append(time.perf_counter() - t0)
    d = ctx.delta(s0)
    con.close()
    return {"ms_per_scan": sum(times) / r * 1e3, "scans": r, "rows_per_scan": length,
            "requests": d["requests"], "requests_per_scan": d["requests"] / r,
            "req_counts": d["counts"], "bytes": d["bytes_down"]}


def wl_idle_follower(ctx: Ctx) -> dict:
    """An open, idle connection: requests (LIST above all) over ``idle_s`` seconds, per minute."""
    secs = float(ctx.params.get("idle_s", 20))
    con = ctx.system.connect()
    _lookup(con.cursor(), 1)
    time.sleep(min(2.0, secs / 4))  # let start-up traffic settle
    s0 = ctx.stats()
    t0 = time.perf_counter()
    time.sleep(secs)
    d = ctx.delta(s0)
    elapsed = time.perf_counter() - t0
    con.close()
    per_min = 60.0 / secs  # nominal window: both systems are scaled identically
    return {"list_per_min": d["counts"].get("LIST", 0) * per_min,
            "requests_per_min": d["requests"] * per_min, "req_counts": d["counts"],
            "window_s": elapsed}


def wl_noop(ctx: Ctx) -> dict:
    """Setup only (import + register / load extension): the RSS baseline."""
    return {}


# --------------------------------------------------------------------------------------------
# Write mode and hydration
#
# Write workloads get a replica of their own per run (run.py copies the dataset's prefix in the
# stand-in: spec["replica_prefix"]); ltxvfs opens with write_enabled=true and a private
# buffer_path, the Go VFS gets LITESTREAM_WRITE_ENABLED/SYNC_INTERVAL/BUFFER_PATH at exec.
# Visibility is checked on the stand-in directly (spec["stub"]), not through the proxy, so the
# checks are neither delayed nor counted.
# --------------------------------------------------------------------------------------------

INSERT = "INSERT INTO t(k, name, payload) VALUES(?, ?, ?)"


def _row(rng: random.Random) -> tuple:
    return (rng.randint(1, 1 << 30), f"name-{rng.randint(0, 1 << 30)}",
            rng.randbytes(100).hex())


def _write_connect(ctx: Ctx, **extra: str) -> apsw.Connection:
    params = {}
    if ctx.system.name == "ltxvfs":
        params = {"write_enabled": "true", "buffer_path": str(Path(ctx.spec["tmpdir"]) / "buf"),
                  **extra}
    con = ctx.system.connect(write=True, **params)
    con.set_busy_timeout(30_000)
    return con


def _max_l0_txid(ctx: Ctx) -> int:
    """The highest TXID of an LTX file in the replica, listed on the stand-in directly."""
    bucket, prefix = ctx.spec["dataset"]["bucket"], ctx.spec["replica_prefix"]
    best, token = 0, ""
    for _ in range(100):
        q = {"list-type": "2", "prefix": f"{prefix}/0000/"}
        if token:
            q["continuation-token"] = token
        with urllib.request.urlopen(f"{ctx.spec['stub']}/{bucket}?{urllib.parse.urlencode(q)}",
                                    timeout=10) as r:
            body = r.read().decode()
        for key in re.findall(r"<Key>([^<]*)</Key>", body):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".ltx") and len(name) >= 37:
                best = max(best, int(name[17:33], 16))
        m = re.search(r"<NextContinuationToken>([^<]*)<", body)
        if "<IsTruncated>true" not in body or not m:
            break
        token = m.group(1)
    return max(best, int(ctx.spec["dataset"]["txid"]))


def _wait_txid(ctx: Ctx, above: int, timeout: float, interval: float = 0.002) -> float | None:
    """Seconds until an L0 file with a TXID > ``above`` is listed (None: not within timeout)."""
    t0 = time.perf_counter()
    for _ in range(int(timeout / interval) + 10):
        if _max_l0_txid(ctx) > above:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            return None
        time.sleep(interval)
    return None


def _final_sync(ctx: Ctx, con: apsw.Connection) -> None:
    """ltxvfs: PRAGMA litestream_sync (returns after the upload); Go: close() syncs."""
    if ctx.system.name == "ltxvfs":
        con.execute("PRAGMA litestream_sync").fetchall()
    con.close()


def wl_single_row_commits(ctx: Ctx) -> dict:
    """N single-row INSERTs, each its own transaction (autocommit), then a final sync."""
    n = int(ctx.params.get("commits", 1000))
    base = _max_l0_txid(ctx)
    con = _write_connect(ctx)
    cur = con.cursor()
    cur.execute("SELECT max(id) FROM t").fetchall()  # open + schema outside the timing
    rows = [_row(ctx.rng) for _ in range(n)]
    s0 = ctx.stats()
    with ctx.timed():
        t0 = time.perf_counter()
        for i, r in enumerate(rows):
            try:
                cur.execute(INSERT, r)
            except apsw.Error as e:
                raise RuntimeError(f"{ctx.system.name}: commit {i + 1}/{n} failed after "
                                   f"{time.perf_counter() - t0:.2f}s: {e!r}") from e
        t1 = time.perf_counter()
        _final_sync(ctx, con)
        t2 = time.perf_counter()
    d = ctx.delta(s0)
    vis = _wait_txid(ctx, base, 30.0)
    last = _max_l0_txid(ctx)
    return {"commits_per_s": n / (t1 - t0), "loop_s": t1 - t0, "sync_s": t2 - t1,
            "total_s": t2 - t0, "total_commits_per_s": n / (t2 - t0),
            "requests": d["requests"], "req_counts": d["counts"], "bytes_up": d["bytes_up"],
            "bytes": d["bytes_down"], "uploaded_txids": last - base,
            "synced": vis is not None}


def wl_bulk_transaction(ctx: Ctx) -> dict:
    """One transaction of N rows, then the time until it is in the replica."""
    n = int(ctx.params.get("bulk_rows", 100_000))
    base = _max_l0_txid(ctx)
    con = _write_connect(ctx)
    cur = con.cursor()
    cur.execute("SELECT max(id) FROM t").fetchall()
    rows = [_row(ctx.rng) for _ in range(n)]
    s0 = ctx.stats()
    with ctx.timed():
        t0 = time.perf_counter()
        cur.execute("BEGIN")
        cur.executemany(INSERT, rows)
        cur.execute("COMMIT")
        t1 = time.perf_counter()
        _final_sync(ctx, con)
        t2 = time.perf_counter()
    d = ctx.delta(s0)
    vis = _wait_txid(ctx, base, 60.0)
    return {"commit_s": t1 - t0, "sync_s": t2 - t1, "time_s": t2 - t0,
            "requests": d["requests"], "req_counts": d["counts"], "bytes_up": d["bytes_up"],
            "bytes": d["bytes_down"], "synced": vis is not None,
            "visible_after_s": vis}


def wl_commit_visible(ctx: Ctx, interval: str | None = None) -> dict:
    """K times: wait a random part of the sync interval, commit one row, then time until an
    L0 file with a newer TXID is listed on the stand-in (polled every 2 ms, bounded)."""
    k = int(ctx.params.get("visible_commits", 5))
    extra = {"sync_interval": interval} if interval else {}
    period = 0.1 if interval == "100ms" else 1.0
    con = _write_connect(ctx, **extra)
    cur = con.cursor()
    cur.execute("SELECT max(id) FROM t").fetchall()
    s0 = ctx.stats()
    times, commit_times = [], []
    failure = None
    with ctx.timed():
        for i in range(k):
            time.sleep(ctx.rng.uniform(0, period))
            base = _max_l0_txid(ctx)
            t0 = time.perf_counter()
            try:
                cur.execute(INSERT, _row(ctx.rng))
            except apsw.Error as e:
                failure = f"{ctx.system.name}: commit {i + 1}/{k} failed: {e!r}"
                if not times:
                    raise RuntimeError(failure) from e
                break  # keep the samples measured so far, and say so
            t1 = time.perf_counter()
            vis = _wait_txid(ctx, base, 15.0)
            if vis is None:
                raise RuntimeError(f"{ctx.system.name}: commit {i + 1}/{k} not visible "
                                   f"after 15 s")
            commit_times.append(t1 - t0)
            times.append(t1 - t0 + vis)
    d = ctx.delta(s0)
    with contextlib.suppress(apsw.Error):
        con.close()
    times.sort()
    out = {"visible_s": times[len(times) // 2], "visible_max_s": times[-1],
           "visible_min_s": times[0], "commit_s": sorted(commit_times)[len(commit_times) // 2],
           "samples": len(times), "requests": d["requests"], "req_counts": d["counts"]}
    if failure:
        out["failure"] = failure + f" (result from the {len(times)} commit(s) before it)"
    return out


def wl_commit_visible_100ms(ctx: Ctx) -> dict:
    return wl_commit_visible(ctx, "100ms")


def _raw_download(ctx: Ctx, threads: int = 8) -> dict:
    """The bytes of the restore plan (snapshot + L1), downloaded with ``threads`` threads of
    ranged GETs (raw http.client, keep-alive) through the proxy: the reference for hydration."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor
    m = ctx.spec["dataset"]
    plan = m["plan"]
    total = sum(f["size"] for f in plan)
    chunk = max(256 * 1024, -(-total // (2 * threads)))
    jobs = []
    for f in plan:
        key = f"{m['prefix']}/{f['level']:04x}/{f['min']:016x}-{f['max']:016x}.ltx"
        for a in range(0, f["size"], chunk):
            jobs.append((key, a, min(f["size"], a + chunk) - 1))
    host, port = urllib.parse.urlsplit(ctx.endpoint).netloc.split(":")
    local = threading.local()

    def get(job) -> int:
        key, a, b = job
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request("GET", f"/{m['bucket']}/{urllib.parse.quote(key)}",
                  headers={"Range": f"bytes={a}-{b}"})
        r = c.getresponse()
        n = 0
        while True:
            buf = r.read(1 << 20)
            if not buf:
                break
            n += len(buf)
        if r.status != 206 or n != b - a + 1:
            raise RuntimeError(f"raw GET {key} {a}-{b}: {r.status}, {n} bytes")
        return n

    s0 = proxy_stats(ctx.endpoint)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        got = sum(ex.map(get, jobs))
    t1 = time.perf_counter()
    d = stats_delta(s0, proxy_stats(ctx.endpoint))
    return {"time_s": t1 - t0, "requests": d["requests"], "req_counts": d["counts"],
            "bytes": got, "chunks": len(jobs), "chunk_bytes": chunk, "threads": threads}


def wl_hydration(ctx: Ctx) -> dict:
    """Open with a hydration file and poll PRAGMA litestream_hydration_progress every 10 ms
    until it reports 100 (bounded). The ``local`` system instead downloads the same bytes
    (snapshot + L1 files) raw with 8 threads of ranged GETs: the reference speed."""
    if ctx.system.name == "local":
        return _raw_download(ctx)
    cap = float(ctx.params.get("hydration_cap_s", 120))
    path = Path(ctx.spec["tmpdir"]) / "hydrated.db"
    s0 = proxy_stats(ctx.endpoint)
    progress, seen = None, []
    with ctx.timed():
        t0 = time.perf_counter()
        con = (ctx.system.connect(hydration_path=str(path)) if ctx.system.name == "ltxvfs"
               else ctx.system.connect())
        t_open = time.perf_counter() - t0
        done = False
        for _ in range(int(cap / 0.01) + 10):
            rows = con.execute("PRAGMA litestream_hydration_progress").fetchall()
            progress = rows[0][0] if rows and rows[0] else None
            if not seen or seen[-1][1] != progress:
                seen.append((round(time.perf_counter() - t0, 3), progress))
            try:
                if progress is not None and float(progress) >= 100.0:
                    done = True
                    break
            except (TypeError, ValueError):
                pass
            if time.perf_counter() - t0 > cap:
                break
            time.sleep(0.01)
        t1 = time.perf_counter()
    d = stats_delta(s0, proxy_stats(ctx.endpoint))
    rows = con.execute("SELECT count(*) FROM t").fetchall()[0][0]
    size = path.stat().st_size if path.exists() else 0
    con.close()
    out = {"time_s": t1 - t0, "open_s": t_open, "completed": done, "requests": d["requests"],
           "req_counts": d["counts"], "bytes": d["bytes_down"], "file_bytes": size,
           "rows": rows, "progress_last": str(progress), "progress_trace": seen[:40]}
    if not done:
        out["incomplete"] = True
    return out


WORKLOADS: dict[str, Callable[[Ctx], dict]] = {
    "noop": wl_noop,
    "cold_lookup": wl_cold_lookup,
    "scan_count": wl_scan_count,
    "scan_sum": wl_scan_sum,
    "warm_lookups": wl_warm_lookups,
    "range_scans": wl_range_scans,
    "idle_follower": wl_idle_follower,
    "single_row_commits": wl_single_row_commits,
    "bulk_transaction": wl_bulk_transaction,
    "commit_visible": wl_commit_visible,
    "commit_visible_100ms": wl_commit_visible_100ms,
    "hydration": wl_hydration,
    "suite": workloads.wl_suite,  # the workload suite (bench/workloads.py, bench/suite.py)
    "large": largechild.wl_large,  # the large suite (bench/large.py, bench/largechild.py)
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    ap.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    ap.add_argument("--spec", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    t0 = time.perf_counter()
    system = SYSTEMS[args.system](spec)
    system.setup()
    setup_s = time.perf_counter() - t0
    patch = os.environ.get("BENCH_LTXVFS_PATCH")
    if patch and args.system == "ltxvfs":  # experiments only (bench/experiments/*.py)
        import runpy
        runpy.run_path(patch)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ctx = Ctx(system, spec, spec.get("params", {}), random.Random(spec.get("seed", 0)),
              spec.get("endpoint"))
    if os.environ.get("BENCH_TRACE") and ctx.endpoint:  # trace only this child's requests
        urllib.request.urlopen(urllib.request.Request(
            f"{ctx.endpoint}/__bench__/reset", data=b"", method="POST"), timeout=10).read()
    profile_path = os.environ.get("BENCH_PYINSTRUMENT")
    if profile_path:  # the workload's ctx.timed() part only
        from pyinstrument import Profiler
        ctx.profiler = prof = Profiler(interval=0.0002)
    result = WORKLOADS[args.workload](ctx)
    if profile_path and prof.last_session is not None:
        Path(profile_path).write_text(prof.output_text(unicode=True, color=False, show_all=False))
        Path(profile_path).with_suffix(".html").write_text(prof.output_html())
    trace_path = os.environ.get("BENCH_TRACE")
    if trace_path and ctx.endpoint:
        with urllib.request.urlopen(f"{ctx.endpoint}/__bench__/trace", timeout=30) as r:
            Path(trace_path).write_bytes(r.read())
    if "first_row_s" in result:
        result["cold_start_s"] = setup_s + result["first_row_s"]
    result.update(setup_s=setup_s, rss_setup_kb=rss_setup,
                  rss_end_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    args.out.write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # do not wait for (or be confused by) background threads of the VFS


if __name__ == "__main__":
    sys.exit(main())
