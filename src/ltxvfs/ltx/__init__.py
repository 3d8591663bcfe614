"""The LTX file format (version 3, as written by Litestream 0.5.x): decode, verify, encode.

Layout::

    [header 100 B][page frame]*[6 zero bytes][page index][index length u64][trailer 16 B]

Page frames come in two encodings, chosen per page by the frame's flag bit:

* flag 0x0001 ("block", Litestream >= 0.5.16): pgno u32, flags u16, size u32, LZ4 block.
* flag 0x0000 ("frame", Litestream <= 0.5.15): pgno u32, flags u16, one LZ4 frame.

We write the block encoding only. The file checksum is CRC-64/GO-ISO over the header, every
page header (with the size field) and the *decompressed* page, the end marker, the index and the
post-apply checksum. Every malformed input raises a subclass of :class:`~ltxvfs.errors.LTXError`.

``format`` holds the pieces (header, index, frames); ``stream`` reads and writes whole files.
"""

from .format import (
    CHECKSUM_FLAG,
    ESTIMATED_INDEX_TAIL,
    HEADER_FLAG_NO_CHECKSUM,
    HEADER_SIZE,
    MAGIC,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    PAGE_FLAG_SIZE,
    PAGE_HEADER_SIZE,
    PENDING_BYTE,
    TRAILER_SIZE,
    Header,
    PageIndex,
    Trailer,
    block_payload,
    crc64,
    decode_page_frame,
    encode_page_frame,
    encode_page_index,
    is_valid_page_size,
    lock_pgno,
    page_index_start,
    parse_page_index,
)
from .stream import Decoder, Encoder, LTXFile, decode_file, encode_file, read_header

__all__ = [
    "CHECKSUM_FLAG", "ESTIMATED_INDEX_TAIL", "HEADER_FLAG_NO_CHECKSUM", "HEADER_SIZE", "MAGIC",
    "MAX_PAGE_SIZE", "MIN_PAGE_SIZE", "PAGE_FLAG_SIZE", "PAGE_HEADER_SIZE", "PENDING_BYTE",
    "TRAILER_SIZE", "Decoder", "Encoder", "Header", "LTXFile", "PageIndex", "Trailer", "crc64",
    "block_payload", "decode_file", "decode_page_frame", "encode_file", "encode_page_frame",
    "encode_page_index",
    "is_valid_page_size", "lock_pgno", "page_index_start", "parse_page_index", "read_header",
]
