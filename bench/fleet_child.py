"""One reader of the fleet benchmark (bench/fleet.py): ``python fleet_child.py URI MAX_ID SEED``.

Opens URI read-only through ltxvfs (one connection for its whole life) and answers one JSON line
per command line on stdin:

* ``lookups N``: N point lookups of random ids (autocommit, one read transaction each):
  ``{"s": seconds, "us_per_lookup": median}``;
* ``read``: one lookup and the TXID it read: ``{"txid", "max_id"}``;
* ``stats``: ``ltxvfs.stats(con)``;
* ``close``.
"""

from __future__ import annotations

import json
import random
import sys
import time

import apsw

import ltxvfs


def main() -> int:
    uri, max_id, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ltxvfs.register()
    con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    con.set_busy_timeout(5000)
    rng = random.Random(seed)
    cur = con.cursor()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "lookups":
            times = []
            t0 = time.perf_counter()
            for _ in range(int(cmd[1])):
                t = time.perf_counter()
                cur.execute("SELECT k, name FROM t WHERE id = ?", (rng.randint(1, max_id),))
                cur.fetchall()
                times.append(time.perf_counter() - t)
            times.sort()
            out = {"s": time.perf_counter() - t0,
                   "us_per_lookup": times[len(times) // 2] * 1e6 if times else None}
        elif cmd[0] == "read":
            cur.execute("SELECT max(id) FROM t")
            top = cur.fetchall()[0][0]
            out = {"txid": con.execute("PRAGMA litestream_txid").fetchall()[0][0], "max_id": top}
        elif cmd[0] == "stats":
            out = ltxvfs.stats(con)
        elif cmd[0] == "close":
            con.close()
            print(json.dumps({"closed": True}), flush=True)
            return 0
        else:
            out = {"error": f"unknown command {cmd[0]!r}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
