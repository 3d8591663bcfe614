"""The private scratch directory of a process: journals of replica databases, temporary
hydration files.

One 0700 directory per process under the system temp dir, named ``ltxvfs-tmp-<pid>-<random>``.
A clean exit removes it; a killed process cannot, so each new one first removes the directories
of processes of the same user that no longer exist. Nothing in them outlives its process: the
VFS never treats a journal there as hot (the write buffer, not the journal, is what survives a
crash), and a temporary hydration file is rebuilt from the replica.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("ltxvfs")

PREFIX = "ltxvfs-tmp-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


def make_scratch_dir(parent: str | None = None) -> str:
    """Create this process's scratch directory (0700), after sweeping stale ones."""
    parent = parent or tempfile.gettempdir()
    sweep_stale(parent)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)


def remove_scratch_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sweep_stale(parent: str) -> int:
    """Remove scratch directories left by dead processes of this user; return how many.

    Only directories named like ours, owned by us, not links, whose PID is gone. A live PID
    (even one the system reused) keeps its directory: a leftover is cheaper than a mistake."""
    removed = 0
    uid = os.getuid()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for entry in entries:
        m = _NAME.match(entry.name)
        if m is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not entry.is_dir(follow_symlinks=False) or st.st_uid != uid or _alive(int(m.group(1))):
            continue
        shutil.rmtree(Path(parent) / entry.name, ignore_errors=True)
        removed += 1
    if removed:
        log.debug("removed %d scratch directories of exited processes in %s", removed, parent)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a PID we made: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a PID at all
        return True
    return True
