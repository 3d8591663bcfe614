"""Every setting applies or fails loudly (issue 15, items 1-7): settings are per replica and a
conflicting one is an error, ranges are enforced, unknown URI parameters are refused, the
write-mode rule is one sentence, PRAGMAs that set a value return it, bad environment variables
fail the open (not register())."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import apsw
import pytest

import ltxvfs
from ltxvfs.storage import open_replica
from ltxvfs.vfs import LitestreamVFS

from replicas import FakePrimary

RO = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
RW = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


@pytest.fixture
def url(tmp_path):
    """A file:// replica at TXID 2 (t: one row 'a', then 'b'); TXID 1 an hour ago."""
    u = (tmp_path / "replica").as_uri()
    with open_replica(u) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        hour_ago = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
        p.commit("CREATE TABLE t(v TEXT)", "INSERT INTO t VALUES ('a')", timestamp_ms=hour_ago)
        p.commit("UPDATE t SET v = 'b'")
    return u


def uri(url: str, vfs_name: str = "litestream", **params) -> str:
    out = f"file:db?vfs={vfs_name}&replica_url={quote(url, safe='')}"
    return out + "".join(f"&{k}={quote(str(v), safe='')}" for k, v in params.items())


def one(con, sql):
    return con.execute(sql).fetchall()[0][0]


# --- item 1: settings are per replica --------------------------------------------------------

def test_a_later_connection_with_a_conflicting_setting_is_refused(vfs, url):
    a = apsw.Connection(uri(url, poll_interval="1h"), flags=RO)
    with pytest.raises(apsw.CantOpenError,
                       match=r"poll_interval=0.1s conflicts with poll_interval=3600s"):
        apsw.Connection(uri(url, poll_interval="100ms"), flags=RO)
    b = apsw.Connection(uri(url, poll_interval="60m"), flags=RO)  # the same value, spelled otherwise
    c = apsw.Connection(uri(url), flags=RO)  # not given: the replica's
    with pytest.raises(apsw.CantOpenError, match="cache_size=1048576 conflicts"):
        apsw.Connection(uri(url, cache_size="1MiB"), flags=RO)
    for con in (a, b, c):
        assert one(con, "SELECT v FROM t") == "b"
        con.close()


def test_hydration_asked_by_a_later_connection_starts(vfs, url, tmp_path):
    """The old code dropped it without a word: no hydration, no polls."""
    a = apsw.Connection(uri(url, poll_interval="1h"), flags=RO)
    assert one(a, "PRAGMA litestream_hydration_progress") == "0"
    b = apsw.Connection(uri(url, hydration_path=tmp_path / "copy.db"), flags=RO)
    assert one(b, "PRAGMA litestream_hydration_file") == str(tmp_path / "copy.db")
    assert one(a, "PRAGMA litestream_hydration_file") == str(tmp_path / "copy.db")
    with pytest.raises(apsw.CantOpenError, match="hydration_path=.*other.db conflicts"):
        apsw.Connection(uri(url, hydration_path=tmp_path / "other.db"), flags=RO)
    b.close()
    a.close()


def test_write_settings_come_from_the_connection_that_turns_write_mode_on(vfs, url, tmp_path):
    a = apsw.Connection(uri(url, poll_interval="1h"), flags=RO)
    w = apsw.Connection(uri(url, write_enabled="true", sync_interval="-1s",
                            buffer_path=tmp_path / "buf"), flags=RW)
    replica = next(r for r in vfs.replicas() if r.writer is not None and
                   r.writer.buffer.path == tmp_path / "buf")
    assert vfs._configs[id(replica)].sync_interval == -1.0
    with pytest.raises(apsw.CantOpenError, match="sync_interval=2s conflicts with sync_interval=-1s"):
        apsw.Connection(uri(url, write_enabled="true", sync_interval="2s"), flags=RW)
    with pytest.raises(apsw.CantOpenError, match="buffer_path=.*conflicts"):
        apsw.Connection(uri(url, buffer_path=tmp_path / "buf2"), flags=RW)
    w.close()
    a.close()


def test_the_options_of_a_replica_url_are_per_replica_too(vfs, s3_url, tmp_path):
    with open_replica(s3_url) as client:
        FakePrimary(tmp_path / "p.db", client).commit("CREATE TABLE t(v)")
    a = apsw.Connection(uri(s3_url), flags=RO)
    with pytest.raises(apsw.CantOpenError, match="with other options"):
        apsw.Connection(uri(s3_url.replace("region=us-east-1", "region=eu-west-1")), flags=RO)
    b = apsw.Connection(uri(s3_url.replace("?", "/?")), flags=RO)  # the same, spelled otherwise
    b.close()
    a.close()


# --- items 2-4: values and names ---------------------------------------------------------------

@pytest.mark.parametrize(("param", "value", "message"), [
    ("sync_interval", "0", "must not be 0"),
    ("open_timeout", "-5", "must not be negative"),
    ("cache_size", "0", "at least 4096 bytes"),
    ("cache_size", "100", "at least 4096 bytes"),
    ("poll_interval", "0", "must be positive"),
    ("log_level", "DEBUG", "log_level URI parameter is not supported: logging is process-wide"),
    ("poll_intervall", "1s", "unknown URI parameter 'poll_intervall'; did you mean 'poll_interval'"),
    ("hydration_pth", "/x", "did you mean 'hydration_path'"),
    ("zzz", "1", "unknown URI parameter 'zzz' \\(known: replica_url, poll_interval"),
])
def test_bad_values_and_unknown_names_are_refused_at_open(vfs, url, param, value, message):
    with pytest.raises(apsw.CantOpenError, match=message):
        apsw.Connection(uri(url, **{param: value}), flags=RO)


