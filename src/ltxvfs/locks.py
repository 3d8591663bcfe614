"""SQLite's file locks among the connections of one database in this process.

The rules of SQLite's rollback-journal locking (as the unix VFS implements them with fcntl):
many SHARED readers; one RESERVED writer alongside them; PENDING blocks new readers while the
writer waits for the old ones to leave; EXCLUSIVE only when no one else holds a lock. The writer
changes the database only under EXCLUSIVE, so readers never see a half-written transaction.
Across processes and hosts there is no lock: the conditional upload of each TXID decides.
"""

from __future__ import annotations

import threading
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

    def when_idle(self, fn: Callable[[], T]) -> T:
        """``fn()`` under the mutex, provided no connection holds RESERVED or more and none is
        inside a transaction that reads the write buffer; else BusyError. Turning write mode
        off uses it, so that no connection can start writing or reading the buffer meanwhile."""
        with self._mutex:
            if any(lvl >= RESERVED for lvl in self._levels.values()):
                raise apsw.BusyError("a write transaction is open; try again when it ends")
            if self._buffer_readers:
                raise apsw.BusyError(f"{len(self._buffer_readers)} connection(s) are inside a "
                                     "transaction that reads the write buffer; try again when "
                                     "they end")
            return fn()

    def unlock(self, owner: int, level: int) -> None:
        with self._mutex:
            if level == NONE:
                self._levels.pop(owner, None)
                self._buffer_readers.discard(owner)
            else:
                self._levels[owner] = min(level, self._levels.get(owner, NONE))

    def reserved_by_other(self, owner: int) -> bool:
        with self._mutex:
            return any(lvl >= RESERVED for o, lvl in self._levels.items() if o != owner)

