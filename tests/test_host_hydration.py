"""One hydrated copy per host (issue 18 item 2): processes given the same hydration_path share
one file — one builds it, the others read it when it equals their own state, and one of them
takes over when the builder exits or is killed. Real processes, started with fork and spawn."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import host_hydration_proc as proc
import pytest

from ltxvfs.host import sharedcopy
from ltxvfs.storage import open_replica

from hydration_rig import digest
from litestream_rig import litestream_restore
from replicas import FakePrimary, page_bytes

HOLD = 120.0  # bound of every wait on another process


def wait_for(cond, timeout=HOLD, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.02)


class Proc:
    """A worker process of host_hydration_proc; every answer awaited with a bound."""

    def __init__(self, ctx, target, *args):
        self.conn, child = ctx.Pipe()
        self.p = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.p.start()
        child.close()
        self.hello = self.recv()
        assert "pid" in self.hello, self.hello

    def recv(self, timeout=HOLD):
        assert self.conn.poll(timeout), f"process {self.p.pid} did not answer"
        return self.conn.recv()

    def ask(self, cmd, arg=None, timeout=HOLD):
        self.conn.send((cmd, arg))
        answer = self.recv(timeout)
        assert not (isinstance(answer, dict) and "error" in answer and cmd != "read"), answer
        return answer

    def stats(self):
        return self.ask("stats")

    def close(self):
        assert self.ask("close") == {"closed": True}
        self.p.join(HOLD)
        assert self.p.exitcode == 0

    def kill(self):
        if self.p.is_alive():
            os.kill(self.p.pid, signal.SIGKILL)
        self.p.join(HOLD)


@pytest.fixture(params=["fork", "spawn"])
def ctx(request):
    return multiprocessing.get_context(request.param)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def uri(url: str, target: Path, **params) -> str:
    u = (f"file:db?vfs=litestream&replica_url={quote(url, safe='')}&poll_interval=50ms"
         f"&hydration_path={quote(str(target), safe='')}")
    return u + "".join(f"&{k}={v}" for k, v in params.items())


def random_replica(tmp_path: Path, name: str = "r", rows: int = 400) -> FakePrimary:
    """~1.1 MB of incompressible rows: what is downloaded is about the database's size."""
    url = (tmp_path / name).as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / f"{name}.db", client)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)",
                 f"INSERT INTO t(b) SELECT randomblob(2500) FROM generate_series(1, {rows})")
    p.url = url
    return p


def frame_bytes(url: str) -> int:
    """What one full hydration downloads: the newest frame of every page, compressed."""
    from concurrent.futures import ThreadPoolExecutor

    from ltxvfs.pages import state_at

    with open_replica(url) as client, ThreadPoolExecutor(2) as pool:
        return sum(ref[2] for _, ref in state_at(client, pool).index.items())


def rows_digest(primary: FakePrimary) -> str:
    return digest(primary.rows("SELECT id, b FROM t ORDER BY id"))


def start(ctx, procs, n, url, target, opts=None, **params):
    new = [Proc(ctx, proc.reader, uri(url, target, **params), dict(opts or {}))
           for _ in range(n)]
    procs.extend(new)
    return new


def all_at(workers, progress="100.0"):
    return all(w.stats()["progress"] == progress for w in workers)


