"""PEP 249's type objects and constructors, adapters, and the ``Row`` class of
:mod:`ltxvfs.dbapi`."""

from __future__ import annotations

import datetime
import time as _time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ProgrammingError

if TYPE_CHECKING:
    from . import Cursor

# --- types (PEP 249) -----------------------------------------------------------------------------

Date = datetime.date
Time = datetime.time
Timestamp = datetime.datetime
Binary = memoryview


def DateFromTicks(ticks: float) -> datetime.date:  # noqa: N802 - PEP 249 names
    return Date(*_time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> datetime.time:  # noqa: N802
    return Time(*_time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> datetime.datetime:  # noqa: N802
    return Timestamp(*_time.localtime(ticks)[:6])


class _TypeObject:
    """Compares equal to the declared column types of one SQLite affinity (``type_code`` in
    ``cursor.description`` is the column's declared type, ``None`` for an expression)."""

    def __init__(self, name: str, test) -> None:
        self.name, self._test = name, test

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self._test(other.upper())

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<dbapi type {self.name}>"


def _affinity(decl: str) -> str:
    """SQLite's column affinity rules (https://sqlite.org/datatype3.html, 3.1)."""
    if "INT" in decl:
        return "INTEGER"
    if any(s in decl for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in decl or not decl:
        return "BLOB"
    if any(s in decl for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


STRING = _TypeObject("STRING", lambda d: _affinity(d) == "TEXT")
BINARY = _TypeObject("BINARY", lambda d: _affinity(d) == "BLOB")
NUMBER = _TypeObject("NUMBER", lambda d: _affinity(d) in ("INTEGER", "REAL", "NUMERIC"))
DATETIME = _TypeObject("DATETIME", lambda d: "DATE" in d or "TIME" in d)
ROWID = _TypeObject("ROWID", lambda d: d == "INTEGER")

#: (type, protocol) -> adapter, as sqlite3.adapters; date and datetime have sqlite3's (ISO text).
adapters: dict[tuple[type, Any], Any] = {
    (datetime.date, None): lambda v: v.isoformat(),
    (datetime.datetime, None): lambda v: v.isoformat(" "),
}


def register_adapter(type_: type, adapter) -> None:
    """Values of ``type_`` are bound as ``adapter(value)`` (as ``sqlite3.register_adapter``)."""
    adapters[(type_, None)] = adapter


def _convert_binding(cursor, num: int, value: Any) -> Any:
    adapter = adapters.get((type(value), None))
    if adapter is None:
        conform = getattr(value, "__conform__", None)
        if conform is not None:
            result = conform(None)
            if result is not None:
                return result
        raise ProgrammingError(f"Error binding parameter {num}: type "
                               f"'{type(value).__name__}' is not supported")
    return adapter(value)


class Row:
    """A row indexable by position and (case-insensitive) column name, as ``sqlite3.Row``."""

    __slots__ = ("_desc", "_values")

    def __init__(self, cursor: Cursor, values: tuple) -> None:
        self._desc = cursor.description
        self._values = values

    def keys(self) -> list[str]:
        return [d[0] for d in self._desc] if self._desc else []

    def __getitem__(self, key):
        if isinstance(key, str):
            lowered = key.lower()
            for i, d in enumerate(self._desc or ()):
                if d[0].lower() == lowered:
                    return self._values[i]
            raise IndexError("No item with that key")
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Row) and self._desc == other._desc and self._values == other._values

    def __hash__(self) -> int:
        return hash((tuple(self.keys()), self._values))

    def __repr__(self) -> str:
        return f"<Row {self._values!r}>"


_END = object()  # no row ahead

