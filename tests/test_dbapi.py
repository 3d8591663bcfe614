"""PEP 249 conformance of ltxvfs.dbapi, and its sqlite3-compatible behaviour.

Part 1 is the checks of the classic ``dbapi20.py`` conformance suite (Stuart Bishop's, the one
DB-API drivers such as psycopg and pysqlite ran), written fresh as pytest tests: module globals,
the exception hierarchy (also as connection attributes), commit/rollback, cursor isolation,
description, rowcount, close, execute/executemany in the module's paramstyle, fetchone /
fetchmany / fetchall / mixed fetches, arraysize, setinputsizes/setoutputsize, None, the date and
binary constructors, the type objects. Each check runs on the stdlib ``sqlite3`` module too (the
reference), except those sqlite3 itself fails (it has no PEP 249 type objects).

Part 2: what sqlite3 does where PEP 249 leaves room (transactions, error classes, row_factory,
create_function, one statement per execute), compared with sqlite3 side by side; and part 3 the
replica itself (write mode over file:// and S3, time travel, read-only replicas, ConflictError).
"""

from __future__ import annotations

import datetime
import sqlite3
import time

import apsw
import pytest

import ltxvfs
from ltxvfs import dbapi

TABLE = "dbapi20test_booze"


@pytest.fixture(params=["ltxvfs", "sqlite3"])
def driver(request, tmp_path):
    """(module, connect()) for ltxvfs.dbapi on a write-mode file:// replica, or for sqlite3 on a
    local file (the reference)."""
    if request.param == "sqlite3":
        return sqlite3, lambda **kw: sqlite3.connect(tmp_path / "ref.db", **kw)
    url = (tmp_path / "replica").as_uri()
    return dbapi, lambda **kw: dbapi.connect(url, write=True, buffer_path=str(tmp_path / "buf"),
                                             **kw)


@pytest.fixture
def mod(driver):
    return driver[0]


@pytest.fixture
def con(driver):
    c = driver[1]()
    yield c
    c.close()


def _make_table(con) -> None:
    con.cursor().execute(f"CREATE TABLE {TABLE} (name VARCHAR(20))")
    con.commit()


def _populate(cur) -> list[str]:
    names = ["Carlton Cold", "Cooper's Pale Ale", "Victoria Bitter", "Boag's", "Mountain Goat"]
    for name in names:
        cur.execute(f"INSERT INTO {TABLE} VALUES (?)", (name,))
    return names


# --- part 1: dbapi20.py's checks ------------------------------------------------------------------


def test_apilevel_threadsafety_paramstyle(mod):
    assert mod.apilevel == "2.0"
    assert mod.threadsafety in (0, 1, 2, 3)
    assert mod.paramstyle in ("qmark", "numeric", "named", "format", "pyformat")


def test_exception_hierarchy(mod):
    assert issubclass(mod.Warning, Exception)
    assert issubclass(mod.Error, Exception)
    for name in ("InterfaceError", "DatabaseError"):
        assert issubclass(getattr(mod, name), mod.Error)
    for name in ("DataError", "OperationalError", "IntegrityError", "InternalError",
                 "ProgrammingError", "NotSupportedError"):
        assert issubclass(getattr(mod, name), mod.DatabaseError)


def test_exceptions_as_connection_attributes(mod, con):
    for name in ("Warning", "Error", "InterfaceError", "DatabaseError", "DataError",
                 "OperationalError", "IntegrityError", "InternalError", "ProgrammingError",
                 "NotSupportedError"):
        assert getattr(con, name) is getattr(mod, name)


def test_commit_and_rollback_exist_and_work_without_a_transaction(con):
    con.commit()
    con.rollback()


def test_cursor_isolation(con):
    _make_table(con)
    cur1, cur2 = con.cursor(), con.cursor()
    cur1.execute(f"INSERT INTO {TABLE} VALUES ('Victoria Bitter')")
    cur2.execute(f"SELECT name FROM {TABLE}")
    assert len(cur2.fetchall()) == 1  # a connection's cursors see its uncommitted changes


def test_description(mod, con):
    _make_table(con)
    cur = con.cursor()
    assert cur.description is None  # before any execute
    cur.execute(f"SELECT name FROM {TABLE}")
    assert len(cur.description) == 1 and len(cur.description[0]) == 7
    assert cur.description[0][0].lower() == "name"
    cur.execute(f"CREATE TABLE {TABLE}2 (x)")
    assert cur.description is None  # a statement that returns no rows


