"""The write buffer on its own: recovery scans and rewrites in bounded memory, never lose a
committed record, and a failed rewrite never leaves the buffer appending to an unlinked file."""

from __future__ import annotations

import os
import stat
import tracemalloc
from pathlib import Path

import pytest

from ltxvfs import buffer as buffer_mod
from ltxvfs import bufferlog
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
    buf.fsync()  # written to the file (an open transaction's records wait in memory otherwise)
    end = buf._end
    buf.close()
    size = path.stat().st_size
    assert size > end, "the file has its zero tail"

    real = os.pread
    limit = 3001  # bytes per call: smaller than a record, so records straddle every read

    def short_pread(fd, n, offset):
        return real(fd, min(n, limit), offset)

    monkeypatch.setattr(os, "pread", short_pread)
    buf, found = reopen(path)
    assert found.commits == 40, f"scan stopped early: {found.commits} of 40 commits ({size} bytes)"
    assert found.end == end
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
    monkeypatch.setattr(bufferlog, "CHUNK", 1000)
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


# --- issue 14: damaged buffers ------------------------------------------------------------------
#
# What a crash, a power loss, a bad disk or a wrong path can leave where recovery looks: a torn
# last record, a flipped byte inside a committed record, another replica's buffer, a file far
# larger than memory. Recovery must keep exactly the committed transactions it can prove, and
# say so when it cannot, never hand back a silently shorter history.


def history(path: Path, commits: int) -> tuple[list[dict[int, bytes]], list[int]]:
    """A closed buffer of ``commits`` transactions (1-3 pages each, page 1 in every one).
    Returns the committed pages after each commit (index 0: before any) and the file offset
    just past each COMMIT record."""
    buf = new_buffer(path)
    states: list[dict[int, bytes]] = [{}]
    for c in range(1, commits + 1):
        state = dict(states[-1])
        for pgno in {1, 1 + c % 5, 2 + c % 3}:
            state[pgno] = page(pgno, c)
            buf.write_page(pgno, state[pgno])
        buf.commit(fsync=False)
        states.append(state)
    buf.close()
    buf, found = reopen(path)
    ends = list(found.commit_ends)
    buf.close()
    assert len(ends) == commits
    return states, ends


def _tear(path: Path, at: int, end: int, tail: str) -> None:
    """Tear the log at ``at`` (its records end at ``end``): the file cut there (a buffer without
    a preallocated tail, as written before it existed), or zeros from there on with the file's
    size kept (a crash inside the preallocated tail: the write that never reached the disk)."""
    if tail == "cut":
        os.truncate(path, at)
        return
    size = path.stat().st_size
    assert size > end, "the buffer has a zero tail"
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes(end - at))
    assert path.stat().st_size == size


TAILS = ["cut", "zeros"]


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("cut", [1, 5, 9, 16])  # inside the COMMIT record: type, length, payload, CRC
def test_a_torn_last_commit_record_drops_that_transaction_only(tmp_path, cut, tail):
    path = tmp_path / "buf"
    states, ends = history(path, 12)
    commit_record = 5 + 12 + 4
    _tear(path, ends[-1] - commit_record + cut, ends[-1], tail)
    buf, found = reopen(path)
    assert found.commits == 11
    assert committed_pages(buf, found) == states[11]
    assert found.last_commit_end == ends[10], "the torn transaction is not committed"
    assert found.end == ends[-1] - commit_record, "its page records are all there (uncommitted)"
    buf.close()


@pytest.mark.parametrize("tail", TAILS)
def test_a_torn_page_record_of_the_last_transaction_drops_that_transaction_only(tmp_path, tail):
    path = tmp_path / "buf"
    states, ends = history(path, 12)
    # the first page record after commit 11, cut short
    _tear(path, ends[10] + 5 + 4 + 100, ends[-1], tail)
    buf, found = reopen(path)
    assert found.commits == 11
    assert committed_pages(buf, found) == states[11]
    buf.close()


def test_zeros_after_the_last_record_are_not_records(tmp_path):
    """A file extended by a power loss (or preallocated) ends in zeros: they end the log."""
    path = tmp_path / "buf"
    states, ends = history(path, 12)
    with open(path, "ab") as f:
        f.write(bytes(3 * PAGE))
    buf, found = reopen(path)
    assert found.commits == 12 and found.end == ends[-1]
    assert committed_pages(buf, found) == states[12]
    buf.close()


