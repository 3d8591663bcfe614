"""peewee over a Litestream replica: ``playhouse.apsw_ext.APSWDatabase`` with the VFS.

peewee's ``APSWDatabase`` already speaks APSW: it passes its keyword arguments to
``apsw.Connection``, so a SQLite URI naming the ``litestream`` VFS plus ``flags`` (with
``SQLITE_OPEN_URI``) is all it needs — see docs/integrations.md. :class:`ReplicaDatabase` is the
same class with ``ltxvfs.dbapi.connect``'s arguments instead of a URI:

    db = ReplicaDatabase("s3://bucket/db")                           # read-only, follows
    db = ReplicaDatabase("s3://bucket/app", write=True)              # write mode (one writer)
    db = ReplicaDatabase("s3://bucket/db", time="1 hour ago")        # pinned to a past state

It registers the VFS, builds the URI and the open flags, and pins each new connection with
``PRAGMA litestream_time`` / ``litestream_pin_txid`` (time travel stays a PRAGMA too:
``db.execute_sql("PRAGMA litestream_time = 'latest'")``). A write-mode ``ltxvfs.ConflictError``
stays itself (peewee maps apsw's errors by class name and does not know it).
"""

from __future__ import annotations

from typing import Any

from playhouse.apsw_ext import APSWDatabase

from ltxvfs.dbapi import _sqlite_uri


def _quoted(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


class ReplicaDatabase(APSWDatabase):
    """``APSWDatabase`` on a replica (``s3://…``, ``file:///…``): ``write``, ``hydration_path``,
    ``time``, ``txid``, ``name`` (the SQLite label) and the VFS's URI parameters
    (``poll_interval="5s"``, ``buffer_path``, ``sync_interval``, …) as in ``ltxvfs.dbapi.connect``;
    ``timeout``, ``pragmas``, ``autoconnect``, ``thread_safe`` … are peewee's."""

    def __init__(self, replica_url: str | None, *, write: bool = False,
                 hydration_path: str | None = None, time: str | None = None,
                 txid: int | str | None = None, name: str = "db", **kwargs: Any) -> None:
        self._ltxvfs_options = dict(write=write, hydration_path=hydration_path, name=name)
        self._ltxvfs_pin = (time, txid)
        super().__init__(replica_url, **kwargs)

    def init(self, database: str | None, **kwargs: Any) -> None:
        """peewee's deferred initialisation (``ReplicaDatabase(None)`` then ``db.init(url)``):
        the VFS's URI parameters are split from peewee's own keyword arguments."""
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in ("pragmas", "timeout", "returning_clause")}
        if database is None:
            super().init(None, **own)
            return
        from ltxvfs import register

        register()
        uri, flags = _sqlite_uri(database, uri_params=kwargs, **getattr(
            self, "_ltxvfs_options", dict(write=False, hydration_path=None, name="db")))
        super().init(uri, flags=flags, **own)

    def _add_conn_hooks(self, conn) -> None:
        time, txid = getattr(self, "_ltxvfs_pin", (None, None))
        if time is not None:
            conn.execute(f"PRAGMA litestream_time = {_quoted(time)}")
        if txid is not None:
            conn.execute(f"PRAGMA litestream_pin_txid = "
                         f"{_quoted(txid if isinstance(txid, str) else f'{txid:016x}')}")
        super()._add_conn_hooks(conn)


__all__ = ["ReplicaDatabase"]
