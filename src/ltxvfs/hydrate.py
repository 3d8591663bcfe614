"""Hydration: a background thread builds a full local copy of the database, then keeps it current.

The first pass writes the newest version of every page of the current state — each page fetched
once, from the newest file that has it — with parallel ranged GETs that coalesce adjacent frames
(up to ``RUN_BYTES`` per GET, ``PARALLEL`` GETs in flight: memory stays bounded). Then it catches
up: while the replica's latest state moved on (polls in read mode, our own syncs in write mode),
the pages whose frame changed are written and the file is cut to the new size. Only when the file
equals the latest state is it marked as that state; reads of exactly that state then come from
the file with plain positional reads (the OS page cache does the rest). Reads never wait for it.

Who may write the file, and when (the invariant reads rely on): ``state`` — what reads may use —
is cleared, under the lock reads take, before any write for a new target starts, and set only
after every write for that target has finished. Every fetch task submitted for a target is
waited for (queued ones cancelled) on every way out of ``_hydrate``: success, failure, stop. The
descriptor is closed only when no task can write to it any more: ``close()`` waits for the
thread (which waits for its tasks); if that wait runs out, the thread closes it when it ends.

A hydration file belongs to one process: an exclusive ``flock`` on the file itself, taken before
anything is written. A second process (or a second VFS in this one) given the same path logs a
WARNING, reads remotely and never writes or deletes the file; its progress says ``failed: ...
in use by another process``. (One copy shared by a host's processes is a later design.)

On close the file is deleted, unless ``persistent``: then it stays with ``<file>.meta`` (TXID and
the checksum of the LTX file that ended at it), and the next open resumes from it if the replica
still holds that very file, else starts over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from .errors import LitestreamError, ObjectNotFoundError
from .follow import Replica
from .gcpause import paused_gc
from .ltx import decode_page_frame, lock_pgno
from .pages import DatabaseState, PageRef, frame_key, state_at

log = logging.getLogger("ltxvfs.hydrate")

#: Bytes of frames fetched by one ranged GET, and GETs in flight, during hydration.
RUN_BYTES = 2 * 1024 * 1024
PARALLEL = 8
_IOV_MAX = 1024
#: How long close() waits for the hydration thread and its fetch tasks to finish; past that the
#: thread closes (and removes) the file itself once its last task has finished.
CLOSE_WAIT = 30.0


class Hydrator:
    def __init__(self, replica: Replica, path: Path, persistent: bool,
                 pool: ThreadPoolExecutor) -> None:
        self.replica = replica
        self.path = Path(path)
        self.persistent = persistent
        self._pool = pool
        self._fd = -1
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._stop = False
        #: The state the file equals (reads of exactly this state use the file); None while
        #: the file is being built or catching up.
        self.state: DatabaseState | None = None
        self._written: DatabaseState | None = None  # what the file holds so far
        #: Pages an unfinished attempt may have written beyond ``_written``: rewritten next time.
        self._unsure: set[int] = set()
        self._life = threading.Lock()  # decides who closes the descriptor: close() or the thread
        self._finished = False  # the thread has ended (and with it every fetch task)
        self._orphaned = False  # close() stopped waiting: the thread closes the file at its end
        self.done_pages = 0
        self.total_pages = 0
        self.fetched_pages = 0  # pages that needed a GET (not in the page cache)
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="ltxvfs-hydrate", daemon=True)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Open and lock the file, then hydrate in the background. A file another process
        holds is left alone: reads stay remote and ``progress()`` says why."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = _open_owned(self.path)
        if fd is None:
            self.error = f"hydration file {self.path} is in use by another process; reads stay remote"
            log.warning("%s (each process needs a hydration path of its own for a local copy)",
                        self.error)
            return
        self._fd = fd
        self.replica.listeners.append(self._changed)
        self._thread.start()

    def close(self) -> None:
        """Stop, wait for every writer of the file, then close it (and remove it unless it is
        kept). If the thread does not finish within ``CLOSE_WAIT`` (a GET hanging), the file is
        left to it: it closes and removes the file when its last task has finished."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._changed in self.replica.listeners:
            self.replica.listeners.remove(self._changed)
        if self._thread.ident is not None:
            self._thread.join(timeout=CLOSE_WAIT)
        with self._life:
            if self._thread.ident is not None and not self._finished:
                self._orphaned = True
                log.warning("hydration into %s still busy after %gs; the file is closed and "
                            "removed when its last fetch ends", self.path, CLOSE_WAIT)
                return
        self._release(may_keep=True)

    def _release(self, may_keep: bool) -> None:
        """Close the descriptor: no writer is left. Persist or remove the file first, while we
        still hold it."""
        with self._lock:
            state, self.state = self.state, None
            if self._fd < 0:
                return
            keep = may_keep and self.persistent and state is not None and self.error is None
            if keep:
                try:
                    os.fsync(self._fd)
                    self._write_meta(state)
                except (LitestreamError, OSError) as err:
                    log.error("cannot keep hydration file %s: %s", self.path, err)
                    keep = False
            if not keep:
                self.path.unlink(missing_ok=True)
                self._meta_path().unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1

    def _thread_ended(self) -> None:
        with self._life:
            self._finished = True
            orphaned = self._orphaned
        if orphaned:
            self._release(may_keep=False)

    def _changed(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # --- reads ----------------------------------------------------------------------------------

    def read_page(self, state: DatabaseState, pgno: int) -> bytes | None:
        """The page from the file if the file equals ``state``, else None."""
        if self.state is not state or not state.page_size:
            return None
        with self._lock:
            if self.state is not state or self._fd < 0:
                return None
            data = os.pread(self._fd, state.page_size, (pgno - 1) * state.page_size)
        return data if len(data) == state.page_size else None

    def progress(self) -> str:
        """``100.0`` exactly when reads of the latest state use the file: while it catches up
        with a newer transaction (reads of that are remote meanwhile) it says ``99.9``."""
        if self.error is not None:
            return f"failed: {self.error}"
        state = self.state
        if state is not None and state is self.replica.state:
            return "100.0"
        if not self.total_pages:
            return "0.0"
        return f"{min(99.9, 100.0 * self.done_pages / self.total_pages):.1f}"

    # --- the background work --------------------------------------------------------------------

    def _mark(self, state: DatabaseState | None) -> None:
        """Say what the file equals (None: nothing reads may use), under the lock reads take."""
        with self._lock:
            self.state = state

    def _run(self) -> None:
        try:
            self._written = self._resume()
            lost = 0
            while not self._stop:
                target = self.replica.state
                if target is not self._written:
                    self._mark(None)  # before the first write for a new target
                    try:
                        if not self._hydrate(target):
                            break  # stopped
                    except ObjectNotFoundError:
                        # Retention removed a file of the target: find its pages elsewhere.
                        lost += 1
                        if lost > 5 or self.replica.recover(target) is None and lost > 2:
                            raise
                        continue
                    self._written = target
                    continue  # the replica may have moved on meanwhile
                self._mark(target)  # every write for it has finished
                with self._wake:
                    if self.replica.state is target and not self._stop:
                        self._wake.wait(timeout=5)
        except (LitestreamError, OSError) as err:
            self.error = str(err)
            self._mark(None)
            log.error("hydration of %s into %s failed; reads stay remote: %s",
                      self.replica.client.url, self.path, err)
        finally:
            self._thread_ended()

    def _hydrate(self, target: DatabaseState) -> bool:
        """Write every page whose frame differs from what the file holds; cut to size. True when
        the file equals ``target``, False when stopped. Returns or raises only once no fetch
        task of this attempt is queued or running."""
        if not target.page_size:
            return True
        old = self._written
        if old is not None and old.page_size not in (0, target.page_size):
            old = None
        unsure = self._unsure
        todo = _todo(target, old, unsure)
        self.total_pages = len(todo) if old is None else self.total_pages
        self.done_pages = 0 if old is None else self.done_pages
        runs = _runs(target, todo)
        if old is not None:  # (with no base, a failed attempt is redone whole anyway)
            unsure.update(todo)  # until this attempt completes, these pages may hold anything
        inflight: set[Future[None]] = set()
        try:
            for run in runs:
                while len(inflight) >= PARALLEL:
                    _, inflight = _first_done(inflight)
                if self._stop:
                    return False
                inflight.add(self._pool.submit(self._fetch_run, target, run))
            while inflight:
                _, inflight = _first_done(inflight)
        finally:
            # A cancelled task never runs; the others are waited for: nothing of this attempt
            # writes after we leave. (wait() on a cancelled one would wait for the pool to
            # dequeue it, behind whatever else it runs.)
            wait([f for f in inflight if not f.cancel()])
        if self._stop:
            return False  # tasks may have skipped their writes
        lock = lock_pgno(target.page_size)
        with self._lock:
            if target.commit >= lock:
                os.pwrite(self._fd, bytes(target.page_size), (lock - 1) * target.page_size)
            os.ftruncate(self._fd, target.commit * target.page_size)
        unsure.clear()
        return True

    def _fetch_run(self, state: DatabaseState, run: list[tuple[int, PageRef]]) -> None:
        if self._stop:
            return
        info, start = run[0][1][0], run[0][1][1]
        end = run[-1][1][1] + run[-1][1][2]
        store = self.replica.store
        cached = [store.peek_page(frame_key(info, r[1]), state.page_size) for _, r in run]
        if all(c is not None for c in cached):  # e.g. our own sync seeded them
            pages = list(cached)
        else:
            data = memoryview(self.replica.client.read(info.level, info.min_txid, info.max_txid,
                                                        start, end - start))
            pages = [decode_page_frame(data[off - start:off - start + size], state.page_size, pgno)
                     for pgno, (_, off, size) in run]
            self.fetched_pages += len(run)
        if self._stop:  # closing: the file is about to be closed or removed
            return
        _write_pages(self._fd, state.page_size, [p for p, _ in run], pages)
        self.done_pages += len(run)

    # --- persistence ------------------------------------------------------------------------------

    def _meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta")

    def _write_meta(self, state: DatabaseState) -> None:
        last = max((ref[0] for ref in state.index.values()), key=lambda f: f.max_txid, default=None)
        if last is None:
            return
        trailer = self.replica.client.read(last.level, last.min_txid, last.max_txid,
                                           last.size - 8, 8)
        meta = {"txid": f"{state.txid:016x}", "page_size": state.page_size,
                "commit": state.commit, "file": [last.level, last.min_txid, last.max_txid],
                "checksum": trailer.hex()}
        tmp = self._meta_path().with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._meta_path())

    def _resume(self) -> DatabaseState | None:
        """The state a persistent file still equals, or None (start over)."""
        meta_path = self._meta_path()
        if not self.persistent or not meta_path.exists():
            os.ftruncate(self._fd, 0)
            return None
        try:
            meta = json.loads(meta_path.read_text())
            level, lo, hi = meta["file"]
            files = [f for f in self.replica.client.list_files(level, seek=lo)
                     if (f.min_txid, f.max_txid) == (lo, hi)]
            same = files and self.replica.client.read(
                level, lo, hi, files[0].size - 8, 8).hex() == meta["checksum"]
            if not same:
                raise LitestreamError("the replica no longer holds the file it was built from")
            state = state_at(self.replica.client, self._pool, txid=int(meta["txid"], 16))
        except (LitestreamError, OSError, ValueError, KeyError) as err:
            log.info("hydration file %s cannot be resumed (%s); starting over", self.path, err)
            meta_path.unlink(missing_ok=True)
            os.ftruncate(self._fd, 0)
            return None
        log.info("resuming hydration file %s at TXID %016x", self.path, state.txid)
        self.total_pages = self.done_pages = state.commit
        return state


