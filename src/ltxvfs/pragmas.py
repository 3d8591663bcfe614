"""``PRAGMA litestream_*`` and the SQL functions, and the time expressions they accept.

The VFS file hands every ``SQLITE_FCNTL_PRAGMA`` here; names we do not know go back to SQLite.
Times are RFC 3339 first, then relative phrases ("5 minutes ago", "yesterday") through the
``dateparser`` package, always resolved in UTC; ``latest`` returns to following the replica.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from .errors import PragmaError
from .times import format_time, parse_time

__all__ = ["PRAGMAS", "PragmaError", "PragmaTarget", "format_time", "handle_pragma", "parse_time"]


class PragmaTarget(Protocol):
    """What a VFS file offers the PRAGMAs."""

    def txid(self) -> int: ...
    def pinned_txid(self) -> int | None: ...
    def lag(self) -> int: ...
    def time_text(self) -> str: ...
    def travel_to(self, when: datetime | None = None, txid: int | None = None) -> None: ...
    def hydration_progress(self) -> str: ...
    def hydration_file(self) -> str: ...
    def write_enabled(self) -> bool: ...
    def set_write_enabled(self, enabled: bool) -> None: ...
    def sync_now(self) -> str: ...
    def sync_error(self) -> str: ...
    def stats(self) -> dict[str, object]: ...


#: Every PRAGMA the VFS answers, with its one-line meaning (docs and tests read this table).
PRAGMAS = {
    "litestream_txid": "TXID the connection sees, 16 hex digits (read-only)",
    "litestream_lag": "seconds since the last successful poll, -1 if never (read-only)",
    "litestream_time": "time of the data seen; set to RFC 3339, a relative time, or 'latest'",
    "litestream_pin_txid": "set to a TXID (hex) to read the database as of that TXID; "
                           "'latest' to follow again; reads the TXID of the pinned past state "
                           "(pinned by TXID or by time), or 'latest'",
    "litestream_hydration_progress": "percent of the hydration file written (read-only)",
    "litestream_hydration_file": "path of the hydration file, '' if none (read-only)",
    "litestream_write_enabled": "1 if writes are enabled; set to 1/0 (true/false, on/off)",
    "litestream_sync": "write mode: upload buffered commits now; returns the new TXID ('' if "
                       "there was nothing to sync)",
    "litestream_sync_error": "write mode: the last sync error, '' if the last sync worked "
                             "(read-only)",
    "litestream_stats": "counters of the database as JSON: GETs, bytes, cache hits and misses, "
                        "polls, syncs, conflicts, S3 requests by kind (read-only)",
}
_READ_ONLY = {"litestream_txid", "litestream_lag", "litestream_hydration_progress",
              "litestream_hydration_file", "litestream_sync", "litestream_sync_error",
              "litestream_stats"}


def handle_pragma(target: PragmaTarget, name: str, value: str | None) -> str | None:
    """The result of ``PRAGMA name`` / ``PRAGMA name = value``; None if the name is not ours."""
    name = name.lower()
    if name not in PRAGMAS:
        return None
    if value is not None and name in _READ_ONLY:
        raise PragmaError(f"{name} is read-only")
    if name == "litestream_txid":
        return f"{target.txid():016x}"
    if name == "litestream_lag":
        return str(target.lag())
    if name == "litestream_hydration_progress":
        return target.hydration_progress()
    if name == "litestream_hydration_file":
        return target.hydration_file()
    if name == "litestream_time":
        if value is not None:
            v = value.strip()
            target.travel_to(None if v.lower() == "latest" else parse_time(v))
        return target.time_text()
    if name == "litestream_sync":
        return target.sync_now()
    if name == "litestream_sync_error":
        return target.sync_error()
    if name == "litestream_stats":
        import json

        return json.dumps(target.stats(), sort_keys=True)
    if name == "litestream_pin_txid":
        if value is not None:
            v = value.strip()
            target.travel_to(txid=None if v.lower() == "latest" else _parse_txid(v))
        pinned = target.pinned_txid()  # after the change: a PRAGMA returns the new value
        return "latest" if pinned is None else f"{pinned:016x}"
    if value is not None:  # litestream_write_enabled
        v = value.strip().lower()
        if v in ("1", "true", "on"):
            target.set_write_enabled(True)
        elif v in ("0", "false", "off"):
            target.set_write_enabled(False)
        else:
            raise PragmaError(f"invalid value for litestream_write_enabled: {value} (use 0 or 1)")
    return "1" if target.write_enabled() else "0"


def _parse_txid(text: str) -> int:
    try:
        txid = int(text, 16)
    except ValueError:
        raise PragmaError(f"invalid TXID {text!r}: expected hex, e.g. 000000000000002a") from None
    if not 1 <= txid < 1 << 64:
        raise PragmaError(f"invalid TXID {text!r}: out of range")
    return txid
