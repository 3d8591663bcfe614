"""Cache decoded pages or compressed frames? (issue 13, item 2) — one measurement.

    python bench/experiments/compressed_cache.py [--rows 20000]

Builds the bench dataset's table (bench/dataset.py: ~250 B rows of random text) and, for contrast,
a table of typical application rows (repetitive text, small integers), encodes each database as
one LTX snapshot with our encoder, and reports the mean frame size against the page size (how many
more pages a byte budget would hold compressed) and the cost of one cache hit either way: a dict
lookup + slice (decoded) against a dict lookup + ``lz4.block.decompress`` (compressed).
"""

from __future__ import annotations

import argparse
import io
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lz4.block
from dataset import _payload  # the bench dataset's rows

from ltxvfs.ltx import Encoder, Header, decode_file
from ltxvfs.publish import database_pages


def build(path: Path, rows: int, kind: str) -> None:
    rng = random.Random(1)
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size=4096")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, name TEXT, payload TEXT)")
    words = ["alpha", "beta", "gamma", "delta", "order", "shipped", "pending", "customer", "paris",
             "london", "berlin", "invoice", "refund", "premium", "basic"]
    with con:
        for i in range(1, rows + 1):
            if kind == "bench":
                row = (i, rng.randrange(1 << 40), f"name-{i:09d}", _payload(rng))
            else:
                row = (i, rng.randrange(100), f"user{i}@example.com",
                       " ".join(rng.choice(words) for _ in range(25)))
            con.execute("INSERT INTO t VALUES (?, ?, ?, ?)", row)
    con.execute("CREATE INDEX t_k ON t(k)")
    con.close()


def measure(path: Path) -> dict:
    pages = dict(database_pages(str(path)))
    buf = io.BytesIO()
    enc = Encoder(buf, Header(page_size=4096, commit=max(pages), min_txid=1, max_txid=1,
                              timestamp=0))
    for pgno in sorted(pages):
        enc.write_page(pgno, pages[pgno])
    enc.close()
    dec = decode_file(buf.getvalue())
    sizes = [size for _, size in dec.index.values()]
    frames = {}
    raw = buf.getvalue()
    for pgno, (off, size) in list(dec.index.items())[:2000]:
        frames[pgno] = raw[off + 10:off + size]  # payload after the 6-byte header + 4-byte size
    decoded = {p: pages[p] for p in frames}
    keys = list(frames)

    def per_hit(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(5):
            for k in keys:
                fn(k)
        return (time.perf_counter() - t0) / (5 * len(keys)) * 1e6

    hit_decoded = per_hit(lambda k: decoded.get(k)[0:4096])
    hit_compressed = per_hit(lambda k: lz4.block.decompress(frames.get(k), uncompressed_size=4096))
    return {"pages": len(pages), "mean_frame": statistics.mean(sizes),
            "pages_per_budget_x": 4096 / statistics.mean(sizes),
            "hit_decoded_us": hit_decoded, "hit_compressed_us": hit_compressed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for kind in ("bench", "app"):
            path = Path(d) / f"{kind}.db"
            build(path, args.rows, kind)
            m = measure(path)
            print(f"{kind:6s} pages={m['pages']:6d} mean frame={m['mean_frame']:7.0f} B "
                  f"({m['pages_per_budget_x']:.2f}x pages per byte budget) "
                  f"hit: decoded {m['hit_decoded_us']:.2f} us, compressed {m['hit_compressed_us']:.2f} us")


if __name__ == "__main__":
    main()