def test_sqlites_own_uri_parameters_pass_through(vfs, url):
    con = apsw.Connection(uri(url, mode="ro", cache="private", psow="1"), flags=RO)
    assert one(con, "SELECT v FROM t") == "b"
    con.close()


def test_open_timeout_zero_fails_at_once_on_an_empty_replica(vfs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(apsw.CantOpenError, match=r"has no LTX files after waiting 0s"):
        apsw.Connection(uri(empty.as_uri(), open_timeout="0"), flags=RO)


# --- item 5: one rule for writing ------------------------------------------------------------

def test_a_read_only_connection_cannot_turn_write_mode_on(vfs, url, tmp_path):
    """The old code switched the replica to write mode while the connection still could not
    write; and a read-write connection was refused until it set the PRAGMA itself."""
    r = apsw.Connection(uri(url, buffer_path=tmp_path / "buf"), flags=RO)
    with pytest.raises(apsw.SQLError, match="this connection was opened read-only"):
        r.execute("PRAGMA litestream_write_enabled = 1")
    assert one(r, "PRAGMA litestream_write_enabled") == "0"
    assert all(rep.writer is None for rep in vfs.replicas())
    w = apsw.Connection(uri(url, write_enabled="true"), flags=RW)
    plain = apsw.Connection(uri(url), flags=RW)  # read-write, no write_enabled of its own
    plain.execute("INSERT INTO t VALUES ('c')")
    assert [row[0] for row in w.execute("SELECT v FROM t ORDER BY rowid")] == ["b", "c"]
    with pytest.raises(apsw.ReadOnlyError):
        r.execute("INSERT INTO t VALUES ('d')")
    for con in (plain, w, r):
        con.close()


# --- item 6: a PRAGMA that sets a value returns the new value --------------------------------

def test_pin_txid_returns_the_new_value_and_reads_the_pin_in_effect(vfs, url):
    con = apsw.Connection(uri(url, poll_interval="1h"), flags=RO)
    assert one(con, "PRAGMA litestream_pin_txid") == "latest"
    assert one(con, "PRAGMA litestream_pin_txid = 1") == f"{1:016x}"  # the old code: 'latest'
    assert one(con, "SELECT v FROM t") == "a"
    assert one(con, "PRAGMA litestream_pin_txid = latest") == "latest"
    assert one(con, "SELECT v FROM t") == "b"
    when = (datetime.now(UTC) - timedelta(minutes=30)).isoformat()
    con.execute(f"PRAGMA litestream_time = '{when}'")
    assert one(con, "PRAGMA litestream_pin_txid") == f"{1:016x}"  # the old code: 'latest'
    con.close()


# --- item 7: bad environment variables fail the open, as documented ---------------------------

def test_a_bad_environment_variable_fails_the_open_not_register(monkeypatch, url):
    monkeypatch.setenv("LITESTREAM_POLL_INTERVAL", "soon")
    v = LitestreamVFS("litestream-badenv")  # register() would construct it the same way
    try:
        with pytest.raises(apsw.CantOpenError,
                           match="invalid environment variable LITESTREAM_POLL_INTERVAL 'soon'"):
            apsw.Connection(uri(url, vfs_name="litestream-badenv"), flags=RO)
    finally:
        v.close()


def test_stats_tell_the_settings_apart(vfs, url):
    con = apsw.Connection(uri(url, poll_interval="1h"), flags=RO)
    stats = json.loads(one(con, "PRAGMA litestream_stats"))
    assert stats["hydration"] == "off" and stats["txid"] == f"{2:016x}"
    con.close()


# --- item 9: a replica root that does not exist is a clear error at once ------------------------

def test_a_missing_file_replica_directory_fails_at_once(vfs, tmp_path):
    """The old code waited open_timeout (30 s by default; here an hour: pytest's timeout would
    end it) and then said 'has no LTX files'."""
    missing = (tmp_path / "no-such-dir").as_uri()
    with pytest.raises(apsw.CantOpenError, match="replica directory .*no-such-dir does not exist"):
        apsw.Connection(uri(missing, open_timeout="1h"), flags=RO)
    w = apsw.Connection(uri(missing, write_enabled="true", buffer_path=tmp_path / "buf"),
                        flags=RW)  # write mode creates a new replica there
    w.execute("CREATE TABLE t(v)")
    w.close()
    assert list((tmp_path / "no-such-dir").rglob("*.ltx"))


def test_an_unreachable_s3_endpoint_says_it_is_retrying(caplog, tmp_path):
    import logging
    import socket

    from ltxvfs.errors import StorageError
    from ltxvfs.storage.s3 import S3ReplicaClient

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = S3ReplicaClient(f"s3://b/db?endpoint=http://127.0.0.1:{port}&region=us-east-1",
                             max_attempts=2)
    with caplog.at_level(logging.INFO, logger="ltxvfs"), pytest.raises(StorageError):
        client.list_files(0)
    said = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"s3: ListObjectsV2 on s3://b/db?endpoint="
                                                 f"http://127.0.0.1:{port}") and \
        "failed (EndpointConnectionError" in said[0] and said[0].endswith("up to 2 attempts"), said
    client.close()
