"""The LTX codec: round trips, the spec's worked example, legacy encoding A, and bad input."""

from __future__ import annotations

import io
import random
import struct

import lz4.block
import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltxvfs import ltx
from ltxvfs.errors import (
    ChecksumMismatchError,
    InvalidHeaderError,
    InvalidMagicError,
    LTXError,
    MalformedIndexError,
    PageFrameError,
    PageOrderError,
    TruncatedError,
)

PAGE_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


def header(page_size=4096, commit=2, min_txid=1, max_txid=1, ts=1700000000000, **kw):
    return ltx.Header(page_size=page_size, commit=commit, min_txid=min_txid, max_txid=max_txid,
                      timestamp=ts, **kw)


def page(page_size, seed):
    """A page with some structure (compressible) and some noise."""
    rnd = random.Random(seed * 7919 + page_size).randbytes(page_size // 8)
    return (bytes([seed % 256]) * (page_size - len(rnd)) + rnd)[:page_size]


def legacy_file(h: ltx.Header, pages, frame_pages=None) -> bytes:
    """An LTX file built independently of our encoder, as Litestream <= 0.5.15 wrote it:
    pages in encoding A (one LZ4 frame each, flags 0). ``frame_pages`` limits which pages use
    encoding A (the rest use B), to test files that mix both."""
    out = bytearray(h.pack())
    crc = ltx.crc64(bytes(out))
    entries = []
    for pgno, data in pages:
        start = len(out)
        if frame_pages is None or pgno in frame_pages:
            ph = struct.pack(">IH", pgno, 0)
            body = lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX64KB,
                                      content_checksum=True)
            out += ph + body
            crc = ltx.crc64(data, ltx.crc64(ph, crc))
        else:
            comp = lz4.block.compress(data, store_size=False)
            ph = struct.pack(">IHI", pgno, 1, len(comp))
            out += ph + comp
            crc = ltx.crc64(data, ltx.crc64(ph, crc))
        entries.append((pgno, start, len(out) - start))
    tail = bytes(6) + ltx.encode_page_index(entries) + bytes(8)
    out += tail
    crc = ltx.crc64(tail, crc)
    out += struct.pack(">Q", ltx.CHECKSUM_FLAG | crc)
    return bytes(out)


def test_crc64_go_iso_check_value():
    assert ltx.crc64(b"123456789") == 0xB90956C775A41001
    assert ltx.crc64(b"56789", ltx.crc64(b"1234")) == 0xB90956C775A41001


def test_worked_example_from_spec():
    data = ltx.encode_file(header(), [(1, bytes(4096)), (2, b"\x02" * 4096)])
    assert len(data) == 210
    assert data[:4] == b"LTX1"
    assert data[100:106] == bytes.fromhex("000000010001")
    assert data[178:186] == bytes.fromhex("0164240288012400")
    assert data[186:194] == (8).to_bytes(8, "big")
    assert data[-8:] == bytes.fromhex("bb524ae601129075")
    f = ltx.decode_file(data)
    assert f.pages == {1: bytes(4096), 2: b"\x02" * 4096}
    assert f.index == {1: (100, 36), 2: (136, 36)}
    assert f.trailer.file_checksum == 0xBB524AE601129075


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_round_trip_every_page_size(page_size):
    pages = {n: page(page_size, n) for n in range(1, 6)}
    data = ltx.encode_file(header(page_size, commit=5), sorted(pages.items()))
    f = ltx.decode_file(data)
    assert f.header.page_size == page_size and f.pages == pages
    # Random access: the index from a tail locates frames that decode to the same pages.
    idx = ltx.parse_page_index(data[-ltx.ESTIMATED_INDEX_TAIL:], len(data))
    for pgno, (off, size) in idx.items():
        assert ltx.decode_page_frame(data[off:off + size], page_size, pgno) == pages[pgno]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.sampled_from([512, 1024, 4096]),
    snapshot=st.booleans(),
    commit=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
def test_round_trip_property(page_size, snapshot, commit, data):
    if snapshot:
        pgnos = list(range(1, commit + 1))
        h = header(page_size, commit=commit, min_txid=1, max_txid=data.draw(st.integers(1, 99)))
    else:
        pgnos = sorted(data.draw(st.sets(st.integers(1, commit), max_size=commit)))
        lo = data.draw(st.integers(2, 1 << 40))
        h = header(page_size, commit=commit, min_txid=lo, max_txid=lo + data.draw(st.integers(0, 9)))
    pages = [(p, data.draw(st.binary(min_size=page_size, max_size=page_size))
              if data.draw(st.booleans()) else bytes([p % 256]) * page_size) for p in pgnos]
    encoded = ltx.encode_file(h, pages)
    f = ltx.decode_file(encoded)
    assert f.header == h
    assert list(f.pages.items()) == pages


