"""Issue 18 item 3: polls shared by a host's processes (cache_dir), idle back-off, max_lag.

Host-level claims run real follower processes (tests/poll_proc.py, fork and spawn) on moto's S3
server, with this process publishing commits (FakePrimary). LISTs are counted by each process's
S3 client (``requests["LIST"]``). Counts are compared with poll *ticks* and polls, never with
wall time: a loaded machine ticks later, and every bound here holds per tick.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import urllib.parse
from pathlib import Path

import apsw
import poll_proc
import pytest

import ltxvfs
from ltxvfs.config import VFSConfig
from ltxvfs.errors import ConfigError
from ltxvfs.host.polls import RECORD, Listing, SharedPolls
from ltxvfs.storage import open_replica

from replicas import FakePrimary

RO = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
FLEET_VFS = "litestream-fleet"
WAIT = 60.0  # bound of every wait for a child


def uri(url: str, vfs: str = "litestream", **params: str) -> str:
    q = {"vfs": vfs, "replica_url": url, **params}
    return "file:db?" + urllib.parse.urlencode(q, quote_via=urllib.parse.quote)


def one(con, sql):
    return con.execute(sql).fetchall()[0][0]


@pytest.fixture
def vfs():
    return ltxvfs.register()


@pytest.fixture
def primary(tmp_path, s3_url):
    client = open_replica(s3_url)
    p = FakePrimary(tmp_path / "primary.db", client)
    p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT)",
             "INSERT INTO t VALUES (1, 'one')")
    p.url = s3_url
    yield p
    client.close()


class Fleet:
    """Follower processes; commands go to all of them and every reply is awaited (bounded)."""

    def __init__(self) -> None:
        self.procs: list = []
        self.conns: list = []

    def start(self, method: str, url: str, **params: str) -> None:
        ctx = multiprocessing.get_context(method)
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=poll_proc.follower,
                        args=(theirs, uri(url, FLEET_VFS, **params), FLEET_VFS), daemon=True)
        p.start()
        self.procs.append(p)
        self.conns.append(mine)

    def ask(self, *cmd, only=None) -> list[dict]:
        conns = self.conns if only is None else [self.conns[i] for i in only]
        for c in conns:
            c.send(cmd)
        out = []
        for c in conns:
            assert c.poll(WAIT), f"a follower did not answer {cmd!r}"
            out.append(c.recv())
        return out

    def close(self) -> None:
        for c, p in zip(self.conns, self.procs, strict=True):
            try:
                c.send(("close",))
                if c.poll(10):
                    c.recv()
            except (OSError, EOFError):
                pass
            p.join(10)
            if p.is_alive():
                p.kill()  # ours, by its object (pid)
                p.join(5)


@pytest.fixture
def fleet():
    f = Fleet()
    yield f
    f.close()


def deltas(before: list[dict], after: list[dict], key: str) -> list[int]:
    if key == "LIST":
        return [a["requests"]["LIST"] - b["requests"]["LIST"]
                for b, a in zip(before, after, strict=True)]
    return [a[key] - b[key] for b, a in zip(before, after, strict=True)]


# --- settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "message"), [
    ({"LITESTREAM_IDLE_POLL_INTERVAL": "0"}, "IDLE_POLL_INTERVAL '0': must be positive"),
    ({"LITESTREAM_IDLE_POLL_INTERVAL": "soon"}, "expected a duration"),
    ({"LITESTREAM_IDLE_POLL_INTERVAL": "500ms", "LITESTREAM_POLL_INTERVAL": "2s"},
     "IDLE_POLL_INTERVAL '500ms': less than poll_interval \\(2s\\)"),
    ({"LITESTREAM_MAX_LAG": "-1s"}, "MAX_LAG '-1s': must not be negative"),
    ({"LITESTREAM_MAX_LAG": "nan"}, "finite"),
])
def test_bad_poll_settings_are_config_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        VFSConfig.from_env(env)


def test_poll_settings_parse_and_default():
    cfg = VFSConfig.from_env({"LITESTREAM_IDLE_POLL_INTERVAL": "1m", "LITESTREAM_MAX_LAG": "0"})
    assert (cfg.idle_poll_interval, cfg.max_lag) == (60.0, 0.0)
    assert (VFSConfig().idle_poll_interval, VFSConfig().max_lag) == (30.0, None)
    # A poll interval above the default ceiling (given alone) means no back-off, not an error.
    assert VFSConfig().with_params({"poll_interval": "1m"}).idle_poll_interval == 30.0


def test_bad_poll_uri_parameters_fail_the_open(vfs, primary):
    with pytest.raises(apsw.CantOpenError, match="idle_poll_interval '10ms': less than"):
        apsw.Connection(uri(primary.url, poll_interval="1s", idle_poll_interval="10ms"), flags=RO)
    with pytest.raises(apsw.CantOpenError, match="max_lag '-2': must not be negative"):
        apsw.Connection(uri(primary.url, max_lag="-2"), flags=RO)


def test_max_lag_and_idle_ceiling_are_per_replica(vfs, primary):
    a = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="1h"), flags=RO)
    with pytest.raises(apsw.CantOpenError, match="max_lag=60s conflicts with max_lag=3600s"):
        apsw.Connection(uri(primary.url, max_lag="1m"), flags=RO)
    a.close()


# --- in one process: the record and the max_lag check -------------------------------------------

def _replica(vfs, url):
    return next(r for r in vfs.replicas() if r.client.url == url)


def test_stats_show_polls_lists_shared_and_the_interval(vfs, primary, tmp_path):
    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="1h",
                              cache_dir=str(tmp_path / "cache")), flags=RO)
    replica = _replica(vfs, primary.url)
    replica.poll_job()
    stats = ltxvfs.stats(con)
    assert (stats["polls"], stats["poll_lists"], stats["poll_shared"]) == (1, 1, 0)
    assert stats["poll_interval"] == 3600.0
    assert stats["lag_checks"] == 0
    con.close()


def _record_path(replica) -> Path:
    return replica.shared.directory / RECORD


@pytest.mark.parametrize("kind", ["torn", "foreign", "replaced", "tip-missing", "old",
                                  "future"])
def test_a_bad_poll_record_is_ignored(vfs, primary, tmp_path, kind):
    """A record another process could not have written for this replica's history is never
    used: the follower LISTs itself and reads the right rows."""
    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="1h",
                              cache_dir=str(tmp_path / "cache")), flags=RO)
    replica = _replica(vfs, primary.url)
    tip = replica.state.tip
    primary.commit("INSERT INTO t VALUES (2, 'two')")
    fake_next = [tip, type(tip)(0, tip.max_txid + 1, tip.max_txid + 1, 999, tip.created_at,
                                '"not-a-real-etag"')]
    path = _record_path(replica)
    if kind == "torn":
        replica.shared.write(Listing(tip.min_txid, time.time(), fake_next, False))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        other = SharedPolls(replica.shared.directory, "s3:elsewhere|b|p")
        other.write(Listing(tip.min_txid, time.time(), fake_next, False))
    elif kind == "replaced":  # our tip, but another object: a record of another history
        from dataclasses import replace
        old = replace(tip, etag='"another-history"')
        replica.shared.write(Listing(tip.min_txid, time.time(), [old, fake_next[1]], False))
    elif kind == "tip-missing":  # listed from our TXID, yet without our tip
        replica.shared.write(Listing(tip.min_txid, time.time(), fake_next[1:], False))
    elif kind == "old":  # made before our own last check: nothing we do not know
        replica.shared.write(Listing(tip.min_txid, replica._checked_wall - 1, fake_next, False))
    else:  # from the future: the clock moved back
        replica.shared.write(Listing(tip.min_txid, time.time() + 3600, fake_next, False))
    lists = replica.lists
    replica.poll(fresh=3600)
    assert replica.lists == lists + 1  # listed itself
    assert replica.replacements == 0
    assert con.execute("SELECT id, body FROM t ORDER BY id").fetchall() == \
        [(1, "one"), (2, "two")]
    con.close()


def test_a_good_record_answers_a_poll_and_the_files_come_from_storage(vfs, primary, tmp_path):
    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="1h",
                              cache_dir=str(tmp_path / "cache")), flags=RO)
    replica = _replica(vfs, primary.url)
    primary.commit("INSERT INTO t VALUES (2, 'two')")
    seek = replica.state.txid
    with open_replica(primary.url) as client:  # "another process" lists and writes the record
        files = client.list_files(0, seek=seek)
    SharedPolls(replica.shared.directory, replica.key).write(
        Listing(seek, time.time(), files, False))
    lists, requests = replica.lists, replica.client.requests["LIST"]
    replica.poll(fresh=3600)
    assert (replica.lists, replica.shared_used) == (lists, 1)
    assert replica.client.requests["LIST"] == requests
    assert con.execute("SELECT id, body FROM t ORDER BY id").fetchall() == \
        [(1, "one"), (2, "two")]
    assert oct(_record_path(replica).stat().st_mode & 0o777) == "0o600"
    con.close()


def test_a_held_lock_delays_a_poll_boundedly_then_it_lists_itself(tmp_path, monkeypatch):
    """Another process holds the poll lock (LISTing, or stopped): we wait for its record at most
    LOCK_WAIT, then LIST ourselves; a record that appears meanwhile is used at once."""
    import fcntl
    import os

    from ltxvfs.host import polls

    monkeypatch.setattr(polls, "LOCK_WAIT", 0.3)
    shared = SharedPolls(tmp_path / "polls", "s3:x|b|p")
    holder = os.open(tmp_path / "polls" / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: conflicts like a process
    calls = []
    try:
        got = shared.listing(5, 10.0, 0.0, lambda start: calls.append(start) or [])
        assert (got.shared, calls, shared.lists) == (False, [5], 1)
        # The holder's record appears: the next poll (newer than what we had) uses it, no LIST.
        other = SharedPolls(tmp_path / "polls", "s3:x|b|p")
        other.write(Listing(5, time.time(), [], False))
        got = shared.listing(5, 10.0, got.taken_at, lambda start: calls.append(start) or [])
        assert (got.shared, calls, shared.shared) == (True, [5], 1)
    finally:
        os.close(holder)


def test_a_read_after_an_idle_period_checks_first(vfs, primary):
    """No poll runs (the tick is an hour): the read transaction itself checks, because the
    last check is older than max_lag, and sees the commit made meanwhile."""
    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="0"), flags=RO)
    replica = _replica(vfs, primary.url)
    assert one(con, "SELECT count(*) FROM t") == 1
    primary.commit("INSERT INTO t VALUES (2, 'two')")
    assert one(con, "SELECT count(*) FROM t") == 2
    assert replica.checks >= 2 and replica.checks_late == 0
    con.close()


def test_a_read_within_max_lag_does_not_check(vfs, primary):
    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="1h"), flags=RO)
    replica = _replica(vfs, primary.url)
    lists = replica.client.requests["LIST"]
    for _ in range(5):
        assert one(con, "SELECT count(*) FROM t") == 1
    assert replica.checks == 0 and replica.client.requests["LIST"] == lists
    con.close()


def test_a_failed_check_reads_what_the_replica_has_and_says_so(vfs, primary, caplog):
    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="0"), flags=RO)
    replica = _replica(vfs, primary.url)
    from ltxvfs.errors import StorageError

    def down(*a, **kw):
        raise StorageError("simulated outage")

    real = replica.client.list_files
    replica.client.list_files = down
    try:
        assert one(con, "SELECT count(*) FROM t") == 1  # the state it has
        assert one(con, "SELECT count(*) FROM t") == 1  # no second wait right after
    finally:
        replica.client.list_files = real
    assert replica.checks == 1 and replica.checks_late == 1
    assert "could not check for new data before a read (simulated outage)" in caplog.text
    primary.commit("INSERT INTO t VALUES (2, 'two')")
    replica._check_failed = None  # as after max_lag (0 here) plus a poll interval
    assert one(con, "SELECT count(*) FROM t") == 2
    con.close()


def test_write_mode_does_not_check_before_reads(vfs, primary, tmp_path):
    con = apsw.Connection(uri(primary.url, max_lag="0", write_enabled="true",
                              buffer_path=str(tmp_path / "buf")),
                          flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
    replica = _replica(vfs, primary.url)
    con.execute("INSERT INTO t VALUES (5, 'five')")
    assert one(con, "SELECT count(*) FROM t") == 2
    assert replica.checks == 0
    con.close()


# --- real processes ---------------------------------------------------------------------------

@pytest.mark.slow
def test_eight_processes_share_one_poll_per_interval(fleet, primary, tmp_path):
    """8 followers (4 forked, 4 spawned) on one cache directory, busy (no back-off): each sees
    every commit, and the host's LISTs are at most 1.2x one process's polls (each of which,
    alone, would be a LIST) over the same commits."""
    params = {"poll_interval": "200ms", "idle_poll_interval": "200ms",
              "cache_dir": str(tmp_path / "cache")}
    for method in ("fork", "spawn") * 4:
        fleet.start(method, primary.url, **params)
    assert all(r["ok"] for r in fleet.ask("wait_rows", 1, WAIT))
    # Warm-up: every follower has polled with the record in place.
    fleet.ask("wait_ticks", 3, WAIT)
    before = fleet.ask("stats")
    for i in range(2, 12):
        primary.commit(f"INSERT INTO t VALUES ({i}, 'row {i}')")
        seen = fleet.ask("wait_rows", i, WAIT)
        assert all(r["ok"] and r["max"] == i for r in seen), seen
    after = fleet.ask("stats")
    lists, polls = deltas(before, after, "LIST"), deltas(before, after, "polls")
    shared = deltas(before, after, "shared")
    print(json.dumps({"lists": lists, "polls": polls, "shared": shared}))
    assert sum(lists) <= 1.2 * max(polls) + 2, (lists, polls)
    assert sum(shared) > 0
    assert [r["txid"] for r in after] == [primary.txid] * 8


@pytest.mark.slow
def test_an_idle_fleet_backs_off_and_a_late_read_sees_the_newest_commit(fleet, primary, tmp_path):
    """Idle followers poll after 2, 4, 8 ticks, then every 8 (400 ms at 50 ms ticks), and the
    host LISTs about once per such interval, not once per process. A read after the idle
    period sees the commit made during it (max_lag)."""
    max_lag = 0.3
    params = {"poll_interval": "50ms", "idle_poll_interval": "400ms", "max_lag": "300ms",
              "cache_dir": str(tmp_path / "cache")}
    for method in ("spawn", "fork") * 2:
        fleet.start(method, primary.url, **params)
    assert all(r["ok"] for r in fleet.ask("wait_rows", 1, WAIT))
    fleet.ask("wait_ticks", 16, WAIT)  # back-off reached its ceiling
    before = fleet.ask("stats")
    fleet.ask("wait_ticks", 64, WAIT, only=[0])  # ~3.2 s idle, counted in ticks
    primary.commit("INSERT INTO t VALUES (2, 'two')")
    committed = time.time()
    after = fleet.ask("stats")
    ticks, polls = deltas(before, after, "ticks"), deltas(before, after, "polls")
    lists = deltas(before, after, "LIST")
    print(json.dumps({"ticks": ticks, "polls": polls, "lists": lists}))
    for t, p in zip(ticks, polls, strict=True):
        assert p <= t // 8 + 1, (ticks, polls)  # every 8 ticks at most
    assert sum(lists) <= 1.2 * max(polls) + 2, (lists, polls)
    assert all(r["interval"] == pytest.approx(0.4) for r in after)
    # The guarantee is about time: once the commit is older than max_lag, every read sees it,
    # whatever the polls did. Waiting for that moment is the precondition, not a timing bound.
    time.sleep(max(committed + max_lag + 0.05 - time.time(), 0))
    reads = fleet.ask("read")
    assert [r.get("max") for r in reads] == [2] * 4, reads


@pytest.mark.slow
def test_two_hosts_each_list_for_themselves(fleet, primary, tmp_path):
    """Two cache directories stand for two hosts: each host's processes share among themselves
    only, so each host LISTs."""
    for host in ("a", "b"):
        for method in ("spawn", "fork"):
            fleet.start(method, primary.url, poll_interval="100ms", idle_poll_interval="100ms",
                        cache_dir=str(tmp_path / host))
    assert all(r["ok"] for r in fleet.ask("wait_rows", 1, WAIT))
    before = fleet.ask("stats")
    for i in range(2, 6):
        primary.commit(f"INSERT INTO t VALUES ({i}, 'x')")
        assert all(r["ok"] for r in fleet.ask("wait_rows", i, WAIT))
    after = fleet.ask("stats")
    lists, polls = deltas(before, after, "LIST"), deltas(before, after, "polls")
    print(json.dumps({"lists": lists, "polls": polls}))
    host_a, host_b = sum(lists[:2]), sum(lists[2:])
    assert host_a > 0 and host_b > 0
    assert host_a <= 1.2 * max(polls[:2]) + 2 and host_b <= 1.2 * max(polls[2:]) + 2
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()


def test_the_lister_lists_from_the_previous_records_txid_when_a_little_behind(tmp_path):
    """A process one commit behind the lister can still use the lister's record: the LIST
    starts from the previous record's TXID (a few more names, no more requests)."""
    shared = SharedPolls(tmp_path / "polls", "s3:x|b|p")
    shared.write(Listing(3, time.time() - 5, [], False))
    calls = []
    got = shared.listing(5, 1.0, time.time(), lambda start: calls.append(start) or [])
    assert calls == [3] and got.seek == 3 and shared.read().seek == 3
    shared.write(Listing(1, time.time() - 5, [], False))  # far behind: from our own TXID
    shared.listing(500, 1.0, time.time(), lambda start: calls.append(start) or [])
    assert calls == [3, 500]


def test_a_deleted_polls_directory_is_recreated_and_polls_go_on(vfs, primary, tmp_path):
    import shutil

    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="1h",
                              cache_dir=str(tmp_path / "cache")), flags=RO)
    replica = _replica(vfs, primary.url)
    replica.poll(fresh=3600)
    shutil.rmtree(replica.shared.directory)
    primary.commit("INSERT INTO t VALUES (2, 'two')")
    replica.poll(fresh=3600)
    assert replica.last_error is None
    assert _record_path(replica).exists()
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(2,)]
    con.close()


def test_an_unusable_cache_dir_leaves_each_process_polling_alone(vfs, primary, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    con = apsw.Connection(uri(primary.url, poll_interval="1h", max_lag="1h",
                              cache_dir=str(blocker / "cache")), flags=RO)
    replica = _replica(vfs, primary.url)
    assert replica.shared is None
    primary.commit("INSERT INTO t VALUES (2, 'two')")
    replica.poll(fresh=3600)
    assert replica.lists == 1
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(2,)]
    con.close()
