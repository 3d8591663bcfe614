"""The ``litestream`` APSW VFS: opening databases on replicas. Policy lives below.

* Main databases open on a :class:`~ltxvfs.follow.Replica` — one per replica URL, shared by its
  connections in this process: one page cache, one poller (read mode) or one writer (write mode).
  The file object SQLite uses is :class:`~ltxvfs.dbfile.LitestreamFile`.
* Journals and temp files are ordinary local files (the base VFS); WAL files are refused, and
  page 1 always says rollback-journal mode. In write mode the rollback journal stays local: the
  write buffer, not the journal, is what makes commits durable and recoverable.
* Background work (polls, syncs) of every database runs on one shared scheduler and pool.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import apsw

from .compact import Compactor
from .config import URI_PARAMETERS, ConfigError, VFSConfig
from .dbfile import LitestreamFile
from .errors import ConflictError, LitestreamError, TxNotAvailableError
from .follow import Replica
from .hydrate import PARALLEL as HYDRATION_PARALLEL
from .hydrate import Hydrator
from .jobs import JOB_THREADS, POOL_THREADS, Scheduler
from .pages import DatabaseState, PageStore, state_at
from .plan import list_levels
from .scratch import make_scratch_dir, remove_scratch_dir
from .storage import open_replica, parse_replica_url
from .writer import Writer, default_buffer_path

log = logging.getLogger("ltxvfs")

#: How long closing (or switching modes) waits for a background run in progress to finish: a
#: compaction or sync may take a while and must not lose its storage client half-way; a poll is
#: only worth a short wait (its result would be dropped anyway).
JOB_STOP_WAIT = 30.0
POLL_STOP_WAIT = 2.0
#: How long turning write mode off waits for transactions that write or read the buffer to end
#: (new ones are held back meanwhile, as SQLite's PENDING lock does).
DISABLE_WAIT = 5.0

_MAIN_DB = apsw.SQLITE_OPEN_MAIN_DB

#: Appended with a number to every database name (``xFullPathname``): one journal per open.
_OPEN_MARK = "#ltxvfs"
_OPEN_MARK_RE = re.compile(re.escape(_OPEN_MARK) + r"\d+$")


def display_name(name: str) -> str:
    """A database name as the user wrote it (without the per-open mark)."""
    return _OPEN_MARK_RE.sub("", name)


class _LocalFile(apsw.VFSFile):
    """A journal or temp file on local disk, with no fsync: crash recovery never uses them (the
    write buffer does, and hot journals are hidden by ``xAccess``), so syncing them would only
    make every commit wait for two more disk flushes."""

    def xSync(self, flags: int) -> None:  # noqa: N802
        pass


class LitestreamVFS(apsw.VFS):
    """Register with :func:`ltxvfs.register`; keep a reference (APSW drops unreferenced VFSes)."""

    def __init__(self, name: str = "litestream", config: VFSConfig | None = None,
                 makedefault: bool = False) -> None:
        self.name = name
        self.config = config or VFSConfig.from_env()
        level = {"WARN": "WARNING"}.get(self.config.log_level, self.config.log_level)
        log.setLevel(getattr(logging, level, logging.INFO))
        self._replicas: dict[str, Replica] = {}  # by ReplicaURL.identity
        self._configs: dict[int, VFSConfig] = {}
        #: One lock per replica identity, held while it is opened or closed: a connection never
        #: joins a replica half set up, nor opens a second one while the last closes (syncing).
        self._key_locks: dict[str, threading.Lock] = {}
        self._opens = itertools.count(1)
        self._buffer_paths: dict[Path, str] = {}  # path -> identity of the replica writing it
        self._hydration_paths: set[Path] = set()
        self._tmpdir: str | None = None
        self._lock = threading.RLock()
        # Two pools, so that no task ever waits on a task queued behind it: jobs (polls, syncs,
        # compaction) wait for I/O (index fetches, prefetches); I/O tasks wait for nothing.
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="ltxvfs-io")
        self.jobs_pool = ThreadPoolExecutor(JOB_THREADS, thread_name_prefix="ltxvfs-job")
        self.scheduler = Scheduler(self.jobs_pool)
        self.hydration_pool = ThreadPoolExecutor(HYDRATION_PARALLEL,
                                                 thread_name_prefix="ltxvfs-hydrate")
        super().__init__(name, base="", makedefault=makedefault)

    # --- opening --------------------------------------------------------------------------------

    def xOpen(self, name, flags):  # noqa: N802 - apsw's name
        if flags[0] & _MAIN_DB:
            try:
                cfg = self._config_for(name)
                replica = self._acquire(cfg)
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
            return LitestreamFile(self, replica, full, may_write=cfg.write_enabled)
        if flags[0] & apsw.SQLITE_OPEN_WAL:
            raise apsw.CantOpenError("litestream: WAL mode is not supported (rollback journal only)")
        if name is not None:
            name = self._local_path(str(name))
        return _LocalFile("", name, flags)

    def xSleep(self, microseconds: int) -> int:  # noqa: N802
        """SQLite's busy handler sleeps here. apsw's inherited xSleep holds the GIL while it
        sleeps, freezing every other thread — including the one whose lock we wait for."""
        time.sleep(microseconds / 1e6)
        return microseconds

    def xAccess(self, pathname, flags):  # noqa: N802
        if pathname.endswith(("-wal", "-journal", "-shm")):
            return False  # no hot journal or WAL ever lives next to a replica
        return super().xAccess(self._local_path(pathname), flags)

    def xDelete(self, filename, syncdir):  # noqa: N802
        return super().xDelete(self._local_path(filename), syncdir)

    def _private_dir(self) -> str:
        """A 0700 temp directory of this VFS for journals and temporary hydration files."""
        with self._lock:
            if self._tmpdir is None:
                self._tmpdir = make_scratch_dir()
        return self._tmpdir

    def _local_path(self, name: str) -> str:
        """Journals of replica databases live in the private temp directory (0700), named
        after a hash of the database's full name — unique per open (``xFullPathname``), so
        connections to two replicas that share a name never share a journal. The unix VFS
        gives a journal the permissions of the file its name minus '-suffix' names, so an
        empty 0600 stand-in is created for it (removed when the database closes)."""
        cut = name.rfind("-")
        if cut <= 0:
            return name
        stem = self._stem(name[:cut])
        if not os.path.exists(stem):
            os.close(os.open(stem, os.O_WRONLY | os.O_CREAT, 0o600))
        return stem + name[cut:]

    def _stem(self, db_name: str) -> str:
        return os.path.join(self._private_dir(), hashlib.sha256(db_name.encode()).hexdigest()[:20])

    def forget_local_files(self, db_name: str) -> None:
        """A closed database's stand-in and leftover journals go (its name is never reused)."""
        if self._tmpdir is None:
            return
        stem = self._stem(db_name)
        for suffix in ("", "-journal"):
            try:
                os.unlink(stem + suffix)
            except FileNotFoundError:
                pass

    def xFullPathname(self, name):  # noqa: N802
        """The name, made unique per open (SQLite derives the journal's name from it): the
        replica a main database belongs to is known only from its URI, which journals lack."""
        return f"{name}{_OPEN_MARK}{next(self._opens)}"

    def _display(self, name) -> str:
        text = name.filename() if isinstance(name, apsw.URIFilename) else str(name)
        return display_name(text)

    def _config_for(self, name) -> VFSConfig:
        cfg = self.config
        if isinstance(name, apsw.URIFilename):
            params = {k: name.uri_parameter(k) for k in URI_PARAMETERS
                      if name.uri_parameter(k) is not None}
            cfg = cfg.with_params(params)
        if not cfg.replica_url:
            raise ConfigError("no replica: set LITESTREAM_REPLICA_URL or the replica_url URI "
                              "parameter (file:db?vfs=litestream&replica_url=s3://bucket/path)")
        return cfg

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            lock = self._key_locks.get(key)
            if lock is None:
                lock = self._key_locks[key] = threading.Lock()
            return lock

    def _acquire(self, cfg: VFSConfig) -> Replica:
        """The replica of ``cfg`` (one per replica identity), opened and set up for what
        ``cfg`` asks (write mode, hydration) before any connection uses it."""
        key = parse_replica_url(cfg.replica_url).identity  # type: ignore[arg-type]
        with self._key_lock(key):
            with self._lock:
                replica = self._replicas.get(key)
                if replica is not None:
                    replica.refcount += 1
            if replica is not None:
                if cfg.write_enabled and replica.writer is None:
                    try:
                        self.enable_writes(replica, cfg)
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
            deadline = time.monotonic() + cfg.open_timeout
            store = PageStore(client, cfg.cache_size)
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
        return Replica(client, store, self.pool, state, cfg.poll_interval)

    # --- write mode -------------------------------------------------------------------------------

    def enable_writes(self, replica: Replica, cfg: VFSConfig | None = None) -> None:
        """Turn write mode on for ``replica``: open (and recover) its buffer, stop polling, sync
        every ``sync_interval``. Raises ConflictError when a crashed buffer cannot be applied.
        Connections already inside a read transaction keep their view until it ends."""
        cfg = cfg or self._configs.get(id(replica), self.config)
        with replica.mode_lock:  # one switch at a time: never two writers for one replica
            if replica.writer is not None:
                return
            path = Path(cfg.buffer_path) if cfg.buffer_path else \
                default_buffer_path(replica.client.identity)
            with self._lock:
                owner = self._buffer_paths.get(path)
                if owner is not None:
                    raise ConfigError(f"buffer_path {path} is already the write buffer of "
                                      "another replica in this process; give each its own")
                self._buffer_paths[path] = replica.key
            self._stop_polling(replica)
            writer = Writer(replica, path)
            try:
                # Start from the newest remote state, never from one a failed poll left: the
                # replica may have moved on or been replaced (a restored primary) meanwhile.
                replica.poll(strict=True)
                writer.open()
            except BaseException:
                with self._lock:
                    self._buffer_paths.pop(path, None)
                self._start_polling(replica)
                raise
            self._install_writer(replica, writer)
            if cfg.sync_interval > 0:  # a negative interval: sync only on close (as Go)
                self.scheduler.add(("sync", id(replica)), writer.sync_in_background,
                                   cfg.sync_interval)
            writer.compactor = Compactor(replica.client, cfg.compaction_levels,
                                         cfg.snapshot_interval, cfg.snapshot_retention,
                                         cfg.l0_retention)
            for name, fn, interval in writer.compactor.jobs():
                self.scheduler.add((name, id(replica)), fn, interval)
        log.info("write mode on for %s (buffer %s)", replica.client.url, path)

    def disable_writes(self, replica: Replica, owner: int = 0) -> None:
        """Sync what is buffered, then go back to read mode (polling). Waits (up to
        ``DISABLE_WAIT``, holding new transactions back) for transactions that write or read the
        buffer to end, then BusyError; at once if ``owner`` (the asking connection) is inside
        one. On a failed sync write mode stays on, whole, and the error is raised."""
        with replica.mode_lock:
            writer = replica.writer
            if writer is None:
                return
            for _ in range(3):
                writer.sync()  # raises: nothing changed, write mode stays on
                if replica.locks.when_idle(lambda: self._detach_writer(replica, writer), owner,
                                           DISABLE_WAIT):
                    break
            else:
                raise apsw.BusyError("commits keep arriving; write mode stays on, try again")
            self._stop_writer_jobs(replica, writer)
            try:
                writer.close()  # nothing left to sync: closes and removes the buffer
            finally:
                with self._lock:
                    self._buffer_paths.pop(writer.buffer.path, None)
                self._start_polling(replica)
        log.info("write mode off for %s", replica.client.url)

    @staticmethod
    def _install_writer(replica: Replica, writer: Writer) -> None:
        with replica.locks.mutex:  # views are chosen under it (dbfile._granting)
            replica.writer = writer

    @staticmethod
    def _detach_writer(replica: Replica, writer: Writer) -> bool:
        """Under the lock table's mutex, with no writer and no buffer reader: detach the writer
        if everything it holds is synced (new transactions then read the replica's state)."""
        if writer.buffer.has_unsynced:
            return False
        replica.writer = None
        return True

    def _start_hydration(self, replica: Replica, cfg: VFSConfig) -> None:
        with self._lock:
            if cfg.hydration_path:
                path = self._unique(Path(cfg.hydration_path), self._hydration_paths)
            else:
                path = Path(self._private_dir()) / f"hydrated-{id(replica):x}.db"
            self._hydration_paths.add(path)
        hydrator = Hydrator(replica, path, cfg.hydration_persistent, self.hydration_pool)
        try:
            hydrator.start()
        except OSError as err:  # e.g. an unwritable directory: serve remotely, say why
            log.error("cannot hydrate %s into %s: %s", replica.client.url, path, err)
            with self._lock:
                self._hydration_paths.discard(path)
            return
        replica.hydrator = hydrator

    @staticmethod
    def _unique(path: Path, taken: set[Path]) -> Path:
        """``path``, or ``<path>.<n>`` if another open database already uses it (as Go does
        for buffer paths)."""
        if path not in taken:
            return path
        n = 2
        while path.with_name(f"{path.name}.{n}") in taken:
            n += 1
        return path.with_name(f"{path.name}.{n}")

    def _stop_writer_jobs(self, replica: Replica, writer: Writer) -> None:
        """Unschedule the sync and compaction jobs and let a run in progress finish (bounded),
        so the final sync and closing the client do not cut a compaction short."""
        keys = [("sync", id(replica))]
        if writer.compactor is not None:
            keys += [(name, id(replica)) for name, _, _ in writer.compactor.jobs()]
        deadline = time.monotonic() + JOB_STOP_WAIT
        for key in keys:
            if not self.scheduler.remove(key, wait=max(deadline - time.monotonic(), 0.0)):
                log.warning("background job %s of %s still running after %gs; closing anyway",
                            key[0], replica.client.url, JOB_STOP_WAIT)

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
            self._replicas = {k: r for k, r in self._replicas.items() if r is not replica}
            self._configs.pop(id(replica), None)
        self._stop_polling(replica)
        writer = replica.writer
        hydrator = replica.hydrator
        try:
            if hydrator is not None:
                replica.hydrator = None
                hydrator.close()
                with self._lock:
                    self._hydration_paths.discard(hydrator.path)
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
        """Stop background work, unregister, remove the private temp directory."""
        self.scheduler.stop()
        self.unregister()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.jobs_pool.shutdown(wait=False, cancel_futures=True)
        self.hydration_pool.shutdown(wait=False, cancel_futures=True)
        if self._tmpdir is not None:
            remove_scratch_dir(self._tmpdir)
            self._tmpdir = None


