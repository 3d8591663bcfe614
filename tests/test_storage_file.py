"""The file:// replica client: Litestream's layout, atomic and exclusive writes, mtimes."""

from __future__ import annotations

import io
import os
import stat
import threading
from datetime import UTC, datetime

import pytest

from ltxvfs.errors import (
    BucketNotFoundError,
    ObjectExistsError,
    ObjectNotFoundError,
    ReplicaURLError,
    StorageError,
)
from ltxvfs.storage import FileInfo, FileReplicaClient, open_replica

TS = 1_700_000_000_123  # 2023-11-14T22:13:20.123Z
TS_DT = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)


@pytest.fixture
def client(file_url) -> FileReplicaClient:
    c = open_replica(file_url)
    assert isinstance(c, FileReplicaClient)
    return c


def all_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_matches_litestream_file_backend(client):
    client.write(0, 1, 1, b"a", TS)
    client.write(9, 1, 0x10, b"snap", TS)
    client.write(1, 2, 0xab, b"c", TS)
    assert all_files(client.root) == [
        "ltx/0/0000000000000001-0000000000000001.ltx",
        "ltx/1/0000000000000002-00000000000000ab.ltx",
        "ltx/9/0000000000000001-0000000000000010.ltx",  # decimal level dir, not 0009
    ]
    mode = stat.S_IMODE(client.path(0, 1, 1).stat().st_mode)
    assert mode == 0o644


def test_write_returns_info_and_sets_mtime(client):
    info = client.write(0, 5, 7, b"hello world", TS)
    assert info == FileInfo(0, 5, 7, 11, TS_DT)
    st = client.path(0, 5, 7).stat()
    assert st.st_mtime_ns == TS * 1_000_000
    assert client.list_files(0) == [info]
    assert client.list_files(0, use_metadata=True) == [info]


def test_list_sorted_seek_and_junk_skipped(client):
    for lo, hi in [(7, 9), (1, 1), (2, 6), (10, 10)]:
        client.write(0, lo, hi, b"x" * lo, TS + lo)
    level_dir = client.level_dir(0)
    (level_dir / "notes.txt").write_text("junk")
    (level_dir / "0000000000000003-0000000000000003.ltx.tmp").write_text("partial")
    (level_dir / "0000000000000002-0000000000000001.ltx").write_text("max < min")
    (level_dir / "000000000000000c-000000000000000c.ltx").mkdir()
    files = client.list_files(0)
    assert [(f.min_txid, f.max_txid) for f in files] == [(1, 1), (2, 6), (7, 9), (10, 10)]
    assert [f.size for f in files] == [1, 2, 7, 10]
    assert files[2].created_at == datetime.fromtimestamp((TS + 7) / 1000, UTC)
    assert [f.min_txid for f in client.list_files(0, seek=7)] == [7, 10]
    assert client.list_files(0, seek=11) == []


def test_missing_directories_list_empty(tmp_path):
    client = FileReplicaClient(tmp_path / "does" / "not" / "exist")
    assert client.list_files(0) == []
    assert client.list_files(9) == []


def test_read_ranges(client):
    data = bytes(range(256)) * 4
    client.write(0, 1, 1, data, TS)
    assert client.read(0, 1, 1) == data
    assert client.read(0, 1, 1, 100) == data[100:]
    assert client.read(0, 1, 1, 10, 20) == data[10:30]
    assert client.read(0, 1, 1, 1000, 100) == data[1000:]  # short read at EOF
    assert client.read(0, 1, 1, 5000, 10) == b""
    assert client.read(0, 1, 1, 3, 0) == b""
    with pytest.raises(ValueError, match="invalid range: offset=-1"):
        client.read(0, 1, 1, -1)


def test_read_missing_file(client):
    with pytest.raises(ObjectNotFoundError, match="0000000000000002-0000000000000002.ltx"):
        client.read(0, 2, 2)


def test_write_from_file_object(client, tmp_path):
    src = tmp_path / "src.ltx"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    with open(src, "rb") as f:
        info = client.write(9, 1, 3, f, TS)
    assert info.size == len(payload)
    assert client.read(9, 1, 3) == payload
    info = client.write(0, 4, 4, io.BytesIO(b"abc"), TS)
    assert client.read(0, 4, 4) == b"abc" and info.size == 3


def test_overwrite_and_exclusive(client):
    client.write(0, 1, 1, b"first", TS)
    client.write(0, 1, 1, b"second", TS + 1)  # non-exclusive replaces
    assert client.read(0, 1, 1) == b"second"
    with pytest.raises(ObjectExistsError, match="0000000000000001-0000000000000001.ltx"):
        client.write(0, 1, 1, b"third", TS + 2, exclusive=True)
    assert client.read(0, 1, 1) == b"second"
    assert client.path(0, 1, 1).stat().st_mtime_ns == (TS + 1) * 1_000_000
    client.write(0, 2, 2, b"new", TS, exclusive=True)
    assert client.read(0, 2, 2) == b"new"
    assert all_files(client.root) == ["ltx/0/0000000000000001-0000000000000001.ltx",
                                      "ltx/0/0000000000000002-0000000000000002.ltx"]


@pytest.mark.parametrize("txid", range(1, 6))  # a few rounds: a racy version loses one of them
def test_exclusive_write_race_has_one_winner(client, txid):
    n = 16
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def writer(i: int) -> None:
        body = f"writer-{i:02d}".encode() * 5000
        barrier.wait()
        try:
            client.write(0, txid, txid, body, TS + i, exclusive=True)
            results[i] = "won"
        except ObjectExistsError as exc:
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r == "won"]
    assert len(winners) == 1
    assert all(isinstance(r, ObjectExistsError) for i, r in enumerate(results) if i != winners[0])
    w = winners[0]
    assert client.read(0, txid, txid) == f"writer-{w:02d}".encode() * 5000
    assert client.path(0, txid, txid).stat().st_mtime_ns == (TS + w) * 1_000_000
    assert all_files(client.root) == [f"ltx/0/{txid:016x}-{txid:016x}.ltx"]


def test_delete_ignores_missing(client):
    a = client.write(0, 1, 1, b"a", TS)
    b = client.write(0, 2, 2, b"b", TS)
    client.delete([a, FileInfo(0, 3, 3, 0, TS_DT)])
    assert client.list_files(0) == [b]
    client.delete([a, b])
    assert client.list_files(0) == []


def test_check(tmp_path):
    FileReplicaClient(tmp_path).check()
    with pytest.raises(BucketNotFoundError, match="missing"):
        FileReplicaClient(tmp_path / "missing").check()
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        FileReplicaClient(tmp_path / "f").check()


def test_write_into_non_directory_fails_cleanly(tmp_path):
    (tmp_path / "root").write_text("not a directory")
    client = FileReplicaClient(tmp_path / "root")
    with pytest.raises(StorageError, match="write"):
        client.write(0, 1, 1, b"x", TS)


def test_invalid_keys_and_roots_refused(client):
    with pytest.raises(ValueError, match=r"invalid LTX level 10 \(0..9\)"):
        client.write(10, 1, 1, b"x", TS)
    with pytest.raises(ValueError, match="invalid TXID range 0-1"):
        client.read(0, 0, 1)
    with pytest.raises(ValueError, match=r"invalid LTX level -1 \(0..9\)"):
        client.list_files(-1)
    with pytest.raises(ReplicaURLError, match="file replica root must be an absolute path: 'relative/dir'"):
        FileReplicaClient("relative/dir")