def test_rowcount(con):
    _make_table(con)
    cur = con.cursor()
    assert cur.rowcount == -1
    cur.execute(f"INSERT INTO {TABLE} VALUES ('Victoria Bitter')")
    assert cur.rowcount in (-1, 1)
    assert cur.rowcount == 1  # stricter than dbapi20: sqlite3 knows
    cur.execute(f"SELECT name FROM {TABLE}")
    assert cur.rowcount == -1  # sqlite3 cannot know for a SELECT


def test_close(mod, driver):
    con = driver[1]()
    cur = con.cursor()
    con.close()
    with pytest.raises(mod.Error):
        cur.execute("SELECT 1")
    with pytest.raises(mod.Error):
        con.commit()
    with pytest.raises(mod.Error):
        con.cursor()
    con.close()  # closing twice is harmless (sqlite3 and ltxvfs)


def test_execute_and_paramstyles(con):
    _make_table(con)
    cur = con.cursor()
    cur.execute(f"INSERT INTO {TABLE} VALUES ('Victoria Bitter')")
    cur.execute(f"INSERT INTO {TABLE} VALUES (?)", ("Cooper's",))
    cur.execute(f"INSERT INTO {TABLE} VALUES (:beer)", {"beer": "Boag's"})
    cur.execute(f"INSERT INTO {TABLE} VALUES (?1)", ("Coopers Green",))
    cur.execute(f"SELECT name FROM {TABLE} ORDER BY name")
    assert [r[0] for r in cur.fetchall()] == ["Boag's", "Cooper's", "Coopers Green", "Victoria Bitter"]


def test_executemany(con):
    _make_table(con)
    cur = con.cursor()
    cur.executemany(f"INSERT INTO {TABLE} VALUES (?)", [("Cooper's",), ("Boag's",)])
    assert cur.rowcount == 2
    cur.executemany(f"INSERT INTO {TABLE} VALUES (:beer)", [{"beer": "A"}, {"beer": "B"}])
    assert cur.rowcount == 2
    cur.executemany(f"INSERT INTO {TABLE} VALUES (?)", iter([]))
    assert cur.rowcount == 0
    cur.execute(f"SELECT count(*) FROM {TABLE}")
    assert cur.fetchone() == (4,)


def test_fetchone(mod, con):
    _make_table(con)
    cur = con.cursor()
    cur.execute(f"SELECT name FROM {TABLE}")
    assert cur.fetchone() is None  # no rows
    cur.execute(f"INSERT INTO {TABLE} VALUES ('Victoria Bitter')")
    cur.execute(f"SELECT name FROM {TABLE}")
    assert cur.fetchone() == ("Victoria Bitter",)
    assert cur.fetchone() is None


def test_fetchmany(con):
    _make_table(con)
    cur = con.cursor()
    names = _populate(cur)
    cur.execute(f"SELECT name FROM {TABLE}")
    assert len(cur.fetchmany()) == 1  # arraysize defaults to 1
    cur.arraysize = 10
    cur.execute(f"SELECT name FROM {TABLE}")
    assert len(cur.fetchmany()) == len(names)
    assert cur.fetchmany() == []
    cur.execute(f"SELECT name FROM {TABLE}")
    r = cur.fetchmany(4)
    assert len(r) == 4
    assert len(cur.fetchmany(4)) == 1
    assert cur.fetchmany(4) == []
    cur.arraysize = 4
    cur.execute(f"SELECT name FROM {TABLE}")
    assert [len(cur.fetchmany()) for _ in range(3)] == [4, 1, 0]
    assert sorted(x[0] for x in r) == sorted(r[0] for r in r)
    cur.execute(f"DELETE FROM {TABLE}")
    cur.execute(f"SELECT name FROM {TABLE}")
    assert cur.fetchmany() == []


def test_fetchall(con):
    _make_table(con)
    cur = con.cursor()
    names = _populate(cur)
    cur.execute(f"SELECT name FROM {TABLE}")
    assert sorted(r[0] for r in cur.fetchall()) == sorted(names)
    assert cur.fetchall() == []
    cur.execute(f"DELETE FROM {TABLE}")
    cur.execute(f"SELECT name FROM {TABLE}")
    assert cur.fetchall() == []


def test_mixed_fetches(con):
    _make_table(con)
    cur = con.cursor()
    names = _populate(cur)
    cur.execute(f"SELECT name FROM {TABLE}")
    got = [cur.fetchone()[0], *(r[0] for r in cur.fetchmany(2)), cur.fetchone()[0],
           *(r[0] for r in cur.fetchall())]
    assert sorted(got) == sorted(names)


