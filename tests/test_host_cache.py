"""The host's shared cache directory (issue 18 item 1, ``cache_dir``; host/frames.py): frames,
page-index bytes, headers and the snapshot's head shared by the processes of a host and kept
across restarts. Real processes where it matters; request counts from the S3 client's counters
(moto's server) and the page store's."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import stat
import threading
import time
from pathlib import Path

import apsw
import host_cache_proc
import pytest
from host_cache_proc import uri

import ltxvfs
from ltxvfs.host import entries
from ltxvfs.host.frames import DiskCache, flush_all
from ltxvfs.storage import open_replica
from ltxvfs.storage.base import FileInfo

from replicas import FakePrimary

ROWS = 3000  # ~1 MB: a snapshot larger than WHOLE_FILE, so tails, headers and the head count
KEYS = random.Random(18).sample(range(1, ROWS + 1), 60)


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def build(url: str, tmp: Path, tag: str = "v") -> FakePrimary:
    with open_replica(url) as client:
        p = FakePrimary(tmp / f"primary-{tag}-{os.getpid()}.db", client)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)",
                 f"INSERT INTO t SELECT value, '{tag}' || value, randomblob(300) "
                 f"FROM generate_series(1, {ROWS})")
        p.commit(f"UPDATE t SET v = '{tag}x' || id WHERE id % 97 = 0")
    return p


def expected(p: FakePrimary, keys=KEYS) -> list:
    return [[list(r)] for r in (p.rows(f"SELECT id, v FROM t WHERE id = {k}")[0] for k in keys)]


def connect(url: str, cache_dir: str | None, **kw) -> apsw.Connection:
    con = apsw.Connection(uri(url, cache_dir, **kw),
                          flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    con.execute("PRAGMA cache_size = 0")
    return con


def stats(con) -> dict:
    return json.loads(con.execute("PRAGMA litestream_stats").fetchall()[0][0])


def look(con, keys=KEYS) -> list:
    return [[list(r) for r in con.execute("SELECT id, v FROM t WHERE id = ?", (k,))] for k in keys]


def fresh(vfs) -> None:
    """Forget the replicas this process has open (the next connection starts cold in memory)."""
    vfs.expire_lingering()


def in_process(url: str, cache_dir: str | None, vfs, keys=KEYS) -> tuple[list, dict]:
    fresh(vfs)
    con = connect(url, cache_dir)
    try:
        return look(con, keys), stats(con)
    finally:
        con.close()
        fresh(vfs)
        assert flush_all(30)


def run_procs(method: str, n: int, url: str, cache_dir: str, keys=KEYS, **kw) -> list[dict]:
    ctx = mp.get_context(method)
    out = ctx.Queue()
    barrier = ctx.Barrier(n) if n > 1 else None
    procs = [ctx.Process(target=host_cache_proc.lookups,
                         args=(url, cache_dir, keys, barrier, out), kwargs=kw) for _ in range(n)]
    for p in procs:
        p.start()
    results = [json.loads(out.get(timeout=120)) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def another_process(disk: DiskCache) -> DiskCache:
    """What another process would open on the same directory (DiskCache.open gives this
    process's one instance)."""
    return DiskCache(Path(disk.root), disk.identity, disk.limit)


def entry_files(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.rglob("*") if p.is_file() and "frames" in p.parts]


# --- real processes -------------------------------------------------------------------------------


def test_restarted_process_opens_warm_with_no_gets(s3_url, tmp_path):
    p = build(s3_url, tmp_path)
    cache = str(tmp_path / "cache")
    first, = run_procs("spawn", 1, s3_url, cache, first_only=True)
    second, = run_procs("spawn", 1, s3_url, cache, first_only=True)
    assert first["rows"] == second["rows"] == [list(p.rows("SELECT * FROM t ORDER BY id LIMIT 1")
                                                    [0][:2]) + [first["rows"][0][2]]]
    assert first["stats"]["requests"]["GET"] > 0
    assert second["stats"]["requests"]["GET"] == 0, second["stats"]
    assert second["stats"]["requests"]["HEAD"] == 0
    assert second["stats"]["requests"]["LIST"] >= 1
    assert second["stats"]["disk_hits"] > 0 and second["stats"]["disk_cache"] == "on"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_eight_processes_fetch_what_one_does(s3_url, tmp_path, method):
    p = build(s3_url, tmp_path)
    want = expected(p)
    one, = run_procs(method, 1, s3_url, str(tmp_path / "alone"))
    eight = run_procs(method, 8, s3_url, str(tmp_path / "shared"))
    assert one["rows"] == want
    assert all(r["rows"] == want for r in eight)
    gets = sum(r["stats"]["requests"]["GET"] for r in eight)
    fetched = sum(r["stats"]["bytes_fetched"] for r in eight)
    assert gets <= 1.2 * one["stats"]["requests"]["GET"], (gets, one["stats"]["requests"])
    assert fetched <= 1.2 * one["stats"]["bytes_fetched"], (fetched, one["stats"]["bytes_fetched"])
    assert sum(r["stats"]["disk_waits"] + r["stats"]["disk_hits"] for r in eight) > 0
    # What they fetched is all on disk when they have exited (a forked child exits without
    # running atexit): one more process makes no GET.
    ninth, = run_procs(method, 1, s3_url, str(tmp_path / "shared"))
    assert ninth["rows"] == want and ninth["stats"]["requests"]["GET"] == 0, ninth["stats"]


def test_concurrent_writers_of_one_entry_leave_a_valid_entry(tmp_path):
    """Many processes write the same entry at the same moment (a barrier per round); every read
    in between and the entry left are whole."""
    ctx = mp.get_context("spawn")
    barrier, bad = ctx.Barrier(4), ctx.Value("i", 0)
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "c"), barrier, bad, i))
             for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    assert bad.value == 0
    disk = DiskCache.open(tmp_path / "c", "race", 1 << 30)
    value = disk.get_frame(_INFO, 0)
    assert value is not None and value[:4096] == bytes([value[0]]) * 4096
    assert not [p for p in (tmp_path / "c").rglob("*") if p.name.endswith(entries.TMP_SUFFIX)]


