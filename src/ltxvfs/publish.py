"""Encode pages into an LTX file and upload it to a replica in one step.

Used by the demo, by tests that build replicas without Litestream, and by the writer. The file is
encoded into a spooled temporary file (memory up to a limit, then disk), so a large snapshot is
never held in memory twice.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator

from .ltx import Encoder, Header, lock_pgno
from .storage.base import FileInfo, ReplicaClient

#: Encoded files up to this size stay in memory before upload.
SPOOL_LIMIT = 16 * 1024 * 1024


def publish_pages(client: ReplicaClient, level: int, min_txid: int, max_txid: int, *,
                  page_size: int, commit: int, pages: Iterable[tuple[int, bytes]],
                  timestamp_ms: int | None = None, exclusive: bool = False) -> FileInfo:
    """Encode ``pages`` (ascending pgno) as ``<min>-<max>.ltx`` on ``level`` and upload it."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    header = Header(page_size=page_size, commit=commit, min_txid=min_txid, max_txid=max_txid,
                    timestamp=ts)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_LIMIT) as spool:
        enc = Encoder(spool, header)
        for pgno, data in pages:
            enc.write_page(pgno, data)
        enc.close()
        spool.seek(0)
        return client.write(level, min_txid, max_txid, spool, ts, exclusive=exclusive)


def database_pages(path: str, page_size: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Every page of a SQLite database file except the lock page, as (pgno, bytes)."""
    with open(path, "rb") as f:
        if page_size is None:
            page_size = sqlite_page_size(f.read(100))
            f.seek(0)
        lock = lock_pgno(page_size)
        pgno = 0
        while True:
            data = f.read(page_size)
            if not data:
                return
            pgno += 1
            if len(data) != page_size:
                raise ValueError(f"{path}: size is not a multiple of the page size {page_size}")
            if pgno != lock:
                yield pgno, data


def sqlite_page_size(header: bytes) -> int:
    """Page size from a SQLite database header (bytes 16-17; 1 means 65536)."""
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise ValueError("not a SQLite database")
    value = int.from_bytes(header[16:18], "big")
    return 65536 if value == 1 else value
