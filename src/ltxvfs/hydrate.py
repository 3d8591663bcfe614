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

One copy per host (host/sharedcopy.py): every process given the same path uses the same file.
The first to take the builder lock builds it and keeps it current; it publishes what the file
holds in the shared record (a seqlock), through which the other processes read the file — only
pages of exactly their own state, never while the builder writes. They try to take the builder
lock on each wake of their thread (a state change, or every ``TAKEOVER_INTERVAL``); when the
builder exits or dies, one of them takes it and resumes from what the record says the file
holds: the state it equals (if the replica still holds the LTX file that state ended with), or
the target it was being built for and which pages of it were written. The last process out
deletes the file, unless ``persistent``; a persistent file is fsynced first and marked synced.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from .errors import LitestreamError, ObjectNotFoundError
from .follow import Replica
from .gcpause import paused_gc
from .host.sharedcopy import Record, SharedCopy, identity
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
#: How often a process that reads another process's copy tries to take over building it (one
#: non-blocking ``flock``); it also tries whenever its replica's state changes.
TAKEOVER_INTERVAL = 1.0


class Hydrator:
    def __init__(self, replica: Replica, path: Path, persistent: bool,
                 pool: ThreadPoolExecutor) -> None:
        self.replica = replica
        self.path = Path(path)
        self.persistent = persistent
        self._pool = pool
        self.copy = SharedCopy(self.path, replica.key)
        self._fd = -1  # the builder's writable descriptor
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._stop = False
        #: The state the file equals, while this process builds it (reads of exactly this state
        #: use the file); None while the file is being built or catching up.
        self.state: DatabaseState | None = None
        self._written: DatabaseState | None = None  # what the file holds so far
        #: Pages an unfinished attempt may have written beyond ``_written``: rewritten next time.
        self._unsure: set[int] = set()
        self._bits = bytearray()  # the record's bitmap of the target being written
        self._bits_lock = threading.Lock()
        self._ident: tuple[DatabaseState | None, bytes] = (None, b"")
        self._life = threading.Lock()  # decides who closes the descriptor: close() or the thread
        self._finished = False  # the thread has ended (and with it every fetch task)
        self._orphaned = False  # close() stopped waiting: the thread closes the file at its end
        #: "builder" (this process writes the copy), "reader" (another one does), "" not started.
        self.role = ""
        self.takeovers = 0  # times this process took over building from another one
        self.done_pages = 0
        self.total_pages = 0
        self.fetched_pages = 0  # pages that needed a GET (not in the page cache)
        self.fetched_bytes = 0  # bytes of frames those GETs downloaded
        self.file_reads = 0  # pages served from the copy
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="ltxvfs-hydrate", daemon=True)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Join the copy at the path (raises OSError if it cannot be created), build it if no
        other process does, and work in the background."""
        self.copy.open()
        try:
            if self.copy.other_replica() and not self.copy.try_build():
                self.error = (f"hydration file {self.path} holds a copy of another replica, "
                              "built by another process; reads stay remote")
                log.warning("%s (give each replica a hydration path of its own)", self.error)
                self.copy.close(keep=True)
                return
            if self.copy.builder or self.copy.try_build():
                self._become_builder()
            else:
                self.role = "reader"
                log.info("hydration file %s is built by another process (pid %d); reading it "
                         "when it equals our state", self.path, self.copy.record().pid)
        except BaseException:
            self.copy.close(keep=True)
            raise
        self.replica.listeners.append(self._changed)
        self._thread.start()

    def _become_builder(self) -> None:
        try:
            self._fd = self.copy.open_writable()
        except OSError:
            self.copy.close(keep=True)
            raise
        self.role = "builder"

    def close(self) -> None:
        """Stop, wait for every writer of the file, then close it (the last process out removes
        it unless it is kept). If the thread does not finish within ``CLOSE_WAIT`` (a GET
        hanging), the file is left to it: it closes it when its last task has finished."""
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
                log.warning("hydration into %s still busy after %gs; the file is closed "
                            "when its last fetch ends", self.path, CLOSE_WAIT)
                return
        self._release(may_keep=True)

    def _release(self, may_keep: bool) -> None:
        """Close the descriptors: no writer is left. A kept file is fsynced and marked synced
        first, while we still build it."""
        with self._lock:
            state, self.state = self.state, None
            if self.copy.mfd < 0:
                return
            keep = may_keep and self.persistent
            try:
                if self._fd >= 0 and keep and state is not None and self.error is None:
                    os.fsync(self._fd)
                    self.copy.mark_synced()
            except OSError as err:
                log.error("cannot sync hydration file %s: %s", self.path, err)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            try:
                self.copy.close(keep=keep)
            except OSError as err:
                log.error("cannot remove hydration file %s: %s", self.path, err)

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
        if not state.page_size:
            return None
        if self.state is state:  # we build it, and marked it as this very state
            with self._lock:
                # (no map: a forked child's inherited handle — the parent writes the file)
                if self.state is not state or self._fd < 0 or self.copy.map is None:
                    return None
                data = os.pread(self._fd, state.page_size, (pgno - 1) * state.page_size)
            if len(data) != state.page_size:
                return None
            self.file_reads += 1
            return data
        if not state.txid or self.copy.map is None:
            return None
        cached = self._ident
        if cached[0] is state:
            ident = cached[1]
        else:
            ident = identity(state.txid, state.tip)
            self._ident = (state, ident)
        with self._lock:  # the descriptors stay open while we read
            if self.copy.map is None:
                return None
            data = self.copy.read(state.txid, ident, state.page_size, pgno)
        if data is not None:
            self.file_reads += 1
        return data

    def progress(self) -> str:
        """``100.0`` exactly when reads of the latest state use the file: while it catches up
        with a newer transaction (reads of that are remote meanwhile) it says ``99.9``."""
        if self.error is not None:
            return f"failed: {self.error}"
        latest = self.replica.state
        if self.role != "builder":
            with self._lock:
                rec = self.copy.record() if self.copy.map is not None else None
            if rec is None or not rec.valid:
                return "0.0"
            if rec.complete and rec.txid == latest.txid and \
                    rec.ident == identity(latest.txid, latest.tip):
                return "100.0"
            done, total = rec.done, rec.total
        else:
            state = self.state
            if state is not None and state is latest:
                return "100.0"
            done, total = self.done_pages, self.total_pages
        if not total:
            return "0.0"
        return f"{min(99.9, 100.0 * done / total):.1f}"

    # --- the background work --------------------------------------------------------------------

    def _mark(self, state: DatabaseState | None) -> None:
        """Say what the file equals (None: nothing reads may use), under the lock reads take."""
        with self._lock:
            if state is not None:
                self.copy.publish()
            self.state = state

    def _run(self) -> None:
        try:
            if not self._await_turn():
                return
            self._written = self._resume()
            lost = 0
            while not self._stop:
                target = self.replica.state
                # (a resumed partial build: the file is of ``target`` but for some pages)
                if target is not self._written or self._unsure:
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
            self._stop_building()
        finally:
            self._thread_ended()

    def _stop_building(self) -> None:
        """After a failure (every task of the attempt has ended): let another process of the
        host build (it retries; a full disk fails it too), and read what it publishes."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self.copy.builder:
                self.copy.stop_building()
                self.role = "reader"

    def _await_turn(self) -> bool:
        """Wait (reading through the other process's copy meanwhile) until we hold the builder
        lock: True, or False when stopped."""
        while self.role != "builder":
            with self._wake:
                if self._stop:
                    return False
                self._wake.wait(timeout=TAKEOVER_INTERVAL)
                if self._stop:
                    return False
            if self.copy.try_build():
                self._become_builder()
                self.takeovers += 1
                log.info("taking over hydration file %s (its builder exited)", self.path)
        return True

    def _hydrate(self, target: DatabaseState) -> bool:
        """Write every page whose frame differs from what the file holds; cut to size. True when
        the file equals ``target``, False when stopped. Returns or raises only once no fetch
        task of this attempt is queued or running."""
        if not target.page_size:
            self.copy.begin(0, bytes(16), (0, 0), 0, 0, None)  # nothing a reader may match
            return True
        old = self._written
        if old is not None and old.page_size not in (0, target.page_size):
            old = None
        unsure = self._unsure
        todo = sorted(p for p, ref in target.index.items()
                      if old is None or p in unsure
                      or old.index.get(p) is not ref and _moved(old.index.get(p), ref))
        self.total_pages = len(todo) if old is None else self.total_pages
        self.done_pages = 0 if old is None else self.done_pages
        runs = _runs(target, todo)
        if old is not None:  # (with no base, a failed attempt is redone whole anyway)
            unsure.update(todo)  # until this attempt completes, these pages may hold anything
        tip = target.tip
        with self._bits_lock:  # readers of the record stop using the file from here on
            self._bits = self.copy.begin(
                target.txid, identity(target.txid, tip),
                (tip.level, tip.min_txid) if tip is not None else (0, 0),
                target.page_size, target.commit, None if old is None else todo)
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
            self.fetched_bytes += len(data)
        if self._stop:  # closing: the file is about to be closed or removed
            return
        pgnos = [p for p, _ in run]
        _write_pages(self._fd, state.page_size, pgnos, pages)
        with self._bits_lock:
            self.done_pages += len(run)
            self.copy.written(self._bits, pgnos)  # a builder taking over need not redo them
            self.copy.set_progress(self.done_pages, self.total_pages)

    # --- resuming what the record says the file holds -------------------------------------------

    def _resume(self) -> DatabaseState | None:
        """The state the file (partly) holds, or None (start over). Also sets which of its
        pages are not written yet (``_unsure``)."""
        rec = self.copy.record()
        if not rec.valid or not rec.txid or rec.replica != self.copy.replica:
            return None
        if not rec.trusted():
            log.info("hydration file %s was left by an earlier boot without a sync; starting "
                     "over", self.path)
            return None
        try:
            state = self._state_of(rec)
        except (LitestreamError, OSError) as err:
            log.info("hydration file %s cannot be resumed (%s); starting over", self.path, err)
            return None
        if state is None or (state.page_size, state.commit) != (rec.page_size, rec.commit):
            log.info("hydration file %s: the replica no longer holds the history it was built "
                     "from; starting over", self.path)
            return None
        unsure = set() if rec.complete else self.copy.unsure_pages(rec)
        self._unsure = unsure
        self.total_pages = rec.commit
        self.done_pages = rec.commit - len(unsure)
        log.info("resuming hydration file %s at TXID %016x (%d pages to write)", self.path,
                 state.txid, len(unsure))
        return state

    def _state_of(self, rec: Record) -> DatabaseState | None:
        """The state named by the record, if the replica still holds its history: the latest
        state when it is that one, else one built for its TXID after finding the LTX file it
        ended with, unchanged (same ETag / inode), in the replica."""
        latest = self.replica.state
        if latest.txid == rec.txid and identity(latest.txid, latest.tip) == rec.ident:
            return latest
        client = self.replica.client
        files = [f for f in client.list_files(rec.tip_level, seek=rec.tip_min)
                 if (f.min_txid, f.max_txid) == (rec.tip_min, rec.txid)]
        if not files or identity(rec.txid, files[0]) != rec.ident:
            return None
        if latest.txid == rec.txid:
            return latest  # the same history, reached through other files
        return state_at(client, self._pool, txid=rec.txid)


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