def test_eight_processes_build_one_copy_and_all_read_it(ctx, procs, tmp_path):
    primary = random_replica(tmp_path)
    target = tmp_path / "h" / "copy.db"
    db_size = primary.path.stat().st_size
    workers = start(ctx, procs, 8, primary.url, target)
    wait_for(lambda: all_at(workers), what="every process at 100.0")
    stats = [w.stats() for w in workers]
    roles = sorted(s["hydration_role"] for s in stats)
    assert roles == ["builder"] + ["reader"] * 7, roles
    fetched = sum(s["hydration_fetched_bytes"] for s in stats)
    # Random rows: frames barely compress (the file's free space does, hence the first bound).
    full = frame_bytes(primary.url)
    assert full <= fetched <= 1.1 * full and fetched <= 1.1 * db_size, (fetched, full, db_size)
    assert sorted(os.listdir(target.parent)) == ["copy.db", "copy.db.meta"]
    assert page_bytes(target) == page_bytes(primary.path)
    want = rows_digest(primary)
    for w in workers:
        before = w.stats()["hydration_file_reads"]
        r = w.ask("read")
        assert (r["txid"], r["rows"], r["digest"]) == ("0000000000000001", 400, want), r
        assert w.stats()["hydration_file_reads"] > before + 300, "not read from the copy"
    # The builder leaves first: another one takes over, downloading nothing (the copy is whole).
    (builder,) = [w for w, s in zip(workers, stats, strict=True) if s["hydration_role"] == "builder"]
    builder.close()
    rest = [w for w in workers if w is not builder]
    wait_for(lambda: sum(w.stats()["hydration_takeovers"] for w in rest) == 1, what="takeover")
    assert sum(w.stats()["hydration_fetched_bytes"] for w in rest) == fetched - \
        next(s for s in stats if s["hydration_role"] == "builder")["hydration_fetched_bytes"]
    for w in rest[:-1]:
        w.close()
        assert target.exists(), "a process closing deleted the copy another one reads"
    last = rest[-1]
    before = last.stats()["hydration_file_reads"]
    assert last.ask("read")["digest"] == want
    assert last.stats()["hydration_file_reads"] > before
    last.close()
    assert not target.exists() and not target.with_name("copy.db.meta").exists()


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["a-reader", "the-writer"])
def test_a_writer_process_commits_while_eight_processes_read_the_copy(ctx, procs, tmp_path,
                                                                     builder):
    """Rows carry their version; every read transaction must see one version, with every row
    holding exactly that version's bytes, at the TXID the writer synced it as — while the
    builder (another process, or the writer itself, in write mode) rewrites the copy in place
    under the readers."""
    writer_and_readers(ctx, procs, tmp_path, (tmp_path / "r").as_uri(), builder, 8, 12)


@pytest.mark.parametrize("builder", ["a-reader", "the-writer"])
def test_a_writer_and_readers_share_a_copy_of_an_s3_replica(procs, tmp_path, s3_url, builder):
    """The same on S3: the states match by ETag, also between the writer's own upload (PUT's
    ETag) and the readers' listings (LIST's)."""
    ctx = multiprocessing.get_context("spawn")
    writer_and_readers(ctx, procs, tmp_path, s3_url, builder, 3, 4)


