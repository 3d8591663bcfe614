"""A follower process for tests/test_host_polls.py, started with multiprocessing (fork or spawn).

:func:`follower` registers its own VFS (under ``vfs_name``: a forked child must not use the one
its parent registered, whose threads did not survive the fork), opens ``uri`` read-only and
answers commands sent on its end of a Pipe, one reply each:

* ``("stats",)``: the replica's counters, read from the object (no read transaction);
* ``("read",)``: one read transaction: ``{"rows", "max", "txid"}`` (``{"error"}`` if it fails);
* ``("wait_rows", n, timeout)``: reads again each time the replica's state changes until
  ``count(*) >= n``: the read's reply plus ``"ok"``;
* ``("wait_ticks", n, timeout)``: until the poll job has run ``n`` more times, no reads:
  the stats;
* ``("close",)``: closes and exits.
"""

from __future__ import annotations

import threading
import time


def _stats(replica) -> dict:
    requests = getattr(replica.client, "requests", None)
    return {"polls": replica.polls, "lists": replica.lists, "shared": replica.shared_used,
            "ticks": replica.ticks, "interval": replica.interval, "checks": replica.checks,
            "txid": replica.state.txid,
            "requests": requests.snapshot() if requests is not None else {}}


def follower(conn, uri: str, vfs_name: str) -> None:
    import apsw

    import ltxvfs

    vfs = ltxvfs.register(name=vfs_name, warm_up=False)
    con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
                          vfs=vfs_name)
    con.set_busy_timeout(5000)
    replica = vfs.replicas()[0]
    changed = threading.Event()
    replica.listeners.append(changed.set)

    def read() -> dict:
        try:
            con.execute("BEGIN")
            n, top = con.execute("SELECT count(*), max(id) FROM t").fetchall()[0]
            txid = con.execute("PRAGMA litestream_txid").fetchall()[0][0]
            con.execute("COMMIT")
            return {"rows": n, "max": top, "txid": txid}
        except apsw.Error as err:
            return {"error": f"{type(err).__name__}: {err}"}

    while True:
        cmd = conn.recv()
        if cmd[0] == "stats":
            conn.send(_stats(replica))
        elif cmd[0] == "read":
            conn.send(read())
        elif cmd[0] == "wait_rows":
            _, n, timeout = cmd
            deadline = time.monotonic() + timeout
            while True:
                changed.clear()
                out = read()
                if out.get("rows", -1) >= n or time.monotonic() >= deadline:
                    break
                changed.wait(max(deadline - time.monotonic(), 0))
            conn.send({**out, "ok": out.get("rows", -1) >= n})
        elif cmd[0] == "wait_ticks":
            _, n, timeout = cmd
            target, deadline = replica.ticks + n, time.monotonic() + timeout
            while replica.ticks < target and time.monotonic() < deadline:
                time.sleep(replica.poll_interval / 4)  # bounded; the tick counter has no event
            conn.send(_stats(replica))
        elif cmd[0] == "close":
            con.close()
            conn.send({"closed": True})
            return
