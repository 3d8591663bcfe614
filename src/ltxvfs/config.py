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

from .errors import ConfigError

MIB = 1024 * 1024

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


_LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARN", "WARNING", "ERROR"})

#: ``single_writer`` values: check that the store keeps create-only writes, or trust it.
SINGLE_WRITER_MODES = ("verify", "trusted")

#: The smallest page cache (it always keeps at least the page last read, whatever its size).
MIN_CACHE_SIZE = 4096




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
    #: Ceiling of the idle back-off: a replica no connection reads polls less and less often
    #: (2, 4, 8, ... intervals), up to this. Env ``LITESTREAM_IDLE_POLL_INTERVAL`` (ours).
    idle_poll_interval: float = 30.0
    #: A read transaction starts from data at most this old: when the last completed check is
    #: older, it checks first. None: 3 × ``poll_interval``. Env ``LITESTREAM_MAX_LAG`` (ours).
    max_lag: float | None = None
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
    #: Write mode: ``verify`` proves once per process and replica that the store refuses to
    #: overwrite (2 PUTs + 1 DELETE) and refuses write mode if it does not; ``trusted`` skips
    #: that (you guarantee one writer), with a warning at every start. Env
    #: ``LITESTREAM_SINGLE_WRITER`` (ours).
    single_writer: str = "verify"
    #: Build a local full copy in the background. Env ``LITESTREAM_HYDRATION_ENABLED``.
    hydration_enabled: bool = False
    #: Where to hydrate (turns hydration on). Env ``LITESTREAM_HYDRATION_PATH``.
    hydration_path: str | None = None
    #: Keep the hydration file (and its TXID) on close and resume from it next time.
    #: Env ``LITESTREAM_HYDRATION_PERSISTENT`` (ours; the default deletes it, as announced).
    hydration_persistent: bool = False
    #: A directory shared by the processes of this host (frames, indexes, poll results, the
    #: hydration lock) that survives restarts; None: nothing shared. Env ``LITESTREAM_CACHE_DIR``
    #: (ours). Layout and safety rules: ``host/``.
    cache_dir: str | None = None
    #: Bytes the cache directory may hold per replica before it evicts. Env
    #: ``LITESTREAM_CACHE_DIR_SIZE`` (ours).
    cache_dir_size: int = 1024 * MIB

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
            elif f.name in ("idle_poll_interval", "max_lag"):
                value = parse_duration(raw, label)
                if f.name == "idle_poll_interval" and value <= 0:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: must be positive (equal to "
                                      "poll_interval: no idle back-off)")
                if f.name == "max_lag" and value < 0:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: must not be negative (0: "
                                      "every read transaction checks for new data first)")
            elif f.name in ("poll_interval", "sync_interval", "open_timeout"):
                value: object = parse_duration(raw, label)
                if f.name == "sync_interval" and value == 0:
                    raise ConfigError(f"invalid {label} {raw!r}: must not be 0 (a negative "
                                      "interval syncs only on close and on PRAGMA litestream_sync)")
                if f.name == "poll_interval" and value <= 0:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: must be positive")
                if f.name == "open_timeout" and value < 0:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: must not be negative (0: do "
                                      "not wait for an empty replica)")
            elif f.name == "cache_dir_size":
                value = parse_size(raw, label)
                if value < MIB:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: at least 1MiB")
            elif f.name == "cache_size":
                value = parse_size(raw, label)
                if value < MIN_CACHE_SIZE:  # type: ignore[operator]
                    raise ConfigError(f"invalid {label} {raw!r}: at least {MIN_CACHE_SIZE} "
                                      "bytes (4KiB)")
            elif f.name in ("write_enabled", "hydration_enabled", "hydration_persistent"):
                value = parse_bool(raw, label)
            elif f.name == "single_writer":
                value = raw.strip().lower()
                if value not in SINGLE_WRITER_MODES:
                    raise ConfigError(f"invalid {label} {raw!r}: expected verify (check the "
                                      "store, the default) or trusted (skip the check)")
            elif f.name == "log_level":
                value = raw.strip().upper()
                if value not in _LOG_LEVELS:
                    raise ConfigError(f"invalid {label} {raw!r}: expected one of "
                                      f"{', '.join(sorted(_LOG_LEVELS))}")
            else:
                value = raw
            changes[f.name] = value
        new = replace(self, **changes)
        if "idle_poll_interval" in params and new.idle_poll_interval < new.poll_interval:
            label = f"{source}{'IDLE_POLL_INTERVAL' if source.startswith('env') else 'idle_poll_interval'}"
            raise ConfigError(f"invalid {label} {params['idle_poll_interval']!r}: less than poll_interval "
                              f"({new.poll_interval:g}s); the idle back-off only lengthens the "
                              "interval (equal: no back-off)")
        return new

    @property
    def hydration(self) -> bool:
        """A path alone turns hydration on, as the product announcement says."""
        return self.hydration_enabled or bool(self.hydration_path)

    def resolved(self, name: str) -> object:
        """The value of setting ``name`` in force: ``max_lag`` left out is 3 × ``poll_interval``;
        the idle ceiling is never below ``poll_interval`` (a longer interval alone: no back-off)."""
        if name == "max_lag":
            return 3 * self.poll_interval if self.max_lag is None else self.max_lag
        if name == "idle_poll_interval":
            return max(self.idle_poll_interval, self.poll_interval)
        return getattr(self, name)


