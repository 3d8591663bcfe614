"""The page store: cache bounds, one fetch per concurrent miss, readahead, newest-wins updates."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from ltxvfs.pages import (
    DatabaseState,
    FileIndex,
    PageNotFoundError,
    PageStore,
    build_state,
)
from ltxvfs.plan import compute_plan
from ltxvfs.storage import open_replica
from ltxvfs.storage.base import FileInfo

from replicas import FakePrimary, page_bytes


class CountingClient:
    """Wraps a replica client: counts reads, can slow them down."""

    def __init__(self, inner, delay: float = 0.0):
        self.inner, self.delay = inner, delay
        self.reads: list[tuple] = []
        self._lock = threading.Lock()
        self.url = inner.url

    def read(self, level, lo, hi, offset=0, size=None):
        with self._lock:
            self.reads.append((level, lo, hi, offset, size))
        if self.delay:
            time.sleep(self.delay)
        return self.inner.read(level, lo, hi, offset, size)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def big(tmp_path):
    """A replica whose snapshot is larger than the index tail (so pages are fetched by range)."""
    url = (tmp_path / "r").as_uri()
    client = open_replica(url)
    p = FakePrimary(tmp_path / "p.db", client)
    p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)",
             "INSERT INTO t(b) SELECT randomblob(3500) FROM generate_series(1, 200)")
    pool = ThreadPoolExecutor(4)
    yield p, client, pool
    pool.shutdown()
    client.close()


def test_pages_match_the_primary(big):
    p, client, pool = big
    state = build_state(client, compute_plan(client), pool)
    store = PageStore(client, 10 << 20)
    expected = page_bytes(p.path)
    assert state.commit == len(expected)
    for pgno, data in expected.items():
        assert store.read_page(state, pgno) == data
    with pytest.raises(PageNotFoundError, match="page not found"):
        store.read_page(state, state.commit + 1)


def test_concurrent_misses_fetch_once(big):
    p, client, pool = big
    state = build_state(client, compute_plan(client), pool)
    counting = CountingClient(client, delay=0.05)
    store = PageStore(counting, 10 << 20)
    barrier = threading.Barrier(8)
    results = []

    def read():
        barrier.wait()
        results.append(store.read_page(state, 100))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counting.reads) == 1
    assert len(set(results)) == 1 and results[0] == page_bytes(p.path)[100]


def test_sequential_reads_widen_into_fewer_gets(big):
    p, client, pool = big
    state = build_state(client, compute_plan(client), pool)
    counting = CountingClient(client)
    store = PageStore(counting, 10 << 20)
    for pgno in range(1, state.commit + 1):
        store.read_page(state, pgno)
    # Window doubles 1, 2, 4, ... 256: about log2(n) GETs for n sequential pages.
    assert len(counting.reads) <= 10, len(counting.reads)
    assert store.gets == len(counting.reads)


def test_random_reads_fetch_their_own_frame_only(big):
    """A random miss brings no neighbours: they would take cache room from pages read again
    (issue 13: 23 MB fetched for 609 random misses on a 21 MB database)."""
    p, client, pool = big
    state = build_state(client, compute_plan(client), pool)
    counting = CountingClient(client)
    store = PageStore(counting, 10 << 20)
    for pgno in (50, 10, 150, 30, 120):
        assert store.read_page(state, pgno) == page_bytes(p.path)[pgno]
    assert [r[4] for r in counting.reads] == [state.index[n][2] for n in (50, 10, 150, 30, 120)]
    assert store.read_page(state, 52) == page_bytes(p.path)[52]
    assert len(counting.reads) == 6


def test_interleaved_scans_keep_their_readahead(big):
    """Two scans read alternately (or a scan interleaved with b-tree pages) each keep their
    growing window: one shared 'last miss' would reset both to one page at every read."""
    p, client, pool = big
    state = build_state(client, compute_plan(client), pool)
    counting = CountingClient(client)
    store = PageStore(counting, 10 << 20)
    for i in range(90):
        store.read_page(state, 10 + i)
        store.read_page(state, 110 + i)
    assert len(counting.reads) <= 16, len(counting.reads)


def _info(level, lo, hi):
    return FileInfo(level, lo, hi, 1000, datetime(2026, 1, 1, tzinfo=UTC))


def test_newest_txid_wins_whatever_the_order():
    base = DatabaseState(4096, 3, 10, datetime(2026, 1, 1, tzinfo=UTC), {})
    l0 = FileIndex(_info(0, 12, 12), {2: (100, 50)}, None)
    l1 = FileIndex(_info(1, 11, 11), {2: (100, 60), 3: (160, 60)}, None)
    # An older compacted file arriving after a newer L0 file must not win page 2.
    state = base.applying([l0], 3).applying([l1], 3)
    assert state.index[2][0].max_txid == 12 and state.index[3][0].max_txid == 11
    assert state.txid == 12


def test_shrink_drops_only_pages_beyond_commit():
    infos = {p: (_info(9, 1, 5), 100 * p, 50) for p in range(1, 11)}
    base = DatabaseState(4096, 10, 5, datetime(2026, 1, 1, tzinfo=UTC), infos)
    state = base.applying([FileIndex(_info(0, 6, 6), {1: (100, 50)}, None)], 4)
    assert sorted(state.index) == [1, 2, 3, 4] and state.index[2] == infos[2]
    assert state.size == 4 * 4096
