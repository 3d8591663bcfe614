"""``ENGINE = "ltxvfs.django"``: Django's SQLite backend with :mod:`ltxvfs.dbapi` as ``Database``.

    DATABASES = {
        "default": {"ENGINE": "ltxvfs.django", "NAME": "s3://bucket/app",
                    "OPTIONS": {"write": True}},                      # the one writer
        "replica": {"ENGINE": "ltxvfs.django", "NAME": "s3://bucket/app",
                    "OPTIONS": {"max_lag": 30}, "TEST": {"MIRROR": "default"}},
    }
    DATABASE_ROUTERS = ["ltxvfs.django.router.ReplicaRouter"]

Everything SQL is Django's SQLite backend (operations, schema editor, introspection, features).
What differs: the connection (``ltxvfs.dbapi.connect(NAME, **OPTIONS)``), a cursor class over
``ltxvfs.dbapi.Cursor``, the max-lag check on a read-only replica, ``sync()``, and test databases
(a replica is never deleted: ``TEST["NAME"]`` names a scratch replica, see :class:`DatabaseCreation`).
"""

from __future__ import annotations

import datetime
import decimal
import logging
import warnings
from collections.abc import Mapping
from itertools import tee

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.sqlite3 import base as sqlite_base
from django.db.backends.sqlite3.creation import DatabaseCreation as SQLiteDatabaseCreation

from ltxvfs import dbapi as Database  # noqa: N812 - Django's name for the driver module

log = logging.getLogger("ltxvfs.django")

# As Django does for sqlite3 (module-wide, like sqlite3's adapters): Decimal as text, dates and
# datetimes as Django writes them. There are no converters: Django's operations convert the text.
Database.register_adapter(decimal.Decimal, str)
Database.register_adapter(datetime.date, sqlite_base.adapt_date)
Database.register_adapter(datetime.datetime, sqlite_base.adapt_datetime)

#: OPTIONS that are this backend's, not ``connect``'s.
_BACKEND_OPTIONS = ("max_lag", "lag_action")
#: sqlite3 options Django sets or users copy from a sqlite3 configuration; accepted, not used.
_SQLITE3_ONLY = ("detect_types", "check_same_thread", "uri", "cached_statements", "factory")


class ReplicaLagError(Database.OperationalError):
    """A read-only replica's last successful poll is older than ``OPTIONS["max_lag"]`` seconds
    (Django raises it as ``django.db.utils.OperationalError``)."""


class ReplicaLagWarning(RuntimeWarning):
    """``lag_action="warn"``: the same condition, as a warning (and a log line)."""


class DatabaseCreation(SQLiteDatabaseCreation):
    """Test databases. A replica is not a file Django may delete: the writer's
    ``TEST["NAME"]`` must name a scratch replica (``file:///tmp/test-replica``; it is used as it
    is, and kept), and read replicas use ``TEST["MIRROR"]`` as usual."""

    def _get_test_db_name(self) -> str:
        name = self.connection.settings_dict["TEST"]["NAME"]
        if not name:
            raise ImproperlyConfigured(
                f"DATABASES[{self.connection.alias!r}]['TEST']['NAME'] must name a scratch replica "
                "(e.g. a file:// URL) for tests: ltxvfs.django does not create or delete replicas")
        return name

    def _create_test_db(self, verbosity, autoclobber, keepdb=False) -> str:
        return self._get_test_db_name()

    def _destroy_test_db(self, test_database_name, verbosity) -> None:
        pass  # replicas are kept

    def _clone_test_db(self, suffix, verbosity, keepdb=False) -> None:
        raise Database.NotSupportedError("parallel tests (cloned test databases) are not supported")

    def get_test_db_clone_settings(self, suffix):
        raise Database.NotSupportedError("parallel tests (cloned test databases) are not supported")


