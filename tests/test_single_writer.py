"""Issue 16: write mode starts only on a store that keeps create-only writes.

The stand-in for a store that ignores ``If-None-Match`` is the fault proxy with
``drop_conditions=True`` in front of moto (which itself keeps the precondition: checked below),
so a PUT that should fail with 412 overwrites instead.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

import apsw
import boto3
import pytest
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY

import ltxvfs
from ltxvfs import singlewriter
from ltxvfs.compact import compact_level
from ltxvfs.config import ConfigError, VFSConfig
from ltxvfs.errors import AccessDeniedError, ObjectExistsError, UnsafeStoreError
from ltxvfs.plan import list_levels
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica, parse_replica_url
from ltxvfs.storage.base import PROBE_BODY, PROBE_DIR
from ltxvfs.storage.s3 import forbid_overwrite_header

from faults import FaultProxy, Faults, release_together
from litestream_rig import litestream_restore

HERE = Path(__file__).parent
RW = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    singlewriter.forget()
    yield
    singlewriter.forget()


def uri(url: str, buffer: Path, **params) -> str:
    out = (f"file:db?vfs=litestream&replica_url={quote(url, safe='')}&write_enabled=true"
           f"&buffer_path={quote(str(buffer), safe='')}")
    return out + "".join(f"&{k}={v}" for k, v in params.items())


def s3url(bucket: str, endpoint: str) -> str:
    return f"s3://{bucket}/db?endpoint={endpoint}&region=us-east-1"


def probe_keys(s3_admin, bucket: str) -> list[str]:
    resp = s3_admin.list_objects_v2(Bucket=bucket, Prefix=f"db/{PROBE_DIR}/")
    return [o["Key"] for o in resp.get("Contents", ())]


def all_keys(s3_admin, bucket: str) -> list[str]:
    return [o["Key"] for o in s3_admin.list_objects_v2(Bucket=bucket).get("Contents", ())]


@pytest.fixture
def overwriting(s3_server):
    """A store that ignores If-None-Match (and the vendor headers) and overwrites."""
    with FaultProxy(s3_server, Faults(), drop_conditions=True) as proxy:
        yield proxy


# --- the stand-in is what it claims to be -------------------------------------------------------


def test_moto_keeps_the_precondition_and_the_stand_in_drops_it(s3_server, bucket, overwriting):
    """Without this, every refusal below could be vacuous: moto answers 412, the stand-in
    lets the second exclusive write of one TXID replace the first (the issue's silent loss)."""
    with open_replica(s3url(bucket, s3_server)) as direct:
        direct.write(0, 1, 1, b"first", 1000, exclusive=True)
        with pytest.raises(ObjectExistsError, match="already exists"):
            direct.write(0, 1, 1, b"second", 2000, exclusive=True)
    with open_replica(s3url(bucket, overwriting.endpoint)) as lax:
        lax.write(0, 2, 2, b"first", 1000, exclusive=True)
        lax.write(0, 2, 2, b"second", 2000, exclusive=True)  # no error: overwritten
        assert lax.read(0, 2, 2) == b"second"
    assert overwriting.dropped_conditions == 2


# --- a store that keeps the promise ------------------------------------------------------------


def test_probe_on_a_good_store_costs_two_puts_and_one_delete_and_leaves_nothing(
        s3_server, bucket, s3_admin):
    with FaultProxy(s3_server, Faults()) as proxy, \
            open_replica(s3url(bucket, proxy.endpoint)) as client:
        assert client.probe_create_only() == "If-None-Match: *"
        assert client.requests.snapshot() == {"GET": 0, "PUT": 2, "LIST": 0, "HEAD": 0,
                                              "DELETE": 1}
        assert dict(proxy.requests) == {"PUT": 2, "DELETE": 1}  # what reached the store
        (probe,) = [k for k in proxy.stored if PROBE_DIR in k]
        assert proxy.stored[probe] == 1, "the second PUT was refused, not stored"
        assert probe.startswith(f"db/{PROBE_DIR}/") and probe.endswith(".probe")
        assert all("if-none-match" in names for kind, _, names in proxy.write_headers)
    assert all_keys(s3_admin, bucket) == []


def test_write_mode_probes_once_per_process_and_replica(vfs, s3_server, bucket, tmp_path,
                                                       caplog):
    with FaultProxy(s3_server, Faults()) as proxy:
        url = s3url(bucket, proxy.endpoint)
        with caplog.at_level(logging.INFO, logger="ltxvfs"):
            con = apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
            con.execute("CREATE TABLE t(x)")
            con.execute("INSERT INTO t VALUES (1)")
            con.execute("PRAGMA litestream_write_enabled = 0")
            con.execute("PRAGMA litestream_write_enabled = 1")  # a second start: no new probe
            con.execute("INSERT INTO t VALUES (2)")
            con.close()
            again = apsw.Connection(uri(url.replace("/db?", "/db/?"), tmp_path / "buf"),
                                    flags=RW)  # the same replica, spelled otherwise
            again.execute("INSERT INTO t VALUES (3)")
            again.close()
        probes = [k for k in proxy.stored if PROBE_DIR in k]
        assert len(probes) == 1, probes
        said = [r.getMessage() for r in caplog.records if "keeps create-only" in r.getMessage()]
        assert len(said) == 1 and "If-None-Match: *" in said[0] and proxy.endpoint in said[0]
    with open_replica(s3url(bucket, s3_server)) as client:
        assert [r for r in _rows(restore(client, tmp_path / "r.db").path)] == [(1,), (2,), (3,)]


def _rows(path) -> list[tuple]:
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return [tuple(r) for r in con.execute("SELECT x FROM t ORDER BY x")]
    finally:
        con.close()


# --- a store that overwrites -------------------------------------------------------------------


def test_write_mode_is_refused_on_a_store_that_overwrites(vfs, bucket, overwriting, s3_admin,
                                                          tmp_path):
    url = s3url(bucket, overwriting.endpoint)
    with pytest.raises(apsw.CantOpenError) as info:
        apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
    message = str(info.value)
    assert isinstance(info.value.__cause__, UnsafeStoreError), repr(info.value.__cause__)
    assert f"write mode refused for {url}" in message
    assert f"the store {overwriting.endpoint} (bucket {bucket!r}) does not keep create-only " \
           "writes" in message
    assert "If-None-Match: *" in message and "replaced the object" in message
    assert "lose acknowledged commits" in message and "single_writer=trusted" in message
    assert TEST_SECRET_KEY not in message and TEST_ACCESS_KEY not in message
    assert all_keys(s3_admin, bucket) == [], "nothing written, the probe object deleted"
    assert not (tmp_path / "buf").exists(), "no write buffer was created"
    # The verdict is cached: the next open is refused without another probe.
    puts = overwriting.requests["PUT"]
    with pytest.raises(apsw.CantOpenError, match="does not keep create-only writes"):
        apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
    assert overwriting.requests["PUT"] == puts


def test_pragma_write_enabled_on_a_store_that_overwrites_is_an_sqlerror(
        vfs, s3_server, bucket, overwriting, tmp_path):
    seed = apsw.Connection(uri(s3url(bucket, s3_server), tmp_path / "seed"), flags=RW)
    seed.execute("CREATE TABLE t(x)")
    seed.execute("INSERT INTO t VALUES (1)")
    seed.close()
    url = s3url(bucket, overwriting.endpoint)
    con = apsw.Connection(f"file:db?vfs=litestream&replica_url={quote(url, safe='')}",
                          flags=RW)
    with pytest.raises(apsw.SQLError, match=r"write mode refused for .*does not keep "
                                            r"create-only writes.*single_writer=trusted"):
        con.execute("PRAGMA litestream_write_enabled = 1")
    assert con.execute("PRAGMA litestream_write_enabled").fetchall() == [("0",)]
    assert con.execute("SELECT x FROM t").fetchall() == [(1,)]  # still a reader
    with pytest.raises(apsw.ReadOnlyError):
        con.execute("INSERT INTO t VALUES (2)")
    con.close()


def test_opt_in_writes_and_warns_at_every_start(vfs, s3_server, bucket, overwriting, tmp_path,
                                                caplog):
    url = s3url(bucket, overwriting.endpoint)
    with caplog.at_level(logging.INFO, logger="ltxvfs"):
        con = apsw.Connection(uri(url, tmp_path / "buf", single_writer="trusted"), flags=RW)
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES (1)")
        con.execute("PRAGMA litestream_write_enabled = 0")
        con.execute("PRAGMA litestream_write_enabled = 1")
        con.execute("INSERT INTO t VALUES (2)")
        con.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "single_writer=trusted" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in caplog.records]
    text = warnings[0].getMessage()
    assert url in text and "without checking" in text and "lose acknowledged commits" in text
    assert not [k for k in overwriting.stored if PROBE_DIR in k], "trusted: no probe"
    with open_replica(s3url(bucket, s3_server)) as client:
        assert _rows(restore(client, tmp_path / "r.db").path) == [(1,), (2,)]


