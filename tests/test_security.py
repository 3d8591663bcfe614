"""Security: no credential in logs, exceptions, PRAGMA output or CLI output; private files; keys
built only from validated TXIDs and levels; file:// replicas stay inside their root.

Canary secrets are planted in ``AWS_SECRET_ACCESS_KEY``, ``LITESTREAM_SECRET_ACCESS_KEY``, the
URL's userinfo password and its ``sseCustomerKey`` query parameter (a real SSE-C key, used for
every request to moto), then the library is driven through success and failure paths with every
log record captured at DEBUG.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import stat
import subprocess
import sys
import traceback
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_chaos import vfs_uri

import ltxvfs
import ltxvfs.localfiles
from ltxvfs.errors import ReplicaURLError, StorageError
from ltxvfs.storage import FileInfo, FileReplicaClient, open_replica, parse_replica_url
from ltxvfs.storage.base import check_level, ltx_filename, parse_ltx_filename

from faults import FaultProxy, Faults

SECRET = "CANARY-aws-secret-51c0ffee"
LS_SECRET = "CANARY-litestream-secret-77"
URL_PASSWORD = "CANARY-url-password-93"
SSE_KEY_BYTES = b"CANARY-sse-customer-key-32bytes!"
SSE_KEY = base64.b64encode(SSE_KEY_BYTES).decode()
#: Every form a secret could leak in.
CANARIES = [SECRET, LS_SECRET, URL_PASSWORD, SSE_KEY, SSE_KEY[:40], quote(SSE_KEY, safe=""),
            SSE_KEY_BYTES.decode(), "CANARY"]
#: Loggers of third-party libraries (not ltxvfs's own lines): checked by the botocore test below.
THIRD_PARTY = ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug", "hypothesis")

RW = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI
RO = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, include_third_party: bool = False) -> list[str]:
        out = []
        for r in self.records:
            if not include_third_party and r.name.split(".")[0] in THIRD_PARTY:
                continue
            text = r.getMessage()
            if r.exc_info:
                text += "\n" + "".join(traceback.format_exception(*r.exc_info))
            out.append(f"{r.name}: {text}")
        return out


@pytest.fixture
def captured():
    handler = _Capture()
    root = logging.getLogger()
    saved = (root.level, logging.getLogger("ltxvfs").level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("ltxvfs").setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        logging.getLogger("ltxvfs").setLevel(saved[1])


@pytest.fixture
def canary_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("LITESTREAM_SECRET_ACCESS_KEY", LS_SECRET)
    monkeypatch.setenv("LITESTREAM_ACCESS_KEY_ID", "ls-key-id")


def secret_url(bucket: str, endpoint: str, prefix: str = "db") -> str:
    return (f"s3://user:{URL_PASSWORD}@{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1"
            f"&sseCustomerKey={quote(SSE_KEY, safe='')}")


def exception_texts(err: BaseException) -> list[str]:
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        out += [str(err), repr(err), "".join(traceback.format_exception_only(type(err), err))]
        out += [str(a) for a in getattr(err, "args", ())]
        err = err.__cause__ or err.__context__
    return out


def assert_clean(texts, where: str) -> None:
    for text in texts:
        for canary in CANARIES:
            assert canary not in text, f"{where}: a secret ({canary[:12]}...) leaked: {text[:300]}"


def test_no_secret_in_logs_exceptions_or_pragmas(vfs, canary_env, captured, s3_server, bucket,
                                                 tmp_path):
    url = secret_url(bucket, s3_server)
    texts: list[str] = []
    # Write mode with fast compaction, a reader with hydration, time travel, stats, sync errors.
    w = apsw.Connection(vfs_uri(url, write_enabled="true", sync_interval="50ms",
                                buffer_path=quote(str(tmp_path / "buf")),
                                compaction_levels="100ms", snapshot_interval="300ms",
                                l0_retention="100ms"), flags=RW)
    w.execute("CREATE TABLE t(x)")
    for i in range(20):
        w.execute("INSERT INTO t VALUES (?)", (i,))
    texts += [str(r) for r in w.execute("PRAGMA litestream_sync")]
    r = apsw.Connection(vfs_uri(url, hydration_enabled="true"), flags=RO)
    assert r.execute("SELECT count(*) FROM t").fetchall() == [(20,)]
    for pragma in ("litestream_stats", "litestream_txid", "litestream_time", "litestream_lag",
                   "litestream_hydration_file", "litestream_hydration_progress",
                   "litestream_sync_error", "litestream_write_enabled", "litestream_pin_txid"):
        texts += [str(row) for con in (w, r) for row in con.execute(f"PRAGMA {pragma}")]
    texts.append(str(ltxvfs.stats(r)))
    with contextlib.suppress(apsw.SQLError):
        r.execute("PRAGMA litestream_time = '2000-01-01T00:00:00Z'")
    # Failures: an unknown bucket, a store that fails every request, a wrong SSE-C key.
    for bad in (secret_url("no-such-bucket-canary", s3_server),
                secret_url(bucket, s3_server) + "&partSize=1",
                f"s3://{bucket}/db?sseCustomerKey=CANARY-not-base64"):
        with pytest.raises(apsw.Error) as info:
            apsw.Connection(vfs_uri(bad), flags=RO)
        texts += exception_texts(info.value)
    with FaultProxy(s3_server, Faults(deny=1.0)) as proxy:
        bad = secret_url(bucket, proxy.endpoint)
        with pytest.raises(apsw.Error) as info:
            apsw.Connection(vfs_uri(bad, open_timeout="1s"), flags=RO)
        texts += exception_texts(info.value)
    with FaultProxy(s3_server, Faults()) as proxy:
        via = secret_url(bucket, proxy.endpoint, prefix="other")
        w3 = apsw.Connection(vfs_uri(via, write_enabled="true", sync_interval="-1s",
                                     buffer_path=quote(str(tmp_path / "buf3"))), flags=RW)
        w3.execute("CREATE TABLE t(x)")
        proxy.set(deny=1.0)
        with pytest.raises(apsw.Error) as info:
            w3.execute("PRAGMA litestream_sync")
        texts += exception_texts(info.value)
        texts += [str(row) for row in w3.execute("PRAGMA litestream_sync_error")]
        texts += [str(row) for row in w3.execute("PRAGMA litestream_stats")]
        assert "AccessDenied" in texts[-2], texts[-2]
        proxy.set(deny=0.0)
        w3.close()
    wrong_key = base64.b64encode(b"another-32-byte-key-for-sse-c!!!").decode()
    wrong = (f"s3://{bucket}/db?endpoint={s3_server}&region=us-east-1"
             f"&sseCustomerKey={quote(wrong_key, safe='')}")
    try:
        con = apsw.Connection(vfs_uri(wrong), flags=RO)
        con.execute("SELECT count(*) FROM t").fetchall()
        con.close()
    except apsw.Error as err:
        texts += exception_texts(err)
    r.close()
    w.close()
    logs = captured.lines()
    assert any("ltxvfs" in line for line in logs), "the ltxvfs loggers were captured"
    assert_clean(texts, "exception/PRAGMA output")
    assert_clean(logs, "ltxvfs log line")


def test_no_secret_in_any_log_line_at_debug_including_botocore(vfs, canary_env, captured,
                                                               s3_server, bucket, tmp_path):
    url = secret_url(bucket, s3_server)
    w = apsw.Connection(vfs_uri(url, write_enabled="true", sync_interval="-1s",
                                buffer_path=quote(str(tmp_path / "buf"))), flags=RW)
    w.execute("CREATE TABLE t(x)")
    w.execute("PRAGMA litestream_sync")
    w.close()
    assert_clean(captured.lines(include_third_party=True), "log line")


@pytest.fixture
def proxy_denying(s3_server):
    with FaultProxy(s3_server, Faults(deny=1.0)) as proxy:
        yield proxy


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ltxvfs.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def test_cli_output_has_no_secret(canary_env, s3_server, bucket, tmp_path, proxy_denying):
    url = secret_url(bucket, s3_server)
    ltxvfs.register()
    w = apsw.Connection(vfs_uri(url, write_enabled="true", sync_interval="-1s",
                                buffer_path=quote(str(tmp_path / "buf"))), flags=RW)
    w.execute("CREATE TABLE t(x)")
    w.execute("INSERT INTO t VALUES (1)")
    w.close()
    env = dict(os.environ, LITESTREAM_LOG_LEVEL="DEBUG")
    outputs = []
    for args in (["info", url], ["info", url, "--json"], ["ltx", url, "--level", "all"],
                 ["verify", url, "-v"], ["restore", url, "-o", str(tmp_path / "r.db")],
                 ["restore", url, "-o", str(tmp_path / "r2.db"), "--dry-run"],
                 ["info", secret_url("no-such-bucket-canary", s3_server)],
                 ["verify", secret_url(bucket, proxy_denying.endpoint)],
                 ["ltx", f"s3://{bucket}/db?sseCustomerKey=CANARY-not-base64"]):
        cp = run_cli(*args, env=env)
        outputs += [cp.stdout, cp.stderr]
        assert cp.returncode in (0, 1), (args, cp.stderr[-500:])
    assert "REDACTED" in "".join(outputs), "the URLs are shown, redacted"
    assert_clean(outputs, "CLI output")


# --------------------------------------------------------------------------------------------
# Private files
# --------------------------------------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def open_umask():
    """The most permissive umask: only explicit modes keep files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_buffer_files_are_private(vfs, tmp_path, monkeypatch, open_umask):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url = (tmp_path / "replica").as_uri()
    con = apsw.Connection(vfs_uri(url, write_enabled="true", sync_interval="-1s"), flags=RW)
    con.execute("CREATE TABLE t(x)")
    buffers = tmp_path / "state" / "ltxvfs" / "buffers"
    (buf,) = list(buffers.iterdir())
    assert _mode(buffers) == 0o700 and _mode(buf) == 0o600
    con.execute("PRAGMA litestream_sync")  # the buffer is rewritten (temp file + rename)
    con.execute("INSERT INTO t VALUES (1)")
    assert [(p.name, _mode(p)) for p in buffers.iterdir()] == [(buf.name, 0o600)]
    # The rollback journal of a write transaction lives in memory, and once it outgrows that
    # (here at once) in a private directory.
    monkeypatch.setattr(ltxvfs.localfiles, "SPILL", 0)
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (2)")
    journals = [p for d in {Path(vfs._private_dir())} for p in d.iterdir()
                if p.name.endswith("-journal")]
    assert journals, "a journal exists during the transaction"
    assert _mode(Path(vfs._private_dir())) == 0o700
    assert all(_mode(j) == 0o600 for j in journals)
    con.execute("COMMIT")
    con.close()


