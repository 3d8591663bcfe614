"""The compact page index (ltxvfs.index): equal to a dict model, compact, shared between states."""

from __future__ import annotations

import gc
import random
import tracemalloc
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltxvfs import ltx
from ltxvfs.errors import LTXError, TruncatedError
from ltxvfs.hydrate import _moved, _todo
from ltxvfs.index import FilePages, StateIndex, parse_file_pages
from ltxvfs.index import decode as ixd
from ltxvfs.index import state as ixs
from ltxvfs.ltx.format import U64
from ltxvfs.pages import DatabaseState, FileIndex, fetch_file_index
from ltxvfs.publish import publish_pages
from ltxvfs.storage import open_replica
from ltxvfs.storage.base import FileInfo

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["numpy", "pure"])
def mode(request, monkeypatch):
    """Run a test with numpy decoding every index (small ones too), and without numpy."""
    if request.param == "numpy":
        pytest.importorskip("numpy")
        monkeypatch.setattr(ixd, "NUMPY_MIN_BYTES", 0)
        monkeypatch.setattr(ixd, "_numpy", _always_numpy)
        monkeypatch.setattr(ixd, "_CHUNK", 37)  # chunk ends inside varints, entries, runs
    else:
        monkeypatch.setattr(ixd, "numpy_enabled", False)
        monkeypatch.setattr(ixd, "_PURE_CHUNK", 41)  # chunked from 41 bytes on
    return request.param


def _always_numpy(nbytes):
    import numpy
    return numpy


def _info(level, lo, hi, size=1 << 40):
    return FileInfo(level, lo, hi, size, T0, etag=f"{level}-{lo}-{hi}")


def _entries(pgnos, rnd, start=ltx.HEADER_SIZE):
    out, off = [], start
    for p in pgnos:
        size = rnd.randrange(7, 3000)
        out.append((p, off, size))
        off += size
    return out, off


def _tail(entries, frames_end):
    """The bytes of a file from its index on (end marker, index, trailer) and the file size."""
    data = bytes(6) + ltx.encode_page_index(entries) + bytes(16)
    return data, frames_end + len(data)


# --- decoding --------------------------------------------------------------------------------


def _same_outcome(data, file_size, page_size=None):
    """parse_file_pages equals parse_page_index, or both raise the same error and message."""
    try:
        want = ltx.parse_page_index(data, file_size, page_size=page_size)
    except LTXError as err:
        with pytest.raises(type(err)) as got:
            parse_file_pages(data, file_size, page_size=page_size)
        assert str(got.value) == str(err)
        return None
    got = parse_file_pages(data, file_size, page_size=page_size)
    assert dict(got.items()) == want and len(got) == len(want)
    for p in list(want)[:50]:
        assert got[p] == want[p] and p in got
    return got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1 << 30), n=st.integers(0, 400), kind=st.sampled_from(
    ["dense", "lock", "sparse", "gappy", "onegap", "mangled"]))
def test_decoding_equals_the_codec(mode, monkeypatch, seed, n, kind):
    rnd = random.Random(seed)
    monkeypatch.setattr(ixd, "_CHUNK", rnd.choice([3, 5, 37, 128, 1 << 17]))
    monkeypatch.setattr(ixd, "_PURE_CHUNK", rnd.choice([3, 5, 37, 128, 1 << 20]))
    first = rnd.randrange(1, 50)
    if kind == "dense":
        pgnos = list(range(first, first + n))
    elif kind == "lock":  # a snapshot crossing the lock page: one page skipped
        lock = first + rnd.randrange(0, n + 1)
        pgnos = [p for p in range(first, first + n + 1) if p != lock]
    elif kind == "onegap":
        pgnos = list(range(first, first + n))
    else:
        pgnos = sorted(rnd.sample(range(1, 5 * n + 10), n))
    entries, end = _entries(pgnos, rnd)
    if kind == "gappy" and len(entries) > 2:  # frames not back to back
        entries = [(p, o + 10 * i, s) for i, (p, o, s) in enumerate(entries)]
        end += 10 * len(entries)
    if kind == "onegap" and len(entries) > 2:  # one gap between frames, anywhere
        at = rnd.randrange(1, len(entries))
        entries = [(p, o + 10 * (i >= at), s) for i, (p, o, s) in enumerate(entries)]
        end += 10
    data, size = _tail(entries, end)
    if kind == "mangled" and len(data) > 30:
        data = bytearray(data)
        for _ in range(rnd.randrange(1, 4)):
            data[rnd.randrange(6, len(data) - 24)] = rnd.randrange(256)
        data = bytes(data)
    got = _same_outcome(data, size, page_size=rnd.choice([None, 4096]))
    if got is not None and kind in ("dense", "lock") and n:
        assert got.pgnos is None, "a run of pages keeps no page numbers"
    if got is not None and kind not in ("gappy", "onegap", "mangled") and n:
        assert got.sizes is None, "back-to-back frames keep no sizes"


