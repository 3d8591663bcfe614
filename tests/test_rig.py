"""The litestream test rig works: the real ``litestream replicate`` produces L0, L1 and L9 files
on both backends and all page sizes, and the real ``litestream restore`` gives back the primary's
rows, now and at recorded past TXIDs / timestamps."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct

import pytest

from litestream_rig import (
    LitestreamError,
    Replicator,
    Workload,
    integrity_check,
    list_ltx_files,
    litestream_env,
    litestream_ltx,
    litestream_restore,
    make_s3_url,
    parse_ltx_output,
    poll_until,
    replica_keys,
    table_rows,
    txid_hex,
)

pytestmark = pytest.mark.interop

LTX_NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")


def _level_dir(backend: str, level: int) -> str:
    # S3: <prefix>/<level %04x>/...  file: ltx/<level decimal>/...
    return f"db/{level:04x}" if backend == "s3" else f"ltx/{level}"


def _keys_by_level(url: str, backend: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for key in replica_keys(url):
        head, _, name = key.rpartition("/")
        for lvl in range(10):
            if head == _level_dir(backend, lvl):
                assert LTX_NAME.match(name), key
                out.setdefault(lvl, []).append(name)
                break
        else:
            pytest.fail(f"unexpected object in replica: {key}")
    return out


def _header(path) -> tuple[int, int, int]:
    """(page size, write version, read version) from the SQLite header."""
    with open(path, "rb") as f:
        h = f.read(100)
    assert h[:16] == b"SQLite format 3\x00"
    ps = struct.unpack(">H", h[16:18])[0]
    return (65536 if ps == 1 else ps), h[18], h[19]


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_replicate_compact_snapshot_restore(replicated_db_factory, tmp_path, backend, page_size):
    rdb = replicated_db_factory(backend, page_size, batches=3, wait_levels=(1, 9),
                                timestamp_tail=True)
    final = rdb.moments[-1]
    assert rdb.final_txid == final.txid
    assert [m.txid for m in rdb.moments] == sorted({m.txid for m in rdb.moments})  # increasing
    assert rdb.workload.rows() == final.rows
    assert len(final.rows) > 8
    # Rows really span pages (overflow payloads).
    assert max(len(r[2]) + len(r[3]) for r in final.rows) > page_size

    # Object layout per backend, and L0 / L1 / L9 present.
    by_level = _keys_by_level(rdb.url, backend)
    assert {0, 1, 9} <= set(by_level), by_level
    files = list_ltx_files(rdb.url)
    l0 = [f for f in files if f.level == 0]
    assert all(f.min_txid == f.max_txid for f in l0)
    # Contiguous from 1, none deleted (l0-retention 1h). The newest L0 may be past the final
    # moment: after a checkpoint Litestream writes its _litestream_seq table (new TXID).
    top = l0[-1].max_txid
    assert [f.max_txid for f in l0] == list(range(1, top + 1))
    assert top >= final.txid
    assert final.txid <= max(f.max_txid for f in files if f.level == 1) <= top
    snaps = [f for f in files if f.level == 9]
    assert all(f.min_txid == 1 for f in snaps)
    assert final.txid <= snaps[-1].max_txid <= top
    assert sorted(by_level[9]) == [f.name for f in snaps]

    # Latest restore: same rows, healthy file, same page size, WAL-mode header.
    out = litestream_restore(rdb.url, tmp_path / "latest.db")
    assert _header(out) == (page_size, 2, 2)
    assert table_rows(out) == final.rows
    assert integrity_check(out) == "ok"

    # Restore at every recorded past TXID gives that moment's rows.
    for m in rdb.moments[:-1]:
        o = litestream_restore(rdb.url, tmp_path / f"txid-{m.txid}.db", txid=m.txid)
        assert table_rows(o) == m.rows, m.label
        assert integrity_check(o) == "ok"

    # Restore at recorded wall-clock times gives those moments' rows (all but the tail moment
    # are within the replica's time bounds thanks to timestamp_tail).
    assert rdb.moments[-1].label == "tail"
    for m in (rdb.moments[0], rdb.moments[-2]):
        assert rdb.timestamp_restorable(m)
        o = litestream_restore(rdb.url, tmp_path / f"ts-{m.txid}.db", timestamp=m.time)
        assert table_rows(o) == m.rows, m.label


def test_ltx_output_format(replicated_db_factory):
    rdb = replicated_db_factory("s3", 4096, batches=1, wait_levels=(1, 9))
    text = litestream_ltx(rdb.url, "all")
    # Go tabwriter(minwidth 0, tabwidth 8, padding 2, ' '): every column but the last is padded
    # to its widest cell + 2; the last one ("created", RFC 3339 seconds, UTC) is not padded.
    cells = [ln.split() for ln in text.splitlines()]
    assert cells[0] == ["level", "min_txid", "max_txid", "size", "created"]
    widths = [max(len(r[i]) for r in cells) + 2 for i in range(4)]
    expect = "".join("".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + r[4] + "\n"
                     for r in cells)
    assert text == expect
    for r in cells[1:]:
        assert re.fullmatch(r"\d", r[0]) and re.fullmatch("[0-9a-f]{16}", r[1]), r
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r[4]), r
    parsed = parse_ltx_output(text)
    listed = list_ltx_files(rdb.url)
    assert [(p["level"], p["min_txid"], p["max_txid"], p["size"]) for p in parsed] == \
        [(f.level, f.min_txid, f.max_txid, f.size) for f in listed]
    # Default level is 0.
    assert [p for p in parse_ltx_output(litestream_ltx(rdb.url)) if p["level"] != 0] == []
    js = json.loads(litestream_ltx(rdb.url, 9, json_output=True))
    assert js and set(js[0]) == {"level", "min_txid", "max_txid", "size", "timestamp"}
    assert js[-1]["min_txid"] == txid_hex(1)
    assert int(js[-1]["max_txid"], 16) >= rdb.final_txid and len(js[-1]["max_txid"]) == 16


@pytest.mark.parametrize("replicated_db", [("file", 512)], indirect=True)
def test_replicated_db_fixture_indirect(replicated_db, tmp_path):
    assert replicated_db.page_size == 512 and replicated_db.backend == "file"
    assert not replicated_db.replicator.running
    assert [m.label for m in replicated_db.moments] == [
        "initial", "batch-0", "batch-1", "batch-2"]
    out = replicated_db.restore(tmp_path / "r.db")
    assert table_rows(out) == replicated_db.final_rows


def test_s3_replicator_clean_stop(replicator_factory, s3_server, s3_admin, tmp_path):
    url = make_s3_url(s3_server, s3_admin)
    wl = Workload(tmp_path / "p.db", page_size=4096, seed=7)
    try:
        rep = replicator_factory(wl.path, url)
        assert rep.running
        wl.step(3)
        m1 = wl.record_moment(rep)
        wl.step(3)
        m2 = wl.record_moment(rep)
        assert m2.txid > m1.txid
        assert rep.local_max_txid() >= m2.txid  # a checkpoint may already have added one
        pid = rep.pid
        assert rep.stop() == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert rep.stop() == 0  # idempotent
        assert table_rows(litestream_restore(url, tmp_path / "r.db")) == m2.rows
        assert table_rows(litestream_restore(url, tmp_path / "o.db", txid=m1.txid)) == m1.rows
    finally:
        wl.close()


def test_one_replica_per_primary(tmp_path):
    db = tmp_path / "c.db"
    sqlite3.connect(db).close()
    with pytest.raises(TypeError):
        Replicator(db, [(tmp_path / "a").as_uri(), (tmp_path / "b").as_uri()])


def test_l0_retention_after_compaction(replicated_db_factory, tmp_path):
    rdb = replicated_db_factory("file", 4096, batches=2, wait_levels=(1,), keep_running=True,
                                l0_retention="1ms", l0_retention_check_interval="200ms")
    final = rdb.final_txid

    # Retention deletes the L0 files covered by L1, keeping the last one (bounded wait).
    def only_last_l0():
        l0 = rdb.ltx_files(0)
        return len(l0) == 1 and l0[0].max_txid >= final

    poll_until(only_last_l0, timeout=10, what="L0 retention", log=rdb.replicator.log_tail)
    assert rdb.replicator.stop() == 0
    assert 1 not in {f.max_txid for f in rdb.ltx_files(0)}
    out = rdb.restore(tmp_path / "r.db")
    assert table_rows(out) == rdb.final_rows and integrity_check(out) == "ok"


def test_restore_errors_are_raised_with_output(replicated_db_factory, tmp_path):
    rdb = replicated_db_factory("file", 512, batches=1, wait_levels=())
    with pytest.raises(LitestreamError, match="no matching backup files available"):
        litestream_restore(rdb.url, tmp_path / "x.db", txid=rdb.final_txid + 100)
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(LitestreamError, match="timestamp does not exist"):
        litestream_restore(rdb.url, tmp_path / "y.db", timestamp="2000-01-01T00:00:00Z")


def test_env_and_config(tmp_path):
    env = litestream_env({"FOO": "1"})
    assert "AWS_CA_BUNDLE" not in env and env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"] and env["FOO"] == "1"
    db = tmp_path / "c.db"
    sqlite3.connect(db).close()
    r = Replicator(db, (tmp_path / "rep").as_uri(), workdir=tmp_path / "w",
                   levels=("1s", "2s", "4s"), l0_retention="0s")
    cfg = r.config_text()
    for needle in ('interval: "1s"', 'interval: "4s"', 'l0-retention: "0s"',
                   'monitor-interval: "100ms"', 'sync-interval: "100ms"', "socket:"):
        assert needle in cfg
    r.stop()  # never started: no-op