def test_explicit_buffer_path_in_a_new_directory_is_private(vfs, tmp_path, open_umask):
    url = (tmp_path / "replica").as_uri()
    buf = tmp_path / "new" / "dir" / "app.buffer"
    con = apsw.Connection(vfs_uri(url, write_enabled="true", sync_interval="-1s",
                                  buffer_path=quote(str(buf))), flags=RW)
    con.execute("CREATE TABLE t(x)")
    assert _mode(buf) == 0o600 and _mode(buf.parent) == 0o700
    con.close()


def _hydrated(con, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while con.execute("PRAGMA litestream_hydration_progress").fetchall()[0][0] != "100.0":
        assert time.monotonic() < deadline, "hydration did not finish"
        time.sleep(0.02)


def _small_replica(tmp_path: Path) -> str:
    from replicas import FakePrimary

    url = (tmp_path / "replica").as_uri()
    with open_replica(url) as client:
        FakePrimary(tmp_path / "p.db", client).commit(
            "CREATE TABLE t(x)", "INSERT INTO t SELECT value FROM generate_series(1, 300)")
    return url


def test_hydration_files_are_private(vfs, tmp_path, open_umask):
    url = _small_replica(tmp_path)
    # A temporary hydration file: in the VFS's private directory.
    con = apsw.Connection(vfs_uri(url, hydration_enabled="true"), flags=RO)
    _hydrated(con)
    path = Path(con.execute("PRAGMA litestream_hydration_file").fetchall()[0][0])
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    con.close()
    # A persistent one in a new directory: the file, its directory and its .meta.
    target = tmp_path / "hyd" / "sub" / "copy.db"
    con = apsw.Connection(vfs_uri(url, hydration_path=quote(str(target)),
                                  hydration_persistent="true"), flags=RO)
    _hydrated(con)
    assert _mode(target) == 0o600 and _mode(target.parent) == 0o700
    con.close()
    meta = target.with_name(target.name + ".meta")
    assert meta.exists()
    assert _mode(meta) == 0o600, f".meta is {oct(_mode(meta))}"


# --------------------------------------------------------------------------------------------
# Keys and paths
# --------------------------------------------------------------------------------------------

BAD_TXIDS = [0, -1, 1 << 64, (1 << 64) + 5, 2.0, "1", None, float("nan")]
BAD_LEVELS = [-1, 10, 16, 1 << 40, "0", 1.0, None]


@pytest.mark.parametrize("txid", BAD_TXIDS)
def test_keys_refuse_bad_txids(tmp_path, txid):
    s3 = open_replica("s3://bkt/db?endpoint=http://127.0.0.1:9")
    f = FileReplicaClient(tmp_path)
    for build in (lambda: ltx_filename(txid, 5), lambda: ltx_filename(1, txid),
                  lambda: s3.key(0, txid, txid), lambda: f.path(0, txid, txid)):
        with pytest.raises((ValueError, TypeError), match="invalid TXID range|TXIDs must be integers"):
            build()
    with pytest.raises((ValueError, TypeError), match="invalid TXID range|TXIDs must be integers"):
        f.write(0, txid, txid, b"x", 0)
    with pytest.raises((ValueError, TypeError), match="invalid TXID range|TXIDs must be integers"):
        f.read(0, txid, txid)
    assert not any(tmp_path.iterdir()), "nothing was created"


@pytest.mark.parametrize("level", BAD_LEVELS)
def test_keys_refuse_bad_levels(tmp_path, level):
    s3 = open_replica("s3://bkt/db?endpoint=http://127.0.0.1:9")
    f = FileReplicaClient(tmp_path)
    for build in (lambda: check_level(level), lambda: s3.key(level, 1, 1),
                  lambda: f.path(level, 1, 1), lambda: s3.list_files(level),
                  lambda: f.list_files(level)):
        with pytest.raises((ValueError, TypeError), match=r"invalid LTX level .* \(0..9\)"):
            build()


@settings(max_examples=300, deadline=None)
@given(level=st.integers(-5, 15), lo=st.integers(-2, (1 << 64) + 2), hi=st.integers(-2, (1 << 64) + 2))
def test_keys_are_built_only_from_valid_txids_and_levels(tmp_path_factory, level, lo, hi):
    import re

    root = tmp_path_factory.getbasetemp() / "keys-root"
    s3 = open_replica("s3://bkt/some/prefix?endpoint=http://127.0.0.1:9")
    f = FileReplicaClient(root)
    try:
        key = s3.key(level, lo, hi)
        path = f.path(level, lo, hi)
    except (ValueError, TypeError):
        assert not (0 <= level <= 9 and 1 <= lo <= hi < 1 << 64)
        return
    assert 0 <= level <= 9 and 1 <= lo <= hi < 1 << 64
    assert re.fullmatch(r"some/prefix/000[0-9]/[0-9a-f]{16}-[0-9a-f]{16}\.ltx", key), key
    assert os.path.normpath(path) == str(path) and path.parent.parent.parent == root
    assert parse_ltx_filename(path.name) == (lo, hi)


def test_listings_ignore_names_that_are_not_ltx_files(tmp_path, s3_admin, bucket, s3_server):
    junk = ["0000000000000001-0000000000000001.ltx.tmp", "0000000000000000-0000000000000001.ltx",
            "0000000000000002-0000000000000001.ltx", "000000000000000A-000000000000000A.ltx",
            "1-1.ltx", "..", "x.ltx", "0000000000000001-0000000000000001.LTX"]
    d = tmp_path / "ltx" / "0"
    d.mkdir(parents=True)
    for name in junk:
        if name != "..":
            (d / name).write_bytes(b"junk")
    (d / "0000000000000003-0000000000000003.ltx").mkdir()  # a directory is not a file
    assert FileReplicaClient(tmp_path).list_files(0) == []
    for key in ["db/0000/" + n for n in junk] + ["db/0000/sub/0000000000000001-0000000000000001.ltx",
                                               "db/0000/../0000000000000001-0000000000000001.ltx"]:
        s3_admin.put_object(Bucket=bucket, Key=key, Body=b"junk")
    with open_replica(f"s3://{bucket}/db?endpoint={s3_server}&region=us-east-1") as client:
        assert client.list_files(0) == []


@pytest.mark.parametrize(("url", "root"), [
    ("file:///srv/replicas/a/../b", "/srv/replicas/b"),
    ("file:///srv/replicas/a/%2e%2e/b", "/srv/replicas/b"),
    ("/srv/replicas//c/./", "/srv/replicas/c"),
    ("file://localhost/srv/x/../../y", "/y"),
])
def test_file_urls_are_normalised_before_use(url, root):
    assert str(parse_replica_url(url).path) == root


@pytest.mark.parametrize("url", ["file://evil.example/srv/x", "file:relative/dir", "file:", "file:///",
                                 "file://../../etc", "file:/"])
def test_file_urls_that_could_escape_are_refused(url):
    with pytest.raises(ReplicaURLError,
                       match="file replica path must be absolute|refusing to use '/'|file URLs take no host"):
        parse_replica_url(url)


def test_file_replica_never_touches_anything_outside_its_root(tmp_path):
    """Every file a replica client creates, reads or deletes is below its root (written via a
    temp file in the level directory); names come only from validated numbers."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    client = FileReplicaClient(root)
    from ltxvfs.publish import publish_pages

    for lvl in (0, 1, 9):
        publish_pages(client, lvl, 1, 3 if lvl else 1, page_size=512, commit=1,
                      pages=[(1, bytes(512))], timestamp_ms=1_700_000_000_000)
    client.delete([f for lvl in range(10) for f in client.list_files(lvl)])
    created = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert created == [outside / "victim"]
    assert all(str(p).startswith(str(root)) for p in root.rglob("*"))
    assert (outside / "victim").read_text() == "keep me"


def _publish(client, level: int, lo: int, hi: int, fill: int = 0) -> None:
    from ltxvfs.publish import publish_pages

    publish_pages(client, level, lo, hi, page_size=512, commit=1, pages=[(1, bytes([fill]) * 512)],
                  timestamp_ms=1_700_000_000_000)


@pytest.mark.parametrize("where", ["ltx", "level"])
def test_file_replica_refuses_a_directory_link_out_of_its_root(tmp_path, where):
    """Whoever can write the replica directory must not be able to send our reads, writes or
    deletes elsewhere by replacing ``ltx`` or a level directory with a symbolic link."""
    outside = tmp_path / "outside"
    bait = FileReplicaClient(outside)
    _publish(bait, 0, 1, 1)  # a valid LTX file outside the root, where the link points
    root = tmp_path / "root"
    client = FileReplicaClient(root)
    if where == "ltx":
        root.mkdir()
        (root / "ltx").symlink_to(outside / "ltx")
    else:
        (root / "ltx").mkdir(parents=True)
        (root / "ltx" / "0").symlink_to(outside / "ltx" / "0")
    before = sorted(p.name for p in (outside / "ltx" / "0").iterdir())
    for call in (lambda: client.list_files(0), lambda: client.read(0, 1, 1),
                 lambda: _publish(client, 0, 2, 2),
                 lambda: client.delete(bait.list_files(0))):
        with pytest.raises(StorageError, match="symbolic link"):
            call()
    assert sorted(p.name for p in (outside / "ltx" / "0").iterdir()) == before
    assert bait.read(0, 1, 1)  # the file outside is intact


def test_file_replica_skips_and_refuses_linked_ltx_files(tmp_path):
    """A link with an LTX name inside a level directory is not listed, not read, and deleting
    it removes the link only."""
    outside = tmp_path / "outside"
    bait = FileReplicaClient(outside)
    _publish(bait, 0, 5, 5, fill=7)
    target = bait.path(0, 5, 5)
    root = tmp_path / "root"
    client = FileReplicaClient(root)
    _publish(client, 0, 1, 4)
    link = client.path(0, 5, 5)
    link.symlink_to(target)
    assert [(f.min_txid, f.max_txid) for f in client.list_files(0)] == [(1, 4)]
    with pytest.raises(StorageError, match="symbolic link"):
        client.read(0, 5, 5)
    client.delete([FileInfo(0, 5, 5, 0, None)])
    assert not os.path.lexists(link) and target.exists()
    _publish(client, 0, 5, 5, fill=1)  # a write replaces a link, never writes through it
    assert not link.is_symlink() and bait.read(0, 5, 5) == target.read_bytes()
    assert client.read(0, 5, 5) != bait.read(0, 5, 5)