@pytest.mark.parametrize("case", [
    [(1, 100, 50), (1, 150, 50)],  # pgno not ascending
    [(0, 100, 50)],
    [(1, 50, 50)],  # offset inside the header
    [(1, 100, 3)],  # smaller than a page header
    [(1, 100, 70000)],  # larger than any frame
    [(1, 100, 50), (2, 150, 10**9)],  # past the frames
])
def test_malformed_indexes_raise_the_codecs_message(mode, case):
    data, size = _tail(case, 1000)
    with pytest.raises(LTXError) as want:
        ltx.parse_page_index(data, size)
    with pytest.raises(type(want.value), match=str(want.value).replace("+", r"\+")):
        parse_file_pages(data, size)


@pytest.mark.parametrize("body", [
    b"\x01\x64\x32",  # no terminator
    b"\x01\x64\x32\x00\x00",  # terminator not at the end
    b"\x01\x64\xb2",  # varint runs past the index
    b"\xff" * 12 + b"\x01\x00\x00",  # varint too long
])
def test_malformed_varints_raise_the_codecs_message(mode, body):
    data = bytes(6) + body + U64.pack(len(body)) + bytes(16)
    size = 1000 + len(data)
    with pytest.raises(LTXError) as want:
        ltx.parse_page_index(data, size)
    with pytest.raises(type(want.value)) as got:
        parse_file_pages(data, size)
    assert str(got.value) == str(want.value)


def test_pieces_decode_like_one_buffer(mode):
    rnd = random.Random(3)
    entries, end = _entries(range(1, 3001), rnd)
    data, size = _tail(entries, end)
    whole = parse_file_pages(data, size)
    for cuts in ([5], [len(data) - 30], [1, 2, 3, 500, 9000], list(range(1000, len(data) - 24, 777))):
        bounds = [0, *cuts, len(data)]
        pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        assert dict(parse_file_pages(pieces, size).items()) == dict(whole.items())
    # An index that starts before the data: TruncatedError, as for one buffer.
    with pytest.raises(TruncatedError, match="before the fetched tail"):
        parse_file_pages([data[100:200], data[200:]], size)


# --- a state's index against a dict model ----------------------------------------------------


def _model_apply(model, files, commit):
    """The dict algorithm DatabaseState.applying used before ltxvfs.index (the reference)."""
    index = dict(model)
    for info, pages in files:
        for p, (o, s) in pages.items():
            cur = index.get(p)
            if cur is None or cur[0].max_txid <= info.max_txid:
                index[p] = (info, o, s)
    return {p: r for p, r in index.items() if p <= commit}


ops = st.lists(st.tuples(st.sampled_from(["l0", "l0", "l0", "big", "old", "shrink", "grow",
                                          "snapshot", "move"]),
                         st.integers(0, 1 << 30)), min_size=1, max_size=25)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, n=st.integers(1, 300), lock=st.integers(1, 400))
