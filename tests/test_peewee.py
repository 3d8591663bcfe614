"""peewee over a replica (issue 19 item 4): ``playhouse.apsw_ext.APSWDatabase`` as it is (a SQLite
URI and open flags), and ``ltxvfs.integrations.peewee.ReplicaDatabase`` (the same class taking
``ltxvfs.dbapi.connect``'s arguments): a model written in write mode on a ``file://`` replica, read
on a read-only connection, time travel by TXID and by time, and the errors a reader gets."""

from __future__ import annotations

import datetime
from urllib.parse import quote

import apsw
import peewee
import pytest
from playhouse.apsw_ext import APSWDatabase

import ltxvfs
from ltxvfs.integrations.peewee import ReplicaDatabase


class Note(peewee.Model):
    body = peewee.TextField()
    stars = peewee.IntegerField(default=0)


def _bodies(db) -> list[str]:
    with db.bind_ctx([Note]):
        return [n.body for n in Note.select().order_by(Note.id)]


def _write(url: str, buf: str) -> tuple[int, int]:
    """Two synced TXIDs: (a, b, c) then (b, c with a star); returns both TXIDs."""
    db = ReplicaDatabase(url, write=True, buffer_path=buf, sync_interval="-1")
    with db.bind_ctx([Note]):
        db.create_tables([Note])
        with db.atomic():
            Note.insert_many([{"body": b} for b in "abc"]).execute()
        first = int(db.execute_sql("PRAGMA litestream_sync").fetchone()[0], 16)
        Note.delete().where(Note.body == "a").execute()
        Note.update(stars=Note.stars + 1).where(Note.body == "c").execute()
        second = int(db.execute_sql("PRAGMA litestream_sync").fetchone()[0], 16)
    db.close()
    return first, second


def test_replica_database_write_read_and_time_travel(tmp_path):
    url = (tmp_path / "replica").as_uri()
    first, second = _write(url, str(tmp_path / "buf"))
    assert second > first

    r = ReplicaDatabase(url)
    with r.bind_ctx([Note]):
        assert [(n.body, n.stars) for n in Note.select().order_by(Note.id)] == [("b", 0), ("c", 1)]
        assert Note.get(Note.body == "c").stars == 1
        assert Note.select().where(Note.stars > 0).count() == 1
        with pytest.raises(peewee.OperationalError, match="attempt to write a readonly database"):
            Note.create(body="x")
        # Time travel stays a PRAGMA, on the connection peewee holds.
        r.execute_sql(f"PRAGMA litestream_pin_txid = '{first:016x}'")
        assert _bodies(r) == ["a", "b", "c"]
        r.execute_sql("PRAGMA litestream_pin_txid = 'latest'")
        assert _bodies(r) == ["b", "c"]
    r.close()

    # Pinned at connect: by TXID and by time.
    assert _bodies(ReplicaDatabase(url, txid=first)) == ["a", "b", "c"]
    now = datetime.datetime.now(datetime.UTC).isoformat()
    by_time = ReplicaDatabase(url, time=now)
    assert _bodies(by_time) == ["b", "c"]
    assert by_time.execute_sql("PRAGMA litestream_txid").fetchone() == (f"{second:016x}",)
    by_time.close()
    with pytest.raises(peewee.OperationalError, match="transaction not available: no LTX file before"):
        ReplicaDatabase(url, time="2001-01-01T00:00:00Z").connect()


def test_plain_apsw_database_with_a_uri_and_flags(tmp_path):
    """No ltxvfs code in peewee's path: APSWDatabase passes flags to apsw.Connection."""
    url = (tmp_path / "replica").as_uri()
    first, _ = _write(url, str(tmp_path / "buf"))
    ltxvfs.register(warm_up=False)
    uri = f"file:db?vfs=litestream&replica_url={quote(url, safe='')}"
    db = APSWDatabase(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
                      pragmas={"litestream_pin_txid": f"'{first:016x}'"})
    assert _bodies(db) == ["a", "b", "c"]
    db.close()
    db = APSWDatabase(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    assert _bodies(db) == ["b", "c"]
    db.close()
    # Writes through a plain APSWDatabase in write mode too.
    w = APSWDatabase(f"{uri}&write_enabled=true&buffer_path={quote(str(tmp_path / 'buf'), safe='')}",
                     flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
    with w.bind_ctx([Note]):
        Note.create(body="d")
    w.close()  # synced
    assert _bodies(ReplicaDatabase(url)) == ["b", "c", "d"]


def test_a_reader_follows_new_txids(tmp_path):
    """A peewee reader left open sees what the writer syncs next (no read transaction held
    between queries)."""
    url = (tmp_path / "replica").as_uri()
    _write(url, str(tmp_path / "buf"))
    r = ReplicaDatabase(url, poll_interval="1h")
    assert _bodies(r) == ["b", "c"]
    w = ReplicaDatabase(url, write=True, buffer_path=str(tmp_path / "buf"), sync_interval="-1")
    with w.bind_ctx([Note]):
        Note.create(body="e")
    w.execute_sql("PRAGMA litestream_sync")
    w.close()
    # Same process, same VFS: the writer's sync is seen by the reader's next transaction.
    assert _bodies(r) == ["b", "c", "e"]
    r.close()


def test_deferred_init_and_errors(tmp_path):
    url = (tmp_path / "replica").as_uri()
    _write(url, str(tmp_path / "buf"))
    db = ReplicaDatabase(None)
    db.init(url, poll_interval="5s", pragmas={"cache_size": -2000})
    assert _bodies(db) == ["b", "c"]
    assert db.execute_sql("PRAGMA cache_size").fetchone() == (-2000,)
    db.close()
    bad = ReplicaDatabase(url, poll_intervall="5s")
    with pytest.raises(peewee.OperationalError, match="unknown URI parameter .poll_intervall.; did you mean"):
        bad.connect()
