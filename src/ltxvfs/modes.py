"""Write mode on and off for a replica, while connections read and write it.

Turning it on opens (and recovers) the replica's write buffer after a strict poll, stops
polling and schedules syncs and compaction; turning it off syncs, waits for the transactions
that use the buffer to end (holding new ones back), detaches the writer and polls again. Both
happen under the replica's ``mode_lock`` (one switch at a time: never two writers) and install
or detach the writer under the lock table's mutex, where connections choose their views
(view.py): a read transaction never sees the switch half-way.

A mixin of :class:`ltxvfs.vfs.LitestreamVFS`, which provides the settings per replica
(``_configs``, ``_adopt``), ``_buffer_paths``, ``_lock``, ``scheduler`` and polling.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import apsw

from .compact import Compactor
from .config import WRITE_SETTINGS, VFSConfig
from .errors import ConfigError
from .singlewriter import check_store
from .writer import Writer, default_buffer_path

if TYPE_CHECKING:
    from .follow import Replica

log = logging.getLogger("ltxvfs")

#: How long closing (or switching modes) waits for a background run in progress to finish: a
#: compaction or sync may take a while and must not lose its storage client half-way.
JOB_STOP_WAIT = 30.0
#: How long turning write mode off waits for transactions that write or read the buffer to end
#: (new ones are held back meanwhile, as SQLite's PENDING lock does).
DISABLE_WAIT = 5.0


class WriteModes:
    """``enable_writes`` / ``disable_writes`` and the writer's background jobs."""

    def enable_writes(self, replica: Replica, cfg: VFSConfig | None = None) -> None:
        """Turn write mode on for ``replica``: open (and recover) its buffer, stop polling, sync
        every ``sync_interval``. Raises ConflictError when a crashed buffer cannot be applied.
        Connections already inside a read transaction keep their view until it ends."""
        cfg = cfg or self._configs.get(id(replica), self.config)
        with replica.mode_lock:  # one switch at a time: never two writers for one replica
            if replica.writer is not None:
                return
            check_store(replica.client, cfg.single_writer)  # UnsafeStoreError (issue 16)
            self._adopt(replica, cfg, WRITE_SETTINGS)
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

