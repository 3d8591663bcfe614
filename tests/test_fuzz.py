"""Bad input: fuzzing the LTX decoder and the page-index parser with mutated REAL files, and bad
URLs, PRAGMA values, timestamps and environment values.

The corpus is collected once per session: every LTX file the real ``litestream replicate`` wrote
(L0 with WAL fields, compacted L1/L2, L9 snapshots, from a WAL primary with page sizes 4096 and
1024), files from :class:`replicas.FakePrimary` (our encoder; page sizes 512, 4096, 65536), and
files in the old frame encoding (Litestream <= 0.5.15). Hypothesis mutates them (bit flips,
hostile values in size fields, truncation, insertion, deletion, splices) and checks that

* only subclasses of ``ltxvfs.errors.LTXError`` come out (or the file still decodes to the same
  pages: LTX checksums cover decompressed pages, so some changes to compressed bytes are
  harmless);
* nothing hangs (a deadline per example);
* nothing allocates beyond a bound (tracemalloc peak per example): a hostile size field must
  not allocate gigabytes.

``LTXVFS_FUZZ_EXAMPLES`` sets the number of examples per fuzz test (default 300 in CI).
"""

from __future__ import annotations

import io
import os
import random
import struct
import tracemalloc
from datetime import timedelta
from pathlib import Path

import apsw
import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ltx import legacy_file

import ltxvfs
from ltxvfs import ltx
from ltxvfs.config import ConfigError, VFSConfig
from ltxvfs.errors import LTXError, ReplicaURLError
from ltxvfs.pragmas import PRAGMAS, PragmaError, parse_time
from ltxvfs.storage import open_replica, parse_replica_url

from litestream_rig import Replicator, Workload, list_ltx_files
from replicas import FakePrimary

EXAMPLES = int(os.environ.get("LTXVFS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None)

pytestmark = pytest.mark.fuzz


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


def _litestream_files(base: Path, page_size: int, seed: int) -> list[bytes]:
    url = (base / f"replica-{page_size}").as_uri()
    wl = Workload(base / f"primary-{page_size}.db", page_size=page_size, seed=seed,
                  initial_rows=20)
    rep = Replicator(wl.path, url, workdir=base / f"ls-{page_size}", levels=("1s", "2s"),
                     snapshot_interval="1s", name=f"fuzz-corpus-{page_size}")
    try:
        rep.start()
        for _ in range(4):
            wl.step(3, 4)
            wl.record_moment(rep)
        txid = wl.moments[-1].txid
        rep.wait_for_level(1, txid, timeout=30)
        rep.wait_for_level(9, txid, timeout=30)
    finally:
        rep.stop()
        wl.close()
    out = [Path(f.key).read_bytes() for f in list_ltx_files(url)]
    local = base / f".primary-{page_size}.db-litestream" / "ltx" / "0"
    out += [p.read_bytes() for p in sorted(local.glob("*.ltx"))][:10]
    return out


def _fake_primary_files(base: Path) -> list[bytes]:
    out = []
    for page_size in (512, 4096, 65536):
        d = base / f"fake-{page_size}"
        with open_replica(d.as_uri()) as client:
            p = FakePrimary(base / f"fake-{page_size}.db", client, page_size)
            rows = 200 if page_size < 65536 else 30
            p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)",
                     f"INSERT INTO t(v, b) SELECT 'v' || value, randomblob(value % 700) "
                     f"FROM generate_series(1, {rows})")
            p.commit("UPDATE t SET v = 'x' WHERE id % 3 = 0")
            p.commit("DELETE FROM t WHERE id % 5 = 0")
            for f in [f for lvl in range(10) for f in client.list_files(lvl)]:
                out.append(client.read(f.level, f.min_txid, f.max_txid))
    return out


def _legacy_files() -> list[bytes]:
    rnd = random.Random(1)
    pages = [(n, bytes([n]) * 3000 + rnd.randbytes(1096)) for n in range(1, 4)]
    h = ltx.Header(page_size=4096, commit=3, min_txid=1, max_txid=1, timestamp=1_700_000_000_000)
    mixed = ltx.Header(page_size=4096, commit=3, min_txid=2, max_txid=2, timestamp=1_700_000_000_000)
    return [legacy_file(h, pages), legacy_file(mixed, pages[1:], frame_pages={2})]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list[bytes]:
    base = tmp_path_factory.mktemp("fuzz-corpus")
    files = _fake_primary_files(base) + _legacy_files()
    files += _litestream_files(base, 4096, 1) + _litestream_files(base, 1024, 2)
    # Every file of the corpus is valid to begin with.
    for data in files:
        ltx.decode_file(data)
    levels = {ltx.Header.unpack(d[:100]).min_txid == 1 for d in files}
    assert levels == {True, False}, "snapshots and incremental files"
    return files


