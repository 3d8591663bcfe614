"""One hydrated copy per host: the locks and the shared record beside a hydration file.

Every process given the same ``hydration_path`` uses the same file. Three files share the path:

* ``<file>`` — the copy (pages at their places, as SQLite would have them);
* ``<file>.meta`` — the *record*: what the copy holds, read by every process before each read
  from the copy (an ``mmap`` of its first 4 KiB), and after the header a bitmap of the pages
  already written for the target being built (one bit per page);

and two ``flock`` locks, which the kernel drops when a process dies (also on ``kill -9``):

* **users** — a shared lock on ``<file>.meta``, held by every process using the copy. The last
  one out is the one that can turn it exclusive (non-blocking); only it may delete the files,
  and it deletes them before it lets go, so no process ever reads a copy another one deleted.
* **builder** — an exclusive lock on ``<file>`` (on the read-only descriptor every user has).
  Its holder alone writes the copy and the record. The others try to take it on their poll
  (one system call); when the builder exits or dies, one of them takes it and resumes.

The record is a seqlock. ``gen`` is odd while the builder writes pages for a new target; the
target (TXID, the identity of the state, page size, commit) is written while it is odd and the
copy equals it when it is even again. A reader reads ``gen``; if it is even and the record names
*its* state (TXID and identity — the hash of the LTX file the state ends with, ETag / inode
included, so a replaced history reusing names never matches) and the copy's inode, it reads the
page, then reads ``gen`` again: unchanged, the page is of its state; changed, it reads the page
remotely instead. So no reader ever gets a page of another TXID than its own, while the builder
updates the copy in place under it.

Memory ordering: the record's fields are plain stores and loads of a shared mapping (``gen`` an
aligned 8-byte word), with the copy's ``pwrite``/``pread`` system calls between them. On x86-64
(total store order) that is the kernel's seqlock; elsewhere the system calls serve as the
barriers. Tested on x86-64.

A host crash can lose page-cache writes the record already counts: the record carries the boot
it was written in (``/proc/sys/kernel/random/boot_id``) and, after a persistent close, a *synced*
flag set after ``fsync`` of the copy; a record of another boot that is not synced is not trusted.

Why plain ``fcntl.flock`` rather than the ``filelock`` package: we need a *shared* lock (users)
and an exclusive one (builder), held on descriptors we also read and ``mmap`` and whose inode we
check against the path after locking; ``filelock``'s ``UnixFileLock`` is ``flock(LOCK_EX |
LOCK_NB)`` on a lock file it opens itself (with ``O_TRUNC``: it could not be the record), polled
until a timeout. It would add a dependency for less.
The locks need a local file system (``flock`` over NFS is emulated with POSIX locks).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import struct
import time
import weakref
from pathlib import Path

#: The record's header; the bitmap of the target being built follows it.
HEADER = 4096
MAGIC = b"LTXVHYD1"
#: magic, gen, txid, page_size, commit, ident, dev, ino, done, total, builder pid, synced,
#: the level and first TXID of the LTX file the state ends with (its tip), pad, boot, and which
#: replica the copy is of (a hash of its location)
_HEAD = struct.Struct("<8sQQII16sQQIIIBBQ6s16s16s")
_NAMES = ("magic", "gen", "txid", "page_size", "commit", "ident", "dev", "ino", "done", "total",
          "pid", "synced", "tip_level", "tip_min", "pad", "boot", "replica")
_GEN = struct.Struct("<Q")
#: Bounded wait for the users lock at open (the last one out holds it while it deletes / fsyncs).
OPEN_WAIT = 30.0


def boot_id() -> bytes:
    """16 bytes naming this boot of the host (b'' where unknown: no record is then trusted
    after its builder is gone unless it was synced)."""
    try:
        text = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        raw = bytes.fromhex(text.replace("-", ""))
    except (OSError, ValueError):
        return b""
    return raw if len(raw) == 16 else b""


_BOOT = boot_id()


def identity(txid: int, tip) -> bytes:
    """16 bytes naming a state of a replica: its TXID and the LTX file it ends with (``tip``,
    a ``FileInfo``: name, size and ETag / inode, else its time). Zeros when there is no tip."""
    if tip is None or not txid:
        return bytes(16)
    who = tip.etag or tip.created_at.isoformat()
    text = f"{txid:x}|{tip.level}|{tip.min_txid:x}|{tip.max_txid:x}|{tip.size}|{who}"
    return hashlib.sha256(text.encode()).digest()[:16]


class Record:
    """What the record says (a snapshot of its header)."""

    __slots__ = ("gen", "txid", "page_size", "commit", "ident", "ino", "done", "total", "pid",
                 "synced", "tip_level", "tip_min", "boot", "replica", "valid")

    def __init__(self, raw: bytes) -> None:
        (magic, self.gen, self.txid, self.page_size, self.commit, self.ident, _, self.ino,
         self.done, self.total, self.pid, synced, self.tip_level, self.tip_min, _,
         boot, self.replica) = _HEAD.unpack_from(raw)
        self.valid = magic == MAGIC
        self.synced = bool(synced)
        self.boot = boot

    @property
    def complete(self) -> bool:
        """The copy equals the state named (gen even)."""
        return self.valid and not self.gen & 1 and self.txid != 0

    def trusted(self) -> bool:
        """Written in this boot of the host (the page cache held everything it counts), or
        synced to disk before it was left."""
        return self.valid and (self.synced or self.boot == _BOOT)


#: Open handles of this process: a child forked from it drops its inherited copies of them.
_OPEN: weakref.WeakSet[SharedCopy] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child shares its parent's open file descriptions, and with them the parent's
    locks: kept, they would keep the builder lock held after the parent died (no takeover) and
    make the child a "user" that never leaves. Closing the child's descriptors leaves the
    parent's locks alone (they belong to the description, which the parent still holds); the
    child opens the copy anew if it uses it."""
    for copy in list(_OPEN):
        copy.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SharedCopy:
    """This process's handle on the copy at ``path``: the users lock, a read-only descriptor of
    the copy, the mapped record, and — when it holds the builder lock — a writable descriptor."""

    def __init__(self, path: Path, replica: str = "") -> None:
        self.path = Path(path)
        #: Which replica this process hydrates (its location, hashed): a record of another
        #: replica is never resumed, and the copy is not shared with its processes.
        self.replica = hashlib.sha256(replica.encode()).digest()[:16]
        self.meta_path = self.path.with_name(self.path.name + ".meta")
        self.mfd = -1  # the record: users lock (shared) lives here
        self.rfd = -1  # the copy, read-only: builder lock (exclusive) lives here
        self.map: mmap.mmap | None = None
        self.builder = False
        self._ino = 0
        self._dev = 0

    # --- opening / closing ------------------------------------------------------------------------

    def open(self) -> None:
        """Join the users of the copy at ``path`` (creating it if missing); raises OSError."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        deadline = time.monotonic() + OPEN_WAIT
        while True:
            mfd = os.open(self.meta_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if not _lock_until(mfd, fcntl.LOCK_SH, deadline):
                    raise OSError(errno.EAGAIN, "the hydration record stays locked by its last "
                                  "user (deleting or syncing it)", str(self.meta_path))
                if _same_file(self.meta_path, mfd):
                    break
            except BaseException:
                os.close(mfd)
                raise
            os.close(mfd)  # its last user deleted it before we locked it: the path is new
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, "the hydration record keeps being replaced",
                              str(self.meta_path))
        self.mfd = mfd
        _OPEN.add(self)
        try:
            # Never shrinks it (others map it): posix_fallocate extends only.
            if os.fstat(mfd).st_size < HEADER:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(mfd, 0, HEADER)
                else:  # pragma: no cover - macOS
                    os.ftruncate(mfd, HEADER)
            self.map = mmap.mmap(mfd, HEADER)
            # Under the users lock nobody deletes the copy: the path stays this inode.
            self.rfd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            st = os.fstat(self.rfd)
            self._dev, self._ino = st.st_dev, st.st_ino
        except BaseException:
            self._close_fds()
            raise

    def other_replica(self) -> bool:
        """The record names a copy of another replica (two applications given one path)."""
        rec = self.record()
        return rec.valid and rec.replica not in (bytes(16), self.replica)

    def try_build(self) -> bool:
        """Take the builder lock if it is free (one system call); True when we hold it."""
        if self.builder:
            return True
        try:
            fcntl.flock(self.rfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.builder = True
        rec = self.record()
        if not rec.valid:  # new, or an older format: start a record
            self.map[:_HEAD.size] = _HEAD.pack(MAGIC, 0, 0, 0, 0, bytes(16), self._dev,
                                               self._ino, 0, 0, os.getpid(), 0, 0, 0, b"", _BOOT,
                                               self.replica)
        elif not rec.trusted():  # a host crash may have lost writes it counts: name nothing
            self._invalidate()
            self._set(pid=os.getpid())
        else:
            self._set(pid=os.getpid())
        return True

    def _invalidate(self) -> None:
        gen = _GEN.unpack_from(self.map, 8)[0]
        if not gen & 1:
            _GEN.pack_into(self.map, 8, gen + 1)  # readers stop using the copy from here on
        self._set(txid=0, synced=0)

    def stop_building(self) -> None:
        """Let go of the builder lock (keep using the copy): another process may build it."""
        if self.builder:
            self.builder = False
            fcntl.flock(self.rfd, fcntl.LOCK_UN)

    def open_writable(self) -> int:
        """A descriptor to write the copy through (the builder's); same inode as ``rfd``."""
        assert self.builder
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        if not _same_file(self.path, fd) or os.fstat(fd).st_ino != self._ino:
            os.close(fd)
            raise OSError(errno.ESTALE, "the hydration file was replaced under us", str(self.path))
        return fd

    def close(self, keep: bool) -> bool:
        """Leave the copy. The last user deletes it (and the record) unless ``keep``. True when
        we were the last one."""
        if self.mfd < 0:
            return False
        last = False
        try:
            self.builder = False
            # Turning shared into exclusive is not atomic (flock drops, then asks): if another
            # user took it meanwhile we are simply not the last.
            try:
                fcntl.flock(self.mfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                pass
            if last and not keep:
                self.path.unlink(missing_ok=True)
                self.meta_path.unlink(missing_ok=True)
        finally:
            self._close_fds()  # drops both locks
        return last

    def forget(self) -> None:
        """Drop the handle without unlocking or deleting anything (a forked child's copy)."""
        self.builder = False
        self._close_fds()

    def _close_fds(self) -> None:
        _OPEN.discard(self)
        if self.map is not None:
            self.map.close()
            self.map = None
        for fd in (self.rfd, self.mfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.mfd = -1

    # --- reading ------------------------------------------------------------------------------------

    def record(self) -> Record:
        return Record(self.map[:_HEAD.size])

    def read(self, txid: int, ident: bytes, page_size: int, pgno: int) -> bytes | None:
        """Page ``pgno`` from the copy if the copy equals the state (``txid``, ``ident``) from
        before the read until after it; else None (read it remotely)."""
        m = self.map
        (magic, gen, rtxid, rsize, _, rident, _, ino, _, _, _, synced, _, _, _,
         boot, _) = _HEAD.unpack_from(m)
        if (gen & 1 or rtxid != txid or rident != ident or rsize != page_size or ino != self._ino
                or magic != MAGIC or not (synced or boot == _BOOT)):
            return None
        data = os.pread(self.rfd, page_size, (pgno - 1) * page_size)
        if _GEN.unpack_from(m, 8)[0] != gen or len(data) != page_size:
            return None  # the builder began another target meanwhile: this page may be of it
        return data

    def progress(self) -> tuple[int, int]:
        rec = self.record()
        return rec.done, rec.total

    # --- building (the builder lock's holder only) ---------------------------------------------------

    def begin(self, txid: int, ident: bytes, tip: tuple[int, int], page_size: int, commit: int,
              todo: list[int] | None) -> bytearray:
        """Before the first write for a new target: ``gen`` odd, the target named, and the
        bitmap says which pages already hold its version (all but ``todo``; none when ``todo``
        is None: a build from nothing). Returns the bitmap (the builder sets bits in it)."""
        assert self.builder and self.map is not None
        self._invalidate()  # (and a crash before the bitmap is whole leaves nothing to resume)
        self._set(boot=_BOOT, replica=self.replica)  # pages of our replica, written this boot
        nbytes = (commit + 7) // 8 + 1
        if todo is None:
            bits = bytearray(nbytes)
        else:
            bits = bytearray(b"\xff" * nbytes)
            for p in todo:
                bits[p >> 3] &= ~(1 << (p & 7)) & 0xFF
        os.pwrite(self.mfd, bytes(bits), HEADER)
        self._set(txid=txid, ident=ident, tip_level=tip[0], tip_min=tip[1], page_size=page_size,
                  commit=commit, done=0 if todo is None else commit - len(todo), total=commit)
        return bits

    def written(self, bits: bytearray, pgnos: list[int]) -> None:
        """Pages ``pgnos`` hold the target's version now (their writes have returned)."""
        lo, hi = len(bits), 0
        for p in pgnos:
            i = p >> 3
            bits[i] |= 1 << (p & 7)
            lo, hi = min(lo, i), max(hi, i)
        if hi >= lo:
            os.pwrite(self.mfd, bytes(bits[lo:hi + 1]), HEADER + lo)

    def set_progress(self, done: int, total: int) -> None:
        self._set(done=done, total=total)

    def publish(self) -> None:
        """The copy equals the target named by ``begin``: readers of that state may use it."""
        gen = _GEN.unpack_from(self.map, 8)[0]
        if gen & 1:
            _GEN.pack_into(self.map, 8, gen + 1)

    def mark_synced(self) -> None:
        """The copy is on disk (fsynced) as the record says: trusted after a host crash."""
        self._set(synced=1)
        self.map.flush()

    def unsure_pages(self, rec: Record) -> set[int]:
        """Pages 1..commit of the record's target not yet written for it (bit clear)."""
        nbytes = (rec.commit + 7) // 8 + 1
        bits = os.pread(self.mfd, nbytes, HEADER)
        bits += bytes(nbytes - len(bits))
        return {p for p in range(1, rec.commit + 1) if not bits[p >> 3] >> (p & 7) & 1}

    def _set(self, **fields) -> None:
        m = self.map
        cur = list(_HEAD.unpack_from(m))
        for k, v in fields.items():
            cur[_NAMES.index(k)] = v
        cur[0], cur[1] = MAGIC, _GEN.unpack_from(m, 8)[0]
        cur[6], cur[7] = self._dev, self._ino
        raw = _HEAD.pack(*cur)
        m[16:_HEAD.size] = raw[16:]  # never the magic or gen: gen is only ever bumped by one


def _lock_until(fd: int, op: int, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)


def _same_file(path: Path, fd: int) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