def _open_owned(path: Path) -> int | None:
    """The file at ``path`` (created if missing), opened and exclusively locked, or None if
    another open of it holds the lock. A file its previous owner removed between our open and
    our lock is not at ``path`` any more (the lock would guard nothing): open again. An owner
    removes the file before it lets go of the lock, so the file at ``path`` has one owner."""
    for _ in range(8):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                here = os.stat(path)
            except FileNotFoundError:
                here = None
            mine = os.fstat(fd)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if here is not None and (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "the file keeps being replaced while we lock it", str(path))


def _first_done(futures: set[Future[None]]) -> tuple[set[Future[None]], set[Future[None]]]:
    """Wait until one of ``futures`` is done; raise its error, if any. (done, still pending)"""
    done, pending = wait(futures, return_when=FIRST_COMPLETED)
    for f in done:
        f.result()
    return done, pending


def _write_pages(fd: int, page_size: int, pgnos: list[int], pages: list[bytes]) -> None:
    """Write pages at their places, consecutive ones in one ``pwritev`` (a 200 MB database is
    50,000 pages: one system call each would be most of hydration's CPU time)."""
    i = 0
    while i < len(pgnos):
        j = i + 1
        while j < len(pgnos) and pgnos[j] == pgnos[j - 1] + 1 and j - i < _IOV_MAX:
            j += 1
        offset = (pgnos[i] - 1) * page_size
        want = (j - i) * page_size
        done = os.pwritev(fd, pages[i:j], offset)
        if done != want:  # a short write: finish it plainly (rare; raises on a full disk)
            data = b"".join(pages[i:j])[done:]
            while data:
                n = os.pwrite(fd, data, offset + done)
                data, done = data[n:], done + n
        i = j