def test_encoder_streams_to_a_file_object(tmp_path):
    path = tmp_path / "x.ltx"
    with open(path, "wb") as fh:
        enc = ltx.Encoder(fh, header(commit=3))
        for n in (1, 2, 3):
            enc.write_page(n, page(4096, n))
        trailer = enc.close()
    assert path.stat().st_size == enc.size
    with open(path, "rb") as fh:
        dec = ltx.Decoder(fh)
        assert [p for p, _ in dec] == [1, 2, 3]
    assert dec.trailer == trailer


def test_encoding_a_frames_decode():
    pages = [(n, page(4096, n)) for n in range(1, 4)]
    data = legacy_file(header(commit=3), pages)
    f = ltx.decode_file(data)
    assert list(f.pages.items()) == pages
    idx = ltx.parse_page_index(data[-1000:], len(data))
    for pgno, (off, size) in idx.items():
        assert ltx.decode_page_frame(data[off:off + size], 4096) == dict(pages)[pgno]


def test_mixed_encodings_in_one_file():
    pages = [(n, page(1024, n)) for n in range(1, 7)]
    data = legacy_file(header(1024, commit=6), pages, frame_pages={2, 3, 6})
    assert list(ltx.decode_file(data).pages.items()) == pages


def test_legacy_file_checksum_is_verified():
    data = bytearray(legacy_file(header(commit=1), [(1, page(4096, 1))]))
    data[-1] ^= 1
    with pytest.raises(ChecksumMismatchError, match="file checksum mismatch: stored"):
        ltx.decode_file(bytes(data))


# --- header validation ----------------------------------------------------------------------


def test_wrong_magic():
    data = bytearray(ltx.encode_file(header(commit=1), [(1, bytes(4096))]))
    data[:4] = b"LTX2"
    with pytest.raises(InvalidMagicError, match="magic b'LTX2', expected b'LTX1'"):
        ltx.decode_file(bytes(data))
    with pytest.raises(InvalidMagicError, match="magic b'SQLi', expected b'LTX1'"):
        ltx.Header.unpack(b"SQLite format 3\x00" + bytes(84))


@pytest.mark.parametrize("field,value,message", [
    ("flags", 0x3, "invalid flags"),
    ("page_size", 1000, "invalid page size"),
    ("page_size", 256, "invalid page size"),
    ("page_size", 131072, "invalid page size"),
    ("min_txid", 0, "minimum transaction id"),
    ("max_txid", 0, "minimum transaction id"),
    ("wal_size", 5, "WAL size"),
    ("wal_salt1", 5, "WAL salts"),
])
def test_header_validation(field, value, message):
    raw = bytearray(header(commit=1, max_txid=3).pack())
    offsets = {"flags": (4, 4), "page_size": (8, 4), "min_txid": (16, 8), "max_txid": (24, 8),
               "wal_size": (56, 8), "wal_salt1": (64, 4)}
    off, size = offsets[field]
    raw[off:off + size] = value.to_bytes(size, "big")
    with pytest.raises(InvalidHeaderError, match=message):
        ltx.Header.unpack(bytes(raw))


def test_txids_out_of_order():
    with pytest.raises(InvalidHeaderError, match="out of order"):
        header(min_txid=5, max_txid=4).pack()


def test_pre_apply_checksum_rules():
    with pytest.raises(InvalidHeaderError, match="snapshots"):
        header(pre_apply_checksum=ltx.CHECKSUM_FLAG | 1).validate()
    with pytest.raises(InvalidHeaderError, match="not allowed"):
        header(min_txid=2, max_txid=2, pre_apply_checksum=ltx.CHECKSUM_FLAG | 1).validate()


def test_encoder_refuses_checksummed_or_empty_headers():
    with pytest.raises(InvalidHeaderError, match="NoChecksum files only"):
        ltx.Encoder(io.BytesIO(), header(flags=0, min_txid=2, max_txid=2,
                                         pre_apply_checksum=ltx.CHECKSUM_FLAG | 1))
    with pytest.raises(InvalidHeaderError, match="commit must be at least 1"):
        ltx.Encoder(io.BytesIO(), header(commit=0))


