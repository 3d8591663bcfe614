"""The workload suite (issue 13): access patterns users bring, each in a fresh process.

A workload is a list of *phases*, each a list of operations (a point lookup by primary key, or
one SQL statement), generated deterministically by :func:`make_plan` from the dataset's facts,
the parameters and a seed. The measured child (bench/child.py, workload ``suite``) runs the
plan on one system and reports per phase: time per operation and in total, requests by kind,
bytes downloaded and, for ltxvfs, the ``PRAGMA litestream_stats`` counters. bench/pagetrace.py runs
the same plan on the local copy to get the ideal (pages touched, LRU and OPT misses);
bench/suite.py orchestrates and writes the report.

Cache sizes are set in bytes on both VFSes: ltxvfs's ``cache_size`` URI parameter (one cache per
replica, shared by the process's connections) and the Go VFS's ``cache_size`` URI parameter
(litestream-vfs 0.5.17 parses it, in bytes, into ``VFSFile.CacheSize``: one LRU *per
connection*; its environment has no cache knob). ``None`` leaves both at their default, 10 MiB.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass

import apsw

LOOKUP = "SELECT k, name, payload FROM t WHERE id = ?"
RANGE = "SELECT count(*), sum(length(payload)) FROM t WHERE id >= ? AND id < ?"
#: A join through the secondary index: rows a by rowid range, their partners b by t_k, then b's
#: row by rowid (SQLite's plan: SCAN a by rowid range, SEARCH b USING INDEX t_k).
JOIN = ("SELECT count(*), sum(length(b.payload)) FROM t AS a JOIN t AS b ON b.k = a.k "
        "WHERE a.id BETWEEN ? AND ?")
SCAN = "SELECT sum(length(payload)) FROM t"
COUNT = "SELECT count(*) FROM t"
DEFAULT_CACHE = 10 * 1024 * 1024  # both VFSes' default


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    cache: str  # "default", "half" (db = 2x cache), "tenth" (db = 10x cache)
    report: tuple[str, ...]  # phases shown in the report
    per_op: tuple[str, ...] = ()  # phases whose operations are checked one by one for requests
    threads: int = 1
    cold: bool = False  # the report's first phase includes the open


SUITE: dict[str, Suite] = {s.name: s for s in (
    Suite("cold", "cold open → one point lookup", "default", ("lookup",), cold=True),
    Suite("rand_2x", "1,000 uniform random lookups, then the same 1,000 again (db = 2× cache)",
          "half", ("pass1", "pass2")),
    Suite("rand_10x", "1,000 uniform random lookups, then the same again (db = 10× cache)",
          "tenth", ("pass1", "pass2")),
    Suite("rand_default", "1,000 uniform random lookups, then the same again (default "
          "10 MiB caches)", "default", ("pass1", "pass2")),
    Suite("zipf", "Zipf (s=1.1) lookups over a db 10× the cache; steady state = second half",
          "tenth", ("second_half",)),
    Suite("hot_scan", "hot set (200 keys) ×2, full-table scan, hot set again (default cache)",
          "default", ("warm2", "scan", "hot_after"), per_op=("warm2", "hot_after")),
    Suite("range_100", "cold range scans of 100 rows (×10)", "default", ("scans",)),
    Suite("range_10k", "cold range scans of 10,000 rows (×3)", "default", ("scans",)),
    Suite("join_k", "join through index t_k (200 rows of a → b by k; ×5)", "default",
          ("joins",)),
    Suite("count", "cold `SELECT count(*) FROM t`", "default", ("count",)),
    Suite("reconnect", "connection per request: open, look up one of 20 hot keys, close (×100)",
          "default", ("requests",)),
    Suite("threads1", "400 random lookups, 1 thread (the reference for threads8)", "default",
          ("lookups",)),
    Suite("threads8", "the same 400 lookups in each of 8 threads at once (own connection each, "
          "own order)", "default", ("lookups",), threads=8),
)}

#: What runs by default on each dataset (the scans cost the Go VFS one request per page).
DEFAULT_WORKLOADS = {
    "small": tuple(SUITE),
    "large": ("cold", "rand_default", "zipf", "range_100", "join_k", "reconnect", "threads1",
              "threads8"),
    "huge": ("cold", "rand_default", "range_100", "reconnect"),
}


def cache_bytes(suite: Suite, facts: dict) -> int | None:
    db = facts["page_count"] * facts["page_size"]
    return {"default": None, "half": db // 2, "tenth": db // 10}[suite.cache]


def zipf_keys(n_keys: int, count: int, s: float, rng: random.Random) -> list[int]:
    """``count`` keys in 1..n_keys, Zipf-distributed by rank; ranks scattered over the key space
    (rank r -> key (r * P) mod n + 1, P prime > n) so that hot keys do not share pages."""
    cum = list(itertools.accumulate(1.0 / (r ** s) for r in range(1, n_keys + 1)))
    total = cum[-1]
    prime = 2_654_435_761
    return [(bisect.bisect_left(cum, rng.random() * total) * prime) % n_keys + 1
            for _ in range(count)]


def make_plan(name: str, facts: dict, params: dict, seed: int) -> list[tuple[str, list]]:
    """The phases of workload ``name``: [(phase, [op, ...]), ...], an op being
    ``("lookup", id)`` or ``("sql", sql, args)``. Deterministic in (facts, params, seed)."""
    rng = random.Random(f"{name}:{seed}")
    n_id = facts["max_id"]

    def rand_key() -> int:
        return rng.randint(1, n_id)

    if name == "cold":
        return [("lookup", [("lookup", rand_key())])]
    if name.startswith("rand_"):
        keys = [rand_key() for _ in range(int(params.get("suite_lookups", 1000)))]
        return [("pass1", [("lookup", k) for k in keys]), ("pass2", [("lookup", k) for k in keys])]
    if name == "zipf":
        keys = zipf_keys(n_id, int(params.get("zipf_lookups", 4000)),
                         float(params.get("zipf_s", 1.1)), rng)
        half = len(keys) // 2
        return [("first_half", [("lookup", k) for k in keys[:half]]),
                ("second_half", [("lookup", k) for k in keys[half:]])]
    if name == "hot_scan":
        hot = [rand_key() for _ in range(int(params.get("hot_keys", 200)))]
        passes = []
        for _ in range(3):
            order = list(hot)
            rng.shuffle(order)
            passes.append([("lookup", k) for k in order])
        return [("warm1", passes[0]), ("warm2", passes[1]), ("scan", [("sql", SCAN, ())]),
                ("hot_after", passes[2])]
    if name in ("range_100", "range_10k"):
        length, n = (100, 10) if name == "range_100" else (10_000, 3)
        return [("scans", [("sql", RANGE, (a, a + length)) for a in
                           (rng.randint(1, max(1, n_id - length)) for _ in range(n))])]
    if name == "join_k":
        return [("joins", [("sql", JOIN, (a, a + 199)) for a in
                           (rng.randint(1, max(1, n_id - 200)) for _ in range(5))])]
    if name == "count":
        return [("count", [("sql", COUNT, ())])]
    if name == "reconnect":
        hot = [rand_key() for _ in range(20)]
        return [("requests", [("reconnect_lookup", rng.choice(hot)) for _ in range(100)])]
    if name in ("threads1", "threads8"):
        rng = random.Random(f"threads:{seed}")  # the same keys for both
        keys = [rand_key() for _ in range(int(params.get("thread_keys", 400)))]
        return [("lookups", [("lookup", k) for k in keys])]
    raise KeyError(name)


# --------------------------------------------------------------------------------------------
# The measured child (bench/child.py registers wl_suite as the workload "suite")
# --------------------------------------------------------------------------------------------

def _connect(ctx, cache: int | None) -> apsw.Connection:
    name = ctx.system.name
    params = {} if cache is None else {"cache_size": str(cache)}
    if name == "go":
        q = urllib.parse.urlencode({"vfs": "litestream", **params})
        return apsw.Connection("file:bench.db?" + q,
                               flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    if name == "ltxvfs":
        return ctx.system.connect(**params)
    return ctx.system.connect()


def _ltx_stats(ctx, con) -> dict | None:
    if ctx.system.name != "ltxvfs":
        return None
    return json.loads(con.execute("PRAGMA litestream_stats").fetchall()[0][0])


def _run_op(cur, op) -> None:
    if op[0] == "lookup":
        rows = cur.execute(LOOKUP, (op[1],)).fetchall()
        if not rows:
            raise RuntimeError(f"lookup {op[1]} found nothing")
    else:
        cur.execute(op[1], op[2]).fetchall()


def _fetches(counts: dict) -> int:
    return counts.get("GET", 0) + counts.get("GET_RANGE", 0)


def _phase_metrics(ctx, phase: str, times: list[float], wall: float, s0, st0, st1,
                   clean: list[bool] | None) -> dict:
    d = ctx.delta(s0)
    times = sorted(times)
    n = len(times)
    out = {"ops": n, "total_s": wall,
           "op_us": times[n // 2] * 1e6 if n else None,
           "op_us_p90": times[min(n - 1, int(n * 0.9))] * 1e6 if n else None,
           "requests": d["requests"], "fetches": _fetches(d["counts"]),
           "bytes": d["bytes_down"]}
    for k, v in d["counts"].items():
        out[f"kind_{k}"] = v
    if st0 is not None and st1 is not None:
        for k in ("cache_hits", "cache_misses", "page_gets", "bytes_fetched", "header_reads"):
            if k in st1:
                out[k] = st1[k] - st0[k]
    if clean is not None:
        out["clean_ops"] = sum(clean) / len(clean) if clean else None
    return {f"{phase}.{k}": v for k, v in out.items()}


def wl_suite(ctx) -> dict:
    """Run one suite workload (``params["suite_workload"]``) on ctx.system."""
    suite = SUITE[ctx.params["suite_workload"]]
    seed = int(ctx.spec.get("seed", 0))
    plan = make_plan(suite.name, ctx.facts, ctx.params, seed)
    cache = cache_bytes(suite, ctx.facts)
    out: dict = {"cache_bytes": cache if cache is not None else DEFAULT_CACHE,
                 "suite_workload": suite.name}
    if suite.threads > 1:
        out.update(_run_threads(ctx, suite, plan, cache, seed))
        return out
    s_open = ctx.stats()
    t0 = time.perf_counter()
    con = _connect(ctx, cache)
    out["open_s"] = time.perf_counter() - t0
    out["open_requests"] = ctx.delta(s_open)["requests"]
    cur = con.cursor()
    with ctx.timed():
        for phase, ops in plan:
            per_op = phase in suite.per_op
            clean: list[bool] | None = [] if per_op else None
            # a reconnect drops the replica (last connection closed): its counters restart
            reconnects = any(op[0] == "reconnect_lookup" for op in ops)
            st0 = None if reconnects else _ltx_stats(ctx, con)
            s0 = ctx.stats()
            times = []
            w0 = time.perf_counter()
            for op in ops:
                b = ctx.stats() if per_op else None
                t = time.perf_counter()
                if op[0] == "reconnect_lookup":  # a connection per request: nothing else open
                    con.close()
                    con = _connect(ctx, cache)
                    cur = con.cursor()
                    op = ("lookup", op[1])
                _run_op(cur, op)
                times.append(time.perf_counter() - t)
                if per_op:
                    assert clean is not None
                    clean.append(_fetches(ctx.delta(b)["counts"]) == 0)
            wall = time.perf_counter() - w0
            if per_op:  # the counter reads are not part of the phase's time
                wall = sum(times)
            out.update(_phase_metrics(ctx, phase, times, wall, s0, st0, _ltx_stats(ctx, con),
                                      clean))
    if suite.cold:
        first = plan[0][0]
        out["first_row_s"] = out["open_s"] + out[f"{first}.total_s"]
    out["final_stats"] = _ltx_stats(ctx, con)
    con.close()
    return out


def _run_threads(ctx, suite: Suite, plan, cache: int | None, seed: int) -> dict:
    """Every thread opens its own connection, then (released together) looks up all keys of
    the plan's single phase in its own order. Bounded: a thread that is not done after
    ``thread_cap_s`` is reported and the child fails."""
    (phase, ops), = plan
    n = suite.threads
    cons = [_connect(ctx, cache) for _ in range(n)]
    for c in cons:  # schema loaded by every connection before the timing
        c.execute("SELECT count(*) FROM sqlite_schema").fetchall()
    orders = []
    for i in range(n):
        o = list(ops)
        random.Random(f"order:{seed}:{i}").shuffle(o)
        orders.append(o)
    barrier = threading.Barrier(n + 1, timeout=60)
    times: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            cur = cons[i].cursor()
            barrier.wait()
            for op in orders[i]:
                t = time.perf_counter()
                _run_op(cur, op)
                times[i].append(time.perf_counter() - t)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    st0 = _ltx_stats(ctx, cons[0])
    s0 = ctx.stats()
    barrier.wait()
    w0 = time.perf_counter()
    cap = float(ctx.params.get("thread_cap_s", 300))
    for t in threads:
        t.join(max(0.0, cap - (time.perf_counter() - w0)))
    wall = time.perf_counter() - w0
    if any(t.is_alive() for t in threads) or errors:
        raise RuntimeError(f"threads: {sum(t.is_alive() for t in threads)} not done after "
                           f"{wall:.0f}s; errors: {errors[:3]!r}")
    out = _phase_metrics(ctx, phase, [x for ts in times for x in ts], wall, s0, st0,
                         _ltx_stats(ctx, cons[0]), None)
    out[f"{phase}.lookups_per_s"] = sum(len(ts) for ts in times) / wall
    out["threads"] = n
    for c in cons:
        c.close()
    return out
