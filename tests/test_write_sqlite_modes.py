"""Write mode under SQLite's own settings: ``synchronous``, ``locking_mode``, ``journal_mode``, and
rollback journals of databases that share a name. Regression tests of issue 12, items 1, 2, 13.

What each ``synchronous`` level guarantees in write mode (docs/write-mode.md):

* every level, every ``locking_mode``: a commit is in the write buffer (``write()``) before
  COMMIT returns, so a process crash (kill -9) loses no acknowledged commit;
* NORMAL, FULL, EXTRA: the buffer is also fsynced before COMMIT returns (power loss) — with
  one ``fdatasync``, which flushes the data alone while the commit stays inside the buffer's
  preallocated zero tail (the file's size does not change);
* OFF: no fsync — an operating-system crash or power loss can lose recent commits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

import ltxvfs
import ltxvfs.localfiles
from ltxvfs.bufferlog import HEADER, scan
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

from test_write import RW, rows, uri, writer

HERE = Path(__file__).parent
PREALLOC = 16 << 10  # the kill -9 tests' writers grow the zero tail every few commits
MODES = [(sync, lock) for sync in ("OFF", "NORMAL", "FULL", "EXTRA")
         for lock in ("NORMAL", "EXCLUSIVE")]


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def restored_rows(url: str, out: Path, sql: str = "SELECT * FROM t ORDER BY id") -> list[tuple]:
    import sqlite3

    with open_replica(url) as client:
        path = restore(client, out).path
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute(sql).fetchall()
    finally:
        con.close()


# --- item 2: the end of a transaction in every mode ---------------------------------------------

@pytest.mark.parametrize(("synchronous", "locking_mode"), MODES)
def test_every_commit_reaches_the_buffer_and_the_replica(vfs, tmp_path, synchronous, locking_mode):
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="-1s")
    con.execute(f"PRAGMA synchronous = {synchronous}")
    con.execute(f"PRAGMA locking_mode = {locking_mode}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(5):
        con.execute("INSERT INTO t VALUES (?, ?)", (i, f"v{i}"))
    txid = con.execute("PRAGMA litestream_sync").fetchall()[0][0]
    assert txid == f"{1:016x}", "committed transactions were not in the buffer"
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (99, 'rolled back')")
    con.execute("ROLLBACK")
    con.execute("INSERT INTO t VALUES (5, 'v5')")
    assert con.execute("PRAGMA litestream_sync").fetchall()[0][0] == f"{2:016x}"
    expected = [(i, f"v{i}") for i in range(6)]
    assert rows(con) == expected
    con.close()
    assert restored_rows(url, tmp_path / "out.db") == expected


@pytest.mark.parametrize(("synchronous", "locking_mode"), MODES)
def test_fsync_before_commit_returns_unless_synchronous_is_off(vfs, tmp_path, monkeypatch,
                                                               synchronous, locking_mode):
    """One ``fdatasync`` of the buffer per commit (none at OFF), no ``fsync``; the buffer file's
    size stays the same from commit to commit inside its preallocated tail, so that
    ``fdatasync`` has no metadata to journal."""
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="-1s")
    con.execute(f"PRAGMA synchronous = {synchronous}")
    con.execute(f"PRAGMA locking_mode = {locking_mode}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    buffer = next(r for r in vfs.replicas() if r.client.url == url).writer.buffer
    buffer_fd, size = buffer._fd, os.fstat(buffer._fd).st_size
    assert size - buffer._end > 3 * 3 * 4200, "the tail has room for the commits below"
    calls: list[tuple[str, int]] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, name=name, real=real: (calls.append((name, fd)),
                                                                        real(fd))[1])
    for i in range(3):
        before = len(calls)
        con.execute("INSERT INTO t VALUES (?, 'x')", (i,))
        mine = [name for name, fd in calls[before:] if fd == buffer_fd]
        assert mine == ([] if synchronous == "OFF" else ["fdatasync"]), (synchronous, calls)
        assert os.fstat(buffer_fd).st_size == size, "the buffer file grew at a commit"
    monkeypatch.undo()
    con.close()


@pytest.mark.parametrize(("synchronous", "locking_mode"), MODES)
def test_no_acknowledged_commit_is_lost_to_kill_nine(tmp_path, synchronous, locking_mode):
    url = (tmp_path / "replica").as_uri()
    u = uri(url, tmp_path / "buf", sync_interval="-1s")
    env = {**os.environ, "WRITER_PRAGMAS": f"synchronous={synchronous};locking_mode={locking_mode}",
           "WRITER_PREALLOC": str(PREALLOC)}
    p = subprocess.Popen([sys.executable, str(HERE / "writer_proc.py"), u, "1", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("committed"):
            seen.append(int(line.split()[1]))
            if len(seen) == 30:
                break
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert len(seen) == 30, p.stderr.read() if p.stderr else ""
    # What the crash left: committed records, then the zero tail (no phantom record in it).
    fd = os.open(tmp_path / "buf", os.O_RDONLY)
    try:
        found = scan(fd, tmp_path / "buf", HEADER.unpack(os.pread(fd, HEADER.size, 0))[5])
        size = os.fstat(fd).st_size
        # The kill lands anywhere: inside a zero tail, between the write of records that
        # reached the tail's end and the next tail's zeros, or in the middle of a transaction's
        # pwrite (a fatal signal can cut a write to a regular file short: measured here, the
        # bytes after the last whole record were a torn record in 2-3 of 8 runs on a quiet
        # machine). scan() has already refused the file if a whole COMMIT followed a torn
        # record; what recovery makes of the rest is checked below.
        assert size >= found.end, "the scan read past the file"
    finally:
        os.close(fd)
    assert found.commits >= len(seen) + 1  # CREATE TABLE, then each acknowledged row at least
    ltxvfs.register()
    con = apsw.Connection(u, flags=RW)  # recovers the buffer and syncs it
    got = [r[0] for r in con.execute("SELECT id FROM t ORDER BY id")]
    con.close()
    assert set(seen) <= set(got) and got == list(range(1, len(got) + 1))
    assert [r[0] for r in restored_rows(url, tmp_path / "r.db", "SELECT id FROM t ORDER BY id")] == got


# --- item 13: WAL is refused before anything is written -----------------------------------------

@pytest.mark.parametrize("locking_mode", ["NORMAL", "EXCLUSIVE"])
def test_wal_is_refused_cleanly_in_write_mode(vfs, tmp_path, locking_mode):
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path)
    con.execute(f"PRAGMA locking_mode = {locking_mode}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.execute("INSERT INTO t VALUES (1, 'a')")
    with pytest.raises(apsw.SQLError, match="journal_mode=WAL is not supported"):
        con.execute("PRAGMA journal_mode = WAL")
    assert con.execute("PRAGMA journal_mode").fetchall() == [("delete",)]
    con.execute("INSERT INTO t VALUES (2, 'b')")  # the connection is still usable
    assert rows(con) == [(1, "a"), (2, "b")]
    con.close()
    out = tmp_path / "out.db"
    assert restored_rows(url, out) == [(1, "a"), (2, "b")]
    header = out.read_bytes()[:100]
    assert header[18:20] == b"\x01\x01", "page 1 says WAL"


# --- item 1: journals of databases with one name on two replicas --------------------------------

def test_rollback_journals_are_not_shared_between_replicas_of_one_name(vfs, tmp_path):
    x, y = (tmp_path / "x").as_uri(), (tmp_path / "y").as_uri()
    a = writer(x, tmp_path, name="bufx", sync_interval="-1s")  # both are "file:db?…"
    b = writer(y, tmp_path, name="bufy", sync_interval="-1s")
    for con in (a, b):
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        con.execute("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 300)"
                    " INSERT INTO t SELECT i, 'old', randomblob(400) FROM s")
    original = rows(a, "SELECT id, v, pad FROM t ORDER BY id")
    a.execute("PRAGMA cache_size = 10")
    a.execute("BEGIN")
    a.execute("UPDATE t SET v = 'new'")  # spills to the database: the journal matters
    b.execute("BEGIN")
    b.execute("UPDATE t SET v = 'b'")
    b.execute("COMMIT")  # wrote (and deleted) its own journal
    a.execute("ROLLBACK")
    assert rows(a, "SELECT id, v, pad FROM t ORDER BY id") == original
    assert a.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    a.execute("PRAGMA litestream_sync")
    a.close()
    b.close()
    assert restored_rows(x, tmp_path / "x.db", "SELECT id, v, pad FROM t ORDER BY id") == original
    assert {v for _, v in restored_rows(y, tmp_path / "y.db", "SELECT id, v FROM t")} == {"b"}


@pytest.mark.parametrize("where", ["memory", "file"])
def test_journals_and_their_stand_ins_go_when_the_database_closes(vfs, tmp_path, monkeypatch,
                                                                  where):
    """A journal lives in memory until it outgrows SPILL, then in the private directory; either
    way it goes when the database closes (PERSIST keeps it until then)."""
    if where == "file":
        monkeypatch.setattr(ltxvfs.localfiles, "SPILL", 0)
    url = (tmp_path / "replica").as_uri()
    scratch_before = set(os.listdir(vfs._private_dir()))
    for _ in range(3):
        con = writer(url, tmp_path)
        con.execute("PRAGMA journal_mode = PERSIST")  # leaves its journal behind
        con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY)")
        con.execute("INSERT INTO t DEFAULT VALUES")
        journal = con.filename + "-journal"
        assert vfs.journals.exists(journal), "PERSIST keeps the journal"
        on_disk = {n for n in set(os.listdir(vfs._private_dir())) - scratch_before
                   if n.endswith("-journal")}
        assert len(on_disk) == (1 if where == "file" else 0)
        con.close()
        assert not vfs.journals.exists(journal)
        assert set(os.listdir(vfs._private_dir())) == scratch_before


@pytest.mark.parametrize("spill", [1 << 20, 0, 64 << 10])  # memory / file / moved mid-transaction
@pytest.mark.parametrize("journal_mode", ["DELETE", "PERSIST", "TRUNCATE"])
def test_a_rollback_plays_the_journal_back_wherever_it_lives(vfs, tmp_path, monkeypatch, spill,
                                                              journal_mode):
    monkeypatch.setattr(ltxvfs.localfiles, "SPILL", spill)
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="-1s")
    con.execute(f"PRAGMA journal_mode = {journal_mode}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
    con.execute("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 400)"
                " INSERT INTO t SELECT i, 'old', randomblob(400) FROM s")
    original = rows(con, "SELECT id, v, pad FROM t ORDER BY id")
    con.execute("PRAGMA cache_size = 10")
    for _ in range(2):  # the second time reuses what PERSIST/TRUNCATE left
        con.execute("BEGIN")
        con.execute("UPDATE t SET v = 'new'")  # spills pages: the journal is played back
        con.execute("DELETE FROM t WHERE id > 200")
        con.execute("ROLLBACK")
        assert rows(con, "SELECT id, v, pad FROM t ORDER BY id") == original
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.execute("UPDATE t SET v = 'committed' WHERE id = 1")
    con.execute("PRAGMA litestream_sync")
    con.close()
    want = [(1, "committed"), *((i, v) for i, v, _ in original[1:])]
    assert restored_rows(url, tmp_path / "out.db", "SELECT id, v FROM t ORDER BY id") == want


def test_changing_the_page_size_is_refused_not_accepted_and_then_every_write_fails(vfs, tmp_path):
    """docs/write-mode.md lists "changing the page size of an existing database (PRAGMA page_size
    + VACUUM)" under *not supported*. A user who tries it sees it *succeed*: VACUUM returns, the
    connection says page_size 8192, the change is synced (page 1 now says 8192 inside LTX files of
    page size 4096). From then on every write to the database fails with a bare
    ``disk I/O error`` ("page 53: 8192 bytes, not 4096") — in this connection, in new ones, and
    after reopening: the replica is wedged for writing, with nothing that says why.

    Why: nothing refuses it. dbfile.xFileControl refuses journal_mode=WAL up front but not a
    page_size change; VACUUM copies the new image in 4096-byte writes, which dbfile.xWrite takes
    as whole pages (the buffer checks only the length, never page 1's page-size field, offset 16),
    so the commit goes through; later transactions write 8192-byte pages, which the buffer
    (buffer.write_page) refuses as BufferError -> apsw.IOError.
    """
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="-1s", poll_interval="1h")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.execute("WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 100) "
                "INSERT INTO t(v) SELECT randomblob(2000) FROM s")
    refused = False
    try:
        con.execute("PRAGMA page_size = 8192; VACUUM")
    except apsw.Error:
        refused = True
    # Refused (as documented) or done properly: either way the database must stay writable.
    try:
        con.execute("INSERT INTO t(v) VALUES ('after')")
    except apsw.IOError as err:
        pytest.fail(f"after PRAGMA page_size + VACUUM ({'refused' if refused else 'accepted'}) "
                    f"every write fails: {type(err).__name__}: {err}")
    assert rows(con, "SELECT count(*) FROM t") == [(101,)]
    con.close()


def test_a_new_replica_may_choose_its_page_size(vfs, tmp_path):
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path)
    con.execute("PRAGMA page_size = 8192")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    con.execute("INSERT INTO t DEFAULT VALUES")
    assert con.execute("PRAGMA page_size").fetchall() == [(8192,)]
    con.close()
    assert restored_rows(url, tmp_path / "out.db") == [(1,)]


def test_each_open_has_its_own_name_and_journal(vfs, tmp_path):
    """Documented (docs/configuration.md): a database's name as SQLite reports it carries a
    per-open mark, so that each connection's rollback journal is its own."""
    import re

    url = (tmp_path / "replica").as_uri()
    a, b = writer(url, tmp_path), writer(url, tmp_path)
    assert re.fullmatch(r"db#ltxvfs\d+", a.filename) and re.fullmatch(r"db#ltxvfs\d+", b.filename)
    assert a.filename != b.filename
    assert a.execute("PRAGMA database_list").fetchall()[0][2] == a.filename
    a.close()
    b.close()


# --- found by the simulation (tests/test_simulation.py) -----------------------------------------

@pytest.mark.parametrize("locking_mode", ["NORMAL", "EXCLUSIVE"])
def test_a_rolled_back_transaction_leaves_nothing_to_sync_or_recover(vfs, tmp_path, locking_mode):
    """A ROLLBACK of a transaction whose pages SQLite had spilled into the buffer made a commit
    of its journal's playback at the unlock: a TXID nobody committed (same content) was
    uploaded, and a process that crashed after only rolling back held "1 unsynced commit" — so
    reopening after another writer moved on failed with ConflictError."""
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="-1s")
    con.execute(f"PRAGMA locking_mode = {locking_mode}")
    con.execute("PRAGMA cache_size = 10")  # the transaction below spills
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("INSERT INTO t VALUES (1, zeroblob(100))")
    assert con.execute("PRAGMA litestream_sync").fetchall()[0][0] == f"{1:016x}"
    buffer = next(r for r in vfs.replicas() if r.client.url == url).writer.buffer
    con.execute("BEGIN IMMEDIATE")
    con.execute("WITH RECURSIVE s(x) AS (SELECT 2 UNION ALL SELECT x + 1 FROM s WHERE x < 100) "
                "INSERT INTO t SELECT x, zeroblob(700) FROM s")
    assert buffer.in_transaction, "the test needs a transaction that spilled into the buffer"
    con.execute("ROLLBACK")
    if locking_mode == "NORMAL":  # under EXCLUSIVE SQLite keeps the lock: nothing to see yet
        assert not buffer.in_transaction and not buffer.has_unsynced
        fd = os.open(buffer.path, os.O_RDONLY)
        try:  # what recovery after a crash now would find
            assert buffer._scan(fd).commits == 0, "a crash now would recover a commit nobody made"
        finally:
            os.close(fd)
    assert con.execute("PRAGMA litestream_sync").fetchall()[0][0] == ""
    assert rows(con, "SELECT count(*) FROM t") == [(1,)]
    con.close()
    with open_replica(url) as client:
        assert [f.max_txid for f in client.list_files(0)] == [1], "a rollback uploaded a TXID"
    assert not (tmp_path / "buf").exists()
    assert restored_rows(url, tmp_path / "out.db", "SELECT id FROM t") == [(1,)]
