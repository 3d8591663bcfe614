"""MEASURE: the compact page index (ltxvfs.index) at 1M and 10M pages. Not a test.

    python bench/index_bench.py decode [--pages 1000000 10000000]
    python bench/index_bench.py open --pages 1000000 [--latency-ms 0 20] [--src DIR ...]

``decode``: a synthetic snapshot page index (varints written with ``ltx.encode_page_index``, ~2.3
KiB frames, across the lock page), no storage: time to decode it (numpy and pure Python), bytes per
page held by the state's index (tracemalloc), and the time to apply a one-page L0 file.

``open``: a synthetic file:// replica (``ltx/9/<min>-<max>.ltx``, written once into --data-dir
with the package's own LTX encoder): the pages of a small real SQLite database, then zero pages up
to --pages (tiny compressed frames, so the index is ~10 bytes per page of a small file). Each run
is a fresh process: import ltxvfs, then time open -> first row of a point lookup, and the RSS
growth over it. ``--latency-ms 20`` sleeps 20 ms in every storage request of the file client
(a GET, a LIST of one level, or a listing of the whole replica, which S3 answers in one LIST),
standing in for S3 at that latency. ``--src`` runs the same with another source tree
(e.g. /work/main/src, the dict index) for comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from ltxvfs import ltx  # noqa: E402
from ltxvfs.index import decode as ix  # noqa: E402
from ltxvfs.pages import DatabaseState, FileIndex  # noqa: E402
from ltxvfs.storage.base import FileInfo  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def synthetic_index(n: int, page_size: int = 4096) -> tuple[bytes, int]:
    """The tail of a snapshot (end marker, index, trailer) with ``n`` pages, and the file size."""
    lock = ltx.lock_pgno(page_size)
    rnd = random.Random(1)
    parts, off, p, batch = [], ltx.HEADER_SIZE, 0, []
    for _ in range(n):
        p += 1
        if p == lock:
            p += 1
        size = rnd.randrange(2000, 2600)
        batch.append((p, off, size))
        off += size
        if len(batch) == 100_000:
            parts.append(ltx.encode_page_index(batch)[:-9])
            batch = []
    parts.append(ltx.encode_page_index(batch)[:-9] if batch else b"")
    body = b"".join(parts) + b"\x00"
    tail = bytes(6) + body + ltx.format.U64.pack(len(body)) + bytes(16)
    return tail, off + len(tail)


def decode(pages: list[int]) -> None:
    for n in pages:
        t = time.perf_counter()
        tail, size = synthetic_index(n)
        print(f"{n:>10,} pages: index {len(tail) / 1e6:.1f} MB (generated in "
              f"{time.perf_counter() - t:.1f} s)")
        info = FileInfo(9, 1, 1, size, T0)
        for label, enabled in (("numpy", True), ("pure Python", False)):
            if not enabled and n > 2_000_000:
                print(f"  {label:12} skipped (~1 s and ~50 MB of columns per million pages)")
                continue
            ix.numpy_enabled = enabled
            if enabled:
                import numpy  # noqa: F401  (its import is timed apart)
            times = []
            for _ in range(3):
                gc.collect()
                t = time.perf_counter()
                fp = ix.parse_file_pages(tail, size)
                times.append(time.perf_counter() - t)
                del fp
            dt = sorted(times)[1]
            gc.collect()
            tracemalloc.start()
            fp = ix.parse_file_pages(tail, size)
            peak = tracemalloc.get_traced_memory()[1]
            state = DatabaseState(4096, n + 1, 1, T0, {}).applying([FileIndex(info, fp, None)],
                                                                   n + 1)
            del fp
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            t = time.perf_counter()
            nxt = state.applying([FileIndex(FileInfo(0, 2, 2, 5000, T0), {777: (100, 60)}, None)],
                                 n + 1)
            poll = time.perf_counter() - t
            assert nxt.index.layers[0][0] is state.index.layers[0][0]
            t = time.perf_counter()
            for q in range(1, n, max(1, n // 100_000)):
                nxt.index.get(q)
            per_get = (time.perf_counter() - t) / len(range(1, n, max(1, n // 100_000)))
            print(f"  {label:12} decode {dt * 1e3:7.1f} ms   held {held / n:5.1f} B/page   "
                  f"decode peak {peak / 1e6:6.1f} MB   1-page poll {poll * 1e6:6.0f} us   "
                  f"get {per_get * 1e9:4.0f} ns")
            del state, nxt
    ix.numpy_enabled = True
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); "
                          "import numpy; print(time.perf_counter() - t)"],
                         capture_output=True, text=True, check=True)
    print(f"import numpy (fresh process): {float(out.stdout) * 1e3:.0f} ms")


# --- open -> first row -----------------------------------------------------------------------


def make_replica(root: Path, n: int, rows: int = 5000) -> Path:
    """A file:// replica with one snapshot of ``n`` pages (a real database of ``rows`` rows of
    ~210 bytes first; ``n`` 0: that database alone)."""
    name = f"replica-{n}" if rows == 5000 else f"replica-{n}-{rows}"
    done = root / name / "done"
    if done.exists():
        return done.parent
    from ltxvfs.ltx import Encoder, Header
    db = root / "small.db"
    db.unlink(missing_ok=True)
    con = sqlite3.connect(db)
    con.execute("PRAGMA page_size = 4096")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t(v) VALUES (?)",
                    [(f"row {i} " + os.urandom(100).hex(),) for i in range(rows)])
    con.commit()
    con.close()
    data = db.read_bytes()
    real = len(data) // 4096
    n = max(n, real)
    lock = ltx.lock_pgno(4096)
    level = root / name / "ltx" / "9"
    level.mkdir(parents=True, exist_ok=True)
    path = level / "0000000000000001-0000000000000001.ltx"
    t = time.perf_counter()
    zero = bytes(4096)
    with open(path, "wb") as f:
        enc = Encoder(f, Header(page_size=4096, commit=n, min_txid=1, max_txid=1,
                                timestamp=int(time.time() * 1000)))
        for p in range(1, n + 1):
            if p != lock:
                enc.write_page(p, data[(p - 1) * 4096:p * 4096] if p <= real else zero)
        enc.close()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB, {n:,} pages) in "
          f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
    done.touch()
    return done.parent


CHILD = r"""
import json, os, sys, time
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
import apsw, ltxvfs
from urllib.parse import quote
latency = float(sys.argv[2]) / 1000
if latency:
    from ltxvfs.storage.file import FileReplicaClient
    def slow(f):
        def call(self, *a, **k):
            time.sleep(latency)
            return f(self, *a, **k)
        return call
    # S3 lists a whole replica in one request: list_all is one request, its levels none.
    lister = FileReplicaClient.list_files
    def list_all(self, *, use_metadata=False):
        time.sleep(latency)
        return {lvl: lister(self, lvl, use_metadata=use_metadata) for lvl in range(10)}
    FileReplicaClient.read = slow(FileReplicaClient.read)
    FileReplicaClient.list_files = slow(lister)
    FileReplicaClient.list_all = list_all
