"""The read path through apsw: queries, following a primary, snapshots, time travel, errors."""

from __future__ import annotations

import base64
import threading
import time
from datetime import UTC, datetime

import apsw
import pytest

import ltxvfs
from ltxvfs.storage import open_replica

from replicas import FakePrimary, compact

FAST = "poll_interval=20ms"


def wait_for(cond, timeout=20.0, interval=0.01):
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def connect(url: str, extra: str = FAST) -> apsw.Connection:
    from urllib.parse import quote

    uri = f"file:db?vfs=litestream&replica_url={quote(url, safe='')}" + (f"&{extra}" if extra else "")
    return apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)


@pytest.fixture(params=["file", "s3"])
def replica_url(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    return (tmp_path / "replica").as_uri()


@pytest.fixture
def primary(tmp_path, replica_url):
    with open_replica(replica_url) as client:
        p = FakePrimary(tmp_path / "primary.db", client)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, body BLOB)",
                 "INSERT INTO t(name, body) SELECT 'row' || value, randomblob(200) "
                 "FROM generate_series(1, 500)")
        p.url = replica_url
        yield p


def own_replica(vfs, url: str):
    """The replica this test opened (others' may still be open in the process)."""
    from ltxvfs.storage import parse_replica_url

    return next(r for r in vfs.replicas() if r.key == parse_replica_url(url).identity)


def rows(con, sql="SELECT * FROM t ORDER BY 1"):
    return con.execute(sql).fetchall()


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_queries_match_the_primary(vfs, tmp_path, replica_url, page_size):
    with open_replica(replica_url) as client:
        p = FakePrimary(tmp_path / "p.db", client, page_size)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, body BLOB)",
                 "CREATE INDEX t_name ON t(name)",
                 "INSERT INTO t(name, body) SELECT 'n' || (value % 97), randomblob(value % 3000) "
                 "FROM generate_series(1, 800)")
        p.commit("UPDATE t SET body = randomblob(5000) WHERE id % 50 = 0")
        con = connect(replica_url)
        assert rows(con) == p.rows()
        assert rows(con, "SELECT name, count(*) FROM t GROUP BY name ORDER BY 1") == \
            p.rows("SELECT name, count(*) FROM t GROUP BY name ORDER BY 1")
        assert rows(con, "PRAGMA integrity_check") == [("ok",)]
        assert rows(con, "PRAGMA page_size") == [(page_size,)]
        assert rows(con, "PRAGMA journal_mode") == [("delete",)]
        assert rows(con, "PRAGMA litestream_txid") == [("0000000000000002",)]
        con.close()


def test_database_larger_than_the_cache(vfs, primary):
    primary.commit("INSERT INTO t(name, body) SELECT 'big', randomblob(3000) "
                   "FROM generate_series(1, 400)")
    con = connect(primary.url, f"{FAST}&cache_size=65536")
    con.execute("PRAGMA cache_size = 0")  # no SQLite cache either: every read goes to our LRU
    assert rows(con) == primary.rows()
    assert rows(con) == primary.rows()
    replica = own_replica(vfs, primary.url)
    assert replica.store.cache.bytes <= 65536 + 4096
    con.close()


def test_reader_follows_and_keeps_its_snapshot(vfs, primary):
    con = connect(primary.url)
    assert rows(con, "SELECT count(*) FROM t") == [(500,)]
    con.execute("BEGIN")
    assert rows(con, "SELECT count(*) FROM t") == [(500,)]
    primary.commit("INSERT INTO t(name) VALUES ('new')")
    replica = own_replica(vfs, primary.url)  # not another test's replica still open
    wait_for(lambda: replica.state.txid == 2)
    assert rows(con, "SELECT count(*) FROM t") == [(500,)]  # still the transaction's snapshot
    assert rows(con, "PRAGMA litestream_txid") == [("0000000000000001",)]
    con.execute("COMMIT")
    assert rows(con, "SELECT count(*) FROM t") == [(501,)]
    for i in range(5):
        primary.commit(f"INSERT INTO t(name) VALUES ('more{i}')")
        wait_for(lambda i=i: rows(con, "SELECT count(*) FROM t") == [(502 + i,)])
    assert rows(con) == primary.rows()
    con.close()


