"""EXPERIMENT: which store for the host's shared cache directory (issue 18 item 1).

    pip install --target /tmp/hc-bench diskcache lmdb    # candidates, outside the venv
    PYTHONPATH=/tmp/hc-bench:src python bench/experiments/disk_cache_stores.py [--n 2000]

Candidates: python-diskcache (SQLite index + files), LMDB (mmap B-tree, one writer at a time), and
plain files (one file per entry: header + payload written to a temp name, renamed into place;
what ltxvfs.host.frames does). For each: the import + open cost in a fresh process, put/get
latency of 4 KiB frames and of 1 MB / 8 MB blobs, 4 processes writing the same key at once (a
barrier per round; is every read a valid value?), and a writer killed with SIGKILL mid-write
(does the store still open, and is every entry whole?). Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

STORES = ("files", "diskcache", "lmdb")


# --- the three stores behind one tiny interface: put(key, bytes), get(key) -> bytes | None ---

class Files:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)

    def _name(self, key: str) -> str:
        return os.path.join(self.path, key)

    def put(self, key: str, value: bytes) -> None:
        head = b"LTXVFSC1" + len(value).to_bytes(8, "little") + \
            zlib.crc32(value).to_bytes(4, "little")
        tmp = f"{self._name(key)}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, head + value) if len(value) < 65536 else \
                (os.write(fd, head), os.write(fd, value))
        finally:
            os.close(fd)
        os.replace(tmp, self._name(key))

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._name(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        n = int.from_bytes(data[8:16], "little")
        value = data[20:]
        if data[:8] != b"LTXVFSC1" or len(value) != n or \
                zlib.crc32(value) != int.from_bytes(data[16:20], "little"):
            return None
        return value

    def close(self) -> None:
        pass


class DiskCache:
    def __init__(self, path: str) -> None:
        import diskcache
        self.c = diskcache.Cache(path, size_limit=1 << 30)

    def put(self, key: str, value: bytes) -> None:
        self.c.set(key, value)

    def get(self, key: str) -> bytes | None:
        return self.c.get(key)

    def close(self) -> None:
        self.c.close()


class Lmdb:
    def __init__(self, path: str) -> None:
        import lmdb
        self.env = lmdb.open(path, map_size=1 << 30, max_readers=256)

    def put(self, key: str, value: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), value)

    def get(self, key: str) -> bytes | None:
        with self.env.begin() as txn:
            v = txn.get(key.encode())
            return bytes(v) if v is not None else None

    def close(self) -> None:
        self.env.close()


def make(kind: str, path: str):
    return {"files": Files, "diskcache": DiskCache, "lmdb": Lmdb}[kind](path)


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def open_cost(kind: str, path: str) -> None:
    code = (f"import time,sys; t=time.perf_counter(); sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import disk_cache_stores as m; s=m.make({kind!r}, {path!r}); s.get('x'); "
            "print((time.perf_counter()-t)*1000)")
    runs = [float(subprocess.check_output([sys.executable, "-c", code]).strip()) for _ in range(3)]
    emit(store=kind, what="import+open+1 get, fresh process (ms, best of 3)", value=round(min(runs), 1))


def latency(kind: str, path: str, n: int) -> None:
    s = make(kind, path)
    frame = os.urandom(4096)
    t = time.perf_counter()
    for i in range(n):
        s.put(f"f{i}", frame)
    put = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for i in range(n):
        assert s.get(f"f{i}") == frame
    get = (time.perf_counter() - t) / n * 1e6
    emit(store=kind, what="4 KiB put / get (us each)", put=round(put, 1), get=round(get, 1))
    for mb in (1, 8):
        blob = os.urandom(mb << 20)
        reps = 5
        t = time.perf_counter()
        for i in range(reps):
            s.put(f"b{mb}-{i}", blob)
        put = (time.perf_counter() - t) / reps * 1e3
        t = time.perf_counter()
        for i in range(reps):
            assert s.get(f"b{mb}-{i}") == blob
        get = (time.perf_counter() - t) / reps * 1e3
        emit(store=kind, what=f"{mb} MB put / get (ms each)", put=round(put, 2), get=round(get, 2))
    s.close()


def _racer(kind: str, path: str, barrier, rounds: int, me: int, bad) -> None:
    s = make(kind, path)
    for r in range(rounds):
        value = bytes([me]) * 4096 + r.to_bytes(4, "little")
        barrier.wait(30)
        s.put("same", value)
        got = s.get("same")
        if got is None or len(got) != 4100 or got[:4096] != bytes([got[0]]) * 4096:
            with bad.get_lock():
                bad.value += 1
    s.close()


def race(kind: str, path: str, rounds: int = 200, procs: int = 4) -> None:
    ctx = mp.get_context("spawn")
    barrier, bad = ctx.Barrier(procs), ctx.Value("i", 0)
    make(kind, path).close()
    t = time.perf_counter()
    ps = [ctx.Process(target=_racer, args=(kind, path, barrier, rounds, i, bad)) for i in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    emit(store=kind, what=f"{procs} processes x {rounds} rounds writing one key at once",
         bad_reads=bad.value, exitcodes=[p.exitcode for p in ps],
         seconds=round(time.perf_counter() - t, 2))


def _writer(kind: str, path: str) -> None:
    s = make(kind, path)
    blob = os.urandom(4 << 20)
    i = 0
    while True:
        s.put(f"k{i % 50}", blob[: (i * 7919) % len(blob) + 1])
        i += 1


def killed(kind: str, path: str) -> None:
    ctx = mp.get_context("spawn")
    bad = whole = 0
    for _ in range(5):
        p = ctx.Process(target=_writer, args=(kind, path))
        p.start()
        time.sleep(0.4)  # let it get into its write loop (a bench, not a test)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        s = make(kind, path)
        for i in range(50):
            v = s.get(f"k{i}")
            if v is not None:
                whole += 1
                if not (1 <= len(v) <= 4 << 20):
                    bad += 1
        s.close()
    leftovers = [n for n in os.listdir(path) if n.endswith(".tmp")] if kind == "files" else []
    emit(store=kind, what="SIGKILL mid-write x5: store opens; entries read", whole=whole,
         bad=bad, tmp_files_left=len(leftovers))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--stores", default=",".join(STORES))
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="dcstores-")
    try:
        for kind in args.stores.split(","):
            base = os.path.join(root, kind)
            os.makedirs(base)
            open_cost(kind, os.path.join(base, "open"))
            latency(kind, os.path.join(base, "lat"), args.n)
            race(kind, os.path.join(base, "race"))
            killed(kind, os.path.join(base, "kill"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
