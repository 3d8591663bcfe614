""""What are the bytes of page N as of TXID T?" — the page index, the page cache, the fetcher.

A :class:`DatabaseState` is an immutable view of the database at one TXID: page size, commit and,
for every page, where its newest frame lives (LTX file, offset, size). States are built from a
restore plan and advanced by applying newer LTX files; connections pin one state per read
transaction. A :class:`PageStore` (one per replica, shared by its connections) turns a state and
a page number into bytes: LRU cache bounded in bytes, ranged GETs that coalesce adjacent frames of
one file (readahead that widens while SQLite scans), and one fetch per page however many threads
miss it at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

import lz4.block

from .cache import PageCache, is_interior
from .errors import (
    LitestreamError,
    MalformedIndexError,
    ObjectNotFoundError,
    PageNotFoundError,
    TruncatedError,
)
from .gcpause import paused_gc
from .host.pagestore import SharedFrames, index_bytes_via_disk, read_head, read_header
from .ltx import (
    ESTIMATED_INDEX_TAIL,
    HEADER_SIZE,
    Header,
    block_payload,
    decode_file,
    decode_page_frame,
    page_index_start,
    parse_page_index,
)
from .plan import Plan, compute_plan
from .storage.base import FileInfo, ReplicaClient

if TYPE_CHECKING:
    from .host.frames import DiskCache

#: Readahead streams remembered, pages a stream may skip, bytes of unwanted frames read over.
_STREAMS, _SLACK, _MAX_GAP = 8, 8, 64 * 1024

#: Largest tail fetched for a page index in the first GET.
MAX_TAIL = 4 * 1024 * 1024

#: Files up to this size are read whole when their index is needed (one GET either way).
WHOLE_FILE = 256 * 1024

#: Bytes of the snapshot's head fetched at open, next to the page indexes.
HEAD_PREFETCH = 256 * 1024

#: Where one page's frame lives: (file, offset of the frame, frame size).
PageRef = tuple[FileInfo, int, int]


@dataclass(frozen=True)
class FileIndex:
    """What the page index of one LTX file says, plus its header when it was cheap to get.

    A file no larger than the index tail arrives whole: it is then fully decoded and its file
    checksum verified, and its pages come along in ``decoded`` (ready for the cache).
    """

    info: FileInfo
    pages: dict[int, tuple[int, int]]
    header: Header | None
    decoded: dict[int, bytes] | None = None
    #: The whole file's bytes when it arrived whole (its frames can be cached compressed).
    raw: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DatabaseState:
    """The database as of one TXID. Immutable: updates make a new state."""

    page_size: int
    commit: int
    txid: int
    created_at: datetime
    index: dict[int, PageRef] = field(repr=False)
    #: The newest file applied (it ends at ``txid``) and its header timestamp (0 if unknown):
    #: what the follower checks to tell that the replica still holds the same history.
    tip: FileInfo | None = None
    tip_timestamp: int = 0

    @property
    def size(self) -> int:
        return self.commit * self.page_size

    def applying(self, files: Sequence[FileIndex], commit: int) -> DatabaseState:
        """A new state with ``files`` applied: per page the newest TXID wins, pages beyond the
        new commit are dropped (the database shrank)."""
        index = dict(self.index)
        for fi in files:
            info = fi.info
            if not index:  # a cold open's snapshot: 50,000 pages for 200 MB, no rival entries
                with paused_gc():
                    index = {pgno: (info, off, size) for pgno, (off, size) in fi.pages.items()}
                continue
            newest = info.max_txid
            for pgno, (off, size) in fi.pages.items():
                cur = index.get(pgno)
                if cur is None or cur[0].max_txid <= newest:
                    index[pgno] = (info, off, size)
        if index and max(index) > commit:
            index = {p: r for p, r in index.items() if p <= commit}
        newest = max(files, key=lambda f: f.info.max_txid) if files else None
        last = newest.info if newest else None
        tip, stamp = self.tip, self.tip_timestamp
        if newest is not None and last is not None and last.max_txid >= self.txid:
            tip, stamp = last, newest.header.timestamp if newest.header else 0
        return DatabaseState(self.page_size, commit, max(self.txid, last.max_txid if last else 0),
                             last.created_at if last else self.created_at, index, tip, stamp)


def tail_size(file_size: int) -> int:
    """How much of a file's end to fetch for its index. Go's fixed 32 KiB misses the index of a
    20 MB snapshot (5,000 entries of ~7 bytes) and costs a second round trip. An entry takes ~8
    bytes and a 4 KiB page rarely compresses below ~2 KiB, so 1/256 of the file holds the whole
    index in the common case (a second GET fetches the rest otherwise)."""
    return min(max(ESTIMATED_INDEX_TAIL, file_size // 256), MAX_TAIL)


def fetch_file_index(client: ReplicaClient, info: FileInfo, want_header: bool = False,
                     disk: DiskCache | None = None) -> FileIndex:
    """Read a file's page index from its tail: one ranged GET, two if the index is larger than
    the tail. A file up to ``WHOLE_FILE`` bytes comes whole in that GET (header, pages and
    all: verified, and its pages cached), since a few more KiB cost no extra round trip.
    With ``disk`` (the host's cache directory) the bytes come from there when some process of
    the host fetched them before."""
    if disk is None:
        start, tail, pages = _read_index_bytes(client, info)
    else:
        start, tail, pages = index_bytes_via_disk(info, disk, lambda: _read_index_bytes(client, info))
    header = None
    if start == 0:
        whole = decode_file(tail, name=str(info))
        if whole.index != pages:
            raise MalformedIndexError(f"{info}: page index does not match the page frames")
        return FileIndex(info, pages, whole.header, whole.pages, bytes(tail))
    if want_header:
        header = Header.unpack(read_header(client, info, disk))
    return FileIndex(info, pages, header)


def _read_index_bytes(client: ReplicaClient, info: FileInfo
                      ) -> tuple[int, bytes, dict[int, tuple[int, int]]]:
    """(offset, bytes from there to the end, the page index they hold): the tail GET, and a
    second GET for the rest of an index larger than the tail."""
    start = 0 if info.size <= WHOLE_FILE else info.size - tail_size(info.size)
    tail = client.read(info.level, info.min_txid, info.max_txid, start, info.size - start)
    if len(tail) != info.size - start:
        raise TruncatedError(f"{info}: read {len(tail)} bytes of the tail, expected "
                             f"{info.size - start} (object changed or truncated)")
    try:
        return start, tail, parse_page_index(tail, info.size, start)
    except TruncatedError:
        begin = page_index_start(tail, info.size)
        more = client.read(info.level, info.min_txid, info.max_txid, begin, start - begin)
        return begin, more + tail, parse_page_index(more + tail, info.size, begin)


def fetch_indexes(client: ReplicaClient, files: Sequence[FileInfo], pool: ThreadPoolExecutor,
                  store: PageStore | None = None) -> list[FileIndex]:
    """Page indexes of ``files`` fetched in parallel; the last one always with its header (in
    the same round trip). Pages of files that arrived whole go into ``store``'s cache."""
    last = files[-1]
    header = None
    disk = store.disk if store is not None else None
    if last.size > WHOLE_FILE:
        header = pool.submit(read_header, client, last, disk)
    futures = [pool.submit(fetch_file_index, client, f, False, disk) for f in files]
    indexes = [f.result() for f in futures]
    if header is not None:
        indexes[-1] = replace(indexes[-1], header=Header.unpack(header.result()))
    if store is not None:
        store.seed(indexes)
    return indexes


def build_state(client: ReplicaClient, plan: Plan, pool: ThreadPoolExecutor,
                store: PageStore | None = None) -> DatabaseState:
    """The state at the end of ``plan``.

    With a ``store``, the head of the plan's snapshot is fetched alongside the indexes (same
    round trip): its first pages — the schema and the roots of the oldest tables, which every
    first query walks through — are then already in the cache.
    """
    first = plan.files[0]
    head = None
    if store is not None and first.size > WHOLE_FILE:
        size = min(HEAD_PREFETCH, first.size - tail_size(first.size))
        head = pool.submit(read_head, client, first, size, store.disk)
    indexes = fetch_indexes(client, plan.files, pool, store)
    if head is not None and store is not None:
        try:
            store.seed_head(indexes[0], head.result())
        except LitestreamError:
            pass  # only a head start: the pages will be fetched when needed
    last = indexes[-1].header
    assert last is not None
    for fi in indexes:
        if fi.header is not None and fi.header.page_size != last.page_size:
            raise LitestreamError(f"{fi.info}: page size {fi.header.page_size} differs from "
                                  f"{last.page_size} in {indexes[-1].info}")
    empty = DatabaseState(last.page_size, 0, 0, plan.files[0].created_at, {})
    return empty.applying(indexes, last.commit)


def state_at(client: ReplicaClient, pool: ThreadPoolExecutor, store: PageStore | None = None,
             *, txid: int | None = None, timestamp: datetime | None = None,
             attempts: int = 3) -> DatabaseState:
    """Plan and build the state at ``txid``/``timestamp`` (latest if neither). A file of the
    plan can vanish before its index is read (retention after compaction): plan again."""
    for attempt in range(attempts):
        plan = compute_plan(client, txid=txid, timestamp=timestamp)
        try:
            return build_state(client, plan, pool, store)
        except ObjectNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def frame_key(info: FileInfo, offset: int) -> tuple:
    """The cache key of the frame at ``offset`` of ``info``: the file's name, its identity
    (ETag / inode, else size and time) and the offset. A replaced history reuses file names;
    the identity keeps its frames from ever sharing an entry with the old history's."""
    return (info.level, info.min_txid, info.max_txid, info.size, info.etag or info.created_at,
            offset)


def _key(ref: PageRef) -> tuple:
    return frame_key(ref[0], ref[1])


class PageStore(SharedFrames):
    """Pages of one replica: cache + fetcher shared by every connection to it."""

    _frame_key = staticmethod(frame_key)  # for SharedFrames (host/pagestore.py)

    #: Readahead grows (doubling) up to this many pages per GET while reads are sequential.
    MAX_READAHEAD_PAGES = 256
    MAX_READAHEAD_BYTES = 4 * 1024 * 1024

    def __init__(self, client: ReplicaClient, cache_bytes: int,
                 disk: DiskCache | None = None) -> None:
        self.client = client
        self.cache = PageCache(cache_bytes)
        #: The host's cache directory for this replica (``cache_dir``), or None.
        self.disk = disk
        self._inflight: dict[tuple, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._streams: dict[int, int] = {}  # last page of a recent run -> its window
        self.gets = 0
        self.bytes_fetched = 0
        #: Reads of page 1's header (one per transaction), kept out of the cache's hits.
        self.header_reads = 0

    def read_page(self, state: DatabaseState, pgno: int, quiet: bool = False) -> bytes:
        ref = state.index.get(pgno)
        if ref is None:
            raise PageNotFoundError(f"page not found: {pgno} (TXID {state.txid:016x})")
        key = _key(ref)
        if quiet:  # SQLite's check of page 1's change counter: not a hit worth counting
            self.header_reads += 1
            page = self.cache.peek(key)
        else:
            page = self.cache.get(key)
        if page is not None:
            return page if len(page) == state.page_size else \
                lz4.block.decompress(page, uncompressed_size=state.page_size)
        if self.disk is not None:
            page = self._disk_page(ref, pgno, state.page_size)
            if page is not None:
                return page
        return self._miss(state, pgno, ref)

    def peek_page(self, key: tuple, page_size: int) -> bytes | None:
        """A cached page without counting or reordering (background work: hydration)."""
        page = self.cache.peek(key)
        if page is None or len(page) == page_size:
            return page
        return lz4.block.decompress(page, uncompressed_size=page_size)

    def _miss(self, state: DatabaseState, pgno: int, ref: PageRef) -> bytes:
        key = _key(ref)
        with self._lock:
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                run, sequential = self._run(state, pgno, ref)
                fut = Future()
                futures = {}
                for p, r in run:
                    k = _key(r)
                    if k not in self._inflight:
                        f = fut if k == key else Future()
                        self._inflight[k] = f
                        futures[p] = (r, f)
        if not owner:
            return fut.result()
        try:
            items = [(p, r, f) for p, (r, f) in futures.items()]
            if self.disk is not None:
                self._fetch_shared(state.page_size, items, sequential)
            else:
                self._fetch_run(state.page_size, items, sequential)
        finally:
            with self._lock:
                for r, _ in futures.values():
                    self._inflight.pop(_key(r), None)
        return fut.result()

    def _run(self, state: DatabaseState, pgno: int, ref: PageRef
             ) -> tuple[list[tuple[int, PageRef]], bool]:
        """Pages to fetch with ``pgno`` in one GET, and whether they come from a sequential
        stream. Called with the lock held.

        A miss that continues no stream is random (a point lookup): it fetches its own frame
        only — neighbours fetched "for free" in the same round trip would take cache room from
        pages that are read again. Sequential reading is tracked per stream (the last few runs,
        by the page each ended at): a miss shortly after one of them continues it and doubles its
        window (1, 2, 4, … pages), so the interior b-tree pages SQLite reads between leaf runs do
        not reset a scan's readahead. A run reads across pages that are cached or whose newest
        frame is in another file (their frames in this file are read and dropped, up to
        ``_MAX_GAP`` bytes each) instead of stopping there.
        """
        window, sequential = 1, False
        for last in self._streams:
            if last < pgno <= last + 1 + _SLACK:
                window = min(self._streams.pop(last) * 2, self.MAX_READAHEAD_PAGES)
                sequential = True
                break
        run = [(pgno, ref)]
        budget = min(window, self.MAX_READAHEAD_BYTES // state.page_size)
        info, end = ref[0], ref[1] + ref[2]
        nxt, skipped = pgno + 1, 0
        while len(run) < budget and skipped <= _SLACK:
            r = state.index.get(nxt)
            if r is None:
                break
            nxt += 1
            if r[0] is info and self.disk is not None and self.disk.known(info, r[1]):
                break  # on disk, or another process is fetching it
            if r[0] is not info or _key(r) in self._inflight or _key(r) in self.cache:
                skipped += 1
                continue
            if r[1] < end or r[1] - end > _MAX_GAP:
                break
            run.append((nxt - 1, r))
            end = r[1] + r[2]
            skipped = 0
        self._streams[run[-1][0]] = window
        while len(self._streams) > _STREAMS:
            del self._streams[next(iter(self._streams))]
        return run, sequential

    def _fetch_run(self, page_size: int, run: list[tuple[int, PageRef, Future[bytes]]],
                   sequential: bool, claimed: int = 0) -> None:
        info = run[0][1][0]
        start = run[0][1][1]
        end = run[-1][1][1] + run[-1][1][2]
        try:
            data = self.client.read(info.level, info.min_txid, info.max_txid, start, end - start)
            self.gets += 1
            self.bytes_fetched += len(data)
            if len(data) != end - start:
                raise TruncatedError(f"{info}: short read {len(data)} of {end - start} bytes")
            view = memoryview(data)
            for pgno, (_, off, size), fut in run:
                frame = view[off - start:off - start + size]
                page = decode_page_frame(frame, page_size, pgno)
                self._put(frame_key(info, off), page, frame, sequential)
                fut.set_result(page)
            if self.disk is not None:
                self._frames_to_disk(info, view, start, [(off, size) for _, (_, off, size), _
                                                         in run], claimed=claimed)
        except BaseException as err:
            for _, _, fut in run:
                if not fut.done():
                    fut.set_exception(err)
            raise

    def seed(self, files: Iterable[FileIndex]) -> None:
        """Cache the pages of files that arrived whole (small L0 files): no GET needed later."""
        for fi in files:
            if fi.decoded:
                info = fi.info
                raw = memoryview(fi.raw) if fi.raw is not None else None
                for pgno, page in fi.decoded.items():
                    off, size = fi.pages[pgno]
                    self._put(frame_key(info, off), page,
                              raw[off:off + size] if raw is not None else None, True)
                if self.disk is not None and raw is not None:
                    self._frames_to_disk(info, raw, 0, sorted(fi.pages.values()), seeded=True)

    def _put(self, key: tuple, page: bytes, frame: bytes | memoryview | None,
             sequential: bool) -> None:
        """Cache a decoded page, as its LZ4 block when that is at most 3/4 of the page."""
        block = block_payload(frame) if frame is not None and \
            len(frame) <= len(page) * 3 // 4 else None
        if block is None:
            self.cache.put(key, page, sequential)
        else:
            self.cache.put(key, block, sequential, is_interior(page))

    def seed_head(self, fi: FileIndex, head: bytes) -> None:
        """Cache the pages whose frames lie wholly inside ``head`` (the first bytes of a file)."""
        info = fi.info
        page_size = fi.header.page_size if fi.header else 0
        if not page_size and len(head) >= HEADER_SIZE:
            page_size = Header.unpack(head[:HEADER_SIZE]).page_size
        view = memoryview(head)
        budget = min(HEAD_PREFETCH, self.cache.capacity // 4)  # never crowd the cache
        inside = []
        for pgno, (off, size) in fi.pages.items():
            if off + size > len(head) or budget < page_size:
                break
            page = decode_page_frame(view[off:off + size], page_size, pgno)
            self.cache.put(frame_key(info, off), page, sequential=True)
            budget -= page_size
            inside.append((off, size))
        if self.disk is not None and inside:
            self._frames_to_disk(info, view, 0, inside, seeded=True)
