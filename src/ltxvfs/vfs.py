"""The ``litestream`` APSW VFS: opening databases on replicas. Policy lives below.

* Main databases open on a :class:`~ltxvfs.follow.Replica` — one per replica URL, shared by its
  connections in this process: one page cache, one poller (read mode) or one writer (write mode).
  The file object SQLite uses is :class:`~ltxvfs.dbfile.LitestreamFile`.
* Rollback journals stay local, in memory while small; temp files are ordinary local files
  (the base VFS); neither is ever synced (localfiles.py). WAL files are refused, and page 1 always
  says rollback-journal mode. The write buffer, not the journal, is what makes commits durable
  and recoverable.
* Background work (polls, syncs) of every database runs on one shared scheduler and pool.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import apsw

from .config import (
    HYDRATION_SETTINGS,
    ConfigError,
    VFSConfig,
    check_joining,
    uri_settings,
)
from .dbfile import LitestreamFile
from .errors import ConflictError, LitestreamError, TxNotAvailableError
from .follow import Replica
from .host.frames import DiskCache
from .host.polls import shared_polls
from .hydrate import PARALLEL as HYDRATION_PARALLEL
from .hydrate import Hydrator
from .jobs import JOB_THREADS, POOL_THREADS, Scheduler
from .localfiles import LocalFiles
from .modes import WriteModes
from .pages import DatabaseState, PageStore, state_at
from .plan import list_levels
from .scratch import make_scratch_dir, remove_scratch_dir
from .storage import FileReplicaClient, open_replica, parse_replica_url

log = logging.getLogger("ltxvfs")

#: How long closing waits for a poll in progress (its result would be dropped anyway).
POLL_STOP_WAIT = 2.0
#: How long a read-mode replica (no writer, no hydration) stays open after its last connection
#: closed, for the next open to reuse its cache and page index.
LINGER = 30.0

_MAIN_DB = apsw.SQLITE_OPEN_MAIN_DB

#: Appended with a number to every database name (``xFullPathname``): one journal per open.
_OPEN_MARK = "#ltxvfs"
_OPEN_MARK_RE = re.compile(re.escape(_OPEN_MARK) + r"\d+$")


def display_name(name: str) -> str:
    """A database name as the user wrote it (without the per-open mark)."""
    return _OPEN_MARK_RE.sub("", name)


class LitestreamVFS(WriteModes, apsw.VFS):
    """Register with :func:`ltxvfs.register`; keep a reference (APSW drops unreferenced VFSes)."""

    def __init__(self, name: str = "litestream", config: VFSConfig | None = None,
                 makedefault: bool = False) -> None:
        self.name = name
        #: A bad environment variable fails every open (CantOpenError naming it), not register().
        self._env_error: ConfigError | None = None
        if config is None:
            try:
                config = VFSConfig.from_env()
            except ConfigError as err:
                self._env_error = err
                config = VFSConfig()
        self.config = config
        level = {"WARN": "WARNING"}.get(self.config.log_level, self.config.log_level)
        log.setLevel(getattr(logging, level, logging.INFO))
        self._replicas: dict[str, Replica] = {}  # by ReplicaURL.identity
        self._configs: dict[int, VFSConfig] = {}
        #: One lock per replica identity, held while it is opened or closed: a connection never
        #: joins a replica half set up, nor opens a second one while the last closes (syncing).
        self._key_locks: dict[str, threading.Lock] = {}
        self._opens = itertools.count(1)
        self._buffer_paths: dict[Path, str] = {}  # path -> identity of the replica writing it
        self._hydration_paths: dict[Path, int] = {}  # path -> id of the replica hydrating there
        self._tmpdir: str | None = None
        self._lock = threading.RLock()
        #: Journals (in memory, spilled to the scratch directory when large) and temp files.
        self.local_files = LocalFiles(lambda create: self._private_dir() if create else self._tmpdir)
        self.journals = self.local_files.journals
        self._start_threads()
        _instances.add(self)
        super().__init__(name, base="", makedefault=makedefault)

    def _start_threads(self) -> None:
        # Two pools, so that no task ever waits on a task queued behind it: jobs (polls, syncs,
        # compaction) wait for I/O (index fetches, prefetches); I/O tasks wait for nothing.
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="ltxvfs-io")
        self.jobs_pool = ThreadPoolExecutor(JOB_THREADS, thread_name_prefix="ltxvfs-job")
        self.scheduler = Scheduler(self.jobs_pool)
        self.hydration_pool = ThreadPoolExecutor(HYDRATION_PARALLEL,
                                                 thread_name_prefix="ltxvfs-hydrate")

    def _after_fork_in_child(self) -> None:
        """A forked child (gunicorn --preload, multiprocessing's fork, Celery's prefork pool)
        has none of the parent's threads, and any lock one of them held stays held for ever.
        The child starts afresh: new pools and scheduler, new locks, no replicas — the
        parent's replicas (their followers, writers, hydrators, buffers, scratch directory)
        stay the parent's, and the child opens its own as its connections ask. They are kept
        referenced, never closed here: closing would end what the parent still uses (a file
        lock shared by both descriptors, the buffer, the scratch directory)."""
        _inherited.append((self._replicas, self._tmpdir, self.local_files))
        self._replicas, self._configs, self._key_locks = {}, {}, {}
        self._buffer_paths, self._hydration_paths = {}, {}
        self._tmpdir = None
        self._lock = threading.RLock()
        self.local_files = LocalFiles(lambda create: self._private_dir() if create else self._tmpdir)
        self.journals = self.local_files.journals
        self._start_threads()

    # --- opening --------------------------------------------------------------------------------

    def xOpen(self, name, flags):  # noqa: N802 - apsw's name
        if flags[0] & _MAIN_DB:
            try:
                cfg, given = self._config_for(name)
                replica = self._acquire(cfg, given)
            except ConflictError:
                raise  # as it is: names the kept buffer file
            except (LitestreamError, ConfigError) as err:
                log.error("cannot open %s: %s", self._display(name), err)
                raise apsw.CantOpenError(f"litestream: {err}") from err
            if not cfg.write_enabled and not flags[0] & apsw.SQLITE_OPEN_READWRITE:
                flags[1] = flags[0] | apsw.SQLITE_OPEN_READONLY
            else:
                flags[1] = flags[0]  # read-write; writes are checked at the RESERVED lock
            full = name.filename() if isinstance(name, apsw.URIFilename) else str(name)
            # The rule: a connection writes when SQLite opened it read-write and its replica is
            # in write mode (write_enabled=true at any open, or PRAGMA litestream_write_enabled).
            return LitestreamFile(self, replica, full,
                                  may_write=bool(flags[1] & apsw.SQLITE_OPEN_READWRITE))
        if flags[0] & apsw.SQLITE_OPEN_WAL:
            raise apsw.CantOpenError("litestream: WAL mode is not supported (rollback journal only)")
        return self.local_files.open(None if name is None else str(name), flags)

    def xSleep(self, microseconds: int) -> int:  # noqa: N802
        """SQLite's busy handler sleeps here. apsw's inherited xSleep holds the GIL while it
        sleeps, freezing every other thread — including the one whose lock we wait for."""
        time.sleep(microseconds / 1e6)
        return microseconds

    def xAccess(self, pathname, flags):  # noqa: N802
        if pathname.endswith(("-wal", "-journal", "-shm")):
            return False  # no hot journal or WAL ever lives next to a replica
        return super().xAccess(self.local_files.path(pathname), flags)

    def xDelete(self, filename, syncdir):  # noqa: N802
        path = self.local_files.delete(filename)
        return None if path is None else super().xDelete(path, syncdir)

    def _private_dir(self) -> str:
        """A 0700 temp directory of this VFS for journals and temporary hydration files."""
        with self._lock:
            if self._tmpdir is None:
                self._tmpdir = make_scratch_dir()
        return self._tmpdir

    def forget_local_files(self, db_name: str) -> None:
        self.local_files.forget(db_name)

    def xFullPathname(self, name):  # noqa: N802
        """The name, made unique per open (SQLite derives the journal's name from it): the
        replica a main database belongs to is known only from its URI, which journals lack."""
        return f"{name}{_OPEN_MARK}{next(self._opens)}"

    def _display(self, name) -> str:
        text = name.filename() if isinstance(name, apsw.URIFilename) else str(name)
        return display_name(text)

    def _config_for(self, name) -> tuple[VFSConfig, set[str]]:
        """The settings of one open (environment, then the URI's parameters) and the names its
        URI gave."""
        if self._env_error is not None:
            raise self._env_error
        cfg, given = self.config, set()
        if isinstance(name, apsw.URIFilename):
            params = uri_settings({k: name.uri_parameter(k) for k in name.parameters})
            cfg, given = cfg.with_params(params), set(params)
        if not cfg.replica_url:
            raise ConfigError("no replica: set LITESTREAM_REPLICA_URL or the replica_url URI "
                              "parameter (file:db?vfs=litestream&replica_url=s3://bucket/path)")
        return cfg, given

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            lock = self._key_locks.get(key)
            if lock is None:
                lock = self._key_locks[key] = threading.Lock()
            return lock

    def _acquire(self, cfg: VFSConfig, given: set[str] = frozenset()) -> Replica:  # type: ignore[assignment]
        """The replica of ``cfg`` (one per replica identity), opened and set up for what
        ``cfg`` asks (write mode, hydration) before any connection uses it. A connection joining
        an open replica must agree with the settings in force (config.check_joining)."""
        key = parse_replica_url(cfg.replica_url).identity  # type: ignore[arg-type]
        with self._key_lock(key):
            with self._lock:
                replica = self._replicas.get(key)
            if replica is not None and replica.lingering:
                try:  # nobody uses it: its settings bind no one; reuse it only if they agree
                    check_joining(self._configs[id(replica)], cfg, given, False, False)
                except ConfigError:
                    self._expire(replica, locked=True)
                    replica = None
                else:
                    self._revive(replica)
            if replica is not None:
                check_joining(self._configs[id(replica)], cfg, given,
                              writing=replica.writer is not None,
                              hydrating=replica.hydrator is not None)
                with self._lock:
                    replica.refcount += 1
                try:
                    if cfg.write_enabled and replica.writer is None:
                        self.enable_writes(replica, cfg)
                    if cfg.hydration and replica.hydrator is None:
                        self._start_hydration(replica, cfg)
                except BaseException:
                    self._release(replica)
                    raise
                return replica
            replica = self._open_replica(cfg)
            replica.key = key
            with self._lock:
                replica.refcount = 1
                self._replicas[key] = replica
                self._configs[id(replica)] = cfg
            try:
                if cfg.write_enabled:
                    self.enable_writes(replica, cfg)
                else:
                    self._start_polling(replica)
                if cfg.hydration:
                    self._start_hydration(replica, cfg)
            except BaseException:
                self._release(replica)
                raise
            return replica

    def _open_replica(self, cfg: VFSConfig) -> Replica:
        client = open_replica(cfg.replica_url)  # type: ignore[arg-type]
        try:
            if isinstance(client, FileReplicaClient) and not cfg.write_enabled:
                client.check()  # a mistyped directory fails now, not after open_timeout
            deadline = time.monotonic() + cfg.open_timeout
            shared = shared_polls(cfg.cache_dir, client.identity)  # ConfigError: unsafe dir
            disk = DiskCache.open(cfg.cache_dir, client.identity, cfg.cache_dir_size) \
                if cfg.cache_dir else None
            store = PageStore(client, cfg.cache_size, disk)
            while True:
                try:
                    state = state_at(client, self.pool, store)
                    break
                except TxNotAvailableError:
                    if cfg.write_enabled and not any(list_levels(client).values()):
                        # write mode on an empty replica: a new database
                        state = DatabaseState(0, 0, 0, datetime.now(UTC), {})
                        break
                    if time.monotonic() >= deadline:
                        raise TxNotAvailableError(
                            f"replica {client.url} has no LTX files after waiting "
                            f"{cfg.open_timeout:g}s (open_timeout)") from None
                    time.sleep(min(cfg.poll_interval, max(deadline - time.monotonic(), 0.01)))
        except BaseException:
            client.close()
            raise
        log.info("opened %s at TXID %016x (%d pages of %d bytes)", client.url, state.txid,
                 state.commit, state.page_size)
        return Replica(client, store, self.pool, state, cfg.poll_interval,
                       idle_poll_interval=cfg.resolved("idle_poll_interval"),  # type: ignore[arg-type]
                       max_lag=cfg.resolved("max_lag"),  # type: ignore[arg-type]
                       shared=shared)

    # --- settings in force -----------------------------------------------------------------

    def _adopt(self, replica: Replica, cfg: VFSConfig, names: tuple[str, ...]) -> None:
        """The settings ``names`` of ``cfg`` come into force for ``replica`` (write mode or
        hydration turned on by this connection)."""
        with self._lock:
            current = self._configs.get(id(replica), cfg)
            self._configs[id(replica)] = replace(current, **{n: getattr(cfg, n) for n in names})

    def _start_hydration(self, replica: Replica, cfg: VFSConfig) -> None:
        """Hydrate in the background. A file that cannot be used (an unwritable directory, a
        path another replica of this process or another process holds) leaves reads remote,
        and ``litestream_hydration_progress`` says ``failed: …`` with the reason."""
        self._adopt(replica, cfg, HYDRATION_SETTINGS)
        with self._lock:
            path = Path(cfg.hydration_path) if cfg.hydration_path else \
                Path(self._private_dir()) / f"hydrated-{id(replica):x}.db"
            taken = path in self._hydration_paths
            if not taken:
                self._hydration_paths[path] = id(replica)
        hydrator = Hydrator(replica, path, cfg.hydration_persistent, self.hydration_pool)
        if taken:
            hydrator.error = (f"hydration file {path} is in use by another replica in this "
                              "process; reads stay remote")
        else:
            try:
                hydrator.start()
            except OSError as err:  # e.g. an unwritable directory: serve remotely, say why
                hydrator.error = f"cannot hydrate into {path}: {err}; reads stay remote"
                with self._lock:
                    self._hydration_paths.pop(path, None)
        if hydrator.error is not None:
            log.error("hydration of %s: %s", replica.client.url, hydrator.error)
        replica.hydrator = hydrator

    def _start_polling(self, replica: Replica) -> None:
        self.scheduler.add(("poll", id(replica)), replica.poll_job, replica.poll_interval)

    def _stop_polling(self, replica: Replica) -> None:
        self.scheduler.remove(("poll", id(replica)), wait=POLL_STOP_WAIT)

    # --- closing ----------------------------------------------------------------------------------

    def release(self, replica: Replica) -> None:
        """A connection to ``replica`` closed; the last one closes the replica (final sync)."""
        with self._key_lock(replica.key):
            self._release(replica)

    def _release(self, replica: Replica) -> None:
        with self._lock:
            replica.refcount -= 1
            if replica.refcount > 0:
                return
            linger = LINGER > 0 and replica.writer is None and replica.hydrator is None
            if not linger:
                self._replicas = {k: r for k, r in self._replicas.items() if r is not replica}
                self._configs.pop(id(replica), None)
        self._stop_polling(replica)
        if linger:
            # A follower outlives its last connection for a while, so an application that opens
            # a connection per request keeps its cache and page index (the next open polls once).
            replica.lingering = True
            self.scheduler.add(("linger", id(replica)), lambda: self._expire(replica), LINGER)
            return
        self._close_replica(replica)

    def _expire(self, replica: Replica, locked: bool = False) -> None:
        """The linger job: close the replica unless a connection came back meanwhile."""
        self.scheduler.remove(("linger", id(replica)))
        if not locked:
            with self._key_lock(replica.key):
                self._expire(replica, locked=True)
            return
        with self._lock:
            if not replica.lingering or replica.refcount > 0:
                return
            replica.lingering = False
            self._replicas = {k: r for k, r in self._replicas.items() if r is not replica}
            self._configs.pop(id(replica), None)
        self._close_replica(replica)

    def expire_lingering(self) -> None:
        """Close every replica kept open after its last connection (vfs.LINGER) now."""
        for replica in self.replicas():
            if replica.lingering:
                self._expire(replica)

    def _revive(self, replica: Replica) -> None:
        """A connection opens a lingering replica: bring it up to date and follow again."""
        self.scheduler.remove(("linger", id(replica)))
        replica.lingering = False
        replica.poll(fresh=replica.max_lag)
        self._start_polling(replica)

    def _close_replica(self, replica: Replica) -> None:
        writer = replica.writer
        hydrator = replica.hydrator
        try:
            if hydrator is not None:
                replica.hydrator = None
                hydrator.close()
                with self._lock:
                    if self._hydration_paths.get(hydrator.path) == id(replica):
                        del self._hydration_paths[hydrator.path]
            if writer is not None:
                self._stop_writer_jobs(replica, writer)
                replica.writer = None
                try:
                    writer.close()  # final sync; raises if it failed (the buffer is kept)
                finally:
                    with self._lock:
                        self._buffer_paths.pop(writer.buffer.path, None)
        finally:
            replica.client.close()

    def replicas(self) -> list[Replica]:
        with self._lock:
            return list(self._replicas.values())

    def close(self) -> None:
        """Stop background work, unregister, close lingering replicas, remove the private temp
        directory."""
        self.scheduler.stop()
        self.unregister()
        self.expire_lingering()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.jobs_pool.shutdown(wait=False, cancel_futures=True)
        self.hydration_pool.shutdown(wait=False, cancel_futures=True)
        if self._tmpdir is not None:
            remove_scratch_dir(self._tmpdir)
            self._tmpdir = None


#: Every VFS of this process, and what forked children inherited and must leave alone.
_instances: weakref.WeakSet[LitestreamVFS] = weakref.WeakSet()
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    for vfs in list(_instances):
        vfs._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
