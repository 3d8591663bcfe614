"""What a replica's page store (pages.py) does with the host's cache directory (frames.py).

Kept apart from pages.py so that the page store reads as before with ``cache_dir`` off: its
hooks are a few ``if self.disk is not None`` lines that call into here. With it on, frames are
looked up on disk after a memory miss and before a GET; a GET is claimed frame by frame so that
the host's other processes wait for it rather than repeat it; what was fetched goes to disk.
Page-index bytes, the last file's header and the snapshot's head go through
:meth:`DiskCache.get_or_fetch` (one fetch per host, kept across restarts).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from ..errors import LitestreamError
from ..ltx import HEADER_SIZE, decode_page_frame, parse_page_index
from ..storage.base import FileInfo, ReplicaClient
from .frames import DiskCache

PageRef = tuple[FileInfo, int, int]

#: With a cache directory: the longest run whose frames are all claimed there before the GET and
#: written there after it. Of a longer run (a scan's readahead: a file per frame would cost more
#: than the GET, see docs/design.md) only the first frame is.
DISK_RUN = 8

def index_bytes_via_disk(info: FileInfo, disk: DiskCache,
                         read: Callable[[], tuple[int, bytes, dict[int, tuple[int, int]]]]
                         ) -> tuple[int, bytes, dict[int, tuple[int, int]]]:
    """``read()`` (pages.py's tail GETs: offset, bytes to the end, the page index they hold)
    through the disk cache (entry: offset u64 + the bytes)."""
    fetched = []

    def fetch() -> bytes:
        start, tail, pages = read()
        fetched.append(pages)
        return start.to_bytes(8, "big") + tail

    value = disk.get_or_fetch("index", info, fetch)
    start, tail = int.from_bytes(value[:8], "big"), value[8:]
    return start, tail, fetched[0] if fetched else parse_page_index(tail, info.size, start)


def read_header(client: ReplicaClient, info: FileInfo, disk: DiskCache | None) -> bytes:
    def fetch() -> bytes:
        return client.read(info.level, info.min_txid, info.max_txid, 0, HEADER_SIZE)
    return fetch() if disk is None else disk.get_or_fetch("header", info, fetch)


def read_head(client: ReplicaClient, info: FileInfo, size: int, disk: DiskCache | None
               ) -> bytes:
    def fetch() -> bytes:
        return client.read(info.level, info.min_txid, info.max_txid, 0, size)
    return fetch() if disk is None else disk.get_or_fetch("head", info, fetch)


class SharedFrames:
    """The page store's side of the cache directory (a mixin of ``pages.PageStore``, which
    provides ``disk``, ``_frame_key``, ``_put`` and ``_fetch_run``)."""

    disk: DiskCache | None
    _frame_key: Callable[[FileInfo, int], tuple]
    _put: Callable[..., None]
    _fetch_run: Callable[..., None]

    def _disk_page(self, ref: PageRef, pgno: int, page_size: int, wait: bool = False,
                   recheck: bool = False) -> bytes | None:
        """The page from the frame on disk (then cached in memory), or None. ``wait``: another
        process claimed it, wait (bounded) for it to land."""
        info, off, size = ref
        assert self.disk is not None
        frame = self.disk.wait_frame(info, off) if wait else \
            self.disk.get_frame(info, off, count=not recheck)
        if frame is None or len(frame) != size:
            return None
        try:
            page = decode_page_frame(frame, page_size, pgno)
        except LitestreamError:
            return None
        self._put(self._frame_key(info, off), page, frame, False)
        return page

    def _fetch_shared(self, page_size: int, run: list[tuple[int, PageRef, Future[bytes]]],
                      sequential: bool) -> None:
        """:meth:`_fetch_run` shared with the host's other processes: each frame of the run is
        claimed in the cache directory before the GET (the run is cut at the first frame some
        other process claimed), and its claim is released once the frame is on disk. A frame
        claimed elsewhere is waited for on disk instead of fetched again."""
        disk = self.disk
        assert disk is not None
        try:
            while run:
                pgno, (info, off, size), fut = run[0]
                mine = disk.claim_frame(info, off)
                if mine is not None:  # landed since we looked (claimed: look again)
                    page = self._disk_page((info, off, size), pgno, page_size, wait=not mine,
                                           recheck=mine)
                    if page is not None:
                        if mine:
                            disk.release_frame(info, off)
                        fut.set_result(page)
                        run = run[1:]
                        continue
                claimed, cut = (1 if mine else 0), len(run)
                while mine and len(run) <= DISK_RUN and claimed < len(run):
                    took = disk.claim_frame(run[claimed][1][0], run[claimed][1][1])
                    if took is not True:
                        cut = claimed if took is False else cut
                        break
                    claimed += 1
                part, run = run[:cut], run[cut:]
                try:
                    self._fetch_run(page_size, part, sequential, claimed=claimed)
                except BaseException:
                    for _, (i, o, _), _ in part[:claimed]:
                        disk.release_frame(i, o)
                    raise
        except BaseException as err:
            for _, _, fut in run:
                if not fut.done():
                    fut.set_exception(err)
            raise

    def _frames_to_disk(self, info: FileInfo, data: memoryview, start: int,
                        frames: list[tuple[int, int]], seeded: bool = False,
                        claimed: int = 0) -> None:
        """Frames (offset, size) of ``info`` lying in ``data`` (which begins at ``start``) to
        the disk cache, by its background writer (which releases their claims once written).
        Seeded frames (files that came whole, the snapshot's head) are written once per host:
        not when the first is on disk already."""
        disk = self.disk
        assert disk is not None
        if not frames:
            return
        if seeded:  # once per host: by the process that claims its first frame
            if disk.known(info, frames[0][0]) or disk.claim_frame(info, frames[0][0]) is not True:
                return
        if seeded:
            claimed = 1
        elif len(frames) > DISK_RUN:  # a scan's readahead: not worth a file per frame
            frames = frames[:claimed]
        for i, (off, size) in enumerate(frames):
            disk.put_frame(info, off, data[off - start:off - start + size], release=i < claimed)
