"""A writer process for crash and race tests: ``python writer_proc.py URI START COUNT [SYNC]``.

Inserts rows START..START+COUNT-1 into ``t(id INTEGER PRIMARY KEY, who TEXT, body BLOB)``, one
commit each, printing ``committed <id>`` (flushed) after each commit returns and ``synced <txid>``
after each explicit sync (every SYNC commits, if given). Exits 3 on ConflictError, printing it.
With ``WRITER_BARRIER=1`` it prints ``ready`` once open and waits for a line on stdin.
``WRITER_PRAGMAS="synchronous=OFF;locking_mode=EXCLUSIVE"`` runs those PRAGMAs after opening;
``WRITER_PREALLOC=N`` grows the write buffer's zero tail N bytes at a time.
"""

from __future__ import annotations

import os
import sys

import apsw

import ltxvfs
from ltxvfs.errors import ConflictError

from faults import wait_at_barrier


def main() -> int:
    uri, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sync_every = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    if os.environ.get("WRITER_PREALLOC"):  # a small zero tail: crashes meet its growth too
        from ltxvfs import buffer

        buffer.PREALLOC = int(os.environ["WRITER_PREALLOC"])
    ltxvfs.register()
    con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
                          | apsw.SQLITE_OPEN_URI)
    con.set_busy_timeout(5000)
    who = f"pid{os.getpid()}"
    for pragma in filter(None, os.environ.get("WRITER_PRAGMAS", "").split(";")):
        con.execute(f"PRAGMA {pragma}")
    try:
        con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, who TEXT, body BLOB)")
        if os.environ.get("WRITER_BARRIER") == "1":
            wait_at_barrier()
        for i in range(start, start + count):
            con.execute("INSERT INTO t VALUES (?, ?, randomblob(?))", (i, who, 100 + i % 900))
            print(f"committed {i}", flush=True)
            if sync_every and (i - start + 1) % sync_every == 0:
                txid = con.execute("PRAGMA litestream_sync").fetchall()[0][0]
                print(f"synced {txid}", flush=True)
        con.close()
    except ConflictError as err:
        print(f"conflict {err}", flush=True)
        return 3
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
