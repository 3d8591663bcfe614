"""Chaos and crashes: a writer and 16 readers through a misbehaving S3; kill -9 at random points.

* Our writer (write mode through the VFS) — and separately the real ``litestream replicate`` —
  keep committing through :class:`faults.FaultProxy` (~10 % of requests reset, throttled, failed,
  truncated or slowed; new objects hidden from listings for a while) while 16 readers (12
  threads on two Replica objects, 4 processes) read and check every row. Readers may see
  ``apsw.BusyError`` (documented: storage unavailable); they must never see a wrong row, half a
  transaction, a view going back in time, or a failed integrity check, and in the end every one
  of them reaches the primary's final state.
* Crash trials: a writer is killed with SIGKILL during a commit, during its upload, during
  compaction/retention, or at a random moment; after each kill the real ``litestream restore``
  and ``ltxvfs.restore.restore`` both give a database that passes ``PRAGMA integrity_check`` and
  holds every synced commit, and reopening recovers every commit the killed process made.

Durations: ``LTXVFS_CHAOS_SECONDS`` (default 12 s of chaos per test), ``LTXVFS_CRASH_TRIALS``
(default 20, split over the kill points; 100 for the full run).
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest

import ltxvfs
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

import faults
from faults import FaultProxy, Faults, View, apply_commit, check_view, open_reader, run_reader
from litestream_rig import integrity_check, litestream_restore

HERE = Path(__file__).parent
CHAOS_SECONDS = float(os.environ.get("LTXVFS_CHAOS_SECONDS", "12"))
CRASH_TRIALS = int(os.environ.get("LTXVFS_CRASH_TRIALS", "20"))
THREAD_READERS, PROCESS_READERS = 12, 4
FAST_COMPACTION = "compaction_levels=100ms,300ms&snapshot_interval=500ms&l0_retention=200ms"

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def _report(name: str, figures: dict) -> None:
    """Figures for docs/reliability.md: printed (pytest -s) and appended to
    ``$LTXVFS_RELIABILITY_LOG`` when set."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get("LTXVFS_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server, Faults(), seed=int(os.environ.get("LTXVFS_FAULT_SEED", "7")),
                   paused=True).start()
    yield p
    p.stop()


def s3_urls(bucket: str, endpoint: str) -> str:
    return f"s3://{bucket}/db?endpoint={endpoint}&region=us-east-1"


def by_another_name(url: str) -> str:
    """The same replica reached as ``localhost`` instead of ``127.0.0.1``: another location to
    ltxvfs (it keys replicas by endpoint as written), so another Replica object in the process —
    a follower of what a writer in the same process writes, as a second process would be."""
    assert "//127.0.0.1:" in url, url
    return url.replace("//127.0.0.1:", "//localhost:")


def vfs_uri(url: str, **params) -> str:
    out = f"file:db?vfs=litestream&replica_url={quote(url, safe='')}"
    return out + "".join(f"&{k}={v}" for k, v in params.items())


def restored_view(path: Path) -> View:
    con = sqlite3.connect(path)
    try:
        n = con.execute("SELECT n FROM meta").fetchone()[0]
        rows = [tuple(r) for r in con.execute("SELECT id, v, length(pad) FROM t ORDER BY id")]
        bulk = con.execute("SELECT count(*) FROM bulk").fetchone()[0]
        return View(n, rows, bulk)
    finally:
        con.close()


def both_restores(direct_url: str, out_dir: Path, tag: str) -> tuple[View, View]:
    """The latest state restored by the real litestream and by ltxvfs, each integrity-checked."""
    a = litestream_restore(direct_url, out_dir / f"{tag}-litestream.db", timeout=120)
    with open_replica(direct_url) as client:
        b = restore(client, out_dir / f"{tag}-ltxvfs.db").path
    for p in (a, b):
        assert integrity_check(p) == "ok", f"{p}: integrity_check failed"
    va, vb = restored_view(a), restored_view(b)
    check_view(va)
    check_view(vb)
    for p in (a, b):
        p.unlink()
    return va, vb


