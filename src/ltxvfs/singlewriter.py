"""Know the store you write to: write mode starts only on a store that keeps create-only writes.

Write mode's single-writer guarantee is the store's promise that a create-only write (S3:
``If-None-Match: *``; file: an exclusive hard link) fails when the object exists. A store that
ignores the header and overwrites would let two writers both "commit" one TXID, one of them
losing acknowledged rows without an error. So before the first writer of a replica starts in a
process, :func:`check_store` proves the promise with the client's ``probe_create_only`` (S3: 2
PUTs + 1 DELETE) and caches the verdict per replica location (``client.identity``):

* ``single_writer=verify`` (default): a store that overwrote is refused with UnsafeStoreError
  (cached: the verdict is about the store); a probe that could not finish (no permission,
  network, a rejected header) raises its error and is tried again at the next start;
* ``single_writer=trusted``: no probe; a WARNING at every start says what is not guaranteed.
"""

from __future__ import annotations

import logging
import os
import threading

from .config import SINGLE_WRITER_MODES
from .errors import UnsafeStoreError
from .storage.base import ReplicaClient

log = logging.getLogger("ltxvfs.writer")

#: identity -> the checked spelling (safe) or the UnsafeStoreError message (overwrote).
_verdicts: dict[str, tuple[bool, str]] = {}
_locks: dict[str, threading.Lock] = {}
_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # a parent's thread may hold it at fork
    os.register_at_fork(after_in_child=lambda: globals().update(_lock=threading.Lock()))

ADVICE = ("use a store that keeps conditional writes (docs/write-mode.md, \"Which object stores "
          "are safe for write mode\"), or, if you make sure that only one process ever writes "
          "this replica, open it with single_writer=trusted (LITESTREAM_SINGLE_WRITER=trusted)")


def check_store(client: ReplicaClient, mode: str = "verify") -> None:
    """Raise UnsafeStoreError unless ``client``'s store keeps create-only writes (probed once
    per process and replica location) or ``mode`` is ``trusted`` (then warn)."""
    if mode not in SINGLE_WRITER_MODES:
        raise ValueError(f"single_writer must be one of {SINGLE_WRITER_MODES}, not {mode!r}")
    key = client.identity
    if mode == "trusted":
        known = _verdicts.get(key)
        seen = f" (this process found: {known[1]})" if known and not known[0] else ""
        log.warning(
            "single_writer=trusted: write mode on %s starts without checking that the store "
            "refuses to overwrite (%s)%s. Nothing then stops a second writer from replacing "
            "this writer's uploads: two writers at once can lose acknowledged commits without "
            "an error. Make sure only one process ever writes this replica.",
            client.url, getattr(client, "create_only", "create-only writes"), seen)
        return
    with _lock:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # one probe per replica at a time; the others wait for its verdict
        verdict = _verdicts.get(key)
        if verdict is None:
            try:
                checked = client.probe_create_only()
            except UnsafeStoreError as err:
                message = (f"write mode refused for {client.url}: {err}; so two writers could "
                           "overwrite each other's transactions and lose acknowledged commits "
                           f"without an error (the single-writer guarantee). To write, {ADVICE}")
                if not err.overwrote:
                    raise UnsafeStoreError(message) from err
                verdict = _verdicts[key] = (False, message)
            else:
                verdict = _verdicts[key] = (True, checked)
                log.info("%s keeps create-only writes (%s): write mode may start",
                         getattr(client, "store", client.url), checked)
    if not verdict[0]:
        raise UnsafeStoreError(verdict[1], overwrote=True)


def forget() -> None:
    """Drop every cached verdict (tests; a process that changed its store's configuration)."""
    with _lock:
        _verdicts.clear()