def writer_and_readers(ctx, procs, tmp_path, url, builder, readers_n, versions):
    with open_replica(url) as client:
        primary = FakePrimary(tmp_path / "p.db", client)
        primary.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER, b BLOB)",
                       f"INSERT INTO t(id, v, b) SELECT value, 0, CAST(printf('%.*c', "
                       f"{proc.ROW_BYTES}, char(65 + value % 26)) AS BLOB) "
                       "FROM generate_series(1, 300)")
    target = tmp_path / "copy.db"
    w_uri = uri(url, target, write_enabled="true", sync_interval="-1s",
                buffer_path=quote(str(tmp_path / "w.buffer"), safe=""))
    if builder == "the-writer":  # first to open: it builds the copy from its own syncs
        writer = Proc(ctx, proc.writer, w_uri, versions)
        procs.append(writer)
    readers = start(ctx, procs, readers_n, url, target, {"versioned": True})
    wait_for(lambda: all_at(readers), what="every reader at 100.0")
    if builder == "a-reader":  # the writer joins the copy a reader builds, and reads it
        writer = Proc(ctx, proc.writer, w_uri, versions)
        procs.append(writer)
    before = sum(r.stats()["hydration_file_reads"] for r in readers)
    stop = tmp_path / "stop"
    for r in readers:
        r.conn.send(("hammer", str(stop)))
    writer.conn.send("go")
    synced = {}
    while True:
        txid, version = writer.recv()
        assert txid != "error", version
        if txid == "done":
            break
        synced[txid] = version
    assert len(synced) == versions
    final = max(synced)
    stop.write_text("")
    results = [r.recv() for r in readers]
    during = sum(r.stats()["hydration_file_reads"] for r in readers) - before
    truth = {"0000000000000001": 0, **synced}
    for res in results:
        assert not res["errors"], res["errors"][:3]
        assert not res["bad"], res["bad"][:3]
        assert res["reads"] > 0
        wrong = [p for p in res["pairs"] if truth.get(p[0]) != p[1]]
        assert not wrong, f"read transactions saw versions of other TXIDs: {wrong}"
    assert during > 0, "no read came from the copy while the writer committed"
    for r in readers:
        wait_for(lambda r=r: r.ask("poll")["txid"] == final, what="poll")
        wait_for(lambda r=r: r.stats()["progress"] == "100.0", what="caught up")
        n = r.stats()["hydration_file_reads"]
        res = r.ask("read")
        assert (res["txid"], res["version"], res["bad"]) == (final, versions, []), res
        assert r.stats()["hydration_file_reads"] > n, "the last version not read from the copy"
    roles = [r.stats()["hydration_role"] for r in readers]
    assert roles.count("builder") == (1 if builder == "a-reader" else 0), roles
    fetched = sum(r.stats()["hydration_fetched_bytes"] for r in readers)
    writer.conn.send("bye")
    writer.p.join(HOLD)
    assert writer.p.exitcode == 0
    # The writer leaving hands the copy to a reader (no download when it was the builder: the
    # copy is whole, at the TXID the readers are at).
    wait_for(lambda: [r.stats()["hydration_role"] for r in readers].count("builder") == 1,
             what="a builder")
    assert sum(r.stats()["hydration_fetched_bytes"] for r in readers) == fetched
    for r in readers:
        assert r.ask("read")["version"] == versions
        r.close()


def test_two_replicas_given_one_path_do_not_share_it(procs, tmp_path):
    """Two applications given one hydration path for different replicas: the second says so
    and reads remotely; the first one's copy is left alone."""
    ctx = multiprocessing.get_context("fork")
    one, two = random_replica(tmp_path, "one", rows=50), random_replica(tmp_path, "two", rows=60)
    target = tmp_path / "copy.db"
    (a,) = start(ctx, procs, 1, one.url, target)
    wait_for(lambda: all_at([a]), what="built")
    (b,) = start(ctx, procs, 1, two.url, target)
    progress = b.stats()["progress"]
    assert progress == (f"failed: hydration file {target} holds a copy of another replica, "
                        "built by another process; reads stay remote"), progress
    assert b.ask("read")["digest"] == rows_digest(two)
    b.close()
    assert page_bytes(target) == page_bytes(one.path)
    assert a.ask("read")["digest"] == rows_digest(one)
    assert a.stats()["progress"] == "100.0"
    a.close()
    assert not target.exists()


def test_a_builder_that_fails_lets_another_process_build(procs, tmp_path):
    """Its writes fail (a full disk, in that process only): it says so, lets go of the builder
    lock, and reads the copy another process then builds."""
    ctx = multiprocessing.get_context("fork")
    primary = random_replica(tmp_path)
    target = tmp_path / "copy.db"
    (failing,) = start(ctx, procs, 1, primary.url, target, {"fail_writes": True})
    wait_for(lambda: failing.stats()["progress"].startswith("failed: "), what="failure")
    assert "No space left on device" in failing.stats()["progress"]
    (other,) = start(ctx, procs, 1, primary.url, target)
    wait_for(lambda: all_at([other]), what="built by the other process")
    assert other.stats()["hydration_role"] == "builder"
    before = failing.stats()["hydration_file_reads"]
    assert failing.ask("read")["digest"] == rows_digest(primary)
    assert failing.stats()["hydration_file_reads"] > before
    assert page_bytes(target) == page_bytes(primary.path)
    failing.close()
    other.close()
    assert not target.exists()


