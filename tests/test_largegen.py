"""bench/largegen.py: synthetic large replicas must be real ones.

The bench's large databases are written as LTX files by hand (a table b-tree laid out page by
page). These tests hold them to what Litestream and SQLite accept: the real ``litestream
restore`` restores them (file checksums, page order, the lock page), ``PRAGMA integrity_check``
passes, the rows are the ones the generator says, the history is there (restore ``-txid``, and
ltxvfs's ``litestream_pin_txid`` / ``litestream_time``), and ltxvfs reads the same rows.
"""

from __future__ import annotations

import datetime as dt
import io
import random
import sqlite3
import sys
from pathlib import Path
from urllib.parse import quote

import apsw
import fastcrc
import pytest

import ltxvfs
from ltxvfs.ltx import Decoder, Encoder, Header

from litestream_rig import integrity_check, litestream_restore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import largegen


def _rows(con, query="SELECT id, substr(v, 1, 24), length(v) FROM t ORDER BY id"):
    return [(i, bytes(p).split(b";")[0] + b";", n) for i, p, n in con.execute(query)]


def _expected(m: dict, txid: int) -> list[tuple[int, bytes, int]]:
    spec = largegen.Spec(**m["spec"])
    return [(r, largegen.row_prefix(r, largegen.row_txid(spec, m["rows"], r, txid)),
             largegen.BLOB_LEN) for r in range(1, m["rows"] + 1)]