@pytest.mark.interop
def test_corpus_holds_real_litestream_files(corpus):
    headers = [ltx.Header.unpack(d[:100]) for d in corpus]
    assert len(corpus) >= 30
    assert any(h.wal_offset for h in headers), "L0 files from a WAL primary (litestream)"
    assert {h.page_size for h in headers} >= {512, 1024, 4096, 65536}


# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------

HOSTILE = [0, 1, 2, 0x7F, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x10001, 0x7FFFFFFF, 0x80000000,
           0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
#: Offsets of the header fields and their widths (page frames and index come from the file).
HEADER_FIELDS = [(4, 4), (8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8), (56, 8),
                 (64, 4), (68, 4), (72, 8)]


def _fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the size-like fields of a file: header, frame headers, index
    length, trailer."""
    out = list(HEADER_FIELDS)
    try:
        f = ltx.decode_file(data)
        for off, _size in list(f.index.values())[:8]:
            out += [(off, 4), (off + 4, 2), (off + 6, 4)]
    except LTXError:
        pass
    n = len(data)
    out += [(n - 24, 8), (n - 16, 8), (n - 8, 8)]
    return [(o, w) for o, w in out if 0 <= o and o + w <= n]


@st.composite
def mutated(draw, corpus):
    i = draw(st.integers(0, len(corpus) - 1))
    base = corpus[i]
    buf = bytearray(base)
    for _ in range(draw(st.integers(1, 5))):
        if not buf:
            break
        op = draw(st.sampled_from(["flip", "byte", "field", "field", "truncate", "insert",
                                   "delete", "dup", "splice"]))
        n = len(buf)
        at = draw(st.integers(0, n - 1))
        if op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            buf[at] = draw(st.integers(0, 255))
        elif op == "field":
            fields = _fields(bytes(buf))
            if not fields:
                continue
            off, width = draw(st.sampled_from(fields))
            value = draw(st.sampled_from(HOSTILE + [n, n * 100, 4096 + 1025, 65536 + 1]))
            buf[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
        elif op == "truncate":
            del buf[draw(st.integers(0, n)):]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del buf[at:at + draw(st.integers(1, 64))]
        elif op == "dup":
            buf[at:at] = buf[at:at + draw(st.integers(1, 256))]
        else:
            other = corpus[draw(st.integers(0, len(corpus) - 1))]
            cut = draw(st.integers(0, len(other)))
            buf = buf[:at] + bytearray(other[cut:])
    return base, bytes(buf)


class _Chunky(io.RawIOBase):
    """A stream that returns short reads, as a network stream does."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._data, self._pos, self._rng = data, 0, random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._rng.randint(1, 9000), len(self._data) - self._pos)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def _memory_bound(data: bytes) -> int:
    """Peak allocation allowed for decoding ``data``: the input a few times, every frame of it
    decompressed (at most 255x, LZ4's ratio, but never more than a page per frame) and slack."""
    return 24 * 1024 * 1024 + 8 * len(data)


def _outcome(fn):
    try:
        return ("ok", fn())
    except LTXError as err:
        return ("error", type(err).__name__)


@pytest.fixture(scope="session")
def fuzz_counter():
    counts = {"examples": 0, "decoded": 0, "rejected": 0, "peak_max": 0}
    yield counts
    from test_chaos import _report
    _report("fuzz-ltx", counts)


def _count_example(fuzz_counter, buf: bytes, peak: int) -> None:
    """Count one fuzz example and check its allocation peak stayed bounded."""
    fuzz_counter["examples"] += 1
    fuzz_counter["peak_max"] = max(fuzz_counter["peak_max"], peak)
    assert peak <= _memory_bound(buf), f"{len(buf)} bytes: peak allocation {peak} bytes"


@FUZZ
@given(data=st.data())
def test_decoder_on_mutated_real_files(corpus, fuzz_counter, data):
    base, buf = data.draw(mutated(corpus))
    good = ltx.decode_file(base)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        whole = _outcome(lambda: ltx.decode_file(buf))
        streamed = _outcome(lambda: dict(ltx.Decoder(io.BufferedReader(_Chunky(buf, len(buf)), 4096))))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _count_example(fuzz_counter, buf, peak)
    if whole[0] == "ok":
        fuzz_counter["decoded"] += 1
        if buf in corpus and buf != base:  # a splice that rebuilt another corpus file whole
            good = ltx.decode_file(buf)
        # The checksum held, so the file means what it meant.
        assert whole[1].pages == good.pages and whole[1].header == good.header
        assert streamed[0] == "ok" and streamed[1] == good.pages
    else:
        fuzz_counter["rejected"] += 1
        assert streamed[0] == "error"


@FUZZ
@given(data=st.data())
def test_index_and_frames_on_mutated_real_files(corpus, fuzz_counter, data):
    """The random-access path of the VFS: the index from a tail, then single frames."""
    base, buf = data.draw(mutated(corpus))
    page_size = ltx.Header.unpack(base[:100]).page_size
    tail = data.draw(st.integers(0, len(buf)))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            ltx.page_index_start(buf[len(buf) - tail:], len(buf))
        except LTXError:
            pass
        try:
            index = ltx.parse_page_index(buf[len(buf) - tail:], len(buf), page_size=page_size)
        except LTXError:
            index = ltx.decode_file(base).index  # frames where the good file has them
        for pgno, (off, size) in list(index.items())[:16]:
            for frame in (buf[off:off + size], buf[off:off + size + data.draw(st.integers(-8, 8))]):
                try:
                    page = ltx.decode_page_frame(frame, page_size, pgno)
                    assert len(page) == page_size
                except LTXError:
                    pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _count_example(fuzz_counter, buf, peak)


# --------------------------------------------------------------------------------------------
# Hostile size fields, one by one (deterministic)
# --------------------------------------------------------------------------------------------


def _xxh32(data: bytes, seed: int = 0) -> int:
    """xxHash32 (the LZ4 frame descriptor checksum), to forge valid-looking LZ4 frames."""
    p1, p2, p3, p4, p5, m = 2654435761, 2246822519, 3266489917, 668265263, 374761393, 0xFFFFFFFF

    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & m

    n, i = len(data), 0
    if n >= 16:
        v = [(seed + p1 + p2) & m, (seed + p2) & m, seed & m, (seed - p1) & m]
        while i + 16 <= n:
            for j in range(4):
                lane = struct.unpack_from("<I", data, i + 4 * j)[0]
                v[j] = (rotl((v[j] + lane * p2) & m, 13) * p1) & m
            i += 16
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & m
    else:
        h = (seed + p5) & m
    h = (h + n) & m
    while i + 4 <= n:
        h = (rotl((h + struct.unpack_from("<I", data, i)[0] * p3) & m, 17) * p4) & m
        i += 4
    while i < n:
        h = (rotl((h + data[i] * p5) & m, 11) * p1) & m
        i += 1
    h ^= h >> 15
    h = (h * p2) & m
    h ^= h >> 13
    h = (h * p3) & m
    return h ^ (h >> 16)


def _lz4_frame_claiming(content_size: int, page: bytes) -> bytes:
    """An LZ4 frame of ``page`` whose header claims ``content_size`` bytes (checksum fixed)."""
    frame = bytearray(lz4.frame.compress(page, store_size=True))
    assert frame[4] & 0x08  # content size present
    frame[6:14] = struct.pack("<Q", content_size)
    frame[14] = (_xxh32(bytes(frame[4:14])) >> 8) & 0xFF
    assert lz4.frame.get_frame_info(bytes(frame))["content_size"] == content_size
    return bytes(frame)


def _legacy_with_frame(body: bytes, page: bytes) -> bytes:
    """A snapshot of one page in the frame encoding whose LZ4 frame is ``body``."""
    h = ltx.Header(page_size=len(page), commit=1, min_txid=1, max_txid=1, timestamp=1)
    out = bytearray(h.pack())
    crc = ltx.crc64(bytes(out))
    ph = struct.pack(">IH", 1, 0)
    out += ph + body
    crc = ltx.crc64(page, ltx.crc64(ph, crc))
    tail = bytes(6) + ltx.encode_page_index([(1, 100, 6 + len(body))]) + bytes(8)
    out += tail
    crc = ltx.crc64(tail, crc)
    return bytes(out + struct.pack(">Q", ltx.CHECKSUM_FLAG | crc))


def _peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        try:
            result: object = fn()
        except LTXError as err:
            result = err
        except MemoryError as err:  # not an LTXError: reported as the finding it is
            result = err
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("claimed", [1 << 30, 1 << 34, 1 << 50])
def test_lz4_frame_claiming_a_huge_size_is_refused_cheaply(claimed):
    page = bytes(4096)
    body = _lz4_frame_claiming(claimed, page)
    frame = struct.pack(">IH", 1, 0) + body
    result, peak = _peak(lambda: ltx.decode_page_frame(frame, 4096, 1))
    assert isinstance(result, LTXError), result
    assert peak < 4 << 20, f"decode_page_frame allocated {peak} bytes for a {len(frame)}-byte frame"
    result, peak = _peak(lambda: ltx.decode_file(_legacy_with_frame(body, page)))
    assert isinstance(result, LTXError), result
    assert peak < 4 << 20, f"Decoder allocated {peak} bytes"


def test_lz4_frame_bomb_is_refused_cheaply():
    """64 MiB of zeros compress to ~260 KB; a page is 4 KiB: decoding must stop at the page."""
    bomb = lz4.frame.compress(bytes(64 << 20), block_size=lz4.frame.BLOCKSIZE_MAX4MB)
    page = bytes(4096)
    result, peak = _peak(lambda: ltx.decode_file(_legacy_with_frame(bomb, page)))
    assert isinstance(result, LTXError), result
    assert peak < 8 << 20, f"Decoder allocated {peak} bytes for a {len(bomb)}-byte frame"
    frame = struct.pack(">IH", 1, 0) + bomb
    result, peak = _peak(lambda: ltx.decode_page_frame(frame, 4096, 1))
    assert isinstance(result, LTXError), result
    assert peak < 8 << 20, f"decode_page_frame allocated {peak} bytes"


def _good_block_file(page_size: int = 4096) -> bytes:
    h = ltx.Header(page_size=page_size, commit=2, min_txid=1, max_txid=1, timestamp=1)
    return ltx.encode_file(h, [(1, bytes(page_size)), (2, os.urandom(page_size))])


@pytest.mark.parametrize(("where", "value"), [
    ("block size", 0xFFFFFFFF), ("block size", 0x7FFFFFFF), ("block size", 4096 + 1025),
    ("index length", (1 << 64) - 1), ("index length", 1 << 63), ("index length", 0),
    ("page size", 1 << 31), ("commit", 0xFFFFFFFF), ("max txid", (1 << 64) - 1),
])
def test_hostile_size_fields(where, value):
    data = bytearray(_good_block_file())
    off, width = {"block size": (106, 4), "index length": (len(data) - 24, 8),
                  "page size": (8, 4), "commit": (12, 4), "max txid": (24, 8)}[where]
    data[off:off + width] = value.to_bytes(width, "big")
    result, peak = _peak(lambda: ltx.decode_file(bytes(data)))
    assert isinstance(result, LTXError), result
    assert peak < 4 << 20
    result, peak = _peak(lambda: ltx.parse_page_index(bytes(data), len(data)))
    assert peak < 4 << 20


def test_index_varints_that_never_end():
    data = bytearray(_good_block_file())
    start = ltx.page_index_start(bytes(data), len(data))
    data[start:len(data) - 24] = b"\xff" * (len(data) - 24 - start)
    with pytest.raises(LTXError, match="varint runs past the index"):
        ltx.parse_page_index(bytes(data), len(data))
    with pytest.raises(LTXError, match="varint runs past the index"):
        ltx.decode_file(bytes(data))


# --------------------------------------------------------------------------------------------
# Bad URLs, timestamps, environment values, PRAGMA values
# --------------------------------------------------------------------------------------------

URL_PARTS = st.sampled_from(["s3://", "file://", "file:", "/", "S3://", "gs://", "", "s3:/",
                             "file:///", "s3://bkt", "s3://bkt/db", "s3://arn:aws:s3:x:1:accesspoint/"])
QUERY_NAMES = st.sampled_from(["endpoint", "region", "forcePathStyle", "skipVerify", "partSize",
                               "concurrency", "sseCustomerKey", "sseCustomerAlgorithm",
                               "sseKmsKeyId", "signPayload", "requireContentMD5", "x"])


@st.composite
def replica_urls(draw):
    if draw(st.booleans()):
        return draw(st.text(max_size=60))
    url = draw(URL_PARTS) + draw(st.text(max_size=30))
    if draw(st.booleans()):
        params = draw(st.lists(st.tuples(QUERY_NAMES, st.text(max_size=20)), max_size=4))
        url += "?" + "&".join(f"{k}={v}" for k, v in params)
    return url


@FUZZ
@given(url=replica_urls())
def test_bad_replica_urls_raise_replica_url_error(url):
    try:
        parsed = parse_replica_url(url, environ={})
    except ReplicaURLError as err:
        assert str(err)
        return
    assert parsed.scheme in ("s3", "file")
    if parsed.scheme == "file":
        assert parsed.path is not None and parsed.path.is_absolute()
    else:
        assert parsed.bucket and parsed.prefix and not parsed.prefix.startswith("/")
        assert ".." not in parsed.prefix.split("/")


TIMES = st.one_of(st.text(max_size=40), st.sampled_from([
    "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59.999999+00:00",
    "0001-01-01", "10000000000 years ago", "1e309 days ago", "in 1000000 years", "-1", "now",
    "99999999999999999999 seconds ago", "yesterday", "\x00", "2026-02-30T00:00:00Z"]))


@FUZZ
@given(text=TIMES)
def test_bad_timestamps_raise_pragma_error(text):
    try:
        value = parse_time(text)
    except PragmaError as err:
        assert text.strip()[:10] in str(err) or "invalid timestamp" in str(err)
        return
    assert value.tzinfo is not None


ENV_NAMES = [f"LITESTREAM_{f.upper()}" for f in (
    "poll_interval", "cache_size", "open_timeout", "log_level", "write_enabled", "sync_interval",
    "compaction_levels", "snapshot_interval", "snapshot_retention", "l0_retention",
    "hydration_enabled", "hydration_persistent")]
ENV_VALUES = st.one_of(st.text(max_size=20), st.sampled_from([
    "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "-0", "1_0", "0x10", "1s1", "5 s", "1h-1m",
    "10MiB", "10XB", "-5MiB", "99999999999999999999G", "yes", "maybe", "on", "", "debug",
    "TRACE", "1ms,nan", "off", ",", "1s,,2s"]))


@FUZZ
@given(name=st.sampled_from(ENV_NAMES), value=ENV_VALUES)
def test_bad_environment_values_raise_config_error(name, value):
    import math

    try:
        cfg = VFSConfig.from_env({name: value})
    except ConfigError as err:
        assert name in str(err) and str(err).startswith("invalid ")  # names the variable
        return
    for f in ("poll_interval", "open_timeout", "sync_interval", "snapshot_interval",
              "snapshot_retention", "l0_retention"):
        assert math.isfinite(getattr(cfg, f)), f"{name}={value!r} gave {f}={getattr(cfg, f)}"
    assert all(math.isfinite(v) and v > 0 for v in cfg.compaction_levels), cfg.compaction_levels
    assert cfg.poll_interval > 0 and cfg.cache_size >= 0


@pytest.mark.parametrize("value", ["bogus", "TRACE", "verbose"])
def test_bad_log_level_is_an_error(value):
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        VFSConfig.from_env({"LITESTREAM_LOG_LEVEL": value})


@pytest.fixture(scope="module")
def pragma_db(tmp_path_factory):
    base = tmp_path_factory.mktemp("pragma-fuzz")
    url = (base / "replica").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(base / "p.db", client)
        p.commit("CREATE TABLE t(x)", "INSERT INTO t VALUES (1)", timestamp_ms=1_700_000_000_000)
        p.commit("INSERT INTO t VALUES (2)", timestamp_ms=1_700_000_060_000)
    ltxvfs.register()
    from urllib.parse import quote

    con = apsw.Connection(f"file:db?vfs=litestream&replica_url={quote(url, safe='')}",
                          flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    yield con
    con.close()


PRAGMA_VALUES = st.one_of(st.text(max_size=30), st.sampled_from([
    "latest", "LATEST", "", " ", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59",
    "ffffffffffffffff", "10000000000000000", "0", "-1", "0x1", "1", "2", "0000000000000001",
    "2023-11-14T22:14:00Z", "1 minute ago", "'", "\x00", "on", "off"]))


@FUZZ
@given(name=st.sampled_from(sorted(PRAGMAS)), value=PRAGMA_VALUES)
def test_bad_pragma_values_raise_sql_error(pragma_db, name, value):
    con = pragma_db
    if name == "litestream_write_enabled" and value.strip().lower() in ("1", "true", "on"):
        return  # a valid request to write: not bad input
    quoted = "'" + value.replace("'", "''") + "'"
    try:
        con.execute(f"PRAGMA {name} = {quoted}").fetchall()
    except apsw.SQLError as err:
        assert str(err)
    finally:
        con.execute("PRAGMA litestream_time = 'latest'")
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(2,)]
