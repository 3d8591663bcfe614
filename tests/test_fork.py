"""A process that forks after ``ltxvfs.register()`` (gunicorn --preload, multiprocessing's fork
start method, Celery's prefork pool): the child must be able to open replicas, read, and follow
the primary — with background threads and locks of its own, never the parent's."""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading

import apsw
import pytest

import ltxvfs
from ltxvfs.storage import open_replica

from replicas import FakePrimary

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
WAIT = 60.0  # bounded: a child that deadlocks fails the test instead of hanging it


def pause(seconds: float) -> None:
    """Between two checks of a condition (bounded by the loops' counts)."""
    threading.Event().wait(seconds)


def _uri(url: str, name: str = "forked.db") -> str:
    return f"file:{name}?vfs=ltxvfs-fork&replica_url={url}&poll_interval=50ms"


def _child(url: str, other: str, out: multiprocessing.Queue, go: multiprocessing.Event) -> None:
    try:
        # a replica the parent never opened: its indexes are fetched on the child's own pool
        con2 = apsw.Connection(_uri(other, "other.db"),
                               flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        out.put(("other", con2.execute("SELECT count(*) FROM t").fetchall()[0][0]))
        con2.close()
        con = apsw.Connection(_uri(url), flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        first = con.execute("SELECT count(*) FROM t").fetchall()[0][0]
        out.put(("first", first))
        go.wait(WAIT)
        # the primary committed one more row: the child's own follower must bring it
        seen = first
        for _ in range(int(WAIT / 0.05)):
            seen = con.execute("SELECT count(*) FROM t").fetchall()[0][0]
            if seen > first:
                break
            pause(0.05)
        out.put(("followed", seen))
        con.close()
    except BaseException as err:  # report, do not hang
        out.put(("error", repr(err)))


def test_a_child_forked_after_register_opens_reads_and_follows(tmp_path, file_url):
    ltxvfs.register("ltxvfs-fork")
    other = (tmp_path / "other").as_uri()
    try:
        with open_replica(other) as client:
            q = FakePrimary(tmp_path / "q.db", client)
            q.commit("CREATE TABLE t(x)", "INSERT INTO t SELECT value FROM generate_series(1, 7)")
        with open_replica(file_url) as client:
            p = FakePrimary(tmp_path / "p.db", client)
            p.commit("CREATE TABLE t(x)", "INSERT INTO t SELECT value FROM generate_series(1, 500)")
            # the parent opens (and reads through) the same replica first: its pools, its
            # scheduler and its replica exist when the child is forked
            con = apsw.Connection(_uri(file_url),
                                  flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
            assert con.execute("SELECT count(*) FROM t").fetchall() == [(500,)]
            ctx = multiprocessing.get_context("fork")
            out, go = ctx.Queue(), ctx.Event()
            child = ctx.Process(target=_child, args=(file_url, other, out, go))
            child.start()
            try:
                assert out.get(timeout=WAIT) == ("other", 7)
                assert out.get(timeout=WAIT) == ("first", 500)
                p.commit("INSERT INTO t VALUES (501)")
                go.set()
                assert out.get(timeout=WAIT) == ("followed", 501)
            except queue.Empty:
                pytest.fail("the forked child did not answer: it waits on threads it does not have")
            finally:
                child.join(WAIT)
                if child.is_alive():
                    child.kill()
                    child.join(WAIT)
            assert child.exitcode == 0
            # the parent is unharmed: it still reads and follows
            for _ in range(int(WAIT / 0.05)):
                if con.execute("SELECT count(*) FROM t").fetchall() == [(501,)]:
                    break
                pause(0.05)
            assert con.execute("SELECT count(*) FROM t").fetchall() == [(501,)]
            con.close()
    finally:
        ltxvfs.registry.unregister("ltxvfs-fork")
