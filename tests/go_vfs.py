"""Run a query through the real Go Litestream VFS (PyPI ``litestream-vfs``) in a subprocess.

The extension reads its environment at load time and breaks later opens in the process that
loaded it, so every query gets a fresh process with the environment set at exec.
"""

from __future__ import annotations

import json
import subprocess
import sys

from litestream_rig import litestream_env

_SCRIPT = r"""
import json, sys, apsw, litestream_vfs
boot = apsw.Connection(":memory:")
boot.enable_load_extension(True)
boot.load_extension(litestream_vfs.loadable_path(), "sqlite3_litestreamvfs_init")
con = apsw.Connection("file:db?vfs=litestream", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
rows = [list(r) for r in con.execute(sys.argv[1])]
print(json.dumps(rows))
"""


def go_vfs_query(url: str, sql: str, timeout: float = 60) -> list[tuple]:
    """Rows of ``sql`` read through the Go VFS from the replica at ``url`` (blobs not supported:
    select hex() of them)."""
    env = litestream_env({"LITESTREAM_REPLICA_URL": url, "LITESTREAM_LOG_LEVEL": "INFO"})
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, sql], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"Go VFS query failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
