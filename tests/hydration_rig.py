"""Helpers of the hydration tests that force interleavings: a client whose reads from the
hydration pool can be held or failed, a one-worker pool (tasks run in submission order) that can
queue a blocker, a lock and a condition that report the hydration thread's steps, a Hydrator on
a Replica of its own, and a reader process (hydrate_proc.py) answering with bounded waits."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ltxvfs import hydrate
from ltxvfs.storage import open_replica

HOLD = 60.0  # fail-safe bound of every gate: a test that goes wrong fails instead of hanging


def _in_pool() -> bool:
    return threading.current_thread().name.startswith("test-hydrate")


class GatedClient:
    """A replica client whose reads made by hydration's fetch tasks first call ``hook``."""

    def __init__(self, inner):
        self.inner, self.url, self.hook = inner, inner.url, None

    def read(self, level, lo, hi, offset=0, size=None):
        hook = self.hook
        if hook is not None and _in_pool():
            hook()
        return self.inner.read(level, lo, hi, offset, size)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class GatedPool(ThreadPoolExecutor):
    """One worker; ``before``/``after`` run around each submit (e.g. to queue a blocker)."""

    def __init__(self):
        super().__init__(1, thread_name_prefix="test-hydrate")
        self.before = self.after = None
        self.tag = None  # set on each task's thread while it runs: which attempt submitted it
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        if self.before is not None:
            self.before()
        self.submitted += 1
        tag = self.tag

        def tagged():
            tls.tag = tag
            try:
                return fn(*args, **kwargs)
            finally:
                tls.tag = None

        future = super().submit(tagged)
        if self.after is not None:
            self.after()
        return future

    def block(self, gate: threading.Event, running: threading.Event | None = None):
        """Queue a task that holds the worker until ``gate`` is set."""
        def blocker():
            if running is not None:
                running.set()
            gate.wait(HOLD)
        ThreadPoolExecutor.submit(self, blocker)


#: Which attempt submitted the task running on this thread (GatedPool.tag at submit time).
tls = threading.local()


class HookLock:
    """A lock that calls ``after_release`` (once) when the hydration thread next releases it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.after_release = None

    def acquire(self, *args, **kwargs):
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()
        hook = self.after_release
        if hook is not None and threading.current_thread().name == "ltxvfs-hydrate":
            self.after_release = None
            hook()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


class SeenWaiting(threading.Condition):
    """A condition that says when the hydration thread waits on it."""

    def __init__(self):
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout=None):
        self.waiting.set()
        return super().wait(timeout)


class Rig:
    def __init__(self, primary, path):
        from ltxvfs.follow import Replica
        from ltxvfs.pages import PageStore, state_at

        self.primary = primary
        self.inner = open_replica(primary.url)
        self.client = GatedClient(self.inner)
        self.io = ThreadPoolExecutor(4)
        self.pool = GatedPool()
        store = PageStore(self.client, 64 << 20)
        self.replica = Replica(self.client, store, self.io, state_at(self.client, self.io, store),
                               3600.0)
        self.path = path
        self.hydrator = hydrate.Hydrator(self.replica, path, False, self.pool)
        self.gates: list[threading.Event] = []

    def gate(self) -> threading.Event:
        g = threading.Event()
        self.gates.append(g)
        return g

    def close(self):
        for g in self.gates:
            g.set()
        self.hydrator.close()
        self.pool.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self.inner.close()


class Child:
    """A hydrate_proc.py process; every answer is awaited with a bound."""

    def __init__(self, uri: str, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hydrate_proc.py")),
                                   uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._log, text=True)

    def ask(self, cmd: str, timeout: float = 60.0) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.append(self.p.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        assert said and said[0], f"no answer to {cmd!r}: {self.log_path.read_text()[-2000:]}"
        return json.loads(said[0])

    def close(self, timeout: float = 60.0) -> None:
        assert self.ask("close") == {"closed": True}
        assert self.p.wait(timeout) == 0, self.log_path.read_text()[-2000:]
        self._log.close()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)
        self._log.close()


def _digest(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(repr(tuple(row)).encode())
    return h.hexdigest()


def digest(rows) -> str:
    """What hydrate_proc.py reports for the rows (id, b) it read."""
    h = hashlib.sha256()
    for row in rows:
        h.update(repr(tuple(row)).encode())
    return h.hexdigest()
