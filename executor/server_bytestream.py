"""ByteStream for `hitz cache serve`: reading and writing blobs of any size.

REAPI moves blobs too big for a batch call through ByteStream, naming them
(any instance name, even "" or one with slashes, reaches the one store)::

    Read   {instance}/blobs/{hash}/{size}
           {instance}/compressed-blobs/zstd/{hash}/{size}
    Write  {instance}/uploads/{uuid}/blobs/{hash}/{size}{/anything}
           {instance}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}{/anything}

``{hash}`` may be preceded by ``sha256/`` (REAPI 2.3 names the digest
function there); any other function is refused.

**Read** streams the blob in pieces of at most 1 MiB (``compressed-blobs``:
as one zstd frame, compressed on the fly). ``read_offset`` and
``read_limit`` count bytes of what is sent, so of the frame for a
compressed read. Every read is verified, a ranged one too: the whole blob is
read and hashed, and the last piece of the range is sent only once it
matched, so a client never receives a complete range of a corrupt blob.

**Write** streams into the store's temp file for the blob (``Store.blob_writer``),
decoding zstd as it comes, hashing and encoding as it goes, in one pass: a
blob is never held in memory, nor written twice. On ``finish_write`` the
bytes must hash to the digest in the name (else ``INVALID_ARGUMENT``, and the
upload is dropped); then the temp file is renamed into place. A Write of a blob the store
already has ends at once, as REAPI allows, with ``committed_size`` = the
blob's size (-1 for a compressed write).

**Resuming.** An upload is kept by its resource name (so by its uuid) after
its stream ends or breaks without ``finish_write``. ``QueryWriteStatus``
reports its ``committed_size`` (bytes received, compressed for a compressed
write), and a Write whose first ``write_offset`` equals it carries on (0
starts over). Partial uploads live in the store's ``tmp/`` as long as the
server runs; one untouched for ``UPLOAD_IDLE_S`` is dropped, and a ``Store``
opened on the folder removes the files of servers that are gone. Each holds
an open file, so at most ``MAX_PARTIAL_UPLOADS`` are kept: a new upload
beyond that drops the least recently used one no Write is using. A dropped
upload is unknown to ``QueryWriteStatus`` (NOT_FOUND), so its client starts
over at offset 0, as after the idle sweep (simpler than reopening the temp
file, and a zstd decoder's state could not be reopened anyway).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from hitz.executor import store_gc
from hitz.executor.server_border import (
    RequestReason,
    RequestRejected,
    rpc_border,
    zstd_stream_decoder,
    zstd_stream_encoder,
    zstd_write,
)
from hitz.executor.store import BlobWriter, Digest, Store
from hitz.executor.store_errors import cache_io
from hitz.protos.google.bytestream import bytestream_pb2 as bs_pb2
from hitz.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

__all__ = [
    "UPLOADS_FOLDER",
    "BlobName",
    "ByteStreamService",
    "Uploads",
    "parse_read_name",
    "parse_write_name",
]

READ_CHUNK = 1 << 20  # bytes per ReadResponse: well under gRPC's 4 MiB message limit
UPLOADS_FOLDER = "server-uploads"  # where servers before Store.blob_writer kept uploads
UPLOAD_IDLE_S = 3600.0  # a partial upload untouched this long is dropped
# Partial uploads kept at most (each holds an open temp file): beyond it the
# least recently used idle one is dropped, so abandoned uploads can't use up
# the process's file descriptors (1,024 by default).
MAX_PARTIAL_UPLOADS = 256
SWEEP_EVERY_S = 60.0  # how often a new Write looks for idle uploads

READ_FORMS = "`{instance}/blobs/{hash}/{size}` or `{instance}/compressed-blobs/zstd/{hash}/{size}`"
WRITE_FORMS = ("`{instance}/uploads/{uuid}/blobs/{hash}/{size}` or "
               "`{instance}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}`")
# REAPI 2.3's lowercase digest function names, which may precede {hash}.
_DIGEST_FUNCTIONS = frozenset(
    ("sha256", "sha1", "md5", "vso", "sha384", "sha512", "murmur3", "sha256tree", "blake3"))
_SIZE = re.compile(r"[0-9]{1,19}")


# --- resource names -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobName:
    """A parsed ByteStream resource name."""

    instance: str  # any, "" included; the server has one store for all
    digest: Digest  # of the blob itself, even when the bytes on the wire are zstd
    compressed: bool  # compressed-blobs/zstd: the bytes on the wire are one zstd frame
    upload: str  # a Write's uuid; "" for a Read


def parse_read_name(name: str) -> BlobName:
    """A Read's name: ``{instance}/blobs/...`` or ``{instance}/compressed-blobs/zstd/...``.

    Raises ``RequestRejected`` for any other.
    """
    parts = name.split("/")
    at = _index(parts, ("blobs", "compressed-blobs"))
    if at is None:
        raise _bad_name(name, READ_FORMS)
    digest, compressed = _blob_part(name, parts[at:], READ_FORMS, metadata=False)
    return BlobName("/".join(parts[:at]), digest, compressed, "")


def parse_write_name(name: str) -> BlobName:
    """A Write's name: ``{instance}/uploads/{uuid}/blobs/...`` (or ``compressed-blobs/zstd``).

    Raises ``RequestRejected`` for any other.
    """
    parts = name.split("/")
    at = _index(parts, ("uploads",))
    if at is None or len(parts) < at + 3 or not parts[at + 1]:
        raise _bad_name(name, WRITE_FORMS)
    digest, compressed = _blob_part(name, parts[at + 2:], WRITE_FORMS, metadata=True)
    return BlobName("/".join(parts[:at]), digest, compressed, parts[at + 1])


def _index(parts: list[str], words: tuple[str, ...]) -> int | None:
    # REAPI forbids these words as segments of an instance name, so the first
    # one found starts the part after the instance.
    return next((i for i, part in enumerate(parts) if part in words), None)


def _blob_part(name: str, parts: list[str], forms: str, *, metadata: bool) -> tuple[Digest, bool]:
    """The digest and compression of ``blobs/...`` or ``compressed-blobs/zstd/...``."""
    compressed = parts[0] == "compressed-blobs"
    rest = parts[1:]
    if compressed:
        if not rest:
            raise _bad_name(name, forms)
        if rest[0] != "zstd":
            raise RequestRejected(
                f"compressor `{rest[0]}` in `{name}` is not supported; this server speaks `zstd`",
                reason=RequestReason.UNSUPPORTED)
        rest = rest[1:]
    if rest and rest[0] in _DIGEST_FUNCTIONS:
        if rest[0] != "sha256":
            raise RequestRejected(
                f"digest function `{rest[0]}` in `{name}` is not supported; "
                "this server uses sha256 only", reason=RequestReason.UNSUPPORTED)
        rest = rest[1:]
    if len(rest) < 2 or (len(rest) > 2 and not metadata) or not _SIZE.fullmatch(rest[1]):
        raise _bad_name(name, forms)
    try:
        return Digest(rest[0], int(rest[1])), compressed
    except ValueError:
        raise _bad_name(name, forms) from None


def _bad_name(name: str, forms: str) -> RequestRejected:
    return RequestRejected(f"resource name `{name}` is not of the form {forms}",
                           reason=RequestReason.BAD_RESOURCE_NAME)


# --- uploads --------------------------------------------------------------------------


class _Sink:
    """Where an upload's blob bytes go: counted against the digest's size, then
    into the store's writer (which hashes them)."""

    def __init__(self, writer: BlobWriter, limit: int) -> None:
        self.writer = writer
        self.limit = limit

    def write(self, data: bytes | memoryview) -> int:
        if self.writer.size + len(data) > self.limit:
            raise RequestRejected(f"the upload holds more than the digest's {self.limit} bytes",
                                  reason=RequestReason.BAD_DATA)
        self.writer.write(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered (zstd's writer calls this)."""


class Upload:
    """One resumable upload, named by its resource name.

    The bytes go straight into the store's temp file for the blob (a
    ``BlobWriter``: hashed and written once), which ``commit`` moves into
    place. Only one Write at a time uses an upload (``Uploads.begin`` sees to
    that), so its own state needs no lock; ``committed`` is read by
    ``QueryWriteStatus`` as a whole int.
    """

    def __init__(self, name: str, blob: BlobName, store: Store) -> None:
        self.name = name
        self.blob = blob
        self.committed = 0  # bytes received, as sent: compressed for a compressed write
        self.complete = False  # received whole and stored; the temp file is gone
        self.busy = False  # a Write is using it now
        self.used = time.monotonic()
        self._store = store
        self._start()

    def _start(self) -> None:
        self.committed = 0
        self._writer = self._store.blob_writer()
        self._sink = _Sink(self._writer, self.blob.digest.size)
        self._decoder = zstd_stream_decoder(self._sink) if self.blob.compressed else None

    def append(self, data: bytes) -> None:
        """Add ``data``, the next bytes as sent. ``RequestRejected`` if they are too
        many or not zstd; ``CacheUnavailable`` from the store."""
        if self._decoder is None:
            self._sink.write(data)
        else:
            zstd_write(self._decoder, data)
        self.committed += len(data)

    def restart(self) -> None:
        """Forget what was received, for a Write that starts over at offset 0."""
        self._writer.discard()
        self._start()

    def received(self) -> Digest:
        """The digest of the blob bytes received so far."""
        return self._writer.digest()

    def commit(self) -> Digest:
        """Store the blob received; return its digest (check ``received`` first)."""
        return self._writer.commit()

    def close(self) -> None:
        """Drop the temp file (idempotent). A complete upload keeps its record."""
        self._writer.discard()


class Uploads:
    """The uploads of this server, partial or recently complete, by resource name.

    Their temp files are the store's (``Store.blob_writer``), each locked for
    as long as this server holds it: the files of a server that died are
    swept by the next ``Store`` on the folder.
    """

    def __init__(self, store: Store, *, max_partial: int = MAX_PARTIAL_UPLOADS) -> None:
        if max_partial < 1:
            raise ValueError(f"max_partial must be at least 1, got {max_partial}")
        self.store = store
        self.max_partial = max_partial
        # Servers before BlobWriter kept partial uploads in a folder of their own.
        old = store.folder / UPLOADS_FOLDER
        if old.is_dir():
            with cache_io(store.folder):
                store_gc.sweep_temps(str(old))
        self._lock = threading.Lock()  # guards the dict and every Upload's busy/used
        self._by_name: dict[str, Upload] = {}
        # The uploads holding a temp file open, least recently begun first.
        self._partial: OrderedDict[str, Upload] = OrderedDict()
        self._swept = time.monotonic()

    def begin(self, name: str, blob: BlobName) -> Upload:
        """The upload ``name``, new or resumed, marked busy until ``end``.

        Raises ``RequestRejected`` (``BUSY``) if another Write is using it.
        """
        now = time.monotonic()
        with self._lock:
            if now - self._swept > SWEEP_EVERY_S:
                self._sweep_locked(now)
            upload = self._by_name.get(name)
            if upload is not None and upload.busy:
                raise RequestRejected(f"another Write of `{name}` is in progress",
                                      reason=RequestReason.BUSY)
            if upload is None or upload.complete:
                self._make_room_locked()
                upload = Upload(name, blob, self.store)
                self._by_name[name] = upload
            self._partial[name] = upload
            self._partial.move_to_end(name)
            upload.busy = True
            upload.used = now
            return upload

    def _make_room_locked(self) -> None:
        """Drop least recently used idle partial uploads until a new one fits
        under ``max_partial``. Uploads a Write is using are never dropped: with
        that many Writes at once, the cap is exceeded until they end."""
        for name, upload in list(self._partial.items()):
            if len(self._partial) < self.max_partial:
                return
            if not upload.busy:
                self._forget_locked(name, upload)

    def _forget_locked(self, name: str, upload: Upload) -> None:
        if self._by_name.get(name) is upload:
            del self._by_name[name]
        if self._partial.get(name) is upload:
            del self._partial[name]
        upload.close()

    def partial(self) -> int:
        """How many partial uploads are held (each with an open temp file)."""
        with self._lock:
            return len(self._partial)

    def end(self, upload: Upload) -> None:
        with self._lock:
            upload.busy = False
            upload.used = time.monotonic()

    def finish(self, upload: Upload) -> None:
        """Mark ``upload`` complete: its file is gone, its record stays for QueryWriteStatus."""
        upload.close()
        upload.complete = True
        with self._lock:
            if self._partial.get(upload.name) is upload:
                del self._partial[upload.name]

    def drop(self, upload: Upload) -> None:
        """Forget ``upload`` and remove its file (its bytes were wrong)."""
        with self._lock:
            self._forget_locked(upload.name, upload)

    def find(self, name: str) -> Upload | None:
        with self._lock:
            return self._by_name.get(name)

    def close(self) -> None:
        """Remove every temp file; for when the server stops."""
        with self._lock:
            uploads, self._by_name = list(self._by_name.values()), {}
            self._partial.clear()
        for upload in uploads:
            upload.close()

    def _sweep_locked(self, now: float) -> None:
        self._swept = now
        for name, upload in list(self._by_name.items()):
            if not upload.busy and now - upload.used > UPLOAD_IDLE_S:
                self._forget_locked(name, upload)


# --- the service ----------------------------------------------------------------------


class ByteStreamService(bs_grpc.ByteStreamServicer):
    """ByteStream Read, Write and QueryWriteStatus on ``store``; see the module docstring."""

    def __init__(self, store: Store, uploads: Uploads) -> None:
        self._store = store
        self._uploads = uploads

    def Read(
        self, request: bs_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[bs_pb2.ReadResponse]:
        with rpc_border(context, "Read"):
            blob = parse_read_name(request.resource_name)
            offset, limit = request.read_offset, request.read_limit
            if offset < 0 or (not blob.compressed and offset > blob.digest.size):
                raise _out_of_range(offset, blob)
            if limit < 0:
                raise RequestRejected(f"read_limit must be >= 0 (0: no limit), got {limit}",
                                      reason=RequestReason.BAD_OFFSET)
            chunks: Iterable[bytes] = self._store.read_chunks(blob.digest)
            if blob.compressed:
                chunks = _zstd_pieces(chunks, blob.digest.size)
            for piece in _window(chunks, offset, limit, blob):
                yield bs_pb2.ReadResponse(data=piece)

    def Write(
        self, request_iterator: Iterator[bs_pb2.WriteRequest], context: grpc.ServicerContext
    ) -> bs_pb2.WriteResponse:
        with rpc_border(context, "Write"):
            return self._write(_until_cancelled(request_iterator))

    def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: grpc.ServicerContext
    ) -> bs_pb2.QueryWriteStatusResponse:
        with rpc_border(context, "QueryWriteStatus"):
            blob = parse_write_name(request.resource_name)
            upload = self._uploads.find(request.resource_name)
            if upload is not None:
                return bs_pb2.QueryWriteStatusResponse(
                    committed_size=upload.committed, complete=upload.complete)
            if self._store.contains(blob.digest):
                return bs_pb2.QueryWriteStatusResponse(
                    committed_size=_present_size(blob), complete=True)
            raise RequestRejected(f"no upload `{request.resource_name}` in progress",
                                  reason=RequestReason.NO_UPLOAD)

    def _write(self, requests: Iterator[bs_pb2.WriteRequest]) -> bs_pb2.WriteResponse:
        first = next(requests, None)
        if first is None:
            raise RequestRejected("a Write must send at least one request, naming the resource",
                                  reason=RequestReason.BAD_RESOURCE_NAME)
        name = first.resource_name
        blob = parse_write_name(name)
        if self._store.contains(blob.digest):
            return bs_pb2.WriteResponse(committed_size=_present_size(blob))
        upload = self._uploads.begin(name, blob)
        try:
            if first.write_offset == 0 and upload.committed:
                upload.restart()
            request: bs_pb2.WriteRequest | None = first
            while request is not None:
                if request.resource_name and request.resource_name != name:
                    raise RequestRejected(
                        f"a Write streams one resource: `{name}`, then `{request.resource_name}`",
                        reason=RequestReason.BAD_RESOURCE_NAME)
                if request.write_offset != upload.committed:
                    raise self._offset_refused(upload, request.write_offset)
                self._append(upload, request.data)
                if request.finish_write:
                    return self._commit(upload)
                request = next(requests, None)
            # The client closed its stream without finish_write: keep what came, to resume.
            return bs_pb2.WriteResponse(committed_size=upload.committed)
        finally:
            self._uploads.end(upload)

    def _offset_refused(self, upload: Upload, offset: int) -> RequestRejected:
        if upload.committed:
            has = f"has {upload.committed} bytes of `{upload.name}` (as QueryWriteStatus says)"
        else:  # nothing to resume: leave no empty upload behind
            self._uploads.drop(upload)
            has = f"has nothing of `{upload.name}`; start at 0"
        return RequestRejected(f"write_offset {offset} does not follow on: the server {has}",
                               reason=RequestReason.BAD_OFFSET)

    def _append(self, upload: Upload, data: bytes) -> None:
        try:
            upload.append(data)
        except BaseException:
            # Bytes that are wrong, or half written: nothing to resume from.
            self._uploads.drop(upload)
            raise

    def _commit(self, upload: Upload) -> bs_pb2.WriteResponse:
        received = upload.received()
        if received != upload.blob.digest:
            self._uploads.drop(upload)
            raise RequestRejected(
                f"the bytes written are {received}, not {upload.blob.digest} "
                f"as `{upload.name}` says", reason=RequestReason.BAD_DATA)
        upload.commit()
        self._uploads.finish(upload)
        return bs_pb2.WriteResponse(committed_size=upload.committed)


def _until_cancelled(requests: Iterator[bs_pb2.WriteRequest]) -> Iterator[bs_pb2.WriteRequest]:
    """A client stream's requests, ending quietly if the client goes away.

    gRPC's request iterator raises ``grpc.RpcError`` when the client cancels
    or the connection breaks; for a Write that is the end of the stream (what
    came is kept, for a resumed Write), not an error of the server's.
    """
    try:
        yield from requests
    except grpc.RpcError:
        return


def _present_size(blob: BlobName) -> int:
    # REAPI's ByteStream Write: a blob already present ends the Write with
    # committed_size = its size, or -1 for a compressed write (whose size on
    # the wire the server cannot know).
    return -1 if blob.compressed else blob.digest.size


def _out_of_range(offset: int, blob: BlobName) -> RequestRejected:
    what = "the compressed blob's" if blob.compressed else "the blob's"
    return RequestRejected(f"read_offset {offset} is outside {what} bytes",
                           reason=RequestReason.OUT_OF_RANGE)


def _zstd_pieces(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``chunks`` (``size`` bytes in all) as one zstd frame, in pieces of about READ_CHUNK.

    The same blob always gives the same frame (same level, same input
    pieces), so a read resumed at an offset continues the same bytes.
    """
    encoder = zstd_stream_encoder(size)
    out = bytearray()
    for chunk in chunks:
        out += encoder.compress(chunk)
        if len(out) >= READ_CHUNK:
            yield bytes(out)
            out.clear()
    out += encoder.flush()
    yield bytes(out)


def _window(chunks: Iterable[bytes], offset: int, limit: int, blob: BlobName) -> Iterator[bytes]:
    """The bytes of ``chunks`` from ``offset``, at most ``limit`` of them (0: all),
    in pieces of at most READ_CHUNK.

    Reads ``chunks`` to the end whatever the window, and holds back the last
    piece until then: the source raises if the blob fails verification, and
    the client must not receive a complete window of a corrupt blob.
    """
    end = offset + limit if limit else None
    position = 0
    held: bytes | None = None
    for chunk in chunks:
        start_in = max(offset - position, 0)
        stop_in = len(chunk) if end is None else min(len(chunk), end - position)
        position += len(chunk)
        for at in range(start_in, stop_in, READ_CHUNK):
            if held is not None:
                yield held
            held = chunk[at:min(at + READ_CHUNK, stop_in)]
    if offset > position:
        raise _out_of_range(offset, blob)
    if held is not None:
        yield held