def test_state_index_equals_a_dict_model(mode, monkeypatch, ops, n, lock):
    """Random sequences of applied files (snapshot across a lock page, small and large L0
    files, an older compacted file after newer ones, shrinking and growing commits, relocation)
    give the same pages as the dict model, with small thresholds so that layers merge and
    compact often."""
    monkeypatch.setattr(ixs, "SMALL_FILE", 8)
    monkeypatch.setattr(ixs, "COMPACT_MIN", 40)
    monkeypatch.setattr(ixs, "COMPACT_RATIO", 4)
    monkeypatch.setattr(ixs, "MAX_LAYERS", 5)
    rnd = random.Random(n * 1000 + lock)
    txid = 1
    commit = n
    snap = [p for p in range(1, n + 1) if p != lock]
    entries, _ = _entries(snap, rnd)
    files = [(_info(9, 1, 1), FilePages.from_columns(*map(list, zip(*entries, strict=True)))
              if entries else FilePages.from_columns([], [], []))]
    model = _model_apply({}, files, commit)
    idx = StateIndex().applying(files, commit)
    history = [(idx, model)]
    for op, seed in ops:
        rnd = random.Random(seed)
        if op == "move":  # relocation: the same pages in another file, whatever its TXID
            if not model:
                continue
            info = _info(1, 1, txid + rnd.randrange(0, 3))
            moves = {p: (info, rnd.randrange(100, 10**6), rnd.randrange(7, 100))
                     for p in rnd.sample(sorted(model), min(len(model), rnd.randrange(1, 20)))}
            idx = idx.with_refs(moves)
            model = {**model, **moves}
            history.append((idx, model))
            continue
        if op == "shrink":
            commit = max(1, commit - rnd.randrange(1, max(2, commit // 2)))
        elif op == "grow":
            commit += rnd.randrange(1, 60)
        if op == "old":  # an older compacted file arriving after newer L0 files
            info = _info(1, 1, max(1, txid - rnd.randrange(0, 4)))
        elif op == "snapshot":
            txid += 1
            info = _info(9, 1, txid)
        else:
            txid += 1
            info = _info(0, txid, txid)
        if op == "snapshot":
            pgnos = [p for p in range(1, commit + 1) if p != lock]
        else:
            k = {"big": 40, "grow": 60}.get(op, 5)
            pool = range(1, commit + 1)
            pgnos = sorted(rnd.sample(pool, min(len(pool), rnd.randrange(0, k + 1))))
            if op == "grow":
                pgnos = sorted({*pgnos, *range(commit - rnd.randrange(0, 5), commit + 1)} - {lock})
        entries, _ = _entries(pgnos, rnd)
        pages = FilePages.from_columns(*map(list, zip(*entries, strict=True))) if entries \
            else FilePages.from_columns([], [], [])
        idx = idx.applying([(info, pages)], commit)
        model = _model_apply(model, [(info, pages)], commit)
        history.append((idx, model))
    for i, (idx, model) in enumerate(history):
        top = max([*model, lock, n]) + 3
        assert [p for p in range(-1, top) if idx.get(p) != model.get(p)] == []
        assert list(idx.items()) == sorted(model.items())
        assert len(idx) == len(model)
        for old, old_model in history[:i]:  # changed(): a superset of the pages that differ
            differ = {p for p in set(model) | set(old_model) if model.get(p) != old_model.get(p)
                      and p in model}
            cand = idx.changed(old)
            assert cand is None or differ <= cand
            # hydration's catch-up list equals the page-by-page comparison of the dicts
            unsure = set(random.Random(i).sample(range(1, top), min(3, top - 1)))
            want = sorted(p for p, ref in model.items()
                          if p in unsure or _moved(old_model.get(p), ref))
            assert _todo(SimpleNamespace(index=idx), SimpleNamespace(index=old), unsure) == want


# --- sharing and memory ----------------------------------------------------------------------


def _snapshot_pages(n, page_size=4096):
    """A synthetic snapshot's index of ``n`` pages (across the lock page), as file tail bytes."""
    lock = ltx.lock_pgno(page_size)
    rnd = random.Random(1)
    entries, off, p = [], ltx.HEADER_SIZE, 0
    for _ in range(n):
        p += 1
        if p == lock:
            p += 1
        size = rnd.randrange(2000, 2600)
        entries.append((p, off, size))
        off += size
    return _tail(entries, off)


@pytest.mark.slow
@pytest.mark.parametrize("numpy_on", [True, False])
def test_a_million_pages_take_at_most_32_bytes_each(monkeypatch, numpy_on):
    if numpy_on:
        pytest.importorskip("numpy")
    else:
        monkeypatch.setattr(ixd, "numpy_enabled", False)
    n = 1_000_000
    data, size = _snapshot_pages(n)
    info = _info(9, 1, 1, size)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pages = parse_file_pages(data, size)
        state = DatabaseState(4096, n + 1, 1, T0, {}).applying([FileIndex(info, pages, None)], n + 1)
        # a poll's worth of small files on top
        for t in range(2, 50):
            small = FileIndex(_info(0, t, t), {p: (100, 50) for p in range(t * 100, t * 100 + 20)},
                              None)
            state = state.applying([small], n + 1)
        del pages
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(state.index) == n
    assert state.index.get(262145) is None and state.index.get(262146)[0] is info  # lock page
    assert used / n <= 32, f"{used / n:.1f} bytes per page"


def test_applying_a_small_file_shares_the_base():
    n = 200_000
    data, size = _snapshot_pages(n)
    pages = parse_file_pages(data, size)
    base = DatabaseState(4096, n + 1, 1, T0, {}).applying([FileIndex(_info(9, 1, 1), pages, None)],
                                                          n + 1)
    base_layer = base.index.layers[0][0]
    assert base_layer.pages is pages, "the snapshot's arrays are the base, not a copy"
    state = base
    for t in range(2, 200):
        l0 = FileIndex(_info(0, t, t), {t * 7: (100, 50)}, None)
        nxt = state.applying([l0], n + 1)
        assert nxt.index.layers[0][0] is base_layer  # shared, never copied
        # touched: the new page plus the small layers merged with it (geometric: O(log))
        assert sum(len(la) for la, _ in nxt.index.layers[1:]) <= t
        assert len(nxt.index.layers) <= 12
        changed = nxt.index.changed(state.index)
        assert t * 7 in changed and len(changed) <= sum(len(la) for la, _ in nxt.index.layers[1:])
        assert nxt.index[t * 7][0].max_txid == t and state.index[t * 7][0].max_txid == 1
        state = nxt
    assert state.index.changed(base.index) == {t * 7 for t in range(2, 200)}


# --- fetching a large index ------------------------------------------------------------------


class Counting:
    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def read(self, level, lo, hi, offset=0, size=None):
        self.reads.append((offset, size))
        return self.inner.read(level, lo, hi, offset, size)


def test_a_large_index_is_fetched_in_parallel_parts(tmp_path, monkeypatch, mode):
    """An index larger than the first tail: the rest comes in parallel ranged GETs (here of
    at least 16 KiB), and the pages equal the codec's decoding of the whole file."""
    monkeypatch.setattr("ltxvfs.pages.INDEX_PART", 16 * 1024)
    n = 40_000
    url = (tmp_path / "r").as_uri()
    with open_replica(url) as client:
        zero = bytes(512)
        info = publish_pages(client, 9, 1, 1, page_size=512, commit=n,
                             pages=((p, zero) for p in range(1, n + 1)))
        data = client.read(9, 1, 1)
        want = ltx.decode_file(data).index
        counting = Counting(client)
        fi = fetch_file_index(counting, info)
    index_len = U64.unpack_from(data, len(data) - 24)[0]
    assert index_len > 32 * 1024 and info.size > 256 * 1024
    assert fi.pages == want and fi.pages.pgnos is None and fi.pages.sizes is None
    reads = sorted(counting.reads)
    begin = len(data) - 24 - index_len
    tail = info.size - 32 * 1024  # the first round: 1/256 of the file, at least 32 KiB
    assert reads[0][0] == begin and sum(s for _, s in reads) == info.size - begin
    assert all(a + s == b for (a, s), (b, _) in zip(reads, reads[1:], strict=False)), reads
    assert tail in [o for o, _ in reads] and len([o for o, _ in reads if o < tail]) >= 2
    assert all(s >= 16 * 1024 for o, s in reads if o + s not in (tail, info.size))


# --- end to end: the VFS over a snapshot whose index needs a second round --------------------


def test_reads_through_the_vfs_follow_updates_shrink_and_growth(tmp_path, monkeypatch, mode):
    """A database of ~20,000 512-byte pages (its index spans parallel GETs) followed through the
    VFS across updates, a VACUUM that shrinks it, growth and a compaction-free rebuild: every
    read equals the source database, and the integrity check passes."""
    from urllib.parse import quote

    import apsw

    import ltxvfs

    from replicas import FakePrimary
    monkeypatch.setattr("ltxvfs.pages.INDEX_PART", 16 * 1024)
    monkeypatch.setattr(ixs, "SMALL_FILE", 64)  # large L0 files become array layers too
    vfs = ltxvfs.register()
    url = (tmp_path / "replica").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "src.db", client, page_size=512)
        p.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        rnd = random.Random(5)
        p.commit("INSERT INTO t(v) VALUES (?)",
                 params=[(rnd.randbytes(40).hex(),) for _ in range(60_000)])
        first = client.list_files(0)[0]
        index_len = U64.unpack_from(client.read(0, 1, 1, first.size - 24, 8))[0]
        assert index_len > first.size // 256 and index_len > 32 * 1024, "needs a second round"
        con = apsw.Connection(f"file:db?vfs=litestream&replica_url={quote(url, safe='')}"
                              "&poll_interval=1h",
                              flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        [replica] = [r for r in vfs.replicas() if r.client.url == client.url]
        try:
            def check():
                replica.poll()
                assert con.execute("SELECT * FROM t ORDER BY id").fetchall() == p.rows()
                assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            check()
            p.commit("UPDATE t SET v = 'u' || id WHERE id % 97 = 0")
            check()
            p.commit("DELETE FROM t WHERE id > 20000")
            p.execute("VACUUM")
            p.publish()
            check()
            assert replica.state.commit < 20_000
            p.commit("INSERT INTO t(v) VALUES (?)",
                     params=[(rnd.randbytes(40).hex(),) for _ in range(8_000)])
            check()
            assert len(replica.state.index) == replica.state.commit
        finally:
            con.close()


@pytest.mark.slow
@pytest.mark.parametrize("numpy_on", [True, False])
def test_the_worst_steady_state_stays_under_32_bytes_a_page(monkeypatch, numpy_on):
    """The most an index holds between compactions: a compacted (dense) base plus overlays just
    below the compaction threshold (1/16 of the base) in dict layers (~170 B per page each)."""
    if numpy_on:
        pytest.importorskip("numpy")
    else:
        monkeypatch.setattr(ixd, "numpy_enabled", False)
    n = 1_000_000
    data, size = _snapshot_pages(n)
    info = _info(9, 1, 1, size)
    rnd = random.Random(2)

    def poll(state, t, k):
        pgnos = sorted(rnd.sample(range(1, n), k))
        return state.applying([FileIndex(_info(0, t, t, size), {p: (100 + p, 50) for p in pgnos},
                                         None)], n + 1)

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = DatabaseState(4096, n + 1, 1, T0, {}).applying(
            [FileIndex(info, parse_file_pages(data, size), None)], n + 1)
        t = 2
        while not isinstance(state.index.layers[0][0], ixs._DenseLayer):  # until compacted
            state, t = poll(state, t, 2000), t + 1
        base = state.index.layers[0][0]
        while True:  # overlays up to just below the next compaction
            nxt = poll(state, t, 2000)
            if nxt.index.layers[0][0] is not base:
                break
            state, t = nxt, t + 1
        del nxt
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    over = sum(len(la) for la, _ in state.index.layers[1:])
    assert over > n // 16 - 2000, over
    assert used / n <= 32, f"{used / n:.1f} bytes per page ({over} pages in overlays)"
