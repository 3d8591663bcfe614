"""Directory replica client in Litestream's ``file`` layout: ``<root>/ltx/<level>/<min>-<max>.ltx``.

The level directory is decimal here (``ltx/9``), unlike S3's ``0009`` (spec 2.1). Each file's mtime
is the LTX header timestamp, so a plain listing already answers time-travel questions and
``use_metadata`` changes nothing. Writes go to a uniquely named temporary file that is fsynced and
then renamed (or hard-linked, for exclusive creates) into place, so readers and concurrent writers
never see a partial file.

Below the root nothing is reached through a symbolic link: ``ltx``, the level directories and the
LTX files are opened relative to their parent's descriptor with ``O_NOFOLLOW``, so whoever can
write the replica directory cannot point a level or a file at something outside it (Litestream
follows such links; we refuse them). The root itself may be a link: that is the user's choice.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from ..errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectExistsError,
    ObjectNotFoundError,
    ReplicaURLError,
    StorageError,
    UnsafeStoreError,
)
from .base import (
    PROBE_BODY,
    PROBE_DIR,
    FileInfo,
    ReplicaClient,
    check_level,
    ltx_filename,
    parse_ltx_filename,
    probe_name,
)
from .url import ReplicaURL

log = logging.getLogger("ltxvfs.storage")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COPY_CHUNK = 1024 * 1024
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _etag(st: os.stat_result) -> str:
    """Which file this is (FileInfo.etag): every write is a new inode (temp file + rename), and
    the mtime (the LTX timestamp) tells apart a new file that reuses a freed inode number. The
    ctime, which no one can set back, tells apart a file rewritten in place (``cp -p``, ``rsync
    --inplace -t``: same inode, size and mtime, other bytes). It also moves on chmod, chown or a
    new hard link: the file then reads as another version (fetched again, never stale)."""
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_ctime_ns:x}"


def _ns_to_datetime(ns: int) -> datetime:
    """Exact (to the microsecond) UTC datetime of a nanosecond Unix time; no float rounding."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


