"""The object metadata Litestream writes beside each LTX file in S3: ``litestream-timestamp``,
the LTX header's timestamp, so that time travel can choose files from a listing (spec 2.1, 2.4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

METADATA_KEY = "litestream-timestamp"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms_to_datetime(ms: int) -> datetime:
    """An LTX header timestamp (Unix ms) as an aware UTC datetime."""
    return _EPOCH + timedelta(milliseconds=ms)


def format_timestamp(ms: int) -> str:
    """Go's ``time.RFC3339Nano`` in UTC, as Litestream writes ``litestream-timestamp``.

    Fractional seconds appear only when non-zero, with trailing zeros trimmed:
    ``2023-11-14T22:13:20Z``, ``2023-11-14T22:13:20.1Z``, ``2023-11-14T22:13:20.123Z``.
    """
    t = ms_to_datetime(ms)
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    frac = f"{t.microsecond // 1000:03d}".rstrip("0")
    return f"{text}.{frac}Z" if frac else f"{text}Z"


def parse_timestamp(text: str) -> datetime | None:
    """An RFC 3339 timestamp with a zone (Go writes up to 9 fractional digits) as UTC, or None."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None
