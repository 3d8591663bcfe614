"""Where a replica's shared files live under ``cache_dir``, created private (0700)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ..errors import ConfigError


def replica_dir(cache_dir: str | os.PathLike[str], identity: str) -> Path:
    """The directory of the replica whose location is ``identity`` (``ReplicaURL.identity``),
    created 0700 if missing. Named by a hash of the identity: no bucket names or paths in file
    names, and one directory however the replica URL was spelled.

    Refuses (ConfigError) a cache directory that is not a directory, belongs to another user,
    or that other users may write to: its contents are trusted as pages of the database.
    """
    root = Path(cache_dir).expanduser()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(root)
    name = hashlib.sha256(identity.encode()).hexdigest()[:32]
    path = root / name
    path.mkdir(mode=0o700, exist_ok=True)
    _check_private(path)
    return path


def _check_private(path: Path) -> None:
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"cache_dir {path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(f"cache_dir {path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o022:
        raise ConfigError(f"cache_dir {path} is writable by other users "
                          f"(mode {stat.S_IMODE(st.st_mode):o}): make it 0700")