# --- registration and SQL functions ------------------------------------------------------------

_registered: dict[str, LitestreamVFS] = {}
_register_lock = threading.Lock()


def register(name: str = "litestream", config: VFSConfig | None = None,
             makedefault: bool = False, warm_up: bool = True) -> LitestreamVFS:
    """Register the VFS (once per name; later calls return the same object) and the SQL
    functions ``litestream_time()``, ``litestream_txid()``, ``litestream_lag()`` and
    ``litestream_set_time(x)`` on every connection that opens a database through it."""
    with _register_lock:
        vfs = _registered.get(name)
        if vfs is None:
            vfs = LitestreamVFS(name, config, makedefault)
            _registered[name] = vfs
            if _add_functions not in apsw.connection_hooks:
                apsw.connection_hooks.append(_add_functions)
                atexit.register(_sync_at_exit)
                if warm_up:
                    _warm_up_s3()
        return vfs


def _warm_up_s3() -> None:
    """Import boto3 and load the S3 model now (~0.4 s once per process, no network), so that
    opening a database — the first query's latency — does not pay for it, as the Go extension
    pays its start-up cost when it is loaded."""
    try:
        from .storage.s3 import warm_up

        warm_up()
    except Exception:  # only an optimisation: the open does the real work and reports errors
        log.debug("S3 warm-up failed", exc_info=True)


