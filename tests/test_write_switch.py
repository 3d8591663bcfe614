"""Turning write mode on and off, and opening one replica from many threads: never two writers,
never a half-set-up replica, never a commit acknowledged into a buffer that is going away.
Regression tests of issue 12, items 5, 9 and 14. Each race is forced at its exact point by a
hook (an Event), not left to timing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import apsw
import pytest
from test_views import open_reader

import ltxvfs
from ltxvfs.errors import StorageError
from ltxvfs.vfs import LitestreamVFS
from ltxvfs.writer import Writer

from test_write import RW, rows, uri, writer
from test_write_sqlite_modes import restored_rows

#: How long a hook waits for the racing thread to reach the same point. On the old code the
#: racer arrives at once; with the fix it never comes and the hook goes on after this.
RACE_WINDOW = 3.0


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def seeded(tmp_path: Path) -> str:
    """A file:// replica with table t(id, v) holding row 0 (TXID 1), and no open connection."""
    url = (tmp_path / "replica").as_uri()
    con = apsw.Connection(uri(url, tmp_path / "seed"), flags=RW)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.execute("INSERT INTO t VALUES (0, 'seed')")
    con.close()
    return url


def run(target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def join(*threads: threading.Thread) -> None:
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread hung"


def test_two_connections_enabling_write_mode_at_once_make_one_writer(vfs, tmp_path, monkeypatch):
    url = seeded(tmp_path)
    base = apsw.Connection(f"file:db?vfs=litestream&replica_url={url}", flags=RW)  # read mode
    opened: list[Path] = []
    second = threading.Event()
    real_open = Writer.open

    def open_slowly(self):
        opened.append(self.buffer.path)
        if len(opened) == 1:
            second.wait(RACE_WINDOW)  # the old code let the second enabler in meanwhile
        else:
            second.set()
        return real_open(self)

    monkeypatch.setattr(Writer, "open", open_slowly)
    cons: dict[str, apsw.Connection] = {}
    errors: list[BaseException] = []

    def open_writer(name: str) -> None:
        try:
            con = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
            con.set_busy_timeout(10_000)
            cons[name] = con
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    t1 = run(open_writer, "a")
    while not opened and t1.is_alive():
        t1.join(0.01)
    t2 = run(open_writer, "b")
    join(t1, t2)
    assert not errors, errors
    assert opened == [tmp_path / "buf"], f"write mode was set up more than once: {opened}"
    cons["a"].execute("INSERT INTO t VALUES (1, 'a')")
    cons["b"].execute("INSERT INTO t VALUES (2, 'b')")
    for con in (*cons.values(), base):
        con.close()
    assert restored_rows(url, tmp_path / "out.db") == [(0, "seed"), (1, "a"), (2, "b")]


def test_opening_while_the_last_connection_closes_waits_for_it(vfs, tmp_path, monkeypatch):
    url = seeded(tmp_path)
    first = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    first.execute("INSERT INTO t VALUES (1, 'first')")
    buffers: list[Path] = []
    closing, reopened = threading.Event(), threading.Event()
    real_close, real_init = Writer.close, Writer.__init__

    def close_slowly(self):
        closing.set()
        reopened.wait(RACE_WINDOW)  # the old code opened a second replica and writer meanwhile
        return real_close(self)

    def init(self, replica, path):
        buffers.append(path)
        if len(buffers) > 1:
            reopened.set()
        real_init(self, replica, path)

    monkeypatch.setattr(Writer, "close", close_slowly)
    monkeypatch.setattr(Writer, "__init__", init)
    t = run(first.close)
    assert closing.wait(30)
    second = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    join(t)
    monkeypatch.undo()
    assert buffers == [tmp_path / "buf"], f"a second writer while the first was closing: {buffers}"
    second.execute("INSERT INTO t VALUES (2, 'second')")
    assert rows(second) == [(0, "seed"), (1, "first"), (2, "second")]
    second.close()
    assert restored_rows(url, tmp_path / "out.db") == [(0, "seed"), (1, "first"), (2, "second")]


def test_a_write_connection_never_joins_a_replica_opened_without_write_mode(
        vfs, tmp_path, monkeypatch):
    """Two threads open a new replica at once, the read-only one first: the old code gave the
    writer the reader's replica without turning write mode on."""
    url = seeded(tmp_path)
    entered: list[str] = []
    both = threading.Event()
    real = LitestreamVFS._open_replica

    def open_replica(self, cfg):
        entered.append("rw" if cfg.write_enabled else "ro")
        if len(entered) == 1:
            both.wait(RACE_WINDOW)
        else:
            both.set()
        return real(self, cfg)

    monkeypatch.setattr(LitestreamVFS, "_open_replica", open_replica)
    cons: dict[str, apsw.Connection] = {}

    def opener(kind: str) -> None:
        extra = "" if kind == "ro" else f"&write_enabled=true&buffer_path={tmp_path / 'buf'}"
        cons[kind] = apsw.Connection(f"file:db?vfs=litestream&replica_url={url}{extra}", flags=RW)

    t1 = run(opener, "ro")
    while not entered and t1.is_alive():
        t1.join(0.01)
    t2 = run(opener, "rw")
    join(t1, t2)
    monkeypatch.undo()
    cons["rw"].execute("INSERT INTO t VALUES (1, 'written')")
    assert cons["rw"].execute("PRAGMA litestream_sync").fetchall() == [(f"{2:016x}",)]
    for con in cons.values():
        con.close()
    assert restored_rows(url, tmp_path / "out.db") == [(0, "seed"), (1, "written")]


def _hook_first_sync(monkeypatch, action):
    """Run ``action()`` right after the first ``Writer.sync`` call made while armed."""
    real_sync = Writer.sync
    armed = {"on": False}

    def sync(self):
        result = real_sync(self)
        if armed["on"]:
            armed["on"] = False
            action(self)
        return result

    monkeypatch.setattr(Writer, "sync", sync)
    return armed


def test_turning_write_mode_off_never_strands_a_write_transaction(vfs, tmp_path, monkeypatch):
    """A connection starting to write while write mode is being turned off: either its
    transaction is refused at the start, or the switch is refused and the commit lands."""
    url = seeded(tmp_path)
    switcher = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    other = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    began: list[bool] = []

    def begin_writing(_writer):
        try:
            other.execute("BEGIN IMMEDIATE")
            began.append(True)
        except apsw.BusyError:
            began.append(False)

    armed = _hook_first_sync(monkeypatch, begin_writing)
    armed["on"] = True
    try:
        switcher.execute("PRAGMA litestream_write_enabled = 0")
        switched = True
    except apsw.BusyError as err:
        assert "a write transaction is open" in str(err)
        switched = False
    assert began, "the hook did not run"
    if began[0]:
        assert not switched, "write mode was turned off under an open write transaction"
        other.execute("INSERT INTO t VALUES (1, 'other')")
        other.execute("COMMIT")  # the old code: ReadOnlyError here
        assert switcher.execute("PRAGMA litestream_write_enabled = 0").fetchall() == [("0",)]
        expected = [(0, "seed"), (1, "other")]
    else:
        assert switched
        expected = [(0, "seed")]
    assert rows(switcher) == expected
    other.close()
    switcher.close()
    assert restored_rows(url, tmp_path / "out.db") == expected


def test_a_failed_final_sync_leaves_write_mode_whole(vfs, tmp_path, monkeypatch):
    """A commit lands after the switch's first sync, then the store fails: the old code was
    left half-off (no writer, no polling, the commit stuck in the buffer)."""
    url = seeded(tmp_path)
    switcher = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    other = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    replica = next(r for r in vfs.replicas() if r.writer is not None and
                   r.writer.buffer.path == tmp_path / "buf")
    real_write = replica.client.write
    broken = {"on": False}

    def write(*args, **kwargs):
        if broken["on"]:
            raise StorageError("injected: the store is down")
        return real_write(*args, **kwargs)

    replica.client.write = write

    def commit_then_break(_writer):
        other.execute("INSERT INTO t VALUES (1, 'late')")
        broken["on"] = True

    armed = _hook_first_sync(monkeypatch, commit_then_break)
    switcher.execute("INSERT INTO t VALUES (2, 'before')")
    armed["on"] = True
    with pytest.raises(apsw.SQLError, match="injected: the store is down"):
        switcher.execute("PRAGMA litestream_write_enabled = 0")
    assert switcher.execute("PRAGMA litestream_write_enabled").fetchall() == [("1",)]
    assert replica.writer is not None and not replica.writer.closed
    other.execute("INSERT INTO t VALUES (3, 'still writing')")
    broken["on"] = False
    assert switcher.execute("PRAGMA litestream_write_enabled = 0").fetchall() == [("0",)]
    expected = [(0, "seed"), (1, "late"), (2, "before"), (3, "still writing")]
    assert rows(other) == expected
    del replica.client.write
    other.close()
    switcher.close()
    assert restored_rows(url, tmp_path / "out.db") == expected


@pytest.mark.parametrize("spelling", ["trailing-slash", "path-vs-file-url"])
def test_one_replica_however_its_url_is_spelled(vfs, tmp_path, spelling, request):
    if spelling == "trailing-slash":
        url = request.getfixturevalue("s3_url")
        base, query = url.split("?", 1)
        other = f"{base}/?{query}"
    else:
        url = (tmp_path / "replica").as_uri()
        other = str(tmp_path / "replica")
    a = apsw.Connection(uri(url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    a.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    b = apsw.Connection(uri(other, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    b.set_busy_timeout(5000)
    assert len([r for r in vfs.replicas() if r.writer is not None]) == 1
    a.execute("INSERT INTO t VALUES (1, 'a')")
    b.execute("INSERT INTO t VALUES (2, 'b')")
    assert rows(a) == rows(b) == [(1, "a"), (2, "b")]
    a.close()
    b.close()
    assert restored_rows(url, tmp_path / "out.db") == [(1, "a"), (2, "b")]


def test_two_replicas_may_not_share_one_buffer_file(vfs, tmp_path):
    a = apsw.Connection(uri((tmp_path / "x").as_uri(), tmp_path / "buf"), flags=RW)
    with pytest.raises(apsw.CantOpenError, match="already the write buffer of another replica"):
        apsw.Connection(uri((tmp_path / "y").as_uri(), tmp_path / "buf"), flags=RW)
    a.close()


def test_a_busy_wait_does_not_freeze_every_other_thread(vfs, tmp_path):
    """A user with one writer thread and a few reader threads (each its own connection, with a
    busy timeout — the ordinary way to share a database between threads) sees the whole process
    crawl: measured 2 commits and 5 reads in 10 s with 3 readers, against ~24,000 commits and ~700
    reads when busy waits let the GIL go.

    Why: SQLite's busy handler sleeps through the VFS's ``xSleep``. LitestreamVFS inherits
    apsw.VFS.xSleep, which calls the base VFS's sleep *holding the GIL*; every other thread —
    including the one whose lock the sleeper waits for, whose xUnlock is Python — is frozen for
    the whole sleep (up to 100 ms at a time). Here a pure-Python thread is starved while one
    connection waits (1.5 s busy timeout) for a reader's SHARED lock.
    """
    url = (tmp_path / "replica").as_uri()
    w = writer(url, tmp_path, sync_interval="-1s", poll_interval="1h")
    w.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    w.execute("INSERT INTO t(v) VALUES (1)")
    r = open_reader(url)
    r.execute("BEGIN")
    assert rows(r, "SELECT count(*) FROM t") == [(1,)]  # holds SHARED: w cannot commit
    w.set_busy_timeout(1500)

    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            w.execute("INSERT INTO t(v) VALUES (2)")
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    t = threading.Thread(target=write)
    stamps: list[float] = []
    t.start()
    while t.is_alive():  # a pure-Python thread: how much of the wait does it get to run?
        stamps.append(time.monotonic())
    t.join()
    r.execute("COMMIT")
    assert isinstance(outcome[0], apsw.BusyError)  # the reader never let go: that is expected
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    frozen = sum(g for g in gaps if g > 0.03)
    total = stamps[-1] - stamps[0]
    assert frozen < total / 2, (f"the main thread was frozen {frozen:.2f} s of the {total:.2f} s "
                                "another connection spent in its busy wait")
    r.close()
    w.close()


def test_turning_write_mode_off_is_not_starved_by_overlapping_readers(vfs, tmp_path):
    """Reader threads whose read transactions overlap (there is never a moment without one)
    starved the switch: it checked and refused at once, every time (found by review: 1
    successful switch in 25 s). Now it holds new transactions back, as SQLite's PENDING lock
    does for a waiting writer, and waits for the open ones to end."""
    url = (tmp_path / "replica").as_uri()
    w = writer(url, tmp_path, sync_interval="-1s", poll_interval="1h")
    w.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    w.execute("INSERT INTO t(v) VALUES (1)")
    w.set_busy_timeout(5000)
    stop = threading.Event()
    reads = [0, 0, 0]
    progress = threading.Condition()
    errors: list[BaseException] = []

    def wait_for_reads(n: int) -> None:
        with progress:
            assert progress.wait_for(lambda: sum(reads) >= n or errors, timeout=30), reads

    def read_loop(k: int) -> None:
        con = open_reader(url)
        con.set_busy_timeout(10_000)
        try:
            while not stop.is_set():
                con.execute("BEGIN")
                for _ in range(20):  # a transaction that lasts a while
                    assert con.execute("SELECT count(*) FROM t").fetchall() == [(1,)]
                con.execute("COMMIT")
                with progress:
                    reads[k] += 1
                    progress.notify_all()
        except BaseException as err:
            errors.append(err)
        finally:
            con.close()

    threads = [run(read_loop, k) for k in range(3)]
    try:
        wait_for_reads(6)
        assert w.execute("PRAGMA litestream_write_enabled = 0").fetchall() == [("0",)]
        wait_for_reads(sum(reads) + 6)  # the readers go on, now following the replica
    finally:
        stop.set()
        join(*threads)
    assert not errors, errors
    w.close()


def test_write_mode_switched_on_and_off_by_pragma_round_trip(vfs, tmp_path, monkeypatch):
    """A connection opened for reading turns write mode on, writes, off (its commits synced,
    its buffer gone, writes refused with a reason), on again, writes again: every commit is on
    the replica, and the buffer lived where the documented default says."""
    from urllib.parse import quote

    from ltxvfs.storage import parse_replica_url
    from ltxvfs.writer import default_buffer_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url = seeded(tmp_path)
    buffer = default_buffer_path(parse_replica_url(url).identity)
    assert str(buffer).startswith(str(tmp_path / "state"))
    con = apsw.Connection(f"file:db?vfs=litestream&replica_url={quote(url, safe='')}"
                          "&poll_interval=1h&sync_interval=-1s", flags=RW)
    con.set_busy_timeout(0)
    assert rows(con, "PRAGMA litestream_write_enabled") == [("0",)]
    with pytest.raises(apsw.ReadOnlyError, match=r"the database is read-only \(write mode is off\)"):
        con.execute("INSERT INTO t VALUES (1, 'refused')")
    assert rows(con, "PRAGMA litestream_write_enabled = 1") == [("1",)]
    con.execute("INSERT INTO t VALUES (1, 'first')")
    assert buffer.exists() and (buffer.stat().st_mode & 0o777) == 0o600
    assert rows(con, "PRAGMA litestream_txid") == [(f"{1:016x}",)], "not synced yet"
    assert rows(con, "PRAGMA litestream_write_enabled = 0") == [("0",)]
    assert not buffer.exists(), "turning write mode off syncs and removes the buffer"
    assert rows(con, "PRAGMA litestream_txid") == [(f"{2:016x}",)]
    with pytest.raises(apsw.ReadOnlyError, match=r"the database is read-only \(write mode is off\)"):
        con.execute("INSERT INTO t VALUES (2, 'refused')")
    assert rows(con, "PRAGMA litestream_write_enabled = 1") == [("1",)]
    con.execute("INSERT INTO t VALUES (2, 'second')")
    assert rows(con) == [(0, "seed"), (1, "first"), (2, "second")]
    con.close()
    assert restored_rows(url, tmp_path / "out.db") == [(0, "seed"), (1, "first"), (2, "second")]


def test_write_mode_is_not_turned_on_from_a_state_a_failed_poll_could_not_check(vfs, tmp_path,
                                                                                 monkeypatch):
    """Found by the simulation: turning write mode on polls first, but a poll that failed
    (storage unavailable) went unnoticed, and the writer started from the follower's old state.
    When the replica had been replaced meanwhile (a restored primary: a new history with fewer
    TXIDs) the writer's reads showed the old history and its first sync uploaded TXID 4 on top of
    the new TXID 1 — a replica that restores to nothing (a gap) or to a mix of two histories."""
    from ltxvfs.plan import list_levels
    from ltxvfs.storage import open_replica

    from replicas import FakePrimary

    url = (tmp_path / "replica").as_uri()
    client = open_replica(url)
    old = FakePrimary(tmp_path / "old.db", client)
    old.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", "INSERT INTO t VALUES (1, 'old')")
    old.commit("INSERT INTO t VALUES (2, 'old')")
    old.commit("INSERT INTO t VALUES (3, 'old')")
    con = apsw.Connection(f"file:db?vfs=litestream&replica_url={url}&poll_interval=1h"
                          f"&sync_interval=-1s&buffer_path={tmp_path / 'buf'}", flags=RW)
    assert rows(con) == [(1, "old"), (2, "old"), (3, "old")]
    # The primary is restored from an older backup: a new history, TXID 1 only.
    client.delete([f for fs in list_levels(client).values() for f in fs])
    new = FakePrimary(tmp_path / "new.db", client)
    new.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", "INSERT INTO t VALUES (1, 'new')")
    replica = next(r for r in vfs.replicas() if r.client.url == url)

    def unavailable(*args, **kwargs):
        raise StorageError("storage unavailable (test)")

    monkeypatch.setattr(replica.client, "list_files", unavailable)
    with pytest.raises(apsw.SQLError, match="storage unavailable"):
        con.execute("PRAGMA litestream_write_enabled = 1")
    assert con.execute("PRAGMA litestream_write_enabled").fetchall() == [("0",)]
    monkeypatch.undo()
    con.execute("PRAGMA litestream_write_enabled = 1")  # storage is back: from the new history
    assert rows(con) == [(1, "new")]
    con.execute("INSERT INTO t VALUES (2, 'ours')")
    assert con.execute("PRAGMA litestream_sync").fetchall() == [(f"{2:016x}",)]
    con.close()
    assert restored_rows(url, tmp_path / "out.db") == [(1, "new"), (2, "ours")]
    client.close()