class FileReplicaClient(ReplicaClient):
    """One replica in a local (or mounted) directory. Thread-safe: it keeps no mutable state."""

    def __init__(self, root: str | os.PathLike[str] | ReplicaURL) -> None:
        if isinstance(root, ReplicaURL):
            if root.scheme != "file" or root.path is None:
                raise ValueError(f"not a file replica URL: {root.url}")
            root = root.path
        path = Path(root)
        if not path.is_absolute():
            raise ReplicaURLError(f"file replica root must be an absolute path: {str(path)!r}")
        self.root = path
        self.url = path.as_uri()

    @property
    def identity(self) -> str:
        return "file:" + os.path.realpath(self.root)

    def level_dir(self, level: int) -> Path:
        return self.root / "ltx" / str(check_level(level))

    def path(self, level: int, min_txid: int, max_txid: int) -> Path:
        """Where an LTX file lives; built only from a validated level and TXIDs."""
        return self.level_dir(level) / ltx_filename(min_txid, max_txid)

    def check(self) -> None:
        """Fail fast when the replica directory is missing, not a directory, or unreadable."""
        try:
            st = self.root.stat()
        except FileNotFoundError:
            raise BucketNotFoundError(
                f"file: replica directory {self.url} does not exist") from None
        except OSError as exc:
            raise self._error(exc, "check", self.root) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"file: replica root {self.url} is not a directory")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise AccessDeniedError(f"file: replica directory {self.url} is not readable")

    def list_files(self, level: int, *, seek: int = 0,
                   use_metadata: bool = False) -> list[FileInfo]:
        directory = self.level_dir(level)
        infos: list[FileInfo] = []
        try:
            with self._level_fd(level) as dfd, os.scandir(dfd) as entries:
                for entry in entries:
                    txids = parse_ltx_filename(entry.name)
                    if txids is None or txids[0] < seek:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted by retention while we listed
                    if stat.S_ISREG(st.st_mode):  # links and other non-files are skipped
                        infos.append(FileInfo(level, txids[0], txids[1], st.st_size,
                                              _ns_to_datetime(st.st_mtime_ns), _etag(st)))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._error(exc, "list", directory) from exc
        infos.sort(key=lambda f: (f.min_txid, f.max_txid))
        return infos

    def read(self, level: int, min_txid: int, max_txid: int, offset: int = 0,
             size: int | None = None) -> bytes:
        if offset < 0 or (size is not None and size < 0):
            raise ValueError(f"invalid range: offset={offset} size={size}")
        path = self.path(level, min_txid, max_txid)
        try:
            with self._level_fd(level) as dfd:
                fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                f.seek(offset)
                return f.read() if size is None else f.read(size)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"file: {path} does not exist in {self.url}") from None
        except OSError as exc:
            raise self._error(exc, "read", path) from exc

    def write(self, level: int, min_txid: int, max_txid: int, data: bytes | BinaryIO,
              timestamp_ms: int, *, exclusive: bool = False) -> FileInfo:
        """Write a temp file, set its mtime, fsync, then rename (or link if exclusive), fsync dir.

        Setting the mtime before the file becomes visible (Litestream sets it just after the
        rename) means a concurrent listing never sees the file with the wrong time.
        """
        final = self.path(level, min_txid, max_txid)
        ns = timestamp_ms * 1_000_000
        tmp = f"{final.name}.{secrets.token_hex(6)}.tmp"
        try:
            with self._level_fd(level, create=True) as dfd:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, _FILE_MODE, dir_fd=dfd)
                placed = False
                try:
                    with os.fdopen(fd, "wb") as f:
                        os.fchmod(f.fileno(), _FILE_MODE)  # whatever the umask
                        if isinstance(data, (bytes, bytearray, memoryview)):
                            f.write(data)
                        else:
                            shutil.copyfileobj(data, f, _COPY_CHUNK)
                        f.flush()
                        size = f.tell()
                        os.utime(f.fileno(), ns=(ns, ns))
                        os.fsync(f.fileno())
                    if exclusive:
                        self._link_exclusive(dfd, tmp, final)
                    else:
                        # Renaming over a link replaces the link, never what it points at.
                        os.replace(tmp, final.name, src_dir_fd=dfd, dst_dir_fd=dfd)
                        placed = True
                finally:
                    if not placed:
                        try:
                            os.unlink(tmp, dir_fd=dfd)
                        except FileNotFoundError:
                            pass
                os.fsync(dfd)  # make the rename/link durable
                # After placing: a link, an unlink or a rename moves the ctime (in the ETag).
                etag = _etag(os.stat(final.name, dir_fd=dfd, follow_symlinks=False))
        except OSError as exc:
            raise self._error(exc, "write", final) from exc
        return FileInfo(level, min_txid, max_txid, size, _ns_to_datetime(ns), etag)

    def _link_exclusive(self, dfd: int, tmp: str, final: Path) -> None:
        """Hard-link the finished temp file into place: atomic, and fails if the name exists."""
        try:
            os.link(tmp, final.name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            raise ObjectExistsError(f"file: {final} already exists in {self.url}") from None
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise StorageError(f"file: exclusive write of {final} needs hard links, which "
                                   f"this filesystem does not support ({exc.strerror})") from exc
            raise

    #: How an exclusive create is done here (see write).
    create_only = "exclusive create (hard link of a finished temp file; O_EXCL)"

    @property
    def store(self) -> str:
        return f"the directory {self.url}"

    def probe_create_only(self) -> str:
        """The exclusive create that ``write(exclusive=True)`` relies on, in ``<root>/ltxvfs-probe``:
        a temp file hard-linked to a new name must succeed, a second one linked to the same name
        must fail with EEXIST, and so must an O_EXCL open of it; then everything is removed
        (the directory stays: another process may be probing in it)."""
        name = probe_name()
        made: list[str] = []
        where = self.root / PROBE_DIR / name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            rfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                try:
                    os.mkdir(PROBE_DIR, _DIR_MODE, dir_fd=rfd)
                except FileExistsError:
                    pass
                dfd = os.open(PROBE_DIR, _NOFOLLOW_DIR, dir_fd=rfd)
            finally:
                os.close(rfd)
            try:
                for attempt in (1, 2):
                    tmp = f"{name}.{attempt}.tmp"
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, _FILE_MODE, dir_fd=dfd)
                    made.append(tmp)
                    with os.fdopen(fd, "wb") as f:
                        f.write(PROBE_BODY)
                    try:
                        self._link_exclusive(dfd, tmp, where)
                    except ObjectExistsError:
                        if attempt == 2:
                            break  # refused, as promised
                        raise
                    except StorageError as exc:  # no hard links here
                        raise UnsafeStoreError(f"{self.store} cannot do exclusive creates: "
                                               f"{exc}") from exc
                    made.append(name)
                    if attempt == 2:
                        raise UnsafeStoreError(
                            f"{self.store} does not keep exclusive creates: a second hard link "
                            f"to {where} succeeded", overwrote=True)
                try:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, _FILE_MODE, dir_fd=dfd))
                except FileExistsError:
                    return self.create_only
                raise UnsafeStoreError(f"{self.store} does not keep exclusive creates: an "
                                       f"O_EXCL open of the existing {where} succeeded",
                                       overwrote=True)
            finally:
                for entry in made:
                    try:
                        os.unlink(entry, dir_fd=dfd)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        log.warning("create-only probe: could not remove %s from %s (harmless, "
                                    "safe to delete): %s", entry, self.url, exc)
                os.close(dfd)
        except OSError as exc:
            raise self._error(exc, "create-only probe in", self.root / PROBE_DIR) from exc

    def delete(self, files: list[FileInfo]) -> None:
        for info in files:
            path = self.path(info.level, info.min_txid, info.max_txid)
            try:
                with self._level_fd(info.level) as dfd:
                    os.unlink(path.name, dir_fd=dfd)  # removes a link itself, not its target
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._error(exc, "delete", path) from exc

    @contextmanager
    def _level_fd(self, level: int, *, create: bool = False) -> Iterator[int]:
        """A descriptor of ``<root>/ltx/<level>``, reached without following any link below
        the root (a link there fails with ELOOP or ENOTDIR)."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in ("ltx", str(check_level(level))):
                if create:
                    try:
                        os.mkdir(name, _DIR_MODE, dir_fd=fd)
                    except FileExistsError:
                        pass
                child = os.open(name, _NOFOLLOW_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _error(self, exc: OSError, what: str, path: Path) -> StorageError:
        if isinstance(exc, PermissionError):
            return AccessDeniedError(f"file: {what} {path}: permission denied")
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return StorageError(f"file: {what} {path}: a symbolic link or non-directory inside "
                                f"the replica {self.url}; file replicas never follow links "
                                f"below their root")
        return StorageError(f"file: {what} {path}: {exc.strerror or exc}")

