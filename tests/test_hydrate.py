"""Hydration: answer at once from object storage, switch to a local full copy, keep it current."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest

import ltxvfs
from ltxvfs import hydrate
from ltxvfs.storage import open_replica

from hydration_rig import HOLD, Child, HookLock, Rig, SeenWaiting, digest, tls
from litestream_rig import Workload, litestream_restore
from replicas import FakePrimary, page_bytes


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def connect(url, path=None, **params):
    u = f"file:db?vfs=litestream&replica_url={quote(url, safe='')}&poll_interval=50ms"
    if path is not None:
        u += f"&hydration_path={quote(str(path), safe='')}"
    for k, v in params.items():
        u += f"&{k}={v}"
    return apsw.Connection(u, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)


def one(con, sql):
    return con.execute(sql).fetchall()[0][0]


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def hydrated(con):
    return wait_for(lambda: one(con, "PRAGMA litestream_hydration_progress") == "100.0")


@pytest.fixture
def replica(tmp_path):
    url = (tmp_path / "r").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)",
                 "INSERT INTO t(b) SELECT randomblob(2500) FROM generate_series(1, 400)")
    p.url = url
    return p


def test_hydrates_and_deletes_on_close(vfs, replica, tmp_path):
    target = tmp_path / "h" / "copy.db"
    con = connect(replica.url, target)
    assert one(con, "SELECT count(*) FROM t") == 400
    assert one(con, "PRAGMA litestream_hydration_file") == str(target)
    hydrated(con)
    assert page_bytes(target) == page_bytes(replica.path)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    con.close()
    assert not target.exists()


def test_hydration_leaves_the_readers_cache_statistics_alone(vfs, replica, tmp_path):
    con = connect(replica.url, tmp_path / "h.db")
    hydrated(con)
    stats = json.loads(one(con, "PRAGMA litestream_stats"))
    # Only the opening statements' own reads (the schema) count; hydration checking the cache
    # for each of the ~400 pages it copies once counted as ~400 misses readers never had.
    assert stats["cache_hits"] + stats["cache_misses"] < 20, stats
    assert one(con, "SELECT count(*) FROM t") == 400
    con.close()


def test_progress_says_100_only_when_the_copy_holds_the_latest_transaction(
        vfs, replica, tmp_path, monkeypatch):
    # The hydrator hears of the new transaction only on its own 5 s timer, so there is a
    # window where the file is complete but one transaction behind: not "100.0" then.
    monkeypatch.setattr(hydrate.Hydrator, "_changed", lambda self: None)
    target = tmp_path / "h.db"
    con = connect(replica.url, target)
    hydrated(con)
    replica.commit("INSERT INTO t(b) VALUES (x'01')")
    wait_for(lambda: one(con, "SELECT count(*) FROM t") == 401)  # served remotely
    assert one(con, "PRAGMA litestream_hydration_progress") == "99.9"
    hydrated(con)
    assert page_bytes(target) == page_bytes(replica.path)
    con.close()


def test_enabled_without_a_path_uses_a_private_temp_file(vfs, replica):
    con = connect(replica.url, hydration_enabled="true")
    path = one(con, "PRAGMA litestream_hydration_file")
    assert path and os.path.exists(path)
    hydrated(con)
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
    con.close()
    assert not os.path.exists(path)


def test_reads_do_not_wait_for_hydration(vfs, replica, tmp_path, monkeypatch):
    gate = threading.Event()
    real = hydrate.Hydrator._fetch_run

    def slow(self, state, run):
        gate.wait(120)
        return real(self, state, run)

    monkeypatch.setattr(hydrate.Hydrator, "_fetch_run", slow)
    con = connect(replica.url, tmp_path / "copy.db")
    try:  # the query is answered while hydration is held at the gate: it did not wait for it
        assert one(con, "SELECT count(*), sum(length(b)) FROM t") == 400
        assert one(con, "PRAGMA litestream_hydration_progress") != "100.0"
    finally:
        gate.set()
    hydrated(con)
    assert one(con, "SELECT count(*) FROM t") == 400
    con.close()


def test_follows_changes_and_time_travel_reads_around_the_copy(vfs, replica, tmp_path):
    target = tmp_path / "copy.db"
    con = connect(replica.url, target)
    hydrated(con)
    replica.commit("DELETE FROM t WHERE id > 100")
    replica.execute("VACUUM")
    replica.publish()
    wait_for(lambda: one(con, "SELECT count(*) FROM t") == 100)
    hydrated(con)
    wait_for(lambda: page_bytes(target) == page_bytes(replica.path))
    con.execute("PRAGMA litestream_pin_txid = '0000000000000001'")
    assert one(con, "SELECT count(*) FROM t") == 400  # the past: from object storage
    con.execute("PRAGMA litestream_time = 'latest'")
    assert one(con, "SELECT count(*) FROM t") == 100
    con.close()


def test_persistent_file_resumes_and_is_discarded_when_stale(vfs, replica, tmp_path):
    target = tmp_path / "copy.db"
    con = connect(replica.url, target, hydration_persistent="true")
    hydrated(con)
    con.close()
    assert target.exists() and (tmp_path / "copy.db.meta").exists()
    replica.commit("INSERT INTO t(b) VALUES (x'01')")
    con = connect(replica.url, target, hydration_persistent="true")
    hydrated(con)
    assert page_bytes(target) == page_bytes(replica.path)
    resumed = next(r for r in vfs.replicas() if r.client.url == replica.url).hydrator
    assert resumed.fetched_pages < 10, "a resumed copy fetches only what changed"
    assert one(con, "SELECT count(*) FROM t") == 401
    con.close()
    # The replica is replaced by another database: the old copy must not be used.
    for f in (tmp_path / "r").rglob("*.ltx"):
        f.unlink()
    with open_replica(replica.url) as client:
        other = FakePrimary(tmp_path / "other.db", client)
        other.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)", "INSERT INTO t(b) VALUES (1)")
        other.commit("INSERT INTO t(b) VALUES (2)")
    con = connect(replica.url, target, hydration_persistent="true")
    hydrated(con)
    assert page_bytes(target) == page_bytes(other.path)
    assert one(con, "SELECT count(*) FROM t") == 2
    con.close()


def test_failure_is_reported_and_reads_go_on(vfs, replica, tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hydrate.os, "pwrite", full)
    monkeypatch.setattr(hydrate.os, "pwritev", full)
    con = connect(replica.url, tmp_path / "copy.db")
    wait_for(lambda: one(con, "PRAGMA litestream_hydration_progress").startswith("failed"))
    assert "No space left" in one(con, "PRAGMA litestream_hydration_progress")
    assert one(con, "SELECT count(*) FROM t") == 400
    con.close()


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_unusable_path_serves_remotely_and_says_why(vfs, replica, tmp_path, where):
    """The old code only logged it: progress read '0' and stats said 'hydration: off'."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = blocker / "copy.db" if where == "under-a-file" else Path("/proc/nope/copy.db")
    con = connect(replica.url, path)
    assert one(con, "SELECT count(*) FROM t") == 400
    assert one(con, "PRAGMA litestream_hydration_file") == str(path)
    progress = one(con, "PRAGMA litestream_hydration_progress")
    assert progress.startswith(f"failed: cannot hydrate into {path}: ") and \
        progress.endswith("reads stay remote"), progress
    assert json.loads(one(con, "PRAGMA litestream_stats"))["hydration"] == progress
    con.close()


