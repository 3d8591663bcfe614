"""The package's exceptions: one tree, so callers can catch ``LitestreamError`` or a precise subclass.

Lower layers raise these; only the VFS boundary turns them into apsw errors. Messages name the
object (LTX key, replica URL with any secret removed) and the problem, never a credential.
"""

from __future__ import annotations


class LitestreamError(Exception):
    """Base class of every error raised by ltxvfs."""


# --- LTX codec -------------------------------------------------------------------------------


class LTXError(LitestreamError):
    """An LTX file (or part of one) is not valid."""


class InvalidMagicError(LTXError):
    """The file does not start with the ``LTX1`` magic."""


class InvalidHeaderError(LTXError):
    """A header field is out of range: flags, page size, TXIDs, checksums, WAL fields."""


class TruncatedError(LTXError):
    """The data ends before the structure it should hold (header, frame, index, trailer)."""


class ChecksumMismatchError(LTXError):
    """The file checksum in the trailer does not match the file's contents."""


class MalformedIndexError(LTXError):
    """The page index at the end of the file cannot be parsed or disagrees with the frames."""


class PageOrderError(LTXError):
    """Page numbers are out of order, out of bounds, the lock page, or missing from a snapshot."""


class PageFrameError(LTXError):
    """A page frame has bad flags, does not decompress, or decompresses to the wrong size."""


# --- replica storage -------------------------------------------------------------------------


class StorageError(LitestreamError):
    """Object storage (S3 or a directory) failed or refused a request."""


class ReplicaURLError(StorageError, ValueError):
    """A replica URL cannot be parsed or names an unsupported scheme."""


class BucketNotFoundError(StorageError):
    """The bucket (or replica root directory) does not exist."""


class AccessDeniedError(StorageError):
    """The credentials were refused (wrong key, no permission)."""


class ObjectNotFoundError(StorageError):
    """An LTX object named by a listing or a plan is not there (deleted by retention, or missing)."""


class ObjectExistsError(StorageError):
    """An exclusive write found the object already there (another writer took that TXID)."""


# --- planning and restore --------------------------------------------------------------------


class PlanError(LitestreamError):
    """No consistent set of LTX files answers the request."""


class TxNotAvailableError(PlanError):
    """The replica has no files for the requested TXID or time (or is empty)."""


class NonContiguousError(PlanError):
    """The replica has a gap between TXIDs that no compacted file covers."""


class RestoreError(LitestreamError):
    """A restore cannot proceed (output exists, bad target, ...)."""


# --- reading ---------------------------------------------------------------------------------


class PageNotFoundError(LitestreamError):
    """A page SQLite asked for is in no LTX file of the current state (a bug or a broken replica)."""


# --- write mode ------------------------------------------------------------------------------


class ConflictError(LitestreamError):
    """The remote replica moved on without us; our changes were not uploaded (nothing overwritten)."""


class WriteBufferError(LitestreamError):
    """The write buffer file is unusable (wrong replica, bad header, I/O error).

    ``ltxvfs.buffer.BufferError`` is the same class (its older name).
    """


# --- settings and PRAGMAs ----------------------------------------------------------------------


class ConfigError(LitestreamError, ValueError):
    """A configuration value (environment variable or URI parameter) is invalid; an open fails
    with ``apsw.CantOpenError`` carrying this message."""


class PragmaError(LitestreamError, ValueError):
    """A bad PRAGMA value or a write to a read-only PRAGMA; reaches the caller as SQLError."""


class UnsafeStoreError(StorageError):
    """The replica's store does not keep create-only writes (a PUT with ``If-None-Match: *``
    overwrote an existing object, or was rejected), so write mode's single-writer guarantee
    cannot hold there: write mode is refused (``single_writer=trusted`` opts out).

    ``overwrote`` is True when the store was seen replacing an object that a create-only write
    should have left alone: a verdict about the store, not a failure of one request."""

    def __init__(self, message: str, *, overwrote: bool = False) -> None:
        super().__init__(message)
        self.overwrote = overwrote
