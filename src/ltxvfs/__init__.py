"""ltxvfs: read (and write) SQLite databases replicated by Litestream, straight from object storage."""

from __future__ import annotations

from .errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumMismatchError,
    ConfigError,
    ConflictError,
    InvalidHeaderError,
    InvalidMagicError,
    LitestreamError,
    LTXError,
    MalformedIndexError,
    NonContiguousError,
    ObjectExistsError,
    ObjectNotFoundError,
    PageFrameError,
    PageNotFoundError,
    PageOrderError,
    PlanError,
    PragmaError,
    ReplicaURLError,
    RestoreError,
    StorageError,
    TruncatedError,
    TxNotAvailableError,
    UnsafeStoreError,
    WriteBufferError,
)

__version__ = "0.1.0"


def stats(connection) -> dict:
    """Counters of the database behind an apsw ``connection`` opened through the VFS (GETs,
    bytes, cache hits/misses, polls, syncs, conflicts, S3 requests): ``PRAGMA litestream_stats``."""
    import json

    return json.loads(connection.execute("PRAGMA litestream_stats").fetchall()[0][0])


def register(name: str = "litestream", config=None, makedefault: bool = False,
             warm_up: bool = True):
    """Register the ``litestream`` VFS (see :func:`ltxvfs.registry.register`) and return it.

    ``warm_up`` loads boto3 and the S3 model now (~0.4 s) rather than at the first open of an
    S3 replica; pass False for file:// replicas only, or to defer it.
    """
    from .registry import register as _register

    return _register(name, config, makedefault, warm_up)

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "ChecksumMismatchError",
    "ConfigError",
    "ConflictError",
    "InvalidHeaderError",
    "InvalidMagicError",
    "LTXError",
    "LitestreamError",
    "MalformedIndexError",
    "NonContiguousError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "PageFrameError",
    "PageNotFoundError",
    "PageOrderError",
    "PlanError",
    "PragmaError",
    "ReplicaURLError",
    "RestoreError",
    "StorageError",
    "TruncatedError",
    "TxNotAvailableError",
    "UnsafeStoreError",
    "WriteBufferError",
    "__version__",
    "register",
    "stats",
]