def unregister(name: str = "litestream") -> None:
    with _register_lock:
        vfs = _registered.pop(name, None)
    if vfs is not None:
        vfs.close()


def _sync_at_exit() -> None:
    """A clean interpreter exit syncs what is buffered, even if connections were left open,
    and removes the scratch directories."""
    for vfs in list(_registered.values()):
        for replica in vfs.replicas():
            writer = replica.writer
            if writer is not None and not writer.buffer.in_transaction:
                try:
                    writer.close()  # final sync; the buffer goes only if all of it was synced
                except LitestreamError:
                    pass  # logged by close(); the buffer is kept
        if vfs._tmpdir is not None:
            remove_scratch_dir(vfs._tmpdir)  # a journal still open there stays usable (POSIX)


def _add_functions(con: apsw.Connection) -> None:
    # APSW names a non-VFSFile file by its class; that is how we know the main db is ours.
    if con.open_vfs not in _registered and \
            LitestreamFile.__qualname__ not in (con.vfsname("main") or ""):
        return

    def pragma(name: str, value: str | None = None):
        sql = f"PRAGMA {name}" if value is None else f"PRAGMA {name} = {_quote(value)}"
        rows = con.execute(sql).fetchall()
        return rows[0][0] if rows else None

    con.create_scalar_function("litestream_time", lambda: pragma("litestream_time"), 0)
    con.create_scalar_function("litestream_txid", lambda: pragma("litestream_txid"), 0)
    con.create_scalar_function("litestream_lag", lambda: int(pragma("litestream_lag")), 0)
    con.create_scalar_function(
        "litestream_set_time", lambda v: (pragma("litestream_time", str(v)), None)[1], 1,
        flags=apsw.SQLITE_DIRECTONLY)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