#: URI parameter names we read. ``log_level`` is process-wide (one ``ltxvfs`` logger), so only
#: its environment variable sets it.
URI_PARAMETERS = tuple(f.name for f in fields(VFSConfig) if f.name != "log_level")
#: URI parameters SQLite itself reads: they pass through.
SQLITE_URI_PARAMETERS = frozenset({"vfs", "mode", "cache", "immutable", "nolock", "psow", "modeof"})

#: Settings of a replica (not of one connection), by when they are in force: always; while
#: write mode is on; while hydrating. ``open_timeout`` only matters to the first open.
REPLICA_SETTINGS = ("poll_interval", "idle_poll_interval", "max_lag", "cache_size", "cache_dir",
                    "cache_dir_size")
WRITE_SETTINGS = ("sync_interval", "buffer_path", "compaction_levels", "snapshot_interval",
                  "snapshot_retention", "l0_retention", "single_writer")
HYDRATION_SETTINGS = ("hydration_path", "hydration_persistent")


def uri_settings(params: Mapping[str, str | None]) -> dict[str, str]:
    """The ltxvfs settings among a URI's ``params`` (name -> raw value). Unknown names are an
    error (with a "did you mean"), so a misspelled setting never silently does nothing;
    SQLite's own parameters pass through."""
    import difflib

    out: dict[str, str] = {}
    for name, value in params.items():
        if name in SQLITE_URI_PARAMETERS:
            continue
        if name == "log_level":
            raise ConfigError("the log_level URI parameter is not supported: logging is "
                              "process-wide (set LITESTREAM_LOG_LEVEL, or configure the "
                              "'ltxvfs' logger)")
        if name not in URI_PARAMETERS:
            close = difflib.get_close_matches(name, URI_PARAMETERS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f" (known: {', '.join(URI_PARAMETERS)})"
            raise ConfigError(f"unknown URI parameter {name!r}{hint}")
        if value is not None:
            out[name] = value
    return out


def check_joining(current: VFSConfig, new: VFSConfig, given: set[str], writing: bool,
                  hydrating: bool) -> None:
    """A connection joining a replica already open in this process (with ``current``) may repeat
    its settings; a different value for one in force is a ConfigError naming it. Settings not in
    force yet (write mode or hydration off) are the joining connection's to choose when it turns
    them on. ``given``: the settings its URI names (the environment applies to all alike)."""
    if new.replica_url != current.replica_url:
        from .storage.url import parse_replica_url

        a, b = parse_replica_url(current.replica_url or ""), parse_replica_url(new.replica_url or "")
        if replace(a, url="") != replace(b, url=""):
            raise ConfigError(f"replica_url {b.url} names the replica already open as {a.url} "
                              "with other options: options of a replica URL are per replica; "
                              "give the same ones")
    in_force = set(REPLICA_SETTINGS)
    if writing:
        in_force.update(WRITE_SETTINGS)
    if hydrating:
        in_force.update(HYDRATION_SETTINGS)
    for name in sorted(given & in_force):
        # Compare the values in force (a default resolved from poll_interval equals the same
        # value given explicitly), not the raw fields.
        mine, theirs = new.resolved(name), current.resolved(name)
        if mine != theirs:
            raise ConfigError(f"{name}={_show(mine)} conflicts with {name}={_show(theirs)}, in "
                              "force for this replica since an earlier connection opened it: "
                              "settings are per replica; repeat the value or leave it out")


def _show(value: object) -> str:
    if value is None:
        return "(default)"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}s" for v in value) or "off"
    if isinstance(value, float):
        return f"{value:g}s"
    return str(value)
