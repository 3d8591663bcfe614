"""Write mode: buffered writes synced to object storage as L0 LTX files, one writer, nothing lost.

* SQLite's writes go to the :class:`~ltxvfs.buffer.WriteBuffer` (a local log, fsynced when SQLite
  syncs). Reads see buffered pages first.
* Every ``sync_interval`` (and on clean close) the committed pages become one L0 file with the next
  TXID, uploaded with a conditional PUT (``If-None-Match: *``; an exclusive create on file://), so
  two writers can never both commit the same TXID. After the upload the page index points at the
  new file (the writer's own reads stay correct after every sync) and the buffer is rebased.
* A remote that moved on is a :class:`~ltxvfs.errors.ConflictError`: nothing is overwritten, the
  buffer is kept, and further writes are refused until someone resolves it.
* After a crash, reopening recovers the committed records of the buffer and syncs them if the
  remote is still where the buffer started (or at our own interrupted upload); otherwise it
  refuses with a ConflictError naming the buffer file, which stays where it is.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from .buffer import RECORDS_START, Scan, WriteBuffer, replica_id
from .compact import Compactor
from .errors import ConflictError, LitestreamError, ObjectExistsError
from .follow import Replica
from .ltx import Encoder, Header, lock_pgno
from .pages import FileIndex
from .storage.base import FileInfo, format_txid

log = logging.getLogger("ltxvfs.writer")


def default_buffer_path(identity: str) -> Path:
    """A stable private place per replica (its ``identity``: however the URL was spelled), so a
    restarted process finds its buffer."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    base = Path(state) if os.access(os.path.dirname(state) or "/", os.W_OK) else \
        Path(tempfile.gettempdir()) / f"ltxvfs-{os.getuid()}"
    return base / "ltxvfs" / "buffers" / f"{replica_id(identity):016x}.buffer"


