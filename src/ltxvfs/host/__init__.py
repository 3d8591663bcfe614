"""What the processes of one host share: the cache directory (``cache_dir``).

Litestream's LTX files are immutable once written, so what one process fetched — frames, page
indexes — is good for every process of the host, and for the next run, as long as it is keyed by
the file's *identity* (level, TXID range, size and ETag/inode), never by its name alone: a
replaced replica reuses names. Each replica gets a directory of its own under ``cache_dir``
(:func:`replica_dir`); the modules of this package each own one part of it.
"""

from .paths import replica_dir

__all__ = ["replica_dir"]
