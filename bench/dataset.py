"""Benchmark databases, replicated by the real ``litestream replicate`` into the S3 stand-in.

A dataset is one WAL-mode SQLite primary with

    t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, name TEXT NOT NULL, payload TEXT NOT NULL)
    CREATE INDEX t_k ON t(k)

~250 bytes a row (payload: 150-250 random characters, no overflow pages), page size 4096, rows
inserted in ``id`` order so the table's leaf pages are contiguous, the index built afterwards.

Replication (litestream talks to the stand-in directly, not through the latency proxy):
bulk load, start ``litestream replicate`` (snapshot interval 1h: its first L9 snapshot comes ~1 s
after start, then no more), wait for the L9 snapshot, then 20 small update transactions each
synced through the control socket (L0 files), wait until L1 covers them, stop. A follower's
restore plan is then what it typically is in production: one large L9 snapshot plus a few small
files. ``local.db`` is ``litestream restore`` of the replica: the "local" system of the bench.

Datasets are cached under the data dir (manifest.json per dataset) and reused while the stand-in
root holds their objects; ``--rebuild`` forces a new build.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

from common import LITESTREAM_BIN, child_env, create_bucket, s3_url

#: Bump when the schema, the row generator or the replication recipe change.
RECIPE = 3
BUCKET = "bench"
ROW_BYTES = 250
PAGE_SIZE = 4096
SMALL_TXNS = 20


class BuildError(RuntimeError):
    pass


def _payload(rng: random.Random) -> str:
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789 ", k=rng.randint(150, 250)))


def make_primary(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    con = sqlite3.connect(str(path), isolation_level=None)
    con.execute(f"PRAGMA page_size={PAGE_SIZE}")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, name TEXT NOT NULL, "
                "payload TEXT NOT NULL)")
    batch = 20_000
    for start in range(1, rows + 1, batch):
        con.execute("BEGIN")
        con.executemany("INSERT INTO t VALUES (?,?,?,?)", (
            (i, rng.randrange(1 << 40), f"name-{i:09d}", _payload(rng))
            for i in range(start, min(start + batch, rows + 1))))
        con.execute("COMMIT")
    con.execute("CREATE INDEX t_k ON t(k)")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def _list_keys(endpoint: str, prefix: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    token = ""
    for _ in range(1000):
        q = {"list-type": "2", "prefix": prefix}
        if token:
            q["continuation-token"] = token
        with urllib.request.urlopen(f"{endpoint}/{BUCKET}?{urllib.parse.urlencode(q)}",
                                    timeout=30) as r:
            root = ET.fromstring(r.read())
        ns = {"s": root.tag.split("}")[0].strip("{")}
        for c in root.findall("s:Contents", ns):
            out.append((c.findtext("s:Key", "", ns), int(c.findtext("s:Size", "0", ns))))
        if root.findtext("s:IsTruncated", "false", ns) != "true":
            break
        token = root.findtext("s:NextContinuationToken", "", ns)
    return out


def ltx_files(endpoint: str, prefix: str) -> list[dict]:
    files = []
    for key, size in _list_keys(endpoint, prefix + "/"):
        rest = key[len(prefix) + 1:]
        if "/" not in rest or not rest.endswith(".ltx"):
            continue
        level, name = rest.split("/", 1)
        files.append({"level": int(level, 16), "min": int(name[:16], 16),
                      "max": int(name[17:33], 16), "size": size})
    return sorted(files, key=lambda f: (f["level"], f["min"], f["max"]))


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class Replicate:
    """``litestream replicate`` for one database and one S3 replica; control socket for syncs."""

    def __init__(self, db: Path, url: str, workdir: Path) -> None:
        self.db = db
        self.sockdir = Path(tempfile.mkdtemp(prefix="lsb-", dir="/tmp"))
        self.sock = self.sockdir / "ctl.sock"
        self.log = workdir / "litestream.log"
        cfg = {
            "socket": {"enabled": True, "path": str(self.sock)},
            "logging": {"level": "info"},
            "snapshot": {"interval": "1h", "retention": "24h"},
            "levels": [{"interval": "1s"}],
            "l0-retention": "1h",
            "l0-retention-check-interval": "10s",
            "shutdown-sync-timeout": "10s",
            "shutdown-sync-interval": "100ms",
            "dbs": [{"path": str(db), "monitor-interval": "100ms",
                     "checkpoint-interval": "1m", "min-checkpoint-page-count": 100000,
                     "replica": {"url": url, "sync-interval": "100ms"}}],
        }
        self.config = workdir / "litestream.yml"
        self.config.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([LITESTREAM_BIN, "replicate", "-config", str(self.config)],
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=child_env(),
                                         start_new_session=True)

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""

    def sync(self, timeout: float = 120.0) -> int:
        """POST /sync with wait (what ``litestream sync -wait`` does), retried until the daemon
        answers; returns the replicated TXID."""
        deadline = time.monotonic() + timeout
        last = ""
        for _ in range(int(timeout / 0.1) + 10):
            if self.proc.poll() is not None:
                raise BuildError(f"litestream exited rc={self.proc.returncode}\n{self.tail()}")
            if self.sock.exists():
                try:
                    c = _UnixHTTP(str(self.sock), timeout=timeout)
                    body = json.dumps({"path": str(self.db), "wait": True,
                                       "timeout": int(max(1, deadline - time.monotonic()))})
                    c.request("POST", "/sync", body=body,
                              headers={"Content-Type": "application/json"})
                    r = c.getresponse()
                    data = r.read()
                    c.close()
                    if r.status == 200:
                        return int(json.loads(data)["txid"])
                    last = f"{r.status} {data[:200]!r}"
                except (OSError, ValueError, KeyError) as e:
                    last = repr(e)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise BuildError(f"litestream sync failed: {last}\n{self.tail()}")

    def stop(self) -> None:
        p = self.proc
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        shutil.rmtree(self.sockdir, ignore_errors=True)


def _wait_level(endpoint: str, prefix: str, level: int, txid: int, timeout: float,
                rep: Replicate) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.25) + 10):
        if any(f["level"] == level and f["max"] >= txid for f in ltx_files(endpoint, prefix)):
            return
        if rep.proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    raise BuildError(f"no L{level} file reaching TXID {txid:x} after {timeout}s\n{rep.tail()}")


def db_facts(path: Path) -> dict:
    import apsw
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        facts = {
            "page_size": con.execute("PRAGMA page_size").fetchone()[0],
            "page_count": con.execute("PRAGMA page_count").fetchone()[0],
            "rows": con.execute("SELECT count(*) FROM t").fetchone()[0],
            "max_id": con.execute("SELECT max(id) FROM t").fetchone()[0],
        }
        try:
            for name, n in con.execute("SELECT name, count(*) FROM dbstat GROUP BY name"):
                facts[f"pages_{name}"] = n
        except apsw.SQLError:
            pass
        return facts
    finally:
        con.close()


def build(name: str, size_mb: int, data_dir: Path, stub_endpoint: str, *, seed: int = 1,
          rebuild: bool = False, log=print) -> dict:
    """Build (or reuse) dataset ``name`` of about ``size_mb`` MB; returns its manifest."""
    work = data_dir / "datasets" / name
    manifest_path = work / "manifest.json"
    prefix = f"{name}-r{RECIPE}"
    if manifest_path.exists() and not rebuild:
        m = json.loads(manifest_path.read_text())
        have = {(f["level"], f["min"], f["max"]) for f in ltx_files(stub_endpoint, prefix)}
        want = {(f["level"], f["min"], f["max"]) for f in m["ltx_files"]}
        if (m.get("recipe") == RECIPE and m.get("size_mb") == size_mb and want and want <= have
                and Path(m["local_db"]).exists()):
            log(f"dataset {name}: reusing {m['facts']['page_count']} pages, TXID {m['txid']:x}")
            return m
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    create_bucket(stub_endpoint, BUCKET)
    t0 = time.monotonic()
    rows = size_mb * 1_000_000 // ROW_BYTES
    primary = work / "primary.db"
    log(f"dataset {name}: writing {rows} rows (~{size_mb} MB)")
    make_primary(primary, rows, seed)
    url = s3_url(stub_endpoint, BUCKET, prefix)
    # an old prefix of the same name would confuse litestream: use a fresh one per build
    if ltx_files(stub_endpoint, prefix):
        prefix = f"{prefix}-{int(time.time())}"
        url = s3_url(stub_endpoint, BUCKET, prefix)
    rep = Replicate(primary, url, work)
    try:
        txid0 = rep.sync()
        log(f"dataset {name}: initial TXID {txid0:x} uploaded ({time.monotonic() - t0:.1f}s)")
        _wait_level(stub_endpoint, prefix, 9, txid0, 180, rep)
        rng = random.Random(seed + 1)
        con = sqlite3.connect(str(primary), isolation_level=None, timeout=30)
        con.execute("PRAGMA busy_timeout=30000")
        for _ in range(SMALL_TXNS):
            con.execute("UPDATE t SET payload=? WHERE id=?", (_payload(rng), rng.randint(1, rows)))
            rep.sync()
        con.close()
        txid = rep.sync()
        _wait_level(stub_endpoint, prefix, 1, txid, 120, rep)
    finally:
        rep.stop()
    files = ltx_files(stub_endpoint, prefix)
    local = work / "local.db"
    subprocess.run([LITESTREAM_BIN, "restore", "-o", str(local), url], check=True,
                   env=child_env(), capture_output=True, timeout=600)
    facts = db_facts(local)
    primary.unlink()
    for p in work.glob("primary.db*"):
        p.unlink()
    shutil.rmtree(work / ".primary.db-litestream", ignore_errors=True)
    m = {"name": name, "recipe": RECIPE, "size_mb": size_mb, "bucket": BUCKET, "prefix": prefix,
         "txid": txid, "ltx_files": files, "local_db": str(local), "facts": facts,
         "seed": seed, "build_seconds": round(time.monotonic() - t0, 1)}
    manifest_path.write_text(json.dumps(m, indent=1))
    log(f"dataset {name}: {facts['page_count']} pages, {len(files)} LTX files, TXID {txid:x}, "
        f"built in {m['build_seconds']}s")
    return m
