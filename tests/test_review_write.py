"""Adversarial review of the write path: the write buffer's file failing (a full disk)."""
from __future__ import annotations

import errno
import os

import apsw
import pytest

import ltxvfs
import ltxvfs.buffer

from test_write import rows, writer
from test_write_sqlite_modes import restored_rows

BIG = ("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) "
       "INSERT INTO t SELECT i + 1, 'failed', randomblob(300) FROM s")


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


class _FullDisk:
    """``os`` for buffer.py whose next ``pwrite`` of more than ``over`` bytes fails ENOSPC."""

    def __init__(self, over: int) -> None:
        self.over, self.armed = over, True

    def __getattr__(self, name):
        return getattr(os, name)

    def pwrite(self, fd, data, offset):
        if self.armed and len(data) > self.over:
            self.armed = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)


@pytest.mark.parametrize("n", [100, 2000])  # flushed at COMMIT / mid-transaction (FLUSH)
def test_a_full_disk_under_the_buffer_is_sqlite_full_and_the_transaction_is_not_kept(
        vfs, tmp_path, monkeypatch, n):
    """ENOSPC from the buffer's pwrite escaped as a bare Python OSError (SQLite got a generic
    error); it is SQLITE_FULL, and the failed transaction is in neither the database nor the
    replica, while the next one commits."""
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="-1s")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
    con.execute("INSERT INTO t VALUES (1, 'a', x'00')")
    monkeypatch.setattr(ltxvfs.buffer, "os", _FullDisk(8192))
    with pytest.raises(apsw.FullError, match="No space left on device"):
        con.execute("BEGIN; " + BIG.format(n=n) + "; COMMIT")
    if con.in_transaction:
        con.execute("ROLLBACK")
    monkeypatch.undo()
    assert rows(con, "SELECT id, v FROM t ORDER BY id") == [(1, "a")]
    con.execute("INSERT INTO t VALUES (9999, 'b', x'00')")
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.execute("PRAGMA litestream_sync")
    con.close()
    assert restored_rows(url, tmp_path / "out.db", "SELECT id, v FROM t ORDER BY id") == \
        [(1, "a"), (9999, "b")]


@pytest.mark.xfail(strict=True, reason="reported, not fixed (dbfile.py): the buffer commit is "
                   "made at SQLITE_FCNTL_COMMIT_PHASETWO, whose error SQLite ignores (the journal "
                   "is finalized); under locking_mode=EXCLUSIVE nothing rolls the buffer back, so "
                   "the records of the commit reported as failed stay in memory and go out with "
                   "the next commit. Fix: write the commit at SQLITE_FCNTL_SYNC (phase one, sent "
                   "even with synchronous=OFF), where an error makes SQLite roll back from its "
                   "journal, or roll the buffer back and stop write mode on a failed commit")
def test_under_exclusive_locking_a_commit_reported_failed_is_not_committed_later(
        vfs, tmp_path, monkeypatch):
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="-1s")
    con.execute("PRAGMA locking_mode = EXCLUSIVE")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
    con.execute("INSERT INTO t VALUES (1, 'a', x'00')")
    monkeypatch.setattr(ltxvfs.buffer, "os", _FullDisk(8192))
    with pytest.raises(apsw.FullError):
        con.execute("BEGIN; " + BIG.format(n=100) + "; COMMIT")
    if con.in_transaction:
        con.execute("ROLLBACK")
    monkeypatch.undo()
    con.execute("INSERT INTO t VALUES (9999, 'b', x'00')")
    con.execute("PRAGMA litestream_sync")
    con.close()
    assert restored_rows(url, tmp_path / "out.db", "SELECT v, count(*) FROM t GROUP BY v") == \
        [("a", 1), ("b", 1)]