def test_iteration(con):
    cur = con.cursor()
    cur.execute("SELECT 1 UNION ALL SELECT 2")
    assert [r[0] for r in cur] == [1, 2]


def test_setinputsizes_setoutputsize(con):
    cur = con.cursor()
    cur.setinputsizes((25,))
    cur.setoutputsize(1000)
    cur.setoutputsize(2000, 0)


def test_none_is_null(con):
    _make_table(con)
    cur = con.cursor()
    cur.execute(f"INSERT INTO {TABLE} VALUES (?)", (None,))
    cur.execute(f"SELECT name, name IS NULL FROM {TABLE}")
    assert cur.fetchall() == [(None, 1)]


def test_date_time_binary_constructors(mod, con):
    assert mod.Date(2002, 12, 25) == datetime.date(2002, 12, 25)
    assert mod.Time(13, 45, 30) == datetime.time(13, 45, 30)
    assert mod.Timestamp(2002, 12, 25, 13, 45, 30) == datetime.datetime(2002, 12, 25, 13, 45, 30)
    ticks = time.mktime((2002, 12, 25, 13, 45, 30, 0, 0, -1))
    assert mod.DateFromTicks(ticks) == datetime.date(2002, 12, 25)
    assert mod.TimeFromTicks(ticks) == datetime.time(13, 45, 30)
    assert mod.TimestampFromTicks(ticks) == datetime.datetime(2002, 12, 25, 13, 45, 30)
    cur = con.cursor()
    cur.execute("SELECT ?", (mod.Binary(b"Something\x00binary"),))
    assert cur.fetchone() == (b"Something\x00binary",)
    cur.execute("SELECT ?", (mod.Binary(b""),))
    assert cur.fetchone() == (b"",)


def test_type_objects(mod, con):
    if mod is sqlite3:
        pytest.skip("sqlite3 has no PEP 249 type objects (STRING, BINARY, NUMBER, DATETIME, ROWID)")
    con.execute("CREATE TABLE types(i INTEGER PRIMARY KEY, s VARCHAR(10), b BLOB, r REAL, "
                "d DATE, n NUMERIC)")
    desc = con.execute("SELECT i, s, b, r, d, n, 1 + 1 FROM types").description
    codes = [d[1] for d in desc]
    assert codes[0] == mod.NUMBER and codes[0] == mod.ROWID
    assert codes[1] == mod.STRING and codes[1] != mod.NUMBER
    assert codes[2] == mod.BINARY
    assert codes[3] == mod.NUMBER and codes[5] == mod.NUMBER
    assert codes[4] == mod.DATETIME
    assert codes[6] is None  # an expression has no declared type


# --- part 2: as sqlite3 does it -------------------------------------------------------------------


def test_legacy_transactions_begin_before_dml_only(con):
    assert con.isolation_level == "" and not con.in_transaction
    con.execute("CREATE TABLE t(x)")
    assert not con.in_transaction  # DDL autocommits in legacy mode
    con.execute("SELECT * FROM t").fetchall()
    assert not con.in_transaction  # so does a SELECT
    con.execute("INSERT INTO t VALUES (1)")
    assert con.in_transaction
    con.rollback()
    assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)
    con.execute("/* comment */ INSERT INTO t VALUES (2)")
    assert con.in_transaction
    con.commit()
    assert not con.in_transaction


def test_isolation_level_none_is_autocommit_and_setting_it_commits(con):
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES (1)")
    assert con.in_transaction
    con.isolation_level = None  # commits the pending transaction
    assert not con.in_transaction
    con.execute("INSERT INTO t VALUES (2)")
    assert not con.in_transaction
    con.rollback()
    assert con.execute("SELECT count(*) FROM t").fetchone() == (2,)
    with pytest.raises(ValueError):
        con.isolation_level = "SERIALIZABLE"


def test_autocommit_false_is_pep249_transactions(driver):
    if not hasattr(sqlite3.Connection, "autocommit") and driver[0] is sqlite3:
        pytest.skip("sqlite3 before Python 3.12 has no autocommit attribute")
    con = driver[1](autocommit=False)
    assert con.in_transaction  # a transaction is always open
    con.execute("CREATE TABLE t(x)")
    con.rollback()  # the DDL too
    assert con.in_transaction
    assert con.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    assert con.in_transaction
    con.autocommit = True  # commits
    assert not con.in_transaction
    con.close()