# --- page rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size,expected", [
    (512, 2097153), (1024, 1048577), (2048, 524289), (4096, 262145), (8192, 131073),
    (16384, 65537), (32768, 32769), (65536, 16385)])
def test_lock_page_numbers(page_size, expected):
    assert ltx.lock_pgno(page_size) == expected


def test_encoder_refuses_lock_page():
    lock = ltx.lock_pgno(65536)
    enc = ltx.Encoder(io.BytesIO(), header(65536, commit=lock + 1, min_txid=2, max_txid=2))
    with pytest.raises(PageOrderError, match="lock page"):
        enc.write_page(lock, bytes(65536))


@pytest.mark.slow
def test_snapshot_skips_the_lock_page():
    """A 1 GiB+ snapshot (64 KiB pages): pages run 1..commit with only the lock page absent."""
    size = 65536
    lock = ltx.lock_pgno(size)
    buf = io.BytesIO()
    enc = ltx.Encoder(buf, header(size, commit=lock + 1))
    zero = bytes(size)
    for pgno in range(1, lock + 2):
        if pgno != lock:
            enc.write_page(pgno, zero)
    enc.close()
    buf.seek(0)
    pgnos = [p for p, _ in ltx.Decoder(buf)]
    assert len(pgnos) == lock and lock not in pgnos and pgnos[-1] == lock + 1


def test_encoder_page_order_rules():
    enc = ltx.Encoder(io.BytesIO(), header(commit=5, min_txid=3, max_txid=3))
    enc.write_page(2, bytes(4096))
    with pytest.raises(PageOrderError, match="out-of-order"):
        enc.write_page(2, bytes(4096))
    with pytest.raises(PageOrderError, match="out-of-bounds"):
        enc.write_page(6, bytes(4096))
    with pytest.raises(PageFrameError, match="page 3 is 100 bytes, not 4096"):
        enc.write_page(3, bytes(100))
    snap = ltx.Encoder(io.BytesIO(), header(commit=3))
    with pytest.raises(PageOrderError, match="start with page number 1"):
        snap.write_page(2, bytes(4096))
    snap.write_page(1, bytes(4096))
    with pytest.raises(PageOrderError, match="nonsequential"):
        snap.write_page(3, bytes(4096))
    short = ltx.Encoder(io.BytesIO(), header(commit=3))
    short.write_page(1, bytes(4096))
    with pytest.raises(PageOrderError, match="commit"):
        short.close()


def _assemble(h, frames):
    """A file from raw (pgno, data) frames with no order checks, correct index and checksum."""
    out = bytearray(h.pack())
    crc = ltx.crc64(bytes(out))
    entries = []
    for pgno, data in frames:
        frame = ltx.encode_page_frame(pgno, data)
        entries.append((pgno, len(out), len(frame)))
        out += frame
        crc = ltx.crc64(data, ltx.crc64(frame[:10], crc))
    tail = bytes(6) + ltx.encode_page_index(entries) + bytes(8)
    crc = ltx.crc64(tail, crc)
    return bytes(out + tail + struct.pack(">Q", ltx.CHECKSUM_FLAG | crc))


def test_decoder_rejects_pages_out_of_order():
    data = _assemble(header(commit=5, min_txid=2, max_txid=2),
                     [(3, bytes(4096)), (2, bytes(4096))])
    with pytest.raises(PageOrderError, match="out-of-order"):
        ltx.decode_file(data)


def test_decoder_rejects_incomplete_snapshot():
    data = _assemble(header(commit=3), [(1, bytes(4096)), (3, bytes(4096))])
    with pytest.raises(PageOrderError, match="nonsequential"):
        ltx.decode_file(data)


# --- corruption -----------------------------------------------------------------------------


def _sample(page_size=4096, commit=4):
    return ltx.encode_file(header(page_size, commit=commit),
                           [(n, page(page_size, n)) for n in range(1, commit + 1)])


def test_checksum_mismatch_on_header_change():
    data = bytearray(_sample())
    data[33] ^= 0x10  # timestamp: still a valid header
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
        ltx.decode_file(bytes(data))


def test_checksum_mismatch_on_trailer_change():
    data = bytearray(_sample())
    data[-3] ^= 0x01
    with pytest.raises(ChecksumMismatchError, match="file checksum mismatch: stored"):
        ltx.decode_file(bytes(data))


def test_corrupt_payload_never_yields_wrong_pages():
    good = ltx.decode_file(_sample()).pages
    base = _sample()
    data = bytearray(base)
    f = ltx.decode_file(base)
    off, size = f.index[2]
    data[off + 20] ^= 0xFF
    try:
        pages = ltx.decode_file(bytes(data)).pages
    except (ChecksumMismatchError, PageFrameError):
        return
    assert pages == f.pages and pages == good  # unreachable unless the flip was harmless