_INFO = FileInfo(0, 1, 1, 8192, None, "etag-1")  # type: ignore[arg-type]


def _race(root: str, barrier, bad, me: int) -> None:
    disk = DiskCache.open(root, "race", 1 << 30)
    for r in range(150):
        barrier.wait(60)
        disk.put_frame(_INFO, 0, bytes([me]) * 4096 + r.to_bytes(4, "big"), now=True)
        got = disk.get_frame(_INFO, 0)
        if got is None or len(got) != 4100 or got[:4096] != bytes([got[0]]) * 4096:
            with bad.get_lock():
                bad.value += 1
    assert not disk.disabled


# --- staleness, damage, foreign entries -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_replaced_history_is_never_served_from_the_cache(kind, s3_url, file_url, tmp_path, vfs,
                                                         s3_admin):
    """The replica is deleted and written again by a new primary with the same file names: the
    cache filled by the old history serves none of its bytes."""
    url = s3_url if kind == "s3" else file_url
    cache = str(tmp_path / "cache")
    old = build(url, tmp_path, "old")
    rows, st = in_process(url, cache, vfs)
    assert rows == expected(old) and st["disk_bytes_written"] > 0
    with open_replica(url) as client:
        names = {(f.level, f.name) for fs in client.list_all().values() for f in fs}
        for fs in client.list_all().values():
            client.delete(fs)
    new = build(url, tmp_path, "new")
    with open_replica(url) as client:
        assert {(f.level, f.name) for fs in client.list_all().values() for f in fs} == names
    rows, st = in_process(url, cache, vfs)
    assert rows == expected(new) != expected(old)
    assert st["page_gets"] > 0


