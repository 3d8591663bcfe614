"""The replica storage interface: list, read a range, write, delete LTX files of one replica.

Two implementations live beside this module: ``s3.py`` (boto3) and ``file.py`` (a directory laid
out as Litestream's file backend). Both are thread-safe: one client serves every thread.
"""

from __future__ import annotations

import abc
import io
import re
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO

from ..errors import UnsafeStoreError

SNAPSHOT_LEVEL = 9
MAX_LEVEL = 9

_NAME_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.ltx$")

#: Where write mode's create-only probes live, directly below the replica's prefix (S3) or root
#: directory (file): beside the level directories, never inside one, so no listing (ours or
#: Litestream's), restore or compaction ever reads it.
PROBE_DIR = "ltxvfs-probe"
#: The probe object's contents: says what it is to whoever finds one a crash left behind.
PROBE_BODY = (b"ltxvfs create-only probe: written when write mode starts, deleted at once; "
              b"safe to delete\n")


def probe_name() -> str:
    """A new probe object's name, unique per probe (time + 64 random bits), so a probe that a
    crash left behind never meets the next one."""
    return f"{int(time.time()):x}-{secrets.token_hex(8)}.probe"


def format_txid(txid: int) -> str:
    """TXIDs in names and text are 16 lowercase hex digits."""
    return f"{txid:016x}"


def ltx_filename(min_txid: int, max_txid: int) -> str:
    """``<min>-<max>.ltx``; refuses anything but valid TXIDs so keys are never built from junk."""
    if not (isinstance(min_txid, int) and isinstance(max_txid, int)):
        raise TypeError("TXIDs must be integers")
    if not (1 <= min_txid <= max_txid < 1 << 64):
        raise ValueError(f"invalid TXID range {min_txid}-{max_txid}")
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def parse_ltx_filename(name: str) -> tuple[int, int] | None:
    """(min, max) of a ``<min>-<max>.ltx`` name, or None for anything else (skipped in listings)."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    lo, hi = int(m.group(1), 16), int(m.group(2), 16)
    if lo < 1 or hi < lo:
        return None
    return lo, hi


def check_level(level: int) -> int:
    if not isinstance(level, int) or not (0 <= level <= MAX_LEVEL):
        raise ValueError(f"invalid LTX level {level!r} (0..{MAX_LEVEL})")
    return level


@dataclass(frozen=True)
class FileInfo:
    """One LTX file in a replica, as a listing reports it."""

    level: int
    min_txid: int
    max_txid: int
    size: int
    #: UTC, timezone-aware. LastModified (S3) or mtime (file) by default; the LTX header
    #: timestamp (``litestream-timestamp`` metadata / mtime) when listed with ``use_metadata``.
    created_at: datetime
    #: Which version of the object this is: the S3 ETag, or the file's inode, mtime and ctime; "" when
    #: unknown. A replaced history reuses names, so names alone never identify a file's bytes
    #: (cache keys, the follower's continuity check). Not part of equality.
    etag: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return ltx_filename(self.min_txid, self.max_txid)

    def __str__(self) -> str:
        return f"L{self.level}/{self.name}"


class ReplicaClient(abc.ABC):
    """Access to the LTX files of one replica (one database)."""

    #: The replica URL with any secret removed; safe to log and put in messages.
    url: str

    @property
    def identity(self) -> str:
        """Where the replica is, however its URL was spelled (see ``ReplicaURL.identity``)."""
        return self.url

    @abc.abstractmethod
    def list_files(self, level: int, *, seek: int = 0, use_metadata: bool = False) -> list[FileInfo]:
        """Files of ``level`` with ``min_txid >= seek``, ascending by (min_txid, max_txid).

        ``use_metadata`` asks for ``created_at`` = the LTX header timestamp (needed for time
        travel): S3 reads the ``litestream-timestamp`` metadata (one HEAD per file).
        """

    def list_all(self, *, use_metadata: bool = False) -> dict[int, list[FileInfo]]:
        """Every level's files (levels 0..9, each ascending). Backends that can list the whole
        replica in one request (S3) override this: a cold open then costs one LIST, not ten."""
        return {lvl: self.list_files(lvl, use_metadata=use_metadata)
                for lvl in range(MAX_LEVEL + 1)}

    @abc.abstractmethod
    def read(self, level: int, min_txid: int, max_txid: int, offset: int = 0,
             size: int | None = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of a file (to the end when ``size`` is None).

        Raises ObjectNotFoundError when the file is gone.
        """

    @abc.abstractmethod
    def write(self, level: int, min_txid: int, max_txid: int, data: bytes | BinaryIO,
              timestamp_ms: int, *, exclusive: bool = False) -> FileInfo:
        """Store a whole LTX file atomically (readers never see a partial object).

        ``data`` is bytes or a seekable binary file positioned at 0. ``timestamp_ms`` is the LTX
        header timestamp (stored as metadata / mtime). With ``exclusive`` the write fails with
        ObjectExistsError if the object already exists (conditional PUT / exclusive create).
        """

    @abc.abstractmethod
    def delete(self, files: list[FileInfo]) -> None:
        """Delete files; missing ones are ignored."""

    def probe_create_only(self) -> str:
        """Prove that the store keeps create-only writes, as write mode's conditional uploads
        need: create a new probe object (``PROBE_DIR``) exclusively, create it again the same way
        (which must be refused), then delete it. Returns what was checked (e.g.
        ``"If-None-Match: *"``), for the log.

        Raises UnsafeStoreError when the second create replaced the object, or the store rejects
        create-only writes; AccessDeniedError (and other StorageErrors) when it could not tell.
        """
        raise UnsafeStoreError(f"{type(self).__name__} cannot prove create-only writes")

    def check(self) -> None:  # noqa: B027 - optional hook
        """One cheap request that fails fast (BucketNotFoundError, AccessDeniedError, ...)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the client must not be used afterwards."""

    def __enter__(self) -> ReplicaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteFileReader(io.RawIOBase):
    """A read-only stream over one replica file, fetched in ranged GETs one chunk ahead."""

    def __init__(self, client: ReplicaClient, info: FileInfo, chunk_size: int = 8 * 1024 * 1024,
                 pool: ThreadPoolExecutor | None = None) -> None:
        self._client, self._info, self._chunk = client, info, chunk_size
        self._offset = 0  # next offset to request
        self._buf = memoryview(b"")
        self._pool = pool
        self._ahead: Future[bytes] | None = None

    def readable(self) -> bool:
        return True

    def _fetch(self, offset: int) -> bytes:
        size = min(self._chunk, self._info.size - offset)
        return self._client.read(self._info.level, self._info.min_txid, self._info.max_txid,
                                 offset, size)

    def _next_chunk(self) -> bytes:
        if self._offset >= self._info.size:
            return b""
        if self._ahead is not None:
            data = self._ahead.result()
        else:
            data = self._fetch(self._offset)
        self._offset += len(data)
        self._ahead = None
        if self._pool is not None and self._offset < self._info.size:
            self._ahead = self._pool.submit(self._fetch, self._offset)
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        if not self._buf:
            self._buf = memoryview(self._next_chunk())
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
