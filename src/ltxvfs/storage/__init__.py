"""Replica storage: ``open_replica(url)`` gives the client for an ``s3://`` or ``file://`` replica.

The S3 client module (and boto3) is imported only when an S3 URL is opened, so file replicas and
code that only needs the interface stay cheap to import.
"""

from __future__ import annotations

from .base import (
    MAX_LEVEL,
    SNAPSHOT_LEVEL,
    FileInfo,
    ReplicaClient,
    check_level,
    format_txid,
    ltx_filename,
    parse_ltx_filename,
)
from .file import FileReplicaClient
from .url import ReplicaURL, parse_replica_url, redact_url

__all__ = [
    "MAX_LEVEL",
    "SNAPSHOT_LEVEL",
    "FileInfo",
    "FileReplicaClient",
    "ReplicaClient",
    "ReplicaURL",
    "check_level",
    "format_txid",
    "ltx_filename",
    "open_replica",
    "parse_ltx_filename",
    "parse_replica_url",
    "redact_url",
]


def open_replica(url: str | ReplicaURL) -> ReplicaClient:
    """The client for a replica URL (``s3://bucket/path?…``, ``file:///dir`` or ``/dir``).

    Raises ReplicaURLError for a URL that cannot be used. Opening makes no request: call the
    client's ``check()`` to fail fast on a missing bucket/directory or refused credentials.
    """
    parsed = url if isinstance(url, ReplicaURL) else parse_replica_url(url)
    if parsed.scheme == "file":
        return FileReplicaClient(parsed)
    from .s3 import S3ReplicaClient

    return S3ReplicaClient(parsed)
