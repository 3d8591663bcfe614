"""A configuration given only by environment variables (issue 14, item 2).

The Go VFS is configured by ``LITESTREAM_*`` variables alone; so can we be. Each test runs a
child process whose environment holds every setting — the database is opened as plain
``file:db?vfs=litestream``, no URI parameter — and checks the values as parsed (types and units,
not just "was accepted") and that they took effect: write mode with its buffer where the
variable says, compaction on its intervals, hydration into the named file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from ltxvfs.plan import list_levels
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

WRITER = textwrap.dedent("""
    import dataclasses, json, os, sys, time
    import apsw, ltxvfs
    vfs = ltxvfs.register()
    print(json.dumps(dataclasses.asdict(vfs.config)), flush=True)
    con = apsw.Connection("file:db?vfs=litestream", flags=apsw.SQLITE_OPEN_READWRITE
                          | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(1, 41):
        con.execute("INSERT INTO t(v) VALUES (?)", (f"row {i}",))
        if i % 10 == 0:
            con.execute("PRAGMA litestream_sync").fetchall()
    buffer = os.environ["LITESTREAM_BUFFER_PATH"]
    print(json.dumps({
        "write_enabled": con.execute("PRAGMA litestream_write_enabled").fetchall()[0][0],
        "buffer_exists_while_writing": os.path.exists(buffer),
        "buffer_mode": oct(os.stat(buffer).st_mode & 0o777),
    }), flush=True)
    # Compaction runs on the configured intervals (150ms, 400ms; snapshots every 600ms).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        levels = {lvl: len(fs) for lvl, fs in ltxvfs.plan.list_levels(
            vfs.replicas()[0].client).items() if fs}
        if all(levels.get(lvl) for lvl in (1, 2, 9)):
            break
        time.sleep(0.05)
    print(json.dumps({"levels": levels}), flush=True)
    con.close()
    print(json.dumps({"buffer_exists_after_close": os.path.exists(buffer)}), flush=True)
""")

READER = textwrap.dedent("""
    import dataclasses, json, os, time
    import apsw, ltxvfs
    vfs = ltxvfs.register()
    print(json.dumps(dataclasses.asdict(vfs.config)), flush=True)
    con = apsw.Connection("file:db?vfs=litestream", flags=apsw.SQLITE_OPEN_READONLY
                          | apsw.SQLITE_OPEN_URI)
    rows = con.execute("SELECT count(*), max(v) FROM t").fetchall()
    deadline = time.monotonic() + 30
    while con.execute("PRAGMA litestream_hydration_progress").fetchall()[0][0] != "100.0":
        assert time.monotonic() < deadline, "hydration did not finish"
        time.sleep(0.02)
    print(json.dumps({
        "rows": rows,
        "write_enabled": con.execute("PRAGMA litestream_write_enabled").fetchall()[0][0],
        "hydration_file": con.execute("PRAGMA litestream_hydration_file").fetchall()[0][0],
        "stats": ltxvfs.stats(con),
    }), flush=True)
    con.close()
""")


def _run(script: str, env: dict[str, str], cwd: Path) -> list[dict]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LITESTREAM_")}
    p = subprocess.run([sys.executable, "-c", script], env={**base, **env}, cwd=cwd,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]


def test_write_mode_configured_by_environment_alone(tmp_path):
    url = (tmp_path / "replica").as_uri()
    buffer = tmp_path / "state" / "db.buffer"
    env = {
        "LITESTREAM_REPLICA_URL": url,
        "LITESTREAM_WRITE_ENABLED": "true",
        "LITESTREAM_BUFFER_PATH": str(buffer),
        "LITESTREAM_SYNC_INTERVAL": "-1s",  # explicit syncs only
        "LITESTREAM_POLL_INTERVAL": "1m30s",
        "LITESTREAM_IDLE_POLL_INTERVAL": "10m",
        "LITESTREAM_MAX_LAG": "4m",
        "LITESTREAM_CACHE_SIZE": "3MiB",
        "LITESTREAM_OPEN_TIMEOUT": "2500ms",
        "LITESTREAM_LOG_LEVEL": "debug",
        "LITESTREAM_COMPACTION_LEVELS": "150ms, 400ms",
        "LITESTREAM_SNAPSHOT_INTERVAL": "600ms",
        "LITESTREAM_SNAPSHOT_RETENTION": "1h",
        "LITESTREAM_L0_RETENTION": "0",
        "LITESTREAM_SINGLE_WRITER": "verify",
        "LITESTREAM_CACHE_DIR_SIZE": "64MiB",
    }
    config, state, levels, closed = _run(WRITER, env, tmp_path)
    assert config == {
        "replica_url": url, "poll_interval": 90.0, "idle_poll_interval": 600.0,
        "max_lag": 240.0, "cache_size": 3 * 1024 * 1024,
        "open_timeout": 2.5, "log_level": "DEBUG", "write_enabled": True, "sync_interval": -1.0,
        "buffer_path": str(buffer), "compaction_levels": [0.15, 0.4], "snapshot_interval": 0.6,
        "snapshot_retention": 3600.0, "l0_retention": 0.0, "hydration_enabled": False,
        "hydration_path": None, "hydration_persistent": False, "single_writer": "verify",
        "cache_dir": None, "cache_dir_size": 64 * 1024 * 1024,
    }
    assert state == {"write_enabled": "1", "buffer_exists_while_writing": True,
                     "buffer_mode": "0o600"}
    assert all(levels["levels"].get(str(lvl)) for lvl in (1, 2, 9)), levels
    assert closed == {"buffer_exists_after_close": False}, "a fully synced buffer is removed"
    with open_replica(url) as client:
        assert list_levels(client)[0], "l0_retention=0 keeps every L0 file"
        out = restore(client, tmp_path / "out.db").path
    con = sqlite3.connect(out)
    assert con.execute("SELECT count(*), max(v) FROM t").fetchall() == [(40, "row 9")]
    con.close()


def test_hydrating_reader_configured_by_environment_alone(tmp_path):
    url = (tmp_path / "replica").as_uri()
    _run(WRITER, {"LITESTREAM_REPLICA_URL": url, "LITESTREAM_WRITE_ENABLED": "1",
                  "LITESTREAM_BUFFER_PATH": str(tmp_path / "buf"),
                  "LITESTREAM_COMPACTION_LEVELS": "150ms,400ms",
                  "LITESTREAM_SNAPSHOT_INTERVAL": "600ms"}, tmp_path)
    hydrated = tmp_path / "copies" / "db.sqlite"
    config, seen = _run(READER, {"LITESTREAM_REPLICA_URL": url,
                                 "LITESTREAM_HYDRATION_PATH": str(hydrated),
                                 "LITESTREAM_HYDRATION_PERSISTENT": "yes",
                                 "LITESTREAM_POLL_INTERVAL": "250ms"}, tmp_path)
    assert (config["hydration_path"], config["hydration_enabled"], config["hydration_persistent"],
            config["poll_interval"], config["write_enabled"]) == (str(hydrated), False, True, 0.25,
                                                                  False)
    assert seen["rows"] == [[40, "row 9"]] and seen["write_enabled"] == "0"
    assert seen["hydration_file"] == str(hydrated), "a path alone turns hydration on"
    # Persistent: the copy stays after close, a plain SQLite database of the replica.
    con = sqlite3.connect(hydrated)
    assert con.execute("SELECT count(*), max(v) FROM t").fetchall() == [(40, "row 9")]
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()
