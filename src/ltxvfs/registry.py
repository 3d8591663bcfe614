"""Registering the ``litestream`` VFS, and the SQL functions every connection through it gets.

``register()`` creates the :class:`~ltxvfs.vfs.LitestreamVFS` once per name; a clean interpreter
exit syncs what write buffers still hold and removes the scratch directories.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

import apsw

from .config import VFSConfig
from .dbfile import LitestreamFile
from .errors import LitestreamError
from .scratch import remove_scratch_dir
from .vfs import LitestreamVFS

log = logging.getLogger("ltxvfs")


_registered: dict[str, LitestreamVFS] = {}
_register_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # a parent's thread may hold it at fork
    os.register_at_fork(after_in_child=lambda: globals().update(_register_lock=threading.Lock()))


def register(name: str = "litestream", config: VFSConfig | None = None,
             makedefault: bool = False, warm_up: bool = True) -> LitestreamVFS:
    """Register the VFS (once per name; later calls return the same object) and the SQL
    functions ``litestream_time()``, ``litestream_txid()``, ``litestream_lag()`` and
    ``litestream_set_time(x)`` on every connection that opens a database through it."""
    with _register_lock:
        vfs = _registered.get(name)
        if vfs is None:
            vfs = LitestreamVFS(name, config, makedefault)
            _registered[name] = vfs
            if _add_functions not in apsw.connection_hooks:
                apsw.connection_hooks.append(_add_functions)
                atexit.register(_sync_at_exit)
                if warm_up:
                    _warm_up_s3()
        return vfs


def _warm_up_s3() -> None:
    """Import boto3 and load the S3 model now (~0.4 s once per process, no network), so that
    opening a database — the first query's latency — does not pay for it, as the Go extension
    pays its start-up cost when it is loaded."""
    try:
        from .storage.s3 import warm_up

        warm_up()
    except Exception:  # only an optimisation: the open does the real work and reports errors
        log.debug("S3 warm-up failed", exc_info=True)


def unregister(name: str = "litestream") -> None:
    with _register_lock:
        vfs = _registered.pop(name, None)
    if vfs is not None:
        vfs.close()


def _sync_at_exit() -> None:
    """A clean interpreter exit syncs what is buffered, even if connections were left open,
    and removes the scratch directories."""
    for vfs in list(_registered.values()):
        for replica in vfs.replicas():
            writer = replica.writer
            if writer is not None and not writer.buffer.in_transaction:
                try:
                    writer.close()  # final sync; the buffer goes only if all of it was synced
                except LitestreamError:
                    pass  # logged by close(); the buffer is kept
        if vfs._tmpdir is not None:
            remove_scratch_dir(vfs._tmpdir)  # a journal still open there stays usable (POSIX)


def _add_functions(con: apsw.Connection) -> None:
    # APSW names a non-VFSFile file by its class; that is how we know the main db is ours.
    if con.open_vfs not in _registered and \
            LitestreamFile.__qualname__ not in (con.vfsname("main") or ""):
        return

    def pragma(name: str, value: str | None = None):
        sql = f"PRAGMA {name}" if value is None else f"PRAGMA {name} = {_quote(value)}"
        rows = con.execute(sql).fetchall()
        return rows[0][0] if rows else None

    con.create_scalar_function("litestream_time", lambda: pragma("litestream_time"), 0)
    con.create_scalar_function("litestream_txid", lambda: pragma("litestream_txid"), 0)
    con.create_scalar_function("litestream_lag", lambda: int(pragma("litestream_lag")), 0)
    con.create_scalar_function(
        "litestream_set_time", lambda v: (pragma("litestream_time", str(v)), None)[1], 1,
        flags=apsw.SQLITE_DIRECTONLY)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
