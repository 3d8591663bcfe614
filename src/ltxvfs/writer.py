"""Write mode: buffered writes synced to object storage as L0 LTX files, one writer, nothing lost.

* SQLite's writes go to the :class:`~ltxvfs.buffer.WriteBuffer` (a local log, fsynced when SQLite
  syncs). Reads see buffered pages first.
* Every ``sync_interval`` (and on clean close) the committed pages become one L0 file with the next
  TXID, uploaded with a conditional PUT (``If-None-Match: *``; an exclusive create on file://), so
  two writers can never both commit the same TXID. After the upload the page index points at the
  new file (the writer's own reads stay correct after every sync) and the buffer is rebased.
* A remote that moved on is a :class:`~ltxvfs.errors.ConflictError`: nothing is overwritten, the
  buffer is kept, and further writes are refused until someone resolves it.
* An upload that may have landed although it failed (its answer lost) is recognised later by
  the file checksum its SYNC mark recorded — at the next sync as after a crash — and taken as
  ours. Its retry, while no commit was added, is the very same file (same timestamp), so a
  conditional PUT that meets the first one knows it.
* After a crash, reopening recovers the committed records of the buffer and syncs them if the
  remote is still where the buffer started (or at our own interrupted upload); otherwise it
  refuses with a ConflictError naming the buffer file, which stays where it is.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from .buffer import RECORDS_START, Scan, SyncMark, WriteBuffer, replica_id
from .compact import Compactor
from .errors import ConflictError, LitestreamError, ObjectExistsError, WriteBufferError
from .follow import Replica
from .ltx import Encoder, Header, lock_pgno
from .pages import FileIndex, fetch_file_index
from .storage.base import FileInfo, format_txid

log = logging.getLogger("ltxvfs.writer")


def default_buffer_path(identity: str) -> Path:
    """A stable private place per replica (its ``identity``: however the URL was spelled), so a
    restarted process finds its buffer: ``$XDG_STATE_HOME`` (its parent writable), else
    ``~/.local/state`` (home writable), else the temp dir — with a WARNING, since a temp dir may
    not survive a reboot, and refused if our directory there is not ours alone."""
    name = Path("ltxvfs") / "buffers" / f"{replica_id(identity):016x}.buffer"
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.access(os.path.dirname(xdg.rstrip("/")) or "/", os.W_OK):
        return Path(xdg) / name
    home = os.path.expanduser("~")
    if home != "~" and os.path.isdir(home) and os.access(home, os.W_OK):
        return Path(home) / ".local" / "state" / name
    base = Path(tempfile.gettempdir()) / f"ltxvfs-{os.getuid()}"
    try:
        st = os.lstat(base)
    except FileNotFoundError:
        pass
    else:  # a predictable name in a shared directory: someone else may have made it first
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise WriteBufferError(f"{base} is not a private directory of this user (owner, mode or "
                              "type): set buffer_path or XDG_STATE_HOME to a durable directory")
    log.warning("write buffers go to %s: a temp directory may not survive a reboot (commits "
                "not yet synced would be lost with it); set buffer_path or XDG_STATE_HOME to a "
                "durable directory", base / "ltxvfs" / "buffers")
    return base / name


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
        #: (TXID, buffer end, timestamp) of the last upload attempt: a retry of the same
        #: commits reuses the timestamp, so it encodes the same file.
        self._attempt: tuple[int, int, int] | None = None

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
        if found.marks and remote > base:
            landed = self._landed(self.client.list_files(0, seek=base + 1), base + 1, found.marks)
            if landed is not None:  # our upload landed before the crash
                base, keep_from = landed[1].txid, landed[1].end
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

    def _landed(self, files: list[FileInfo], txid: int, marks: list[SyncMark]
                ) -> tuple[FileInfo, SyncMark] | None:
        """Our own upload of ``txid``, if the listing ``files`` (L0 from ``txid`` on) starts with
        it: the file whose checksum one of our SYNC marks for ``txid`` recorded."""
        ours = {m.checksum: m for m in marks if m.txid == txid}
        if not files or not ours or (files[0].min_txid, files[0].max_txid) != (txid, txid):
            return None
        f = files[0]
        trailer = self.client.read(0, f.min_txid, f.max_txid, f.size - 8, 8)
        mark = ours.get(int.from_bytes(trailer, "big"))
        return None if mark is None else (f, mark)

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

    def rollback(self) -> None:
        """SQLite ended a write transaction without committing it (ROLLBACK, or an error)."""
        self.buffer.rollback()

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
        while True:
            txid = self.buffer.base_txid + 1
            newer = self.client.list_files(0, seek=txid)
            if newer:
                self._take_landed(self._landed(newer, txid, self.buffer.marks), (
                    f"remote has newer transactions than expected: expected TXID "
                    f"{format_txid(txid - 1)} but remote has {format_txid(newer[-1].max_txid)}"))
            elif self._upload(txid):
                return txid
            if not self.buffer.has_unsynced:
                return txid
            # Our earlier upload landed: the commits after it go up as the next TXID.

    def _take_landed(self, landed: tuple[FileInfo, SyncMark] | None, conflict: str) -> None:
        """Install ``landed``, our own earlier upload whose answer was lost, and rebase the
        buffer after the commits it holds. None (the file is another writer's): ConflictError,
        with ``conflict`` as the reason."""
        if landed is None:
            raise ConflictError(f"{conflict}; unsynced commits are kept in {self.buffer.path}")
        info, mark = landed
        log.warning("our upload of TXID %s had landed (its answer was lost); taking it",
                    format_txid(mark.txid))
        fi = fetch_file_index(self.client, info, want_header=True)
        assert fi.header is not None
        self._installed(fi, fi.header.commit)
        self.buffer.synced(mark.txid, mark.end, fi.header.commit)
        self._attempt = None

    def _upload(self, txid: int) -> bool:
        """Upload the committed pages as ``txid``. True when done; False when the conditional PUT
        met an earlier attempt of ours instead (taken: the caller goes on from there)."""
        pages, end = self.buffer.snapshot()
        page_size = self.page_size
        commit = pages.size  # the buffer's own size: never a (possibly stale) replica state's
        assert commit is not None
        lock = lock_pgno(page_size)
        # Pages past the base's size that no record holds are a hole SQLite left: it grows the
        # file by writing its last page only, and pages allocated and freed in one transaction
        # are never written. A file reads them as zeros; the LTX file must hold them so.
        holes = [p for p in range(self.buffer.base_size + 1, commit + 1)
                 if p not in pages.offsets and p != lock]
        pgnos = sorted([p for p in pages.offsets if p <= commit and p != lock] + holes)
        if txid == 1 and len(pgnos) != commit - (1 if commit >= lock else 0):
            raise LitestreamError("the first sync of a new database must hold every page")
        if self._attempt is not None and self._attempt[:2] == (txid, end):
            now = self._attempt[2]  # a retry of the same commits: the very same file
        else:
            now = int(time.time() * 1000)
            self._attempt = (txid, end, now)
        header = Header(page_size=page_size, commit=commit, min_txid=txid, max_txid=txid,
                        timestamp=now)
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
            enc = Encoder(spool, header)
            written: dict[int, bytes] = {}  # seeds the cache: at most what it can hold
            room = self.replica.store.cache.capacity // max(page_size, 1)
            zeros = bytes(page_size)
            for pgno in pgnos:
                data = self.buffer.read_committed(pages, pgno) if pgno in pages.offsets else zeros
                enc.write_page(pgno, data)
                if len(written) < room:
                    written[pgno] = data
            mark = SyncMark(txid, end, enc.close().file_checksum)
            if mark not in self.buffer.marks:
                self.buffer.mark_sync(mark.txid, mark.end, mark.checksum)
            spool.seek(0)
            try:
                info = self.client.write(0, txid, txid, spool, now, exclusive=True)
            except ObjectExistsError:
                # Our own PUT may have been applied with its answer lost (a 500 or a reset after
                # the write, then botocore's retry meets the precondition): ours if the stored
                # file carries the checksum of one of our attempts.
                landed = self._landed(self.client.list_files(0, seek=txid), txid,
                                      self.buffer.marks)
                if landed is None or landed[1] != mark:  # another's, or an earlier attempt
                    self._take_landed(landed, f"another writer committed TXID "
                                              f"{format_txid(txid)} first")
                    return False
                info = landed[0]
        self._installed(FileIndex(info, enc.index, header, written), commit)
        self.buffer.synced(txid, end, commit)
        self._attempt = None
        log.debug("synced %d page(s) as TXID %s", len(pgnos), format_txid(txid))
        return True

    def _installed(self, fi: FileIndex, commit: int) -> None:
        """Point the page index at the file just uploaded and cache its pages, before the buffer
        lets go of them — so no read ever falls back to an older version. Applied onto whatever
        state is current, atomically: a reader's recover() may relocate it meanwhile."""
        assert fi.header is not None
        self.replica.store.seed([fi])
        while True:
            current = self.replica.state
            base = current
            if not base.page_size:  # a new database: its first file defines the page size
                base = replace(base, page_size=fi.header.page_size)
            if self.replica.replace_state(current, base.applying([fi], commit)):
                return

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
