"""Compaction, snapshots and retention: ours are read by Litestream, and the writer keeps going."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import apsw
import pytest

import ltxvfs
from ltxvfs.compact import (
    Compactor,
    compact_level,
    enforce_l0_retention,
    enforce_snapshot_retention,
    merge_files,
    snapshot,
)
from ltxvfs.ltx import decode_file
from ltxvfs.plan import compute_plan, list_levels
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

from litestream_rig import integrity_check, litestream_restore
from replicas import FakePrimary, page_bytes, rows_of


@pytest.fixture
def history(tmp_path):
    url = (tmp_path / "r").as_uri()
    client = open_replica(url)
    p = FakePrimary(tmp_path / "p.db", client)
    p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)",
             "INSERT INTO t(b) SELECT randomblob(700) FROM generate_series(1, 100)")
    p.commit("UPDATE t SET b = randomblob(10) WHERE id % 2 = 0")
    p.commit("INSERT INTO t(b) SELECT randomblob(2000) FROM generate_series(1, 50)")
    p.commit("DELETE FROM t WHERE id > 20")
    p.execute("VACUUM")
    p.publish()
    yield p, client, url
    client.close()


def test_merge_keeps_newest_pages_and_drops_beyond_commit(history):
    p, client, _ = history
    l0 = client.list_files(0)
    info = merge_files(client, l0, 1)
    merged = decode_file(client.read(1, info.min_txid, info.max_txid))
    assert (info.min_txid, info.max_txid) == (1, 5)
    assert merged.pages == page_bytes(p.path)  # a snapshot: every page of the final database
    assert merged.header.commit == len(page_bytes(p.path))
    part = merge_files(client, l0[1:4], 2)
    partial = decode_file(client.read(2, part.min_txid, part.max_txid))
    assert partial.header.commit == len(p.history[3][2]) and max(partial.pages) <= partial.header.commit


def test_non_contiguous_inputs_are_refused(history):
    _, client, _ = history
    l0 = client.list_files(0)
    with pytest.raises(Exception, match="non-contiguous"):
        merge_files(client, [l0[0], l0[2]], 1)


@pytest.mark.interop
def test_litestream_restores_after_our_compaction(history, tmp_path):
    p, client, url = history
    assert compact_level(client, 1) is not None
    assert compact_level(client, 1) is None  # nothing new
    p.commit("INSERT INTO t(b) VALUES (x'01')")
    assert compact_level(client, 1).min_txid == 6
    assert compact_level(client, 2) is not None
    assert snapshot(client).max_txid == 6
    assert snapshot(client) is None  # already covers the latest state
    future = datetime.now(UTC) + timedelta(hours=1)
    deleted = enforce_l0_retention(client, 0, now=future)
    assert [f.max_txid for f in deleted] == [1, 2, 3, 4, 5]
    assert [f.max_txid for f in client.list_files(0)] == [6]  # the newest L0 stays
    out = litestream_restore(url, tmp_path / "ls.db")
    assert page_bytes(out) == page_bytes(p.path)
    assert restore(client, tmp_path / "ours.db").txid == 6
    plan = compute_plan(client)
    assert [f.level for f in plan] == [9]


def test_snapshot_retention_keeps_the_newest_and_covered_files(history):
    p, client, _ = history
    snapshot(client)
    compact_level(client, 1)
    p.commit("INSERT INTO t(b) VALUES (x'02')")
    snapshot(client)
    later = datetime.now(UTC) + timedelta(days=2)
    deleted = enforce_snapshot_retention(client, 3600, [1], now=later)
    assert [f.level for f in deleted] == [9]
    assert [f.max_txid for f in client.list_files(9)] == [6]
    assert len(client.list_files(1)) == 1  # each level keeps its last file


def _wait(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.interop
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_writer_compacts_snapshots_and_prunes_while_writing(request, tmp_path, backend):
    from go_vfs import go_vfs_query

    url = request.getfixturevalue("s3_url") if backend == "s3" else (tmp_path / "replica").as_uri()
    ltxvfs.register()
    params = ("write_enabled=true&sync_interval=50ms&compaction_levels=150ms,400ms"
              "&snapshot_interval=700ms&l0_retention=100ms&cache_size=16384"
              "&hydration_enabled=true")
    con = apsw.Connection(f"file:db?vfs=litestream&replica_url={quote(url, safe='')}&{params}"
                          f"&buffer_path={quote(str(tmp_path / 'buf'), safe='')}",
                          flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    client = open_replica(url)
    deadline = time.monotonic() + 3
    i = 0
    while time.monotonic() < deadline:
        con.execute("INSERT INTO t(v) VALUES (?)", (f"row{i}" * 20,))
        i += 1
        if i % 50 == 0:
            con.execute("PRAGMA cache_size = 0")  # force reads through our store
            assert con.execute("SELECT count(*) FROM t").fetchall() == [(i,)]
    _wait(lambda: all(list_levels(client)[lvl] for lvl in (1, 2, 9)))
    con.execute("PRAGMA litestream_sync")
    newest = client.list_files(0)[-1]
    # Once L1 covers every TXID, L0 retention leaves exactly the newest L0 file.
    _wait(lambda: client.list_files(0) == [newest]
          and client.list_files(1)[-1].max_txid == newest.max_txid)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    expected = con.execute("SELECT * FROM t ORDER BY id").fetchall()
    _wait(lambda: con.execute("PRAGMA litestream_hydration_progress").fetchall()[0][0] == "100.0")
    assert con.execute("SELECT * FROM t ORDER BY id").fetchall() == expected  # from the copy
    con.close()
    levels = list_levels(client)
    assert levels[0] == [newest], "L0 retention keeps only the newest L0 file"
    assert levels[9], "snapshots landed"
    plan = compute_plan(client)
    assert len(plan) <= 12, f"a cold open needs few files, not {len(plan)}"
    out = litestream_restore(url, tmp_path / "ls.db")
    assert rows_of(out) == [tuple(r) for r in expected]
    assert integrity_check(out) == "ok"
    assert go_vfs_query(url, "SELECT count(*), max(id) FROM t") == [(len(expected), len(expected))]
    client.close()


def test_compaction_waits_for_a_txid_the_listing_does_not_show(history):
    """A stale LIST hides L0 file 6: compacting 7.. into L1 would leave TXID 6 nowhere once
    retention runs. Compaction must wait, and retention must not delete what L1 lacks."""
    p, client, _ = history
    compact_level(client, 1)  # L1 1-5
    for i in range(3):
        p.commit(f"INSERT INTO t(b) VALUES ({i})")  # TXIDs 6, 7, 8
    hidden = client.list_files(0, seek=6)[0]
    real = client.list_files

    def stale(level, *, seek=0, use_metadata=False):
        files = real(level, seek=seek, use_metadata=use_metadata)
        return [f for f in files if not (level == 0 and f.min_txid == hidden.min_txid)]

    client.list_files = stale
    try:
        assert compact_level(client, 1) is None
        deleted = enforce_l0_retention(client, 0, now=datetime.now(UTC) + timedelta(hours=1))
        assert all(f.max_txid <= 5 for f in deleted)
    finally:
        client.list_files = real
    assert compact_level(client, 1).min_txid == 6  # once visible, all of it
    assert compute_plan(client).txid == 8


def _newer_than_l1(p, client, n=4):
    """Commits only L0 holds (their files old enough for any retention), then L1 covering them
    written *after* a snapshot has planned from L0 — the interleaving the writer's jobs hit."""
    compact_level(client, 1)  # L1 1-5
    old = int(time.time() * 1000) - 60_000
    for i in range(n):
        p.commit(f"INSERT INTO t(b) VALUES (x'{i + 16:02x}')", timestamp_ms=old)  # TXIDs 6..9


