"""EXPERIMENT: what ``cache_dir`` (the host's shared disk cache, issue 18 item 1) costs a cold
process and saves a restarted one, through the latency proxy.

    python bench/experiments/cache_dir_cost.py [--dataset small] [--latency-ms 20] [--repeat 3]

Uses the S3 stand-in and datasets of bench/run.py (run it once first). Each measurement is a
fresh process doing one workload: ``first_row`` (open -> one point lookup), ``lookups`` (open ->
200 random point lookups) and ``scan`` (open -> SELECT count(*) over the table, every leaf). Three
modes: ``off`` (no cache_dir), ``cold`` (an empty cache_dir: the overhead) and ``warm`` (the
cache_dir the cold run just filled: a restarted process). Prints median seconds and S3 requests
per mode and workload.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PYTHON, child_env, s3_url, start_proxy, start_stub

CHILD = r"""
import json, random, sys, time
from urllib.parse import quote
import apsw, ltxvfs
url, cache, workload, max_id = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ltxvfs.register()
u = f"file:bench.db?vfs=litestream&replica_url={quote(url, safe='')}&poll_interval=1h"
if cache:
    u += f"&cache_dir={quote(cache, safe='')}"
t0 = time.perf_counter()
con = apsw.Connection(u, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
rng = random.Random(7)
n = {"first_row": 1, "lookups": 200}.get(workload, 0)
for _ in range(n):
    con.execute("SELECT * FROM t WHERE id = ?", (rng.randint(1, max_id),)).fetchall()
if workload == "scan":
    con.execute("SELECT count(*), sum(length(payload)) FROM t").fetchall()
dt = time.perf_counter() - t0
s = ltxvfs.stats(con)
con.close()
disk = {k: v for k, v in s.items() if k.startswith("disk")}
print(json.dumps({"s": dt, "requests": s["requests"], "disk_hits": s["disk_hits"], "disk": disk}))
"""


def run(url: str, cache: str, workload: str, max_id: int, env: dict) -> dict:
    out = subprocess.run([PYTHON, "-c", CHILD, url, cache, workload, str(max_id)], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="small")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/ltxvfs-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workloads", default="first_row,lookups,scan")
    args = ap.parse_args()
    m = json.loads((args.data_dir / "datasets" / args.dataset / "manifest.json").read_text())
    stub = start_stub(args.data_dir / "s3", args.data_dir / "logs" / "s3stub-cachedir.log")
    proxy = start_proxy(stub.url, args.latency_ms, args.data_dir / "logs" / "proxy-cachedir.log")
    env = child_env()
    url = s3_url(proxy.url, m["bucket"], m["prefix"])
    max_id = m["facts"]["max_id"]
    try:
        for wl in args.workloads.split(","):
            res: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
            for _ in range(args.repeat):
                res["off"].append(run(url, "", wl, max_id, env))
                d = tempfile.mkdtemp(prefix="cachedir-")
                try:
                    res["cold"].append(run(url, d, wl, max_id, env))
                    res["warm"].append(run(url, d, wl, max_id, env))
                finally:
                    shutil.rmtree(d, ignore_errors=True)
            for mode, rs in res.items():
                rs.sort(key=lambda r: r["s"])
                med = rs[len(rs) // 2]
                print(f"{wl:10s} {mode:5s} {med['s'] * 1e3:8.1f} ms  GET {med['requests']['GET']:4d}"
                      f"  LIST {med['requests']['LIST']}  disk hits {med['disk_hits']}", flush=True)
    finally:
        proxy.stop()
        stub.stop()


if __name__ == "__main__":
    main()
