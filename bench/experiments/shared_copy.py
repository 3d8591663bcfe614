"""EXPERIMENT: one hydrated copy per host — what N processes download and what a read costs.

    python bench/experiments/shared_copy.py [--processes 8] [--mb 20] [--reads 200000]

Builds a ``file://`` replica of ``--mb`` MB of random rows (one snapshot LTX file), then:

* **N processes** (fork) open it with the same ``hydration_path``; prints the time until every
  one says ``100.0``, which one built it, the bytes each downloaded for hydration, their sum
  against the database size and against one full build (the newest frame of every page), and the
  files in the copy's directory; then each process scans the table once and says how many pages
  came from the copy.
* **per-page read cost** in one process: plain ``os.pread`` of a 4 KiB page, the builder's read
  (``Hydrator.read_page`` of the state it marked), and a reader's (``Hydrator.read_page`` through
  the shared record's seqlock: unpack, compare, pread, re-check).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote


def make_replica(root: Path, mb: int) -> tuple[str, Path]:
    from ltxvfs.publish import database_pages, publish_pages
    from ltxvfs.storage import open_replica

    db = root / "src.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    con.executemany("INSERT INTO t(b) VALUES (randomblob(3000))", [()] * (mb * 1024 * 1024 // 3000))
    con.commit()
    con.close()
    url = (root / "replica").as_uri()
    pages = sorted(database_pages(str(db)))
    with open_replica(url) as client:
        publish_pages(client, 0, 1, 1, page_size=4096, commit=db.stat().st_size // 4096,
                      pages=pages)
    return url, db


def worker(conn, uri: str) -> None:
    import apsw

    import ltxvfs

    name = f"litestream-b{os.getpid()}"
    ltxvfs.register(name=name)
    uri = uri.replace("vfs=litestream", f"vfs={name}")
    con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    con.execute("SELECT count(*) FROM sqlite_master").fetchall()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            s = json.loads(con.execute("PRAGMA litestream_stats").fetchall()[0][0])
            conn.send(s)
        elif cmd == "scan":
            c2 = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
            c2.execute("SELECT sum(length(b)) FROM t").fetchall()
            c2.close()
            conn.send("ok")
        else:
            con.close()
            conn.send("bye")
            return


def processes(url: str, db: Path, root: Path, n: int) -> None:
    from ltxvfs.pages import state_at
    from ltxvfs.storage import open_replica

    with open_replica(url) as client, ThreadPoolExecutor(4) as pool:
        full = sum(ref[2] for _, ref in state_at(client, pool).index.items())
    target = root / "copy" / "copy.db"
    uri = (f"file:db?vfs=litestream&replica_url={quote(url, safe='')}&poll_interval=1s"
           f"&hydration_path={quote(str(target), safe='')}")
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    pipes, procs = [], []
    for _ in range(n):
        a, b = ctx.Pipe()
        p = ctx.Process(target=worker, args=(b, uri), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    for a in pipes:
        assert a.recv() == "ready"

    def stats():
        out = []
        for a in pipes:
            a.send("stats")
            out.append(a.recv())
        return out

    while not all(s["hydration"] == "100.0" for s in stats()):
        time.sleep(0.05)
    took = time.perf_counter() - t0
    st = stats()
    fetched = [s["hydration_fetched_bytes"] for s in st]
    size = db.stat().st_size
    print(f"{n} processes, database {size / 1e6:.1f} MB, one full build downloads "
          f"{full / 1e6:.1f} MB")
    print(f"  all at 100.0 after {took:.2f} s; roles {sorted(s['hydration_role'] for s in st)}")
    print(f"  hydration bytes per process {fetched}; total {sum(fetched) / 1e6:.2f} MB = "
          f"{sum(fetched) / size:.3f} x database, {sum(fetched) / full:.3f} x one build")
    print(f"  files in the copy's directory: {sorted(os.listdir(target.parent))}")
    before = [s["hydration_file_reads"] for s in st]
    for a in pipes:
        a.send("scan")
        assert a.recv() == "ok"
    after = [s["hydration_file_reads"] for s in stats()]
    print(f"  one table scan each: pages from the copy per process "
          f"{[x - y for x, y in zip(after, before, strict=True)]}")
    for a, p in zip(pipes, procs, strict=True):
        a.send("close")
        a.recv()
        p.join(30)


def read_cost(url: str, root: Path, reads: int) -> None:
    from ltxvfs import hydrate
    from ltxvfs.follow import Replica
    from ltxvfs.pages import PageStore, state_at
    from ltxvfs.storage import open_replica

    client = open_replica(url)
    io = ThreadPoolExecutor(4)
    store = PageStore(client, 64 << 20)
    replica = Replica(client, store, io, state_at(client, io, store), 3600.0)
    path = root / "cost" / "copy.db"
    builder = hydrate.Hydrator(replica, path, False, ThreadPoolExecutor(8))
    builder.start()
    while builder.progress() != "100.0":
        time.sleep(0.02)
    reader = hydrate.Hydrator(replica, path, False, ThreadPoolExecutor(1))
    reader.start()
    state = replica.state
    assert reader.role == "reader" and reader.read_page(state, 2) == builder.read_page(state, 2)
    pgnos = [2 + (i * 7919) % (state.commit - 2) for i in range(reads)]
    fd = os.open(path, os.O_RDONLY)

    def timed(label, fn):
        t = time.perf_counter()
        for p in pgnos:
            fn(p)
        us = (time.perf_counter() - t) / reads * 1e6
        print(f"  {label}: {us:.2f} us per 4 KiB page")

    print(f"per-page read cost ({reads} reads, pages spread over the file, warm OS cache)")
    timed("os.pread", lambda p: os.pread(fd, 4096, (p - 1) * 4096))
    timed("builder (its marked state)", lambda p: builder.read_page(state, p))
    timed("reader (shared record, seqlock)", lambda p: reader.read_page(state, p))
    os.close(fd)
    reader.close()
    builder.close()
    client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--mb", type=int, default=20)
    ap.add_argument("--reads", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url, db = make_replica(root, args.mb)
        processes(url, db, root, args.processes)
        read_cost(url, root, args.reads)


if __name__ == "__main__":
    main()
