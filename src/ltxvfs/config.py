"""Configuration: environment variables (the Go VFS's names) and per-database URI parameters.

``VFSConfig.from_env()`` reads the environment once, at registration; a database's URI parameters
(``file:db?vfs=litestream&replica_url=...&poll_interval=500ms``) override it for that database
only, so one process can open many replicas through the one VFS.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

MIB = 1024 * 1024

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


_LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARN", "WARNING", "ERROR"})


class ConfigError(ValueError):
    """A configuration value (environment variable or URI parameter) is invalid."""


def parse_duration(text: str, name: str = "duration") -> float:
    """Seconds from Go duration syntax (``500ms``, ``1s``, ``1m30s``) or a plain number of seconds."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):  # float() takes nan and inf: never a usable interval
            raise ConfigError(f"invalid {name} {text!r}: expected a finite duration")
        return value
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise ConfigError(f"invalid {name} {text!r}: expected a duration like 500ms, 1s or 1m30s")
    return sign * total


def parse_size(text: str, name: str = "size") -> int:
    """Bytes from ``10485760``, ``10MiB``, ``512k``, ``1G``."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid {name} {text!r}: expected bytes, e.g. 10485760 or 10MiB")
    unit = (m.group(2) or "b").lower()[:1]
    return int(m.group(1)) * {"b": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}[unit]


def parse_bool(text: str, name: str = "flag") -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off", ""):
        return False
    raise ConfigError(f"invalid {name} {text!r}: expected true or false")


@dataclass(frozen=True)
class VFSConfig:
    """Settings of the ``litestream`` VFS; one field per knob, with its default.

    Environment names (read by :meth:`from_env`) are the Go VFS's where it has one; the URI
    parameter of each field is the field name (``replica_url``, ``poll_interval``, ...).
    """

    #: Replica to open (``s3://bucket/path?...`` or ``file:///dir``). Env ``LITESTREAM_REPLICA_URL``.
    replica_url: str | None = None
    #: Seconds between polls for new LTX files. Env ``LITESTREAM_POLL_INTERVAL`` (ours).
    poll_interval: float = 1.0
    #: Bytes of decompressed pages kept per replica. Env ``LITESTREAM_CACHE_SIZE`` (ours).
    cache_size: int = 10 * MIB
    #: Seconds a read-only open waits for an empty replica to get its first file, then fails.
    #: Env ``LITESTREAM_OPEN_TIMEOUT`` (ours; the Go VFS waits for ever).
    open_timeout: float = 30.0
    #: ``DEBUG`` or ``INFO``. Env ``LITESTREAM_LOG_LEVEL``.
    log_level: str = "INFO"
    #: Buffer writes and sync them as LTX files. Env ``LITESTREAM_WRITE_ENABLED``.
    write_enabled: bool = False
    #: Seconds between syncs in write mode. Env ``LITESTREAM_SYNC_INTERVAL``.
    sync_interval: float = 1.0
    #: Write buffer file. Env ``LITESTREAM_BUFFER_PATH``.
    buffer_path: str | None = None
    #: Write mode: compaction intervals of L1, L2, L3... (comma-separated durations; empty
    #: or ``off`` disables compaction). Env ``LITESTREAM_COMPACTION_LEVELS`` (ours).
    compaction_levels: tuple[float, ...] = (30.0, 300.0, 3600.0)
    #: Write mode: how often to write an L9 snapshot (0 disables). Env
    #: ``LITESTREAM_SNAPSHOT_INTERVAL`` (ours).
    snapshot_interval: float = 86400.0
    #: Write mode: how long snapshots are kept (the newest always is).
    snapshot_retention: float = 86400.0
    #: Write mode: how long L0 files covered by L1 are kept (0 keeps them for ever).
    l0_retention: float = 300.0
    #: Build a local full copy in the background. Env ``LITESTREAM_HYDRATION_ENABLED``.
    hydration_enabled: bool = False
    #: Where to hydrate (turns hydration on). Env ``LITESTREAM_HYDRATION_PATH``.
    hydration_path: str | None = None
    #: Keep the hydration file (and its TXID) on close and resume from it next time.
    #: Env ``LITESTREAM_HYDRATION_PERSISTENT`` (ours; the default deletes it, as announced).
    hydration_persistent: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> VFSConfig:
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for f in fields(cls):
            key = f"LITESTREAM_{f.name.upper()}"
            if env.get(key, "") != "":
                values[f.name] = env[key]
        return cls().with_params(values, source="environment variable LITESTREAM_")

    def with_params(self, params: Mapping[str, str], source: str = "URI parameter ") -> VFSConfig:
        """A copy with string values (URI parameters or environment) parsed and applied."""
        changes: dict[str, object] = {}
        for f in fields(self):
            if f.name not in params:
                continue
            raw = params[f.name]
            label = f"{source}{f.name.upper() if source.startswith('env') else f.name}"
            if f.name == "compaction_levels":
                value = tuple(parse_duration(x, label) for x in raw.split(",")
                              if x.strip()) if raw.strip().lower() not in ("", "off") else ()
                if any(v <= 0 for v in value):  # type: ignore[union-attr]
                    raise ConfigError(f"invalid {label} {raw!r}: intervals must be positive")
            elif f.name in ("snapshot_interval", "snapshot_retention", "l0_retention"):
                value = parse_duration(raw, label)
                if value < 0:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: must not be negative")
            elif f.name in ("poll_interval", "sync_interval", "open_timeout"):
                value: object = parse_duration(raw, label)
                if f.name == "sync_interval" and value == 0:
                    value = 1.0
                if f.name == "poll_interval" and value <= 0:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: must be positive")
            elif f.name == "cache_size":
                value = parse_size(raw, label)
            elif f.name in ("write_enabled", "hydration_enabled", "hydration_persistent"):
                value = parse_bool(raw, label)
            elif f.name == "log_level":
                value = raw.strip().upper()
                if value not in _LOG_LEVELS:
                    raise ConfigError(f"invalid {label} {raw!r}: expected one of "
                                      f"{', '.join(sorted(_LOG_LEVELS))}")
            else:
                value = raw
            changes[f.name] = value
        return replace(self, **changes)

    @property
    def hydration(self) -> bool:
        """A path alone turns hydration on, as the product announcement says."""
        return self.hydration_enabled or bool(self.hydration_path)


#: URI parameter names we read (SQLite reserves cache, mode, vfs, immutable, nolock, psow).
URI_PARAMETERS = tuple(f.name for f in fields(VFSConfig))