def test_torn_and_foreign_entries_are_ignored_and_removed(s3_url, tmp_path, vfs):
    p = build(s3_url, tmp_path)
    cache = tmp_path / "cache"
    rows, _ = in_process(s3_url, str(cache), vfs)
    files = sorted(entry_files(cache))
    assert rows == expected(p) and len(files) > 10
    # Damage every entry: truncate a third, flip a byte in a third, and replace the rest by
    # entries of another replica (whole and valid, but not this replica's).
    other = DiskCache.open(tmp_path / "othercache", "s3://other/db", 1 << 30)
    info = FileInfo(9, 1, 2, 1 << 20, None, '"abc"')  # type: ignore[arg-type]
    other.put_frame(info, 100, b"x" * 4000, now=True)
    foreign = entry_files(tmp_path / "othercache")[0].read_bytes()
    for i, f in enumerate(files):
        data = f.read_bytes()
        if i % 3 == 0:
            f.write_bytes(data[: len(data) // 2])
        elif i % 3 == 1:
            f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        else:
            f.write_bytes(foreign)
    rows, st = in_process(s3_url, str(cache), vfs)
    assert rows == expected(p)
    assert st["disk_rejected"] >= 10  # every entry this run read (not all of them: seeded ones)
    assert st["disk_hits"] == 0
    # What was damaged was removed and written again whole: a third run is served from disk.
    rows, again = in_process(s3_url, str(cache), vfs)
    assert rows == expected(p) and again["requests"]["GET"] == 0
    assert again["disk_rejected"] == st["disk_rejected"]  # (disk counters are per process)


def test_entry_format_detects_damage():
    key = "replica\nframe L0/x@1"
    data = entries.encode(key, b"value" * 100)
    assert entries.decode(key, data) == b"value" * 100
    assert entries.decode(key + "2", data) is None  # another key's entry
    assert entries.decode(key, data[:-1]) is None  # truncated
    assert entries.decode(key, data + b"x") is None  # grown
    for pos in (0, 9, 20, 30, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        assert entries.decode(key, bytes(flipped)) is None, pos


# --- bounds, permissions, failures ----------------------------------------------------------------


def test_eviction_keeps_the_directory_under_its_size(s3_url, tmp_path, vfs):
    p = build(s3_url, tmp_path)
    cache = tmp_path / "cache"
    limit = 1024 * 1024  # the smallest cache_dir_size
    fresh(vfs)
    con = connect(s3_url, str(cache), extra=f"&cache_dir_size={limit}")
    keys = random.Random(1).sample(range(1, ROWS + 1), ROWS // 2)  # random: every leaf kept
    assert look(con, keys) == expected(p, keys)
    replica = vfs.replicas()[0]
    disk = replica.store.disk
    assert disk.flush(30)
    disk.evict()  # what the next scan does: the last writes may not have reached one yet
    con.close()
    assert disk.evictions > 0
    assert disk.usage() <= limit
    on_disk = sum(f.stat().st_blocks * 512 for f in entry_files(cache))
    assert on_disk <= limit


def test_permissions_are_private(s3_url, tmp_path, vfs):
    old = os.umask(0)
    try:
        build(s3_url, tmp_path)
        cache = tmp_path / "cache"
        in_process(s3_url, str(cache), vfs)
    finally:
        os.umask(old)
    found = list(cache.rglob("*"))
    assert any(f.is_file() for f in found)
    for f in [cache, *found]:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == (0o700 if f.is_dir() else 0o600), (f, oct(mode))


def test_an_unusable_cache_dir_degrades_with_one_warning(s3_url, tmp_path, vfs, caplog):
    """A cache_dir that cannot be created (a file where the directory should be; as root a
    0500 directory is still writable, so that case is below) reads right without it."""
    p = build(s3_url, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="ltxvfs.host"):
        rows, st = in_process(s3_url, str(blocker / "cache"), vfs)
    assert rows == expected(p)
    assert st["disk_cache"].startswith("off: ")
    assert len([r for r in caplog.records if "cache_dir" in r.getMessage()]) == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anyway")
def test_a_read_only_cache_dir_degrades_with_one_warning(s3_url, tmp_path, vfs, caplog):
    p = build(s3_url, tmp_path)
    cache = tmp_path / "cache"
    in_process(s3_url, str(cache), vfs, keys=KEYS[:1])
    for d in [cache, *[d for d in cache.rglob("*") if d.is_dir()]]:
        d.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="ltxvfs.host"):
            rows, st = in_process(s3_url, str(cache), vfs)
    finally:
        for d in [cache, *[d for d in cache.rglob("*") if d.is_dir()]]:
            d.chmod(0o700)
    assert rows == expected(p)
    assert st["disk_cache"].startswith("off: ")
    assert len([r for r in caplog.records if "cache_dir" in r.getMessage()]) == 1


def test_a_full_disk_degrades_with_one_warning(s3_url, tmp_path, vfs, caplog, monkeypatch):
    """Every write fails with ENOSPC (a full disk): one WARNING, the cache turns itself off, and
    every read is right."""
    p = build(s3_url, tmp_path)

    def full(path, data):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(entries, "write_atomic", full)
    with caplog.at_level(logging.WARNING, logger="ltxvfs.host"):
        rows, st = in_process(s3_url, str(tmp_path / "cache"), vfs)
    assert rows == expected(p)
    assert st["disk_cache"] == "off: ENOSPC: No space left on device"
    assert len([r for r in caplog.records if "cache_dir" in r.getMessage()]) == 1


def test_two_hosts_do_not_share(s3_url, tmp_path, vfs):
    """Two cache directories (two hosts): the second fetches what the first has cached."""
    p = build(s3_url, tmp_path)
    rows_a, a = in_process(s3_url, str(tmp_path / "host-a"), vfs)
    rows_b, b = in_process(s3_url, str(tmp_path / "host-b"), vfs)
    assert rows_a == rows_b == expected(p)
    assert b["requests"]["GET"] == a["requests"]["GET"] > 0
    assert b["disk_hits"] == 0
    rows_a2, a2 = in_process(s3_url, str(tmp_path / "host-a"), vfs)
    assert rows_a2 == expected(p) and a2["requests"]["GET"] == 0


def test_one_instance_per_replica_and_process(tmp_path):
    """Reopening a replica (after its linger) reuses the process's cache: one writer thread."""
    a = DiskCache.open(tmp_path / "c", "r", 1 << 30)
    assert DiskCache.open(tmp_path / "c", "r", 1 << 20) is a and a.limit == 1 << 20
    assert DiskCache.open(tmp_path / "c", "other", 1 << 30) is not a


def test_a_claimed_entry_is_waited_for(tmp_path):
    """A claim held by another process: a reader waits for the entry instead of fetching."""
    disk = DiskCache.open(tmp_path / "c", "r", 1 << 30)
    other = another_process(disk)
    assert other.claim_frame(_INFO, 0) is True
    got = []
    t = threading.Thread(target=lambda: got.append(disk.wait_frame(_INFO, 0)))
    t.start()
    other.put_frame(_INFO, 0, b"f" * 100, now=True)
    other.release_frame(_INFO, 0)
    t.join(30)
    assert got == [b"f" * 100] and disk.waits == 1


def test_a_killed_fetchers_claim_does_not_hold_others_up(tmp_path, monkeypatch):
    """A process killed between claiming and writing leaves its claim: once it is older than
    STALE the next reader takes it over at once (no wait); a later scan removes leftovers."""
    disk = DiskCache.open(tmp_path / "c", "r", 1 << 30)
    assert disk.claim_frame(_INFO, 0) is True  # ... and the claimant dies
    claim = Path(disk._path(disk.key("frame", _INFO, 0)) + entries.CLAIM_SUFFIX)
    old = claim.stat().st_mtime - 2 * DiskCache.STALE
    os.utime(claim, (old, old))
    other = another_process(disk)
    monkeypatch.setattr(DiskCache, "WAIT", 0.0)  # a wait would now give up and fetch
    assert other.claim_frame(_INFO, 0) is True and other.waits == 0
    other.release_frame(_INFO, 0)
    stray = claim.parent / ("x" + entries.TMP_SUFFIX)
    stray.write_bytes(b"half an entry")
    leftover = claim.parent / ("y" + entries.CLAIM_SUFFIX)
    leftover.write_bytes(b"")
    ancient = old - 3600  # older than a scan's 60 * STALE
    for f in (stray, leftover):
        os.utime(f, (ancient, ancient))
    other.evict()
    assert not stray.exists() and not leftover.exists()


def test_a_cache_dir_others_may_write_is_refused(s3_url, tmp_path, vfs):
    build(s3_url, tmp_path)
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)
    fresh(vfs)
    with pytest.raises(apsw.CantOpenError, match="writable by other users"):
        connect(s3_url, str(cache))


def test_restarted_process_on_a_file_replica_reads_from_disk(file_url, tmp_path):
    """file:// replicas: the identity is the inode and mtime; a restarted process makes no page
    GET and reads the same rows."""
    p = build(file_url, tmp_path)
    cache = str(tmp_path / "cache")
    first, = run_procs("spawn", 1, file_url, cache)
    second, = run_procs("spawn", 1, file_url, cache)
    assert first["rows"] == second["rows"] == expected(p)
    assert first["stats"]["page_gets"] > 0
    assert second["stats"]["page_gets"] == 0 and second["stats"]["bytes_fetched"] == 0
    assert second["stats"]["disk_hits"] > 0


def _put_and_exit(disk: DiskCache) -> None:
    disk.put_frame(_INFO, 0, b"from the child" * 100)  # queued for the background writer


def test_a_forked_child_writes_its_queue_before_it_exits(tmp_path, monkeypatch):
    """multiprocessing's forked children end with os._exit (no atexit): what they queued must
    still reach the disk."""
    write = entries.write_atomic

    def slow_disk(path, data):
        time.sleep(0.3)  # a slow disk, not a wait: the child must not exit before this ends
        write(path, data)

    monkeypatch.setattr(entries, "write_atomic", slow_disk)
    disk = DiskCache.open(tmp_path / "c", "r", 1 << 30)
    proc = mp.get_context("fork").Process(target=_put_and_exit, args=(disk,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert disk.get_frame(_INFO, 0) == b"from the child" * 100


def test_a_follower_shares_new_commits_through_the_cache(s3_url, tmp_path, vfs):
    """A follower polls new L0 files in; their indexes and pages go to the cache, so the next
    process opens at the new state with 0 GETs; and the new rows are the ones it reads."""
    p = build(s3_url, tmp_path)
    cache = str(tmp_path / "cache")
    fresh(vfs)
    con = connect(s3_url, cache)
    assert look(con, KEYS[:5]) == expected(p, KEYS[:5])
    with open_replica(s3_url) as client:
        p.client = client
        p.commit(f"UPDATE t SET v = 'new' || id WHERE id IN ({','.join(map(str, KEYS[:5]))})")
    vfs.replicas()[0].poll()
    assert look(con, KEYS[:5]) == expected(p, KEYS[:5]) == [[[k, f"new{k}"]] for k in KEYS[:5]]
    con.close()
    fresh(vfs)
    assert flush_all(30)
    later, = run_procs("spawn", 1, s3_url, cache, keys=KEYS[:5])
    assert later["rows"] == expected(p, KEYS[:5])
    assert later["stats"]["requests"]["GET"] == 0, later["stats"]["requests"]


def test_a_link_in_place_of_an_entry_is_not_followed(tmp_path):
    disk = DiskCache.open(tmp_path / "c", "r", 1 << 30)
    disk.put_frame(_INFO, 0, b"real", now=True)
    path = Path(disk._path(disk.key("frame", _INFO, 0)))
    target = tmp_path / "elsewhere"
    target.write_bytes(path.read_bytes())  # a whole, valid entry — but reached through a link
    path.unlink()
    path.symlink_to(target)
    assert disk.get_frame(_INFO, 0) is None and disk.rejected == 1 and not disk.disabled
    assert not path.is_symlink() and target.exists()