def _ltxvfs(url: str, **params: str) -> apsw.Connection:
    ltxvfs.register()
    q = "&".join(f"{k}={quote(v, safe='')}" for k, v in {"replica_url": url, **params}.items())
    return apsw.Connection(f"file:large.db?vfs=litestream&{q}",
                           flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("largegen") / "small"
    return largegen.generate(largegen.Spec(pages=3000), out, workers=2, progress=lambda s: None)


def test_crc64_combine_joins_chunks_as_one_stream():
    rng = random.Random(3)
    for _ in range(30):
        a, b = rng.randbytes(rng.randint(0, 9000)), rng.randbytes(rng.randint(0, 9000))
        start = rng.choice([0, 1 << 63 | 12345])
        whole = fastcrc.crc64.go_iso(a + b, initial=start)
        joined = largegen.crc64_combine(fastcrc.crc64.go_iso(a, initial=start),
                                        fastcrc.crc64.go_iso(b), len(b))
        assert joined == whole


@pytest.mark.parametrize("pages", [4, 5, 17, 401, 402, 403, 404, 805, 1000, 160_401])
def test_layout_uses_every_page_exactly(pages):
    lay = largegen.Layout(pages)
    used = pages - 1 - (1 if pages >= lay.lock else 0)
    assert sum(lay.levels) == used and lay.levels[-1] == 1
    for h in range(1, len(lay.levels)):
        counts = {len(lay.children(h, j)) for j in range(lay.levels[h])}
        assert max(counts) <= largegen.FANOUT
        assert min(counts) >= (2 if lay.levels[h - 1] > 1 else 1)


@pytest.mark.parametrize("pages", [4, 5, 17, 401, 402, 403, 805, 2500])
def test_pages_make_a_database_sqlite_accepts(tmp_path, pages):
    """Pages written straight to a file (no LTX): SQLite's own check of the hand-made b-tree."""
    lay = largegen.Layout(pages)
    path = tmp_path / "direct.db"
    with open(path, "wb") as f:
        for p in range(1, pages + 1):
            f.write(largegen.page_bytes(lay, p, {2: 7}))
    assert integrity_check(path) == "ok"
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA page_count").fetchone()[0] == pages
    assert con.execute("SELECT count(*), min(id), max(id) FROM t").fetchone() == (
        lay.rows, 1, lay.rows)
    assert bytes(con.execute("SELECT v FROM t WHERE id = 2").fetchone()[0]) == (
        b"r2@7;".ljust(largegen.BLOB_LEN, b"\0"))
    con.close()


def test_parallel_snapshot_is_byte_identical_to_ltxvfs_encoder(small, tmp_path):
    """The chunked, CRC-combined snapshot = what ltxvfs's sequential Encoder writes."""
    lay = largegen.Layout(3000)
    buf = io.BytesIO()
    enc = Encoder(buf, Header(page_size=4096, commit=3000, min_txid=1, max_txid=1,
                              timestamp=largegen.EPOCH_MS))
    for p in range(1, 3001):
        enc.write_page(p, largegen.page_bytes(lay, p))
    enc.close()
    snap = Path(small["replica"]) / "ltx" / "9" / largegen.ltx_name(1, 1)
    assert snap.read_bytes() == buf.getvalue()
    # and more chunks than pages per worker would give by default
    other = tmp_path / "snap.ltx"
    largegen.write_snapshot(largegen.Spec(pages=3000), other, workers=3, progress=lambda s: None)
    assert other.read_bytes() == buf.getvalue()
    with open(other, "rb") as f:
        pages = list(Decoder(f))  # verifies the file checksum at the end
    assert len(pages) == 3000


def test_layout_and_names_are_litestreams(small):
    replica = Path(small["replica"])
    names = sorted(str(p.relative_to(replica)) for p in replica.rglob("*.ltx"))
    assert names[0] == "ltx/0/0000000000000002-0000000000000002.ltx"
    assert "ltx/1/0000000000000002-0000000000000015.ltx" in names
    assert names[-1] == "ltx/9/0000000000000001-0000000000000001.ltx"
    assert len(names) == 20 + 2
    for f in small["files"]:  # file backend: mtime = header timestamp
        p = Path(small["replica"]).parent / f["path"]
        assert p.stat().st_mtime_ns == f["timestamp"] * 1_000_000
        with open(p, "rb") as fh:
            h = Header.unpack(fh.read(100))
        assert (h.min_txid, h.max_txid, h.commit) == (f["min"], f["max"], 3000)


def test_litestream_restores_latest_and_old_txids(small, tmp_path):
    url = "file://" + small["replica"]
    latest = litestream_restore(url, tmp_path / "latest.db")
    assert integrity_check(latest) == "ok"
    con = sqlite3.connect(latest)
    assert con.execute("PRAGMA page_count").fetchone()[0] == 3000
    assert _rows(con) == _expected(small, small["latest_txid"])
    con.close()
    old = litestream_restore(url, tmp_path / "old.db", txid=5)
    assert integrity_check(old) == "ok"
    con = sqlite3.connect(old)
    got = _rows(con)
    con.close()
    assert got == _expected(small, 5) != _expected(small, small["latest_txid"])


def test_ltxvfs_reads_the_rows_and_travels_in_time(small):
    url = "file://" + small["replica"]
    con = _ltxvfs(url)
    try:
        assert con.execute("PRAGMA litestream_txid").fetchone()[0] == f"{21:016x}"
        assert _rows(con) == _expected(small, 21)
        con.execute("PRAGMA litestream_pin_txid = '0000000000000004'")
        assert con.execute("PRAGMA litestream_txid").fetchone()[0] == f"{4:016x}"
        assert _rows(con) == _expected(small, 4)
        # a moment between TXID 9's file (t9) and TXID 10's: the database as of TXID 9
        t = dt.datetime.fromtimestamp((largegen.txid_time_ms(9) + 30_000) / 1000, dt.UTC)
        con.execute(f"PRAGMA litestream_time = '{t.isoformat().replace('+00:00', 'Z')}'")
        assert con.execute("PRAGMA litestream_txid").fetchone()[0] == f"{9:016x}"
        assert _rows(con) == _expected(small, 9)
        con.execute("PRAGMA litestream_time = 'latest'")
        assert _rows(con) == _expected(small, 21)
    finally:
        con.close()


def test_poll_file_appends_to_the_chain(small, tmp_path):
    """The file kept aside for the bench's poll measurement continues the chain."""
    import shutil
    rep = tmp_path / "rep"
    shutil.copytree(small["replica"], rep)
    src = Path(small["replica"]).parent / small["poll"]["path"]
    shutil.copy2(src, rep / "ltx" / "0" / src.name)
    out = litestream_restore("file://" + str(rep), tmp_path / "polled.db")
    assert integrity_check(out) == "ok"
    con = sqlite3.connect(out)
    assert _rows(con) == _expected(small, small["latest_txid"] + 1)
    con.close()


def test_cached_dataset_is_reused_and_a_changed_spec_rebuilds(small, tmp_path):
    out = Path(small["replica"]).parent
    again = largegen.generate(largegen.Spec(pages=3000), out, progress=lambda s: None)
    assert again["build_seconds"] == small["build_seconds"]  # the manifest read back
    other = largegen.generate(largegen.Spec(pages=100), tmp_path / "x", progress=lambda s: None)
    assert other["pages"] == 100 and other["rows"] < 100


@pytest.mark.slow
def test_replica_across_the_lock_page(tmp_path):
    """262,150 pages at 4 KiB: the lock page (262,145) sits among the leaves. The real restore
    (1 GB on disk, deleted afterwards), integrity_check, and lookups past it through ltxvfs."""
    m = largegen.generate(largegen.Spec(pages=262_150), tmp_path / "lock", workers=2,
                          progress=lambda s: None)
    lay = largegen.Layout(262_150)
    assert lay.lock == 262_145 and lay.leaf_pgno(m["rows"]) > lay.lock
    url = "file://" + m["replica"]
    out = litestream_restore(url, tmp_path / "big.db", timeout=300)
    try:
        assert out.stat().st_size == 262_150 * 4096
        assert integrity_check(out) == "ok"
        con = sqlite3.connect(out)
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == m["rows"]
        con.close()
    finally:
        out.unlink()
    spec = largegen.Spec(pages=262_150)
    con = _ltxvfs(url)
    try:
        after = [r for r in range(m["rows"] - 50, m["rows"] + 1) if lay.leaf_pgno(r) > lay.lock]
        assert after and lay.leaf_pgno(after[0]) == lay.lock + 1
        assert lay.leaf_pgno(after[0] - 1) == lay.lock - 1
        for r in (after[0], after[-1], after[0] - 1, 1):
            got = con.execute("SELECT substr(v, 1, 20) FROM t WHERE id = ?", (r,)).fetchone()[0]
            want = largegen.row_prefix(r, largegen.row_txid(spec, m["rows"], r, 21))
            assert bytes(got)[:len(want)] == want
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == m["rows"]
    finally:
        con.close()


def test_bench_stand_in_publishes_it_as_litestream_s3_replica(small, tmp_path, monkeypatch):
    """``POST /__bench__/import`` (what the large suite reads over S3): S3 keys
    ``<prefix>/<level %04x>/…`` and ``litestream-timestamp`` metadata, so the real restore takes
    it and time travel by timestamp (metadata) resolves the same TXIDs as on file://."""
    import json
    import urllib.parse
    import urllib.request

    from common import ACCESS_KEY, SECRET_KEY, child_env, s3_url, start_stub

    stub = start_stub(tmp_path / "s3", tmp_path / "stub.log")
    try:
        q = urllib.parse.urlencode({"bucket": "bench", "prefix": "gen", "dir": small["replica"]})
        req = urllib.request.Request(f"{stub.url}/__bench__/import?{q}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["objects"] == 22
        with urllib.request.urlopen(f"{stub.url}/bench?list-type=2&prefix=gen/", timeout=30) as r:
            listing = r.read().decode()
        assert "gen/0009/0000000000000001-0000000000000001.ltx" in listing
        assert "gen/0001/0000000000000002-0000000000000015.ltx" in listing
        head = urllib.request.Request(
            f"{stub.url}/bench/gen/0000/0000000000000003-0000000000000003.ltx", method="HEAD")
        with urllib.request.urlopen(head, timeout=30) as r:
            assert r.headers["x-amz-meta-litestream-timestamp"] == "2026-01-01T00:02:00Z"
        url = s3_url(stub.url, "bench", "gen")
        out = litestream_restore(url, tmp_path / "s3.db", txid=7, env=child_env())
        con = sqlite3.connect(out)
        assert _rows(con) == _expected(small, 7)
        con.close()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        con = _ltxvfs(url)
        try:
            assert _rows(con) == _expected(small, 21)
            t = dt.datetime.fromtimestamp((largegen.txid_time_ms(12) + 30_000) / 1000, dt.UTC)
            con.execute(f"PRAGMA litestream_time = '{t.strftime('%Y-%m-%dT%H:%M:%SZ')}'")
            assert con.execute("PRAGMA litestream_txid").fetchone()[0] == f"{12:016x}"
            assert _rows(con) == _expected(small, 12)
        finally:
            con.close()
    finally:
        stub.stop()