def _reading_hook(client, hook):
    """Run ``hook`` once, at the first read of an L0 file (a snapshot's merge under way)."""
    real = client.read
    fired = []

    def read(level, lo, hi, offset=0, size=None):
        if level == 0 and not fired:
            fired.append(True)
            hook()
        return real(level, lo, hi, offset, size)

    client.read = read
    return fired


def test_retention_waits_for_a_running_snapshot(history):
    """L0 retention must not delete files a running snapshot reads ("snapshot failed ...
    NoSuchKey" over and over): one compactor job at a time owns the replica's levels."""
    p, client, _ = history
    _newer_than_l1(p, client)
    compactor = Compactor(client, [3600], 3600, 0, 1e-6)
    jobs = {name: fn for name, fn, _ in compactor.jobs()}
    fired = _reading_hook(client, lambda: (compact_level(client, 1), jobs["l0-retention"]()))
    jobs["snapshot"]()
    assert fired
    assert compactor.last_error is None
    [snap] = client.list_files(9)
    assert (snap.min_txid, snap.max_txid) == (1, 9)
    assert decode_file(client.read(9, 1, 9)).pages == page_bytes(p.path)
    jobs["l0-retention"]()  # once the snapshot is done, retention does its work
    assert [f.max_txid for f in client.list_files(0)] == [9]


