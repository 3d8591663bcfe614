"""Restore a replica (latest, a TXID or a moment) into a local SQLite database file.

Each plan file is streamed through the LTX decoder (file checksum verified) and its pages are
written in place into ``<output>.tmp``; later files win. The result is truncated to the final
commit, checked to contain every page, fsynced and renamed into place, so a crash never leaves a
half-restored database under the output name.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from .errors import RestoreError
from .ltx import Decoder, lock_pgno
from .plan import Plan, compute_plan
from .storage.base import FileInfo, RemoteFileReader, ReplicaClient

#: Size of one ranged GET while streaming a plan file.
CHUNK_SIZE = 8 * 1024 * 1024
#: Sidecar files SQLite may leave next to a database; removed with ``force``.
_SIDECARS = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class RestoreResult:
    path: Path
    txid: int
    page_size: int
    commit: int
    plan: Plan


def restore(client: ReplicaClient, output: str | os.PathLike[str], *, txid: int | None = None,
            timestamp: datetime | None = None, force: bool = False, plan: Plan | None = None,
            progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Restore the replica behind ``client`` to ``output``.

    ``progress(done_bytes, total_bytes)`` is called as plan files are read. Raises
    TxNotAvailableError / NonContiguousError from planning, LTXError for a corrupt file,
    RestoreError when the output exists (without ``force``) or the files do not make a database.
    """
    out = Path(output)
    if out.exists() or any(Path(f"{out}{s}").exists() for s in _SIDECARS):
        if not force:
            raise RestoreError(f"output {out} already exists "
                               "(overwrite it with --force, or force=True from Python)")
    if plan is None:
        plan = compute_plan(client, txid=txid, timestamp=timestamp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    total = sum(f.size for f in plan)
    done = 0
    try:
        with (open(tmp, "wb") as fh,
              ThreadPoolExecutor(max_workers=2, thread_name_prefix="ltxvfs-restore") as pool):
            applier = PlanApplier(fh)
            for info in plan:
                reader = io.BufferedReader(RemoteFileReader(client, info, CHUNK_SIZE, pool), CHUNK_SIZE)
                applier.apply(info, reader)
                done += info.size
                if progress:
                    progress(done, total)
            applier.finish()
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            for suffix in _SIDECARS:
                Path(f"{out}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return RestoreResult(out, plan.txid, applier.page_size, applier.commit, plan)


class _Discard:
    """A file that keeps nothing: restore's checks without writing a database."""

    def seek(self, offset: int, whence: int = 0) -> int:
        return offset

    def write(self, data: bytes) -> int:
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        return size or 0


class PlanApplier:
    """Applies plan files in order to ``fh`` (every check restore makes: each file decoded with
    its checksum verified, one page size, a snapshot first, every page present at the end).

    ``restore`` writes the database with it; with no ``fh`` nothing is written, which is how
    ``ltxvfs verify`` says whether a restore would succeed, with the very same checks.
    """

    def __init__(self, fh: BinaryIO | None = None) -> None:
        self._fh: BinaryIO = fh if fh is not None else _Discard()  # type: ignore[assignment]
        self.page_size = 0
        self.commit = 0
        self._seen = bytearray()

    def apply(self, info: FileInfo, reader: BinaryIO) -> None:
        """Raises LTXError for a corrupt file, RestoreError when it does not fit the plan."""
        self.page_size, self.commit = _apply_file(self._fh, reader, info, self.page_size,
                                                  self._seen)

    def finish(self) -> None:
        """Raises RestoreError when a page of the database is in no file of the plan."""
        _finish_database(self._fh, self.page_size, self.commit, self._seen)


def _apply_file(fh: BinaryIO, reader: BinaryIO, info: FileInfo, page_size: int,
                seen: bytearray) -> tuple[int, int]:
    dec = Decoder(reader, name=f"{info}")
    header = dec.header
    if page_size and header.page_size != page_size:
        raise RestoreError(f"{info}: page size {header.page_size} differs from {page_size}")
    if not page_size and not header.is_snapshot:
        raise RestoreError(f"{info}: the first file of a restore must be a snapshot")
    page_size = header.page_size
    need = (header.commit + 7) // 8
    del seen[need:]  # the database may have shrunk: pages beyond commit are gone
    seen.extend(bytes(need - len(seen)))
    for pgno in range(header.commit + 1, need * 8 + 1):
        seen[(pgno - 1) >> 3] &= ~(1 << ((pgno - 1) & 7)) & 0xFF
    for pgno, data in dec:
        fh.seek((pgno - 1) * page_size)
        fh.write(data)
        seen[(pgno - 1) >> 3] |= 1 << ((pgno - 1) & 7)
    fh.truncate(header.commit * page_size)
    return page_size, header.commit


def _finish_database(fh: BinaryIO, page_size: int, commit: int, seen: bytearray) -> None:
    lock = lock_pgno(page_size)
    for pgno in range(1, commit + 1):
        if not seen[(pgno - 1) >> 3] & (1 << ((pgno - 1) & 7)) and pgno != lock:
            raise RestoreError(f"page {pgno} is in no file of the plan; the replica is incomplete")
    if commit >= lock:
        fh.seek((lock - 1) * page_size)
        fh.write(bytes(page_size))
    fh.truncate(commit * page_size)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
