"""Fault injection for the reliability tests: an S3 proxy that misbehaves, a checkable workload, and
the child processes (writers, readers, soak) that the chaos, crash, race and soak tests run.

``FaultProxy`` is a small threaded HTTP/1.1 proxy on 127.0.0.1 in front of moto's S3 server.
Point a client at it with ``endpoint=http://127.0.0.1:<port>`` in the replica URL (ltxvfs and the
real ``litestream`` alike). Per request it may, with the probabilities it is given:

* ``reset``     close the connection with a TCP RST before the request reaches S3;
* ``throttle``  answer ``503 SlowDown`` with S3's XML error body (request not applied);
* ``error``     answer ``500 InternalError`` / ``503 ServiceUnavailable`` (request not applied);
* ``truncate``  forward, then send only part of a response body and close the connection;
* ``slow``      forward, then dribble the response body (or delay the answer) over ``slow_seconds``;
* ``reset_after`` / ``error_after``  forward (S3 applies the request), then lose the answer:
  the nasty case where a client cannot know that its PUT succeeded (0 unless asked for);
* ``stale_list`` hide a newly PUT object from LIST responses for ``stale_seconds`` (the object
  can be read; listings just do not show it yet);
* ``deny``      answer ``403 AccessDenied`` (a permanent failure, not retried by clients).

With ``drop_conditions=True`` (not a fault drawn per request: the proxy *is* such a store) it
removes the create-only headers (``If-None-Match``, ``If-Match``, ``x-oss-forbid-overwrite``,
``x-cos-forbid-overwrite``) from every request before forwarding, so a PUT that should fail
with 412 overwrites instead: an S3 look-alike that ignores conditional writes.
``dropped_conditions`` counts the requests it changed. With ``honour_only="x-oss-forbid-overwrite"``
it plays a store that keeps only its own create-only header (Aliyun OSS): the standard headers
are dropped, that header (``true``) becomes the precondition, and a refusal is answered as OSS
does, ``409 FileAlreadyExists``. ``write_headers`` keeps the header names of recent PUT/POSTs.

Decisions are deterministic for a seed: each request's fate is drawn from a generator seeded
with (seed, method, path and query, how many identical requests came before), so the same
request stream gets the same faults whatever the thread interleaving. ``counts`` says what was
injected, ``requests`` what was seen (by kind: GET, PUT, LIST, HEAD, DELETE, ...).

Run as a script, this module is the child process of the tests (see ``main``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import faulthandler
import gc
import http.client
import http.server
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

__all__ = ["FaultProxy", "Faults", "SCHEMA", "apply_commit", "check_view", "expected_rows",
           "read_view", "View"]


# --------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------

@dataclass
class Faults:
    """Per-request probabilities (0..1) of each fault, and their parameters."""

    reset: float = 0.0
    throttle: float = 0.0
    error: float = 0.0
    truncate: float = 0.0
    slow: float = 0.0
    reset_after: float = 0.0
    error_after: float = 0.0
    stale_list: float = 0.0
    #: Answer 403 AccessDenied (not retried by clients): a fast, permanent failure.
    deny: float = 0.0
    slow_seconds: float = 0.2
    stale_seconds: float = 1.0
    #: Request kinds faults apply to (None: all but bucket creation).
    kinds: frozenset[str] | None = None
    #: Stop injecting after this many faults (None: no limit).
    limit: int | None = None

    @classmethod
    def uniform(cls, total: float, **kw) -> Faults:
        """``total`` spread over reset, throttle, error, truncate and slow (plus ``kw``)."""
        each = total / 5
        base = dict(reset=each, throttle=each, error=each, truncate=each, slow=each)
        base.update(kw)
        return cls(**base)

    def total(self) -> float:
        return (self.reset + self.throttle + self.error + self.truncate + self.slow
                + self.reset_after + self.error_after)


#: Headers that make a write conditional (create-only), dropped with ``drop_conditions``.
_CONDITIONS = {"if-none-match", "if-match", "x-oss-forbid-overwrite", "x-cos-forbid-overwrite"}

_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "expect"}

_S3_ERRORS = {
    "throttle": (503, "SlowDown", "Please reduce your request rate."),
    "error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "error503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "deny": (403, "AccessDenied", "Access Denied"),
}


def _error_body(code: str, message: str, path: str) -> bytes:
    rid = f"{random.getrandbits(64):016X}"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{path}</Resource>"
            f"<RequestId>{rid}</RequestId><HostId>ltxvfs-fault-proxy</HostId></Error>").encode()


def request_kind(method: str, path: str) -> tuple[str, str]:
    """(kind, object key) of an S3 request in path style."""
    u = urllib.parse.urlsplit(path)
    parts = u.path.lstrip("/").split("/", 1)
    key = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
    q = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if method == "GET":
        return ("GET" if key else "LIST"), key
    if method == "PUT":
        if not key:
            return "PUT_BUCKET", key
        return ("PUT_PART" if "partNumber" in q else "PUT"), key
    if method == "POST":
        if "delete" in q:
            return "DELETE_OBJECTS", key
        if "uploads" in q:
            return "CREATE_MPU", key
        if "uploadId" in q:
            return "COMPLETE_MPU", key
        return "POST", key
    return method, key


class FaultProxy:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    Use as a context manager or ``start()``/``stop()``. Faults start paused when ``paused``;
    ``with proxy.paused():`` turns them off for a while (setup, convergence checks)."""

    def __init__(self, upstream: str, faults: Faults | None = None, *, seed: int = 0,
                 paused: bool = False, drop_conditions: bool = False,
                 honour_only: str | None = None) -> None:
        u = urllib.parse.urlsplit(upstream)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"upstream must be on loopback, not {upstream}")
        self.upstream = (u.hostname, u.port or 80)
        self.faults = faults or Faults()
        self.seed = seed
        self.enabled = not paused
        #: Strip conditional-write headers before forwarding (a store that ignores them).
        self.drop_conditions = drop_conditions
        self.dropped_conditions = 0
        #: A vendor create-only header that alone is kept (see the module docstring).
        self.honour_only = honour_only.lower() if honour_only else None
        #: (kind, key, lower-case header names) of recent PUT and POST requests.
        self.write_headers: collections.deque[tuple[str, str, frozenset[str]]] = \
            collections.deque(maxlen=1000)
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self._seen: collections.Counter[str] = collections.Counter()
        self._hidden: dict[str, float] = {}  # key -> monotonic time it shows up in listings
        #: Object keys S3 accepted a PUT (or multipart completion) of, and how many times.
        self.stored: collections.Counter[str] = collections.Counter()
        #: (kind, key, status) of every answer the store gave (before any fault replaced it).
        self.answers: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._gates: list[tuple[str, str, threading.Barrier]] = []
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.handle_error = lambda request, address: None  # clients vanish: that is the job
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def set(self, **changes) -> None:
        """Change fault probabilities while running."""
        for k, v in changes.items():
            if k not in {f.name for f in fields(Faults)}:
                raise TypeError(f"unknown fault {k!r}")
            setattr(self.faults, k, v)

    def hold(self, kind: str, key: str, parties: int, timeout: float = 60.0) -> threading.Barrier:
        """Hold requests of ``kind`` for ``key`` until ``parties`` of them arrived, then let them
        all reach the store at once (bounded by ``timeout``: then they go on, and the barrier is
        broken). For races that must really happen at the store, e.g. two conditional PUTs of
        one key: neither is applied before both were sent."""
        barrier = threading.Barrier(parties, timeout=timeout)
        with self._lock:
            self._gates.append((kind, key, barrier))
        return barrier

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _wait_at_gate(self, kind: str, key: str) -> None:
        with self._lock:
            gates = [g for k, name, g in self._gates if k == kind and name == key]
        for g in gates:
            try:
                g.wait()
            except threading.BrokenBarrierError:
                self._count("gate_timeout")

    def injected(self) -> int:
        """Faults injected so far (stale listings count once per altered LIST response)."""
        with self._lock:
            return sum(v for k, v in self.counts.items() if not k.startswith("stale_hidden"))

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"injected": dict(self.counts), "requests": dict(self.requests)}

    # -- decisions ------------------------------------------------------------------------------
    def _decide(self, method: str, path: str, kind: str) -> tuple[str | None, random.Random]:
        with self._lock:
            ident = f"{method} {path}"
            n = self._seen[ident]
            self._seen[ident] += 1
            self.requests[kind] += 1
        rng = random.Random(f"{self.seed}|{ident}|{n}")
        f = self.faults
        r = rng.random()
        if not self.enabled or kind == "PUT_BUCKET" or (f.kinds is not None and kind not in f.kinds):
            return None, rng
        if f.limit is not None and self.injected() >= f.limit:
            return None, rng
        for name in ("deny", "reset", "throttle", "error", "truncate", "slow", "reset_after",
                     "error_after"):
            p = getattr(f, name)
            if r < p:
                return name, rng
            r -= p
        return None, rng

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def _maybe_hide(self, key: str, rng: random.Random) -> None:
        if self.enabled and rng.random() < self.faults.stale_list:
            with self._lock:
                self._hidden[key] = time.monotonic() + self.faults.stale_seconds
                self.counts["stale_hidden_puts"] += 1

    def _filter_listing(self, body: bytes) -> bytes:
        now = time.monotonic()
        with self._lock:
            self._hidden = {k: t for k, t in self._hidden.items() if t > now}
            hidden = set(self._hidden)
        if not hidden:
            return body
        text = body.decode("utf-8", errors="surrogateescape")
        removed = 0

        def drop(m: re.Match[str]) -> str:
            nonlocal removed
            key = re.search(r"<Key>(.*?)</Key>", m.group(0), re.S)
            if key and (key.group(1) in hidden or urllib.parse.unquote(key.group(1)) in hidden):
                removed += 1
                return ""
            return m.group(0)

        text = re.sub(r"<Contents>.*?</Contents>", drop, text, flags=re.S)
        if not removed:
            return body
        text = re.sub(r"<KeyCount>(\d+)</KeyCount>",
                      lambda m: f"<KeyCount>{int(m.group(1)) - removed}</KeyCount>", text)
        self._count("stale_list")
        return text.encode("utf-8", errors="surrogateescape")


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    server_version = "ltxvfs-fault-proxy"

    def log_message(self, *args) -> None:  # quiet
        pass

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET  # noqa: N815 - http.server names

    # -- helpers --------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _rst(self) -> None:
        """Abort the connection with a TCP RST."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_error(self, which: str) -> None:
        status, code, message = _S3_ERRORS[which]
        self._send(status, [("Content-Type", "application/xml")],
                   _error_body(code, message, urllib.parse.urlsplit(self.path).path))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            owner = self.owner
            if self.command in ("PUT", "POST"):
                with owner._lock:
                    owner.write_headers.append((*request_kind(self.command, self.path),
                                                frozenset(k.lower() for k in headers)))
            if (owner.drop_conditions or owner.honour_only) and self.command in ("PUT", "POST"):
                kept = {k: v for k, v in headers.items() if k.lower() not in _CONDITIONS}
                if len(kept) != len(headers):
                    with owner._lock:
                        owner.dropped_conditions += 1
                vendor = next((v for k, v in headers.items() if k.lower() == owner.honour_only),
                              "")
                if vendor.strip().lower() == "true":
                    kept["If-None-Match"] = "*"
                headers = kept
            headers["Content-Length"] = str(len(body))
            if self.command in ("GET", "HEAD", "DELETE") and not body:
                headers.pop("Content-Length")
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders()
                   if k.lower() not in _HOP and k.lower() != "content-length"]
            if self.command == "HEAD":
                out.append(("Content-Length", resp.getheader("Content-Length") or "0"))
            return resp.status, out, data
        finally:
            conn.close()

    def _proxy(self) -> None:
        owner = self.owner
        kind, key = request_kind(self.command, self.path)
        fault, rng = owner._decide(self.command, self.path, kind)
        if fault == "reset":
            owner._count("reset")
            self._rst()
            return
        body = self._read_body()
        if fault in ("throttle", "error", "deny"):
            which = "error503" if fault == "error" and rng.random() < 0.3 else fault
            owner._count(fault)
            self._send_error(which)
            return
        owner._wait_at_gate(kind, key)
        # moto checks If-None-Match and then stores, without a lock: two conditional PUTs of one
        # key that reach it together could both succeed, which S3 never allows. Forwarding them
        # one at a time per key makes the proxy as strict as S3 (tests/test_storage_fidelity.py).
        conditional = kind in ("PUT", "COMPLETE_MPU") and self.headers.get("If-None-Match")
        try:
            with owner._key_lock(key) if conditional else contextlib.nullcontext():
                status, headers, data = self._forward(body)
        except OSError:
            self._send_error("error")  # upstream trouble: S3 would say 500 too
            return
        if status == 412 and owner.honour_only and kind in ("PUT", "COMPLETE_MPU"):
            status, headers = 409, [("Content-Type", "application/xml")]
            data = _error_body("FileAlreadyExists", "The object you specified already exists "
                               "and can not be overwritten.", urllib.parse.urlsplit(self.path).path)
        with owner._lock:
            owner.answers[(kind, key, status)] += 1
        if status == 200 and kind in ("PUT", "COMPLETE_MPU"):
            with owner._lock:
                owner.stored[key] += 1
            owner._maybe_hide(key, rng)
        if status == 200 and kind == "LIST":
            data = owner._filter_listing(data)
        if fault == "reset_after":
            owner._count("reset_after")
            self._rst()
            return
        if fault == "error_after":
            owner._count("error_after")
            self._send_error("error")
            return
        head_only = self.command == "HEAD"
        if head_only:
            length = next((int(v) for k, v in headers if k == "Content-Length"), 0)
            headers = [(k, v) for k, v in headers if k != "Content-Length"]
            self._send(status, headers, b"", length)
            return
        if fault == "truncate" and len(data) > 1:
            owner._count("truncate")
            cut = rng.randrange(0, len(data))
            self._send(status, headers, data[:cut], len(data))
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "slow":
            owner._count("slow")
            delay = owner.faults.slow_seconds * (0.5 + rng.random())
            if len(data) < 4:
                time.sleep(delay)
                self._send(status, headers, data)
                return
            self._send(status, headers, b"", len(data))
            pieces = 4
            step = -(-len(data) // pieces)
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                self.wfile.flush()
                time.sleep(delay / pieces)
            return
        self._send(status, headers, data)


# --------------------------------------------------------------------------------------------
# A workload whose every committed state can be checked
# --------------------------------------------------------------------------------------------

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, pad BLOB)",
    "CREATE INDEX IF NOT EXISTS t_v ON t(v)",
    "CREATE TABLE IF NOT EXISTS meta(k INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta VALUES (1, 0)",
    "CREATE TABLE IF NOT EXISTS bulk(id INTEGER PRIMARY KEY, b BLOB)",
]
BULK_EVERY, BULK_ROWS = 50, 40


def pad_len(i: int) -> int:
    """Row payload sizes: mostly small, some spilling into overflow pages (page size 4096)."""
    return (i * 7919) % 600 + 1 if i % 9 else 3000 + (i * 31) % 6000  # randomblob(0) is 1 byte


@contextlib.contextmanager
def write_transaction(con) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on an apsw or sqlite3 (autocommit) connection; ROLLBACK (as far
    as it still can) on any error, which is re-raised."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            con.execute("ROLLBACK")
        raise


def apply_commit(con, i: int) -> None:
    """Commit number ``i`` (1, 2, ...) in one transaction, on an apsw or sqlite3 (autocommit)
    connection: insert row i, sometimes update an older row, delete one, add a bulk batch;
    ``meta.n`` = i. Every committed state is a function of ``n`` alone (:func:`expected_rows`)."""
    with write_transaction(con):
        con.execute("INSERT INTO t(id, v, pad) VALUES (?, ?, randomblob(?))", (i, f"v{i}", pad_len(i)))
        if i % 10 == 0:
            con.execute("UPDATE t SET v = v || '+' WHERE id = ?", (i - 5,))
        if i % 7 == 0 and i > 21:
            con.execute("DELETE FROM t WHERE id = ?", (i - 21,))
        if i % BULK_EVERY == 0:
            base = i // BULK_EVERY * BULK_ROWS
            con.executemany("INSERT INTO bulk(id, b) VALUES (?, randomblob(700))",
                            [(base + k,) for k in range(BULK_ROWS)])
        con.execute("UPDATE meta SET n = ? WHERE k = 1", (i,))


def expected_rows(n: int) -> list[tuple[int, str, int]]:
    """(id, v, length(pad)) of every row of ``t`` after commit ``n``."""
    out = []
    for i in range(1, n + 1):
        if i % 7 == 0 and i + 21 <= n:
            continue
        v = f"v{i}" + ("+" if i % 10 == 5 and i + 5 <= n else "")
        out.append((i, v, pad_len(i)))
    return out


@dataclass
class View:
    n: int
    rows: list[tuple[int, str, int]] = field(repr=False)
    bulk: int = 0


def read_view(con) -> View:
    """One consistent read of the workload tables (one read transaction)."""
    con.execute("BEGIN")
    try:
        n = con.execute("SELECT n FROM meta WHERE k = 1").fetchall()[0][0]
        rows = [tuple(r) for r in con.execute("SELECT id, v, length(pad) FROM t ORDER BY id")]
        bulk = con.execute("SELECT count(*) FROM bulk").fetchall()[0][0]
    finally:
        with contextlib.suppress(Exception):
            con.execute("COMMIT")
    return View(n, rows, bulk)


def check_view(view: View) -> None:
    """Raise AssertionError unless ``view`` is exactly the state after commit ``view.n``."""
    want = expected_rows(view.n)
    if view.rows != want:
        got = {r[0]: r for r in view.rows}
        exp = {r[0]: r for r in want}
        diff = sorted(set(got.items()) ^ set(exp.items()))[:5]
        raise AssertionError(f"rows at n={view.n} differ from the committed state: {len(view.rows)} "
                             f"rows vs {len(want)} expected; first differences {diff}")
    if view.bulk != view.n // BULK_EVERY * BULK_ROWS:
        raise AssertionError(f"bulk rows at n={view.n}: {view.bulk}, expected "
                             f"{view.n // BULK_EVERY * BULK_ROWS} (a transaction seen in part)")


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------

_out_lock = threading.Lock()


def wait_at_barrier() -> None:
    """Child side of ``release_together``: say ``ready`` and wait for the go-ahead on stdin."""
    emit("ready")
    sys.stdin.readline()


def release_together(procs: list, timeout: float = 120) -> None:
    """Parent side: wait (bounded) until every child printed ``ready``, then let them all go
    at once — so racers really race, however long each took to start on a loaded machine."""
    deadline = time.monotonic() + timeout
    for p in procs:
        said: list[str] = []  # readline in a thread: a child that hangs cannot hang the test
        reader = threading.Thread(target=lambda p=p, said=said: said.append(p.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if said != ["ready\n"]:
            for q in procs:
                q.kill()
            raise AssertionError(f"a racer did not get ready: {said} {p.stderr.read()[-2000:]}")
    for p in procs:  # left open: Python 3.11's communicate() fails on a closed stdin
        p.stdin.write("go\n")
        p.stdin.flush()


def emit(*parts: object) -> None:
    line = " ".join(str(p) for p in parts)
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _connect_rw(uri: str):
    import apsw

    con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
                          | apsw.SQLITE_OPEN_URI)
    con.set_busy_timeout(5000)
    return con


def _instrument(vfs) -> None:
    """Print ``op begin|end put|delete L<level> <range>`` around every storage write/delete."""
    for replica in vfs.replicas():
        client = replica.client
        if getattr(client, "_instrumented", False):
            continue
        write, delete = client.write, client.delete

        def w(level, lo, hi, data, ts, *, exclusive=False, _write=write):
            emit("op", "begin", "put", f"L{level}", f"{lo:x}-{hi:x}")
            info = _write(level, lo, hi, data, ts, exclusive=exclusive)
            emit("op", "end", "put", f"L{level}", f"{lo:x}-{hi:x}")
            return info

        def d(files, _delete=delete):
            emit("op", "begin", "delete", ",".join(f"L{f.level}" for f in files[:3]))
            _delete(files)
            emit("op", "end", "delete")

        client.write, client.delete = w, d
        client._instrumented = True


def _instrument_jobs() -> None:
    """Print ``job <name> skip`` when a compaction job of a writer found another one of its
    replica at work, and ``job <name> ran <seconds>`` after each run: what compaction was doing
    when an expected compaction step never came."""
    from ltxvfs import compact

    orig_exclusive, orig_jobs = compact.Compactor._exclusive, compact.Compactor.jobs

    def exclusive(self, job):
        ran = threading.local()

        def timed():
            ran.t0 = time.monotonic()
            job()

        inner = orig_exclusive(self, timed)

        def run():
            ran.t0 = None
            inner()
            if ran.t0 is None:
                emit("job", run.job_name, "skip")
            else:
                emit("job", run.job_name, "ran", f"{time.monotonic() - ran.t0:.3f}")
        run.job_name = "?"
        return run

    def jobs(self):
        out = orig_jobs(self)
        for name, fn, _ in out:
            fn.job_name = name
        return out

    compact.Compactor._exclusive, compact.Compactor.jobs = exclusive, jobs


def writer_main(args: argparse.Namespace) -> int:
    """Commit the workload through the VFS in write mode until ``--count`` commits, ``--duration``
    seconds or the ``--stop`` file appears. Prints ``start <n>`` (recovered state), ``committed
    <i>`` after each commit, ``synced <i>`` after each explicit sync (everything up to commit i
    is in the replica), ``final <n>`` after a clean close."""
    import apsw

    import ltxvfs

    vfs = ltxvfs.register()
    if args.instrument:
        _instrument_jobs()
    con = None
    try:
        con = _connect_rw(args.uri)
        for sql in SCHEMA:
            con.execute(sql)
        if args.instrument:
            _instrument(vfs)
        n = con.execute("SELECT n FROM meta").fetchall()[0][0]
        emit("start", n)
        deadline = time.monotonic() + args.duration if args.duration else None
        rng = random.Random(args.seed)
        done = 0
        while (args.count is None or done < args.count) and \
                (deadline is None or time.monotonic() < deadline) and \
                not (args.stop and os.path.exists(args.stop)):
            n += 1
            while True:
                try:
                    apply_commit(con, n)
                    break
                except apsw.BusyError:
                    time.sleep(0.01)
            done += 1
            emit("committed", n)
            if args.sync_every and done % args.sync_every == 0:
                while True:
                    try:
                        con.execute("PRAGMA litestream_sync").fetchall()
                        break
                    except apsw.SQLError as err:  # storage trouble: retried, as documented
                        emit("sync-error", str(err).replace("\n", " ")[:200])
                        time.sleep(0.05)
                emit("synced", n)
            if args.pace:
                time.sleep(rng.uniform(0, args.pace))
        con.close()
        con = None
        emit("final", n)
        return 0
    except ltxvfs.ConflictError as err:
        emit("conflict", str(err).replace("\n", " "))
        return 3


def open_reader(uri: str, stats: collections.Counter, deadline: float):
    """Open read-only; an open that fails on storage trouble (CantOpenError naming the store or a
    TXID gap seen through a stale listing) is retried and counted as ``open_retries``."""
    import apsw

    while True:
        try:
            return apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        except apsw.CantOpenError as err:
            stats["open_retries"] += 1
            stats["open_error:" + str(err).split(":")[1].strip()[:12]] += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_reader(con, *, target, deadline: float, pause: float = 0.01,
               stop=lambda: False, stats: collections.Counter | None = None) -> dict:
    """Read and check the workload on ``con`` until ``target()`` names a commit this reader
    has reached (converged) or ``deadline``/``stop()``. BusyError is the one documented error
    (retried); anything else, a wrong row or a view going back in time is a failure."""
    import apsw

    stats = collections.Counter() if stats is None else stats
    failures: list[str] = []
    last_n = -1
    converged = False
    goal_seen_at = None  # when the final commit became known: convergence is timed from there
    converge_seconds = None
    while time.monotonic() < deadline and not stop():
        goal = target()
        if goal is not None and goal_seen_at is None:
            goal_seen_at = time.monotonic()
        try:
            view = read_view(con)
            check_view(view)
            stats["reads"] += 1
            if view.n < last_n:
                failures.append(f"went back from n={last_n} to n={view.n}")
            last_n = view.n
            if stats["reads"] % 10 == 0:
                ok = con.execute("PRAGMA quick_check").fetchall()
                stats["quick_checks"] += 1
                if ok != [("ok",)]:
                    failures.append(f"quick_check: {ok[:3]}")
            if goal is not None and view.n >= goal:
                ok = con.execute("PRAGMA integrity_check").fetchall()
                if ok != [("ok",)]:
                    failures.append(f"integrity_check at the end: {ok[:3]}")
                converged = view.n == goal
                converge_seconds = round(time.monotonic() - goal_seen_at, 2)
                if not converged:
                    failures.append(f"read n={view.n} beyond the final commit {goal}")
                break
        except apsw.BusyError:
            stats["busy"] += 1
            time.sleep(0.02)
        except AssertionError as err:
            failures.append(str(err))
        except Exception as err:  # anything else is a finding
            failures.append(f"{type(err).__name__}: {err}")
            time.sleep(0.02)
        time.sleep(pause)
    try:
        vfs_stats = json.loads(con.execute("PRAGMA litestream_stats").fetchall()[0][0])
    except Exception as err:
        vfs_stats = {"error": str(err)}
    return {"stats": dict(stats), "failures": failures[:20], "last_n": last_n,
            "converged": converged, "converge_seconds": converge_seconds, "vfs": vfs_stats}


def reader_main(args: argparse.Namespace) -> int:
    """One reader in its own process (see :func:`run_reader`); the final commit is written to
    the ``--final`` file by the test. Prints one JSON line."""
    import ltxvfs

    ltxvfs.register()
    # A reader that is still running well past its deadline is stuck in a call: say where.
    faulthandler.dump_traceback_later(args.timeout + 35, exit=True)
    stats: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + args.timeout
    con = open_reader(args.uri, stats, deadline)

    def target() -> int | None:
        try:
            with open(args.final) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    result = run_reader(con, target=target, deadline=deadline, pause=args.pause, stats=stats)
    con.close()
    emit(json.dumps(result))
    return 0


RACE_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS r(id INTEGER PRIMARY KEY, who TEXT NOT NULL, seq INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS c(k INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO c VALUES (1, 0)",
]


def racer_main(args: argparse.Namespace) -> int:
    """One of several writer processes on one replica: ``--count`` commits, each inserting
    (who, seq) and incrementing the shared counter ``c.n``; an explicit sync every 1..4 commits
    (``synced <seq>``: every commit up to seq is in the replica). On ConflictError it closes,
    moves its buffer aside (abandoning its unsynced commits: ``abandoned <seq>...``), reopens on
    the replica's latest state and goes on."""
    import apsw

    import ltxvfs

    ltxvfs.register()
    rng = random.Random(args.seed)
    buffer = args.buffer
    uri = f"{args.uri}&buffer_path={urllib.parse.quote(buffer, safe='')}"
    pending: list[int] = []
    seq = conflicts = 0
    started = time.monotonic()
    timing = collections.Counter()

    def reopen():
        t0 = time.monotonic()
        con = _connect_rw(uri)
        timing["reopen"] += time.monotonic() - t0
        for sql in RACE_SCHEMA:
            con.execute(sql)
        return con

    con = reopen()
    if args.barrier:
        wait_at_barrier()
    next_sync = rng.randint(1, 4)
    while seq < args.count:
        try:
            if pending and len(pending) >= next_sync:
                t0 = time.monotonic()
                con.execute("PRAGMA litestream_sync").fetchall()
                timing["sync"] += time.monotonic() - t0
                emit("synced", pending[-1])
                pending.clear()
                next_sync = rng.randint(1, 4)
                continue
            seq += 1
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO r(who, seq) VALUES (?, ?)", (args.who, seq))
            con.execute("UPDATE c SET n = n + 1 WHERE k = 1")
            con.execute("COMMIT")
            pending.append(seq)
            emit("committed", seq)
        except ltxvfs.ConflictError:
            conflicts += 1
            with contextlib.suppress(Exception):
                if con.in_transaction:
                    con.execute("ROLLBACK")
            t0 = time.monotonic()
            try:
                con.close()
            except ltxvfs.ConflictError:
                pass
            timing["close"] += time.monotonic() - t0
            if os.path.exists(buffer):
                os.replace(buffer, f"{buffer}.lost{conflicts}")
            emit("abandoned", *pending)
            pending.clear()
            con = reopen()
        except apsw.BusyError:
            time.sleep(0.005)
    while True:
        try:
            con.execute("PRAGMA litestream_sync").fetchall()
            if pending:
                emit("synced", pending[-1])
            con.close()
            break
        except ltxvfs.ConflictError:
            conflicts += 1
            with contextlib.suppress(ltxvfs.ConflictError):
                con.close()
            os.replace(buffer, f"{buffer}.lost{conflicts}")
            emit("abandoned", *pending)
            pending.clear()
            con = reopen()
    emit("final", seq, conflicts, json.dumps({"seconds": round(time.monotonic() - started, 2),
                                              **{k: round(v, 2) for k, v in timing.items()}}))
    return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_bytes() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2: in-use chunks of every
    arena plus mmapped ones), or None without glibc 2.33+. Unlike RSS, this does not grow as
    per-thread arenas warm up or stay fragmented: a native leak (SQLite, apsw, LZ4) shows here."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


