"""The connection-view rule (view.py): a connection chooses what its reads see when SQLite takes
SHARED, and nothing changes it until the lock drops to NONE; the page-1 counter it presents moves
whenever its view may show other bytes.

Each test here is a regression test of issue 12 (items 3 and 4): they failed before the rule.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest

import ltxvfs
from ltxvfs.storage import open_replica

from replicas import FakePrimary

RO = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
RW = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI
ROWS = 400


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def _uri(url: str, **params) -> str:
    out = f"file:db?vfs=litestream&replica_url={quote(url, safe='')}"
    for k, v in params.items():
        out += f"&{k}={quote(str(v), safe='')}"
    return out


def open_reader(url: str, **params) -> apsw.Connection:
    return apsw.Connection(_uri(url, poll_interval="1h", **params), flags=RO)


def open_writer(url: str, buffer: Path, **params) -> apsw.Connection:
    con = apsw.Connection(_uri(url, poll_interval="1h", write_enabled="true",
                               buffer_path=str(buffer), **params), flags=RW)
    con.set_busy_timeout(0)
    return con


def one(con: apsw.Connection, sql: str):
    rows = con.execute(sql).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


def v_of(con: apsw.Connection, rowid: int) -> str:
    return one(con, f"SELECT v FROM t WHERE id = {rowid}")


@pytest.fixture
def primary(tmp_path):
    """A replica at TXID 1 with ROWS rows 'old' spread over ~40 leaf pages (the first and the
    last row on different leaves), published an hour ago."""
    url = (tmp_path / "replica").as_uri()
    client = open_replica(url)
    p = FakePrimary(tmp_path / "primary.db", client)
    hour_ago = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
    p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)",
             f"INSERT INTO t SELECT value, 'old', randomblob(300) FROM generate_series(1, {ROWS})",
             timestamp_ms=hour_ago)
    p.url = url  # type: ignore[attr-defined]
    p.t1 = datetime.fromtimestamp(hour_ago / 1000, UTC)  # type: ignore[attr-defined]
    yield p
    client.close()


def test_read_transaction_keeps_its_state_when_another_connection_turns_write_mode_on(
        vfs, primary, tmp_path):
    r = open_reader(primary.url)
    r.execute("BEGIN")
    assert v_of(r, 1) == "old"
    primary.commit("UPDATE t SET v = 'new'")  # TXID 2, not yet seen by r (no poll)
    w = open_writer(primary.url, tmp_path / "buf")  # write mode: polls to TXID 2
    assert v_of(w, ROWS) == "new"
    assert v_of(r, ROWS) == "old", "one read transaction saw two TXIDs"
    assert one(r, "PRAGMA litestream_txid") == f"{1:016x}"
    r.execute("COMMIT")
    assert v_of(r, ROWS) == "new" and v_of(r, 1) == "new"
    assert one(r, "PRAGMA litestream_txid") == f"{2:016x}"
    w.close()
    r.close()


def test_time_travel_inside_a_transaction_is_refused_and_changes_nothing(vfs, primary, tmp_path):
    """The old code switched the open transaction to the past state at the next read (a mix of
    TXIDs); a deferred change could also never apply under locking_mode=EXCLUSIVE. It is refused:
    the transaction keeps its view, and the time travel works once it ended."""
    w = open_writer(primary.url, tmp_path / "buf", sync_interval="-1s")  # syncs only when told
    w.execute("UPDATE t SET v = 'new'")  # committed in the buffer, not synced
    r = open_writer(primary.url, tmp_path / "buf")  # the same replica: reads the buffer
    r.execute("BEGIN")
    assert v_of(r, 1) == "new"
    when = (primary.t1 + timedelta(seconds=1)).isoformat()
    with pytest.raises(apsw.SQLError, match="cannot time-travel inside a read transaction"):
        r.execute(f"PRAGMA litestream_time = '{when}'")
    assert v_of(r, ROWS) == "new", "the time travel changed the open transaction's view"
    assert one(r, "PRAGMA litestream_time") != when
    r.execute("COMMIT")
    r.execute(f"PRAGMA litestream_time = '{when}'")
    assert v_of(r, ROWS) == "old" and v_of(r, 1) == "old"
    r.execute("PRAGMA litestream_time = 'latest'")
    assert v_of(r, ROWS) == "new"
    r.close()
    w.close()


def test_write_mode_is_not_turned_off_under_a_transaction_reading_the_buffer(
        vfs, primary, tmp_path):
    w = open_writer(primary.url, tmp_path / "buf", sync_interval="-1s")
    w.execute("UPDATE t SET v = 'new'")  # only in the buffer
    r = open_writer(primary.url, tmp_path / "buf")
    r.execute("BEGIN")
    assert v_of(r, 1) == "new"
    with pytest.raises(apsw.BusyError, match="inside a transaction that reads the write buffer"):
        w.execute("PRAGMA litestream_write_enabled = 0")
    assert one(w, "PRAGMA litestream_write_enabled") == "1"
    assert v_of(r, ROWS) == "new", "the open transaction lost the buffer"
    r.execute("COMMIT")
    assert one(w, "PRAGMA litestream_write_enabled = 0") == "0"
    assert v_of(r, ROWS) == "new" and v_of(r, 1) == "new"  # synced, then read from the replica
    assert one(r, "PRAGMA litestream_txid") == f"{2:016x}"
    r.close()
    w.close()


def test_a_write_needs_the_view_that_reads_the_buffer(vfs, primary, tmp_path, caplog):
    """A read transaction begun in read mode cannot become a write transaction after another
    connection turned write mode on: it would write on top of a state it did not read."""
    r = apsw.Connection(_uri(primary.url, poll_interval="1h"), flags=RW)
    r.execute("BEGIN")
    assert v_of(r, 1) == "old"
    w = open_writer(primary.url, tmp_path / "buf")
    r.execute("PRAGMA litestream_write_enabled = 1")
    with pytest.raises(apsw.BusyError) as err:
        r.execute("UPDATE t SET v = 'r' WHERE id = 1")
    assert err.value.extendedresult == apsw.SQLITE_BUSY_SNAPSHOT  # SQLite's "snapshot too old"
    assert "began its read transaction before write mode was turned on" in caplog.text
    r.execute("ROLLBACK")
    r.execute("UPDATE t SET v = 'r' WHERE id = 1")
    assert v_of(w, 1) == "r"
    r.close()
    w.close()


def _set_change_counter(path: Path, value: int) -> None:
    with open(path, "r+b") as f:
        for offset in (24, 92):
            f.seek(offset)
            f.write(value.to_bytes(4, "big"))


def test_a_mode_switch_changes_the_counter_even_when_page_one_says_the_same(
        vfs, primary, tmp_path):
    """The old code presented a private counter (1, 2, …) in read mode and page 1's own counter
    in write mode: when they were equal SQLite kept a stale page cache."""
    r = open_reader(primary.url)
    assert v_of(r, ROWS) == "old"  # now in r's page cache
    primary.execute("UPDATE t SET v = 'new'")
    _set_change_counter(primary.path, 1)  # page 1 of TXID 2 says what r was shown
    primary.publish()
    w = open_writer(primary.url, tmp_path / "buf")
    assert v_of(w, ROWS) == "new"
    assert v_of(r, ROWS) == "new", "stale page cache after the switch to write mode"
    fresh = open_reader(primary.url)
    assert v_of(fresh, ROWS) == "new"
    for con in (fresh, r, w):
        con.close()


def test_each_connection_sees_the_other_ones_commits_and_keeps_its_cache_for_its_own(
        vfs, primary, tmp_path):
    """Within write mode: a commit of another connection moves the counter (a new read sees
    it); a connection's own commit keeps its page cache (counted by the reads it makes)."""
    a = open_writer(primary.url, tmp_path / "buf")
    b = open_writer(primary.url, tmp_path / "buf")
    assert v_of(a, ROWS) == "old" and v_of(b, ROWS) == "old"
    for i in range(5):
        a.execute(f"UPDATE t SET v = 'a{i}' WHERE id = {ROWS}")
        assert v_of(b, ROWS) == f"a{i}"
        b.execute(f"UPDATE t SET v = 'b{i}' WHERE id = {ROWS}")
        assert v_of(a, ROWS) == f"b{i}"
    assert v_of(a, 1) == "old"  # its leaf is now in a's cache too
    replica = next(r for r in vfs.replicas() if r.writer is not None)
    reads = []
    buffer_read, store_read = replica.writer.read_page, replica.store.read_page
    replica.writer.read_page = lambda pgno: reads.append(pgno) or buffer_read(pgno)
    replica.store.read_page = lambda state, pgno: reads.append(pgno) or store_read(state, pgno)
    for i in range(20):  # a's own commits: its cache stays, only page 1's header is read
        a.execute(f"UPDATE t SET v = 'x{i}' WHERE id = 1")
        assert v_of(a, 1) == f"x{i}"
    assert set(reads) <= {1}, f"pages read again after the connection's own commits: {reads}"
    del replica.writer.read_page, replica.store.read_page
    a.close()
    b.close()


