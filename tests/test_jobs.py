"""The shared job scheduler, and closing a writer while its background jobs run."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ltxvfs
import ltxvfs.compact
from ltxvfs.jobs import Scheduler

from test_write import writer


def test_remove_waits_for_a_run_in_progress_and_is_bounded():
    pool = ThreadPoolExecutor(2)
    sched = Scheduler(pool)
    started, release = threading.Event(), threading.Event()
    runs = []

    def job():
        runs.append(time.monotonic())
        started.set()
        release.wait(10)

    sched.add("slow", job, 0.01)
    try:
        assert started.wait(5)
        t0 = time.monotonic()
        assert sched.remove("slow", wait=0.2) is False  # still running: gave up after 0.2 s
        assert 0.15 < time.monotonic() - t0 < 10  # the upper bound only catches a hang
        threading.Timer(0.1, release.set).start()
        assert sched.remove("slow", wait=5) is True  # returned once the run ended
        ticks = threading.Semaphore(0)
        sched.add("tick", ticks.release, 0.01)  # the scheduler keeps going past "slow"'s slots
        assert all(ticks.acquire(timeout=5) for _ in range(10))
        assert len(runs) == 1  # the removed job never ran again
        assert sched.remove("never-added", wait=1) is True
    finally:
        release.set()
        sched.stop()
        pool.shutdown(wait=True)


def test_closing_a_writer_lets_a_running_compaction_finish(tmp_path, monkeypatch, caplog):
    """Close used to pull the storage client from under a compaction in progress ("client is
    closed" in the log); now it waits for the run to end, then syncs and closes."""
    ltxvfs.register()
    real = ltxvfs.compact.compact_level
    inside, done = threading.Event(), threading.Event()

    def slow_compaction(client, level):
        inside.set()
        time.sleep(0.3)
        result = real(client, level)
        done.set()
        return result

    monkeypatch.setattr(ltxvfs.compact, "compact_level", slow_compaction)
    url = (tmp_path / "replica").as_uri()
    con = writer(url, tmp_path, sync_interval="20ms", compaction_levels="50ms")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    con.execute("PRAGMA litestream_sync")
    assert inside.wait(5)
    with caplog.at_level(logging.DEBUG, logger="ltxvfs"):
        con.close()
    assert done.is_set(), "close returned while the compaction was still running"
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not problems, problems