def start_child(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "faults.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, **kw)


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """Read the child's stdout until a line starts with ``prefix`` (bounded by ``timeout``)."""
    result: list[str] = []

    def pump():
        for line in proc.stdout:
            if line.startswith(prefix):
                result.append(line.strip())
                return

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    th.join(timeout)
    if not result:
        raise AssertionError(f"no {prefix!r} line from the child within {timeout}s "
                             f"(rc={proc.poll()})")
    return result[0]


class ReaderPool:
    """12 reader threads (on two Replica objects: two spellings of the URL) and 4 processes."""

    def __init__(self, urls: tuple[str, str], tmp: Path, params: str, timeout: float) -> None:
        self.final_file = tmp / "final"
        self.target: int | None = None
        self.results: list[dict] = []
        self.threads: list[threading.Thread] = []
        self.procs: list[subprocess.Popen] = []
        self.deadline = time.monotonic() + timeout
        self.urls, self.params = urls, params

    def start(self) -> None:
        for k in range(THREAD_READERS):
            th = threading.Thread(target=self._thread, args=(self.urls[k % 2],), daemon=True)
            th.start()
            self.threads.append(th)
        for k in range(PROCESS_READERS):
            uri = vfs_uri(self.urls[k % 2]) + "&" + self.params
            self.procs.append(start_child("reader", uri, "--final", str(self.final_file),
                                          "--timeout", str(self.deadline - time.monotonic())))

    def _thread(self, url: str) -> None:
        stats: collections.Counter[str] = collections.Counter()
        try:
            con = open_reader(vfs_uri(url) + "&" + self.params, stats, self.deadline)
        except apsw.CantOpenError as err:
            self.results.append({"stats": dict(stats), "failures": [f"open: {err}"],
                                 "last_n": -1, "converged": False})
            return
        try:
            self.results.append(run_reader(con, target=lambda: self.target,
                                           deadline=self.deadline, stats=stats))
        finally:
            con.close()

    def finish(self, final: int) -> list[dict]:
        self.target = final
        self.final_file.write_text(str(final))
        for th in self.threads:
            # A read in progress at the deadline may still sit out one botocore backoff (≤ 20 s).
            th.join(max(1.0, self.deadline - time.monotonic() + 30))
        if any(th.is_alive() for th in self.threads):  # stuck in a call: show where
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        for p in self.procs:
            out, err = p.communicate(timeout=max(5.0, self.deadline - time.monotonic() + 45))
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            assert lines, f"reader process failed (rc={p.returncode}): {err[-8000:]}"
            self.results.append(json.loads(lines[-1]))
        return self.results

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _summary(results: list[dict]) -> list[tuple]:
    return [(r["last_n"], r["converged"], r.get("vfs", {}).get("txid"), r.get("vfs", {}).get("polls"),
             (r.get("vfs", {}).get("poll_error") or "")[:200]) for r in results]


def check_readers(results: list[dict], final: int) -> dict:
    assert len(results) == THREAD_READERS + PROCESS_READERS, _summary(results)
    problems = [f for r in results for f in r["failures"]]
    assert not problems, f"readers saw {len(problems)} problem(s): {problems[:5]}"
    not_there = [r for r in results if not r["converged"]]
    assert not not_there, \
        f"readers that did not reach the final commit {final}: {_summary(not_there)}"
    totals: dict[str, int] = {}
    for r in results:
        assert r["stats"].get("reads", 0) > 0
        for k, v in r["stats"].items():
            totals[k] = totals.get(k, 0) + v
    # The slowest reader: seconds from the final commit being known to reading it.
    totals["slowest_convergence_s"] = max(r.get("converge_seconds") or 0 for r in results)
    return totals


def assert_faults_injected(proxy: FaultProxy, kinds=("reset", "throttle", "error", "truncate",
                                                     "slow")) -> dict:
    stats = proxy.stats()
    missing = [k for k in kinds if not stats["injected"].get(k)]
    assert not missing, f"no {missing} fault was injected: {stats}"
    return stats


# --------------------------------------------------------------------------------------------
# Chaos: our writer
# --------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_chaos_our_writer_and_16_readers(proxy, s3_server, bucket, tmp_path, vfs):
    url = s3_urls(bucket, proxy.endpoint)
    url2 = by_another_name(url)  # same replica, another Replica object in this process
    direct = s3_urls(bucket, s3_server)
    stop = tmp_path / "stop"
    writer = start_child(
        "writer", vfs_uri(url, write_enabled="true", buffer_path=quote(str(tmp_path / "buf")),
                          sync_interval="100ms", compaction_levels="300ms,1s",
                          snapshot_interval="2s", l0_retention="1s"),
        "--stop", str(stop), "--sync-every", "25", "--pace", "0.02", "--seed", "1")
    readers = None
    try:
        wait_line(writer, "synced", 60)  # the database exists: readers can open it
        proxy.set(**vars(Faults.uniform(0.10, stale_list=0.10, stale_seconds=1.0)))
        proxy.enabled = True
        # Convergence time grows with the database (every read scans it all through a small
        # cache, and moto reads a whole object per ranged GET): long runs get a longer window.
        readers = ReaderPool((url, url2), tmp_path, "poll_interval=100ms&cache_size=1MiB",
                             timeout=CHAOS_SECONDS * 4 + 90)
        readers.start()
        time.sleep(CHAOS_SECONDS)
        stop.write_text("stop")
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, f"writer failed: {out[-2000:]}\n{err[-3000:]}"
        final = int(next(ln for ln in out.splitlines() if ln.startswith("final")).split()[1])
        synced = [ln for ln in out.splitlines() if ln.startswith("synced")]
        assert final >= 25, f"the writer made too little progress under faults: {final}"
        results = readers.finish(final)  # faults still on while they converge
        totals = check_readers(results, final)
        injected = assert_faults_injected(proxy)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
        if readers is not None:
            readers.kill()
    proxy.enabled = False
    va, vb = both_restores(direct, tmp_path, "final")
    assert va.n == vb.n == final and va.rows == vb.rows
    _report("chaos-ltxvfs-writer", {"seconds": CHAOS_SECONDS, "commits": final,
                                    "explicit_syncs": len(synced), "readers": len(results),
                                    "reader_totals": totals, **injected})


# --------------------------------------------------------------------------------------------
# Chaos: the real litestream replicate
# --------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_chaos_litestream_writer_and_16_readers(proxy, s3_server, bucket, tmp_path,
                                                replicator_factory, vfs):
    url = s3_urls(bucket, proxy.endpoint)
    url2 = by_another_name(url)
    direct = s3_urls(bucket, s3_server)
    db = tmp_path / "primary.db"
    con = sqlite3.connect(db, isolation_level=None, timeout=10)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("PRAGMA busy_timeout=10000")
    for sql in faults.SCHEMA:
        con.execute(sql)
    rep = replicator_factory(db, url, levels=("1s", "3s"), snapshot_interval="2s",
                             l0_retention="2s")
    n = 0
    for _ in range(10):
        n += 1
        apply_commit(con, n)
    rep.wait_until_replicated(timeout=30)
    proxy.set(**vars(Faults.uniform(0.10, stale_list=0.10, stale_seconds=1.0)))
    proxy.enabled = True
    # A 1 MiB cache: every read scans the whole database, and litestream's primary grows fast;
    # with 256 KiB, 16 readers' page GETs saturate moto (one request at a time) in long runs.
    readers = ReaderPool((url, url2), tmp_path, "poll_interval=100ms&cache_size=1MiB",
                         timeout=CHAOS_SECONDS * 4 + 300)  # litestream may need a while
    try:
        readers.start()
        end = time.monotonic() + CHAOS_SECONDS
        rng = random.Random(3)
        while time.monotonic() < end:
            n += 1
            apply_commit(con, n)
            time.sleep(rng.uniform(0, 0.04))
        proxy.enabled = False  # the rig's own sync and listing checks need a calm store
        final_txid = _replicated(rep)
        results = readers.finish(n)
        totals = check_readers(results, n)
        injected = assert_faults_injected(proxy)
    finally:
        readers.kill()
        con.close()
    va, vb = both_restores(direct, tmp_path, "final")
    assert va.n == vb.n == n and va.rows == vb.rows
    _report("chaos-litestream-writer", {"seconds": CHAOS_SECONDS, "commits": n,
                                        "final_txid": final_txid, "readers": len(results),
                                        "reader_totals": totals, **injected})


