"""The border of `hitz cache serve`: where the wire meets the store.

Three things cross it, each in one place:

- **Status codes.** Every servicer method runs inside ``rpc_border``, the one
  place where a hitz error becomes a gRPC status (STYLE 5); per-blob statuses
  of the batch calls come from the same table, ``code_of``:

  ==============================================  =====================
  ``RequestRejected``                             its reason's code (below)
  ``BlobMissing``, ``BlobCorrupt``                ``NOT_FOUND``
  ``CacheUnavailable``, reason ``disk-full``      ``RESOURCE_EXHAUSTED``
  ``CacheUnavailable``, any other reason          ``UNAVAILABLE``
  any other ``HitzError``                         ``INTERNAL``
  anything else (a bug; its traceback is logged)  ``INTERNAL``
  ==============================================  =====================

- **Digests.** ``digest_from_wire`` turns a REAPI ``Digest`` into the store's
  ``Digest`` (lowercase hex SHA-256 and a size), or rejects it.
- **Encodings.** ``zstd_compress`` and ``zstd_decompress`` turn blobs into and
  out of REAPI's ``ZSTD`` compressor; a client's bad zstd data is rejected
  here, its ``zstandard.ZstdError`` never leaves this module.

``RequestRejected`` belongs in ``hitz.executor.errors`` beside the rest of the
tree; it lives here, like the store's errors in ``store_errors``, until it
moves. It never leaves the server: ``rpc_border`` turns it into a status.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import IO, cast

import grpc
import zstandard
from google.rpc import status_pb2

from hitz.executor.errors import (
    BlobMissing,
    CacheErrorReason,
    CacheUnavailable,
    HitzError,
    Reason,
)
from hitz.executor.store import Digest
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

__all__ = [
    "RequestReason",
    "RequestRejected",
    "code_of",
    "digest_from_wire",
    "digest_to_wire",
    "require_sha256",
    "rpc_border",
    "status_of",
    "zstd_compress",
    "zstd_decompress",
    "zstd_stream_decoder",
    "zstd_stream_encoder",
    "zstd_write",
]

log = logging.getLogger(__name__)

ZSTD_LEVEL = 1  # as the store's (store_codec.ZSTD_LEVEL): fast, and what the measurements chose


class RequestReason(Reason):
    BAD_DIGEST = "bad-digest"  # not a lowercase hex SHA-256 and a size >= 0
    BAD_RESOURCE_NAME = "bad-resource-name"  # a ByteStream name of no known form
    UNSUPPORTED = "unsupported"  # a digest function or compressor this server lacks
    BAD_DATA = "bad-data"  # bytes that do not match their digest, bad zstd
    TOO_BIG = "too-big"  # a batch over max_batch_total_size_bytes
    BAD_OFFSET = "bad-offset"  # a ByteStream offset that does not follow on
    OUT_OF_RANGE = "out-of-range"  # a read_offset past the end of the blob
    BUSY = "busy"  # another Write of the same upload is in progress
    NO_RESULT = "no-result"  # the action cache has no (usable) result for an action
    NO_UPLOAD = "no-upload"  # QueryWriteStatus of an upload the server does not have


_CODES = {
    RequestReason.BAD_DIGEST: grpc.StatusCode.INVALID_ARGUMENT,
    RequestReason.BAD_RESOURCE_NAME: grpc.StatusCode.INVALID_ARGUMENT,
    RequestReason.UNSUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    RequestReason.BAD_DATA: grpc.StatusCode.INVALID_ARGUMENT,
    RequestReason.TOO_BIG: grpc.StatusCode.INVALID_ARGUMENT,
    RequestReason.BAD_OFFSET: grpc.StatusCode.INVALID_ARGUMENT,
    RequestReason.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    RequestReason.BUSY: grpc.StatusCode.ABORTED,
    RequestReason.NO_RESULT: grpc.StatusCode.NOT_FOUND,
    RequestReason.NO_UPLOAD: grpc.StatusCode.NOT_FOUND,
}


class RequestRejected(HitzError):
    """A request the server refuses; ``reason`` (a ``RequestReason``) picks the status."""

    def __init__(self, message: str, *, reason: RequestReason) -> None:
        super().__init__(message, reason=reason)


def code_of(exc: HitzError) -> grpc.StatusCode:
    """The gRPC status for ``exc``: the table in the module docstring."""
    if isinstance(exc, RequestRejected) and isinstance(exc.reason, RequestReason):
        return _CODES[exc.reason]
    if isinstance(exc, BlobMissing):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, CacheUnavailable):
        if exc.reason is CacheErrorReason.DISK_FULL:
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def status_of(exc: HitzError) -> status_pb2.Status:
    """``exc`` as a ``google.rpc.Status``, for the per-blob statuses of batch calls."""
    _log_unexpected(exc)
    return status_pb2.Status(code=code_of(exc).value[0], message=exc.message)


@contextlib.contextmanager
def rpc_border(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    """``with rpc_border(context, "Read"):`` ends the call with the status of an error.

    Wrap a servicer method's whole body (and, for a streaming method, the
    ``yield``s too) and nothing else: the status is set by ``context.abort``,
    whose own exception must pass through no second border.
    """
    try:
        yield
    except HitzError as exc:
        _log_unexpected(exc, method)
        context.abort(code_of(exc), exc.message)
    except Exception:
        log.exception("%s failed; this is a bug in hitz, please report it", method)
        context.abort(grpc.StatusCode.INTERNAL,
                      f"{method} failed: a bug in `hitz cache serve` (its log has the traceback)")


def _log_unexpected(exc: HitzError, method: str | None = None) -> None:
    """The server's operator must hear of a cache it cannot use; misses are routine."""
    if isinstance(exc, CacheUnavailable) or not isinstance(exc, (RequestRejected, BlobMissing)):
        where = f"{method}: " if method else ""
        log.warning("%s%s%s", where, exc.message, f" ({exc.detail})" if exc.detail else "")


