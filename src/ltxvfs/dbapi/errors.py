"""PEP 249's exception classes for :mod:`ltxvfs.dbapi`, and how apsw's errors map to them (as
CPython's ``sqlite3`` maps SQLite's result codes)."""

from __future__ import annotations

from contextlib import contextmanager

import apsw

from .. import errors as _errors

# --- exceptions (PEP 249) ------------------------------------------------------------------------


class Warning(Exception):  # noqa: N818 - the name PEP 249 prescribes
    """Important warnings (PEP 249); never raised by this module."""


class Error(Exception):
    """Base class of every error of this module. ``sqlite_errorcode`` / ``sqlite_errorname``
    carry SQLite's extended result code where there is one, as in sqlite3."""

    sqlite_errorcode: int | None = None
    sqlite_errorname: str | None = None


class InterfaceError(Error):
    pass


class DatabaseError(Error):
    pass


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    pass


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


class ConflictError(OperationalError, _errors.ConflictError):
    """Write mode: another writer moved the replica on (``ltxvfs.ConflictError`` too); nothing
    was overwritten and the unsynced commits stay in the write buffer the message names."""


# SQLite primary result codes -> class, exactly as CPython's Modules/_sqlite/util.c.
_BY_CODE: dict[int, type[Error]] = {
    2: InternalError, 12: InternalError,                      # INTERNAL, NOTFOUND
    11: DatabaseError, 26: DatabaseError,                     # CORRUPT, NOTADB
    18: DataError,                                            # TOOBIG
    19: IntegrityError, 20: IntegrityError,                   # CONSTRAINT, MISMATCH
    21: InterfaceError, 25: InterfaceError,                   # MISUSE, RANGE
}
for _code in (1, 3, 4, 5, 6, 8, 9, 10, 13, 14, 15, 16, 17):  # ERROR PERM ABORT BUSY LOCKED READONLY
    _BY_CODE[_code] = OperationalError                       # INTERRUPT IOERR FULL CANTOPEN PROTOCOL
#                                                              EMPTY SCHEMA
_CODE_OF_CLASS = {type(apsw.exception_for(code)): code for code in range(1, 27)}
_CLOSED = "Cannot operate on a closed database."  # sqlite3's words; SQLAlchemy's is_disconnect


def _translate_error(exc: BaseException) -> BaseException:
    """The PEP 249 exception for ``exc`` (an apsw or ltxvfs error), or ``exc`` itself."""
    if isinstance(exc, Error):
        return exc
    if isinstance(exc, _errors.ConflictError):
        err: Error = ConflictError(str(exc))
    elif isinstance(exc, apsw.ConnectionClosedError):
        err = ProgrammingError(_CLOSED)
    elif isinstance(exc, apsw.CursorClosedError):
        err = ProgrammingError("Cannot operate on a closed cursor.")
    elif isinstance(exc, (apsw.BindingsError, apsw.ThreadingViolationError,
                          apsw.ExecutionCompleteError, apsw.IncompleteExecutionError)):
        err = ProgrammingError(str(exc))
    elif isinstance(exc, apsw.Error):
        code = getattr(exc, "result", None)
        if code is None:  # raised by Python code (the VFS): the class says which code
            code = _CODE_OF_CLASS.get(type(exc), -1)
        cls = _BY_CODE.get(code, DatabaseError)
        if isinstance(exc, apsw.NoMemError):
            return MemoryError(str(exc))
        err = cls(str(exc))
        ext = getattr(exc, "extendedresult", None)
        err.sqlite_errorcode = ext if ext is not None else code
        err.sqlite_errorname = (apsw.mapping_extended_result_codes.get(err.sqlite_errorcode)
                                or apsw.mapping_result_codes.get(code))
    elif isinstance(exc, _errors.LitestreamError):
        err = OperationalError(str(exc))
    elif isinstance(exc, TypeError) and "binding" in str(exc).lower():
        err = ProgrammingError(str(exc))
    else:
        return exc
    err.__cause__ = exc
    return err


@contextmanager
def _translated():
    try:
        yield
    except (apsw.Error, _errors.LitestreamError, TypeError) as exc:
        new = _translate_error(exc)
        if new is exc:
            raise
        raise new from exc


