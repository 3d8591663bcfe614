"""The SQLAlchemy dialect ``sqlite+ltxvfs://``: SQLAlchemy's SQLite dialect over :mod:`ltxvfs.dbapi`.

    create_engine("sqlite+ltxvfs:///?replica_url=s3%3A%2F%2Fbucket%2Fdb")            # read-only
    create_engine("sqlite+ltxvfs:///app?replica_url=file%3A%2F%2F%2Fsrv%2Fapp&write=true")

The URL's database part is the SQLite label (default ``db``); its query holds ``replica_url``
(quoted) and any of ``ltxvfs.dbapi.connect``'s arguments (``write``, ``hydration_path``, ``time``,
``txid``, ``timeout``, ``isolation_level``) and the VFS's URI parameters (``poll_interval``,
``cache_size``, ``sync_interval``, …). ``connect_args`` in ``create_engine`` works as usual.
Registered under the ``sqlalchemy.dialects`` entry point ``sqlite.ltxvfs``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import pool
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL

_BOOL = {"true": True, "1": True, "yes": True, "on": True,
         "false": False, "0": False, "no": False, "off": False}


class SQLiteDialect_ltxvfs(SQLiteDialect_pysqlite):  # noqa: N801 - SQLAlchemy's naming
    """SQLite over a Litestream replica; everything SQL is SQLAlchemy's SQLite dialect."""

    driver = "ltxvfs"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls):
        from ltxvfs import dbapi

        return dbapi

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        # A replica is a file database shared by connections (one cache, one poller): pool them.
        return pool.QueuePool

    def create_connect_args(self, url: URL) -> tuple[list[Any], dict[str, Any]]:
        if url.username or url.password or url.host or url.port:
            raise ValueError(f"sqlite+ltxvfs URLs have no host or credentials: {url!r}; "
                             "put the replica in ?replica_url=… (quoted)")
        opts: dict[str, Any] = dict(url.query)
        replica_url = opts.pop("replica_url", None)
        if not replica_url:
            raise ValueError("sqlite+ltxvfs:// needs ?replica_url=<quoted replica URL>")
        kwargs: dict[str, Any] = {"name": url.database or "db"}
        for key, value in opts.items():
            if isinstance(value, tuple):
                raise ValueError(f"{key} is given more than once")
            if key == "write":
                kwargs[key] = _BOOL[value.lower()]
            elif key == "timeout":
                kwargs[key] = float(value)
            elif key == "isolation_level":
                kwargs[key] = value or ""
            else:  # hydration_path, time, txid and the VFS's URI parameters (it checks them)
                kwargs[key] = value
        return [replica_url], kwargs


dialect = SQLiteDialect_ltxvfs