def test_context_manager_commits_or_rolls_back(mod, con):
    con.execute("CREATE TABLE t(x UNIQUE)")
    with con:
        con.execute("INSERT INTO t VALUES (1)")
    assert not con.in_transaction
    with pytest.raises(mod.IntegrityError), con:
        con.execute("INSERT INTO t VALUES (2)")
        con.execute("INSERT INTO t VALUES (1)")
    assert con.execute("SELECT x FROM t").fetchall() == [(1,)]


@pytest.mark.parametrize(("sql", "error"), [
    ("SELEC 1", "OperationalError"),                      # SQLITE_ERROR
    ("SELECT * FROM no_such_table", "OperationalError"),
    ("INSERT INTO u VALUES (1), (1)", "IntegrityError"),  # SQLITE_CONSTRAINT
    ("INSERT INTO u VALUES ('x')", "IntegrityError"),     # SQLITE_MISMATCH (STRICT)
    ("SELECT ?, ?", "ProgrammingError"),                  # wrong number of bindings
    ("SELECT 1; SELECT 2", "ProgrammingError"),           # one statement at a time
])
def test_errors_map_as_sqlite3(mod, con, sql, error):
    con.execute("CREATE TABLE u(x INTEGER PRIMARY KEY) STRICT")
    with pytest.raises(getattr(mod, error)):
        con.execute(sql, (1,) if "?" in sql else ())


def test_sqlite_errorcode_and_name(mod, con):
    con.execute("CREATE TABLE u(x UNIQUE)")
    con.execute("INSERT INTO u VALUES (1)")
    with pytest.raises(mod.IntegrityError) as info:
        con.execute("INSERT INTO u VALUES (1)")
    assert info.value.sqlite_errorcode == 2067  # SQLITE_CONSTRAINT_UNIQUE
    assert info.value.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE"


def test_unsupported_parameter_type_is_programming_error(mod, con):
    with pytest.raises(mod.ProgrammingError):
        con.execute("SELECT ?", (object(),))


def test_lastrowid_row_factory_functions_collations(mod, con):
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)")
    cur = con.execute("INSERT INTO t(name) VALUES ('a')")
    assert cur.lastrowid == 1
    cur.execute("INSERT INTO t(name) VALUES ('b')")
    assert cur.lastrowid == 2
    con.row_factory = mod.Row
    row = con.execute("SELECT id, name FROM t ORDER BY id").fetchone()
    assert row["NAME"] == "a" and row[0] == 1 and row.keys() == ["id", "name"] and tuple(row) == (1, "a")
    con.row_factory = None
    con.create_function("twice", 1, lambda x: 2 * x, deterministic=True)
    assert con.execute("SELECT twice(21)").fetchone() == (42,)

    class Concat:
        def __init__(self):
            self.parts = []

        def step(self, value):
            self.parts.append(value)

        def finalize(self):
            return "".join(self.parts)

    con.create_aggregate("concat", 1, Concat)
    assert con.execute("SELECT concat(name) FROM (SELECT name FROM t ORDER BY id)").fetchone() == ("ab",)
    con.create_collation("reverse", lambda a, b: (a < b) - (a > b))
    assert con.execute("SELECT name FROM t ORDER BY name COLLATE reverse").fetchall() == [("b",), ("a",)]


def test_dates_are_bound_as_iso_text(con):
    cur = con.execute("SELECT ?, ?", (datetime.date(2024, 2, 29), datetime.datetime(2024, 2, 29, 1, 2, 3)))
    assert cur.fetchone() == ("2024-02-29", "2024-02-29 01:02:03")


def test_executescript_commits_first_and_runs_all(con):
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES (1)")
    con.executescript("INSERT INTO t VALUES (2); INSERT INTO t VALUES (3);")
    con.rollback()
    assert con.execute("SELECT count(*) FROM t").fetchone() == (3,)


# --- part 3: the replica --------------------------------------------------------------------------


