"""Build replicas without Litestream: a local SQLite primary whose commits we publish ourselves.

``FakePrimary`` writes to a rollback-journal SQLite file and publishes each change as one L0 LTX
file holding the changed pages (the first one a full snapshot), the way Litestream lays them out.
Tests use it where the real ``litestream replicate`` would only add time and nondeterminism.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from ltxvfs.publish import database_pages, publish_pages
from ltxvfs.storage.base import FileInfo, ReplicaClient

_SERIES = re.compile(r"generate_series\((\d+),\s*(\d+)\)")


def _series(sql: str) -> str:
    """Python's sqlite3 lacks generate_series(): expand it to a recursive CTE."""
    return _SERIES.sub(lambda m: "(WITH RECURSIVE s(value) AS (SELECT " + m.group(1) +
                       " UNION ALL SELECT value + 1 FROM s WHERE value < " + m.group(2) +
                       ") SELECT value FROM s)", sql)


def page_bytes(path: str | Path) -> dict[int, bytes]:
    return dict(database_pages(str(path)))


class FakePrimary:
    def __init__(self, path: Path, client: ReplicaClient, page_size: int = 4096) -> None:
        self.path = Path(path)
        self.client = client
        self.page_size = page_size
        self.txid = 0
        self.published: dict[int, bytes] = {}
        self.history: list[tuple[int, float, dict[int, bytes]]] = []
        con = sqlite3.connect(self.path)
        con.execute(f"PRAGMA page_size = {page_size}")
        con.execute("PRAGMA journal_mode = delete")
        con.execute("VACUUM")
        con.close()

    def execute(self, *statements: str, params: list | None = None) -> None:
        """Run statements in one transaction (no publish)."""
        con = sqlite3.connect(self.path)
        with con:
            for sql in statements:
                if params is not None:
                    con.executemany(sql, params)
                else:
                    con.execute(_series(sql))
        con.close()

    def commit(self, *statements: str, params: list | None = None, level: int = 0,
               timestamp_ms: int | None = None) -> FileInfo:
        """Run statements, then publish the changed pages as the next TXID."""
        if statements:
            self.execute(*statements, params=params)
        return self.publish(level=level, timestamp_ms=timestamp_ms)

    def publish(self, level: int = 0, timestamp_ms: int | None = None) -> FileInfo:
        pages = page_bytes(self.path)
        commit = self.path.stat().st_size // self.page_size
        if self.txid == 0:
            changed = sorted(pages.items())
        else:
            changed = [(n, d) for n, d in sorted(pages.items()) if self.published.get(n) != d]
        self.txid += 1
        info = publish_pages(self.client, level, self.txid, self.txid, page_size=self.page_size,
                             commit=commit, pages=changed, timestamp_ms=timestamp_ms)
        self.published = pages
        self.history.append((self.txid, time.time(), pages))
        return info

    def rows(self, sql: str = "SELECT * FROM t ORDER BY 1") -> list[tuple]:
        con = sqlite3.connect(self.path)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()


def rows_of(path: str | Path, sql: str = "SELECT * FROM t ORDER BY 1") -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def compact(client: ReplicaClient, files: list[FileInfo], level: int,
            delete_inputs: bool = False) -> FileInfo:
    """Merge contiguous ``files`` into one file on ``level`` (newest page wins, pages beyond the
    last commit dropped), as Litestream's compactor does."""
    from ltxvfs.ltx import decode_file

    merged: dict[int, bytes] = {}
    header = None
    for f in files:
        dec = decode_file(client.read(f.level, f.min_txid, f.max_txid))
        merged.update(dec.pages)
        header = dec.header
    assert header is not None
    pages = sorted((n, d) for n, d in merged.items() if n <= header.commit)
    info = publish_pages(client, level, files[0].min_txid, files[-1].max_txid,
                         page_size=header.page_size, commit=header.commit, pages=pages,
                         timestamp_ms=header.timestamp)
    if delete_inputs:
        client.delete(files)
    return info