def test_bad_page_flags():
    data = bytearray(_sample())
    data[105] = 0x04
    with pytest.raises(PageFrameError, match="flags"):
        ltx.decode_file(bytes(data))
    with pytest.raises(PageFrameError, match="flags"):
        ltx.decode_page_frame(bytes(data[100:200]), 4096)


def test_frame_for_another_page_is_refused():
    data = _sample()
    off, size = ltx.decode_file(data).index[1]
    with pytest.raises(PageFrameError, match="expected page 2"):
        ltx.decode_page_frame(data[off:off + size], 4096, expected_pgno=2)


def test_malformed_index_detected():
    data = bytearray(_sample())
    f = ltx.decode_file(bytes(data))
    start = ltx.page_index_start(bytes(data), len(data))
    data[start + 1] ^= 0x05  # offset of page 1 in the index
    with pytest.raises(MalformedIndexError, match="frame of page 1 at .* is outside the page data"):
        ltx.decode_file(bytes(data))
    assert f.index[1][0] == 100


def test_index_length_out_of_range():
    data = bytearray(_sample())
    data[-24:-16] = (10**9).to_bytes(8, "big")
    with pytest.raises(MalformedIndexError, match="page index length 1000000000 does not fit"):
        ltx.parse_page_index(bytes(data[-4096:]), len(data))


def test_tail_too_short_for_index():
    data = _sample(commit=40)
    with pytest.raises(TruncatedError, match="before the fetched tail"):
        ltx.parse_page_index(data[-30:], len(data))
    start = ltx.page_index_start(data[-24:], len(data))
    assert ltx.parse_page_index(data[start:], len(data)) == ltx.decode_file(data).index


def test_file_too_short():
    with pytest.raises(TruncatedError, match="too short"):
        ltx.page_index_start(bytes(40), 40)


@pytest.mark.parametrize("cut", [0, 3, 50, 99, 100, 103, 108, 150, -30, -17, -1])
def test_truncation_is_reported(cut):
    data = _sample()
    with pytest.raises(LTXError) as info:
        ltx.decode_file(data[:cut] if cut >= 0 else data[:len(data) + cut])
    assert isinstance(info.value, (TruncatedError, MalformedIndexError, InvalidMagicError))
    if 0 < cut <= 150 and cut >= 4:
        assert isinstance(info.value, TruncatedError)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_raise_only_ltx_errors(data):
    """Any single mutation of a valid file decodes to the same pages or raises an LTXError."""
    base = _sample(1024, commit=3)
    good = ltx.decode_file(base).pages
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf)))]
    try:
        f = ltx.decode_file(bytes(buf))
    except LTXError:
        return
    assert f.pages == good


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: e.__setitem__(2, (2, e[2][1], e[2][2])), "pgno 2 after 2"),  # repeated
    (lambda e: e.__setitem__(1, (5, e[1][1], e[1][2])), "pgno 3 after 5"),  # out of order
    (lambda e: e.__setitem__(0, (0, e[0][1], e[0][2])), "pgno 0 after 0"),  # page 0
    (lambda e: e.__setitem__(1, (2, 99, e[1][2])), "page 2 at 99+"),  # inside the header
    (lambda e: e.__setitem__(2, (3, e[2][1], 6)), "page 3 at .*\\+6 "),  # no payload
    (lambda e: e.__setitem__(3, (4, e[3][1], 10**6)), "page 4 at .*\\+1000000 "),  # too big
    (lambda e: e.__setitem__(3, (4, e[3][1] + 900, e[3][2])), "page 4 at "),  # past the frames
])
def test_each_index_rule_names_the_bad_entry(change, message):
    """Every entry of a page index is checked (pgno order, frame inside the page data, size
    bounds), and the error names the first bad one."""
    data = _sample()
    entries = [(p, o, s) for p, (o, s) in sorted(ltx.decode_file(data).index.items())]
    start = ltx.page_index_start(data, len(data))
    assert ltx.parse_page_index(data[start:], len(data)) == {p: (o, s) for p, o, s in entries}
    change(entries)
    bad = data[:start] + ltx.encode_page_index(entries) + data[-ltx.TRAILER_SIZE:]
    with pytest.raises(MalformedIndexError, match=message):
        ltx.parse_page_index(bad[start:], len(bad))