def test_snapshot_that_lost_a_file_retries_from_compacted_levels(history):
    """Files can still vanish under a snapshot (another process's retention, a stale LIST): it
    plans again, from the compacted levels, instead of failing."""
    p, client, _ = history
    _newer_than_l1(p, client)

    def retention_elsewhere():
        compact_level(client, 1)  # L1 6-9
        enforce_l0_retention(client, 0, now=datetime.now(UTC) + timedelta(hours=1))

    fired = _reading_hook(client, retention_elsewhere)
    info = snapshot(client)
    assert fired
    assert (info.min_txid, info.max_txid) == (1, 9)
    assert decode_file(client.read(9, 1, 9)).pages == page_bytes(p.path)


def test_compaction_continues_past_what_snapshot_retention_removed(history):
    """Snapshot retention deletes L1 files below the oldest kept snapshot, also ones L2 never
    merged. L2 then starts at a later TXID: the snapshot holds the TXIDs in between, so L2
    must go on from there instead of waiting forever (the writer test's "L2 compaction
    waits: L1 starts at 000000000000000a, expected 0000000000000001").."""
    p, client, url = history
    compact_level(client, 1)  # L1 1-5
    for i in range(4):
        p.commit(f"INSERT INTO t(b) VALUES ({i})")  # TXIDs 6-9
    compact_level(client, 1)  # L1 6-9
    assert snapshot(client).max_txid == 9
    p.commit("INSERT INTO t(b) VALUES (10)")
    compact_level(client, 1)  # L1 10-10
    deleted = enforce_snapshot_retention(client, 3600, [1])
    assert [(f.level, f.min_txid, f.max_txid) for f in deleted] == [(1, 1, 5)]
    info = compact_level(client, 2)
    assert info is not None and (info.min_txid, info.max_txid) == (6, 10)
    assert compute_plan(client).txid == 10
    assert restore(client, p.path.parent / "out.db").txid == 10
    assert page_bytes(p.path.parent / "out.db") == page_bytes(p.path)


def test_merging_many_small_files_takes_memory_by_their_size(tmp_path):
    """64 L0 files of a few KB each: a merge holds one read buffer per input, so each must be
    sized by its input (the soak's traced memory jumped by ~100 MiB at every compaction when each
    input had a 1 MiB buffer)."""
    import tracemalloc

    with open_replica((tmp_path / "r").as_uri()) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(63):
            p.commit(f"INSERT INTO t(v) VALUES ('row {i}')")
        files = client.list_files(0)
        assert len(files) == 64 and max(f.size for f in files) < 16 * 1024
        tracemalloc.start()
        try:
            info = merge_files(client, files, 1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 1024 * 1024, f"merging 64 small files peaked at {peak} bytes"
        merged = decode_file(client.read(1, info.min_txid, info.max_txid))
        assert merged.pages == page_bytes(p.path)
