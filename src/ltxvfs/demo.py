"""``ltxvfs demo``: the whole product in a minute, right after ``pip install``.

By default the replica is a ``file://`` directory in a temporary folder (no cloud account, no
extra packages); with ``--s3`` it is a bucket on moto's S3 server started on 127.0.0.1 (needs the
``test`` extra). The demo writes through the VFS in write mode (each step synced as one LTX
file), reads from a second connection with hydration on, travels back in time, restores a past
TXID to a local file, and prints what each step did.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from .plan import list_levels
from .restore import restore
from .storage import open_replica
from .storage.base import format_txid

_STEPS = [
    ("create a table of cities", [
        "CREATE TABLE city (name TEXT PRIMARY KEY, country TEXT, population INTEGER)",
        "INSERT INTO city VALUES ('Lisbon', 'PT', 545000), ('Oslo', 'NO', 709000)"]),
    ("add Nairobi", ["INSERT INTO city VALUES ('Nairobi', 'KE', 4397000)"]),
    ("Oslo grows", ["UPDATE city SET population = 717000 WHERE name = 'Oslo'"]),
    ("drop Lisbon", ["DELETE FROM city WHERE name = 'Lisbon'"]),
]
_CITIES = "SELECT name, population FROM city ORDER BY name"


def _start_s3(stack: ExitStack) -> str:
    """moto's S3 server on a free port of 127.0.0.1, a bucket, and a replica URL in it."""
    import os
    import socket

    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        from .cli import CommandError

        raise CommandError("ltxvfs demo --s3 needs moto: pip install 'ltxvfs[test]'") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log in the demo output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stack.callback(server.stop)
    for key, value in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo"),
                       ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ.setdefault(key, value)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="demo")
    return f"s3://demo/cities?endpoint={endpoint}&region=us-east-1"


def _refuse_earlier_demo(root: Path, s3: bool) -> None:
    """The demo writes a new database: a directory that already holds one (an earlier run's
    replica or write buffer) is refused, never overwritten or deleted."""
    from .cli import CommandError

    used = [p for p in (root / "replica", root / "cities.buffer", root / "cities.hydrated.db")
            if p.exists() and not (p.name == "replica" and s3)]
    if used:
        raise CommandError(f"{used[0]} exists (an earlier demo?): give another --directory, "
                           f"or remove {root}")


def _rfc3339_ms(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_demo(directory: str | None = None, s3: bool = False) -> int:
    import apsw

    from .registry import register

    register()
    with ExitStack() as stack:
        root = Path(directory) if directory else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="ltxvfs-demo-")))
        root.mkdir(parents=True, exist_ok=True)
        _refuse_earlier_demo(root, s3)
        url = _start_s3(stack) if s3 else (root / "replica").as_uri()
        base = f"file:cities.db?vfs=litestream&replica_url={quote(url, safe='')}"
        print(f"replica: {url}")

        # 1. Write through the VFS: every step is synced as one LTX file.
        writer = apsw.Connection(
            f"{base}&write_enabled=true&sync_interval=-1s"
            f"&buffer_path={quote(str(root / 'cities.buffer'), safe='')}",
            flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
        moments: list[tuple[str, datetime, list[tuple]]] = []
        for what, statements in _STEPS:
            with writer:
                for sql in statements:
                    writer.execute(sql)
            txid = writer.execute("PRAGMA litestream_sync").fetchall()[0][0]
            time.sleep(0.02)  # let each LTX file have its own timestamp
            moments.append((txid, datetime.now(UTC), writer.execute(_CITIES).fetchall()))
            time.sleep(0.02)
            print(f"  write  TXID {txid}: {what}")
        writer.close()

        # 2. Read from object storage at once, while a local copy is built in the background.
        reader = apsw.Connection(f"{base}&hydration_path="
                                 f"{quote(str(root / 'cities.hydrated.db'), safe='')}",
                                 flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        print(f"  read   latest: {reader.execute(_CITIES).fetchall()}")
        txid2, when2, rows2 = moments[1]
        reader.execute(f"PRAGMA litestream_time = '{when2.isoformat()}'")
        got = reader.execute(_CITIES).fetchall()
        print(f"  travel to {_rfc3339_ms(when2)} (TXID "
              f"{reader.execute('PRAGMA litestream_txid').fetchall()[0][0]}): {got}")
        reader.execute("PRAGMA litestream_time = 'latest'")
        deadline = time.monotonic() + 10
        progress = "0"
        while time.monotonic() < deadline:
            progress = reader.execute("PRAGMA litestream_hydration_progress").fetchall()[0][0]
            if progress == "100.0":
                break
            time.sleep(0.02)
        print(f"  hydrate {progress}% into {root / 'cities.hydrated.db'}; latest again: "
              f"{reader.execute(_CITIES).fetchall()}")
        reader.close()

        # 3. The replica is plain Litestream: list it and restore a past TXID to a file.
        with open_replica(url) as client:
            files = sum(len(v) for v in list_levels(client).values())
            past = restore(client, root / "txid2.db", txid=int(txid2, 16), force=True)
        with sqlite3.connect(past.path) as con:
            restored = con.execute(_CITIES).fetchall()
        print(f"  restore TXID {format_txid(past.txid)} from {files} LTX files: {restored}")
        ok = got == rows2 == restored
        print("all steps agree" if ok else "MISMATCH between steps")
        if directory:
            print(f"files kept in {root}")
        return 0 if ok else 1
