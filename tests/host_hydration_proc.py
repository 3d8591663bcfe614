"""Worker processes of tests/test_host_hydration.py, started with multiprocessing (fork or spawn).

``reader(conn, uri, opts)``: opens the database read-only through a VFS of its own (a fresh
name: a forked child must not use the parent's VFS threads), holds one connection open for its
whole life, and answers ``(command, arg)`` messages on ``conn``:

* ``("read", None)``: one read transaction on a new connection; checks every row against the
  content its version must have (``check_rows``): ``{"txid", "version", "rows", "bad", "digest"}``
* ``("hammer", seconds_or_stop_file)``: read transactions in a loop until the file ``arg``
  exists; ``{"reads", "bad", "pairs": [[txid, version], ...], "errors"}``
* ``("stats", None)``: ``PRAGMA litestream_stats`` of the held connection (+ ``"progress"``)
* ``("poll", None)``: polls now: ``{"txid"}``
* ``("held", None)``: ``{"finished", "held"}`` fetch tasks (with ``opts["hold_after"]``)
* ``("close", None)``: closes, ``{"closed": True}``, returns.

``opts``: ``takeover`` (seconds, ``hydrate.TAKEOVER_INTERVAL``), ``run_bytes``
(``hydrate.RUN_BYTES``), ``hold_after`` (fetch tasks after the first N block forever: a builder
that is slow, to be killed mid-build), ``fail_writes`` (writes to the copy fail: a full disk).

``writer(conn, uri, versions)``: write mode; for each version k in 1..versions rewrites every
row to version k and syncs, sending ``(txid, k)`` after each; then ``("done", None)``, and
closes when it receives anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from urllib.parse import quote

ROW_BYTES = 1500


def expected_b(rid: int, version: int) -> bytes:
    return bytes([65 + (rid + version) % 26]) * ROW_BYTES


def check_rows(rows) -> tuple[int | None, list]:
    """(the version of the rows, rows that are not what that version holds)."""
    versions = {r[1] for r in rows}
    if len(versions) != 1:
        return None, [f"versions {sorted(versions)[:5]} in one transaction"]
    (version,) = versions
    bad = [r[0] for r in rows if bytes(r[2]) != expected_b(r[0], version)]
    return version, bad


def _register(uri: str):
    """A VFS of this process's own, and ``uri`` naming it."""
    import ltxvfs

    name = f"litestream-w{os.getpid()}"
    return ltxvfs.register(name=name), uri.replace("vfs=litestream", f"vfs={quote(name)}")


def _one(con, sql):
    return con.execute(sql).fetchall()[0][0]


def _read(uri: str, flags: int, versioned: bool) -> dict:
    import apsw

    con = apsw.Connection(uri, flags=flags)
    try:
        con.execute("BEGIN")
        if versioned:
            rows = con.execute("SELECT id, v, b FROM t ORDER BY id").fetchall()
            version, bad = check_rows(rows)
            digest = ""
        else:
            rows = con.execute("SELECT id, b FROM t ORDER BY id").fetchall()
            version, bad = None, []
            h = hashlib.sha256()
            for row in rows:
                h.update(repr(tuple(row)).encode())
            digest = h.hexdigest()
        # Inside the transaction (after its first read): before it, the PRAGMA names the state
        # a transaction would get at that moment, not the one the SELECT then chose.
        txid = _one(con, "PRAGMA litestream_txid")
        con.execute("COMMIT")
        return {"txid": txid, "version": version, "rows": len(rows), "bad": bad[:5],
                "digest": digest}
    except apsw.Error as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        con.close()


class _OsWith:
    """``os`` with some functions replaced (for hydrate.py only)."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def reader(conn, uri: str, opts: dict) -> None:
    try:
        _reader(conn, uri, opts)
    except BaseException as err:  # say why, then die
        conn.send({"error": f"{type(err).__name__}: {err}"})
        raise


def _reader(conn, uri: str, opts: dict) -> None:
    import apsw

    from ltxvfs import hydrate

    hydrate.TAKEOVER_INTERVAL = opts.get("takeover", 0.05)
    if "run_bytes" in opts:
        hydrate.RUN_BYTES = opts["run_bytes"]
    counts = {"started": 0, "finished": 0, "held": 0}
    if "hold_after" in opts:
        real, limit, forever = hydrate.Hydrator._fetch_run, opts["hold_after"], threading.Event()
        lock = threading.Lock()

        def fetch_run(self, state, run):
            with lock:
                go = counts["started"] < limit
                counts["started" if go else "held"] += 1
            if not go:
                forever.wait()
                return None
            real(self, state, run)
            with lock:
                counts["finished"] += 1
            return None

        hydrate.Hydrator._fetch_run = fetch_run
    if opts.get("fail_writes"):
        import errno

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        hydrate.os = _OsWith(pwritev=full, pwrite=full)
    vfs, uri = _register(uri)
    flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
    versioned = bool(opts.get("versioned"))
    held = apsw.Connection(uri, flags=flags)
    _one(held, "SELECT count(*) FROM sqlite_master")
    conn.send({"pid": os.getpid()})
    while True:
        cmd, arg = conn.recv()
        if cmd == "read":
            answer = _read(uri, flags, versioned)
        elif cmd == "hammer":
            answer = {"reads": 0, "bad": [], "pairs": [], "errors": []}
            while not os.path.exists(arg):
                r = _read(uri, flags, versioned)
                answer["reads"] += 1
                if "error" in r:
                    answer["errors"].append(r["error"])
                    continue
                if r["bad"]:
                    answer["bad"].append(r)
                pair = [r["txid"], r["version"]]
                if pair not in answer["pairs"]:
                    answer["pairs"].append(pair)
        elif cmd == "stats":
            answer = json.loads(_one(held, "PRAGMA litestream_stats"))
            answer["progress"] = _one(held, "PRAGMA litestream_hydration_progress")
        elif cmd == "poll":
            (replica,) = vfs.replicas()
            answer = {"txid": f"{replica.poll().txid:016x}"}
        elif cmd == "held":
            answer = dict(counts)
        elif cmd == "close":
            held.close()
            vfs.close()
            conn.send({"closed": True})
            return
        else:
            answer = {"error": f"unknown command {cmd!r}"}
        conn.send(answer)


def writer(conn, uri: str, versions: int) -> None:
    try:
        import apsw

        _, uri = _register(uri)
        con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
        conn.send({"pid": os.getpid()})
        conn.recv()  # go
        for k in range(1, versions + 1):
            con.execute("UPDATE t SET v = ?, b = CAST(printf('%.*c', ?, char(65 + (id + ?) % 26))"
                        " AS BLOB)", (k, ROW_BYTES, k))
            txid = _one(con, "PRAGMA litestream_sync")
            conn.send((txid, k))
        conn.send(("done", None))
        conn.recv()  # bye
        con.close()
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        raise