def test_module_globals_match_the_sqlite_library():
    assert dbapi.sqlite_version == apsw.sqlite_lib_version()
    assert dbapi.sqlite_version_info >= (3, 35)
    assert dbapi.threadsafety == 2 and dbapi.paramstyle == "qmark"


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_write_then_read_and_time_travel(kind, tmp_path, request):
    url = request.getfixturevalue("s3_url") if kind == "s3" else (tmp_path / "replica").as_uri()
    w = dbapi.connect(url, write=True, buffer_path=str(tmp_path / "buf"), sync_interval="-1")
    w.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    w.execute("PRAGMA litestream_sync")
    w.executemany("INSERT INTO t(v) VALUES (?)", [("a",), ("b",)])
    w.commit()
    txid = int(w.execute("PRAGMA litestream_sync").fetchone()[0], 16)
    w.execute("DELETE FROM t WHERE v = 'a'")
    w.commit()
    w.close()  # synced
    r = dbapi.connect(url)
    assert r.execute("SELECT v FROM t").fetchall() == [("b",)]
    with pytest.raises(dbapi.OperationalError, match="readonly"):
        r.execute("INSERT INTO t(v) VALUES ('c')")
    r.rollback()
    past = dbapi.connect(url, txid=txid)
    assert past.execute("SELECT v FROM t ORDER BY v").fetchall() == [("a",), ("b",)]
    by_time = dbapi.connect(url, time=datetime.datetime.now(datetime.UTC).isoformat())
    assert by_time.execute("SELECT count(*) FROM t").fetchone() == (1,)
    with pytest.raises(dbapi.OperationalError, match="not available"):
        dbapi.connect(url, time="2001-01-01T00:00:00Z")  # before the replica's first file
    # Time travel stays a PRAGMA: back to the latest state.
    past.execute("PRAGMA litestream_pin_txid = 'latest'")
    assert past.execute("SELECT count(*) FROM t").fetchone() == (1,)
    for c in (r, past, by_time):
        c.close()


def test_sqlite_uri_and_uri_parameters(tmp_path):
    from urllib.parse import quote

    url = (tmp_path / "replica").as_uri()
    with dbapi.connect(url, write=True, buffer_path=str(tmp_path / "buf")) as w:
        w.execute("CREATE TABLE t(x)")
    w.close()
    con = dbapi.connect(f"file:x?vfs=litestream&replica_url={quote(url, safe='')}")
    assert con.execute("PRAGMA litestream_txid").fetchone() == ("0000000000000001",)
    con.close()
    with pytest.raises(dbapi.OperationalError, match="poll_intervall"):
        dbapi.connect(url, poll_intervall="5s")


def test_a_second_writer_gets_conflict_error(tmp_path):
    url = (tmp_path / "replica").as_uri()
    a = dbapi.connect(url, write=True, buffer_path=str(tmp_path / "a"), sync_interval="-1")
    a.execute("CREATE TABLE t(x)")
    a.execute("PRAGMA litestream_sync")
    # Another process (simulated: a second replica object through another VFS name, with
    # its own buffer) commits TXID 2 first.
    vfs2 = ltxvfs.register("litestream-other", warm_up=False)
    try:
        from urllib.parse import quote

        b = apsw.Connection(
            f"file:db?vfs=litestream-other&replica_url={quote(url, safe='')}&write_enabled=true"
            f"&buffer_path={quote(str(tmp_path / 'b'), safe='')}",
            flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
        b.execute("INSERT INTO t VALUES ('b')")
        b.close()
        a.execute("INSERT INTO t VALUES ('a')")
        a.commit()
        with pytest.raises(dbapi.ConflictError) as info:
            a.execute("PRAGMA litestream_sync").fetchall()
        assert isinstance(info.value, ltxvfs.ConflictError)
        assert isinstance(info.value, dbapi.OperationalError)
        with pytest.raises(dbapi.ConflictError, match=str(tmp_path / "a")):
            a.close()  # the final sync: the commit stays in a's buffer
    finally:
        ltxvfs.registry.unregister("litestream-other")
        del vfs2


def test_a_fetched_cursor_holds_no_read_transaction(tmp_path):
    """As sqlite3 (one row read ahead): once the last row is fetched the statement is done, so a
    reader is not stuck in a read transaction — it may time-travel, and it sees new TXIDs."""
    url = (tmp_path / "replica").as_uri()
    with dbapi.connect(url, write=True, buffer_path=str(tmp_path / "buf")) as w:
        w.execute("CREATE TABLE t(x)")
    w.close()
    r = dbapi.connect(url)
    cur = r.execute("SELECT count(*) FROM t")
    assert cur.fetchone() == (0,)
    assert not r.apsw.txn_state()  # no read transaction left open
    r.execute("PRAGMA litestream_pin_txid = 1")  # would be refused inside a read transaction
    cur = r.execute("SELECT name FROM sqlite_master UNION ALL SELECT 'end'")
    assert cur.fetchone() == ("t",)
    with pytest.raises(dbapi.OperationalError, match="inside a read transaction"):
        r.execute("PRAGMA litestream_pin_txid = 'latest'")  # one row is still to come
    assert cur.fetchall() == [("end",)]
    r.execute("PRAGMA litestream_pin_txid = 'latest'")
    r.close()