def _open_descriptors(path: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(fd)
        except OSError:
            pass
    return out


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


@pytest.mark.parametrize("where", ["page bytes", "page number", "record length", "commit size",
                                   "record crc"])
def test_a_flipped_byte_in_a_committed_record_is_refused_not_cut_short(tmp_path, where):
    """Commits 1-12, a byte of commit 5's records flipped: recovery cannot replay commit 5, and
    must not pretend commits 6-12 never happened (that is what a silent truncation does: the
    writer then syncs commits 1-4 and deletes the rest). The buffer is refused and left as is."""
    path = tmp_path / "buf"
    states, ends = history(path, 12)
    first_page = ends[3]  # commit 5 starts with a PAGE record right after commit 4's COMMIT
    offset = {"page bytes": first_page + 5 + 4 + 1000,
              "page number": first_page + 5 + 3,
              "record length": first_page + 3,
              "commit size": ends[4] - 4 - 12 + 3,
              "record crc": ends[4] - 2}[where]
    _flip(path, offset)
    before = path.read_bytes()
    buf = WriteBuffer(path, REPLICA)
    with pytest.raises(BufferError, match=r"is damaged at offset \d+: .*committed .* after it"):
        buf.open()
    assert path.read_bytes() == before, "a damaged buffer is kept as it is"
    assert not _open_descriptors(path), "the refused buffer is still open (and locked)"


def test_a_flipped_byte_in_the_open_transaction_drops_only_it(tmp_path):
    """Damage after the last COMMIT hits only the transaction that never committed."""
    path = tmp_path / "buf"
    states, ends = history(path, 6)
    buf = WriteBuffer(path, REPLICA)
    buf.open()
    buf._end = buf._written = ends[-1]  # append after the closed file's records
    buf._alloc = path.stat().st_size
    buf.page_size = PAGE
    buf.write_page(7, page(7, 7))
    buf.write_page(8, page(8, 7))
    buf.fsync()  # into the file: an open transaction's records wait in memory otherwise
    buf.close()
    _flip(path, ends[-1] + 5 + 4 + 10)
    buf, found = reopen(path)
    assert found.commits == 6 and committed_pages(buf, found) == states[6]
    buf.close()


def test_a_buffer_of_another_replica_is_refused_and_kept(tmp_path):
    path = tmp_path / "buf"
    history(path, 3)
    before = path.read_bytes()
    other = WriteBuffer(path, REPLICA + 1)
    with pytest.raises(BufferError, match=f"{path} belongs to another replica; move it away"):
        other.open()
    assert path.read_bytes() == before
    # The refusal let go of the file (descriptor and lock): its own replica can open it.
    buf, found = reopen(path)
    assert found.commits == 3
    buf.close()


def test_a_buffer_that_is_not_one_is_refused(tmp_path):
    path = tmp_path / "buf"
    path.write_bytes(b"SQLite format 3\0" + bytes(4080))
    buf = WriteBuffer(path, REPLICA)
    with pytest.raises(BufferError, match=f"{path} is not an ltxvfs write buffer"):
        buf.open()
    buf.close()
    path.write_bytes(b"LTXVFSB1")
    buf = WriteBuffer(path, REPLICA)
    with pytest.raises(BufferError, match=f"{path} is too short to be an ltxvfs write buffer"):
        buf.open()
    buf.close()


def test_a_sparse_buffer_of_8_gib_is_scanned_and_rewritten_in_bounded_memory(tmp_path):
    """An 8 GiB file (a hole after the records: what a preallocating filesystem or a runaway
    process can leave) costs neither 8 GiB of memory nor a read of 8 GiB: the scan stops at the
    first non-record, reading one chunk, and the rewrite keeps only the records."""
    path = tmp_path / "buf"
    states, ends = history(path, 12)
    os.truncate(path, 8 << 30)
    reads: list[int] = []
    real = os.pread

    def counting_pread(fd, n, offset):
        reads.append(n)
        return real(fd, n, offset)

    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "pread", counting_pread)
            buf, found = reopen(path)
            buf.adopt(found, found.base_txid, 0, RECORDS_START)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found.commits == 12 and found.end == ends[-1]
    assert sum(reads) < 16 * buffer_mod.CHUNK, f"read {sum(reads)} bytes of a sparse file"
    assert peak < 4 * buffer_mod.CHUNK, f"peak {peak} bytes"
    assert path.stat().st_size == ends[-1], "the rewrite drops the hole"
    assert committed_pages(buf, found) == states[12]
    buf.close()


# --- issue 17 item 4: the preallocated zero tail, fdatasync ------------------------------------


