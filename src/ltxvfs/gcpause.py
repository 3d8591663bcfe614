"""Pausing Python's cyclic garbage collector while a large index is built.

Parsing a 50,000-page snapshot's index and building the state from it allocate ~150,000
tuples in a few milliseconds. Each 700 allocations start a collection, and some of those walk
the whole heap (boto3 alone holds tens of thousands of objects): measured on a 200 MB replica,
building the state took ~100 ms with the collector on and ~10 ms with it paused. None of these
objects can form cycles, so there is nothing for the collector to find.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


def _after_fork_in_child() -> None:
    """A thread of the parent may have been inside a pause (its lock held, the collector off):
    the child has no such thread."""
    global _lock, _depth
    _lock = threading.Lock()
    if _depth:
        _depth = 0
        if _was_enabled:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the collector for the block (process-wide; nests and works across threads: the
    collector comes back, if it was on, when the last block ends)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
