"""Counting a replica client's requests by kind: what benchmarks and ``ltxvfs.stats`` show an
access pattern costs."""

from __future__ import annotations

import threading


class RequestCounter:
    """Thread-safe count of S3 API calls by kind (GET, PUT, LIST, HEAD, DELETE).

    One count per API call (each listing page, each multipart part), not per retry attempt:
    benchmarks and ``PRAGMA litestream_stats`` read it to show what the access pattern costs.
    """

    KINDS = ("GET", "PUT", "LIST", "HEAD", "DELETE")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def __getitem__(self, kind: str) -> int:
        with self._lock:
            return self._counts[kind]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self.KINDS, 0)
