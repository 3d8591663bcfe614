"""The compact page index: where the newest frame of each page lives, in flat arrays.

Two pieces:

* :class:`FilePages` — one LTX file's page index (pgno -> offset, size). Frames are written one
  after the other, so offsets are running sums of sizes: a file keeps ``n + 1`` frame boundaries
  (4 bytes each below 4 GiB, else 8) and no sizes. A snapshot holds every page in order (except
  SQLite's lock page, which LTX skips), so its page numbers are implicit too: the first page and
  the one skipped. A sparse file (an L0 or L1 file) keeps its page numbers (4 bytes each).
* :class:`StateIndex` — the index of one database state, persistent: an immutable stack of
  layers (the snapshot's :class:`FilePages`, newer files, small dicts for small files), each
  with a cut (pages above it are hidden: the database shrank since the layer was added). A new
  state shares every layer of the old one and adds its own: applying a one-page L0 file costs
  that page, not a copy of the database's index. Small layers merge geometrically (few layers,
  amortised O(log) per page); when overlays hold more than 1/16 of the base's pages, everything
  is compacted into one dense layer (per page: file number, offset, size).

Decoding an index (varints) is bulk: with numpy (optional, the ``large`` extra) for large indexes,
vectorised in chunks of 128 KiB; in pure Python otherwise. Both check exactly what
:func:`ltxvfs.ltx.parse_page_index` checks; on anything odd the numpy path hands over to the pure
one, so a malformed index raises the same error with the same message either way.

Modules: ``files.py`` (FilePages), ``decode.py`` (index bytes -> FilePages; the numpy switch),
``state.py`` (layers, StateIndex, compaction).
"""

from .decode import NUMPY_MIN_BYTES, NUMPY_PREFETCH_FILE, parse_file_pages, prefetch_numpy
from .files import FilePages
from .state import PageRef, StateIndex

__all__ = ["NUMPY_MIN_BYTES", "NUMPY_PREFETCH_FILE", "FilePages", "PageRef", "StateIndex",
           "parse_file_pages", "prefetch_numpy"]
