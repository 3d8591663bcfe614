"""SQLite's file locks among the connections of one database in this process.

The rules of SQLite's rollback-journal locking (as the unix VFS implements them with fcntl):
many SHARED readers; one RESERVED writer alongside them; PENDING blocks new readers while the
writer waits for the old ones to leave; EXCLUSIVE only when no one else holds a lock. The writer
changes the database only under EXCLUSIVE, so readers never see a half-written transaction.
Across processes and hosts there is no lock: the conditional upload of each TXID decides.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import apsw

T = TypeVar("T")

NONE, SHARED, RESERVED, PENDING, EXCLUSIVE = (
    apsw.SQLITE_LOCK_NONE, apsw.SQLITE_LOCK_SHARED, apsw.SQLITE_LOCK_RESERVED,
    apsw.SQLITE_LOCK_PENDING, apsw.SQLITE_LOCK_EXCLUSIVE)


class LockTable:
    """Lock levels of every open file of one database. Refusals raise ``apsw.BusyError``."""

    def __init__(self) -> None:
        self._levels: dict[int, int] = {}
        self._buffer_readers: set[int] = set()
        self._mutex = threading.RLock()
        self._changed = threading.Condition(self._mutex)
        self._draining = 0  # write mode is being turned off: no new transaction may start

    @property
    def mutex(self) -> threading.RLock:
        """Held while a lock is granted (and a view chosen): hold it to change what views see."""
        return self._mutex

    def level(self, owner: int) -> int:
        return self._levels.get(owner, NONE)

    def lock(self, owner: int, level: int,
             granting: Callable[[int], None] | None = None) -> None:
        """Raise ``owner``'s lock to ``level``. ``granting(level)`` runs under the table's mutex
        just before a lock is granted (it may refuse by raising): what a connection decides
        there (its view) is atomic with respect to :meth:`when_idle`."""
        with self._mutex:
            mine = self._levels.get(owner, NONE)
            if level <= mine:
                return
            others = [lvl for o, lvl in self._levels.items() if o != owner]
            if self._draining and mine == NONE:
                raise apsw.BusyError("database is locked (write mode is being turned off)")
            if level == SHARED:
                if any(lvl >= PENDING for lvl in others):
                    raise apsw.BusyError("database is locked (a writer is committing)")
            elif level == RESERVED:
                if any(lvl >= RESERVED for lvl in others):
                    raise apsw.BusyError("database is locked: another connection is writing "
                                         "(one writer per database)")
            elif level >= PENDING:
                if any(lvl >= RESERVED for lvl in others):
                    raise apsw.BusyError("database is locked: another connection is writing")
                if any(lvl >= SHARED for lvl in others):
                    self._levels[owner] = PENDING  # keep new readers out while we wait
                    raise apsw.BusyError("database is locked: waiting for readers to finish")
            if granting is not None:
                granting(level)
            self._levels[owner] = level

    def set_reads_buffer(self, owner: int, reads: bool) -> None:
        """Note whether ``owner``'s open transaction reads through the write buffer."""
        with self._mutex:
            if reads:
                self._buffer_readers.add(owner)
            else:
                self._buffer_readers.discard(owner)

    def when_idle(self, fn: Callable[[], T], owner: int, timeout: float) -> T:
        """``fn()`` under the mutex once no connection holds RESERVED or more and none is inside
        a transaction that reads the write buffer. Meanwhile no new transaction may start (as
        SQLite's PENDING lock keeps new readers out for a waiting writer), so overlapping
        readers cannot starve it; BusyError after ``timeout`` seconds, or at once if ``owner``
        itself is inside such a transaction. Turning write mode off uses it."""
        with self._changed:
            if owner in self._buffer_readers or self._levels.get(owner, NONE) >= RESERVED:
                raise apsw.BusyError("this connection is inside a transaction that reads the "
                                     "write buffer; end it first")
            self._draining += 1
            try:
                deadline = time.monotonic() + timeout
                while True:
                    writing = any(lvl >= RESERVED for lvl in self._levels.values())
                    if not writing and not self._buffer_readers:
                        return fn()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        what = "a write transaction is open" if writing else \
                            f"{len(self._buffer_readers)} connection(s) are inside a " \
                            "transaction that reads the write buffer"
                        raise apsw.BusyError(f"{what} after waiting {timeout:g}s; try again")
                    self._changed.wait(left)
            finally:
                self._draining -= 1

    def unlock(self, owner: int, level: int) -> None:
        with self._mutex:
            if level == NONE:
                self._levels.pop(owner, None)
                self._buffer_readers.discard(owner)
                self._changed.notify_all()
            else:
                self._levels[owner] = min(level, self._levels.get(owner, NONE))
                self._changed.notify_all()

    def reserved_by_other(self, owner: int) -> bool:
        with self._mutex:
            return any(lvl >= RESERVED for o, lvl in self._levels.items() if o != owner)