def _replicated(rep, attempts: int = 6) -> int:
    """The rig's forced sync, retried: after a fault period litestream may still be backing off
    (its sync answers 500 'context deadline exceeded' until its uploads go through again)."""
    from litestream_rig import LitestreamError

    for attempt in range(attempts):
        try:
            return rep.wait_until_replicated(timeout=30)
        except LitestreamError:
            if attempt + 1 == attempts:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Crash trials
# --------------------------------------------------------------------------------------------

KILL_POINTS = ("commit", "upload", "compaction", "random")


def _kill_trial(uri: str, rng: random.Random, point: str, timeout: float = 30.0) -> dict:
    """Start a writer, kill -9 it at ``point``; return what it said before dying."""
    p = start_child("writer", uri, "--instrument", "--sync-every", str(rng.randint(2, 6)),
                    "--pace", "0.003", "--seed", str(rng.randrange(1 << 30)))
    seen = {"start": None, "committed": 0, "synced": 0, "point": point, "hit": False}
    target_commits = rng.randint(3, 40)
    start = time.monotonic()
    random_at = start + rng.uniform(0.6, 2.5)
    lines: list[str] = []
    done = threading.Event()

    def pump():
        for line in p.stdout:
            lines.append(line)
        done.set()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    i = 0
    while True:
        while i < len(lines):
            line = lines[i].split()
            i += 1
            if not line:
                continue
            if line[0] == "start":
                seen["start"] = int(line[1])
            elif line[0] == "committed":
                seen["committed"] = int(line[1])
            elif line[0] == "synced":
                seen["synced"] = int(line[1])
            if seen["start"] is None or seen["hit"]:
                continue
            if point == "commit" and line[0] == "committed" and \
                    seen["committed"] - seen["start"] >= target_commits:
                seen["hit"] = True
            elif point == "upload" and line[:4] == ["op", "begin", "put", "L0"] and \
                    seen["committed"] - seen["start"] >= 2:
                seen["hit"] = True
            elif point == "compaction" and line[:2] == ["op", "begin"] and line[2:4] != ["put", "L0"]:
                seen["hit"] = True
        now = time.monotonic()
        if seen["hit"] and "reached_s" not in seen:
            seen["reached_s"] = round(now - start, 2)
        if seen["hit"] or (point == "random" and now >= random_at and seen["start"] is not None):
            time.sleep(rng.uniform(0, 0.004))  # somewhere inside the call that just began
            break
        if now - start > timeout or done.is_set():
            break  # no such moment came (or the child died): kill anyway; the test fails on it
        time.sleep(0.0005)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(30)
    th.join(10)
    for line in lines[i:]:
        parts = line.split()
        if parts and parts[0] in ("committed", "synced"):
            seen[parts[0]] = int(parts[1])
    seen["rc"] = p.returncode
    seen["stderr"] = p.stderr.read()[-3000:]
    seen["seconds"] = round(time.monotonic() - start, 1)
    seen["last_ops"] = [ln.strip() for ln in lines if ln.startswith("op ")][-4:]
    jobs = [ln.split() for ln in lines if ln.startswith("job ")]
    seen["jobs"] = dict(collections.Counter(f"{j[1]} {j[2]}" for j in jobs))
    seen["last_jobs"] = [" ".join(j) for j in jobs[-6:]]
    return seen