@pytest.mark.slow
def test_kill_9_of_the_builder_mid_build_another_takes_over_and_resumes(ctx, procs, tmp_path):
    primary = random_replica(tmp_path)
    target = tmp_path / "copy.db"
    db_size = primary.path.stat().st_size
    small = {"run_bytes": 16 * 1024}
    (first,) = start(ctx, procs, 1, primary.url, target, {**small, "hold_after": 30})
    wait_for(lambda: (lambda h: h["finished"] == 30 and h["held"] >= 1)(first.ask("held")),
             what="the builder holding after 30 GETs")
    s = first.stats()
    assert s["hydration_role"] == "builder"
    fetched_first = s["hydration_fetched_bytes"]
    assert 0 < fetched_first < 0.7 * db_size
    others = start(ctx, procs, 7, primary.url, target, small)
    for w in others:
        st = w.stats()
        assert st["hydration_role"] == "reader", st
        assert 0.0 < float(st["progress"]) < 100.0, st  # the builder's progress, shared
    first.kill()
    wait_for(lambda: all_at(others), what="the copy completed after the takeover")
    stats = [w.stats() for w in others]
    assert sorted(s["hydration_takeovers"] for s in stats) == [0] * 6 + [1]
    assert [s["hydration_role"] for s in stats].count("builder") == 1
    total = fetched_first + sum(s["hydration_fetched_bytes"] for s in stats)
    full = frame_bytes(primary.url)
    assert total < 2 * db_size
    assert total <= 1.1 * full, ("the pages the killed builder wrote were fetched again",
                                 total, full, db_size)
    ref = litestream_restore(primary.url, tmp_path / "ref.db", txid=1)
    assert page_bytes(target) == page_bytes(ref) == page_bytes(primary.path)
    want = rows_digest(primary)
    for w in others:
        assert w.ask("read")["digest"] == want
    for w in others:
        w.close()
    assert not target.exists()


def test_kill_9_after_completion_takes_over_without_downloading_again(ctx, procs, tmp_path):
    primary = random_replica(tmp_path)
    target = tmp_path / "copy.db"
    db_size = primary.path.stat().st_size
    workers = start(ctx, procs, 3, primary.url, target)
    wait_for(lambda: all_at(workers), what="complete")
    (builder,) = [w for w in workers if w.stats()["hydration_role"] == "builder"]
    builder.kill()
    rest = [w for w in workers if w is not builder]
    wait_for(lambda: [w.stats()["hydration_role"] for w in rest].count("builder") == 1,
             what="takeover")
    assert [w.stats()["hydration_fetched_bytes"] for w in rest] == [0, 0]
    primary.commit("UPDATE t SET b = randomblob(2500) WHERE id <= 10")
    wait_for(lambda: all(w.stats()["txid"] == "0000000000000002" for w in rest), what="poll")
    wait_for(lambda: all_at(rest), what="caught up")
    fetched = sum(w.stats()["hydration_fetched_bytes"] for w in rest)
    # (the small L0 file arrives whole with its index: its pages often need no GET at all)
    assert fetched < 0.1 * db_size, "the new builder fetched more than what changed"
    assert page_bytes(target) == page_bytes(primary.path)
    for w in rest:
        assert w.ask("read")["digest"] == rows_digest(primary)
        w.close()


def test_a_copy_of_a_replaced_history_is_not_used(procs, tmp_path):
    """A persistent copy of TXID 2 stays; the replica is replaced by another database whose
    files have the same names (TXIDs 1 and 2). Nobody may read the old copy as the new TXID 2."""
    ctx = multiprocessing.get_context("fork")
    primary = random_replica(tmp_path, rows=100)
    primary.commit("UPDATE t SET b = randomblob(2500) WHERE id <= 10")
    target = tmp_path / "copy.db"
    (w,) = start(ctx, procs, 1, primary.url, target, hydration_persistent="true")
    wait_for(lambda: all_at([w]), what="complete")
    w.close()
    old = page_bytes(target)
    assert target.exists() and old == page_bytes(primary.path)
    for f in (tmp_path / "r").rglob("*.ltx"):
        f.unlink()
    with open_replica(primary.url) as client:
        other = FakePrimary(tmp_path / "other.db", client)
        other.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)",
                     "INSERT INTO t(b) SELECT randomblob(2500) FROM generate_series(1, 100)")
        other.commit("UPDATE t SET b = randomblob(2500) WHERE id <= 10")
    want = digest(other.rows("SELECT id, b FROM t ORDER BY id"))
    workers = start(ctx, procs, 2, primary.url, target, hydration_persistent="true")
    for x in workers:
        r = x.ask("read")
        assert (r["txid"], r["digest"]) == ("0000000000000002", want), r
    wait_for(lambda: all_at(workers), what="rebuilt")
    assert page_bytes(target) == page_bytes(other.path) != old
    for x in workers:
        assert x.ask("read")["digest"] == want
        x.close()