def test_a_buffer_without_a_zero_tail_is_recovered_and_continued(tmp_path):
    """Buffers written before the zero tail existed end at their last record: the format is the
    same (no version change), so they are recovered as they are, and continued with a tail."""
    path = tmp_path / "buf"
    states, ends = history(path, 5)
    os.truncate(path, ends[-1])  # exactly what the previous version left
    buf, found = reopen(path)
    assert found.commits == 5 and found.end == ends[-1]
    assert committed_pages(buf, found) == states[5]
    buf.adopt(found, found.base_txid, 0, RECORDS_START)
    buf.write_page(9, page(9, 6))
    buf.commit(fsync=True)
    end = buf._end
    buf.close()
    assert path.stat().st_size > end, "continued with a zero tail"
    buf, again = reopen(path)
    assert again.commits == 6 and again.end == end
    assert committed_pages(buf, again) == {**states[5], 9: page(9, 6)}
    buf.close()


def test_the_zero_tail_grows_in_steps_and_commits_inside_it_keep_the_size(tmp_path, monkeypatch):
    monkeypatch.setattr(buffer_mod, "PREALLOC", 64 << 10)
    path = tmp_path / "buf"
    buf = new_buffer(path)
    synced: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, name=name, real=real: (synced.append(name),
                                                                        real(fd))[1])
    sizes = []
    for c in range(60):
        buf.write_page(1 + c % 3, page(1 + c % 3, c))
        buf.commit(fsync=True)
        size = path.stat().st_size
        assert size % (64 << 10) == 0 and size > buf._end, (c, size, buf._end)
        sizes.append(size)
    assert synced == ["fdatasync"] * 60
    grew = sum(1 for a, b in zip(sizes, sizes[1:], strict=False) if b != a)
    assert sizes == sorted(sizes) and 1 <= grew <= 60 * (PAGE + 30) // (64 << 10) + 1
    end = buf._end
    buf.close()
    buf, found = reopen(path)
    assert found.commits == 60 and found.end == end
    assert committed_pages(buf, found) == {p: page(p, c) for c in range(57, 60)
                                           for p in [1 + c % 3]}
    buf.close()


def test_a_rollback_zeros_its_records_and_keeps_the_tail_and_the_sync_marks(tmp_path, monkeypatch):
    """A rolled-back transaction's records that reached the file (more than FLUSH bytes) are
    zeroed, not left for recovery to find; a SYNC mark written among them stays."""
    monkeypatch.setattr(buffer_mod, "FLUSH", 3 * PAGE)
    path = tmp_path / "buf"
    buf = new_buffer(path, base_size=2)
    buf.write_page(1, page(1, 1))
    buf.commit(fsync=True)
    committed_end = buf._end
    size = path.stat().st_size
    for pgno in range(2, 9):
        buf.write_page(pgno, page(pgno, 2))
    buf.mark_sync(8, committed_end, 1234)
    buf.write_page(9, page(9, 2))
    assert buf._written > committed_end, "the test needs records of it in the file"
    buf.rollback()
    assert path.stat().st_size == size
    mark_end = committed_end + 5 + 24 + 4
    assert buf._end == mark_end
    assert buf.read_page(2) is None
    with open(path, "rb") as f:
        f.seek(mark_end)
        assert f.read() == bytes(size - mark_end), "rolled-back records left in the file"
    buf.close()
    buf, found = reopen(path)
    assert found.commits == 1 and found.end == mark_end and found.sync is not None
    assert found.sync.checksum == 1234
    assert set(found.pending.offsets) == {1}
    buf.close()


def test_open_transaction_pages_are_read_from_memory_before_they_are_written(tmp_path):
    path = tmp_path / "buf"
    buf = new_buffer(path)
    buf.write_page(3, page(3, 1))
    assert buf._written < buf._end, "the record waits in memory"
    assert buf.read_page(3) == page(3, 1)
    buf.commit(fsync=False)
    assert buf._written == buf._end
    assert buf.read_page(3) == page(3, 1)
    buf.close()


def test_a_large_commit_grows_the_file_without_a_zero_tail(tmp_path, monkeypatch):
    """Only small commits grow the tail (its zeros are flushed too): a large one appends."""
    monkeypatch.setattr(buffer_mod, "PREALLOC", 64 << 10)
    monkeypatch.setattr(buffer_mod, "SMALL_COMMIT", 8 * PAGE)
    path = tmp_path / "buf"
    buf = new_buffer(path)
    start = path.stat().st_size
    for pgno in range(1, 40):  # ~160 KiB: past the tail
        buf.write_page(pgno, page(pgno, 1))
    buf.commit(fsync=True)
    assert path.stat().st_size == buf._end > start
    buf.write_page(1, page(1, 2))  # a small one: a tail again
    buf.commit(fsync=True)
    assert path.stat().st_size % (64 << 10) == 0 and path.stat().st_size > buf._end
    end = buf._end
    buf.close()
    buf, found = reopen(path)
    assert found.commits == 2 and found.end == end
    buf.close()