class Writer:
    """The write side of one replica. Thread-safe."""

    def __init__(self, replica: Replica, buffer_path: Path) -> None:
        self.replica = replica
        self.client = replica.client
        self.buffer = WriteBuffer(buffer_path, replica_id(replica.client.identity))
        self._sync_lock = threading.Lock()
        self.conflict: ConflictError | None = None
        self.last_error: str | None = None
        self.syncs = 0
        self.conflicts = 0
        self.synced_txid: int | None = None
        #: Commits that changed the buffer since this writer opened (views count them, view.py).
        self.commits_made = 0
        self.closed = False
        #: Compaction jobs run by the VFS's scheduler while writing (set by the VFS).
        self.compactor: Compactor | None = None

    # --- opening and recovery -------------------------------------------------------------------

    def open(self) -> None:
        """Open the buffer; recover what a crashed process left in it. Raises ConflictError."""
        found = self.buffer.open()
        state = self.replica.state
        if found is None:
            self.buffer.reset(state.txid, state.commit, state.page_size)
            return
        try:
            self._recover(found)
        except BaseException:
            self.buffer.close()
            raise

    def _recover(self, found: Scan) -> None:
        state = self.replica.state
        remote = state.txid
        base, keep_from = found.base_txid, RECORDS_START
        if found.sync is not None and remote >= found.sync.txid and self._is_our_upload(found):
            base, keep_from = found.sync.txid, found.sync.end  # our upload landed before the crash
        left = found.commits_after(keep_from)
        if left == 0:
            self.buffer.reset(remote, state.commit, state.page_size)
            return
        if remote != base:
            raise ConflictError(
                f"write buffer {self.buffer.path} holds {left} unsynced commit(s) made on TXID "
                f"{format_txid(base)}, but the replica is now at TXID {format_txid(remote)}; "
                "the buffer is kept, nothing was overwritten: move it away to discard it")
        log.warning("recovering %d unsynced commit(s) from %s on TXID %s", left,
                    self.buffer.path, format_txid(base))
        self.buffer.adopt(found, base, state.commit, keep_from)

    def _is_our_upload(self, found: Scan) -> bool:
        sync = found.sync
        assert sync is not None
        return self._our_upload(sync.txid, sync.checksum) is not None

    def _our_upload(self, txid: int, checksum: int) -> FileInfo | None:
        """The L0 file ``txid`` if it is the one we uploaded (same file checksum), else None."""
        files = [f for f in self.client.list_files(0, seek=txid) if f.min_txid == txid]
        if not files:
            return None
        f = files[0]
        trailer = self.client.read(0, f.min_txid, f.max_txid, f.size - 8, 8)
        return f if int.from_bytes(trailer, "big") == checksum else None

    # --- what the VFS file calls ----------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return self.buffer.page_size or self.replica.state.page_size

    def size_pages(self) -> int:
        return self.buffer.size_pages()

    def read_page(self, pgno: int) -> bytes | None:
        return self.buffer.read_page(pgno)

    def check_writable(self) -> None:
        """Called when a connection starts a write transaction."""
        if self.conflict is not None:
            raise self.conflict
        if self.closed:
            raise LitestreamError("write mode was turned off for this database")

    def write_page(self, pgno: int, data: bytes) -> None:
        if self.page_size and pgno == lock_pgno(self.page_size):
            raise LitestreamError(f"cannot write to lock page: pgno={pgno}")
        self.buffer.write_page(pgno, data)

    def truncate(self, size_pages: int) -> None:
        self.buffer.truncate(size_pages)

    def commit(self, fsync: bool) -> None:
        if self.buffer.commit(fsync):
            self.commits_made += 1

    # --- syncing --------------------------------------------------------------------------------

    def sync(self) -> int | None:
        """Upload committed pages as the next TXID. Returns it (None if nothing to sync).
        Raises ConflictError if the replica moved on; other errors leave everything in the
        buffer for the next try."""
        with self._sync_lock:
            if self.conflict is not None:
                raise self.conflict
            if not self.buffer.has_unsynced:
                return None
            try:
                txid = self._sync()
            except ConflictError as err:
                self.conflict = err
                self.conflicts += 1
                self.last_error = str(err)
                log.error("%s", err)
                raise
            except LitestreamError as err:
                self.last_error = str(err)
                log.warning("sync of %s failed (will retry): %s", self.client.url, err)
                raise
            self.last_error = None
            self.syncs += 1
            self.synced_txid = txid
            return txid

    def sync_in_background(self) -> None:
        """The periodic job: errors are kept in ``last_error``, never raised."""
        try:
            self.sync()
        except LitestreamError:
            pass

    def _sync(self) -> int:
        pages, end = self.buffer.snapshot()
        state = self.replica.state
        base = self.buffer.base_txid
        txid = base + 1
        newer = self.client.list_files(0, seek=txid)
        if newer:
            raise ConflictError(
                f"remote has newer transactions than expected: expected TXID {format_txid(base)} "
                f"but remote has {format_txid(newer[-1].max_txid)}; unsynced commits are kept "
                f"in {self.buffer.path}")
        page_size = self.page_size
        commit = pages.size if pages.size is not None else state.commit
        lock = lock_pgno(page_size)
        pgnos = sorted(p for p in pages.offsets if p <= commit and p != lock)
        if txid == 1 and len(pgnos) != commit - (1 if commit >= lock else 0):
            raise LitestreamError("the first sync of a new database must hold every page")
        now = int(time.time() * 1000)
        header = Header(page_size=page_size, commit=commit, min_txid=txid, max_txid=txid,
                        timestamp=now)
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
            enc = Encoder(spool, header)
            written: dict[int, bytes] = {}  # seeds the cache: at most what it can hold
            room = self.replica.store.cache.capacity // max(page_size, 1)
            for pgno in pgnos:
                data = self.buffer.read_committed(pages, pgno)
                enc.write_page(pgno, data)
                if len(written) < room:
                    written[pgno] = data
            trailer = enc.close()
            index = enc.index
            self.buffer.mark_sync(txid, end, trailer.file_checksum)
            spool.seek(0)
            try:
                info = self.client.write(0, txid, txid, spool, now, exclusive=True)
            except ObjectExistsError as err:
                # Our own PUT may have been applied with its answer lost (a 500 or a reset after
                # the write, then botocore's retry meets the precondition): ours if the stored
                # file carries our checksum.
                info = self._our_upload(txid, trailer.file_checksum)
                if info is None:
                    raise ConflictError(
                        f"another writer committed TXID {format_txid(txid)} first; unsynced "
                        f"commits are kept in {self.buffer.path}") from err
        self._installed(info, header, index, written, commit)
        self.buffer.synced(txid, end, commit)
        log.debug("synced %d page(s) as TXID %s", len(pgnos), format_txid(txid))
        return txid

    def _installed(self, info: FileInfo, header: Header, index: dict[int, tuple[int, int]],
                   written: dict[int, bytes], commit: int) -> None:
        """Point the page index at the file just uploaded and cache its pages, before the buffer
        lets go of them — so no read ever falls back to an older version."""
        state = self.replica.state
        if not state.page_size:  # a new database: its first file defines the page size
            from dataclasses import replace

            state = replace(state, page_size=header.page_size)
        fi = FileIndex(info, index, header, written)
        self.replica.store.seed([fi])
        self.replica.set_state(state.applying([fi], commit))

    # --- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Final sync; the buffer is deleted only when everything in it reached the replica."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.buffer.has_unsynced and not self.buffer.in_transaction:
                self.sync()
        except LitestreamError as err:
            log.error("final sync of %s failed; unsynced commits stay in %s: %s",
                      self.client.url, self.buffer.path, err)
            self.buffer.close()
            raise
        if self.buffer.has_unsynced or self.buffer.in_transaction:
            self.buffer.close()
        else:
            self.buffer.remove()
