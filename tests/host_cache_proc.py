"""Worker of tests/test_host_cache.py run in its own process (fork or spawn): opens a replica
through the VFS with a ``cache_dir``, runs point lookups, reports rows and request counts."""

from __future__ import annotations

import json
from urllib.parse import quote


def uri(url: str, cache_dir: str | None, cache_size: str = "4MiB", extra: str = "") -> str:
    u = f"file:db?vfs=litestream&replica_url={quote(url, safe='')}" \
        f"&cache_size={cache_size}&poll_interval=1h"
    if cache_dir is not None:
        u += f"&cache_dir={quote(cache_dir, safe='')}"
    return u + extra


def lookups(url: str, cache_dir: str | None, keys: list[int], barrier=None, out=None,
            first_only: bool = False) -> dict:
    """Open, (wait at ``barrier``), look ``keys`` up; the result goes to ``out`` (a queue) too."""
    import apsw

    import ltxvfs

    ltxvfs.register()
    if barrier is not None:
        barrier.wait(60)
    con = apsw.Connection(uri(url, cache_dir),
                          flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    con.execute("PRAGMA cache_size = 0")  # SQLite's own cache: every read reaches ours
    if first_only:
        rows = con.execute("SELECT * FROM t ORDER BY id LIMIT 1").fetchall()
    else:
        rows = [con.execute("SELECT id, v FROM t WHERE id = ?", (k,)).fetchall() for k in keys]
    stats = json.loads(con.execute("PRAGMA litestream_stats").fetchall()[0][0])
    con.close()
    result = {"rows": rows, "stats": stats}
    if out is not None:
        out.put(json.dumps(result, default=list))
    return result
