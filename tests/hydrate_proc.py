"""A reader process for hydration tests: ``python hydrate_proc.py URI``.

Opens the database at URI read-only through the litestream VFS (one connection held open for
its whole life, so the replica and its hydration stay up) and answers one command per line on
stdin with one JSON line on stdout:

* ``read``: a new connection reads ``t`` in one transaction:
  ``{"txid", "rows", "digest", "progress", "file"}`` (``{"error"}`` if it fails);
* ``poll``: polls the replica now: ``{"txid"}``;
* ``stats``: ``PRAGMA litestream_stats`` of the held connection;
* ``close``: closes the connections: ``{"closed": true}``, then exits.

Log records (WARNING and up) go to stderr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys

import apsw

import ltxvfs

FLAGS = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI


def digest(rows) -> str:
    """The same digest the test computes from the primary's rows (id, b)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(repr(tuple(row)).encode())
    return h.hexdigest()


def one(con, sql):
    return con.execute(sql).fetchall()[0][0]


def read(uri: str) -> dict:
    con = apsw.Connection(uri, flags=FLAGS)
    try:
        con.execute("BEGIN")
        rows = con.execute("SELECT id, b FROM t ORDER BY id").fetchall()
        # After the first read: before it, the PRAGMA names the state a transaction would get
        # at that moment, not necessarily the one the SELECT then chose.
        txid = one(con, "PRAGMA litestream_txid")
        con.execute("COMMIT")
        return {"txid": txid, "rows": len(rows), "digest": digest(rows),
                "progress": one(con, "PRAGMA litestream_hydration_progress"),
                "file": one(con, "PRAGMA litestream_hydration_file")}
    except apsw.Error as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        con.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    uri = sys.argv[1]
    vfs = ltxvfs.register()
    held = apsw.Connection(uri, flags=FLAGS)
    one(held, "SELECT count(*) FROM t")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "read":
            answer = read(uri)
        elif cmd == "poll":
            (replica,) = vfs.replicas()
            answer = {"txid": f"{replica.poll().txid:016x}"}
        elif cmd == "stats":
            answer = json.loads(one(held, "PRAGMA litestream_stats"))
        elif cmd == "close":
            held.close()
            print(json.dumps({"closed": True}), flush=True)
            return 0
        else:
            answer = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
