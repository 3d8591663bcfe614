"""``ltxvfs demo``: a tour that works right after ``pip install``, on a local file:// replica.

It plays a primary: writes a few transactions to a SQLite database and publishes each change as
an LTX file (a snapshot, then one L0 file per commit, holding only the changed pages), exactly as
Litestream lays them out. Then it lists the replica and restores it at the latest TXID and in the
past, printing what each step found.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

from .plan import list_levels
from .publish import database_pages, publish_pages
from .restore import restore
from .storage import open_replica
from .storage.base import SNAPSHOT_LEVEL, format_txid

_STEPS = [
    ("create a table of cities", [
        "CREATE TABLE city (name TEXT PRIMARY KEY, country TEXT, population INTEGER)",
        "INSERT INTO city VALUES ('Lisbon', 'PT', 545000), ('Oslo', 'NO', 709000)"]),
    ("add Nairobi", ["INSERT INTO city VALUES ('Nairobi', 'KE', 4397000)"]),
    ("Oslo grows", ["UPDATE city SET population = 717000 WHERE name = 'Oslo'"]),
    ("drop Lisbon", ["DELETE FROM city WHERE name = 'Lisbon'"]),
]


def _rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as con:
        return con.execute("SELECT name, population FROM city ORDER BY name").fetchall()


def run_demo(directory: str | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="ltxvfs-demo-") as tmp:
        root = Path(directory or tmp)
        root.mkdir(parents=True, exist_ok=True)
        replica_url = (root / "replica").as_uri()
        primary = root / "primary.db"
        primary.unlink(missing_ok=True)
        print(f"replica: {replica_url}")
        with open_replica(replica_url) as client:
            previous: dict[int, bytes] = {}
            for txid, (what, statements) in enumerate(_STEPS, start=1):
                with sqlite3.connect(primary) as con:
                    for sql in statements:
                        con.execute(sql)
                pages = dict(database_pages(str(primary)))
                changed = [(n, d) for n, d in sorted(pages.items()) if previous.get(n) != d]
                if txid == 1:
                    changed = sorted(pages.items())  # the first file is a full snapshot
                page_size = len(next(iter(pages.values())))
                info = publish_pages(client, 0, txid, txid, page_size=page_size,
                                     commit=len(pages), pages=changed,
                                     timestamp_ms=int(time.time() * 1000))
                print(f"  TXID {format_txid(txid)}: {what:<26} -> {info}  "
                      f"({len(changed)} page(s), {info.size} bytes)")
                previous = pages
            listing = list_levels(client)
            count = sum(len(v) for v in listing.values())
            print(f"listing: {count} LTX files, {len(listing[0])} on L0, "
                  f"{len(listing[SNAPSHOT_LEVEL])} snapshots on L9")
            latest = restore(client, root / "latest.db", force=True)
            print(f"restore latest (TXID {format_txid(latest.txid)}): {_rows(latest.path)}")
            past = restore(client, root / "txid2.db", txid=2, force=True)
            print(f"restore TXID {format_txid(past.txid)}:          {_rows(past.path)}")
        ok = _rows(latest.path) == _rows(primary)
        print("latest restore equals the primary" if ok else "MISMATCH: latest differs from primary")
        if directory:
            print(f"files kept in {root}")
        return 0 if ok else 1
