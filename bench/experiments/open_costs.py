"""EXPERIMENT: what a cold ltxvfs open pays for, piece by piece, through the latency proxy.

    python bench/experiments/open_costs.py [--dataset small] [--latency-ms 20]

Uses the stand-in and datasets of bench/run.py (run it once first). Each measurement runs in a
fresh process where it matters (imports, client creation). Prints one line per measurement:

* ``import boto3`` and ``import ltxvfs; ltxvfs.register()`` in a fresh interpreter;
* creating the S3 client (boto3 session + client: loads the service model) in a fresh process;
* the restore-plan listing: 10 LISTs (one per level) from 10 threads, as ltxvfs does now, vs
  one LIST of the whole prefix (all levels in one response: ``<prefix>/`` has < 1000 keys);
* the page index of the last plan file: tail GET then header GET (sequential, as now) vs both
  at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ACCESS_KEY, PYTHON, SECRET_KEY, child_env, start_proxy, start_stub


def fresh(code: str, env: dict) -> float:
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def med(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="small")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/ltxvfs-bench"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    m = json.loads((args.data_dir / "datasets" / args.dataset / "manifest.json").read_text())
    stub = start_stub(args.data_dir / "s3", args.data_dir / "logs" / "s3stub-exp.log")
    proxy = start_proxy(stub.url, args.latency_ms, args.data_dir / "logs" / "proxy-exp.log")
    env = child_env()
    try:
        t = "import time; t=time.perf_counter(); {}; print(time.perf_counter()-t)"
        r = args.repeat
        print(f"import boto3 (fresh process)           "
              f"{med([fresh(t.format('import boto3'), env) for _ in range(r)]) * 1e3:7.1f} ms")
        reg = t.format("import ltxvfs; ltxvfs.register()")
        print(f"import ltxvfs; register()              "
              f"{med([fresh(reg, env) for _ in range(r)]) * 1e3:7.1f} ms")
        mk = ("import boto3; t=__import__('time').perf_counter(); "
              f"boto3.session.Session().client('s3', endpoint_url='{proxy.url}', "
              "region_name='us-east-1'); print(__import__('time').perf_counter()-t)")
        print(f"boto3 session + S3 client (after import) "
              f"{med([fresh(mk, env) for _ in range(r)]) * 1e3:5.1f} ms")

        import boto3
        from botocore.config import Config
        s3 = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          config=Config(max_pool_connections=16))
        b, prefix = m["bucket"], m["prefix"]
        s3.list_objects_v2(Bucket=b, Prefix=prefix + "/0000/")  # warm the connection pool
        with ThreadPoolExecutor(10) as pool:
            list(pool.map(lambda lvl: s3.list_objects_v2(Bucket=b, Prefix=f"{prefix}/{lvl:04x}/"),
                          range(10)))  # warm 10 pooled connections
            ten, one = [], []
            for _ in range(r):
                t0 = time.perf_counter()
                list(pool.map(lambda lvl: s3.list_objects_v2(
                    Bucket=b, Prefix=f"{prefix}/{lvl:04x}/"), range(10)))
                ten.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s3.list_objects_v2(Bucket=b, Prefix=f"{prefix}/")
                one.append(time.perf_counter() - t0)
        print(f"10 LISTs from 10 threads (warm client) {med(ten) * 1e3:7.1f} ms")
        print(f"1 LIST of the whole prefix             {med(one) * 1e3:7.1f} ms")

        last = [f for f in m["ltx_files"] if f["level"] == 1][-1]
        key = f"{prefix}/0001/{last['min']:016x}-{last['max']:016x}.ltx"
        size = last["size"]

        def get(rng: str) -> bytes:
            return s3.get_object(Bucket=b, Key=key, Range=rng)["Body"].read()
        tail = f"bytes={max(0, size - 32768)}-{size - 1}"
        seq, par = [], []
        with ThreadPoolExecutor(2) as pool:
            for _ in range(r):
                t0 = time.perf_counter()
                get(tail)
                get("bytes=0-99")
                seq.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(pool.map(get, [tail, "bytes=0-99"]))
                par.append(time.perf_counter() - t0)
        print(f"index tail, then header (sequential)   {med(seq) * 1e3:7.1f} ms")
        print(f"index tail and header (parallel)       {med(par) * 1e3:7.1f} ms")
    finally:
        proxy.stop()
        stub.stop()


if __name__ == "__main__":
    main()