def _todo(target: DatabaseState, old: DatabaseState | None, unsure: set[int]) -> list[int]:
    """Pages of ``target`` to write over a file that holds ``old`` (plus ``unsure`` pages): those
    whose frame moved. With a shared base index, only the pages of the layers the two states do
    not share are compared (O(pages changed)); else every page."""
    if old is None:
        return list(target.index)
    candidates = target.index.changed(old.index)
    if candidates is None:
        return sorted(p for p, ref in target.index.items()
                      if p in unsure or _moved(old.index.get(p), ref))
    get = target.index.get
    return sorted(p for p in candidates | unsure
                  if (ref := get(p)) is not None and (p in unsure or _moved(old.index.get(p), ref)))


def _moved(old: PageRef | None, new: PageRef) -> bool:
    """The page's newest frame is another one (names alone do not say: a replaced history
    reuses them)."""
    return old is None or frame_key(old[0], old[1]) != frame_key(new[0], new[1])


def _runs(state: DatabaseState, pgnos: list[int]) -> list[list[tuple[int, PageRef]]]:
    """Group pages into GETs: frames adjacent in the same file, up to RUN_BYTES each."""
    index = state.index
    # Keyed by the FileInfo object (one per file in a state; identity, not its field-by-field
    # hash) with the collector paused: this walks every page of the database.
    by_file: dict[int, list[tuple[int, PageRef]]] = {}
    with paused_gc():
        for p in pgnos:
            ref = index[p]
            group = by_file.get(id(ref[0]))
            if group is None:
                group = by_file[id(ref[0])] = []
            group.append((p, ref))
    runs: list[list[tuple[int, PageRef]]] = []
    for items in by_file.values():
        items.sort(key=lambda x: x[1][1])
        run: list[tuple[int, PageRef]] = []
        for item in items:
            ref = item[1]
            if run and (ref[1] != run[-1][1][1] + run[-1][1][2]
                        or ref[1] + ref[2] - run[0][1][1] > RUN_BYTES):
                runs.append(run)
                run = []
            run.append(item)
        if run:
            runs.append(run)
    return runs
