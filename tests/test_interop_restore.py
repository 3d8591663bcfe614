"""Compatibility with the real Litestream 0.5.17, both ways, on S3 (moto) and file://.

* Every LTX file `litestream replicate` writes (L0, compacted L1+, L9 snapshots) decodes and
  verifies with our codec, and our restore equals the primary and `litestream restore`, latest,
  at past TXIDs and at past times.
* Replicas we write with our encoder are restored by `litestream restore` to exactly our pages.
"""

from __future__ import annotations

import pytest

from ltxvfs import ltx
from ltxvfs.plan import list_levels
from ltxvfs.restore import restore
from ltxvfs.storage import open_replica

from litestream_rig import integrity_check, litestream_restore, table_rows
from replicas import FakePrimary, compact, page_bytes

pytestmark = pytest.mark.interop

COMBOS = [("file", 512), ("file", 4096), ("file", 65536), ("s3", 512), ("s3", 4096),
          ("s3", 65536)]


@pytest.mark.parametrize("replicated_db", COMBOS, indirect=True)
def test_litestream_files_decode_and_restore(replicated_db, tmp_path):
    rdb = replicated_db
    with open_replica(rdb.url) as client:
        listing = list_levels(client)
        assert listing[0] and listing[1] and listing[9], "rig should produce L0, L1 and L9 files"
        for level, files in listing.items():
            for info in files:
                f = ltx.decode_file(client.read(level, info.min_txid, info.max_txid), str(info))
                assert f.header.page_size == rdb.page_size
                assert (f.header.min_txid, f.header.max_txid) == (info.min_txid, info.max_txid)
                if level == 9:
                    assert f.header.is_snapshot and len(f.pages) == f.header.commit

        ours = restore(client, tmp_path / "ours.db")
        assert ours.txid >= rdb.final_txid
        theirs = litestream_restore(rdb.url, tmp_path / "theirs.db")
        assert table_rows(ours.path) == rdb.final_rows == table_rows(theirs)
        assert page_bytes(ours.path) == page_bytes(theirs)
        assert integrity_check(ours.path) == "ok"

        for m in rdb.moments[:-1]:
            got = restore(client, tmp_path / f"tx{m.txid}.db", txid=m.txid)
            assert table_rows(got.path) == m.rows, f"TXID {m.txid_hex}"
            ref = litestream_restore(rdb.url, tmp_path / f"ls{m.txid}.db", txid=m.txid)
            assert page_bytes(got.path) == page_bytes(ref)
            at = restore(client, tmp_path / f"ts{m.txid}.db", timestamp=m.time)
            assert table_rows(at.path) == m.rows, f"time of {m.label}"


def _our_replica(tmp_path, url, page_size):
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "ours.db", client, page_size)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)",
                 "INSERT INTO t(body) SELECT randomblob(value * 7 % 2500) FROM generate_series(1, 300)")
        p.commit("UPDATE t SET body = randomblob(40) WHERE id % 4 = 0")
        p.commit("INSERT INTO t(body) SELECT randomblob(9000) FROM generate_series(1, 5)")
        p.commit("DELETE FROM t WHERE id > 150")
        p.execute("VACUUM")
        p.publish()
        return p


@pytest.mark.parametrize("backend", ["file", "s3"])
@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_litestream_restores_what_we_write(request, tmp_path, backend, page_size):
    url = request.getfixturevalue("s3_url") if backend == "s3" else (tmp_path / "r").as_uri()
    p = _our_replica(tmp_path, url, page_size)
    out = litestream_restore(url, tmp_path / "latest.db")
    assert page_bytes(out) == page_bytes(p.path)
    assert integrity_check(out) == "ok"
    for txid, _, pages in p.history[:-1]:
        got = litestream_restore(url, tmp_path / f"tx{txid}.db", txid=txid)
        assert page_bytes(got) == pages, f"TXID {txid}"


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_litestream_restores_our_compacted_files(request, tmp_path, backend):
    url = request.getfixturevalue("s3_url") if backend == "s3" else (tmp_path / "r").as_uri()
    p = _our_replica(tmp_path, url, 4096)
    with open_replica(url) as client:
        l0 = client.list_files(0)
        compact(client, l0, level=9)  # a snapshot 1-N
        compact(client, l0[1:4], level=1, delete_inputs=True)
    out = litestream_restore(url, tmp_path / "latest.db")
    assert page_bytes(out) == page_bytes(p.path)
