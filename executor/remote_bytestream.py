"""ByteStream transfers of the remote cache client: big blobs, in pieces, resumable.

Resource names (REAPI 2.0's forms; ``{instance}/`` is left out when the
instance name is empty)::

    Read   {instance}/blobs/{hash}/{size}
           {instance}/compressed-blobs/zstd/{hash}/{size}
    Write  {instance}/uploads/{uuid}/blobs/{hash}/{size}
           {instance}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}

The ``compressed-blobs`` forms are used only when the server lists ZSTD in
``supported_compressors`` (and, for a Write, when the blob's first MiB
shrinks by 10 % or more); offsets then count bytes of the zstd stream.

**Upload** (``Upload``) sends ``CHUNK`` pieces read from a file or a buffer;
a blob is never held in memory whole unless the caller gave it so. When a
Write breaks, the next try asks ``QueryWriteStatus`` how much the server has
and goes on from there (the compressed stream is produced again the same way,
so its bytes past the offset are the same). A server that does not know the
upload (NOT_FOUND) or does not implement the query makes it start over.

**Download** (``Download``) hashes as it receives and checks size and
SHA-256 at the end; a file is written to a temp file beside its destination
and renamed over it only once it matched. A broken plain Read resumes at the
offset reached; a broken compressed one starts over (the server is not bound
to compress the same way twice). A zstd stream is decoded in pieces of at
most ``CHUNK`` and stopped as soon as it holds more than the digest's size,
so a small bomb can't fill memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, cast

import zstandard

from hitz.executor.remote_errors import (
    RemoteBlobCorrupt,
    RemoteBlobMissing,
    RemoteError,
    RemoteErrorReason,
    rpc_errors,
)
from hitz.executor.store import Digest
from hitz.protos.google.bytestream import bytestream_pb2 as bs_pb2

if TYPE_CHECKING:
    from hitz.executor.remote import RemoteCache

__all__ = ["CHUNK", "BytesSource", "Download", "FileSource", "Source", "Upload",
           "compress", "decompress", "read_name", "verify", "write_name"]

CHUNK = 1 << 20  # bytes per Read/Write message: well under gRPC's 4 MiB limit
ZSTD_LEVEL = 1  # fast; the wire is loopback or LAN more often than not


# --- names and checks -------------------------------------------------------------------


def _prefix(instance: str) -> str:
    return f"{instance.strip('/')}/" if instance.strip("/") else ""


def read_name(instance: str, digest: Digest, zstd: bool) -> str:
    kind = "compressed-blobs/zstd" if zstd else "blobs"
    return f"{_prefix(instance)}{kind}/{digest.hash}/{digest.size}"


def write_name(instance: str, upload: str, digest: Digest, zstd: bool) -> str:
    kind = "compressed-blobs/zstd" if zstd else "blobs"
    return f"{_prefix(instance)}uploads/{upload}/{kind}/{digest.hash}/{digest.size}"


def _corrupt(url: str, digest: Digest, why: str) -> RemoteBlobCorrupt:
    return RemoteBlobCorrupt(
        f"remote cache {url} sent a wrong blob for {digest}: {why}",
        hint="the blob was not used; the task runs instead. The remote's copy is damaged",
        reason=RemoteErrorReason.CORRUPT)


def verify(url: str, digest: Digest, data: bytes) -> None:
    """Raise ``RemoteBlobCorrupt`` unless ``data`` is the blob ``digest``."""
    if len(data) != digest.size:
        raise _corrupt(url, digest, f"{len(data)} bytes instead of {digest.size}")
    got = hashlib.sha256(data).hexdigest()
    if got != digest.hash:
        raise _corrupt(url, digest, f"its SHA-256 is {got}")


def compress(data: bytes) -> bytes:
    """``data`` as one zstd frame that records its size."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def decompress(url: str, digest: Digest, frame: bytes) -> bytes:
    """The content of a zstd ``frame`` said to hold the blob ``digest``; never decodes
    more than ``digest.size + 1`` bytes. Bad zstd is ``RemoteBlobCorrupt``."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame)
        out = bytearray()
        while len(out) <= digest.size:
            piece = reader.read(min(CHUNK, digest.size + 1 - len(out)))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise _corrupt(url, digest, f"not a valid zstd frame ({exc})") from None
    return bytes(out)


# --- sources of uploads -----------------------------------------------------------------


class Source(Protocol):
    size: int

    def chunks(self) -> Iterator[bytes]:
        """The blob from its start, in pieces of at most ``CHUNK``."""
        ...


class BytesSource:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.size = len(data)

    def chunks(self) -> Iterator[bytes]:
        for start in range(0, self.size, CHUNK):
            yield bytes(self._data[start:start + CHUNK])


class FileSource:
    def __init__(self, path: str | os.PathLike[str], size: int) -> None:
        self.path = Path(path)
        self.size = size

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb", buffering=0) as f:
            while piece := f.read(CHUNK):
                yield piece


def worth_compressing(source: Source) -> bool:
    """Does the start of ``source`` shrink by at least 10 % under zstd? Random or
    already compressed bytes do not, and compressing them costs CPU on both
    ends for nothing (the store's own rule, docs/cache.md#compression)."""
    start = next(iter(source.chunks()), b"")
    return len(compress(start)) <= 0.9 * len(start)


def _wire_chunks(source: Source, zstd: bool) -> Iterator[bytes]:
    """What goes on the wire for ``source``: its bytes, or a zstd stream of them
    made the same way every time (same level, same input pieces), re-cut into
    pieces of at most ``CHUNK``."""
    if not zstd:
        yield from source.chunks()
        return
    encoder = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj(size=source.size)
    pending = bytearray()
    for piece in source.chunks():
        pending += encoder.compress(piece)
        while len(pending) >= CHUNK:
            yield bytes(pending[:CHUNK])
            del pending[:CHUNK]
    pending += encoder.flush()
    for start in range(0, len(pending), CHUNK):
        yield bytes(pending[start:start + CHUNK])


# --- upload -----------------------------------------------------------------------------


class Upload:
    """One blob's ByteStream Write; ``attempt(n)`` is one try, resuming from try 1 on."""

    def __init__(self, client: RemoteCache, digest: Digest, source: Source, upload_id: str,
                 zstd: bool) -> None:
        self.client = client
        self.digest = digest
        self.source = source
        self.zstd = zstd
        self.name = write_name(client.instance, upload_id, digest, zstd)
        self.confirmed = 0  # the most the server has said it holds (QueryWriteStatus)

    def progress(self) -> int:
        return self.confirmed

    def attempt(self, n: int) -> None:
        offset = 0
        if n:
            status = self._status()
            if status is not None and status.complete:
                return
            if status is not None:
                offset = status.committed_size
                self.confirmed = max(self.confirmed, offset)
        c = self.client
        # Each try has its own stream of messages: gRPC may still pull from
        # a broken try's iterator on its own thread while the next one starts.
        stream = _WriteStream(self, offset)
        response = c._bytestream.Write(iter(stream), timeout=c.stream_timeout(self.digest.size),
                                       metadata=c._metadata)
        # Done: the whole blob (or, compressed, the whole stream; -1 or the
        # blob's size when the server had the blob and ended the Write early).
        done = response.committed_size
        if done != self.digest.size and not (self.zstd and done in (-1, stream.sent)):
            raise RemoteError(
                f"remote cache {c.url} kept {done} bytes of an upload of {self.digest}",
                reason=RemoteErrorReason.SERVER_ERROR)
        c.stats.add(bytes_up=stream.sent - offset)

    def _status(self) -> bs_pb2.QueryWriteStatusResponse | None:
        """How much of this upload the server has; None: start over (it does
        not know the upload, or can't say)."""
        c = self.client
        request = bs_pb2.QueryWriteStatusRequest(resource_name=self.name)
        try:
            with rpc_errors(c.url, "ByteStream.QueryWriteStatus"):
                return c._bytestream.QueryWriteStatus(request, timeout=c.timeout_s,
                                                      metadata=c._metadata)
        except RemoteBlobMissing:
            return None
        except RemoteError as exc:
            if exc.reason is RemoteErrorReason.UNSUPPORTED:
                return None
            raise


class _WriteStream:
    """The messages of one try of a Write, from wire offset ``offset`` on. The
    first names the resource (REAPI: required there only); the last has
    ``finish_write``."""

    def __init__(self, upload: Upload, offset: int) -> None:
        self.upload = upload
        self.offset = offset
        self.sent = offset  # wire bytes handed to gRPC, counting from the blob's start

    def __iter__(self) -> Iterator[bs_pb2.WriteRequest]:
        up = self.upload
        position = 0
        previous: bytes | None = None
        for piece in _wire_chunks(up.source, up.zstd):
            end = position + len(piece)
            if end <= self.offset:
                position = end
                continue
            if position < self.offset:
                piece = piece[self.offset - position:]
                position = self.offset
            if previous is not None:
                yield self._request(previous, finish=False)
            previous = piece
            position += len(piece)
        if position < self.offset:
            raise RemoteError(
                f"remote cache {up.client.url} claims {self.offset} bytes of an upload of "
                f"{up.digest}, which has only {position}",
                reason=RemoteErrorReason.SERVER_ERROR)
        yield self._request(previous or b"", finish=True)

    def _request(self, data: bytes, *, finish: bool) -> bs_pb2.WriteRequest:
        request = bs_pb2.WriteRequest(write_offset=self.sent, data=data, finish_write=finish)
        if self.sent == self.offset:
            request.resource_name = self.upload.name
        self.sent += len(data)
        return request


# --- download ---------------------------------------------------------------------------


class _Sink:
    """Receives the decoded blob: counts, hashes and keeps it (memory or a file)."""

    def __init__(self, url: str, digest: Digest, fd: int | None) -> None:
        self.url = url
        self.digest = digest
        self.fd = fd
        self.buffer = bytearray()
        self.reset()

    def reset(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.buffer.clear()
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)

    def write(self, data: bytes | memoryview) -> int:
        self.size += len(data)
        if self.size > self.digest.size:
            raise _corrupt(self.url, self.digest, f"more than {self.digest.size} bytes")
        self.sha.update(data)
        if self.fd is None:
            self.buffer += data
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        return len(data)

    def flush(self) -> None:
        """For zstandard's stream writer, which flushes its sink."""

    def check(self) -> None:
        if self.size != self.digest.size:
            raise _corrupt(self.url, self.digest, f"{self.size} bytes instead of "
                                                  f"{self.digest.size}")
        got = self.sha.hexdigest()
        if got != self.digest.hash:
            raise _corrupt(self.url, self.digest, f"its SHA-256 is {got}")


class Download:
    """One blob's ByteStream Read, verified, into memory or a file."""

    def __init__(self, client: RemoteCache, digest: Digest) -> None:
        self.client = client
        self.digest = digest
        self.zstd = client.compress and client.capabilities.zstd
        self.name = read_name(client.instance, digest, self.zstd)
        self.received = 0  # wire bytes received so far

    def to_bytes(self) -> bytes:
        sink = _Sink(self.client.url, self.digest, None)
        self._run(sink)
        return bytes(sink.buffer)

    def to_file(self, dest: str | os.PathLike[str]) -> None:
        dest = os.fspath(dest)
        folder, name = os.path.split(os.path.abspath(dest))
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.hitz-tmp")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            self._run(_Sink(self.client.url, self.digest, fd))
            os.rename(temp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        finally:
            os.close(fd)

    def to_fd(self, fd: int) -> None:
        """Write the blob into the open file ``fd`` (truncated first, and again
        on a fresh try); raise, leaving whatever was written, if it does not
        match. The caller owns the file, and drops it on any error."""
        self._run(_Sink(self.client.url, self.digest, fd))

    def _run(self, sink: _Sink) -> None:
        if self.digest.size:
            c = self.client
            # A broken compressed Read starts over: how far it got is not progress kept.
            progress = None if self.zstd else (lambda: self.received)
            c._call("ByteStream.Read", lambda n: self._attempt(n, sink), progress)
            c.stats.add(downloaded=1, streamed=1)
        sink.check()

    def _attempt(self, n: int, sink: _Sink) -> None:
        c = self.client
        if self.zstd or n == 0:
            self.received = 0
            sink.reset()
        request = bs_pb2.ReadRequest(resource_name=self.name, read_offset=self.received)
        decoder = None
        if self.zstd:
            # zstandard's stub asks for a whole IO[bytes]; the writer only calls write/flush.
            decoder = zstandard.ZstdDecompressor().stream_writer(
                cast(IO[bytes], sink), write_size=CHUNK, closefd=False)
        for response in c._bytestream.Read(request, timeout=c.stream_timeout(self.digest.size),
                                           metadata=c._metadata):
            data = response.data
            self.received += len(data)
            c.stats.add(bytes_down=len(data))
            if decoder is None:
                sink.write(data)
                continue
            try:
                decoder.write(data)
            except zstandard.ZstdError as exc:
                raise _corrupt(c.url, self.digest, f"not a valid zstd stream ({exc})") from None
        if decoder is not None:
            try:
                decoder.flush()  # type: ignore[no-untyped-call]  # zstandard's stub lacks it
            except zstandard.ZstdError as exc:
                raise _corrupt(c.url, self.digest, f"not a valid zstd stream ({exc})") from None
