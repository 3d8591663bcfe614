"""The write buffer on its own: recovery scans and rewrites in bounded memory, never lose a
committed record, and a failed rewrite never leaves the buffer appending to an unlinked file."""

from __future__ import annotations

import os
import stat
import tracemalloc
from pathlib import Path

import pytest

from ltxvfs import buffer as buffer_mod
from ltxvfs.buffer import RECORDS_START, BufferError, WriteBuffer

REPLICA = 0x1234_5678_9ABC_DEF0
PAGE = 4096


def page(pgno: int, version: int, size: int = PAGE) -> bytes:
    """A recognisable page: which page, which version, filled out to the page size."""
    head = f"page {pgno} version {version};".encode()
    return (head * (size // len(head) + 1))[:size]


def new_buffer(path: Path, base_txid: int = 7, base_size: int = 0) -> WriteBuffer:
    buf = WriteBuffer(path, REPLICA)
    assert buf.open() is None
    buf.reset(base_txid, base_size, PAGE)
    return buf


def reopen(path: Path) -> tuple[WriteBuffer, buffer_mod.Scan]:
    buf = WriteBuffer(path, REPLICA)
    found = buf.open()
    assert found is not None
    return buf, found


def fill(buf: WriteBuffer, commits: int, pages_per_commit: int) -> dict[int, bytes]:
    """Commits of pages with growing page numbers and rewritten old ones; returns what each
    page holds after the last commit."""
    want: dict[int, bytes] = {}
    for c in range(commits):
        for i in range(pages_per_commit):
            pgno = 1 + (c * pages_per_commit + i) % (commits * pages_per_commit // 2 + 1)
            data = page(pgno, c)
            buf.write_page(pgno, data)
            want[pgno] = data
        buf.commit(fsync=False)
    return want


def committed_pages(buf: WriteBuffer, found: buffer_mod.Scan) -> dict[int, bytes]:
    """The committed pages a scan found, read from the file itself."""
    assert found.page_size == PAGE
    with open(buf.path, "rb") as f:
        out = {}
        for pgno, offset in found.committed.offsets.items():
            f.seek(offset)
            out[pgno] = f.read(PAGE)
        return out


# --- item 11: recovery streams the buffer -------------------------------------------------------


def test_scan_with_short_reads_keeps_every_committed_record(tmp_path, monkeypatch):
    """Above 2 GiB Linux's pread returns at most 0x7ffff000 bytes: the scan must keep reading,
    not take the short read for a torn end (and the rewrite then drop the later commits)."""
    path = tmp_path / "buf"
    buf = new_buffer(path)
    want = fill(buf, commits=40, pages_per_commit=5)
    buf.write_page(999, page(999, 99))  # an unfinished transaction: dropped on recovery
    buf.close()
    size = path.stat().st_size

    real = os.pread
    limit = 3001  # bytes per call: smaller than a record, so records straddle every read

    def short_pread(fd, n, offset):
        return real(fd, min(n, limit), offset)

    monkeypatch.setattr(os, "pread", short_pread)
    buf, found = reopen(path)
    assert found.commits == 40, f"scan stopped early: {found.commits} of 40 commits ({size} bytes)"
    assert found.end == size
    assert committed_pages(buf, found) == want
    # Adopting rewrites the file: every committed record survives it, the open transaction not.
    buf.adopt(found, found.base_txid, 0, RECORDS_START)
    assert buf.commits == 40
    buf.close()
    monkeypatch.setattr(os, "pread", real)
    buf, again = reopen(path)
    assert again.commits == 40
    assert committed_pages(buf, again) == want
    assert 999 not in again.pending.offsets
    buf.close()


def test_scan_across_many_chunk_boundaries(tmp_path, monkeypatch):
    """Records of many sizes (pages, truncates, commits, sync marks) across a tiny read chunk."""
    monkeypatch.setattr(buffer_mod, "CHUNK", 1000, raising=False)
    path = tmp_path / "buf"
    buf = new_buffer(path, base_size=3)
    want: dict[int, bytes] = {}
    for c in range(30):
        for pgno in range(1, 2 + c % 7):
            want[pgno] = page(pgno, c)
            buf.write_page(pgno, want[pgno])
        if c % 5 == 4:
            buf.truncate(3)
            want = {p: d for p, d in want.items() if p <= 3}
        buf.commit(fsync=False)
        if c % 9 == 0:
            buf.mark_sync(8, buf.snapshot()[1], c)
    size = buf.size_pages()
    buf.close()
    buf, found = reopen(path)
    assert found.commits == 30
    assert found.sync is not None and found.sync.checksum == 27
    assert committed_pages(buf, found) == want
    assert found.committed.size == size
    # The rewrite copies in chunks of the same size and drops the sync marks.
    buf.adopt(found, found.base_txid, 0, RECORDS_START)
    buf.close()
    buf, again = reopen(path)
    assert again.commits == 30 and again.sync is None
    assert committed_pages(buf, again) == want
    buf.close()


def test_scan_and_rewrite_of_a_large_buffer_use_bounded_memory(tmp_path):
    path = tmp_path / "buf"
    buf = new_buffer(path)
    n = 64 * 1024 * 1024 // (PAGE + 13)  # ~64 MiB of page records
    block = page(0, 0)
    for pgno in range(1, n + 1):
        buf.write_page(pgno, block)
        if pgno % 1024 == 0:
            buf.commit(fsync=False)
    buf.commit(fsync=False)
    buf.close()
    size = path.stat().st_size
    assert size > 63 * 1024 * 1024
    tracemalloc.start()
    try:
        buf = WriteBuffer(path, REPLICA)
        found = buf.open()
        scan_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        buf.adopt(found, found.base_txid, 0, RECORDS_START)
        rewrite_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found.commits == n // 1024 + 1 and len(found.committed.offsets) == n
    assert buf.commits == found.commits
    assert scan_peak < size / 4, f"scan of {size} bytes peaked at {scan_peak} bytes"
    assert rewrite_peak < size / 4, f"rewrite of {size} bytes peaked at {rewrite_peak} bytes"
    assert buf.read_page(n) == block
    buf.close()


# --- item 12: a failed rewrite ------------------------------------------------------------------


def _fail_directory_fsync(monkeypatch):
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "simulated: directory fsync failed")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_scan_after_replace(monkeypatch):
    """Let the rename happen, then fail the next scan (the one that reads the new file)."""
    real_replace, real_scan = os.replace, WriteBuffer._scan
    replaced = []

    def replace(src, dst):
        real_replace(src, dst)
        replaced.append(dst)

    def scan(self, *a, **k):
        if replaced:
            raise OSError(5, "simulated: scan of the rewritten buffer failed")
        return real_scan(self, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(WriteBuffer, "_scan", scan)


@pytest.mark.parametrize("inject", [_fail_directory_fsync, _fail_scan_after_replace])
def test_commit_after_a_failed_rewrite_is_not_lost(tmp_path, monkeypatch, inject):
    path = tmp_path / "buf"
    buf = new_buffer(path, base_txid=7, base_size=2)
    buf.write_page(1, page(1, 1))
    buf.commit(fsync=False)
    _, end = buf.snapshot()
    buf.write_page(2, page(2, 1))  # committed after the snapshot the "upload" took
    buf.commit(fsync=False)
    with monkeypatch.context() as m:
        inject(m)
        try:
            buf.synced(8, end, 2)  # the rebase onto TXID 8 fails somewhere after the rename
        except (OSError, BufferError):
            pass
    try:
        buf.write_page(3, page(3, 2))
        buf.commit(fsync=True)
    except BufferError as err:  # refusing is allowed, if it says why
        assert str(path) in str(err)
        buf.close()
        return
    buf.close()
    buf, found = reopen(path)
    pages = committed_pages(buf, found)
    assert pages.get(3) == page(3, 2), \
        f"a commit after the failed rewrite is lost: recovered pages {sorted(pages)}"
    assert pages.get(2) == page(2, 1)
    if found.base_txid == 7:  # the rebase did not happen: the synced records are still there
        assert pages.get(1) == page(1, 1)
    else:
        assert found.base_txid == 8 and 1 not in pages
    buf.close()