#: Thread-name prefixes of the package's long-lived pools: they start threads on demand up to a
#: fixed cap and keep them, so their count grows during a run without being a leak.
POOL_PREFIXES = ("ltxvfs-io_", "ltxvfs-job_", "ltxvfs-hydrate_")  # ThreadPoolExecutor adds _N
#: Pools that live for one call (a listing, HEADs, a multipart upload, a restore) and are joined.
CALL_PREFIXES = ("ltxvfs-list_", "ltxvfs-head_", "ltxvfs-upload_", "ltxvfs-restore_")


def _fd_kinds() -> dict[str, int]:
    """Open descriptors by kind: ``socket`` (pooled HTTP connections: opened on demand up to
    the pool size, dropped and reopened after a fault) and ``other`` (files, pipes...)."""
    kinds = {"socket": 0, "other": 0}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing (or the listing's own descriptor)
            continue
        kinds["socket" if target.startswith("socket:") else "other"] += 1
    return kinds


def _thread_kinds() -> dict[str, int]:
    """Live threads by kind: ``pool`` and ``call`` as above, ``other`` for everything else
    (main, readers, the job scheduler: a count that must not grow)."""
    kinds = collections.Counter({"pool": 0, "call": 0, "other": 0})
    for th in threading.enumerate():
        name = th.name
        kind = ("pool" if name.startswith(POOL_PREFIXES)
                else "call" if name.startswith(CALL_PREFIXES) else "other")
        kinds[kind] += 1
    return dict(kinds)


SOAK_ROWS = 300
SOAK_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS kv(k INTEGER PRIMARY KEY, v BLOB NOT NULL, n INTEGER NOT NULL)",
    f"INSERT OR IGNORE INTO kv SELECT value, randomblob(300), 0 FROM "
    f"(WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s "
    f"WHERE value < {SOAK_ROWS}) SELECT value FROM s)",
    "CREATE TABLE IF NOT EXISTS meta(k INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta VALUES (1, 0)",
]


