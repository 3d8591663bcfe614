"""Reads through the VFS across SQLite's lock page (issue 14, item 2).

SQLite never uses the page that holds byte 0x40000000 (1 GiB) of the file — the lock page,
``0x40000000 // page_size + 1`` — and Litestream leaves it out of LTX files. Only databases over
1 GiB have one, so no other test reaches it. With 64 KiB pages the lock page is 16385 and a
database of 16,499 pages (1.08 GB, mostly zeroblobs) compresses to a snapshot of ~12 MB: the
overflow chain of a row and a table's leaves lie beyond it, and every read, the integrity check
and a restore must step over it exactly as SQLite does.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from urllib.parse import quote

import apsw
import pytest

import ltxvfs
from ltxvfs.ltx import lock_pgno
from ltxvfs.publish import database_pages, publish_pages
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

PAGE = 65536
LOCK = 0x40000000 // PAGE + 1
BLOB = 540_000_000  # two of them: past 1 GiB (SQLite's default length limit is 1e9)
WINDOW = (528_000_000, 10_000_000)  # (offset, length) in the second blob, around the lock page

pytestmark = pytest.mark.slow


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def test_reads_restore_and_integrity_across_the_lock_page(tmp_path):
    assert lock_pgno(PAGE) == LOCK == 16385
    src = tmp_path / "big.db"
    con = sqlite3.connect(src)
    con.execute(f"PRAGMA page_size = {PAGE}")
    con.execute("PRAGMA journal_mode = OFF")
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB)")
    con.execute("CREATE TABLE after(id INTEGER PRIMARY KEY, v TEXT, r BLOB)")
    con.execute("INSERT INTO big(b) VALUES (zeroblob(?))", (BLOB,))
    # The second row's overflow chain runs across the lock page (at ~533 MB into the blob): random
    # bytes there, so a page read from the wrong place cannot pass for zeros.
    con.execute("INSERT INTO big(b) VALUES (zeroblob(?))", (BLOB,))
    marker = random.Random(7).randbytes(WINDOW[1])
    with con.blobopen("big", "b", 2) as blob:
        blob.seek(WINDOW[0])
        blob.write(marker)
    con.executemany("INSERT INTO after(v, r) VALUES (?, randomblob(3000))",
                    [(f"v{i}",) for i in range(300)])  # leaves beyond the lock page
    con.commit()
    pages = con.execute("PRAGMA page_count").fetchall()[0][0]
    expected = con.execute("SELECT id, v, hex(r) FROM after ORDER BY id").fetchall()
    con.close()
    assert pages * PAGE > 0x40000000 + PAGE, pages
    url = (tmp_path / "replica").as_uri()
    with open_replica(url) as client:
        info = publish_pages(client, 9, 1, 1, page_size=PAGE, commit=pages,
                             pages=database_pages(str(src)))
        assert info.size < 24 << 20, f"the sparse snapshot is {info.size} bytes"
        out = restore(client, tmp_path / "restored.db").path
    assert out.stat().st_size == src.stat().st_size
    assert _sha(out) == _sha(src), "restore differs from the database (lock page included)"
    out.unlink()

    ltxvfs.register()
    vfs_con = apsw.Connection(f"file:db?vfs=litestream&replica_url={quote(url, safe='')}",
                              flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        assert vfs_con.execute("PRAGMA page_count").fetchall() == [(pages,)]
        got = vfs_con.execute("SELECT id, v, hex(r) FROM after ORDER BY id").fetchall()
        assert got == expected
        # The second blob's bytes on both sides of where its chain steps over the lock page.
        (length, window), = vfs_con.execute(
            "SELECT length(b), substr(b, ?, ?) FROM big WHERE id = 2",
            (WINDOW[0] + 1, WINDOW[1])).fetchall()
        assert length == BLOB and window == marker
        assert vfs_con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        vfs_con.close()
        src.unlink()