def test_opt_in_from_the_environment_and_bad_values(vfs, s3_server, bucket, overwriting,
                                                    tmp_path):
    assert VFSConfig().single_writer == "verify"
    assert VFSConfig.from_env({"LITESTREAM_SINGLE_WRITER": "Trusted"}).single_writer == "trusted"
    with pytest.raises(ConfigError, match="LITESTREAM_SINGLE_WRITER 'yes'.*verify.*trusted"):
        VFSConfig.from_env({"LITESTREAM_SINGLE_WRITER": "yes"})
    with pytest.raises(apsw.CantOpenError, match="URI parameter single_writer 'off'"):
        apsw.Connection(uri(s3url(bucket, s3_server), tmp_path / "b", single_writer="off"),
                        flags=RW)
    # The environment variable alone, in a process of its own (read at register()).
    code = textwrap.dedent("""
        import sys, apsw, ltxvfs
        ltxvfs.register()
        con = apsw.Connection(sys.argv[1], flags=apsw.SQLITE_OPEN_READWRITE
                              | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES (7)")
        con.close()
        print("done")
    """)
    u = uri(s3url(bucket, overwriting.endpoint), tmp_path / "envbuf")
    env = {**os.environ, "LITESTREAM_SINGLE_WRITER": "trusted"}
    p = subprocess.run([sys.executable, "-c", code, u], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "done", p.stderr
    assert "single_writer=trusted" in p.stderr and "WARNING" not in p.stdout
    with open_replica(s3url(bucket, s3_server)) as client:
        assert _rows(restore(client, tmp_path / "r.db").path) == [(7,)]


def test_a_writer_joining_with_another_single_writer_mode_is_refused(vfs, tmp_path):
    url = (tmp_path / "replica").as_uri()
    a = apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
    with pytest.raises(apsw.CantOpenError, match="single_writer=trusted conflicts with "
                                                 "single_writer=verify"):
        apsw.Connection(uri(url, tmp_path / "buf", single_writer="trusted"), flags=RW)
    a.close()


_RACER = textwrap.dedent("""
    import sys, apsw, ltxvfs
    from faults import wait_at_barrier
    ltxvfs.register()
    try:
        con = apsw.Connection(sys.argv[1], flags=apsw.SQLITE_OPEN_READWRITE
                              | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
    except apsw.CantOpenError as err:
        wait_at_barrier()
        print("refused", type(err.__cause__).__name__, err, flush=True)
        sys.exit(4)
    wait_at_barrier()
    con.set_busy_timeout(5000)
    con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, who TEXT)")
    for i in range(50):
        con.execute("INSERT INTO t(who) VALUES (?)", (sys.argv[2],))
        print("committed", i, flush=True)
    con.close()
    print("closed", flush=True)
""")


def test_two_writer_processes_on_a_store_that_overwrites_neither_writes(
        s3_server, bucket, overwriting, s3_admin, tmp_path):
    """The issue's scenario (two writers, 50 rows each, on a store that drops If-None-Match:
    one writer's acknowledged rows lost in 5 of 5 rounds): now neither starts, so no row is
    ever acknowledged and none can be lost."""
    url = s3url(bucket, overwriting.endpoint)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE),
                                                                     os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, uri(url, tmp_path / f"w{i}"),
                               f"w{i}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    release_together(procs)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 4, (out, err)
        assert "committed" not in out
        assert out.startswith("refused UnsafeStoreError") and \
            f"{overwriting.endpoint} (bucket {bucket!r}) does not keep create-only writes" in out
    assert all_keys(s3_admin, bucket) == [], "no LTX file, no probe object left"