# --- the record's seqlock, forced interleavings (one process, two handles) -------------------------


def test_a_read_overlapping_the_builders_next_target_is_refused(tmp_path, monkeypatch):
    """The reader checked the record (TXID 1, complete), then the builder began TXID 2 and
    rewrote the page while the reader's pread ran: the reader must not return that page."""
    path = tmp_path / "copy.db"
    builder, reader = sharedcopy.SharedCopy(path), sharedcopy.SharedCopy(path)
    builder.open()
    reader.open()
    try:
        assert builder.try_build() and not reader.try_build()
        fd = builder.open_writable()
        one, two = b"1" * 16, b"2" * 16
        bits = builder.begin(1, one, (0, 1), 4096, 1, None)
        os.pwrite(fd, b"A" * 4096, 0)
        builder.written(bits, [1])
        assert reader.read(1, one, 4096, 1) is None  # not published yet
        builder.publish()
        assert reader.read(1, one, 4096, 1) == b"A" * 4096
        assert reader.read(1, two, 4096, 1) is None  # same TXID, another history
        assert reader.read(2, one, 4096, 1) is None
        assert reader.read(1, one, 1024, 1) is None  # another page size

        real = os.pread

        def pread(rfd, n, off):  # the builder moves on during the reader's pread
            monkeypatch.setattr(sharedcopy.os, "pread", real)
            builder.begin(2, two, (0, 2), 4096, 1, [1])
            os.pwrite(fd, b"B" * 4096, 0)
            return real(rfd, n, off)

        monkeypatch.setattr(sharedcopy.os, "pread", pread)
        assert reader.read(1, one, 4096, 1) is None, "a page of TXID 2 was read as TXID 1"
        assert reader.read(2, two, 4096, 1) is None  # TXID 2 not complete yet
        rec = reader.record()
        assert not rec.complete and reader.unsure_pages(rec) == {1}
        builder.written(bits := builder.begin(2, two, (0, 2), 4096, 1, [1]), [1])
        assert reader.unsure_pages(reader.record()) == set() and bits
        builder.publish()
        assert reader.read(2, two, 4096, 1) == b"B" * 4096
        assert reader.read(1, one, 4096, 1) is None
        os.close(fd)
    finally:
        reader.close(keep=False)
        builder.close(keep=False)
    assert not path.exists()


def test_after_a_reboot_an_unsynced_copy_is_neither_read_nor_resumed(tmp_path, monkeypatch):
    """The record says TXID 1 is complete, but it was written in another boot and never synced
    (a host crash may have lost page-cache writes it counts): readers must not use it, and the
    next builder must not resume from it."""
    path = tmp_path / "copy.db"
    c = sharedcopy.SharedCopy(path)
    c.open()
    one = b"1" * 16
    try:
        assert c.try_build()
        fd = c.open_writable()
        bits = c.begin(1, one, (0, 1), 4096, 1, None)
        os.pwrite(fd, b"A" * 4096, 0)
        c.written(bits, [1])
        c.publish()
        os.close(fd)
        assert c.read(1, one, 4096, 1) == b"A" * 4096
    finally:
        c.close(keep=True)  # as if killed: kept, not synced
    monkeypatch.setattr(sharedcopy, "_BOOT", bytes(range(16)))  # the host rebooted
    r, b = sharedcopy.SharedCopy(path), sharedcopy.SharedCopy(path)
    r.open()
    b.open()
    try:
        assert r.read(1, one, 4096, 1) is None, "an unsynced copy of another boot was read"
        assert b.try_build()
        rec = b.record()
        assert not rec.complete and not rec.txid, "the builder would resume from it"
    finally:
        r.close(keep=False)
        b.close(keep=False)


