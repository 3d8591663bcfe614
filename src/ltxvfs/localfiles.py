"""The local files of replica databases — rollback journals, temp files — in the VFS's private
(0700) scratch directory, or in memory; never synced.

Crash recovery never uses a journal: the write buffer's COMMIT marks make a transaction atomic
(recovery drops whatever follows the last one), and ``xAccess`` hides hot journals, so a journal
left by a crash is never played back. A journal only serves SQLite's own ROLLBACK in this
process. So:

* :class:`Journal` keeps a main journal in memory — a single-row commit then costs no file
  creation, writes or ``unlink`` (they were most of its time) — and moves it to a private file
  (0600, in the VFS's 0700 scratch directory) once it holds more than ``SPILL`` bytes, so a
  large transaction does not hold its journal in memory. Its contents live as long as a file of
  that name would: until ``xDelete`` or the database's close (:meth:`Journals.forget`).
* :class:`LocalFile` is an ordinary local file (temp files, statement journals) whose ``xSync``
  does nothing.
* :class:`LocalFiles` names them: after a hash of the database's full name, which is unique per
  open (``xFullPathname``), so connections to two replicas that share a name never share a
  journal; and removes them when the database closes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

import apsw

#: A journal larger than this moves from memory to a file.
SPILL = 1 << 20


class LocalFile(apsw.VFSFile):
    """A temp file on local disk, with no fsync (see the module's docstring)."""

    def xSync(self, flags: int) -> None:  # noqa: N802
        pass


class _Contents:
    """A journal's bytes: in memory, or in a file once spilled."""

    __slots__ = ("data", "fd", "path")

    def __init__(self) -> None:
        self.data = bytearray()
        self.fd = -1  # >= 0 once spilled to ``path``
        self.path = ""

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd >= 0 else len(self.data)

    def spill(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(self.data)
            offset = 0
            while offset < len(view):
                offset += os.pwrite(fd, view[offset:], offset)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.path, self.data = fd, path, bytearray()

    def drop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.data = bytearray()


class Journals:
    """The main journals of one VFS, by name. ``spill_path(name)`` says where a journal that
    outgrows memory goes."""

    def __init__(self, spill_path: Callable[[str], str]) -> None:
        self._spill_path = spill_path
        self._lock = threading.Lock()
        self._by_name: dict[str, _Contents] = {}

    def open(self, name: str) -> Journal:
        with self._lock:
            contents = self._by_name.get(name)
            if contents is None:
                contents = self._by_name[name] = _Contents()
        return Journal(self, name, contents)

    def delete(self, name: str) -> bool:
        """Forget journal ``name`` (its file too, if spilled). False if there is none."""
        with self._lock:
            contents = self._by_name.pop(name, None)
        if contents is None:
            return False
        contents.drop()
        return True

    def exists(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        with self._lock:
            return list(self._by_name)


class Journal(apsw.VFSFile):
    """A main rollback journal (see the module's docstring). Used by one connection."""

    def __init__(self, journals: Journals, name: str, contents: _Contents) -> None:
        # Not apsw.VFSFile.__init__: there is no file of the base VFS behind this one.
        self._journals = journals
        self._name = name
        self._c = contents

    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802
        c = self._c
        if c.fd >= 0:
            return os.pread(c.fd, amount, offset)
        return bytes(c.data[offset:offset + amount])  # short at the end: SQLite zero-fills

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802
        c = self._c
        if c.fd < 0 and offset + len(data) > SPILL:
            c.spill(self._journals._spill_path(self._name))
        if c.fd >= 0:
            view = memoryview(data)
            while view:
                n = os.pwrite(c.fd, view, offset)
                view, offset = view[n:], offset + n
            return
        buf = c.data
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset:offset + len(data)] = data

    def xTruncate(self, newsize: int) -> None:  # noqa: N802
        c = self._c
        if c.fd >= 0:
            os.ftruncate(c.fd, newsize)
        elif newsize < len(c.data):
            del c.data[newsize:]
        else:
            c.data.extend(bytes(newsize - len(c.data)))

    def xFileSize(self) -> int:  # noqa: N802
        return self._c.size()

    def xSync(self, flags: int) -> None:  # noqa: N802
        pass

    def xLock(self, level: int) -> None:  # noqa: N802
        pass

    def xUnlock(self, level: int) -> None:  # noqa: N802
        pass

    def xCheckReservedLock(self) -> bool:  # noqa: N802
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:  # noqa: N802
        return False

    def xSectorSize(self) -> int:  # noqa: N802
        return 4096

    def xDeviceCharacteristics(self) -> int:  # noqa: N802
        return 0

    def xClose(self) -> None:  # noqa: N802
        pass  # the contents stay until xDelete (or the database's close), as a file's would


class LocalFiles:
    """One VFS's local files. ``scratch(create)`` is its private directory (None if not made yet
    and ``create`` is false)."""

    def __init__(self, scratch: Callable[[bool], str | None]) -> None:
        self._scratch = scratch
        self.journals = Journals(self._spill_path)

    def open(self, name: str | None, flags: list[int]) -> apsw.VFSFile:
        """xOpen of anything but a main database (WAL files are refused before)."""
        if flags[0] & apsw.SQLITE_OPEN_MAIN_JOURNAL and name is not None:
            flags[1] = flags[0]
            return self.journals.open(name)
        return LocalFile("", None if name is None else self.path(name), flags)

    def path(self, name: str) -> str:
        """Where a local file of a replica database lives. The unix VFS gives a file the
        permissions of the one its name minus '-suffix' names, so an empty 0600 stand-in is
        created for that (removed when the database closes)."""
        cut = name.rfind("-")
        if cut <= 0:
            return name
        stem = self._stem(name[:cut])
        if not os.path.exists(stem):
            os.close(os.open(stem, os.O_WRONLY | os.O_CREAT, 0o600))
        return stem + name[cut:]

    def delete(self, name: str) -> str | None:
        """xDelete: a journal is forgotten here (None); anything else's path is returned."""
        return None if self.journals.delete(name) else self.path(name)

    def forget(self, db_name: str) -> None:
        """A closed database's journal, stand-in and leftover files go (its name is never
        reused)."""
        self.journals.delete(db_name + "-journal")
        if self._scratch(False) is None:
            return
        stem = self._stem(db_name)
        for suffix in ("", "-journal"):
            try:
                os.unlink(stem + suffix)
            except FileNotFoundError:
                pass

    def _spill_path(self, journal_name: str) -> str:
        cut = journal_name.rfind("-")
        return self._stem(journal_name[:cut]) + journal_name[cut:]

    def _stem(self, db_name: str) -> str:
        scratch = self._scratch(True)
        assert scratch is not None
        return os.path.join(scratch, hashlib.sha256(db_name.encode()).hexdigest()[:20])