def test_an_unreadable_probe_answer_is_not_cached(vfs, s3_server, bucket, tmp_path):
    """No permission to PUT: the open fails saying which permissions the probe needs, and
    nothing is cached, so it works once the permission is there."""
    with FaultProxy(s3_server, Faults(deny=1.0, kinds=frozenset({"PUT"}))) as proxy:
        url = s3url(bucket, proxy.endpoint)
        with pytest.raises(apsw.CantOpenError, match=r"AccessDenied.*s3:PutObject and "
                                                     r"s3:DeleteObject") as info:
            apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
        assert isinstance(info.value.__cause__, AccessDeniedError)
        proxy.enabled = False
        con = apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
        con.execute("CREATE TABLE t(x)")
        con.close()


# --- stores with their own create-only header ---------------------------------------------------


@pytest.mark.parametrize("endpoint, header", [
    ("https://oss-cn-hangzhou.aliyuncs.com", "x-oss-forbid-overwrite"),
    ("https://s3.oss-cn-hangzhou.aliyuncs.com:443", "x-oss-forbid-overwrite"),
    ("https://cos.ap-guangzhou.myqcloud.com", "x-cos-forbid-overwrite"),
    ("https://cos.ap-beijing.tencentcos.cn", "x-cos-forbid-overwrite"),
    ("http://127.0.0.1:9000", ""),
    ("", ""),
])
def test_vendor_header_by_endpoint(endpoint, header):
    q = f"?endpoint={endpoint}" if endpoint else ""
    assert forbid_overwrite_header(parse_replica_url(f"s3://b/p{q}")) == header