# --- digests --------------------------------------------------------------------------


def digest_from_wire(digest: re_pb2.Digest) -> Digest:
    """The store's ``Digest`` for the REAPI ``digest``; ``RequestRejected`` if it is none."""
    try:
        return Digest(digest.hash, digest.size_bytes)
    except ValueError:
        raise RequestRejected(
            f"`{digest.hash}/{digest.size_bytes}` is not a digest: "
            "REAPI wants `HASH/SIZE`, a SHA-256 in 64 lowercase hex digits and a size >= 0",
            reason=RequestReason.BAD_DIGEST,
        ) from None


def digest_to_wire(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def require_sha256(digest_function: int) -> None:
    """Reject a request naming a digest function other than SHA-256.

    ``UNKNOWN`` (0, what REAPI before 2.3 sends) means the server's default.
    """
    if digest_function not in (re_pb2.DigestFunction.UNKNOWN, re_pb2.DigestFunction.SHA256):
        name = re_pb2.DigestFunction.Value.Name(digest_function) if digest_function in (
            re_pb2.DigestFunction.Value.values()) else str(digest_function)
        raise RequestRejected(
            f"digest function {name} is not supported; this server uses SHA256 only",
            reason=RequestReason.UNSUPPORTED,
        )


# --- zstd -----------------------------------------------------------------------------

_local = threading.local()  # zstd contexts are not thread-safe: one per thread
_DECODE_STEP = 1 << 20


def zstd_compress(data: bytes) -> bytes:
    """``data`` as one zstd frame that records its size."""
    cctx: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return cctx.compress(data)


def zstd_decompress(frame: bytes, size: int) -> bytes:
    """The content of the zstd ``frame``, which should be ``size`` bytes long.

    Never decodes more than ``size + 1`` bytes, whatever the frame claims (a
    small frame can hold gigabytes). Raises ``RequestRejected`` if the frame
    is not zstd or holds more than ``size`` bytes; a shorter content is
    returned, for the caller's digest check to reject.
    """
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame)
        out = bytearray()
        while len(out) <= size:
            piece = reader.read(min(_DECODE_STEP, size + 1 - len(out)))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise RequestRejected(f"the data is not a valid zstd frame: {exc}",
                              reason=RequestReason.BAD_DATA) from None
    if len(out) > size:
        raise RequestRejected(f"the zstd frame holds more than the digest's {size} bytes",
                              reason=RequestReason.BAD_DATA)
    return bytes(out)


def zstd_stream_decoder(sink: object) -> zstandard.ZstdDecompressionWriter:
    """A zstd decoder that writes what it decodes to ``sink`` (which has ``write``),
    in pieces of at most 1 MiB; its ``write`` raises ``RequestRejected`` on bad zstd."""
    # ``sink`` only needs ``write``; zstandard's stub asks for a whole IO[bytes].
    writer = zstandard.ZstdDecompressor().stream_writer(
        cast(IO[bytes], sink), write_size=_DECODE_STEP, closefd=False)
    return writer


def zstd_write(decoder: zstandard.ZstdDecompressionWriter, data: bytes) -> None:
    """Feed ``data`` to a ``zstd_stream_decoder``; bad zstd is ``RequestRejected``."""
    try:
        decoder.write(data)
    except zstandard.ZstdError as exc:
        raise RequestRejected(f"the data is not a valid zstd stream: {exc}",
                              reason=RequestReason.BAD_DATA) from None


def zstd_stream_encoder(size: int) -> zstandard.ZstdCompressionObj:
    """A streaming zstd encoder for a blob of ``size`` bytes (recorded in the frame)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compressobj(size)
