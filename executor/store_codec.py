"""The bytes of a store entry: headers, the compression rule, and verification.

``hitz.executor.store`` decides where entries live and when they are read or
written; this module says what their files contain and checks them. Every
file starts with an 8-byte header, readable with ``head -c8``:

- ``HZB1raw\\n`` + the blob itself;
- ``HZB1zst\\n`` + the blob as one zstd frame (the form REAPI sends as
  ``compressed-blobs/zstd``, so it can go on the wire as it is);
- ``HZA1sha\\n`` + SHA-256 of the payload (32 bytes) + the payload: an
  action cache entry, whose key (the action digest) says nothing about its
  content and so carries its own checksum.

A decoder never trusts a file: a blob decodes only if its bytes hash to the
digest it is stored under, an AC entry only if its payload matches its
checksum. Anything else, a zstd error included, reads as corrupt.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import IO

import zstandard

__all__ = [
    "CHUNK_SIZE",
    "HEADER_LEN",
    "MAX_COMPRESSED_FRACTION",
    "MIN_COMPRESS_SIZE",
    "ZSTD_LEVEL",
    "Corrupt",
    "StreamEncoder",
    "decode_ac",
    "decode_blob",
    "encode_ac",
    "encode_blob",
    "verified_chunks",
]

CHUNK_SIZE = 1 << 20  # read/hash/compress unit: measured no slower than 4 MiB, half the memory
ZSTD_LEVEL = 1
# The rule for storing a blob compressed, measured in docs/cache.md: at least
# one filesystem block (below that compression saves no disk) and at most 90%
# of its size once compressed (below a 1.1 ratio every read would pay the
# decompression for less than a tenth of the space).
MIN_COMPRESS_SIZE = 4096
MAX_COMPRESSED_FRACTION = 0.9

RAW = b"HZB1raw\n"
ZSTD = b"HZB1zst\n"
AC = b"HZA1sha\n"
HEADER_LEN = 8
_AC_PREFIX_LEN = HEADER_LEN + 32

_local = threading.local()  # zstd contexts are not thread-safe: one per thread


class Corrupt(Exception):
    """The entry's bytes are not what its name promises (internal to the store)."""


def encode_blob(data: bytes, compress: bool) -> tuple[bytes, bytes]:
    """(header, payload) for the blob ``data``: zstd if the rule says it pays."""
    if compress and len(data) >= MIN_COMPRESS_SIZE:
        packed = _compressor().compress(data)
        if len(packed) <= len(data) * MAX_COMPRESSED_FRACTION:
            return ZSTD, packed
    return RAW, data


class StreamEncoder:
    """Encodes a blob that arrives chunk by chunk, deciding from its first chunk.

    The first chunk is compressed and flushed as a whole zstd block; if that
    does not pay by the rule of ``encode_blob``, the whole blob is stored raw.
    (zstd keeps incompressible blocks of a compressed blob raw by itself.)
    ``header`` and ``first`` are the bytes to write for the first chunk.
    """

    def __init__(self, first: memoryview, compress: bool) -> None:
        self._zstd: zstandard.ZstdCompressionObj | None = None
        self.header, self.first = RAW, bytes(first)
        if compress and len(first) >= MIN_COMPRESS_SIZE:
            zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
            out = zstd.compress(first) + zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            if len(out) <= len(first) * MAX_COMPRESSED_FRACTION:
                self._zstd, self.header, self.first = zstd, ZSTD, out

    def encode(self, chunk: memoryview) -> bytes | memoryview:
        return chunk if self._zstd is None else self._zstd.compress(chunk)

    def finish(self) -> bytes:
        return b"" if self._zstd is None else self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


def decode_blob(raw: bytes, hash_hex: str, size: int) -> bytes:
    """The blob in the entry file content ``raw``, if it hashes to (hash_hex, size).

    Raises ``Corrupt`` otherwise.
    """
    header, payload = raw[:HEADER_LEN], memoryview(raw)[HEADER_LEN:]
    if header == RAW:
        data = bytes(payload)
    elif header == ZSTD:
        try:
            # A frame claiming another size is corrupt; checking first also
            # keeps a corrupted size field from choosing the buffer size.
            if zstandard.frame_content_size(payload) not in (-1, size):
                raise Corrupt
            data = _decompressor().decompress(payload, max_output_size=size)
        except zstandard.ZstdError:
            raise Corrupt from None
    else:
        raise Corrupt
    if len(data) != size or hashlib.sha256(data).hexdigest() != hash_hex:
        raise Corrupt
    return data


def verified_chunks(f: IO[bytes], hash_hex: str, size: int) -> Iterator[bytes]:
    """The blob in the open entry file ``f``, in pieces of at most ``CHUNK_SIZE``.

    The last piece is yielded only once the whole blob hashed to
    (hash_hex, size); otherwise ``Corrupt`` is raised instead, as early as
    the blob is known to be longer than ``size``.
    """
    header = f.read(HEADER_LEN)
    if header == RAW:
        source = f
    elif header == ZSTD:
        source = zstandard.ZstdDecompressor().stream_reader(
            f, read_size=CHUNK_SIZE, closefd=False
        )
    else:
        raise Corrupt
    sha = hashlib.sha256()
    seen = 0
    held: bytes | None = None
    while True:
        try:
            chunk = source.read(CHUNK_SIZE)
        except zstandard.ZstdError:
            raise Corrupt from None
        if not chunk:
            break
        seen += len(chunk)
        if seen > size:
            raise Corrupt
        sha.update(chunk)
        if held is not None:
            yield held
        held = chunk
    if seen != size or sha.hexdigest() != hash_hex:
        raise Corrupt
    if held is not None:
        yield held


def encode_ac(data: bytes) -> tuple[bytes, bytes]:
    """(prefix, payload) of the AC entry file for ``data``."""
    return AC + hashlib.sha256(data).digest(), data


def decode_ac(raw: bytes) -> bytes:
    """The payload of the AC entry file content ``raw``; raises ``Corrupt``."""
    payload = raw[_AC_PREFIX_LEN:]
    if (
        len(raw) < _AC_PREFIX_LEN
        or raw[:HEADER_LEN] != AC
        or hashlib.sha256(payload).digest() != raw[HEADER_LEN:_AC_PREFIX_LEN]
    ):
        raise Corrupt
    return payload


def _compressor() -> zstandard.ZstdCompressor:
    compressor: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if compressor is None:
        compressor = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if decompressor is None:
        decompressor = _local.dctx = zstandard.ZstdDecompressor()
    return decompressor