def test_a_store_that_keeps_only_its_own_header_passes_and_refuses_overwrites(
        vfs, s3_server, bucket, tmp_path):
    """An OSS-like store: If-None-Match ignored, x-oss-forbid-overwrite kept, a refusal is
    409 FileAlreadyExists. The header goes on every create-only PUT, and the refusal is a
    conflict (nothing overwritten), not an error."""
    with FaultProxy(s3_server, Faults(), honour_only="x-oss-forbid-overwrite") as proxy, \
            open_replica(s3url(bucket, proxy.endpoint)) as client:
        client.forbid_overwrite_header = "x-oss-forbid-overwrite"  # as for *.aliyuncs.com
        assert client.probe_create_only() == "If-None-Match: * and x-oss-forbid-overwrite: true"
        client.write(0, 1, 1, b"first", 1000, exclusive=True)
        with pytest.raises(ObjectExistsError, match="FileAlreadyExists"):
            client.write(0, 1, 1, b"second", 2000, exclusive=True)
        assert client.read(0, 1, 1) == b"first"
        client.write(0, 1, 1, b"plain", 3000)  # not create-only: no header, overwrites
        heads = [names for kind, key, names in proxy.write_headers if kind == "PUT"]
        assert ["x-oss-forbid-overwrite" in n for n in heads] == [True] * 4 + [False]
    # Without the header the same store overwrites: the probe catches it.
    with FaultProxy(s3_server, Faults(), honour_only="x-oss-forbid-overwrite") as proxy, \
            open_replica(s3url(bucket, proxy.endpoint)) as client:
        with pytest.raises(UnsafeStoreError, match="does not keep create-only writes") as info:
            client.probe_create_only()
        assert info.value.overwrote


# --- a probe left behind by a crash ------------------------------------------------------------

_CRASH_IN_PROBE = textwrap.dedent("""
    import os, signal, sys
    from ltxvfs.storage import open_replica
    client = open_replica(sys.argv[1])
    if sys.argv[1].startswith("s3:"):
        s3 = client._s3
        s3.delete_object = lambda **kw: os.kill(os.getpid(), signal.SIGKILL)
    else:
        import ltxvfs.storage.file as f
        f.os.unlink = lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL)
    client.probe_create_only()
    print("not reached")
""")


@pytest.fixture(params=["file", "s3"])
def crash_url(request, tmp_path):
    if request.param == "s3":
        return s3url(request.getfixturevalue("bucket"), request.getfixturevalue("s3_server"))
    return (tmp_path / "replica").as_uri()


