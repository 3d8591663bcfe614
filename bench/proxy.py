"""A latency-injecting, request-counting HTTP proxy in front of the S3 stand-in (127.0.0.1 only).

Every request waits ``latency`` seconds (default 20 ms: a round trip to object storage) before it
is forwarded to the upstream; concurrent requests wait concurrently, as they would on a network.
The proxy counts requests by kind and bytes both ways:

=========  ====================================================================
kind       what
=========  ====================================================================
GET        GET of an object without ``Range``
GET_RANGE  GET of an object with ``Range``
HEAD       HEAD of an object or bucket
LIST       GET on a bucket (ListObjects V1/V2, GetBucketLocation)
PUT        PUT (objects, parts, bucket creation), POST of multipart create/complete
DELETE     DELETE, and POST ``?delete`` (DeleteObjects)
=========  ====================================================================

Control endpoints (no latency, not counted): ``GET /__bench__/stats`` (JSON: counts, bytes),
``GET /__bench__/trace`` (the last 200,000 requests: time, kind, method, path, range, status,
bytes),
``POST /__bench__/reset``, ``POST /__bench__/latency?ms=N``.

Run: ``python bench/proxy.py --upstream http://127.0.0.1:PORT [--latency-ms 20] [--port 0]``;
it prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("GET", "GET_RANGE", "HEAD", "LIST", "PUT", "DELETE", "OTHER")
CHUNK = 1 << 20
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "expect"}


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.counts = dict.fromkeys(KINDS, 0)
            self.bytes_down = 0  # response bodies (what clients downloaded)
            self.bytes_up = 0  # request bodies
            self.started = time.time()
            #: recent requests (time, kind, method, path, range, status, bytes down)
            self.trace: collections.deque = collections.deque(maxlen=200_000)

    def add(self, kind: str, up: int, down: int, line: tuple = ()) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.bytes_up += up
            self.bytes_down += down
            if line:
                self.trace.append(line)

    def snapshot(self) -> dict:
        with self.lock:
            return {"counts": dict(self.counts), "requests": sum(self.counts.values()),
                    "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                    "since": self.started, "now": time.time()}


def classify(method: str, path: str, headers) -> str:
    u = urllib.parse.urlsplit(path)
    parts = urllib.parse.unquote(u.path).lstrip("/").split("/", 1)
    has_key = len(parts) > 1 and parts[1] != ""
    q = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if method == "GET":
        if not has_key:
            return "LIST"
        return "GET_RANGE" if headers.get("Range") else "GET"
    if method == "HEAD":
        return "HEAD"
    if method == "DELETE" or (method == "POST" and "delete" in q):
        return "DELETE"
    if method in ("PUT", "POST"):
        return "PUT"
    return "OTHER"


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "latency-proxy/1"
    upstream: tuple[str, int]
    stats: Stats
    latency: list[float]  # one-element list: settable at run time

    def log_message(self, fmt: str, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see s3stub
        self._up: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._up is not None:
                self._up.close()

    def _control(self) -> None:
        u = urllib.parse.urlsplit(self.path)
        if u.path == "/__bench__/stats":
            body = json.dumps(self.stats.snapshot()).encode()
        elif u.path == "/__bench__/trace":
            with self.stats.lock:
                body = json.dumps(list(self.stats.trace)).encode()
        elif u.path == "/__bench__/reset":
            self.stats.reset()
            body = b"{}"
        elif u.path == "/__bench__/latency":
            q = urllib.parse.parse_qs(u.query)
            self.latency[0] = float(q["ms"][0]) / 1000.0
            body = json.dumps({"latency_ms": self.latency[0] * 1000}).encode()
        else:
            self.send_error(404)
            return
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_request_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            for _ in range(10_000_000):
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out += self.rfile.read(size)
                self.rfile.readline(65537)
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self) -> None:
        if self.path.startswith("/__bench__/"):
            self._control()
            return
        kind = classify(self.command, self.path, self.headers)
        body = self._read_request_body()
        delay = self.latency[0]
        if delay > 0:
            time.sleep(delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        resp = None
        for attempt in range(2):  # one retry on a stale keep-alive connection to the upstream
            if self._up is None:
                self._up = http.client.HTTPConnection(*self.upstream, timeout=120)
            try:
                self._up.request(self.command, self.path, body=body, headers=headers)
                resp = self._up.getresponse()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                self._up.close()
                self._up = None
                if attempt:
                    self.send_error(502)
                    return
        assert resp is not None
        self.send_response(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() not in ("server", "date", "content-length"):
                self.send_header(k, v)
        down = 0
        if self.command == "HEAD" or resp.status in (204, 304) or length is not None:
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                while True:
                    buf = resp.read(CHUNK)
                    if not buf:
                        break
                    self.wfile.write(buf)
                    down += len(buf)
            else:
                resp.read()
        else:  # no length from upstream: buffer it
            data = resp.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            down = len(data)
        if resp.will_close:
            self._up.close()
            self._up = None
        self.stats.add(kind, len(body), down, (time.time(), kind, self.command, self.path,
                                               self.headers.get("Range"), resp.status, down))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def make_proxy(upstream: str, latency_ms: float = 20.0, port: int = 0) -> Server:
    u = urllib.parse.urlsplit(upstream)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the proxy forwards to loopback only")
    handler = type("BoundProxy", (ProxyHandler,), {
        "upstream": (u.hostname, u.port or 80), "stats": Stats(), "latency": [latency_ms / 1000]})
    return Server(("127.0.0.1", port), handler)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    srv = make_proxy(args.upstream, args.latency_ms, args.port)
    print(f"READY {srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
