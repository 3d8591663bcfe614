"""Adversarial review of the host cache directory (host/frames.py) and its neighbours."""
from __future__ import annotations

import os
from pathlib import Path

from test_host_cache import ROWS, expected, in_process, vfs  # noqa: F401  (vfs: fixture)

from ltxvfs.storage import open_replica

from replicas import FakePrimary


def build(url: str, tmp: Path, tag: str) -> FakePrimary:
    """test_host_cache.build with pads of zeros: two tags of one length give files of one size."""
    with open_replica(url) as client:
        p = FakePrimary(tmp / f"primary-{tag}.db", client)
        p.commit("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)",
                 f"INSERT INTO t SELECT value, '{tag}' || value, zeroblob(300) "
                 f"FROM generate_series(1, {ROWS})")
        p.commit(f"UPDATE t SET v = '{tag}x' || id WHERE id % 97 = 0")
    return p


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*.ltx")}


def test_a_file_replica_rewritten_in_place_with_the_same_inode_size_and_mtime(tmp_path, vfs):  # noqa: F811
    """`cp -p backup/… replica/…` (or rsync --inplace -t) over the same names: each LTX file is
    truncated and rewritten in place (same inode), with the same size and its mtime set back.
    The cache filled from the old bytes must not serve them for the new ones."""
    root, other = tmp_path / "replica", tmp_path / "other"
    url = root.as_uri()
    cache = str(tmp_path / "cache")
    old = build(url, tmp_path, "qqq")
    new = build(other.as_uri(), tmp_path, "zzz")
    rows, st = in_process(url, cache, vfs)
    assert rows == expected(old) and st["disk_bytes_written"] > 0
    a, b = _files(root), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k].stat().st_size == b[k].stat().st_size for k in a)  # the premise: same sizes
    for k, path in a.items():
        st0 = path.stat()
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(b[k].read_bytes())
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (st0.st_ino, st0.st_mtime_ns)
    assert in_process(url, None, vfs)[0] == expected(new) != expected(old)  # without the cache
    rows, st = in_process(url, cache, vfs)
    assert rows == expected(new)


def test_a_follower_reading_a_file_replica_rewritten_in_place(tmp_path, vfs):  # noqa: F811
    """The same in-place rewrite under a follower that stays open (no cache_dir): its next read
    transaction must read the new history, never the old index over the new bytes."""
    import apsw
    from test_host_cache import connect, look

    root, other = tmp_path / "replica", tmp_path / "other"
    old = build(root.as_uri(), tmp_path, "qqq")
    new = build(other.as_uri(), tmp_path, "zzz")
    con = connect(root.as_uri(), None, extra="&max_lag=0")
    assert look(con) == expected(old)
    a, b = _files(root), _files(other)
    for k, path in a.items():
        st0 = path.stat()
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(b[k].read_bytes())
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    try:
        assert look(con) == expected(new)
    except apsw.BusyError:  # the history changed under it: the next transaction reads it
        assert look(con) == expected(new)
    con.close()
