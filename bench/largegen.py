"""Synthetic large replicas: a valid SQLite database of N pages written directly as LTX files.

    python bench/largegen.py --size 4g --out /tmp/ltxvfs-bench/large      # 1,000,000 pages
    python bench/largegen.py --pages 3000 --out /tmp/x                     # any page count

Real ``litestream replicate`` needs ~100 s per GB of rows; a 40 GB database would take over an
hour and 40 GB of disk. Here the database is described, not written: one table
``t(id INTEGER PRIMARY KEY, v BLOB)`` laid out by hand as a table b-tree over pages 1..N
(4 KiB pages; the layout and page bytes are bench/largetree.py):

* page 1: the database header + the ``sqlite_schema`` leaf with the CREATE TABLE row;
* page 2: the root of ``t``; then the interior pages (0x05), upper levels first; then the leaf
  pages (0x0D), one row each, in rowid order (row ``r`` = leaf ``r``);
* SQLite's lock page (the page holding byte 1 GiB, pgno 262,145 at 4 KiB) is used by nothing
  and left out of every LTX file, as Litestream does;
* every row's ``v`` is a 3,000-byte blob: a distinct ASCII prefix ``r<rowid>@<txid>;`` (the TXID
  that last wrote the row) then zeros. Pages are mostly zeros, so a 10-million-page (40 GB)
  snapshot is ~0.8 GB of LTX: what grows is the page index (one entry per page).

Every page count is used exactly (``PRAGMA integrity_check`` passes): the tree's interior fan-out
absorbs the difference. History, as real Litestream 0.5 leaves it (file:// layout
``ltx/<level>/<min>-<max>.ltx``, 16-hex TXIDs, mtime = header timestamp):

* L9 ``1-1``: the snapshot (all pages, TXID 1);
* L0 ``2-2`` .. ``(H+1)-(H+1)``: H small transactions, each rewriting ``ROWS_PER_TXN`` rows
  (their leaf pages); TXID 2 always rewrites the first and the last row;
* L1 ``2-(H+1)``: the compaction of those L0 files (newest page wins);
* ``poll/ltx/0/(H+2)-(H+2).ltx``: one more L0 file kept aside, for the bench to append to a
  copy of the replica (a follower's poll).

So the latest state is snapshot + L1, and TXID ``t`` (2 <= t <= H+1) is snapshot + L0 2..t.
:func:`row_txid` says which TXID wrote a row as of a TXID; :func:`row_prefix` what it reads.

Files are written with ltxvfs's own LTX code (``ltxvfs.ltx``: header, frames, index, CRC); the
snapshot is encoded in chunks on all cores (multiprocessing) and the chunks' CRCs are joined with
a CRC-64 combine, so the file checksum is exactly what a sequential encoder writes: the real
``litestream restore`` accepts the result (tests/test_largegen.py). The generated replica is
cached: ``generate`` reuses a directory whose manifest matches the spec.
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    from ltxvfs.ltx import Encoder, Header, crc64, encode_page_frame
    from ltxvfs.ltx.format import END_OF_PAGES, PAGE_HEADER_SIZE, U64, _uvarint
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from ltxvfs.ltx import Encoder, Header, crc64, encode_page_frame
    from ltxvfs.ltx.format import END_OF_PAGES, PAGE_HEADER_SIZE, U64, _uvarint
sys.path.insert(0, str(Path(__file__).resolve().parent))
from largetree import (  # re-exported: the tests and large.py use them from here
    BLOB_LEN,
    FANOUT,
    PAGE_SIZE,
    TABLE_SQL,
    Layout,
    leaf_page,
    page_bytes,
    row_prefix,
)

__all__ = ["BLOB_LEN", "FANOUT", "PAGE_SIZE", "TABLE_SQL", "Layout", "Spec", "changes",
           "crc64_combine", "generate", "leaf_page", "page_bytes", "row_prefix", "row_txid",
           "spec_for", "txid_time_ms", "write_snapshot"]

#: Bump when the layout, the row contents or the file set change (invalidates cached datasets).
RECIPE = 1
SIZES = {"1g": 250_000, "4g": 1_000_000, "40g": 10_000_000}
EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the snapshot's header timestamp
STEP_MS = 60_000  # one minute between transactions


@dataclass(frozen=True)
class Spec:
    pages: int  # database size in pages (the commit), lock page included
    history: int = 20  # L0 files after the snapshot (TXIDs 2..history+1)
    rows_per_txn: int = 3
    seed: int = 1
    page_size: int = PAGE_SIZE

    @property
    def latest_txid(self) -> int:
        return self.history + 1

    @property
    def poll_txid(self) -> int:
        return self.history + 2


# --------------------------------------------------------------------------------------------
# History: which rows each transaction rewrites
# --------------------------------------------------------------------------------------------


def changes(spec: Spec, rows: int) -> dict[int, list[int]]:
    """TXID -> rowids it rewrites, for TXIDs 2 .. poll_txid (the last one is the poll file)."""
    rng = random.Random(spec.seed)
    out: dict[int, list[int]] = {}
    for txid in range(2, spec.poll_txid + 1):
        picked = {1, rows} if txid == 2 else set()
        while len(picked) < min(rows, spec.rows_per_txn):
            picked.add(rng.randint(1, rows))
        out[txid] = sorted(picked)
    return out


def row_txid(spec: Spec, rows: int, rowid: int, txid: int) -> int:
    """The TXID that last wrote ``rowid`` as of TXID ``txid`` (1 = the snapshot)."""
    best = 1
    for t, rs in changes(spec, rows).items():
        if t <= txid and rowid in rs:
            best = max(best, t)
    return best


# --------------------------------------------------------------------------------------------
# CRC-64/GO-ISO combine (zlib's crc32_combine, 64-bit): crc(A + B) from crc(A), crc(B), len(B)
# --------------------------------------------------------------------------------------------

_POLY_REFLECTED = 0xD800000000000000


def _gf2_times(mat: list[int], vec: int) -> int:
    s, i = 0, 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(64)]


def crc64_combine(crc1: int, crc2: int, len2: int) -> int:
    if len2 == 0:
        return crc1
    odd = [_POLY_REFLECTED] + [1 << (n - 1) for n in range(1, 64)]
    even = _gf2_square(odd)
    odd = _gf2_square(even)
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


# --------------------------------------------------------------------------------------------
# The snapshot, in parallel chunks
# --------------------------------------------------------------------------------------------


def _chunk_pgnos(layout: Layout, a: int, b: int) -> range | list[int]:
    if a <= layout.lock < b:
        return [p for p in range(a, b) if p != layout.lock]
    return range(a, b)


def _encode_frames(args: tuple) -> tuple[int, int, int, int]:
    """Worker: frames of pages [a, b) into ``part``; frame sizes into ``part.sizes``.
    Returns (chunk number, bytes written, CRC of the hashed stream from 0, pages)."""
    n, pages, a, b, part = args
    layout = Layout(pages)
    sizes = array.array("I")
    crc = 0
    written = 0
    lock = layout.lock
    leaf0 = layout.pgno(layout.base[0])  # first leaf page
    with open(part, "wb", buffering=1 << 20) as f:
        for pgno in _chunk_pgnos(layout, a, b):
            if pgno >= leaf0 and pgno != lock:
                data = leaf_page(layout.slot(pgno) - layout.base[0] + 1, 1)
            else:
                data = page_bytes(layout, pgno)
            frame = encode_page_frame(pgno, data)
            f.write(frame)
            sizes.append(len(frame))
            written += len(frame)
            crc = crc64(data, crc64(frame[:PAGE_HEADER_SIZE + 4], crc))
    with open(f"{part}.sizes", "wb") as f:
        sizes.tofile(f)
    return n, written, crc, len(sizes)


def _encode_index(args: tuple) -> tuple[int, int, int]:
    """Worker: the page-index varints of chunk [a, b) whose first frame is at ``base``."""
    n, pages, a, b, base, part = args
    layout = Layout(pages)
    sizes = array.array("I")
    with open(f"{part}.sizes", "rb") as f:
        sizes.frombytes(f.read())
    out = bytearray()
    off = base
    uv = _uvarint
    for pgno, size in zip(_chunk_pgnos(layout, a, b), sizes, strict=True):
        out += uv(pgno)
        out += uv(off)
        out += uv(size)
        off += size
    with open(f"{part}.index", "wb") as f:
        f.write(out)
    os.unlink(f"{part}.sizes")
    return n, len(out), crc64(out)


def write_snapshot(spec: Spec, path: Path, *, workers: int, progress) -> int:
    """The L9 snapshot 1-1 of all pages; returns its size. Parallel: ``workers`` processes."""
    header = Header(page_size=spec.page_size, commit=spec.pages, min_txid=1, max_txid=1,
                    timestamp=EPOCH_MS).pack()
    nchunks = max(1, min(64, spec.pages // 20_000)) * max(1, workers)
    step = -(-spec.pages // nchunks)
    bounds = [(i, min(spec.pages + 1, 1 + i * step), min(spec.pages + 1, 1 + (i + 1) * step))
              for i in range(nchunks)]
    bounds = [x for x in bounds if x[1] < x[2]]
    tmp = path.parent / f".{path.name}.parts"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts = {n: tmp / f"{n:05d}" for n, _, _ in bounds}
    frames: dict[int, tuple[int, int, int]] = {}
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers) as pool:
        done_pages = 0
        for n, written, crc, count in pool.imap_unordered(
                _encode_frames, [(n, spec.pages, a, b, parts[n]) for n, a, b in bounds]):
            frames[n] = (written, crc, count)
            done_pages += count
            progress(f"snapshot frames: {done_pages:,}/{spec.pages:,} pages "
                     f"({done_pages / max(1e-9, time.monotonic() - t0):,.0f}/s)")
        bases = {}
        off = len(header)
        for n, _, _ in bounds:
            bases[n] = off
            off += frames[n][0]
        index: dict[int, tuple[int, int]] = {}
        for n, length, crc in pool.imap_unordered(
                _encode_index, [(n, spec.pages, a, b, bases[n], parts[n]) for n, a, b in bounds]):
            index[n] = (length, crc)
        progress(f"snapshot index encoded ({time.monotonic() - t0:.1f}s)")
    crc = crc64(header)
    tmp_out = path.with_name(path.name + ".tmp")
    with open(tmp_out, "wb") as out:
        out.write(header)
        for n, _, _ in bounds:  # frames: the hashed stream is page header + size + page
            written, c, count = frames[n]
            crc = crc64_combine(crc, c, count * (PAGE_HEADER_SIZE + 4 + spec.page_size))
            _append(out, parts[n])
        out.write(END_OF_PAGES)
        crc = crc64(END_OF_PAGES, crc)
        total_index = 0
        for n, _, _ in bounds:
            length, c = index[n]
            crc = crc64_combine(crc, c, length)
            total_index += length
            _append(out, Path(f"{parts[n]}.index"))
        tail = b"\x00" + U64.pack(total_index + 1) + U64.pack(0)  # terminator, length, post
        crc = crc64(tail, crc)
        out.write(tail)
        out.write(U64.pack((1 << 63) | crc))
        size = out.tell()
    shutil.rmtree(tmp, ignore_errors=True)
    os.replace(tmp_out, path)
    os.utime(path, ns=(EPOCH_MS * 1_000_000, EPOCH_MS * 1_000_000))
    return size


def _append(out, part: Path) -> None:
    with open(part, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        out.flush()
        done = 0
        while done < size:
            n = os.copy_file_range(f.fileno(), out.fileno(), size - done) \
                if hasattr(os, "copy_file_range") else 0
            if n <= 0:
                out.write(f.read())
                break
            done += n
        out.seek(0, os.SEEK_END)
    part.unlink()


# --------------------------------------------------------------------------------------------
# Small files (L0, L1, the poll file) and the whole replica
# --------------------------------------------------------------------------------------------


def ltx_name(min_txid: int, max_txid: int) -> str:
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def _write_small(layout: Layout, path: Path, min_txid: int, max_txid: int, ts: int,
                 versions: dict[int, int]) -> int:
    pgnos = sorted({layout.leaf_pgno(r) for r in versions})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        enc = Encoder(f, Header(page_size=layout.page_size, commit=layout.pages,
                                min_txid=min_txid, max_txid=max_txid, timestamp=ts))
        for p in pgnos:
            enc.write_page(p, page_bytes(layout, p, versions))
        enc.close()
        size = enc.size
    os.replace(tmp, path)
    os.utime(path, ns=(ts * 1_000_000, ts * 1_000_000))
    return size


def txid_time_ms(txid: int) -> int:
    return EPOCH_MS + (txid - 1) * STEP_MS


def generate(spec: Spec, out: Path, *, workers: int | None = None, progress=print,
             rebuild: bool = False) -> dict:
    """Write (or reuse) the replica for ``spec`` under ``out``; returns the manifest:
    ``replica`` (a file:// replica directory), ``poll_file`` (the extra L0 file), ``files``
    (level, min, max, size, timestamp), ``layout`` and ``changes``."""
    workers = workers or os.cpu_count() or 1
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not rebuild:
        m = json.loads(manifest_path.read_text())
        if (m.get("recipe") == RECIPE and m.get("spec") == asdict(spec)
                and all((out / f["path"]).exists() and (out / f["path"]).stat().st_size == f["size"]
                        for f in m["files"] + [m["poll"]])):
            progress(f"reusing {out} ({spec.pages:,} pages)")
            return m
    shutil.rmtree(out, ignore_errors=True)
    (out / "replica" / "ltx").mkdir(parents=True)
    t0 = time.monotonic()
    layout = Layout(spec.pages)
    ch = changes(spec, layout.rows)
    files = []

    def add(level: int, lo: int, hi: int, size: int, ts: int, path: Path) -> None:
        files.append({"level": level, "min": lo, "max": hi, "size": size, "timestamp": ts,
                      "path": str(path.relative_to(out))})

    d9 = out / "replica" / "ltx" / "9"
    d9.mkdir()
    snap = d9 / ltx_name(1, 1)
    size = write_snapshot(spec, snap, workers=workers, progress=progress)
    add(9, 1, 1, size, EPOCH_MS, snap)
    d0, d1 = out / "replica" / "ltx" / "0", out / "replica" / "ltx" / "1"
    d0.mkdir()
    d1.mkdir()
    merged: dict[int, int] = {}
    for txid in range(2, spec.latest_txid + 1):
        versions = dict.fromkeys(ch[txid], txid)
        p = d0 / ltx_name(txid, txid)
        add(0, txid, txid, _write_small(layout, p, txid, txid, txid_time_ms(txid), versions),
            txid_time_ms(txid), p)
        merged.update(versions)
    p = d1 / ltx_name(2, spec.latest_txid)
    ts = txid_time_ms(spec.latest_txid)
    add(1, 2, spec.latest_txid, _write_small(layout, p, 2, spec.latest_txid, ts, merged), ts, p)
    pd = out / "poll" / "ltx" / "0"
    pd.mkdir(parents=True)
    pt = spec.poll_txid
    pp = pd / ltx_name(pt, pt)
    poll = {"level": 0, "min": pt, "max": pt, "timestamp": txid_time_ms(pt),
            "size": _write_small(layout, pp, pt, pt, txid_time_ms(pt), dict.fromkeys(ch[pt], pt)),
            "path": str(pp.relative_to(out))}
    m = {"recipe": RECIPE, "spec": asdict(spec), "replica": str(out / "replica"),
         "files": files, "poll": poll, "page_size": spec.page_size, "pages": spec.pages,
         "rows": layout.rows, "max_id": layout.rows, "levels": layout.levels,
         "lock_pgno": layout.lock, "latest_txid": spec.latest_txid,
         "changes": {str(k): v for k, v in ch.items()},
         "ltx_bytes": sum(f["size"] for f in files),
         "build_seconds": round(time.monotonic() - t0, 1), "workers": workers}
    manifest_path.write_text(json.dumps(m, indent=1))
    progress(f"generated {spec.pages:,} pages ({spec.pages * spec.page_size / 1e9:.1f} GB "
             f"logical) as {m['ltx_bytes'] / 1e6:.1f} MB of LTX in {m['build_seconds']}s")
    return m


def spec_for(size: str) -> Spec:
    if size in SIZES:
        return Spec(pages=SIZES[size])
    return Spec(pages=int(size))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", choices=sorted(SIZES), help="1g, 4g or 40g")
    g.add_argument("--pages", type=int, help="any page count (>= 4)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)
    spec = spec_for(args.size) if args.size else Spec(pages=args.pages)
    m = generate(spec, args.out, workers=args.workers, rebuild=args.rebuild,
                 progress=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True))
    print(json.dumps({k: m[k] for k in ("replica", "pages", "rows", "levels", "ltx_bytes",
                                        "build_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