ltxvfs.register()
uri = "file:db?vfs=litestream&replica_url=" + quote(sys.argv[1], safe="")
r0 = rss()
t = time.perf_counter()
con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
row = con.execute("SELECT v FROM t WHERE id = 4321").fetchall()
dt = time.perf_counter() - t
r1 = rss()
assert row and row[0][0].startswith("row 4320 "), row
print(json.dumps({"seconds": dt, "rss_mb": (r1 - r0) / 2**20,
                  "numpy": "numpy" in sys.modules}))
"""


def open_first_row(args: argparse.Namespace) -> None:
    for n in args.pages:
        replica = make_replica(args.data_dir, n, args.rows)
        for src in args.src:
            for latency in args.latency_ms:
                runs = []
                for _ in range(args.repeat):
                    env = {**os.environ, "PYTHONPATH": src}
                    out = subprocess.run([sys.executable, "-c", CHILD, replica.as_uri(),
                                          str(latency)], env=env, capture_output=True, text=True,
                                         timeout=600)
                    if out.returncode:
                        raise SystemExit(out.stderr)
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                runs.sort(key=lambda r: r["seconds"])
                med = runs[len(runs) // 2]
                print(f"{n:>10,} pages  {args.rows:>7} rows  {src:28}  {latency:4.0f} ms/request"
                      f"  open -> first row {med['seconds']:.3f} s (min {runs[0]['seconds']:.3f})  RSS +"
                      f"{med['rss_mb']:.0f} MiB  numpy={'yes' if med['numpy'] else 'no'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["decode", "open"])
    ap.add_argument("--pages", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--src", nargs="+", default=[str(HERE.parent / "src")])
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/ltxvfs-index-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=5000,
                    help="rows of the real database at the start of the snapshot (open)")
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.what == "decode":
        decode(args.pages)
    else:
        open_first_row(args)


if __name__ == "__main__":
    main()
