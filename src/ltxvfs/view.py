"""Which state a connection's reads use, and the change counter SQLite sees on page 1.

**The rule.** A connection chooses its *view* when SQLite takes the SHARED lock (from NONE), and
nothing changes it until the lock drops back to NONE. A view is one of:

* a **follower** view: one immutable :class:`~ltxvfs.pages.DatabaseState`, the replica's latest
  when the view was chosen (read mode);
* a **pinned** view: a past state (``PRAGMA litestream_time`` / ``litestream_pin_txid``);
* a **writer** view: this process's write buffer over the replica's state (write mode). What it
  shows changes only by this process's own commits, which SQLite makes under EXCLUSIVE (so no
  other connection is inside a transaction then), and by syncs, which move pages from the buffer
  into the state without changing a byte.

So a read transaction sees exactly one database. Turning write mode on or off, a poll, or a time
travel asked for inside a transaction take effect for a connection at its next transaction.
(With ``locking_mode=EXCLUSIVE`` SQLite never drops the lock: the view a connection first chose
stays for its whole life, as a real file held exclusively would not change under it either.)

**The page-1 counter.** SQLite keeps its page cache between transactions when the file change
counter on page 1 (bytes 24..27, with the "version valid for" copy at 92..95) is what it last saw.
Each connection presents its own :class:`Counter`, never the bytes stored on page 1, and moves it
whenever its view may show other bytes than before:

* a new view object (another state, another writer, a pin or its release): +2, which differs
  both from what SQLite read and from what SQLite wrote when it last committed (read + 1);
* the same writer view: + the number of commits the writer made since, so a connection whose only
  change was its own commit (SQLite expects read + 1) keeps its cache, and one that did not commit
  sees the counter move.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .pages import DatabaseState

if TYPE_CHECKING:
    from .follow import Replica
    from .writer import Writer


@dataclass(frozen=True, slots=True)
class View:
    """What one connection's reads see during one read transaction."""

    #: Follower or pinned view: the state. None for a writer view.
    state: DatabaseState | None
    #: Writer view: the writer whose buffer is read first. None otherwise.
    writer: Writer | None
    pinned: bool = False

    def read_state(self, replica: Replica) -> DatabaseState:
        """The state pages not in the buffer come from."""
        return replica.state if self.state is None else self.state

    def page(self, replica: Replica, pgno: int, quiet: bool = False) -> bytes:
        writer = self.writer
        if writer is not None:
            data = writer.read_page(pgno)
            if data is not None:
                return data
            state = replica.state
            if pgno > state.commit:  # a hole SQLite left growing the file: reads as zeros
                return bytes(writer.page_size)
        else:
            state = self.state
            assert state is not None
        hydrator = replica.hydrator
        if hydrator is not None:
            data = hydrator.read_page(state, pgno)
            if data is not None:
                return data
        return replica.store.read_page(state, pgno, quiet)

    def geometry(self) -> tuple[int, int]:
        """(page size, database size in bytes)."""
        writer = self.writer
        if writer is not None:
            page_size = writer.page_size
            return page_size, writer.size_pages() * page_size
        assert self.state is not None
        return self.state.page_size, self.state.size

    @property
    def txid(self) -> int:
        if self.state is not None:
            return self.state.txid
        assert self.writer is not None
        return self.writer.replica.state.txid


class Counter:
    """The change counter one connection presents on page 1 (see the module docstring)."""

    __slots__ = ("_last", "_writer_commits", "value")

    def __init__(self) -> None:
        self.value = 1
        self._last: weakref.ref | None = None  # the state or writer of the last view
        self._writer_commits = 0

    def adopt(self, view: View) -> None:
        """Called each time the connection starts a transaction with ``view``."""
        obj = view.writer if view.writer is not None else view.state
        last = self._last() if self._last is not None else None
        if view.writer is not None:
            commits = view.writer.commits_made
            step = commits - self._writer_commits if last is obj else 2
            self._writer_commits = commits
        else:
            step = 0 if last is obj else 2
        if step:
            self.value = (self.value + step) & 0xFFFFFFFF
        if last is not obj:
            self._last = weakref.ref(obj)  # type: ignore[arg-type]

    def patch(self, page: bytes) -> bytes:
        """Page 1 as SQLite should see it: rollback-journal mode, our counter."""
        p = bytearray(page)
        p[18] = p[19] = 1
        counter = self.value.to_bytes(4, "big")
        p[24:28] = counter
        p[92:96] = counter
        return bytes(p)