@pytest.mark.interop
def test_hydrated_file_equals_litestream_restore_while_the_primary_writes(
        vfs, tmp_path, request, replicator_factory):
    url = request.getfixturevalue("s3_url")
    wl = Workload(tmp_path / "primary.db", seed=11)
    rep = replicator_factory(wl.path, url)
    for _ in range(3):
        wl.step()
    rep.wait_until_replicated()
    target = tmp_path / "copy.db"
    con = connect(url, target)
    for _ in range(4):  # the primary keeps writing while we hydrate
        wl.step()
        time.sleep(0.05)
    txid = rep.wait_until_replicated()
    wait_for(lambda: int(one(con, "PRAGMA litestream_txid"), 16) >= txid)
    hydrated(con)  # the file equals the latest state, which holds at least `txid`
    at = int(one(con, "PRAGMA litestream_txid"), 16)
    assert at >= txid
    ref = litestream_restore(url, tmp_path / "ref.db", txid=at)
    assert page_bytes(target) == page_bytes(ref)
    assert [tuple(r) for r in con.execute("SELECT * FROM items ORDER BY id")] == \
        [tuple(r) for r in wl.rows()]
    con.close()


def test_write_mode_syncs_reach_the_hydrated_file(vfs, tmp_path):
    url = (tmp_path / "r").as_uri()
    target = tmp_path / "copy.db"
    con = apsw.Connection(
        f"file:db?vfs=litestream&replica_url={quote(url, safe='')}&write_enabled=true"
        f"&buffer_path={quote(str(tmp_path / 'buf'), safe='')}&sync_interval=-1s"
        f"&hydration_path={quote(str(target), safe='')}",
        flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(3):
        con.execute("INSERT INTO t(v) VALUES (?)", (f"v{i}",))
        con.execute("PRAGMA litestream_sync")
    hydrated(con)
    wait_for(lambda: target.stat().st_size > 0)
    import sqlite3

    copy = sqlite3.connect(target)
    assert copy.execute("SELECT v FROM t ORDER BY id").fetchall() == [("v0",), ("v1",), ("v2",)]
    copy.close()
    con.close()


def test_commits_while_the_first_hydration_runs_reach_the_copy(vfs, replica, tmp_path,
                                                                monkeypatch):
    """The Go VFS's known race: a write made while the first hydration is still copying. Here
    the first pass is held at its first fetch while the writer commits and syncs twice and
    commits once more without syncing; the pass then completes on the state it started from.
    Reads see every commit throughout, the copy catches up to the last synced TXID (never the
    first pass's pages over newer ones), and it ends equal to the replica."""
    import sqlite3

    entered, gate = threading.Event(), threading.Event()
    real = hydrate.Hydrator._fetch_run

    def held(self, state, run):
        entered.set()
        gate.wait(HOLD)
        return real(self, state, run)

    monkeypatch.setattr(hydrate.Hydrator, "_fetch_run", held)
    target = tmp_path / "copy.db"
    con = apsw.Connection(
        f"file:db?vfs=litestream&replica_url={quote(replica.url, safe='')}&write_enabled=true"
        f"&buffer_path={quote(str(tmp_path / 'buf'), safe='')}&sync_interval=-1s"
        f"&poll_interval=1h&hydration_path={quote(str(target), safe='')}",
        flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
    try:
        assert entered.wait(HOLD), "the first hydration never started fetching"
        assert one(con, "PRAGMA litestream_hydration_progress") != "100.0"
        con.execute("UPDATE t SET b = x'01' WHERE id % 3 = 0")
        assert one(con, "PRAGMA litestream_sync") == f"{2:016x}"
        con.execute("DELETE FROM t WHERE id > 390")
        con.execute("INSERT INTO t(id, b) VALUES (1000, randomblob(5000))")
        assert one(con, "PRAGMA litestream_sync") == f"{3:016x}"
        at3 = con.execute("SELECT id, hex(b) FROM t ORDER BY id").fetchall()
        con.execute("UPDATE t SET b = x'02' WHERE id = 1")  # committed, not synced
        assert one(con, "PRAGMA litestream_hydration_progress") != "100.0", "not held"
    finally:
        gate.set()
    expected = con.execute("SELECT id, hex(b) FROM t ORDER BY id").fetchall()
    assert len(expected) == 391 and expected[0] == (1, "02")
    hydrated(con)
    assert one(con, "PRAGMA litestream_txid") == f"{3:016x}"
    assert con.execute("SELECT id, hex(b) FROM t ORDER BY id").fetchall() == expected
    copy = sqlite3.connect(target)  # the copy: TXID 3 exactly (the buffer's commit is not in it)
    assert copy.execute("SELECT id, hex(b) FROM t ORDER BY id").fetchall() == at3 != expected
    assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    copy.close()
    assert one(con, "PRAGMA litestream_sync") == f"{4:016x}"
    hydrated(con)
    copy = sqlite3.connect(target)
    assert copy.execute("SELECT id, hex(b) FROM t ORDER BY id").fetchall() == expected
    copy.close()
    con.close()


# --- who writes the file, and when (a Hydrator driven directly) ----------------------------------
#
# These tests run a Hydrator on a Replica of their own (hydration_rig.Rig), with a one-worker
# pool (its tasks run in submission order) and a client whose reads from that pool can be held
# or failed, so that each interleaving is forced rather than hoped for.

@pytest.fixture
def rig(replica, tmp_path, monkeypatch):
    # Small GETs: the ~400 pages make ~100 fetch tasks, and a catch-up of ~150 pages dozens.
    monkeypatch.setattr(hydrate, "RUN_BYTES", 16 * 1024)
    r = Rig(replica, tmp_path / "copy.db")
    yield r
    r.close()


def test_a_read_of_the_marked_state_never_gets_the_next_states_pages(rig):
    """The replica moves on right after the hydrator found its file current: the catch-up's
    writes must not be read as the old state (issue 12, item 6)."""
    h, primary = rig.hydrator, rig.primary
    h._lock, h._wake = HookLock(), SeenWaiting()
    h.start()
    t1 = rig.replica.state
    wait_for(lambda: h.state is t1)
    assert h._wake.waiting.wait(HOLD)  # the thread waits for news, the file marked as TXID 1
    old = page_bytes(primary.path)

    paused, go = threading.Event(), rig.gate()
    h._lock.after_release = lambda: (paused.set(), go.wait(HOLD))
    h._changed()  # wake it with nothing new (as its periodic timer does) ...
    assert paused.wait(HOLD)  # ... and hold it right after it looked: the poll lands here
    primary.commit("UPDATE t SET b = randomblob(2500) WHERE id <= 150")
    new = page_bytes(primary.path)
    changed = sorted(p for p in new if old.get(p) != new[p])
    second, gate, reads = threading.Event(), rig.gate(), []

    def hold_second_get():  # the first GET's pages are written; the second waits
        reads.append(1)
        if len(reads) == 2:
            second.set()
            gate.wait(HOLD)

    rig.client.hook = hold_second_get
    rig.replica.poll()
    t2 = rig.replica.state
    assert t2.txid == 2
    go.set()
    assert second.wait(HOLD), "the catch-up never made a second GET"
    wrong = [p for p in changed if h.read_page(t1, p) not in (None, old[p])]
    gate.set()
    assert not wrong, f"reads of TXID 1 got TXID 2's bytes from the file for pages {wrong}"
    wait_for(lambda: h.state is t2)
    assert {p: h.read_page(t2, p) for p in new} == new


def test_a_failed_catch_up_leaves_no_task_writing_after_the_retry_started(rig, monkeypatch):
    """A fetch task fails (a file removed by retention): the tasks of that attempt still queued
    must not write once the retry started (issue 12, item 6)."""
    from ltxvfs.errors import ObjectNotFoundError

    h, primary = rig.hydrator, rig.primary
    events: list[tuple] = []
    attempts = [0]
    real_hydrate, real_pwritev = hydrate.Hydrator._hydrate, os.pwritev
    unblock = rig.gate()

    def counted_hydrate(self, target):
        attempts[0] += 1
        rig.pool.tag = attempts[0]
        events.append(("attempt", attempts[0]))
        if attempts[0] == 3:  # the retry of the catch-up
            unblock.set()
        return real_hydrate(self, target)

    def recorded_pwritev(fd, buffers, offset):
        events.append(("write", getattr(tls, "tag", None), offset))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(hydrate.Hydrator, "_hydrate", counted_hydrate)
    monkeypatch.setattr(hydrate.os, "pwritev", recorded_pwritev)
    h.start()
    wait_for(lambda: h.state is rig.replica.state)
    assert attempts[0] == 1

    def fail_once():
        rig.client.hook = None
        raise ObjectNotFoundError("injected: the file went away (retention)")

    def queue_blocker_after_first_submit():  # the worker: failing task, blocker, the rest
        rig.pool.after = None
        rig.pool.block(unblock)

    rig.pool.after = queue_blocker_after_first_submit
    rig.client.hook = fail_once
    primary.commit("UPDATE t SET b = randomblob(2500) WHERE id <= 150")
    rig.replica.poll()
    wait_for(lambda: h.state is rig.replica.state)
    rig.pool.shutdown(wait=True)  # every task submitted has run (or was cancelled)
    assert attempts[0] == 3
    retry = events.index(("attempt", 3))
    late = [e for e in events[retry:] if e[0] == "write" and e[1] != 3]
    assert not late, f"tasks of the failed attempt wrote after the retry started: {late[:5]}"
    assert page_bytes(rig.path) == page_bytes(primary.path)


def test_pages_a_failed_attempt_wrote_are_rewritten_when_the_replica_goes_back(rig):
    """A catch-up to TXID 2 wrote some pages, then failed: TXID 2's file is gone (the replica
    was restored to TXID 1). The file, marked as TXID 1 again, must not keep TXID 2's pages
    (issue 12, item 6)."""
    from ltxvfs.errors import ObjectNotFoundError

    h, primary = rig.hydrator, rig.primary
    h.start()
    wait_for(lambda: h.state is rig.replica.state)
    old = page_bytes(primary.path)
    reads: list[int] = []
    gone: list = []

    def second_get_finds_the_file_gone():
        reads.append(1)
        if len(reads) == 2:
            rig.client.hook = None
            rig.inner.delete(gone)
            raise ObjectNotFoundError("injected: TXID 2's file is gone")

    rig.client.hook = second_get_finds_the_file_gone
    gone.append(primary.commit("UPDATE t SET b = randomblob(2500) WHERE id <= 150"))
    rig.replica.poll()
    wait_for(lambda: rig.replica.state.txid == 1 and h.state is rig.replica.state)
    assert len(reads) >= 2
    wrong = [p for p in old if h.read_page(h.state, p) != old[p]]
    assert not wrong, f"the file, marked as TXID 1, holds other bytes for pages {wrong}"


def test_close_returns_only_when_no_task_can_write_to_the_file(rig, monkeypatch):
    """After close() returns, nothing writes to the descriptor it closed (a reused descriptor
    number would receive pages meant for the copy) (issue 12, item 6)."""
    h = rig.hydrator
    closed, running, gate, later = threading.Event(), threading.Event(), rig.gate(), rig.gate()
    writes: list[tuple] = []
    real_pwritev, real_pwrite = os.pwritev, os.pwrite

    def record(fd, offset):
        # The first write once close() began goes through; any other waits until close()
        # has returned (the fetch task is held there, as a slow GET would hold it).
        if h._stop:
            writes.append(("after stop", fd, offset))
            if sum(w[0] == "after stop" for w in writes) > 1:
                later.wait(HOLD)
        writes.append((closed.is_set(), fd, offset))

    def pwritev(fd, buffers, offset):
        record(fd, offset)
        return real_pwritev(fd, buffers, offset)

    def pwrite(fd, data, offset):
        record(fd, offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(hydrate.os, "pwritev", pwritev)
    monkeypatch.setattr(hydrate.os, "pwrite", pwrite)

    def block_first():  # the worker holds until the test says so; every task queues behind
        rig.pool.before = None
        rig.pool.block(gate, running)

    rig.pool.before = block_first
    h.start()
    assert running.wait(HOLD)
    wait_for(lambda: rig.pool.submitted >= hydrate.PARALLEL)  # tasks are queued behind it
    fd = h._fd
    closer = threading.Thread(target=lambda: (h.close(), closed.set()))
    closer.start()
    wait_for(lambda: h._stop)
    gate.set()
    closer.join(HOLD)
    assert closed.is_set(), "close() did not return"
    later.set()
    rig.pool.shutdown(wait=True)  # whatever was still queued or running has finished now
    late = [(f, off) for after, f, off in writes if after is True]
    assert not late, f"writes to descriptor {fd} after close() returned: {late[:5]} ({len(late)})"
    assert not rig.path.exists()


def test_close_that_gives_up_waiting_leaves_the_descriptor_to_the_last_writer(rig, monkeypatch):
    """A fetch that hangs past close()'s wait: the descriptor is not closed under it; the
    thread closes it (and removes the file) once its last task finished (issue 12, item 6)."""
    monkeypatch.setattr(hydrate, "CLOSE_WAIT", 0.05, raising=False)
    h = rig.hydrator
    events: list[tuple] = []
    real_pwritev, real_close = os.pwritev, os.close
    entered, gate = threading.Event(), rig.gate()

    def hang_first_get():
        rig.client.hook = None
        entered.set()
        gate.wait(HOLD)

    def pwritev(fd, buffers, offset):
        events.append(("write", fd))
        return real_pwritev(fd, buffers, offset)

    def close(fd):
        events.append(("close", fd))
        return real_close(fd)

    monkeypatch.setattr(hydrate.os, "pwritev", pwritev)
    monkeypatch.setattr(hydrate.os, "close", close)
    rig.client.hook = hang_first_get
    h.start()
    fd = h._fd
    assert entered.wait(HOLD)
    h.close()  # gives up waiting after CLOSE_WAIT: the GET still hangs
    assert ("close", fd) not in events, "the descriptor was closed under a running task"
    gate.set()
    wait_for(lambda: ("close", fd) in events and not rig.path.exists())
    rig.pool.shutdown(wait=True)
    assert ("write", fd) not in events[events.index(("close", fd)):], events


# --- one hydration file, shared by the processes of a host ------------------------------------


def _shared_path_uri(replica, target, poll: str) -> str:
    return (f"file:db?vfs=litestream&replica_url={quote(replica.url, safe='')}"
            f"&poll_interval={poll}&hydration_path={quote(str(target), safe='')}")


def _settled(child) -> bool:
    progress = child.ask("read").get("progress", "")
    return progress == "100.0" or progress.startswith("failed")


def test_a_second_process_given_the_same_path_reads_the_copy_only_at_its_own_state(
        replica, tmp_path):
    """Web workers all given LITESTREAM_HYDRATION_PATH share one copy (issue 18): the second
    process reads the first one's file, but only while the file equals its own state — one
    transaction behind the copy it reads remotely (its own rows), and never writes or deletes
    the file (issue 12, item 16)."""
    target = tmp_path / "copies" / "copy.db"

    def uri(poll: str) -> str:
        return _shared_path_uri(replica, target, poll)

    sql = "SELECT id, b FROM t ORDER BY id"
    t1 = ("0000000000000001", 400, digest(replica.rows(sql)))
    a = Child(uri("50ms"), tmp_path / "a.log")
    b = None
    try:
        wait_for(lambda: a.ask("read")["progress"] == "100.0", timeout=60)
        b = Child(uri("1h"), tmp_path / "b.log")  # polls only when told to
        r = b.ask("read")
        assert (r["txid"], r["rows"], r["digest"], r["progress"]) == (*t1, "100.0"), r
        assert b.ask("stats")["hydration_role"] == "reader"
        replica.commit("DELETE FROM t WHERE id > 300", "UPDATE t SET b = x'02' WHERE id <= 50")
        t2 = ("0000000000000002", 300, digest(replica.rows(sql)))
        wait_for(lambda: (lambda r: (r["txid"], r["progress"]) == (t2[0], "100.0"))(a.ask("read")),
                 timeout=60)
        before = b.ask("stats")["hydration_file_reads"]
        r = b.ask("read")  # B has not polled: TXID 1, and TXID 1's rows, none from the copy
        assert (r.get("txid"), r.get("rows"), r.get("digest")) == t1, \
            f"B, at TXID 1, read {r} while A's copy holds TXID 2"
        assert r["progress"] == "99.9", r
        assert b.ask("stats")["hydration_file_reads"] == before
        assert b.ask("poll") == {"txid": t2[0]}
        r = b.ask("read")
        assert (r["txid"], r["rows"], r["digest"], r["progress"]) == (*t2, "100.0"), r
        assert b.ask("stats")["hydration_file_reads"] > before
        b.close()
        assert target.exists(), "B closing deleted A's hydration file"
        r = a.ask("read")
        assert (r["txid"], r["rows"], r["digest"], r["progress"]) == (*t2, "100.0"), r
        assert page_bytes(target) == page_bytes(replica.path)
        a.close()
        assert not target.exists()
        assert not target.with_name("copy.db.meta").exists()
    finally:
        a.kill()
        if b is not None:
            b.kill()


def test_a_second_process_closing_leaves_the_first_ones_file(replica, tmp_path):
    """The first process to close used to delete the file under the others (issue 12, item 16)."""
    target = tmp_path / "copy.db"
    a = Child(_shared_path_uri(replica, target, "50ms"), tmp_path / "a.log")
    b = None
    try:
        wait_for(lambda: a.ask("read")["progress"] == "100.0", timeout=60)
        b = Child(_shared_path_uri(replica, target, "50ms"), tmp_path / "b.log")
        wait_for(lambda: _settled(b), timeout=60)
        b.close()
        assert target.exists(), "B closing deleted A's hydration file"
        assert page_bytes(target) == page_bytes(replica.path)
        assert a.ask("read")["progress"] == "100.0"
        a.close()
        assert not target.exists()
    finally:
        a.kill()
        if b is not None:
            b.kill()


def test_a_record_removed_between_our_open_and_our_lock_is_opened_again(tmp_path, monkeypatch):
    """The last user removed the files (and then let go of its lock) after we opened the
    record: a lock on that removed record would guard nothing, so the path is opened again."""
    import fcntl

    from ltxvfs.host import sharedcopy

    path = tmp_path / "copy.db"
    meta = tmp_path / "copy.db.meta"
    meta.write_bytes(b"the previous users' record")
    real, calls = fcntl.flock, []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            meta.unlink()
        return real(fd, op)

    monkeypatch.setattr(sharedcopy.fcntl, "flock", flock)
    copy = sharedcopy.SharedCopy(path)
    copy.open()
    try:
        assert len(calls) == 2
        assert os.fstat(copy.mfd).st_ino == os.stat(meta).st_ino
        assert copy.try_build()
        other = sharedcopy.SharedCopy(path)
        other.open()  # a second user joins, and cannot build while we do
        assert not other.try_build()
        assert other.close(keep=False) is False  # not the last one: nothing deleted
        assert path.exists() and meta.exists()
    finally:
        assert copy.close(keep=False) is True
    assert not path.exists() and not meta.exists()
