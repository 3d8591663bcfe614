"""Which LTX files make up a database state: the latest one, a TXID, or a moment in time.

This is Litestream's restore plan (``CalcRestorePlan``): the newest eligible L9 snapshot, then a
greedy chain through levels 8..0 that always takes the file reaching furthest. The listing is
fetched once (levels in parallel) and the choice itself is a pure function, so it can be tested
without storage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import NonContiguousError, PlanError, TxNotAvailableError
from .storage.base import SNAPSHOT_LEVEL, FileInfo, ReplicaClient, format_txid
from .times import format_time

#: Levels that the greedy chain walks (the snapshot level is handled first, separately).
CHAIN_LEVELS = tuple(range(SNAPSHOT_LEVEL - 1, -1, -1))


@dataclass(frozen=True)
class Plan:
    """The files to apply, in order. The chain starts at TXID 1, so the first file is a snapshot."""

    files: tuple[FileInfo, ...]

    @property
    def txid(self) -> int:
        return self.files[-1].max_txid

    @property
    def created_at(self) -> datetime:
        return self.files[-1].created_at

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def list_levels(client: ReplicaClient, *, use_metadata: bool = False,
                levels: Sequence[int] = tuple(range(SNAPSHOT_LEVEL + 1))) -> dict[int, list[FileInfo]]:
    """The listing of ``levels``: all of them in one go where the backend can (S3: one LIST of
    the whole replica), else one LIST per level, in parallel."""
    if len(levels) == SNAPSHOT_LEVEL + 1:
        return client.list_all(use_metadata=use_metadata)
    with ThreadPoolExecutor(max_workers=len(levels), thread_name_prefix="ltxvfs-list") as pool:
        results = pool.map(lambda lvl: client.list_files(lvl, use_metadata=use_metadata), levels)
        return dict(zip(levels, results, strict=True))


def compute_plan(client: ReplicaClient, *, txid: int | None = None,
                 timestamp: datetime | None = None) -> Plan:
    """List the replica and choose the files for the latest state, ``txid`` or ``timestamp``."""
    listing = list_levels(client, use_metadata=timestamp is not None)
    return choose_plan(listing, txid=txid, timestamp=timestamp)


def choose_plan(listing: Mapping[int, Sequence[FileInfo]], *, txid: int | None = None,
                timestamp: datetime | None = None) -> Plan:
    """The restore plan from per-level listings (each ascending by MinTXID, MaxTXID).

    Raises TxNotAvailableError when nothing (or not exactly ``txid``) can be reached and, for the
    latest state only, NonContiguousError when a gap is left that no file covers.
    """
    if txid is not None and timestamp is not None:
        raise PlanError("cannot specify both TXID & timestamp to restore")
    if txid is not None and txid < 1:
        raise TxNotAvailableError(f"transaction not available: invalid TXID {txid}")
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)

    def eligible(f: FileInfo) -> bool:
        return (txid is None or f.max_txid <= txid) and (
            timestamp is None or f.created_at < timestamp)

    plan: list[FileInfo] = []
    current = 0
    snapshots = [f for f in listing.get(SNAPSHOT_LEVEL, ()) if eligible(f)]
    if snapshots:
        plan.append(snapshots[-1])
        current = snapshots[-1].max_txid

    cursors = {lvl: 0 for lvl in CHAIN_LEVELS}
    while txid is None or current < txid:
        best: FileInfo | None = None
        for lvl in CHAIN_LEVELS:
            files = listing.get(lvl, ())
            i = cursors[lvl]
            while i < len(files) and files[i].min_txid <= current + 1:
                f = files[i]
                i += 1
                if f.max_txid <= current or not eligible(f):
                    continue
                if best is None or _better(f, best):
                    best = f
            cursors[lvl] = i
        if best is None:
            break
        plan.append(best)
        current = best.max_txid

    if txid is None and timestamp is None:
        for lvl in CHAIN_LEVELS:
            files = listing.get(lvl, ())
            if cursors[lvl] < len(files):
                nxt = files[cursors[lvl]]
                raise NonContiguousError(
                    f"non-contiguous ltx files: have up to {format_txid(current)} but next file "
                    f"starts at {format_txid(nxt.min_txid)} (level {lvl})")
    if not plan:
        raise TxNotAvailableError(_not_available(listing, txid, timestamp))
    if txid is not None and current != txid:
        raise TxNotAvailableError(
            f"transaction not available: no chain of LTX files ends at TXID {format_txid(txid)} "
            f"(nearest below: {format_txid(current)})")
    return Plan(tuple(plan))


def choose_bridge(listing: Mapping[int, Sequence[FileInfo]], txid: int,
                  target: int) -> tuple[FileInfo, ...] | None:
    """Files that carry a state at ``txid`` forward to ``target`` when L0 no longer holds the
    next TXIDs (retention deleted them after compaction); None if levels 0-8 cannot get there.

    A compacted file starting at or before ``txid`` also holds pages the state already has;
    applying it moves them to the file's key and out of the page cache, and the reader fetches
    them again. The restore plan's choice (a snapshot, the largest files) would move nearly
    every page, so here each step takes, among the files holding the next TXID, the one that
    starts latest — least overlap — and then reaches furthest. Snapshots (L9) overlap almost
    everything and are left to the caller's fallback, the plan itself.
    """
    chain: list[FileInfo] = []
    current = txid
    while current < target:
        nxt = current + 1
        best: FileInfo | None = None
        for lvl in CHAIN_LEVELS:
            for f in listing.get(lvl, ()):
                if f.min_txid > nxt:
                    break  # each listing is ascending by MinTXID
                if f.max_txid >= nxt and (best is None or (f.min_txid, f.max_txid)
                                          > (best.min_txid, best.max_txid)):
                    best = f
        if best is None or best.max_txid > target:
            return None
        chain.append(best)
        current = best.max_txid
    return tuple(chain)


def _better(a: FileInfo, b: FileInfo) -> bool:
    """Litestream's tie-break: larger MaxTXID, smaller MinTXID, higher level, earlier creation."""
    return (a.max_txid, -a.min_txid, a.level, -a.created_at.timestamp()) > (
        b.max_txid, -b.min_txid, b.level, -b.created_at.timestamp())


def _not_available(listing: Mapping[int, Sequence[FileInfo]], txid: int | None,
                   timestamp: datetime | None) -> str:
    files = [f for fs in listing.values() for f in fs]
    if not files:
        return "transaction not available: the replica has no LTX files"
    if timestamp is not None:
        oldest = min(f.created_at for f in files)
        return (f"transaction not available: no LTX file before "
                f"{format_time(timestamp.astimezone(UTC))}; the oldest retained file is from "
                f"{format_time(oldest.astimezone(UTC))}")
    if txid is not None:
        return f"transaction not available: TXID {format_txid(txid)} is not in the replica"
    return "transaction not available"
