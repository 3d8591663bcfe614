"""The hand-laid table b-tree of bench/largegen.py: which page is what, and its bytes.

One table ``t(id INTEGER PRIMARY KEY, v BLOB)`` over pages 1..N (4 KiB): page 1 = the database
header + the ``sqlite_schema`` leaf; page 2 = the root; then the interior pages (0x05), upper
levels first; then one leaf (0x0D) per row in rowid order. The lock page is used by nothing.
Row ``r``'s ``v`` is ``BLOB_LEN`` bytes: :func:`row_prefix` then zeros.
"""

from __future__ import annotations

import struct

from ltxvfs.ltx import lock_pgno

PAGE_SIZE = 4096
FANOUT = 400  # children per interior page at most (4 + 4 + 2 bytes per cell: 408 fit)
BLOB_LEN = 3000
TABLE_SQL = "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)"
SQLITE_VERSION = 3_045_000

# --------------------------------------------------------------------------------------------
# The b-tree's shape
# --------------------------------------------------------------------------------------------


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class Layout:
    """Which page is what. ``levels[0]`` = leaves, ``levels[-1]`` = 1 (the root, page 2)."""

    def __init__(self, pages: int, page_size: int = PAGE_SIZE) -> None:
        if page_size != PAGE_SIZE:
            raise ValueError("only 4096-byte pages are laid out")
        if pages < 4:
            raise ValueError("need at least 4 pages (schema, root, two leaves)")
        self.pages = pages
        self.page_size = page_size
        self.lock = lock_pgno(page_size)
        used = pages - 1 - (1 if pages >= self.lock else 0)  # all but page 1 and the lock page
        self.levels = self._solve(used)
        self.rows = self.levels[0]
        self.interior = sum(self.levels[1:])
        # slot of the first node of each level: root first, leaves last
        self.base = [0] * len(self.levels)
        b = 0
        for h in range(len(self.levels) - 1, -1, -1):
            self.base[h] = b
            b += self.levels[h]
        assert b == used

    @staticmethod
    def _chain(leaves: int, n1: int | None = None) -> list[int]:
        levels = [leaves]
        n = n1 if n1 is not None else _ceil(leaves, FANOUT)
        levels.append(n)
        while n > 1:
            n = _ceil(n, FANOUT)
            levels.append(n)
        return levels

    @classmethod
    def _solve(cls, used: int) -> list[int]:
        """Leaves + interior pages = ``used`` exactly; extra interior pages at level 1 absorb
        the rounding (each interior page keeps >= 2 children)."""
        top = min(used - 1, used - used // (FANOUT + 1) + 5)
        for leaves in range(top, max(1, top - 10_000), -1):
            chain = cls._chain(leaves)
            slack = used - sum(chain)
            if slack < 0:
                continue
            if slack == 0:
                return chain
            for n1 in range(chain[1] + 1, min(chain[1] + slack, leaves // 2) + 1):
                chain = cls._chain(leaves, n1)  # more level-1 pages (and maybe a new root)
                if sum(chain) == used:
                    return chain
        raise ValueError(f"cannot lay out {used} pages")

    def pgno(self, slot: int) -> int:
        p = slot + 2
        return p + 1 if p >= self.lock else p

    def slot(self, pgno: int) -> int:
        if pgno == 1 or pgno == self.lock:
            raise ValueError(f"page {pgno} is not in the tree")
        return pgno - 2 - (1 if pgno > self.lock else 0)

    def leaf_pgno(self, rowid: int) -> int:
        if not 1 <= rowid <= self.rows:
            raise ValueError(f"rowid {rowid} out of range 1..{self.rows}")
        return self.pgno(self.base[0] + rowid - 1)

    def node(self, pgno: int) -> tuple[int, int]:
        """(level, index in level) of a tree page."""
        s = self.slot(pgno)
        for h in range(len(self.levels) - 1, -1, -1):
            if s < self.base[h] + self.levels[h]:
                return h, s - self.base[h]
        raise AssertionError(pgno)

    def children(self, h: int, j: int) -> range:
        n, m = self.levels[h - 1], self.levels[h]
        return range(j * n // m, (j + 1) * n // m)

    def last_leaf(self, h: int, j: int) -> int:
        while h > 0:
            j = self.children(h, j)[-1]
            h -= 1
        return j


# --------------------------------------------------------------------------------------------
# Page contents
# --------------------------------------------------------------------------------------------


def _varint(v: int) -> bytes:
    """SQLite's big-endian varint (<= 9 bytes; values here stay far below 2^56)."""
    if v < 0x80:
        return bytes((v,))
    out = [v & 0x7F]
    v >>= 7
    while v:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    return bytes(reversed(out))


def row_prefix(rowid: int, txid: int) -> bytes:
    """The first bytes of row ``rowid``'s blob as written by TXID ``txid``."""
    return b"r%d@%d;" % (rowid, txid)


_ZEROS = bytes(PAGE_SIZE)
_BLOB_TYPE = _varint(BLOB_LEN * 2 + 12)
_REC_HDR = _varint(2 + len(_BLOB_TYPE)) + b"\x00" + _BLOB_TYPE  # id (NULL: rowid alias), v
_PAYLOAD = _varint(len(_REC_HDR) + BLOB_LEN)


def leaf_page(rowid: int, txid: int) -> bytes:
    prefix = row_prefix(rowid, txid)
    cell_head = _PAYLOAD + _varint(rowid) + _REC_HDR
    cell_len = len(cell_head) + BLOB_LEN
    start = PAGE_SIZE - cell_len
    hdr = b"\x0d\x00\x00\x00\x01" + struct.pack(">H", start) + b"\x00" + struct.pack(">H", start)
    return b"".join((hdr, _ZEROS[:start - 10], cell_head, prefix,
                     _ZEROS[:BLOB_LEN - len(prefix)]))


def interior_page(layout: Layout, h: int, j: int) -> bytes:
    kids = layout.children(h, j)
    cells = []
    for c in kids[:-1]:
        key = layout.last_leaf(h - 1, c) + 1
        cells.append(struct.pack(">I", layout.pgno(layout.base[h - 1] + c)) + _varint(key))
    right = layout.pgno(layout.base[h - 1] + kids[-1])
    content = b"".join(cells)
    start = PAGE_SIZE - len(content)
    ptrs = bytearray()
    off = start
    for cell in cells:
        ptrs += struct.pack(">H", off)
        off += len(cell)
    hdr = (b"\x05\x00\x00" + struct.pack(">H", len(cells)) + struct.pack(">H", start) + b"\x00"
           + struct.pack(">I", right))
    gap = start - 12 - len(ptrs)
    if gap < 0:
        raise AssertionError(f"interior page ({h},{j}) overflows")
    return b"".join((hdr, ptrs, _ZEROS[:gap], content))


def schema_page(layout: Layout) -> bytes:
    sql = TABLE_SQL.encode()
    values = [b"table", b"t", b"t"]
    types = [_varint(len(v) * 2 + 13) for v in values] + [b"\x01", _varint(len(sql) * 2 + 13)]
    hdr_body = b"".join(types)
    rec_hdr = _varint(len(hdr_body) + 1) + hdr_body
    body = b"".join(values) + b"\x02" + sql  # rootpage 2 as a 1-byte integer
    payload = rec_hdr + body
    cell = _varint(len(payload)) + b"\x01" + payload
    start = PAGE_SIZE - len(cell)
    db = bytearray(100)
    db[0:16] = b"SQLite format 3\x00"
    db[16:18] = struct.pack(">H", PAGE_SIZE)
    db[18], db[19], db[20] = 1, 1, 0  # rollback journal (legacy) file format, no reserved bytes
    db[21], db[22], db[23] = 64, 32, 32
    struct.pack_into(">I", db, 24, 1)  # file change counter
    struct.pack_into(">I", db, 28, layout.pages)  # in-header database size (valid: 24 == 92)
    struct.pack_into(">I", db, 40, 1)  # schema cookie
    struct.pack_into(">I", db, 44, 4)  # schema format
    struct.pack_into(">I", db, 56, 1)  # UTF-8
    struct.pack_into(">I", db, 92, 1)  # version-valid-for
    struct.pack_into(">I", db, 96, SQLITE_VERSION)
    leaf = (b"\x0d\x00\x00\x00\x01" + struct.pack(">H", start) + b"\x00"
            + struct.pack(">H", start))
    return b"".join((bytes(db), leaf, _ZEROS[:start - 110], cell))


def page_bytes(layout: Layout, pgno: int, versions: dict[int, int] | None = None) -> bytes:
    """Page ``pgno`` with every row at TXID 1 except ``versions`` (rowid -> writing TXID)."""
    if pgno == 1:
        return schema_page(layout)
    h, j = layout.node(pgno)
    if h == 0:
        rowid = j + 1
        return leaf_page(rowid, (versions or {}).get(rowid, 1))
    return interior_page(layout, h, j)
