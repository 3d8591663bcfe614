"""The DB-API cursor: runs one statement at a time on an apsw cursor, as ``sqlite3`` does
(``rowcount``, ``lastrowid``, ``description``, row factories, one statement per ``execute``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import apsw

from .errors import ProgrammingError, _translated
from .types import _END

if TYPE_CHECKING:
    from . import Connection

#: sqlite3's value of ``autocommit`` that means "isolation_level decides" (the default).
LEGACY_TRANSACTION_CONTROL = -1

_LEAD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.S)
_EMPTY = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$)|;)*\Z", re.S)


def _first_word(sql: str) -> str:
    m = _LEAD.match(sql)
    return sql[m.end():m.end() + 7].upper() if m else ""


def _is_dml(sql: str) -> bool:
    """As sqlite3: a statement that starts (after comments) with INSERT, UPDATE, DELETE or
    REPLACE opens a transaction in legacy transaction control."""
    return _first_word(sql).startswith(("INSERT", "UPDATE", "DELETE", "REPLACE"))


# --- connection ----------------------------------------------------------------------------------



class Cursor:
    """A PEP 249 cursor. Rows come as tuples (or through ``row_factory``); ``description`` is
    set at ``execute`` (name, declared type, then five Nones); ``rowcount`` is the number of rows
    an INSERT/UPDATE/DELETE/REPLACE changed (summed over ``executemany``), -1 otherwise."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.arraysize = 1
        self.row_factory = connection.row_factory
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.description: tuple | None = None
        self._cursor: apsw.Cursor | None = None
        self._ahead: Any = _END
        self._closed = False
        self._statements = 0
        self._sql = ""

    # -- PEP 249 ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._cursor is not None:
            with _translated():
                self._cursor.close(force=True)
            self._cursor = None
        self._closed = True

    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        self._run(sql, parameters)
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> Cursor:
        total = 0
        for parameters in seq_of_parameters:
            self._run(sql, parameters)
            total += max(self.rowcount, 0)
        self.rowcount = total if _is_dml(sql) else -1
        self._exhaust()
        return self

    def executescript(self, script: str) -> Cursor:
        """As sqlite3: commits a pending transaction first (legacy control), then runs every
        statement of ``script`` without implicit BEGINs."""
        con = self._connection_open()
        if not isinstance(script, str):
            raise ValueError("script argument must be unicode.")
        with _translated():
            if self.connection._autocommit == LEGACY_TRANSACTION_CONTROL and not con.get_autocommit():
                con.execute("COMMIT")
            cur = self._new_cursor(trace=False)
            for _ in cur.execute(script):
                pass
        self._ahead = _END
        self.description = None
        self.rowcount = -1
        return self

    def fetchone(self):
        self._connection_open()
        row = self._ahead
        if row is _END:
            return None
        self._step()
        return self.row_factory(self, row) if self.row_factory else row

    def fetchmany(self, size: int | None = None) -> list:
        n = self.arraysize if size is None else size
        out = []
        while len(out) < n:
            row = self.fetchone()
            if row is None:
                break
            out.append(row)
        return out

    def fetchall(self) -> list:
        self._connection_open()
        if self._ahead is _END:
            return []
        rows = [self._ahead]
        with _translated():
            rows.extend(self._cursor.fetchall())
        self._ahead = _END
        if self.row_factory:
            return [self.row_factory(self, r) for r in rows]
        return rows

    def setinputsizes(self, sizes) -> None:
        pass

    def setoutputsize(self, size, column=None) -> None:
        pass

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    # -- internals -------------------------------------------------------------------------

    def _connection_open(self) -> apsw.Connection:
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed cursor.")
        return self.connection._con

    def _step(self) -> None:
        """Read one row ahead, as sqlite3 does: when the last row is fetched the statement has
        already finished, so a connection holds no read transaction (and no replica view) for a
        cursor whose rows were all fetched."""
        with _translated():
            self._ahead = next(self._cursor, _END) if self._cursor is not None else _END

    def _new_cursor(self, trace: bool) -> apsw.Cursor:
        if self._cursor is not None:
            self._cursor.close(force=True)
        self._cursor = self.connection._con.cursor()
        if trace:
            self._cursor.exec_trace = self._trace
        return self._cursor

    def _trace(self, cursor: apsw.Cursor, sql: str, bindings) -> bool:
        """Called by apsw before each statement runs: one statement per execute (as sqlite3),
        the implicit BEGIN, and the description while the statement is prepared."""
        self._statements += 1
        if self._statements == 1:
            start = self._sql.find(sql)
            tail = self._sql[start + len(sql):] if start >= 0 else ""
            if tail and not _EMPTY.match(tail):
                raise ProgrammingError("You can only execute one statement at a time.")
        self.connection._before_statement(sql)
        desc = cursor.description
        self.description = tuple((d[0], d[1], None, None, None, None, None) for d in desc) or None
        return True

    def _run(self, sql: str, parameters: Any) -> None:
        con = self._connection_open()
        if not isinstance(sql, str):
            raise ProgrammingError("operation must be a str")
        if parameters is None:
            parameters = ()
        elif not isinstance(parameters, (dict, Sequence)) or isinstance(parameters, (str, bytes)):
            if hasattr(parameters, "keys") and hasattr(parameters, "__getitem__"):
                parameters = dict(parameters)
            else:
                raise ProgrammingError("parameters are of unsupported type")
        self._statements = 0
        self._sql = sql
        self.description = None
        self.rowcount = -1
        cur = self._new_cursor(trace=True)
        self._ahead = _END
        with _translated():
            cur.execute(sql, parameters)
        self._step()
        if self._statements == 0:  # empty SQL or only comments
            return
        if _is_dml(sql):
            self.rowcount = con.changes()
            if _first_word(sql).startswith(("INSERT", "REPLACE")):
                self.lastrowid = con.last_insert_rowid()

    def _exhaust(self) -> None:
        if self._cursor is not None:
            with _translated():
                for _ in self._cursor:
                    pass
        self._ahead = _END
