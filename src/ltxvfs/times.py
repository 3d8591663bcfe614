"""Times as ltxvfs reads and writes them: RFC 3339 (Go's RFC3339Nano, ``Z`` for UTC) and the
relative phrases time travel accepts ("5 minutes ago", "yesterday", through ``dateparser``),
always resolved in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

from .errors import PragmaError


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A moment from RFC 3339 or a relative phrase; raises PragmaError with the input."""
    s = text.strip()
    if not s:
        raise PragmaError("invalid timestamp (expected RFC3339 or relative time like "
                          "'5 minutes ago'): ''")
    try:
        value = datetime.fromisoformat(s)
    except ValueError:
        pass
    else:
        try:  # always UTC from here on; a year-1 time with a positive offset has none
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        except OverflowError:
            raise PragmaError(f"invalid timestamp (out of range): {text}") from None
    import dateparser  # imported lazily: it takes ~0.3 s to load

    base = (now or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
    value = dateparser.parse(s, settings={
        "RELATIVE_BASE": base, "TIMEZONE": "UTC", "TO_TIMEZONE": "UTC",
        "RETURN_AS_TIMEZONE_AWARE": True, "PREFER_DATES_FROM": "past"})
    if value is None:
        raise PragmaError("invalid timestamp (expected RFC3339 or relative time like "
                          f"'5 minutes ago'): {text}")
    return value.astimezone(UTC)


def format_time(t: datetime) -> str:
    """Go's RFC3339Nano: fractional seconds without trailing zeros, ``Z`` for UTC."""
    frac = f"{t.microsecond:06d}".rstrip("0")
    base = t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "")
    off = t.utcoffset()
    if off is None or off.total_seconds() == 0:
        return base + "Z"
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{base}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
