"""Following a primary: one :class:`Replica` per replica URL, and a shared poll scheduler.

A poll makes one LIST (L0, from our TXID). Its first entry is normally the file our state ends
with: if that is another object now (ETag / inode), or gone while nothing newer is listed, the
replica's history was replaced (a restored primary, a wiped bucket and a new primary) and the
state is rebuilt from a fresh plan, with the page cache dropped (see ``_same_history``). New
contiguous L0 files are applied directly. If L0 has a gap (files removed by retention after
compaction) the whole replica is listed and the gap bridged with compacted files that overlap what
we have as little as possible (plan.choose_bridge; per page the newest TXID wins), or with the
latest plan's files beyond our TXID. Nothing here can freeze the follower: every poll starts again
from the TXID we have.

Polls run as jobs on the shared scheduler (jobs.py), one tick every ``poll_interval``. A replica
no connection read since its last poll is *idle*: it polls after 2, 4, 8, ... ticks, up to
``idle_poll_interval``; the first read transaction makes it busy again (a poll every tick). A
read transaction that starts when the last completed check is older than ``max_lag`` checks
first (:meth:`Replica.ensure_fresh`), so it sees data no older than that. With a cache directory
the processes of a host share their poll results (host/polls.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from .errors import LitestreamError, ObjectNotFoundError
from .host.polls import Listing, SharedPolls
from .locks import LockTable
from .ltx import HEADER_SIZE, Header
from .pages import (
    DatabaseState,
    PageStore,
    build_state,
    fetch_file_index,
    fetch_indexes,
    state_at,
)
from .plan import choose_bridge, choose_plan, list_levels
from .storage.base import SNAPSHOT_LEVEL, FileInfo, ReplicaClient

if TYPE_CHECKING:
    from .hydrate import Hydrator
    from .writer import Writer

log = logging.getLogger("ltxvfs.follow")

#: How long a read transaction waits for its ``max_lag`` check before it reads what the replica
#: has (logged); after a failed or late check, reads do not wait again for ``max_lag``.
CHECK_WAIT = 5.0

class Replica:
    """The latest known state of one replica, plus its page store. Shared by its connections."""

    def __init__(self, client: ReplicaClient, store: PageStore, pool: ThreadPoolExecutor,
                 state: DatabaseState, poll_interval: float, *,
                 idle_poll_interval: float | None = None, max_lag: float | None = None,
                 shared: SharedPolls | None = None) -> None:
        self.client = client
        self.store = store
        self.pool = pool
        self.poll_interval = poll_interval
        #: Idle back-off ceiling, in ticks of ``poll_interval`` (1: no back-off).
        self._max_wait = max(1, round((idle_poll_interval or poll_interval) / poll_interval))
        #: A read transaction starts from data at most this old (seconds). The default leaves
        #: room for a busy replica's own polls (data up to two intervals old with shared polls:
        #: a record nearly an interval old, then an interval until the next poll).
        self.max_lag = 3 * poll_interval if max_lag is None else max_lag
        #: Poll results shared with the host's other processes (cache_dir), or None.
        self.shared = shared
        self._state = state
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        #: When the data of the latest state was known current (monotonic): the moment the
        #: LIST behind the last successful poll was sent (ours or another process's).
        self.last_poll_success: float | None = time.monotonic()
        self._checked_wall = time.time()  # the same moment, wall clock (records are compared)
        self.last_error: str | None = None
        self.polls = 0
        #: LISTs our polls made; polls answered by another process's record instead.
        self.lists = 0
        self.shared_used = 0
        #: Read transactions that checked first (max_lag), and those that went on without.
        self.checks = 0
        self.checks_late = 0
        self._checking: threading.Event | None = None
        self._check_failed: float | None = None
        #: Idle back-off: ticks to wait before the next idle poll, ticks waited so far; the
        #: interval (seconds) of the last scheduled poll.
        self._wait = min(2, self._max_wait)
        self._waited = 0
        self.interval = poll_interval
        self.ticks = 0  # scheduler ticks seen (poll_job calls)
        self._polled_at = time.monotonic()
        self._taken: float | None = None  # when the listing of the poll under way was sent
        self.refcount = 0
        #: The replica's identity (ReplicaURL.identity), set by the VFS that opened it.
        self.key = client.identity
        #: No connection is open, but the VFS keeps the replica for a while (vfs.LINGER).
        self.lingering = False
        #: Held while write mode is switched on or off (never two writers, never half-off).
        self.mode_lock = threading.RLock()
        self.locks = LockTable()
        #: Set when a connection starts a read transaction; cleared by the poll job.
        self.touched = True
        #: Write mode: the replica's writer (buffer, syncs); None when read-only.
        self.writer: Writer | None = None
        #: Hydration: the local full copy being built or kept current; None if off.
        self.hydrator: Hydrator | None = None
        #: Called (with no arguments) after the latest state changed.
        self.listeners: list[Callable[[], None]] = []
        #: (state, L0 file at its TXID or None) proven to be one history by a full listing, so
        #: that the next polls need not prove it again.
        self._proven: tuple[DatabaseState, FileInfo | None] | None = None
        #: How many times a replaced history was detected (and the state rebuilt).
        self.replacements = 0

    @property
    def state(self) -> DatabaseState:
        return self._state

    def set_state(self, state: DatabaseState) -> None:
        """Install a new latest state unconditionally and tell listeners. Whoever computed a
        state from the current one installs it with :meth:`replace_state` instead."""
        with self._lock:
            changed = state is not self._state
            self._state = state
        if changed:
            self._changed()

    def replace_state(self, expected: DatabaseState, state: DatabaseState) -> bool:
        """Install ``state`` only if the latest state is still ``expected`` (one atomic compare
        and set). False, and nothing changed, when another state was installed meanwhile."""
        with self._lock:
            if self._state is not expected:
                return False
            self._state = state
        if state is not expected:
            self._changed()
        return True

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    def poll_job(self) -> None:
        """The scheduled poll, one tick every ``poll_interval``. Busy (a read transaction began
        since the last poll): poll now. Idle: poll after 2, 4, 8, ... ticks, up to the idle
        ceiling — object stores bill LISTs most, and a reader that comes back checks first
        anyway when the data is older than ``max_lag`` (:meth:`ensure_fresh`)."""
        self.ticks += 1
        if self.touched:
            self.touched = False
            self._wait, self._waited = min(2, self._max_wait), 0
            self.interval = self.poll_interval
        else:
            self._waited += 1
            if self._waited < self._wait:
                return
            self.interval = self._wait * self.poll_interval
            self._wait, self._waited = min(self._wait * 2, self._max_wait), 0
        # Another process's record is as good as our own LIST if it was made since our last
        # poll: so a late tick (a loaded machine) does not make us LIST what was just listed.
        now = time.monotonic()
        since, self._polled_at = now - self._polled_at, now
        self.poll(fresh=max(self.interval, since))

    def ensure_fresh(self) -> bool:
        """Called when a read transaction is about to choose its view: if the last completed
        check is older than ``max_lag``, check now (one check for all connections starting
        together), waiting at most :data:`CHECK_WAIT`. False when the data may be older than
        ``max_lag`` (the check failed or is late: logged); then reads do not wait again for
        ``max_lag`` seconds, so a storage outage does not slow every read transaction."""
        if self.writer is not None or self.lag() <= self.max_lag:
            return True
        failed = self._check_failed
        if failed is not None and time.monotonic() - failed < max(self.max_lag, self.poll_interval):
            return False
        asked = time.monotonic()
        with self._lock:
            done = self._checking
            if done is None:
                done = self._checking = threading.Event()
                self.checks += 1
                threading.Thread(target=self._check, args=(done,), name="ltxvfs-check",
                                 daemon=True).start()
        if done.wait(CHECK_WAIT) and self.last_poll_success is not None and \
                self.last_poll_success >= asked - self.max_lag:
            return True
        self.checks_late += 1
        self._check_failed = time.monotonic()
        log.warning("%s: could not check for new data before a read (%s); reading data "
                    "%.1fs old (max_lag %gs)", self.client.url,
                    self.last_error or f"no answer within {CHECK_WAIT:g}s", self.lag(),
                    self.max_lag)
        return False

    def _check(self, done: threading.Event) -> None:
        try:
            self.poll(fresh=self.max_lag)
        except Exception:  # never leave the waiting readers without an answer
            log.exception("check of %s failed", self.client.url)
        finally:
            with self._lock:
                self._checking = None
            done.set()

    def lag(self) -> float:
        """Seconds since the data of the latest state was known current (inf: never)."""
        last = self.last_poll_success
        return float("inf") if last is None else time.monotonic() - last

    def poll(self, strict: bool = False, fresh: float = 0.0) -> DatabaseState:
        """Check for new LTX files and advance the latest state. Errors are logged and kept in
        ``last_error``; the previous state stays in force (``strict``: and the error is raised,
        for a caller that must start from the replica's newest state). ``fresh``: another
        process's poll record younger than that many seconds may answer instead of a LIST."""
        with self._poll_lock:
            self.polls += 1
            start = self._state
            self._taken = None
            try:
                state = self._advance(start, fresh)
            except LitestreamError as err:
                self.last_error = str(err)
                log.warning("poll of %s failed: %s", self.client.url, err)
                if strict:
                    raise
                return self._state
            if not self.replace_state(start, state):  # a writer installed its upload meanwhile
                state = self._state
            taken = self._taken if self._taken is not None else time.time()
            self.last_poll_success = time.monotonic() - max(time.time() - taken, 0.0)
            self._checked_wall = taken
            self._check_failed = None
            self.last_error = None
            return state

    def _list(self, seek: int, fresh: float) -> Listing:
        """L0 from ``seek``: our own LIST, or another process's record (shared polls)."""
        def list_now(start: int) -> list[FileInfo]:
            self.lists += 1
            return self.client.list_files(0, seek=start)

        if self.shared is None:
            taken = time.time()
            return Listing(seek, taken, list_now(seek), shared=False)
        listing = self.shared.listing(seek, fresh, self._checked_wall, list_now)
        if listing.shared:
            self.shared_used += 1
        return listing

    def _advance(self, state: DatabaseState, fresh: float = 0.0) -> DatabaseState:
        # From our own TXID: the file our state ends with comes back in the same LIST.
        seek = max(state.txid, 1)
        listing = self._list(seek, fresh)
        files = listing.from_txid(seek)
        at = files[0] if files and files[0].min_txid == state.txid else None
        if listing.shared and _disagrees(files, state.tip, seek):
            # Another process's record disagrees with our tip (it predates a change of history,
            # or retention): only our own LIST may decide that the history was replaced.
            listing = self._list(seek, 0.0)
            files = listing.from_txid(seek)
            at = files[0] if files and files[0].min_txid == state.txid else None
        self._taken = listing.taken_at
        if state.txid and not self._same_history(state, at):
            return self._replaced(state)
        files = [f for f in files if f.min_txid > state.txid]
        chain = []
        nxt = state.txid + 1
        for f in files:
            if f.min_txid != nxt:
                break
            chain.append(f)
            nxt = f.max_txid + 1
        if not files:
            return state
        if not chain:  # a gap in L0 (retention after compaction): bridge it
            listing = list_levels(self.client)
            plan = choose_plan(listing)
            if plan.txid < state.txid:
                log.warning("replica %s went back from TXID %016x to %016x; rebuilding",
                            self.client.url, state.txid, plan.txid)
                return build_state(self.client, plan, self.pool, self.store)
            bridge = choose_bridge(listing, state.txid, plan.txid)
            chain = list(bridge) if bridge is not None else \
                [f for f in plan.files if f.max_txid > state.txid]
            if not chain:
                return state
        indexes = fetch_indexes(self.client, chain, self.pool, self.store)
        return state.applying(indexes, indexes[-1].header.commit)  # type: ignore[union-attr]

    def _same_history(self, state: DatabaseState, at: FileInfo | None) -> bool:
        """Does the replica still hold the history ``state`` was built from?

        ``at`` is the L0 file listed at our TXID. The common case costs nothing more than the
        poll's LIST: ``at`` is our tip itself (same name, same ETag / inode). Otherwise (the tip
        is a compacted file or snapshot, or retention removed it from L0, or it was replaced) the
        whole replica is listed once for this state: the tip still there unchanged proves the
        history; a tip gone is judged by a file that ends at our TXID (its header timestamp is
        the tip's: compaction copies it — one 100-byte GET) or by the plan ending before our
        TXID. LTX checksums cannot help: Litestream 0.5 and we write them as zero. What stays
        undecidable (no file ends at our TXID any more, the plan reaches past it) is trusted."""
        tip = state.tip
        if tip is None:
            return True  # a new database we write, nothing to compare
        if at is not None and (at.level, at.min_txid, at.max_txid) == (
                tip.level, tip.min_txid, tip.max_txid):
            return _same_object(at, tip)
        proven = self._proven
        if proven is not None and proven[0] is state and (
                proven[1] is None and at is None or proven[1] is not None and at is not None
                and _same_object(proven[1], at)):
            return True
        listing = list_levels(self.client)
        same = self._judge(state, listing)
        if same:
            self._proven = (state, at)
        return same

    def _judge(self, state: DatabaseState, listing: dict[int, list[FileInfo]]) -> bool:
        tip = state.tip
        assert tip is not None
        files = [f for fs in listing.values() for f in fs]
        for f in files:
            if (f.level, f.min_txid, f.max_txid) == (tip.level, tip.min_txid, tip.max_txid):
                return _same_object(f, tip)
        ends = sorted((f for f in files if f.max_txid == state.txid), key=lambda f: f.level)
        if ends and state.tip_timestamp and tip.level < SNAPSHOT_LEVEL:
            f = ends[0]
            header = Header.unpack(self.client.read(f.level, f.min_txid, f.max_txid, 0,
                                                    HEADER_SIZE))
            if header.timestamp == state.tip_timestamp:
                return True
            if f.level < SNAPSHOT_LEVEL:  # Litestream's snapshots carry the time they were made
                log.info("%s ends at TXID %016x with timestamp %d, ours was %d", f,
                         state.txid, header.timestamp, state.tip_timestamp)
                return False
        try:
            plan = choose_plan(listing)
        except LitestreamError:
            return True  # let the usual paths report what is wrong with the replica
        return plan.txid >= state.txid

    def _replaced(self, state: DatabaseState) -> DatabaseState:
        """The history changed under us: a fresh state from a fresh plan, an empty cache."""
        log.warning("replica %s no longer holds the history of TXID %016x (restored or "
                    "replaced); rebuilding from scratch", self.client.url, state.txid)
        self.replacements += 1
        self._proven = None
        self.store.cache.clear()
        return state_at(self.client, self.pool, self.store)

    def recover(self, state: DatabaseState) -> DatabaseState | None:
        """``state`` with its frames in deleted files (retention after compaction) moved into
        compacted files that hold the very same page versions — so the result is the same
        database and may replace ``state`` even inside a read transaction. A compacted file C
        covering a deleted file D qualifies for a page of D when

        * C ends at or before ``state.txid`` (it holds the newest version up to there), or
        * the latest state shows the page unchanged since ``state.txid``.

        Every deleted file of ``state`` is handled in one go (one listing of all levels).
        Returns None when some page's old version exists nowhere any more; in read mode the
        latest state is then rebuilt from a fresh plan, for the next transaction to use.
        """
        with self._poll_lock:
            latest = start = self._state
            if self.writer is None:
                try:
                    latest = self._advance(latest)
                except LitestreamError:
                    pass
                if not self.replace_state(start, latest):
                    latest = self._state
            for _ in range(3):  # files may vanish while we look: look again
                listing = list_levels(self.client)
                try:
                    fixed = self._relocate(state, latest, listing)
                except ObjectNotFoundError:
                    continue
                if fixed is not None:
                    self.replace_state(state, fixed)  # never over a state installed meanwhile
                    return fixed
                break
            log.info("pages of TXID %016x are in no remaining file; rebuilding", state.txid)
            if self.writer is None:
                self._rebuild()
            return None

    def _relocate(self, state: DatabaseState, latest: DatabaseState,
                  listing: dict[int, list[FileInfo]]) -> DatabaseState | None:
        present = {(f.level, f.min_txid, f.max_txid) for fs in listing.values() for f in fs}
        moved: dict[tuple[int, int, int], list[int]] = {}
        for pgno, (info, _, _) in state.index.items():
            key = (info.level, info.min_txid, info.max_txid)
            if key not in present:
                moved.setdefault(key, []).append(pgno)
        if not moved:
            return state
        indexes: dict[tuple[int, int, int], dict[int, tuple[int, int]]] = {}
        moves: dict[int, tuple[FileInfo, int, int]] = {}
        for (_, lo, hi), pgnos in moved.items():
            candidates = sorted((f for lvl, fs in listing.items() if lvl > 0 for f in fs
                                 if f.min_txid <= lo and hi <= f.max_txid <= latest.txid),
                                key=lambda f: (f.max_txid, -f.level))
            for c in candidates:
                key = (c.level, c.min_txid, c.max_txid)
                if key not in indexes:
                    indexes[key] = fetch_file_index(self.client, c, disk=self.store.disk).pages
                pages = indexes[key]
                if all(p in pages and (c.max_txid <= state.txid or _unchanged(latest, p, state))
                       for p in pgnos):
                    for p in pgnos:
                        moves[p] = (c, *pages[p])
                    break
            else:
                return None
        return replace(state, index=state.index.with_refs(moves))

    def _rebuild(self) -> None:
        """Replace the latest state by one built from a fresh plan (no deleted files in it)."""
        start = self._state
        try:
            state = state_at(self.client, self.pool, self.store)
        except LitestreamError as err:
            self.last_error = str(err)
            log.warning("rebuild of %s failed: %s", self.client.url, err)
            return
        self.replace_state(start, state)

    def lag_seconds(self) -> int:
        """Whole seconds of :meth:`lag`; -1 if never current."""
        lag = self.lag()
        return -1 if lag == float("inf") else int(lag)

    def state_at(self, *, txid: int | None = None, timestamp: datetime | None = None
                 ) -> DatabaseState:
        """A state in the past (time travel). Raises TxNotAvailableError."""
        return state_at(self.client, self.pool, self.store, txid=txid, timestamp=timestamp)


def _same_object(a: FileInfo, b: FileInfo) -> bool:
    """The same version of the same-named object: by ETag / inode when both listings give one
    (our own upload's FileInfo carries the time we wrote, not S3's LastModified), else by size
    and time."""
    if a.size != b.size:
        return False
    if a.etag and b.etag:
        return a.etag == b.etag
    return a.created_at == b.created_at


def _disagrees(files: list[FileInfo], tip: FileInfo | None, seek: int) -> bool:
    """A listing from ``seek`` should hold our tip (an L0 file at or after ``seek``), the very
    same object: True when it does not."""
    if tip is None or tip.level != 0 or tip.min_txid < seek:
        return False
    for f in files:
        if (f.min_txid, f.max_txid) == (tip.min_txid, tip.max_txid):
            return not _same_object(f, tip)
    return True


def _unchanged(latest: DatabaseState, pgno: int, state: DatabaseState) -> bool:
    """Nothing after ``state.txid`` wrote ``pgno`` (as far as the latest state knows)."""
    now = latest.index.get(pgno)
    return now is not None and now[0].max_txid <= state.txid