class DatabaseWrapper(sqlite_base.DatabaseWrapper):
    vendor = "sqlite"
    display_name = "SQLite (ltxvfs replica)"
    Database = Database
    creation_class = DatabaseCreation
    max_lag: float | None = None  # set from OPTIONS at connect
    lag_action = "raise"
    is_writer = False

    def get_connection_params(self) -> dict:
        options = dict(self.settings_dict["OPTIONS"])
        self.max_lag = options.pop("max_lag", None)
        self.lag_action = options.pop("lag_action", "raise")
        if self.lag_action not in ("raise", "warn"):
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['lag_action'] must be 'raise' or 'warn', "
                f"not {self.lag_action!r}")
        self.is_writer = bool(options.get("write", False))
        if self.max_lag is not None and self.is_writer:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]: max_lag applies to read-only replicas, not the writer")
        saved = self.settings_dict["OPTIONS"]
        self.settings_dict["OPTIONS"] = options
        try:
            kwargs = super().get_connection_params()  # checks NAME, transaction_mode, init_command
        finally:
            self.settings_dict["OPTIONS"] = saved
        for key in _SQLITE3_ONLY:
            kwargs.pop(key, None)
        kwargs["replica_url"] = str(kwargs.pop("database"))
        return kwargs

    @sqlite_base.async_unsafe
    def get_new_connection(self, conn_params):
        conn = Database.connect(**conn_params)
        try:
            sqlite_base.register_functions(conn)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA legacy_alter_table = OFF")
            for init_command in self.init_commands:
                if init_command := init_command.strip():
                    conn.execute(init_command)
        except BaseException:
            conn.close()
            raise
        return conn

    def create_cursor(self, name=None):
        if self.max_lag is not None:
            self.check_lag()
        return self.connection.cursor(factory=CursorWrapper)

    # -- replica state -----------------------------------------------------------------------

    def lag(self) -> int:
        """``PRAGMA litestream_lag``: seconds since the replica's last successful poll (-1:
        never)."""
        self.ensure_connection()
        with self.wrap_database_errors:
            return int(self.connection.apsw.execute("PRAGMA litestream_lag").fetchall()[0][0])

    def lag_exceeded(self) -> bool:
        """True when ``max_lag`` is set and the replica's lag is over it (or it never polled)."""
        lag = self.lag()  # connects: OPTIONS are read
        if self.max_lag is None:
            return False
        return lag < 0 or lag > self.max_lag

    def check_lag(self) -> None:
        """The max-lag check made before each cursor of a replica with ``max_lag``: raise
        :class:`ReplicaLagError` (``lag_action="raise"``) or warn (``"warn"``)."""
        lag = int(self.connection.apsw.execute("PRAGMA litestream_lag").fetchall()[0][0])
        if 0 <= lag <= self.max_lag:
            return
        what = "never polled successfully" if lag < 0 else f"last polled successfully {lag} s ago"
        msg = (f"replica {self.alias!r} ({self.settings_dict['NAME']}) {what}; "
               f"max_lag is {self.max_lag} s")
        if self.lag_action == "warn":
            log.warning("%s", msg)
            warnings.warn(msg, ReplicaLagWarning, stacklevel=3)
        else:
            raise ReplicaLagError(msg)

    def sync(self) -> str:
        """Writer: upload buffered commits now (``PRAGMA litestream_sync``); the new TXID, ``''``
        if there was nothing to sync. Replicas in this process see it at their next read."""
        self.ensure_connection()
        with self.wrap_database_errors:
            return self.connection.apsw.execute("PRAGMA litestream_sync").fetchall()[0][0]

    def txid(self) -> str:
        """``PRAGMA litestream_txid``: the TXID this connection sees."""
        self.ensure_connection()
        with self.wrap_database_errors:
            return self.connection.apsw.execute("PRAGMA litestream_txid").fetchall()[0][0]


FORMAT_QMARK_REGEX = sqlite_base.FORMAT_QMARK_REGEX


class CursorWrapper(Database.Cursor):
    """Django's ``SQLiteCursorWrapper`` over ``ltxvfs.dbapi.Cursor``: Django's "format" (``%s``)
    and "pyformat" (``%(name)s``) styles become qmark and named."""

    def execute(self, query, params=None):
        if params is None:
            return super().execute(query)
        param_names = list(params) if isinstance(params, Mapping) else None
        return super().execute(self.convert_query(query, param_names=param_names), params)

    def executemany(self, query, param_list):
        peekable, param_list = tee(iter(param_list))
        if (params := next(peekable, None)) and isinstance(params, Mapping):
            param_names = list(params)
        else:
            param_names = None
        return super().executemany(self.convert_query(query, param_names=param_names), param_list)

    def convert_query(self, query, *, param_names=None):
        if param_names is None:
            return FORMAT_QMARK_REGEX.sub("?", query).replace("%%", "%")
        return query % {name: f":{name}" for name in param_names}
