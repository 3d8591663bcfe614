"""Poll results shared by the processes of one host (``<replica dir>/polls/``).

A follower's poll is one LIST of L0 from its TXID. With a cache directory, the process that LISTs
writes the result as a small *record* (``polls/l0.json``): the seek TXID, when the LIST was sent
(wall clock) and each file's level, TXIDs, size, ETag/inode and time. Another process whose poll
is due reads the record instead of LISTing when it is fresh enough (younger than what that poll
needs) and newer than what the process knew. Only names and identities are shared: the files
themselves are still read from storage (or a cache keyed by identity), and the follower's own
checks (same history, contiguity) judge the listing as they judge its own LIST.

Who LISTs: a process that finds no usable record takes ``polls/lock`` (``flock``, non-blocking).
Holding it, it reads the record again (the holder before it may just have written one), else
LISTs and writes. If another process holds the lock, that one is LISTing now: we wait for its
record, polling the lock and the record every few milliseconds, at most :data:`LOCK_WAIT` — one
slow LIST — and then LIST ourselves. Waiting costs a reader no more than its own LIST would (the
holder's is already under way), and saves a request when processes tick at the same moment (as
processes started together do); the bound means a stuck or stopped holder (SIGSTOP, a hung
connection) costs at most one delay, never staleness.

A record is written to a temporary file (0600) and renamed over the old one, so a reader sees a
whole record or the previous one. A record that does not parse, whose checksum or replica
identity differs (foreign, torn by hand), or that claims a time in the future is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..storage.base import FileInfo

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no shared polls, every process LISTs
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("ltxvfs.host")

#: Record format version.
VERSION = 1
#: The longest a process waits for another process's LIST in progress before LISTing itself.
LOCK_WAIT = 2.0
#: How often a waiting process looks at the lock and the record again.
WAIT_STEP = 0.005
#: A record claiming to be this much newer than our clock is ignored (clocks moved back).
CLOCK_SLACK = 1.0
#: Listings with more files than this are not shared (a far-behind follower's; rare, large).
MAX_FILES = 10_000
#: A lister starts its LIST from the previous record's TXID when that is at most this far behind
#: its own, so that a process one commit behind the lister can still use the record.
MAX_BEHIND = 64
RECORD = "l0.json"
LOCK = "lock"


@dataclass(frozen=True)
class Listing:
    """An L0 listing from ``seek``, and when it was sent (wall clock, ``time.time()``)."""

    seek: int
    taken_at: float
    files: list[FileInfo]
    #: Read from another process's record (True) or LISTed by this process.
    shared: bool

    def from_txid(self, txid: int) -> list[FileInfo]:
        """The files a LIST from ``txid`` (>= seek) would have returned then."""
        return [f for f in self.files if f.min_txid >= txid]


def shared_polls(cache_dir: str | os.PathLike[str] | None, identity: str) -> SharedPolls | None:
    """The poll record of the replica ``identity`` under ``cache_dir``; None without one, or
    when the directory cannot be made (each process then polls alone; the disk cache warns about
    the directory once). A directory that is not private raises ConfigError (paths.py)."""
    if cache_dir is None:
        return None
    from .paths import replica_dir

    try:
        return SharedPolls(replica_dir(cache_dir, identity) / "polls", identity)
    except OSError as err:
        log.info("poll results of %s not shared: %s", identity, err.strerror or err)
        return None


class SharedPolls:
    """The poll record of one replica on this host (one per replica per process)."""

    def __init__(self, directory: Path, identity: str) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        self.directory = directory
        self.identity = identity
        self._record = directory / RECORD
        self._lock_path = directory / LOCK
        #: LISTs made by this process / records of other processes used instead.
        self.lists = 0
        self.shared = 0

    # --- the one entry point ------------------------------------------------------------------

    def listing(self, seek: int, fresh: float, newer_than: float,
                list_now: Callable[[], list[FileInfo]]) -> Listing:
        """L0 from ``seek``: another process's record when one is younger than ``fresh``
        seconds, newer than ``newer_than`` (wall clock) and listed from at most ``seek``; else
        this process LISTs (``list_now``) and writes the record. ``fresh`` <= 0 always LISTs."""
        if fresh <= 0 or fcntl is None:
            return self._list(seek, list_now)
        found = self._usable(seek, fresh, newer_than)
        if found is not None:
            return found
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)  # someone may have deleted it
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:  # the cache directory is gone or broken: poll alone
            log.warning("poll lock of %s unusable (%s); listing without sharing",
                        self.identity, err)
            return self._list(seek, list_now)
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                else:
                    found = self._usable(seek, fresh, newer_than)
                    return found if found is not None else self._list(seek, list_now)
                found = self._usable(seek, fresh, newer_than)
                if found is not None:
                    return found
                if time.monotonic() >= deadline:
                    log.info("another process has held the poll lock of %s for %gs; "
                             "listing ourselves", self.identity, LOCK_WAIT)
                    return self._list(seek, list_now)
                time.sleep(WAIT_STEP)
        finally:
            os.close(fd)  # releases the flock

    # --- records ------------------------------------------------------------------------------

    def _list(self, seek: int, list_now: Callable[[int], list[FileInfo]]) -> Listing:
        # From the previous record's TXID if it is a little behind ours (the same LIST, a few
        # more names): processes that have not applied the last commit yet can use this one.
        prev = self.read() if fcntl is not None else None
        if prev is not None and seek - MAX_BEHIND <= prev.seek < seek:
            seek = max(prev.seek, 1)
        taken_at = time.time()
        files = list_now(seek)
        self.lists += 1
        listing = Listing(seek, taken_at, files, shared=False)
        if fcntl is not None:
            try:
                self.write(listing)
            except OSError as err:  # a full disk must not stop the follower
                log.warning("cannot write the poll record of %s: %s", self.identity, err)
        return listing

    def _usable(self, seek: int, fresh: float, newer_than: float) -> Listing | None:
        rec = self.read()
        if rec is None or rec.seek > seek or rec.taken_at <= newer_than:
            return None
        if time.time() - rec.taken_at >= fresh:
            return None
        self.shared += 1
        return rec

    def write(self, listing: Listing) -> None:
        if len(listing.files) > MAX_FILES:
            return
        body = {
            "v": VERSION,
            "identity": self.identity,
            "seek": listing.seek,
            "taken_at": listing.taken_at,
            "files": [[f.level, f.min_txid, f.max_txid, f.size, f.etag,
                       f.created_at.isoformat()] for f in listing.files],
        }
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        data = json.dumps({"sum": _digest(text), "body": text}).encode()
        self.directory.mkdir(mode=0o700, exist_ok=True)
        tmp = self.directory / f".{RECORD}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._record)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read(self) -> Listing | None:
        """The record, or None when there is none or it cannot be trusted (logged at DEBUG)."""
        try:
            data = self._record.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            log.debug("poll record of %s unreadable: %s", self.identity, err)
            return None
        try:
            outer = json.loads(data)
            text = outer["body"]
            if not isinstance(text, str) or outer.get("sum") != _digest(text):
                raise ValueError("checksum mismatch")
            body = json.loads(text)
            if body.get("v") != VERSION or body.get("identity") != self.identity:
                raise ValueError("another version or another replica")
            seek, taken_at = body["seek"], float(body["taken_at"])
            if not isinstance(seek, int) or seek < 0 or taken_at > time.time() + CLOCK_SLACK:
                raise ValueError("bad seek or a time in the future")
            files = [_file(entry) for entry in body["files"]]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.debug("poll record of %s ignored: %s", self.identity, err)
            return None
        return Listing(seek, taken_at, files, shared=True)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file(entry: list) -> FileInfo:
    level, lo, hi, size, etag, created = entry
    if level != 0 or not all(isinstance(v, int) for v in (lo, hi, size)) or \
            not (1 <= lo <= hi < 1 << 64) or size < 0 or not isinstance(etag, str):
        raise ValueError(f"bad file entry {entry!r}")
    when = datetime.fromisoformat(created)
    if when.tzinfo is None:
        raise ValueError("naive time")
    return FileInfo(0, lo, hi, size, when.astimezone(UTC), etag)