def soak_commit(con, i: int) -> None:
    """A database that does not grow: commit i rewrites three rows (n = i) and meta.n."""
    with write_transaction(con):
        for k in (i % SOAK_ROWS + 1, (i * 7) % SOAK_ROWS + 1, (i * 13) % SOAK_ROWS + 1):
            con.execute("UPDATE kv SET v = randomblob(?), n = ? WHERE k = ?", (100 + i % 900, i, k))
        con.execute("UPDATE meta SET n = ? WHERE k = 1", (i,))


def soak_check(con) -> int:
    """Whole commits only: SOAK_ROWS rows, and the newest row change is meta.n."""
    con.execute("BEGIN")
    try:
        n = con.execute("SELECT n FROM meta").fetchall()[0][0]
        count, top = con.execute("SELECT count(*), max(n) FROM kv").fetchall()[0]
    finally:
        with contextlib.suppress(Exception):
            con.execute("COMMIT")
    if count != SOAK_ROWS or top != n:
        raise AssertionError(f"soak view: {count} rows, max(n)={top}, meta.n={n}")
    return n


_LEAKED: list[bytes] = []


def soak_main(args: argparse.Namespace) -> int:
    """A writer and ``--readers`` reader threads on one replica for ``--duration`` seconds,
    in this process; a JSON line of resource samples every ``--every`` seconds."""
    import tracemalloc

    import apsw

    import ltxvfs

    tracemalloc.start()
    vfs = ltxvfs.register()
    writer = _connect_rw(args.uri)
    for sql in SOAK_SCHEMA:
        writer.execute(sql)
    n = writer.execute("SELECT n FROM meta").fetchall()[0][0]
    stop = threading.Event()
    counters: collections.Counter[str] = collections.Counter()
    failures: list[str] = []

    def read_loop(k: int) -> None:
        con = apsw.Connection(args.read_uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        try:
            while not stop.is_set():
                try:
                    soak_check(con)
                    counters["reads"] += 1
                    counters[f"reads_{k}"] += 1  # per thread: one that only ever met Busy fails
                except apsw.BusyError:
                    counters["busy"] += 1
                except Exception as err:
                    failures.append(f"reader {k}: {type(err).__name__}: {err}")
                stop.wait(args.read_pause)
        finally:
            con.close()

    threads = [threading.Thread(target=read_loop, args=(k,), daemon=True)
               for k in range(args.readers)]
    for th in threads:
        th.start()
    start = time.monotonic()
    next_sample = start
    while time.monotonic() - start < args.duration:
        n += 1
        while True:
            try:
                soak_commit(writer, n)
                break
            except apsw.BusyError:
                time.sleep(0.01)
        counters["commits"] += 1
        if args.leak:  # a deliberate leak, to check that the soak's bounds catch one
            _LEAKED.append(bytes(args.leak))
        now = time.monotonic()
        if now >= next_sample:
            next_sample = now + args.every
            gc.collect()  # live memory: cyclic garbage awaiting a collection is not a leak
            fds = _fd_kinds()
            emit(json.dumps({"t": round(now - start, 2), "rss": _rss_bytes(), "heap": _heap_bytes(),
                             "traced": tracemalloc.get_traced_memory()[0],
                             "cached": sum(r.store.cache.bytes for r in vfs.replicas()),
                             "fds": sum(fds.values()), **{f"fds_{k}": v for k, v in fds.items()},
                             "threads": threading.active_count(), **{
                                 f"threads_{k}": v for k, v in _thread_kinds().items()},
                             "n": n, "commits": counters["commits"],
                             "reads": counters["reads"]}))
        time.sleep(args.pace)
    stop.set()
    for th in threads:
        th.join(30)
    writer.close()
    emit(json.dumps({"done": True, "counters": dict(counters), "failures": failures[:20]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="faults.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("writer")
    w.add_argument("uri")
    w.add_argument("--count", type=int)
    w.add_argument("--duration", type=float)
    w.add_argument("--stop")
    w.add_argument("--sync-every", type=int, default=0)
    w.add_argument("--pace", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--instrument", action="store_true")
    r = sub.add_parser("reader")
    r.add_argument("uri")
    r.add_argument("--final", required=True)
    r.add_argument("--timeout", type=float, default=120)
    r.add_argument("--pause", type=float, default=0.01)
    c = sub.add_parser("racer")
    c.add_argument("uri")
    c.add_argument("--buffer", required=True)
    c.add_argument("--who", required=True)
    c.add_argument("--count", type=int, default=500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--barrier", action="store_true", help="start on a line on stdin")
    s = sub.add_parser("soak")
    s.add_argument("uri")
    s.add_argument("read_uri")
    s.add_argument("--duration", type=float, default=20)
    s.add_argument("--readers", type=int, default=4)
    s.add_argument("--every", type=float, default=0.5)
    s.add_argument("--pace", type=float, default=0.01)
    s.add_argument("--read-pause", type=float, default=0.02)
    s.add_argument("--leak", type=int, default=0, help="bytes to leak per commit (self-test)")
    args = p.parse_args(argv)
    return {"writer": writer_main, "reader": reader_main, "soak": soak_main,
            "racer": racer_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