def test_follows_a_shrinking_database(vfs, primary):
    con = connect(primary.url)
    assert len(rows(con)) == 500
    primary.execute("DELETE FROM t WHERE id > 20")
    primary.execute("VACUUM")
    primary.publish()
    wait_for(lambda: rows(con, "SELECT count(*) FROM t") == [(20,)])
    assert rows(con) == primary.rows()
    assert rows(con, "PRAGMA integrity_check") == [("ok",)]
    size = rows(con, "PRAGMA page_count")[0][0] * 4096
    assert size == primary.path.stat().st_size
    con.close()


def test_follows_across_compaction_and_l0_retention(vfs, primary):
    con = connect(primary.url)
    client = open_replica(primary.url)
    for i in range(3):
        primary.commit(f"INSERT INTO t(name) VALUES ('a{i}')")
    wait_for(lambda: rows(con, "SELECT count(*) FROM t") == [(503,)])
    # While the reader is away, new commits are compacted into L1 and their L0 files removed.
    con.close()
    con = connect(primary.url)
    for i in range(4):
        primary.commit(f"INSERT INTO t(name) VALUES ('b{i}')")
    l0 = client.list_files(0, seek=5)
    compact(client, l0[:3], level=1)
    client.delete(l0[:3])  # retention: the L0 gap is covered only by L1
    primary.commit("INSERT INTO t(name) VALUES ('c')")
    wait_for(lambda: rows(con, "SELECT count(*) FROM t") == [(508,)])
    assert rows(con) == primary.rows()
    client.close()
    con.close()


def test_time_travel_and_back(vfs, tmp_path, replica_url):
    with open_replica(replica_url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        moments = []
        p.commit("CREATE TABLE t(x)", timestamp_ms=1_000_000_000_000)
        for i in range(1, 4):
            p.commit(f"INSERT INTO t VALUES ({i})", timestamp_ms=1_000_000_000_000 + i * 60_000)
            moments.append((1_000_000_000_000 + i * 60_000 + 30_000, p.rows()))
        con = connect(replica_url)
        for ms, expected in moments:
            when = datetime.fromtimestamp(ms / 1000, UTC).isoformat()
            con.execute(f"PRAGMA litestream_time = '{when}'")
            assert rows(con) == expected
            assert rows(con, "PRAGMA litestream_time") == [(when.replace("+00:00", "Z"),)]
        con.execute("PRAGMA litestream_time = 'LATEST'")
        assert rows(con) == [(1,), (2,), (3,)]
        con.execute("PRAGMA litestream_pin_txid = '0000000000000002'")
        assert rows(con) == [(1,)] and rows(con, "PRAGMA litestream_txid") == [("0000000000000002",)]
        con.execute("SELECT litestream_set_time('latest')")
        assert rows(con) == [(1,), (2,), (3,)]
        with pytest.raises(apsw.SQLError, match="oldest retained file") as info:
            con.execute("PRAGMA litestream_time = '2000-01-01T00:00:00.25Z'")
        assert str(info.value).endswith(  # RFC 3339 with Z, as the PRAGMA reads (issue 15 item 13)
            "no LTX file before 2000-01-01T00:00:00.25Z; the oldest retained file is from "
            "2001-09-09T01:46:40Z")
        con.close()


def test_relative_time_parses(vfs, tmp_path):
    url = (tmp_path / "r").as_uri()
    now_ms = int(time.time() * 1000)
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(x)", "INSERT INTO t VALUES (1)", timestamp_ms=now_ms - 180_000)
        p.commit("INSERT INTO t VALUES (2)", timestamp_ms=now_ms - 30_000)
    con = connect(url)
    con.execute("PRAGMA litestream_time = '1 minute ago'")
    assert rows(con) == [(1,)]
    assert rows(con, "PRAGMA litestream_txid") == [("0000000000000001",)]
    con.execute("PRAGMA litestream_time = '10 seconds ago'")
    assert rows(con) == [(1,), (2,)]
    with pytest.raises(apsw.SQLError, match="invalid timestamp"):
        con.execute("PRAGMA litestream_time = 'the day after never'")
    con.close()


def test_pragmas_and_functions(vfs, primary):
    con = connect(primary.url)
    assert rows(con, "SELECT litestream_txid(), typeof(litestream_lag()), litestream_lag() >= 0") \
        == [("0000000000000001", "integer", 1)]
    for name in ("litestream_txid", "litestream_lag", "litestream_hydration_progress",
                 "litestream_hydration_file"):
        with pytest.raises(apsw.SQLError, match=f"{name} is read-only"):
            con.execute(f"PRAGMA {name} = 1")
    assert rows(con, "PRAGMA litestream_write_enabled") == [("0",)]
    with pytest.raises(apsw.SQLError, match="invalid value"):
        con.execute("PRAGMA litestream_write_enabled = maybe")
    assert rows(con, "PRAGMA user_version") == [(0,)]  # SQLite's own pragmas still work
    time_text = rows(con, "SELECT litestream_time()")[0][0]
    assert datetime.fromisoformat(time_text).tzinfo is not None
    con.close()


def test_writes_are_refused(vfs, primary):
    con = connect(primary.url)
    with pytest.raises(apsw.ReadOnlyError, match="attempt to write a readonly database"):
        con.execute("INSERT INTO t(name) VALUES ('x')")
    assert rows(con, "PRAGMA journal_mode = wal") == [("delete",)]
    con.close()


def _corrupt_replica(tmp_path, blobs: int):
    url = (tmp_path / "r").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(x)",
                 f"INSERT INTO t SELECT randomblob(1000) FROM generate_series(1, {blobs})")
    path = tmp_path / "r" / "ltx" / "0" / "0000000000000001-0000000000000001.ltx"
    return url, path


