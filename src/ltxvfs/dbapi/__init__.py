"""PEP 249 (DB-API 2.0) over apsw and the ``litestream`` VFS: what SQLAlchemy, pandas, Django and
hand-written DB-API code expect, for a replica.

    from ltxvfs import dbapi
    con = dbapi.connect("s3://bucket/db")                      # read-only, follows the primary
    con.execute("SELECT count(*) FROM users").fetchone()

It behaves like the stdlib ``sqlite3`` module wherever PEP 249 leaves room (``isolation_level``,
the ``autocommit`` attribute of Python 3.12, ``row_factory``, ``create_function``, ``qmark`` and
named parameters, the error classes each SQLite result code maps to); the differences are listed
in docs/integrations.md. Time travel stays a PRAGMA (``PRAGMA litestream_time``) and a
``connect`` argument (``time=``, ``txid=``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import apsw

from .cursor import LEGACY_TRANSACTION_CONTROL, Cursor, _first_word, _is_dml  # noqa: F401
from .errors import (  # noqa: F401 - the PEP 249 names live here
    _CLOSED,
    _CODE_OF_CLASS,
    ConflictError,
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    Warning,
    _translate_error,
    _translated,
)
from .types import (  # noqa: F401
    _END,
    BINARY,
    DATETIME,
    NUMBER,
    ROWID,
    STRING,
    Binary,
    Date,
    DateFromTicks,
    Row,
    Time,
    TimeFromTicks,
    Timestamp,
    TimestampFromTicks,
    _affinity,
    _convert_binding,
    _TypeObject,
    register_adapter,
)

apilevel = "2.0"
#: Threads may share the module and connections (apsw serializes calls on a connection with
#: SQLite's own mutex); a cursor belongs to one thread at a time.
threadsafety = 2
paramstyle = "qmark"  # named (:name, @name, $name) and numbered (?NNN) work too, as in sqlite3

sqlite_version = apsw.sqlite_lib_version()
sqlite_version_info = tuple(int(p) for p in sqlite_version.split("."))
version = "0.1.0"
version_info = (0, 1, 0)

#: Accepted (sqlite3 compatibility) but converters are not implemented: see docs/integrations.md.
PARSE_DECLTYPES = 1
PARSE_COLNAMES = 2

_ISOLATION_LEVELS = (None, "", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")


# --- statements ----------------------------------------------------------------------------------

def _sqlite_uri(replica_url: str, *, name: str, write: bool, hydration_path: str | None,
                uri_params: dict[str, Any]) -> tuple[str, int]:
    """(SQLite URI, open flags) for a replica URL, or for a SQLite URI given as it is."""
    if replica_url.startswith("file:") and "vfs=" in replica_url.partition("?")[2]:
        uri = replica_url  # already a SQLite URI: file:label?vfs=litestream&replica_url=…
        if write and "write_enabled=" not in uri:
            uri += "&write_enabled=true"
    else:
        params: dict[str, Any] = {"vfs": "litestream", "replica_url": replica_url}
        if write:
            params["write_enabled"] = True
        if hydration_path is not None:
            params["hydration_path"] = str(hydration_path)
        params.update(uri_params)
        parts = []
        for key, value in params.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            parts.append(f"{key}={quote(str(value), safe='')}")
        uri = f"file:{quote(name)}?" + "&".join(parts)
    if write:
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    else:
        flags = apsw.SQLITE_OPEN_READONLY
    return uri, flags | apsw.SQLITE_OPEN_URI


def connect(replica_url: str, *, write: bool = False, hydration_path: str | None = None,
            time: str | None = None, txid: int | str | None = None, name: str = "db",
            timeout: float = 5.0, isolation_level: str | None = "",
            autocommit: bool | int = LEGACY_TRANSACTION_CONTROL, detect_types: int = 0,
            check_same_thread: bool = False, cached_statements: int = 128, uri: bool = True,
            factory: type | None = None, **uri_params: Any) -> Connection:
    """Open a replica (``s3://…``, ``file:///…``) — or a SQLite URI naming the ``litestream``
    VFS — as a PEP 249 connection.

    ``write=True`` opens it read-write in write mode (``write_enabled=true``). ``time`` / ``txid``
    pin the connection to a past state (``PRAGMA litestream_time`` / ``litestream_pin_txid``).
    Other keyword arguments are the VFS's URI parameters (``poll_interval="5s"``,
    ``cache_size="64MiB"``, …: docs/configuration.md), checked by the VFS (an unknown one is
    refused). ``timeout``, ``isolation_level``, ``autocommit`` are sqlite3's. ``detect_types``,
    ``check_same_thread``, ``cached_statements`` and ``uri`` are accepted for sqlite3
    compatibility and ignored (``detect_types`` other than 0 is refused)."""
    if detect_types:
        raise NotSupportedError("detect_types (converters) is not supported; see docs/integrations.md")
    from .. import register

    register()
    sqlite_uri, flags = _sqlite_uri(replica_url, name=name, write=write,
                                    hydration_path=hydration_path, uri_params=uri_params)
    cls = factory or Connection
    con = cls(sqlite_uri, flags, timeout=timeout, isolation_level=isolation_level,
              autocommit=autocommit)
    try:
        if time is not None:
            con._apsw.execute(f"PRAGMA litestream_time = '{str(time).replace(chr(39), chr(39) * 2)}'")
        if txid is not None:
            value = txid if isinstance(txid, str) else f"{txid:016x}"
            con._apsw.execute(f"PRAGMA litestream_pin_txid = '{value}'")
    except BaseException as exc:
        con.close()
        new = _translate_error(exc)
        if new is exc:
            raise
        raise new from exc
    return con


class Connection:
    """A PEP 249 connection over one ``apsw.Connection`` (``.apsw`` gives it, for apsw's own
    API). Transactions as sqlite3's: see :meth:`commit` and docs/integrations.md."""

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(self, sqlite_uri: str, flags: int, *, timeout: float = 5.0,
                 isolation_level: str | None = "",
                 autocommit: bool | int = LEGACY_TRANSACTION_CONTROL) -> None:
        self._check_isolation_level(isolation_level)
        self._check_autocommit(autocommit)
        with _translated():
            self._apsw: apsw.Connection | None = apsw.Connection(sqlite_uri, flags=flags)
        self._apsw.set_busy_timeout(int(timeout * 1000))
        self._apsw.convert_binding = _convert_binding
        self._isolation_level = isolation_level
        self._autocommit = autocommit
        self.row_factory = None
        self.text_factory = str
        if autocommit is False:
            self._begin()

    # -- PEP 249 ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close; an open transaction is rolled back (sqlite3 does the same; with
        ``autocommit=False`` too)."""
        if self._apsw is not None:
            con, self._apsw = self._apsw, None
            with _translated():
                if not con.get_autocommit():
                    con.execute("ROLLBACK")
                con.close()

    def commit(self) -> None:
        """Commit a pending transaction (nothing when there is none, or when ``autocommit`` is
        True); with ``autocommit=False`` a new transaction begins."""
        con = self._con
        if self._autocommit is True:
            return
        with _translated():
            if not con.get_autocommit():
                con.execute("COMMIT")
        if self._autocommit is False:
            self._begin()

    def rollback(self) -> None:
        con = self._con
        if self._autocommit is True:
            return
        with _translated():
            if not con.get_autocommit():
                con.execute("ROLLBACK")
        if self._autocommit is False:
            self._begin()

    def cursor(self, factory: type | None = None) -> Cursor:
        self._con  # noqa: B018 - raises on a closed connection
        return (factory or Cursor)(self)

    # -- sqlite3's extras ------------------------------------------------------------------

    @property
    def apsw(self) -> apsw.Connection:
        return self._con

    @property
    def in_transaction(self) -> bool:
        return not self._con.get_autocommit()

    @property
    def total_changes(self) -> int:
        return self._con.total_changes()

    @property
    def isolation_level(self) -> str | None:
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self._check_isolation_level(value)
        if value is None and self._autocommit == LEGACY_TRANSACTION_CONTROL and self.in_transaction:
            with _translated():
                self._con.execute("COMMIT")  # sqlite3: None commits a pending transaction
        self._isolation_level = value

    @property
    def autocommit(self) -> bool | int:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool | int) -> None:
        """As sqlite3 (3.12): True commits a pending transaction; False begins one."""
        self._check_autocommit(value)
        if value is True and self.in_transaction:
            with _translated():
                self._con.execute("COMMIT")
        self._autocommit = value
        if value is False and not self.in_transaction:
            self._begin()

    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> Cursor:
        return self.cursor().executemany(sql, seq_of_parameters)

    def executescript(self, script: str) -> Cursor:
        return self.cursor().executescript(script)

    def create_function(self, name: str, narg: int, func, *, deterministic: bool = False) -> None:
        with _translated():
            self._con.create_scalar_function(name, func, narg, deterministic=deterministic)

    def create_aggregate(self, name: str, n_arg: int, aggregate_class) -> None:
        def factory():
            inst = aggregate_class()
            return inst, lambda _ctx, *args: inst.step(*args), lambda _ctx: inst.finalize()

        with _translated():
            self._con.create_aggregate_function(name, factory, n_arg)

    def create_collation(self, name: str, callable_) -> None:
        with _translated():
            self._con.create_collation(name, callable_)

    def interrupt(self) -> None:
        self._con.interrupt()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """As sqlite3: commit on success, roll back on an exception; does not close."""
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    # -- internals -------------------------------------------------------------------------

    @property
    def _con(self) -> apsw.Connection:
        if self._apsw is None:
            raise ProgrammingError(_CLOSED)
        return self._apsw

    def _begin(self, level: str | None = "") -> None:
        with _translated():
            self._con.execute(f"BEGIN {level or ''}".strip())

    def _before_statement(self, sql: str) -> None:
        """Legacy transaction control: BEGIN before DML outside a transaction."""
        if (self._autocommit == LEGACY_TRANSACTION_CONTROL and self._isolation_level is not None
                and self._con.get_autocommit() and _is_dml(sql)):
            self._begin(self._isolation_level)

    @staticmethod
    def _check_isolation_level(value: str | None) -> None:
        if value is not None and (not isinstance(value, str) or value.upper() not in _ISOLATION_LEVELS):
            raise ValueError("isolation_level string must be '', 'DEFERRED', 'IMMEDIATE', or 'EXCLUSIVE'")

    @staticmethod
    def _check_autocommit(value: bool | int) -> None:
        if value not in (True, False, LEGACY_TRANSACTION_CONTROL) or (
                not isinstance(value, bool) and value != LEGACY_TRANSACTION_CONTROL):
            raise ValueError("autocommit must be True, False, or dbapi.LEGACY_TRANSACTION_CONTROL")


__all__ = [
    "BINARY", "DATETIME", "LEGACY_TRANSACTION_CONTROL", "NUMBER", "ROWID", "STRING", "Binary",
    "ConflictError", "Connection", "Cursor", "DataError", "DatabaseError", "Date", "DateFromTicks",
    "Error", "IntegrityError", "InterfaceError", "InternalError", "NotSupportedError",
    "OperationalError", "ProgrammingError", "Row", "Time", "TimeFromTicks", "Timestamp",
    "TimestampFromTicks", "Warning", "apilevel", "connect", "paramstyle", "register_adapter",
    "sqlite_version", "sqlite_version_info", "threadsafety",
]
