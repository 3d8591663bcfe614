"""Soak: a writer and readers in one process for a bounded time; memory and descriptors stay flat.

A child process (``faults.py soak``) writes through the VFS in write mode (sync every 100 ms,
compaction, snapshots and L0 retention running) while reader threads on their own Replica poll
and check every read; all of it through the fault proxy (3 % of requests fail in some way, so
error paths run too). Every half second the child reports its RSS, tracemalloc's current
traced memory, its open file descriptors and threads. The last third of the run must not hold
more than the first third (with tolerances), and readers must only ever see whole commits.

``LTXVFS_SOAK_SECONDS`` sets the duration (20 s in CI; e.g. 600 for a real soak).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from test_chaos import _report, by_another_name, s3_urls, vfs_uri

from ltxvfs.hydrate import PARALLEL as HYDRATION_PARALLEL
from ltxvfs.jobs import JOB_THREADS, POOL_THREADS
from ltxvfs.storage.s3 import DEFAULT_MAX_POOL_CONNECTIONS, DEFAULT_METADATA_CONCURRENCY

from faults import FaultProxy, Faults

HERE = Path(__file__).parent
SOAK_SECONDS = float(os.environ.get("LTXVFS_SOAK_SECONDS", "20"))
MIB = 1024 * 1024
#: Threads of per-call pools alive at once: each job thread (sync, compaction, poll) and reader
#: may be inside one call's pool (HEADs, or a listing of 10 levels) at a time.
CALL_THREADS_CAP = (JOB_THREADS + 4) * max(DEFAULT_METADATA_CONCURRENCY, 10)
READERS = 4
#: Growth allowed per operation (a commit or a checked read) once warmed up: the least-squares
#: slope, over the second half of the samples, of the *floor* of Python's traced memory and of
#: malloc's bytes in use (the lowest value of each 2 s window: a sample taken during a compaction
#: or a snapshot catches transient buffers; a leak raises the floor). The old bounds (last third
#: vs first: +15 % + 16 MiB RSS, +25 % + 4 MiB traced) let a 20 s run grow ~1 MiB/s unnoticed.
#: RSS itself is not bounded per operation: it keeps rising for tens of seconds as glibc's
#: per-thread arenas warm up (with MALLOC_ARENA_MAX=2 it levels off after ~25 s, while the
#: in-use bytes stay flat from the start), so in a short run it measures warm-up, not leaks.
#: The child collects garbage before each sample (live memory only). Measured on 20 s runs:
#: traced floor -110..490 B/op (page caches still filling when the machine is busy); malloc's
#: in-use floor 1.2-2.2 KiB/op, still warming up. A leak of 2 KiB per commit
#: (LTXVFS_SOAK_LEAK=2048: ~1.3 KiB/op) fails the traced bound; the old bounds missed ~16 KiB/op
#: (~1 MiB/s at ~65 operations/s).
TRACED_BYTES_PER_OP = 1024
HEAP_BYTES_PER_OP = 4096
WINDOW = 4  # samples (every 0.5 s)
#: The child opens two S3 clients (the writer's URL and the readers' one).
S3_CLIENTS = 2

pytestmark = [pytest.mark.soak, pytest.mark.slow,
              pytest.mark.timeout(max(600, int(SOAK_SECONDS * 1.5) + 180))]  # long soaks


def test_soak_memory_and_descriptors_stay_flat(s3_server, bucket, tmp_path):
    with FaultProxy(s3_server, Faults.uniform(0.03), seed=11) as proxy:
        url = s3_urls(bucket, proxy.endpoint)
        write = vfs_uri(url, write_enabled="true", buffer_path=quote(str(tmp_path / "buf")),
                        sync_interval="100ms", compaction_levels="1s,3s",
                        snapshot_interval="2s", snapshot_retention="4s", l0_retention="1s",
                        cache_size="1MiB")  # a replica of bounded size: a steady state
        # Readers follow the replica as another location: their own Replica, polling.
        read = vfs_uri(by_another_name(url), poll_interval="100ms", cache_size="1MiB")
        p = subprocess.run([sys.executable, str(HERE / "faults.py"), "soak", write, read,
                            "--duration", str(SOAK_SECONDS), "--readers", str(READERS),
                            "--every", "0.5", "--leak", os.environ.get("LTXVFS_SOAK_LEAK", "0")],
                           capture_output=True, text=True, timeout=SOAK_SECONDS + 180,
                           stdin=subprocess.DEVNULL)
        injected = proxy.stats()
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    samples = [s for s in lines if "t" in s]
    done = lines[-1]
    assert done.get("done"), p.stderr[-3000:]
    assert not done["failures"], done["failures"]
    assert done["counters"]["commits"] > 50 and done["counters"]["reads"] > 20, done
    per_reader = [done["counters"].get(f"reads_{k}", 0) for k in range(READERS)]
    assert min(per_reader) > 5, f"a reader thread read (almost) nothing: {per_reader}"
    assert sum(v for k, v in injected["injected"].items() if k != "stale_hidden_puts") > 0
    assert len(samples) >= 9, f"too few samples: {len(samples)}"
    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]

    def mean(key, part):
        return statistics.mean(s[key] for s in part)

    figures = {
        "seconds": SOAK_SECONDS, "samples": len(samples), **done["counters"],
        "rss_first_mib": round(mean("rss", first) / MIB, 1),
        "rss_last_mib": round(mean("rss", last) / MIB, 1),
        "traced_first_mib": round(mean("traced", first) / MIB, 2),
        "traced_last_mib": round(mean("traced", last) / MIB, 2),
        "fds_first_max": max(s["fds"] for s in first), "fds_last_max": max(s["fds"] for s in last),
        "file_fds_first_mean": round(mean("fds_other", first), 2),
        "file_fds_last_mean": round(mean("fds_other", last), 2),
        "socket_fds_max": max(s["fds_socket"] for s in samples),
        "threads_first_max": max(s["threads"] for s in first),
        "threads_last_max": max(s["threads"] for s in last),
        "other_threads_first_max": max(s["threads_other"] for s in first),
        "other_threads_last_max": max(s["threads_other"] for s in last),
        "pool_threads_max": max(s["threads_pool"] for s in samples),
        "call_threads_max": max(s["threads_call"] for s in samples),
        "faults_injected": injected["injected"],
    }
    # Slopes per operation of the floors over the warmed-up part (the second half).
    warm = samples[len(samples) // 2:]  # under load the caches take longer than a third to fill
    windows = [warm[i:i + WINDOW] for i in range(0, len(warm) - WINDOW + 1, WINDOW)]
    ops = [w[-1]["commits"] + w[-1]["reads"] for w in windows]
    figures["ops"] = samples[-1]["commits"] + samples[-1]["reads"]
    # Less what the page caches hold: they fill up to their bound (1 MiB per replica here), more
    # slowly on a busy machine, and that is no leak (CI once measured 2 KiB/op of it).
    figures["traced_floor_bytes_per_op"] = round(
        _slope(ops, [min(s["traced"] - s.get("cached", 0) for s in w) for w in windows]), 1)
    if samples[0].get("heap") is not None:
        figures["heap_floor_bytes_per_op"] = round(
            _slope(ops, [min(s["heap"] for s in w) for w in windows]), 1)
        figures["heap_first_mib"] = round(mean("heap", first) / MIB, 1)
        figures["heap_last_mib"] = round(mean("heap", last) / MIB, 1)
    figures["rss_bytes_per_op"] = round(_slope([s["commits"] + s["reads"] for s in warm],
                                               [s["rss"] for s in warm]), 1)  # reported only
    _report("soak", figures)
    assert len(windows) >= 3, f"too few samples for a slope: {len(samples)}"
    assert figures["traced_floor_bytes_per_op"] <= TRACED_BYTES_PER_OP, figures
    assert figures.get("heap_floor_bytes_per_op", 0) <= HEAP_BYTES_PER_OP, figures
    assert mean("rss", last) <= mean("rss", first) * 1.15 + 16 * MIB, figures
    assert mean("traced", last) <= mean("traced", first) * 1.25 + 4 * MIB, figures
    # Sockets come and go with the HTTP connection pools (a fault drops one, the next request
    # opens another), up to the pools' size; files (buffer, journals, scratch) must stay flat.
    # Means, not maxima: a sample may catch a buffer rewrite holding two more for a moment.
    assert figures["file_fds_last_mean"] <= figures["file_fds_first_mean"] + 1, figures
    assert figures["socket_fds_max"] <= S3_CLIENTS * DEFAULT_MAX_POOL_CONNECTIONS, figures
    # The shared pools start threads on demand and keep them, so the total may rise during a
    # run (CI once saw 14 -> 17 in 20 s) up to their fixed caps; that is not a leak. What must
    # not rise is every other thread (main, readers, the scheduler), and pools stay under caps.
    assert figures["other_threads_last_max"] <= figures["other_threads_first_max"], figures
    assert figures["pool_threads_max"] <= POOL_THREADS + JOB_THREADS + HYDRATION_PARALLEL, figures
    assert figures["call_threads_max"] <= CALL_THREADS_CAP, figures


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    assert den > 0, "no operations between samples"
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den