def test_small_corrupt_file_fails_the_checksum_at_open(vfs, tmp_path):
    """A file no larger than the index tail arrives whole and is verified (CRC-64)."""
    url, path = _corrupt_replica(tmp_path, blobs=3)
    data = bytearray(path.read_bytes())
    assert len(data) < 32768
    data[len(data) // 2] ^= 0x01  # a flipped bit in page data: still decompresses
    path.write_bytes(bytes(data))
    with pytest.raises(apsw.CantOpenError, match="file checksum mismatch: stored"):
        connect(url)


def test_corrupt_frame_gives_an_error_not_rows(vfs, tmp_path):
    from ltxvfs import ltx

    url, path = _corrupt_replica(tmp_path, blobs=600)  # larger than what is read whole at open
    data = bytearray(path.read_bytes())
    index = ltx.decode_file(bytes(data)).index
    last = max(index)
    off, _ = index[last - 30]
    data[off:off + 4] = (last - 29).to_bytes(4, "big")  # frame claims to be another page
    off, _ = index[last - 20]
    data[off + 6:off + 10] = (1 << 30).to_bytes(4, "big")  # absurd compressed size
    path.write_bytes(bytes(data))
    con = connect(url)
    with pytest.raises(apsw.CorruptError, match="page frame holds page 123, expected page 122"):
        rows(con, "SELECT sum(length(x)), count(*) FROM t")
    con.close()


def test_small_file_with_a_corrupt_frame_fails_at_open(vfs, tmp_path):
    from ltxvfs import ltx

    url, path = _corrupt_replica(tmp_path, blobs=100)  # small: read and verified whole
    data = bytearray(path.read_bytes())
    off, _ = ltx.decode_file(bytes(data)).index[10]
    data[off:off + 4] = (11).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(apsw.CantOpenError, match="nonsequential page numbers in snapshot"):
        connect(url)


def test_corrupt_index_fails_open(vfs, tmp_path):
    url, path = _corrupt_replica(tmp_path, blobs=200)
    data = bytearray(path.read_bytes())
    data[-24:-16] = (len(data) * 2).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(apsw.CantOpenError, match="page index length .* does not fit"):
        connect(url)


def test_missing_replica_url_is_a_clear_error(vfs):
    with pytest.raises(apsw.CantOpenError, match="no replica: set LITESTREAM_REPLICA_URL"):
        apsw.Connection("file:db?vfs=litestream", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)


def test_empty_replica_waits_then_fails(vfs, tmp_path):
    (tmp_path / "empty").mkdir()  # an existing, empty directory waits (a missing one fails at once)
    url = (tmp_path / "empty").as_uri()
    start = time.monotonic()
    with pytest.raises(apsw.CantOpenError, match=r"has no LTX files after waiting 0.3s \(open_timeout\)"):
        connect(url, "open_timeout=300ms&poll_interval=50ms")
    assert 0.25 < time.monotonic() - start < 30  # waited its timeout; the upper bound: no hang


def test_concurrent_reader_threads(vfs, primary):
    """8 threads read while the primary commits: every read is a prefix-consistent state, and
    every thread really read — a BusyError is retried and counted, never the end of a thread
    (it used to end the thread silently, and the test passed with threads that read nothing)."""
    errors: list[BaseException] = []
    expected = primary.rows()
    stop = threading.Event()
    reads = [0] * 8
    busy = [0] * 8

    def reader(k: int):
        con = connect(primary.url)
        try:
            while not stop.is_set():
                try:
                    got = rows(con)
                except apsw.BusyError:
                    busy[k] += 1
                    continue
                if got[:500] != expected[:500]:
                    errors.append(AssertionError(f"reader {k}: wrong rows"))
                    return
                reads[k] += 1
        except BaseException as err:
            errors.append(err)
        finally:
            con.close()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for i in range(5):
        primary.commit(f"INSERT INTO t(name) VALUES ('c{i}')")
    wait_for(lambda: min(reads) >= 3 or bool(errors))  # every thread read, and went on reading
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert min(reads) >= 3, (reads, busy)


def test_many_databases_bounded_threads(vfs, tmp_path):
    before = threading.active_count()
    cons = []
    for i in range(100):
        url = (tmp_path / f"tenant{i}").as_uri()
        with open_replica(url) as client:
            FakePrimary(tmp_path / f"p{i}.db", client, 512).commit(
                "CREATE TABLE t(x)", f"INSERT INTO t VALUES ({i})")
        cons.append(connect(url, "poll_interval=50ms"))
    for i, con in enumerate(cons):
        assert rows(con) == [(i,)]
    time.sleep(0.2)  # let polls run for every database
    assert threading.active_count() - before <= 16  # pools of 8 + 4, the scheduler: not per database
    for con in cons:
        con.close()


def test_missing_bucket_and_bad_url_are_clear_errors(vfs, s3_server, caplog):
    from urllib.parse import quote

    # A valid SSE-C key (32 bytes), so the open gets as far as the bucket (an invalid one was
    # refused first, and the test passed on that message without ever reaching the bucket).
    key = base64.b64encode(b"SUPERSECRETKEY1234".ljust(32, b"!")).decode()
    url = f"s3://no-such-bucket-here/db?endpoint={s3_server}&sseCustomerKey={quote(key, safe='')}"
    for bad, reason in ((url, "bucket 'no-such-bucket-here' does not exist"),
                        ("ftp://host/db", "invalid replica URL 'ftp://host/db': unsupported "
                                          "scheme 'ftp' (use s3:// or file://)")):
        with pytest.raises(apsw.CantOpenError) as info:
            apsw.Connection(f"file:db?vfs=litestream&replica_url={quote(bad, safe='')}",
                            flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        assert reason in str(info.value), str(info.value)
        assert reason in caplog.text
    assert key not in caplog.text and key not in str(info.value)
    assert "SUPERSECRETKEY1234" not in caplog.text


def test_bad_uri_parameter_is_an_error(vfs, primary):
    with pytest.raises(apsw.CantOpenError, match="invalid URI parameter poll_interval 'soon'"):
        connect(primary.url, "poll_interval=soon")


def test_storage_outage_is_busy_then_recovers(vfs, tmp_path):
    from ltxvfs.errors import StorageError

    url = (tmp_path / "r").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(x)", "INSERT INTO t SELECT randomblob(3000) FROM generate_series(1, 100)")
    con = connect(url)
    replica = next(r for r in vfs.replicas() if r.client.url == url)
    real_read = replica.store.client.read
    failures = []

    def down(*args, **kw):
        failures.append(args)
        raise StorageError("simulated outage: connection refused")

    replica.store.client.read = down
    try:
        with pytest.raises(apsw.BusyError, match="object storage unavailable"):
            rows(con, "SELECT sum(length(x)) FROM t")
    finally:
        replica.store.client.read = real_read
    assert failures
    assert rows(con, "SELECT count(*) FROM t") == [(100,)]
    con.close()


def test_idle_follower_backs_off_to_its_ceiling(vfs, primary):
    # The poll job is driven by hand (the scheduler's tick is an hour), so the count does not
    # depend on how promptly a loaded machine runs the scheduler. Ceiling: 8 ticks.
    con = connect(primary.url, "poll_interval=1h&idle_poll_interval=8h")
    replica = next(r for r in vfs.replicas() if r.client.url == primary.url)
    rows(con, "SELECT count(*) FROM t")
    replica.poll_job()  # consumes the read above
    start, polled = replica.polls, []
    for tick in range(1, 41):  # idle: nobody starts a read
        before = replica.polls
        replica.poll_job()
        if replica.polls > before:
            polled.append(tick)
    assert replica.polls - start == len(polled)
    assert polled == [2, 6, 14, 22, 30, 38]  # waits of 2, 4, 8, then the ceiling of 8 ticks
    assert replica.interval == 8 * 3600
    start = replica.polls
    for _ in range(20):  # busy: a read between every two ticks
        rows(con, "SELECT count(*) FROM t")
        replica.poll_job()
    busy = replica.polls - start
    assert busy == 20
    assert replica.interval == 3600
    con.close()


def test_bridging_a_gap_refetches_only_pages_that_changed(vfs, tmp_path, replica_url):
    """A follower whose next L0 files retention removed bridges the gap with the compacted file
    that overlaps it least — not with the latest snapshot, which would move every page to a new
    file and make the next scan fetch the whole database again."""
    with open_replica(replica_url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)",
                 "INSERT INTO t(body) SELECT randomblob(300) FROM generate_series(1, 2000)")
        p.commit("INSERT INTO t(body) VALUES (x'01')")  # TXID 2
        con = connect(replica_url, "poll_interval=1h")
        [replica] = [r for r in vfs.replicas() if r.client.url == client.url]
        assert rows(con, "SELECT count(*) FROM t") == [(2001,)]
        scan = "SELECT sum(length(body)) FROM t"
        rows(con, scan)  # every page is cached now
        for i in range(3, 7):  # TXIDs 3-6 while the follower is not polling
            p.commit(f"INSERT INTO t(body) VALUES (x'{i:02x}')")
        l0 = client.list_files(0)
        compact(client, [f for f in l0 if 2 <= f.min_txid <= 6], level=1)  # L1 2-6
        compact(client, l0[:6], level=9)  # the snapshot 1-6 (what the old bridge applied)
        client.delete([f for f in l0 if 3 <= f.min_txid <= 6])
        p.commit("INSERT INTO t(body) VALUES (x'07')")  # TXID 7, in L0
        replica.poll()
        assert rows(con, "PRAGMA litestream_txid") == [("0000000000000007",)]
        before = ltxvfs.stats(con)
        assert rows(con, scan) == p.rows(scan)
        assert rows(con, "SELECT count(*) FROM t") == [(2006,)]
        after = ltxvfs.stats(con)
        # Only the pages TXIDs 2-7 wrote (page 1, the last leaf, interior pages) are new, and
        # the small L1 file arrived whole with its index; the snapshot would cost ~620 KB.
        assert after["page_gets"] - before["page_gets"] <= 2
        assert after["bytes_fetched"] - before["bytes_fetched"] < 64 * 1024
        assert rows(con, "PRAGMA integrity_check") == [("ok",)]
        con.close()