def _rows(con, sql):
    return [tuple(r) for r in con.execute(sql).fetchall()]


def test_time_travel_on_an_attached_database_under_exclusive_locking_is_not_silently_ignored(
        vfs, tmp_path):
    """A user attaches a replica to a connection that uses ``PRAGMA locking_mode = EXCLUSIVE``
    (set before the ATTACH, so it applies to every database), reads it, then asks for the past
    with ``PRAGMA b.litestream_time``. The PRAGMA succeeds, ``PRAGMA b.litestream_time`` reports
    the past time — and every query goes on returning the latest data ('new', TXID 2), for the
    life of the connection. Wrong data, with a label saying it is the past.

    docs: time travel under EXCLUSIVE is refused once the database was read ("set
    litestream_time before the first query, or use locking_mode=NORMAL"), because the view never
    changes while SQLite keeps its lock. Why it is not refused here: dbfile.travel_to only knows
    EXCLUSIVE from a ``locking_mode`` FCNTL_PRAGMA sent to *this* file (dbfile.xFileControl,
    ``self._exclusive_mode``); SQLite sends ``PRAGMA locking_mode`` (no schema) to main only and
    applies it to attached databases itself, so the attached file never hears of it.
    """
    from datetime import UTC, datetime, timedelta

    url = (tmp_path / "replica").as_uri()
    client = open_replica(url)
    p = FakePrimary(tmp_path / "primary.db", client)
    hour_ago = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
    p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", "INSERT INTO t VALUES (1, 'old')",
             timestamp_ms=hour_ago)
    p.commit("UPDATE t SET v = 'new'")
    past = datetime.fromtimestamp(hour_ago / 1000, UTC) + timedelta(seconds=1)

    con = apsw.Connection("file::memory:", flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
    con.execute("PRAGMA locking_mode = EXCLUSIVE")
    con.execute(f"ATTACH '{_uri(url, poll_interval='1h')}' AS b")
    assert _rows(con, "PRAGMA b.locking_mode") == [("exclusive",)]
    assert _rows(con, "SELECT v FROM b.t") == [("new",)]
    try:
        con.execute(f"PRAGMA b.litestream_time = '{past.isoformat()}'")
    except apsw.SQLError as err:  # refused, as documented for EXCLUSIVE: fine
        assert "EXCLUSIVE" in str(err)
        assert _rows(con, "SELECT v FROM b.t") == [("new",)]
    else:
        txid = _rows(con, "PRAGMA b.litestream_txid")[0][0]
        assert _rows(con, "SELECT v FROM b.t") == [("old",)], (
            f"PRAGMA b.litestream_time accepted, but reads still show TXID {txid}")
    finally:
        con.close()
        client.close()
