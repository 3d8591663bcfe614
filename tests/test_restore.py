"""Our restore, on both backends, of replicas we publish ourselves (latest, TXID, timestamp)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ltxvfs.errors import LTXError, RestoreError, TxNotAvailableError
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

from replicas import FakePrimary, page_bytes, rows_of


@pytest.fixture(params=["file", "s3"])
def client(request, tmp_path):
    url = request.getfixturevalue("s3_url") if request.param == "s3" else (tmp_path / "r").as_uri()
    with open_replica(url) as c:
        yield c


def _history_primary(tmp_path, client, page_size):
    p = FakePrimary(tmp_path / "primary.db", client, page_size)
    p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)",
             "INSERT INTO t(body) VALUES (zeroblob(10))", timestamp_ms=1_000_000)
    p.commit("INSERT INTO t(body) VALUES (randomblob(3000))", timestamp_ms=2_000_000)
    p.commit("INSERT INTO t(body) SELECT randomblob(900) FROM t, t AS b LIMIT 60",
             timestamp_ms=3_000_000)
    p.commit("UPDATE t SET body = randomblob(50) WHERE id % 3 = 0", timestamp_ms=4_000_000)
    p.commit("DELETE FROM t WHERE id > 10", timestamp_ms=5_000_000)
    p.execute("VACUUM")  # the database shrinks
    p.publish(timestamp_ms=6_000_000)
    return p


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_restore_latest_txid_and_timestamp(tmp_path, client, page_size):
    p = _history_primary(tmp_path, client, page_size)
    assert p.history[-1][2] != p.history[-2][2]
    out = restore(client, tmp_path / "latest.db")
    assert out.txid == 6 and out.page_size == page_size
    assert page_bytes(out.path) == page_bytes(p.path)
    assert rows_of(out.path) == p.rows()
    for txid, _, pages in p.history:
        got = restore(client, tmp_path / f"tx{txid}.db", txid=txid)
        assert page_bytes(got.path) == pages, f"TXID {txid}"
    at = datetime.fromtimestamp(3_500, UTC)  # between TXID 3 and 4
    got = restore(client, tmp_path / "ts.db", timestamp=at)
    assert got.txid == 3 and page_bytes(got.path) == p.history[2][2]


def test_timestamp_after_newest_restores_latest(tmp_path, client):
    p = _history_primary(tmp_path, client, 4096)
    got = restore(client, tmp_path / "x.db", timestamp=datetime.now(UTC) + timedelta(days=1))
    assert got.txid == p.txid


def test_timestamp_before_oldest_is_an_error(tmp_path, client):
    _history_primary(tmp_path, client, 4096)
    with pytest.raises(TxNotAvailableError, match="oldest retained file"):
        restore(client, tmp_path / "x.db", timestamp=datetime.fromtimestamp(10, UTC))
    assert not (tmp_path / "x.db").exists()


def test_existing_output_needs_force(tmp_path, client):
    p = _history_primary(tmp_path, client, 4096)
    target = tmp_path / "x.db"
    target.write_bytes(b"precious")
    with pytest.raises(RestoreError, match="already exists"):
        restore(client, target)
    assert target.read_bytes() == b"precious"
    (tmp_path / "x.db-journal").write_bytes(b"stale")
    restore(client, target, force=True)
    assert rows_of(target) == p.rows() and not (tmp_path / "x.db-journal").exists()


def test_corrupt_file_fails_and_leaves_nothing(tmp_path, client):
    p = FakePrimary(tmp_path / "primary.db", client, 4096)
    p.commit("CREATE TABLE t(x)", "INSERT INTO t VALUES (randomblob(20000))")
    info = client.list_files(0)[0]
    data = bytearray(client.read(0, 1, 1))
    data[len(data) // 2] ^= 0xFF
    client.delete([info])
    client.write(0, 1, 1, bytes(data), 1000)
    with pytest.raises(LTXError, match="L0/0000000000000001-0000000000000001.ltx: file checksum mismatch"):
        restore(client, tmp_path / "x.db")
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "x.db.tmp").exists()


def test_progress_is_reported(tmp_path, client):
    _history_primary(tmp_path, client, 4096)
    calls = []
    restore(client, tmp_path / "x.db", progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert calls and done[-1] == calls[-1][1] and done == sorted(done)
