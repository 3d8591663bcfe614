"""ltxvfs: read (and write) SQLite databases replicated by Litestream, straight from object storage."""

from __future__ import annotations

from .errors import (
    ChecksumMismatchError,
    ConflictError,
    LitestreamError,
    LTXError,
    NonContiguousError,
    StorageError,
    TxNotAvailableError,
)

__version__ = "0.1.0"

__all__ = [
    "ChecksumMismatchError",
    "ConflictError",
    "LTXError",
    "LitestreamError",
    "NonContiguousError",
    "StorageError",
    "TxNotAvailableError",
    "__version__",
]
