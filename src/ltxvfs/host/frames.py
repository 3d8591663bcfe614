"""The shared disk cache of one replica: LTX frames, page-index bytes, headers, the snapshot head.

Lives in ``<cache_dir>/<replica>/frames/`` (see :func:`..host.replica_dir`), one file per entry
(:mod:`.entries`: header + value, written to a temp name and renamed). Every key holds the
file's identity — level, TXID range, size and ETag (S3: the content's MD5; file://: inode, mtime
and ctime) — so a replaced history, which reuses file names, never meets the old history's entries;
files without an ETag are never cached on disk.

Policy:

* **One fetch per host.** Before a GET, a process creates ``<entry>.claim`` (O_EXCL); a process
  that finds the claim waits (up to :attr:`DiskCache.WAIT` seconds) for the entry instead of
  fetching it too. A claim left by a killed process is stale after :attr:`DiskCache.STALE`.
* **Off the read path.** Entries are written by a background thread through a queue bounded in
  bytes (full: dropped, it is only a cache); claimed entries go first (other processes may be
  waiting for them), and their claims are released once they are written.
* **Bounded.** A process that has written ``limit / 8`` bytes since its last scan scans the
  directory and removes the least recently used entries (hits touch the mtime) down to 3/4 of
  ``limit``; stray temp files and stale claims go too. The directory stays under ``limit`` plus
  what the other processes wrote since their own scans (at most ``limit / 8`` each).
* **Never a failed read.** An I/O error other than "no such entry" (a full disk, a read-only
  directory) turns the disk cache off for this replica in this process, with one WARNING.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..storage.base import FileInfo
from . import entries
from .paths import _check_private, replica_dir

log = logging.getLogger("ltxvfs.host")

#: The subdirectory of the replica's directory this module owns.
SUBDIR = "frames"

_live: weakref.WeakSet[DiskCache] = weakref.WeakSet()
_by_root: dict[str, DiskCache] = {}
_open_lock = threading.Lock()


def file_identity(info: FileInfo) -> str | None:
    """What names one version of one LTX file; None when the backend gave no ETag (never cached)."""
    if not info.etag:
        return None
    return f"L{info.level}/{info.min_txid:016x}-{info.max_txid:016x}/{info.size}/{info.etag}"


class DiskCache:
    """Entries of one replica in the host's cache directory. Thread-safe and fork-safe."""

    #: Seconds to wait for another process's fetch of an entry before fetching it too.
    WAIT = 5.0
    #: Seconds after which a claim is a dead process's: ignored and removed.
    STALE = 10.0
    #: Bytes of entries waiting for the background writer (more are dropped).
    QUEUE_BYTES = 16 * 1024 * 1024

    def __init__(self, root: Path | None, identity: str, limit: int,
                 disabled: str = "") -> None:
        self.root = str(root) if root is not None else ""
        self.identity = identity
        self.limit = limit
        #: Why the cache is off ("" while on).
        self.disabled = disabled
        self.hits = self.misses = self.rejected = self.waits = 0
        self.bytes_read = self.bytes_written = self.evictions = self.dropped = 0
        self._since_scan = 0
        self._dirs: set[str] = set()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[tuple[str, bytes, bool]] = deque()
        self._queued = 0
        self._busy = False
        self._thread: threading.Thread | None = None
        _live.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the writer thread stayed in the parent, and its locks may be held."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue = deque()
        self._queued, self._busy, self._thread = 0, False, None

    @classmethod
    def open(cls, cache_dir: str | os.PathLike[str], identity: str, limit: int) -> DiskCache:
        """The cache of the replica ``identity`` under ``cache_dir``; a disabled one (with one
        WARNING) when the directory cannot be made. A directory that is not private raises
        ConfigError (its entries would be pages of the database anyone could plant)."""
        try:
            root = replica_dir(cache_dir, identity) / SUBDIR
            root.mkdir(mode=0o700, exist_ok=True)
            _check_private(root)
        except OSError as exc:
            log.warning("cache_dir %s unusable (%s): going on without the disk cache",
                        cache_dir, exc.strerror or exc)
            return cls(None, identity, limit, disabled=f"cannot create: {exc.strerror or exc}")
        with _open_lock:  # one per replica and process: one writer thread, however many opens
            cache = _by_root.get(str(root))
            if cache is None or cache.disabled or cache.identity != identity:
                cache = _by_root[str(root)] = cls(root, identity, limit)
            cache.limit = limit
            return cache

    # --- keys and paths ---------------------------------------------------------------------------

    def key(self, kind: str, info: FileInfo, offset: int | None = None) -> str | None:
        ident = file_identity(info)
        if ident is None or self.disabled:
            return None
        tail = "" if offset is None else f"@{offset}"
        return f"{self.identity}\n{kind} {ident}{tail}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{entries.entry_name(key)}"

    # --- frames (pages.py's PageStore) ------------------------------------------------------------

    def get_frame(self, info: FileInfo, offset: int, count: bool = True) -> bytes | None:
        key = self.key("frame", info, offset)
        return self._get(key, count) if key is not None else None

    def known(self, info: FileInfo, offset: int) -> bool:
        """Whether the frame is on disk or being fetched by some process (a run stops there)."""
        key = self.key("frame", info, offset)
        if key is None:
            return False
        path = self._path(key)
        return os.path.exists(path) or os.path.exists(path + entries.CLAIM_SUFFIX)

    def claim_frame(self, info: FileInfo, offset: int) -> bool | None:
        """Claim the fetch of a frame: True (ours: fetch, put, release), False (another
        process's: :meth:`wait_frame`), None (not cached on disk)."""
        key = self.key("frame", info, offset)
        return self._claim(key) if key is not None else None

    def wait_frame(self, info: FileInfo, offset: int) -> bytes | None:
        key = self.key("frame", info, offset)
        return self._wait(key) if key is not None else None

    def put_frame(self, info: FileInfo, offset: int, frame: bytes | memoryview, *,
                  now: bool = False, release: bool = False) -> None:
        """Store a frame: ``now``, or by the background writer; ``release``: then release this
        process's claim on it."""
        key = self.key("frame", info, offset)
        if key is None:
            return
        if now:
            self._put(key, bytes(frame))
            if release:
                self._unclaim(key)
        else:
            self._enqueue(key, bytes(frame), release)

    def release_frame(self, info: FileInfo, offset: int) -> None:
        key = self.key("frame", info, offset)
        if key is not None:
            self._unclaim(key)

    # --- whole values: page-index bytes, headers, the snapshot's head ---------------------------

    def has(self, kind: str, info: FileInfo) -> bool:
        key = self.key(kind, info)
        return key is not None and os.path.exists(self._path(key))

    def get_or_fetch(self, kind: str, info: FileInfo, fetch: Callable[[], bytes]) -> bytes:
        """The ``kind`` entry of ``info`` from disk, else ``fetch()`` (once per host: other
        processes wait for it) stored for the next process by the background writer."""
        key = self.key(kind, info)
        if key is None:
            return fetch()
        value = self._get(key)
        if value is not None:
            return value
        mine = self._claim(key)
        if mine is False:
            value = self._wait(key)
            if value is not None:
                return value
        try:
            value = fetch()
        except BaseException:
            if mine:
                self._unclaim(key)
            raise
        self._enqueue(key, value, bool(mine))  # written (and the claim released) off this thread
        return value

    # --- the store itself -------------------------------------------------------------------------

    def _get(self, key: str, count: bool = True) -> bytes | None:
        if self.disabled:
            return None
        path = self._path(key)
        try:
            data = entries.read(path)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                self._fail(exc)
                return None
            data = b""  # a symbolic link where an entry should be: never followed, removed
        if data is None:
            if count:
                self.misses += 1
            return None
        value = entries.decode(key, data)
        if value is None:  # torn, or another replica's / version's: never served
            self.rejected += 1
            if count:
                self.misses += 1
            log.debug("cache_dir: removing invalid entry %s", path)
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        self.hits += 1
        self.bytes_read += len(value)
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return value

    def _put(self, key: str, value: bytes) -> None:
        if self.disabled:
            return
        path = self._path(key)
        try:
            self._mkdir(path)
            data = entries.encode(key, value)
            entries.write_atomic(path, data)
        except OSError as exc:
            self._fail(exc)
            return
        self.bytes_written += len(data)
        self._since_scan += len(data)
        if self._since_scan >= max(self.limit // 8, 1):
            self._since_scan = 0
            self._enqueue("", b"", False)  # a scan, by the background thread: never in a read

    def _mkdir(self, path: str) -> None:
        d = path.rsplit("/", 1)[0]
        if d not in self._dirs:
            try:
                os.mkdir(d, 0o700)
                os.chmod(d, 0o700)
            except FileExistsError:
                pass
            self._dirs.add(d)

    def _claim(self, key: str) -> bool | None:
        if self.disabled:
            return None
        path = self._path(key) + entries.CLAIM_SUFFIX
        try:
            self._mkdir(path)
            if entries.claim(path):
                return True
            try:
                if time.time() - os.stat(path).st_mtime > self.STALE:  # its owner died
                    os.unlink(path)
                    return entries.claim(path)
            except FileNotFoundError:
                return entries.claim(path)
            return False
        except OSError as exc:
            self._fail(exc)
            return None

    def _unclaim(self, key: str) -> None:
        try:
            os.unlink(self._path(key) + entries.CLAIM_SUFFIX)
        except OSError:
            pass

    def _wait(self, key: str) -> bytes | None:
        """Wait (bounded) for another process's fetch of ``key``; None if it did not come (the
        look-up before counted the miss)."""
        self.waits += 1
        path = self._path(key)
        claim = path + entries.CLAIM_SUFFIX
        deadline = time.monotonic() + self.WAIT
        delay = 0.0005
        while True:
            value = self._get(key, count=False)
            if value is not None or self.disabled:
                return value
            if not os.path.exists(claim):  # released: the entry is there, or the fetch failed
                return self._get(key, count=False)
            if time.monotonic() >= deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _fail(self, exc: OSError) -> None:
        with self._lock:
            if self.disabled:
                return
            self.disabled = f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror or exc}"
            self._queue.clear()
            self._queued = 0
        log.warning("cache_dir %s: %s; going on without the disk cache for %s",
                    self.root, exc.strerror or exc, self.identity)

    # --- background writes ------------------------------------------------------------------------

    def _enqueue(self, key: str, value: bytes, release: bool) -> None:
        if self.disabled:
            if release:
                self._unclaim(key)
            return
        with self._cond:
            if key and self._queued and self._queued + len(value) > self.QUEUE_BYTES:
                self.dropped += 1
                if release:
                    self._unclaim(key)
                return
            if release:  # claimed: other processes may be waiting for this one
                self._queue.appendleft((key, value, release))
            else:
                self._queue.append((key, value, release))
            self._queued += len(value)
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="ltxvfs-cache-dir",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _writer(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._queue:
                    self._cond.wait()
                key, value, release = self._queue.popleft()
                self._queued -= len(value)
                self._busy = True
            try:
                if key:
                    self._put(key, value)
                else:
                    self.evict()
            except Exception:
                log.exception("cache_dir: writing an entry failed")
            finally:
                if release:
                    self._unclaim(key)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until the queued entries are written; True if they are."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # --- eviction ---------------------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes of the entries on disk (a scan)."""
        return sum(size for _, size, _ in self._scan(time.time()))

    def evict(self) -> None:
        """Remove the least recently used entries until the directory holds 3/4 of the limit."""
        found = self._scan(time.time())
        total = sum(size for _, size, _ in found)
        if total <= self.limit:
            return
        found.sort()
        target = self.limit * 3 // 4
        for _, size, path in found:
            if total <= target:
                break
            try:
                os.unlink(path)
                self.evictions += 1
            except OSError:
                pass
            total -= size

    def _scan(self, now: float) -> list[tuple[float, int, str]]:
        """(mtime, bytes on disk, path) of every entry; removes stray temp files and claims."""
        found: list[tuple[float, int, str]] = []
        if not self.root:
            return found
        try:
            subdirs = [e.path for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return found
        for d in subdirs:
            try:
                with os.scandir(d) as it:
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        name = e.name
                        if name.endswith(entries.TMP_SUFFIX) or name.endswith(entries.CLAIM_SUFFIX):
                            if now - st.st_mtime > 60 * self.STALE:
                                try:
                                    os.unlink(e.path)
                                except OSError:
                                    pass
                            continue
                        size = getattr(st, "st_blocks", 0) * 512 or st.st_size
                        found.append((st.st_mtime, size, e.path))
            except OSError:
                continue
        return found

    # --- stats ------------------------------------------------------------------------------------

    @staticmethod
    def off_stats() -> dict[str, object]:
        """:meth:`stats` of a replica without ``cache_dir``."""
        return {"disk_cache": "off", **dict.fromkeys(
            ("disk_hits", "disk_misses", "disk_bytes_read", "disk_bytes_written", "disk_rejected",
             "disk_waits", "disk_evictions"), 0)}

    def stats(self) -> dict[str, object]:
        return {
            "disk_cache": ("off: " + self.disabled) if self.disabled else "on",
            "disk_hits": self.hits,
            "disk_misses": self.misses,
            "disk_bytes_read": self.bytes_read,
            "disk_bytes_written": self.bytes_written,
            "disk_rejected": self.rejected,
            "disk_waits": self.waits,
            "disk_evictions": self.evictions,
        }


@atexit.register
def flush_all(timeout: float = 5.0) -> bool:
    """Wait (bounded) until every cache of this process has written its queue (at exit too)."""
    return all([cache.flush(timeout) for cache in list(_live)])


def _after_fork() -> None:
    for cache in list(_live):
        cache._after_fork()
    # multiprocessing's forked children end with os._exit, skipping atexit: flush in its exit
    # hook instead. Its finalizers are cleared as the child starts, so register once it ran.
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.register_after_fork(_FORK_TOKEN, _flush_at_child_exit)


class _Token:
    pass


_FORK_TOKEN = _Token()


def _flush_at_child_exit(_: object) -> None:
    import multiprocessing.util as mp_util

    mp_util.Finalize(None, flush_all, exitpriority=10)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