def test_an_unsynced_record_of_another_boot_is_not_trusted(tmp_path, monkeypatch):
    path = tmp_path / "copy.db"
    c = sharedcopy.SharedCopy(path)
    c.open()
    try:
        assert c.try_build()
        c.begin(1, b"1" * 16, (0, 1), 4096, 1, None)
        c.publish()
        assert c.record().complete and c.record().trusted()
        monkeypatch.setattr(sharedcopy, "_BOOT", bytes(range(16)))
        assert not c.record().trusted()  # a host crash may have lost page-cache writes
        monkeypatch.undo()
        c.mark_synced()
        monkeypatch.setattr(sharedcopy, "_BOOT", bytes(range(16)))
        assert c.record().trusted()
    finally:
        c.close(keep=False)


def _child_after_the_parent_let_go(conn, path, inherited):
    conn.send(inherited.mfd == -1 and inherited.map is None)  # dropped at the fork
    conn.recv()  # the parent has closed its handle
    mine = sharedcopy.SharedCopy(path)
    mine.open()
    conn.send(mine.try_build())
    mine.close(keep=False)


def test_a_forked_child_does_not_keep_its_parents_locks(tmp_path):
    """A process that opened the copy, then forked (a web server's master): the children's
    inherited descriptors would hold the builder lock after the parent closed or died, and no
    process could ever take over."""
    path = tmp_path / "copy.db"
    parent = sharedcopy.SharedCopy(path)
    parent.open()
    assert parent.try_build()
    ctx = multiprocessing.get_context("fork")
    conn, child_end = ctx.Pipe()
    child = ctx.Process(target=_child_after_the_parent_let_go, args=(child_end, path, parent))
    child.start()
    try:
        assert conn.poll(HOLD) and conn.recv() is True
        parent.close(keep=True)
        conn.send("go")
        assert conn.poll(HOLD) and conn.recv() is True, "the child could not take the builder lock"
        child.join(HOLD)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()


def _flip_versions(path, versions, ready):
    """A builder that rewrites the copy's pages to each version in turn, as fast as it can."""
    b = sharedcopy.SharedCopy(path, "r")
    b.open()
    assert b.try_build()
    fd = b.open_writable()
    ready.set()
    for v in range(1, versions + 1):
        b.begin(v, v.to_bytes(16, "big"), (0, v), 4096, 8, None)
        for p in range(8):
            os.pwrite(fd, bytes([v % 251]) * 4096, p * 4096)
        b.publish()
    os.close(fd)
    b.close(keep=True)


def test_reads_racing_a_builder_in_another_process_never_mix_versions(tmp_path):
    """No interleaving forced: a builder process rewrites the pages for version after version
    while this process reads whatever version the record names, thousands of times. Each read
    must be refused or be exactly that version's page."""
    path = tmp_path / "copy.db"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    builder = ctx.Process(target=_flip_versions, args=(path, 3000, ready))
    builder.start()
    reader = sharedcopy.SharedCopy(path, "r")
    try:
        assert ready.wait(HOLD)
        reader.open()
        served = refused = 0
        wrong = []
        while builder.is_alive() or served == 0:
            v = reader.record().txid
            if not v:
                continue
            for p in range(1, 9):
                data = reader.read(v, v.to_bytes(16, "big"), 4096, p)
                if data is None:
                    refused += 1
                elif data != bytes([v % 251]) * 4096:
                    wrong.append((v, p, data[0], data[-1]))
                else:
                    served += 1
            if not builder.is_alive() and served:
                break
        builder.join(HOLD)
        assert builder.exitcode == 0
        assert not wrong, f"pages of another version read: {wrong[:5]} ({len(wrong)})"
        assert served > 0, (served, refused)  # (how many were refused depends on timing)
    finally:
        if builder.is_alive():
            builder.kill()
        reader.close(keep=False)
