"""The child side of ``--suite large`` (bench/large.py): workload ``large`` of bench/child.py.

Phases ``read``, ``poll`` and ``hydrate`` (see bench/large.py). Nothing here imports ltxvfs: the
Go child's RSS must not include it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import urllib.parse
import urllib.request
from pathlib import Path

from common import stats_delta

BUCKET = "bench"
LOOKUP = "SELECT substr(v, 1, 24) FROM t WHERE id = ?"


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def _check(cur, rowid: int, want: str) -> float:
    """Look ``rowid`` up; its blob must start with ``want``. Returns seconds."""
    t0 = time.perf_counter()
    rows = cur.execute(LOOKUP, (rowid,)).fetchall()
    dt_s = time.perf_counter() - t0
    got = bytes(rows[0][0]) if rows else b""
    if not got.startswith(want.encode()):
        raise AssertionError(f"row {rowid}: read {got[:20]!r}, expected {want!r}")
    return dt_s


def wl_large(ctx) -> dict:
    phase = ctx.params["phase"]
    return {"read": _read, "poll": _poll, "hydrate": _hydrate}[phase](ctx)


def _read(ctx) -> dict:
    p = ctx.params
    out: dict = {}
    st0 = proc_status()
    s0 = ctx.stats()
    t0 = time.perf_counter()
    con = ctx.system.connect()
    t1 = time.perf_counter()
    s_open = ctx.stats()
    cur = con.cursor()
    first_s = _check(cur, p["first"][0], p["first"][1])
    st1 = proc_status()
    s1 = ctx.stats()
    out.update(open_s=t1 - t0, first_row_s=(t1 - t0) + first_s, first_lookup_s=first_s,
               rss_before_kb=st0["VmRSS"], rss_after_kb=st1["VmRSS"], hwm_after_kb=st1["VmHWM"],
               rss_growth_kb=st1["VmRSS"] - st0["VmRSS"],
               peak_growth_kb=st1["VmHWM"] - st0["VmRSS"])
    out["bytes_per_page"] = out["rss_growth_kb"] * 1024 / p["pages"]
    if s0 is not None:
        d, d_open = stats_delta(s0, s1), stats_delta(s0, s_open)
        out.update(requests=d["requests"], req_counts=d["counts"], bytes=d["bytes_down"],
                   requests_open=d_open["requests"], bytes_open=d_open["bytes_down"])
    high_s = _check(cur, p["high"][0], p["high"][1])
    s2 = ctx.stats()
    times = [_check(cur, r, want) for r, want in p["randoms"]]
    s3 = ctx.stats()
    st2 = proc_status()
    times_sorted = sorted(times)
    out.update(high_ms=high_s * 1e3, rand_median_ms=statistics.median(times) * 1e3,
               rand_max_ms=times_sorted[-1] * 1e3, rand_n=len(times),
               rss_end_kb=st2["VmRSS"], hwm_end_kb=st2["VmHWM"])
    if s0 is not None:
        out["high_requests"] = stats_delta(s1, s2)["requests"]
        out["rand_requests"] = stats_delta(s2, s3)["requests"] / max(1, len(times))
    if p.get("travel") and ctx.system.name != "local":
        s4 = ctx.stats()
        t = time.perf_counter()
        con.execute(f"PRAGMA litestream_time = '{p['travel']['time']}'").fetchall()
        tt = [_check(cur, r, want) for r, want in p["travel"]["rows"]]
        out["travel_s"] = time.perf_counter() - t
        out["travel_lookup_ms"] = statistics.median(tt) * 1e3
        out["travel_txid"] = con.execute("PRAGMA litestream_txid").fetchall()[0][0]
        if s4 is not None:
            d = stats_delta(s4, ctx.stats())
            out.update(travel_requests=d["requests"], travel_bytes=d["bytes_down"],
                       travel_req_counts=d["counts"])
        out["hwm_travel_kb"] = proc_status()["VmHWM"]
    con.close()
    # Reconnect in the same process (a connection per request): open + a random lookup again.
    s5 = ctx.stats()
    t = time.perf_counter()
    con = ctx.system.connect()
    _check(con.cursor(), p["randoms"][0][0], p["randoms"][0][1])
    out["reopen_s"] = time.perf_counter() - t
    if s5 is not None:
        out["reopen_requests"] = ctx.delta(s5)["requests"]
    out["hwm_end_kb"] = proc_status()["VmHWM"]
    con.close()
    return out


def _append_poll_file(ctx) -> None:
    p = ctx.params
    src = Path(p["poll_file"])
    if p["transport"] == "s3":
        with open(src, "rb") as f:
            body = f.read()
        ms = int.from_bytes(body[32:40], "big")
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))
        key = f"{ctx.spec['replica_prefix']}/0000/{src.name}"
        req = urllib.request.Request(f"{ctx.spec['stub']}/{BUCKET}/{urllib.parse.quote(key)}",
                                     data=body, method="PUT",
                                     headers={"x-amz-meta-litestream-timestamp": ts,
                                              "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
    else:
        dst = Path(p["replica_dir"]) / "ltx" / "0" / src.name
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # appears at once, as Litestream's file backend does it


def _poll(ctx) -> dict:
    p = ctx.params
    con = ctx.system.connect()
    cur = con.cursor()
    row, old, new = p["poll_row"]
    t0 = time.perf_counter()
    _check(cur, row, old)
    open_first_s = time.perf_counter() - t0
    time.sleep(ctx.rng.uniform(0.0, 1.0))  # a random phase of the pollers' 1 s interval
    s0 = ctx.stats()
    _append_poll_file(ctx)
    t_appear = time.perf_counter()
    seen = None
    cap = float(p.get("poll_cap_s", 30))
    checks = 0
    for _ in range(int(cap / 0.002) + 10):
        got = bytes(cur.execute(LOOKUP, (row,)).fetchall()[0][0])
        checks += 1
        if got.startswith(new.encode()):
            seen = time.perf_counter() - t_appear
            break
        if not got.startswith(old.encode()):
            raise AssertionError(f"row {row}: read {got[:20]!r} while polling")
        if time.perf_counter() - t_appear > cap:
            break
        time.sleep(0.002)
    out = {"open_first_s": open_first_s, "visible_s": seen, "checks": checks,
           "completed": seen is not None}
    if s0 is not None:
        d = ctx.delta(s0)
        out.update(requests=d["requests"], req_counts=d["counts"], bytes=d["bytes_down"])
    if seen is None:
        out["incomplete"] = True
    con.close()
    return out


def _hydrate(ctx) -> dict:
    p = ctx.params
    cap = float(p.get("hydration_cap_s", 600))
    path = Path(ctx.spec["tmpdir"]) / "hydrated.db"
    s0 = ctx.stats()
    st0 = proc_status()
    t0 = time.perf_counter()
    con = (ctx.system.connect(hydration_path=str(path)) if ctx.system.name == "ltxvfs"
           else ctx.system.connect())
    cur = con.cursor()
    _check(cur, p["first"][0], p["first"][1])
    first_s = time.perf_counter() - t0
    done, progress = False, None
    for _ in range(int(cap / 0.05) + 10):
        rows = con.execute("PRAGMA litestream_hydration_progress").fetchall()
        progress = rows[0][0] if rows and rows[0] else None
        try:
            if progress is not None and float(progress) >= 100.0:
                done = True
                break
        except (TypeError, ValueError):
            pass
        if time.perf_counter() - t0 > cap:
            break
        time.sleep(0.05)
    t1 = time.perf_counter()
    _check(cur, p["high"][0], p["high"][1])
    st1 = proc_status()
    out = {"time_s": t1 - t0, "first_row_s": first_s, "completed": done,
           "progress_last": str(progress), "hwm_kb": st1["VmHWM"],
           "rss_growth_kb": st1["VmRSS"] - st0["VmRSS"],
           "file_bytes": path.stat().st_size if path.exists() else 0}
    if s0 is not None:
        d = ctx.delta(s0)
        out.update(requests=d["requests"], req_counts=d["counts"], bytes=d["bytes_down"])
    if not done:
        out["incomplete"] = True
    con.close()
    return out