@pytest.mark.interop
@pytest.mark.timeout(max(600, CRASH_TRIALS * 15))  # long runs: ~2-6 s a trial on S3 (moto)
@pytest.mark.parametrize("backend", ["s3", "file"])
def test_kill_nine_trials(backend, request, tmp_path):
    trials = max(4, CRASH_TRIALS // 2)
    if backend == "s3":
        bucket = request.getfixturevalue("bucket")
        url = s3_urls(bucket, request.getfixturevalue("s3_server"))
    else:
        url = (tmp_path / "replica").as_uri()
    uri = vfs_uri(url, write_enabled="true", buffer_path=quote(str(tmp_path / "buf")),
                  sync_interval="30ms", **dict(kv.split("=") for kv in FAST_COMPACTION.split("&")))
    rng = random.Random(int(os.environ.get("LTXVFS_CRASH_SEED", "100")) + (backend == "file"))
    first = start_child("writer", uri, "--count", "1", "--sync-every", "1")
    assert first.wait(120) == 0, first.stderr.read()[-3000:]
    committed = synced = 1
    hits: dict[str, int] = {k: 0 for k in KILL_POINTS}
    restores = 0
    seconds = {"writing": 0.0, "restoring": 0.0}
    missed: list[dict] = []
    reached: dict[str, list[float]] = {k: [] for k in KILL_POINTS if k != "random"}
    compaction_jobs: collections.Counter[str] = collections.Counter()
    for trial in range(trials):
        point = KILL_POINTS[trial % len(KILL_POINTS)]
        t0 = time.monotonic()
        seen = _kill_trial(uri, rng, point)
        t1 = time.monotonic()
        assert seen["rc"] == -signal.SIGKILL, f"trial {trial}: writer exited by itself: {seen}"
        assert seen["start"] is not None, f"trial {trial}: writer did not start: {seen}"
        # Reopening recovered every commit the previous process made (nothing committed lost).
        assert committed <= seen["start"] <= committed + 1, (trial, committed, seen)
        hits[point] += seen["hit"] or point == "random"
        if seen["hit"]:
            reached[point].append(seen["reached_s"])
        if point == "compaction":
            compaction_jobs.update(seen["jobs"])
        if not seen["hit"] and point != "random":  # killed at the deadline instead: say why
            # (the trial's checks still run: a kill at the deadline must not lose commits either)
            missed.append({k: seen[k] for k in ("point", "seconds", "start", "committed",
                                                "last_ops", "jobs", "last_jobs", "stderr")})
        committed = max(seen["committed"], seen["start"])
        synced = max(synced, seen["synced"])
        va, vb = both_restores(url, tmp_path, f"t{trial}")
        restores += 2
        for v in (va, vb):
            assert synced <= v.n <= committed + 1, \
                f"trial {trial} ({point}): restored n={v.n}, synced {synced}, committed {committed}"
        assert va.n == vb.n and va.rows == vb.rows, f"trial {trial}: the two restores differ"
        seconds["writing"] += t1 - t0
        seconds["restoring"] += time.monotonic() - t1
    # A last clean run recovers and syncs everything.
    p = start_child("writer", uri, "--count", "1", "--sync-every", "1")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    start = int(next(ln for ln in out.splitlines() if ln.startswith("start")).split()[1])
    assert committed <= start <= committed + 1
    va, vb = both_restores(url, tmp_path, "end")
    assert va.n == vb.n == start + 1
    # A kill point that never came is not a trial of that point: every one must be reached.
    # (A run of 33f31a4 counted 7 "compaction" kills made at the 30 s deadline as passes.)
    assert not missed, f"{len(missed)} kill point(s) never came: {json.dumps(missed)[:6000]}"
    _report(f"crash-{backend}", {"trials": trials, "kill_points_hit": hits,
                                 "restores_checked": restores, "commits": start + 1,
                                 "seconds": {k: round(v, 1) for k, v in seconds.items()},
                                 "missed_points": missed,
                                 "seconds_to_reach": {k: [min(v), max(v)] for k, v in reached.items() if v},
                                 "compaction_trial_jobs": dict(compaction_jobs)})


# --------------------------------------------------------------------------------------------
# A PUT that S3 applied but whose answer was lost
# --------------------------------------------------------------------------------------------


def _lost_answer_run(proxy: FaultProxy, bucket: str, s3_server: str, tmp_path: Path,
                     fault: str) -> tuple[apsw.Connection, list[str]]:
    url = s3_urls(bucket, proxy.endpoint)
    con = apsw.Connection(vfs_uri(url, write_enabled="true", sync_interval="-1s",
                                  buffer_path=quote(str(tmp_path / "buf"))),
                          flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
                          | apsw.SQLITE_OPEN_URI)
    con.execute("CREATE TABLE t(x)")
    assert con.execute("PRAGMA litestream_sync").fetchall() == [("0000000000000001",)]
    con.execute("INSERT INTO t VALUES (1)")
    proxy.set(kinds=frozenset({"PUT"}), limit=1, **{fault: 1.0})
    proxy.enabled = True
    outcomes = []
    try:
        outcomes.append(con.execute("PRAGMA litestream_sync").fetchall()[0][0])
    except Exception as err:
        outcomes.append(f"{type(err).__name__}: {err}")
    assert proxy.counts[fault] == 1, proxy.stats()
    return con, outcomes


@pytest.mark.parametrize("fault", ["error_after", "reset_after"])
def test_put_applied_but_answer_lost_loses_nothing(proxy, s3_server, bucket, tmp_path, vfs, fault):
    """S3 stored the upload, the client never heard: whatever the writer reports, nothing
    committed is lost, and reopening the buffer brings everything to the replica."""
    con, outcomes = _lost_answer_run(proxy, bucket, s3_server, tmp_path, fault)
    try:
        con.close()
    except ltxvfs.ConflictError:
        pass  # a conflict must not happen (see the next test); the buffer would be kept
    # The buffer belongs to the replica URL it was written for: reopen through the proxy
    # (its one fault is spent).
    con = apsw.Connection(vfs_uri(s3_urls(bucket, proxy.endpoint), write_enabled="true",
                                  sync_interval="-1s", buffer_path=quote(str(tmp_path / "buf"))),
                          flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
    con.execute("INSERT INTO t VALUES (2)")
    con.close()
    with open_replica(s3_urls(bucket, s3_server)) as client:
        out = restore(client, tmp_path / "r.db").path
    assert [r[0] for r in sqlite3.connect(out).execute("SELECT x FROM t ORDER BY x")] == [1, 2]


@pytest.mark.parametrize("fault", ["error_after", "reset_after"])
def test_put_applied_but_answer_lost_is_not_a_conflict(proxy, s3_server, bucket, tmp_path, vfs,
                                                       fault):
    con, outcomes = _lost_answer_run(proxy, bucket, s3_server, tmp_path, fault)
    try:
        assert outcomes == ["0000000000000002"], outcomes
        con.execute("INSERT INTO t VALUES (2)")  # writes go on
        con.close()
    finally:
        try:
            con.close()
        except ltxvfs.ConflictError:
            pass