def _probe_leftovers(url: str) -> dict[str, bytes]:
    u = parse_replica_url(url)
    if u.scheme == "file":
        d = u.path / PROBE_DIR
        return {p.name: p.read_bytes() for p in d.iterdir()} if d.exists() else {}
    s3 = boto3.client("s3", endpoint_url=u.endpoint, region_name="us-east-1")
    keys = s3.list_objects_v2(Bucket=u.bucket, Prefix=f"{u.prefix}/{PROBE_DIR}/").get(
        "Contents", ())
    return {o["Key"]: s3.get_object(Bucket=u.bucket, Key=o["Key"])["Body"].read() for o in keys}


def test_a_probe_left_by_a_crash_is_ignored_by_everything(vfs, crash_url, tmp_path):
    p = subprocess.run([sys.executable, "-c", _CRASH_IN_PROBE, crash_url], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr)
    left = _probe_leftovers(crash_url)
    assert left and all(v == PROBE_BODY for v in left.values()), left
    # The next probe (a new name) passes and leaves the old one alone.
    with open_replica(crash_url) as client:
        client.probe_create_only()
    assert _probe_leftovers(crash_url) == left
    # Write mode starts (probing again), writes, syncs; listings see only LTX files.
    con = apsw.Connection(uri(crash_url, tmp_path / "buf", sync_interval="-1s"), flags=RW)
    con.execute("CREATE TABLE t(x)")
    for i in range(1, 4):
        con.execute("INSERT INTO t VALUES (?)", (i,))
        con.execute("PRAGMA litestream_sync")
    con.close()
    with open_replica(crash_url) as client:
        levels = list_levels(client)
        assert [f.name for f in levels[0]] == [f"{t:016x}-{t:016x}.ltx" for t in (1, 2, 3)]
        assert not any(levels[lvl] for lvl in range(1, 10))
        assert compact_level(client, 1) is not None  # compaction: L0 1..3 -> one L1 file
        assert [(f.min_txid, f.max_txid) for f in client.list_files(1)] == [(1, 3)]
        assert _rows(restore(client, tmp_path / "ours.db").path) == [(1,), (2,), (3,)]
    out = litestream_restore(crash_url, tmp_path / "theirs.db")  # Litestream 0.5.17 too
    assert _rows(out) == [(1,), (2,), (3,)]
    assert _probe_leftovers(crash_url) == left


# --- file:// ----------------------------------------------------------------------------------


def test_file_probe_proves_the_exclusive_create_and_cleans_up(tmp_path):
    root = tmp_path / "replica"
    with open_replica(root.as_uri()) as client:
        assert "hard link" in client.probe_create_only()
        assert client.probe_create_only()  # again: a new name each time
    assert [p.name for p in root.iterdir()] == [PROBE_DIR]
    assert list((root / PROBE_DIR).iterdir()) == []
    assert list_levels(open_replica(root.as_uri())) == {lvl: [] for lvl in range(10)}


def test_write_mode_is_refused_on_a_directory_whose_links_overwrite(vfs, tmp_path, monkeypatch):
    """A file system where an "exclusive" link replaces the existing name (the file:// stand-in
    for a store that ignores If-None-Match): refused, naming the directory."""
    import ltxvfs.storage.file as filemod

    def replacing_link(src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
        os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(filemod.os, "link", replacing_link)
    url = (tmp_path / "replica").as_uri()
    with pytest.raises(apsw.CantOpenError) as info:
        apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
    assert isinstance(info.value.__cause__, UnsafeStoreError)
    assert f"write mode refused for {url}: the directory {url} does not keep exclusive " \
           "creates: a second hard link" in str(info.value)
    assert list((tmp_path / "replica" / PROBE_DIR).iterdir()) == []
    assert not (tmp_path / "replica" / "ltx").exists()


def test_file_replica_write_mode_probes_and_writes(vfs, tmp_path, caplog):
    url = (tmp_path / "replica").as_uri()
    with caplog.at_level(logging.INFO, logger="ltxvfs"):
        con = apsw.Connection(uri(url, tmp_path / "buf"), flags=RW)
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES (1)")
        con.close()
    assert any("keeps create-only writes (exclusive create" in r.getMessage()
               for r in caplog.records)
    with open_replica(url) as client:
        assert _rows(restore(client, tmp_path / "r.db").path) == [(1,)]
