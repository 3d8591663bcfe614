"""One entry of the shared cache directory: a file holding a header and a value.

An entry is written to a private temp name and renamed into place, so a reader sees a whole
entry or none, and two processes writing the same entry at once leave one of their (equal)
values. The header carries what the entry is — the full key, replica included — and a checksum,
so a torn file (a crash between write and rename cannot leave one, but a truncated copy, a bad
disk or a hand can) or a foreign one (copied from another replica's directory, or left by another
version) is recognised, never served, and removed::

    magic "LTXVFSC\\0" | version u16 | key length u16 | value length u64 | crc64 (key + value) u64
    | key (UTF-8) | value

Files are 0600 whatever the umask. Errors are the caller's to handle (``OSError``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct

import fastcrc

MAGIC = b"LTXVFSC\0"
VERSION = 1
_HEAD = struct.Struct(">8sHHQQ")
HEAD_SIZE = _HEAD.size
#: Suffixes of files that are not entries: a write in progress, a fetch in progress elsewhere.
TMP_SUFFIX, CLAIM_SUFFIX = ".tmp", ".claim"
_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | \
    getattr(os, "O_CLOEXEC", 0)


def _crc(key: bytes, value: bytes | memoryview) -> int:
    return fastcrc.crc64.go_iso(bytes(value), initial=fastcrc.crc64.go_iso(key))


def entry_name(key: str) -> str:
    """The entry's path below the cache's directory: ``xx/<hash>`` (256 fan-out directories keep
    each directory small; the hash keeps names free of the replica's paths)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"{digest[:2]}/{digest[2:]}"


def encode(key: str, value: bytes | memoryview) -> bytes:
    k = key.encode()
    return _HEAD.pack(MAGIC, VERSION, len(k), len(value), _crc(k, value)) + k + bytes(value)


def decode(key: str, data: bytes) -> bytes | None:
    """The value of ``data`` if it is a whole entry of ``key``; None if torn or foreign."""
    if len(data) < HEAD_SIZE:
        return None
    magic, version, klen, vlen, crc = _HEAD.unpack_from(data)
    k = key.encode()
    if magic != MAGIC or version != VERSION or klen != len(k) or \
            len(data) != HEAD_SIZE + klen + vlen or data[HEAD_SIZE:HEAD_SIZE + klen] != k:
        return None
    value = data[HEAD_SIZE + klen:]
    return value if _crc(k, value) == crc else None


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file of this process + rename (0600)."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, _FLAGS, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read(path: str) -> bytes | None:
    """The file's bytes, or None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def claim(path: str) -> bool:
    """Create ``path`` (a claim file) if nobody has: True if this call created it."""
    try:
        os.close(os.open(path, _FLAGS, 0o600))
        return True
    except FileExistsError:
        return False
