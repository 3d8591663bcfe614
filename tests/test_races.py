"""Races: two writer processes on one replica, a writer racing its own compaction and retention,
and time travel while the replica keeps moving.

* Two writer processes make 1,000 commits between them on one S3 replica, each syncing every 1..4
  commits. Conflicts are expected; the loser abandons its unsynced commits and rejoins. No
  lost update: every commit a process reported synced is in the final replica, each TXID was
  committed exactly once, and the shared counter equals the number of rows (no increment lost
  or applied twice).
* A writer with compaction every 100 ms / 300 ms, snapshots every 500 ms and L0 retention of
  200 ms, while a follower reads and restores run concurrently: every TXID the writer reported
  restores (ours and litestream's) to exactly that commit, as long as its files exist.
* Time travel while polling: readers pin random past TXIDs and moments while the writer goes on
  and their poller advances the latest state; every pinned read is exactly that past commit.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest
from test_chaos import by_another_name, restored_view, s3_urls, vfs_uri

import ltxvfs
from ltxvfs.errors import ObjectNotFoundError, PlanError
from ltxvfs.plan import list_levels
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

from faults import SCHEMA, FaultProxy, Faults, apply_commit, check_view, read_view, release_together
from litestream_rig import integrity_check, litestream_restore

HERE = Path(__file__).parent
RACE_COMMITS = int(os.environ.get("LTXVFS_RACE_COMMITS", "1000"))
RW = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI
RO = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def _rows(path, sql):
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.interop
def test_two_writer_processes_1000_commits_no_lost_update(s3_server, bucket, tmp_path):
    # Through the (fault-free) proxy: it records every PUT that S3 accepted.
    proxy = FaultProxy(s3_server, Faults(), paused=True).start()
    try:
        _two_writers(proxy, s3_urls(bucket, proxy.endpoint), tmp_path)
    finally:
        proxy.stop()


def _two_writers(proxy: FaultProxy, s3_url: str, tmp_path: Path) -> None:
    # Both processes also compact (each its own compactor, racing the other's): short plans
    # keep a rejoining loser's reopen cheap.
    uri = vfs_uri(s3_url, write_enabled="true", sync_interval="-1s", compaction_levels="1s,4s",
                  snapshot_interval="3s", l0_retention="2s")
    procs = {}
    for who, seed in (("a", 1), ("b", 2)):
        procs[who] = subprocess.Popen(
            [sys.executable, str(HERE / "faults.py"), "racer", uri, "--buffer",
             str(tmp_path / f"buf-{who}"), "--who", who, "--count", str(RACE_COMMITS // 2),
             "--seed", str(seed), "--barrier"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.PIPE)
    release_together(list(procs.values()))  # both open at the same TXID: they must collide
    outs = {}
    for who, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"writer {who} failed:\n{out[-2000:]}\n{err[-3000:]}"
        outs[who] = out.splitlines()
    l0_puts = {k: v for k, v in proxy.stored.items() if "/0000/" in k}
    twice = [k for k, v in l0_puts.items() if v > 1]
    assert not twice, f"S3 accepted two uploads of one TXID: {twice[:5]}"
    txids = sorted(int(k.rsplit("/", 1)[1][:16], 16) for k in l0_puts)
    assert txids == list(range(1, len(txids) + 1)), "a TXID was skipped"
    with open_replica(s3_url) as client:
        final = restore(client, tmp_path / "final.db").path
    assert integrity_check(final) == "ok"
    present = {(w, s) for w, s in _rows(final, "SELECT who, seq FROM r")}
    (counter,) = _rows(final, "SELECT n FROM c")[0]
    assert counter == len(present), "the shared counter lost (or doubled) an increment"
    figures = {}
    for who, lines in outs.items():
        committed: list[int] = []
        synced: set[int] = set()
        abandoned: set[int] = set()
        for line in lines:
            kind, *rest = line.split()
            if kind == "committed":
                committed.append(int(rest[0]))
            elif kind == "synced":
                upto = int(rest[0])
                synced.update(s for s in committed if s <= upto and s not in abandoned)
            elif kind == "abandoned":
                abandoned.update(int(x) for x in rest)
        lost = sorted(s for s in synced if (who, s) not in present)
        assert not lost, f"writer {who}: commits reported synced are missing: {lost[:10]}"
        resurrected = sorted(s for s in abandoned if (who, s) in present)
        assert not resurrected, f"writer {who}: abandoned commits reached the replica: {resurrected[:10]}"
        final_line = next(ln for ln in lines if ln.startswith("final")).split()
        figures[who] = {"commits": len(committed), "synced": len(synced),
                        "abandoned": len(abandoned), "conflicts": int(final_line[2]),
                        "timing": json.loads(" ".join(final_line[3:]))}
    total = sum(f["commits"] for f in figures.values())
    assert total >= RACE_COMMITS
    assert sum(f["conflicts"] for f in figures.values()) > 0, "the writers never raced"
    out = litestream_restore(s3_url, tmp_path / "litestream.db")
    assert _rows(out, "SELECT who, seq FROM r ORDER BY id") == \
        _rows(final, "SELECT who, seq FROM r ORDER BY id")
    from test_chaos import _report
    _report("race-two-writers", {"commits": total, "txids": len(txids), "rows": len(present),
                                 "writers": figures})


@pytest.mark.interop
def test_writer_against_its_own_compaction_and_retention(vfs, s3_url, tmp_path):
    """Every TXID the writer reported restores to exactly its commit (while its files exist),
    with compaction, snapshots and retention running all the time; followers and concurrent
    restores only ever see whole commits."""
    follow_url = by_another_name(s3_url)  # its own Replica object: a polling follower
    uri = vfs_uri(s3_url, write_enabled="true", sync_interval="-1s",
                  buffer_path=quote(str(tmp_path / "buf")), compaction_levels="100ms,300ms",
                  snapshot_interval="500ms", l0_retention="200ms")
    con = apsw.Connection(uri, flags=RW)
    con.set_busy_timeout(10_000)
    for sql in SCHEMA:
        con.execute(sql)
    txid_n: dict[int, int] = {int(con.execute("PRAGMA litestream_sync").fetchall()[0][0], 16): 0}
    stop = threading.Event()
    problems: list[str] = []
    counts = {"restores": 0, "restore_retries": 0, "reads": 0, "busy": 0}

    def restorer():
        k = 0
        while not stop.is_set():
            k += 1
            out = tmp_path / f"c{k}.db"
            try:
                with open_replica(s3_url) as client:
                    res = restore(client, out)
                v = restored_view(out)
                check_view(v)
                if integrity_check(out) != "ok":
                    problems.append(f"restore {k}: integrity_check failed")
                want = txid_n.get(res.txid)
                if want is not None and v.n != want:
                    problems.append(f"restore of TXID {res.txid:x} gave n={v.n}, not {want}")
                counts["restores"] += 1
            except (ObjectNotFoundError, PlanError):
                counts["restore_retries"] += 1  # a file vanished between listing and reading it
            except Exception as err:
                problems.append(f"restore {k}: {type(err).__name__}: {err}")
            finally:
                out.unlink(missing_ok=True)

    def follower():
        r = apsw.Connection(vfs_uri(follow_url, poll_interval="30ms"), flags=RO)
        last = -1
        while not stop.is_set():
            try:
                v = read_view(r)
                check_view(v)
                if v.n < last:
                    problems.append(f"follower went back from {last} to {v.n}")
                last = v.n
                counts["reads"] += 1
            except apsw.BusyError:
                counts["busy"] += 1
            except Exception as err:
                problems.append(f"follower: {type(err).__name__}: {err}")
            time.sleep(0.01)
        r.close()

    threads = [threading.Thread(target=restorer, daemon=True),
               threading.Thread(target=follower, daemon=True)]
    for th in threads:
        th.start()
    rng = random.Random(5)
    n = 0
    end = time.monotonic() + float(os.environ.get("LTXVFS_RACE_SECONDS", "8"))
    try:
        while time.monotonic() < end:
            for _ in range(rng.randint(1, 5)):
                n += 1
                apply_commit(con, n)
            txid = int(con.execute("PRAGMA litestream_sync").fetchall()[0][0], 16)
            txid_n[txid] = n
            time.sleep(rng.uniform(0, 0.03))
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    con.close()
    assert not problems, problems[:5]
    assert counts["restores"] > 0 and counts["reads"] > 0, counts
    with open_replica(s3_url) as client:
        listing = list_levels(client)
        assert listing[1] and listing[9], "compaction and snapshots did run"
        # TXIDs below the oldest snapshot may have lost their compacted files to snapshot
        # retention while an L0 file of theirs is still waiting for L0 retention: only TXIDs
        # from the oldest snapshot on are promised to restore.
        floor = min(f.max_txid for f in listing[9])
        available = [f.max_txid for f in listing[0] if f.max_txid >= floor]
        checked = 0
        for txid in available:
            if txid in txid_n:
                out = restore(client, tmp_path / f"at-{txid}.db", txid=txid).path
                assert restored_view(out).n == txid_n[txid]
                out.unlink()
                checked += 1
    final_txid = max(txid_n)
    for path in (litestream_restore(s3_url, tmp_path / "ls.db"),):
        v = restored_view(path)
        assert v.n == n and integrity_check(path) == "ok"
    from test_chaos import _report
    _report("race-writer-compaction", {"commits": n, "txids": final_txid, "pinned_checked": checked,
                                       "files_per_level": {k: len(v) for k, v in listing.items() if v},
                                       **counts})


def test_time_travel_while_polling(vfs, s3_url, tmp_path):
    follow_url = by_another_name(s3_url)  # readers poll on their own Replica object
    uri = vfs_uri(s3_url, write_enabled="true", sync_interval="-1s",
                  buffer_path=quote(str(tmp_path / "buf")), compaction_levels="200ms,600ms",
                  snapshot_interval="1s", l0_retention="0")
    con = apsw.Connection(uri, flags=RW)
    con.set_busy_timeout(10_000)
    for sql in SCHEMA:
        con.execute(sql)
    moments: list[tuple[int, int, float, float]] = []  # (txid, n, wall time before, after sync)
    before = time.time()
    moments.append((int(con.execute("PRAGMA litestream_sync").fetchall()[0][0], 16), 0,
                    before, time.time()))
    stop = threading.Event()
    problems: list[str] = []
    counts = {"pinned_txid": 0, "pinned_time": 0, "latest": 0, "busy": 0, "not_available": 0}
    per_traveller = {k: 0 for k in range(3)}  # checked reads of each thread
    lock = threading.Lock()

    def traveller(seed: int):
        rng = random.Random(seed)
        r = apsw.Connection(vfs_uri(follow_url, poll_interval="30ms"), flags=RO)
        last_latest = -1
        while not stop.is_set():
            with lock:
                known = list(moments)
            pick = rng.randrange(len(known))
            txid, n, _, after = known[pick]
            choice = rng.random()
            try:
                if choice < 0.4:
                    r.execute(f"PRAGMA litestream_pin_txid = '{txid:016x}'")
                    v = read_view(r)
                    counts["pinned_txid"] += 1
                    if v.n != n:
                        problems.append(f"pinned TXID {txid:x}: n={v.n}, expected {n}")
                elif choice < 0.7 and pick + 1 < len(known):
                    nxt_before = known[pick + 1][2]
                    when = datetime.fromtimestamp((after + nxt_before) / 2, UTC)
                    r.execute(f"PRAGMA litestream_time = '{when.isoformat()}'")
                    v = read_view(r)
                    counts["pinned_time"] += 1
                    if v.n != n:
                        problems.append(f"time {when.isoformat()} (TXID {txid:x}): n={v.n}, "
                                        f"expected {n}")
                else:
                    r.execute("PRAGMA litestream_time = 'latest'")
                    v = read_view(r)
                    counts["latest"] += 1
                    if v.n < last_latest:
                        problems.append(f"latest went back from {last_latest} to {v.n}")
                    last_latest = v.n
                check_view(v)
                with lock:
                    per_traveller[seed] += 1
            except apsw.BusyError:
                counts["busy"] += 1
            except apsw.SQLError as err:
                if "not available" in str(err):
                    counts["not_available"] += 1
                else:
                    problems.append(f"SQLError: {err}")
            except Exception as err:
                problems.append(f"{type(err).__name__}: {err}")
        r.close()

    threads = [threading.Thread(target=traveller, args=(k,), daemon=True) for k in range(3)]
    for th in threads:
        th.start()
    rng = random.Random(9)
    n = 0
    end = time.monotonic() + float(os.environ.get("LTXVFS_RACE_SECONDS", "8"))
    try:
        while time.monotonic() < end:
            for _ in range(rng.randint(1, 3)):
                n += 1
                apply_commit(con, n)
            before = time.time()
            txid = int(con.execute("PRAGMA litestream_sync").fetchall()[0][0], 16)
            after = time.time()
            with lock:
                moments.append((txid, n, before, after))
            time.sleep(0.005 + rng.uniform(0, 0.02))
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    con.close()
    assert not problems, problems[:5]
    assert counts["pinned_txid"] and counts["pinned_time"] and counts["latest"], counts
    assert min(per_traveller.values()) > 0, f"a traveller never read: {per_traveller}"
    assert counts["not_available"] == 0, "l0_retention=0 keeps every TXID available"
    from test_chaos import _report
    _report("race-time-travel", {"commits": n, "txids": len(moments), **counts})



