"""A fault-injecting REAPI v2 cache server, in process, for the client's unit tests.

``FakeReapi`` is a real gRPC server on ``127.0.0.1:0`` serving Capabilities,
CAS (FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs), ByteStream (Read,
Write, QueryWriteStatus, with ``compressed-blobs/zstd``) and ActionCache
from dictionaries. It is deliberately simple and strict (it checks what a
careful server checks: batch limits, write offsets, digests), and it records
what it saw, so tests can assert on the wire:

- ``calls``: method name -> count; ``resource_names``: every ByteStream name;
  ``write_offsets``: the first ``write_offset`` of each Write;
  ``read_offsets``: the ``read_offset`` of each Read; ``batch_bytes``: the
  blob bytes of each batch call; ``batch_compressors``; ``digest_functions``
  (what requests set); ``instances``; ``metadata`` (of the last call).

Knobs (set them before the call they affect):

- ``fail(method, code, times)``: the next ``times`` calls of ``method`` end
  with ``code`` before doing anything.
- ``stall(method)``: calls of ``method`` wait until the server stops (so the
  client's deadline ends them); ``unstall()``. ``ended_by_client`` counts,
  per method, the stalled calls that the client cancelled or let time out.
- ``corrupt_blob(digest)``: reads of that blob return other bytes (batch and
  ByteStream alike).
- ``drop_write_after(n)``: the next Write breaks (UNAVAILABLE) once it has
  received ``n`` bytes; what it got is kept for QueryWriteStatus.
- ``drop_read_after(n)``: the next Read breaks after sending ``n`` bytes.
- ``require_token``: calls without ``authorization: Bearer <it>`` are
  UNAUTHENTICATED.
- capabilities: ``zstd``, ``zstd_batch``, ``max_batch``, ``update_enabled``,
  ``api`` (low, high), ``digest_functions``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import zstandard

from hitz.executor.store import Digest
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from hitz.protos.build.bazel.semver import semver_pb2
from hitz.protos.google.bytestream import bytestream_pb2 as bs_pb2
from hitz.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

READ_PIECE = 64 << 10  # the fake sends Reads in small pieces, so a drop can fall mid-blob
SHA256 = re_pb2.DigestFunction.SHA256
ZSTD = re_pb2.Compressor.ZSTD


@dataclass
class _Upload:
    data: bytearray = field(default_factory=bytearray)  # wire bytes received
    complete: bool = False


class FakeReapi:
    """See the module docstring. Use as a context manager, or ``stop()``."""

    def __init__(self, *, zstd: bool = True, zstd_batch: bool = True, max_batch: int = 0,
                 update_enabled: bool = True, api: tuple[tuple[int, int], tuple[int, int]] = (
                     (2, 0), (2, 3)), digest_functions: tuple[int, ...] = (SHA256,),
                 require_token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        """``tls``: (PEM private key, PEM certificate chain) to serve grpcs:// instead."""
        self.zstd = zstd
        self.zstd_batch = zstd_batch
        self.max_batch = max_batch
        self.update_enabled = update_enabled
        self.api = api
        self.digest_functions = digest_functions
        self.require_token = require_token
        self.blobs: dict[Digest, bytes] = {}
        self.results: dict[Digest, re_pb2.ActionResult] = {}
        self.uploads: dict[str, _Upload] = {}
        self.calls: Counter[str] = Counter()
        self.ended_by_client: Counter[str] = Counter()  # stalled calls the client gave up on
        self.resource_names: list[str] = []
        self.write_offsets: list[int] = []
        self.read_offsets: list[int] = []
        self.batch_bytes: list[int] = []
        self.batch_compressors: list[int] = []
        self.digest_functions_seen: list[int] = []
        self.instances: list[str] = []
        self.metadata: dict[str, str | bytes] = {}
        self._failures: dict[str, list[tuple[grpc.StatusCode, int]]] = {}
        self._stalled: set[str] = set()
        self._release = threading.Event()
        self._corrupt: set[Digest] = set()
        self._drop_write: int | None = None
        self._drop_read: int | None = None
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(16),
                                  options=[("grpc.max_receive_message_length", 64 << 20)])
        re_grpc.add_CapabilitiesServicer_to_server(_Capabilities(self), self.server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(_Cas(self), self.server)
        re_grpc.add_ActionCacheServicer_to_server(_ActionCache(self), self.server)
        bs_grpc.add_ByteStreamServicer_to_server(_ByteStream(self), self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port(
                "127.0.0.1:0", grpc.ssl_server_credentials([tls]))
        self.scheme = "grpc" if tls is None else "grpcs"
        self.server.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._release.set()
        self.server.stop(grace=None).wait()

    def __enter__(self) -> FakeReapi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- knobs ------------------------------------------------------------------------

    def fail(self, method: str, code: grpc.StatusCode, times: int = 1) -> None:
        self._failures.setdefault(method, []).append((code, times))

    def stall(self, method: str) -> None:
        self._stalled.add(method)

    def unstall(self) -> None:
        self._stalled.clear()

    def corrupt_blob(self, digest: Digest) -> None:
        self._corrupt.add(digest)

    def drop_write_after(self, n: int) -> None:
        self._drop_write = n

    def drop_read_after(self, n: int) -> None:
        self._drop_read = n

    def put(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[digest] = data
        return digest

    # --- for the servicers ------------------------------------------------------------

    def enter(self, method: str, context: grpc.ServicerContext, instance: str | None = None,
              digest_function: int | None = None) -> None:
        """Count the call, check the token, apply failures and stalls."""
        with self._lock:
            self.calls[method] += 1
            self.metadata = dict(context.invocation_metadata())
            if instance is not None:
                self.instances.append(instance)
            if digest_function is not None:
                self.digest_functions_seen.append(digest_function)
            queue = self._failures.get(method, [])
            failure = None
            if queue:
                code, times = queue[0]
                failure = code
                if times <= 1:
                    queue.pop(0)
                else:
                    queue[0] = (code, times - 1)
        if self.require_token is not None and \
                self.metadata.get("authorization") != f"Bearer {self.require_token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid token")
        if failure is not None:
            context.abort(failure, f"injected {failure.name}")
        if method in self._stalled:
            while not self._release.wait(0.02):
                if not context.is_active():  # the client cancelled, or its deadline passed
                    with self._lock:
                        self.ended_by_client[method] += 1
                    context.abort(grpc.StatusCode.CANCELLED, "the client went away")
            context.abort(grpc.StatusCode.UNAVAILABLE, "server stopping")

    def read(self, digest: Digest) -> bytes | None:
        data = self.blobs.get(digest)
        if data is not None and digest in self._corrupt:
            return bytes([data[0] ^ 0xFF]) + data[1:] if data else b"x"
        return data


def _digest(wire: re_pb2.Digest) -> Digest:
    return Digest(wire.hash, wire.size_bytes)


class _Capabilities(re_grpc.CapabilitiesServicer):
    def __init__(self, fake: FakeReapi) -> None:
        self.f = fake

    def GetCapabilities(self, request: re_pb2.GetCapabilitiesRequest,
                        context: grpc.ServicerContext) -> re_pb2.ServerCapabilities:
        f = self.f
        f.enter("GetCapabilities", context, request.instance_name)
        (low_major, low_minor), (high_major, high_minor) = f.api
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=list(f.digest_functions),
                action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                    update_enabled=f.update_enabled),
                max_batch_total_size_bytes=f.max_batch,
                supported_compressors=[ZSTD] if f.zstd else [],
                supported_batch_update_compressors=[ZSTD] if f.zstd_batch else [],
            ),
            low_api_version=semver_pb2.SemVer(major=low_major, minor=low_minor),
            high_api_version=semver_pb2.SemVer(major=high_major, minor=high_minor),
        )


class _Cas(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, fake: FakeReapi) -> None:
        self.f = fake

    def _limit(self, context: grpc.ServicerContext, sizes: list[int]) -> None:
        total = sum(sizes)
        self.f.batch_bytes.append(total)
        if total > (self.f.max_batch or 4 << 20):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch of {total} bytes")

    def FindMissingBlobs(self, request: re_pb2.FindMissingBlobsRequest,
                         context: grpc.ServicerContext) -> re_pb2.FindMissingBlobsResponse:
        self.f.enter("FindMissingBlobs", context, request.instance_name, request.digest_function)
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[
            d for d in request.blob_digests if _digest(d) not in self.f.blobs])

    def BatchUpdateBlobs(self, request: re_pb2.BatchUpdateBlobsRequest,
                         context: grpc.ServicerContext) -> re_pb2.BatchUpdateBlobsResponse:
        f = self.f
        f.enter("BatchUpdateBlobs", context, request.instance_name, request.digest_function)
        self._limit(context, [r.digest.size_bytes for r in request.requests])
        response = re_pb2.BatchUpdateBlobsResponse()
        for r in request.requests:
            f.batch_compressors.append(r.compressor)
            data = r.data
            if r.compressor == ZSTD:
                data = zstandard.ZstdDecompressor().decompress(data)
            entry = response.responses.add(digest=r.digest)
            if Digest.of(data) != _digest(r.digest):
                entry.status.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                entry.status.message = "digest mismatch"
            else:
                f.blobs[_digest(r.digest)] = data
        return response

    def BatchReadBlobs(self, request: re_pb2.BatchReadBlobsRequest,
                       context: grpc.ServicerContext) -> re_pb2.BatchReadBlobsResponse:
        f = self.f
        f.enter("BatchReadBlobs", context, request.instance_name, request.digest_function)
        self._limit(context, [d.size_bytes for d in request.digests])
        response = re_pb2.BatchReadBlobsResponse()
        for wire in request.digests:
            entry = response.responses.add(digest=wire)
            data = f.read(_digest(wire))
            if data is None:
                entry.status.code = grpc.StatusCode.NOT_FOUND.value[0]
                entry.status.message = "not found"
            elif ZSTD in request.acceptable_compressors:
                entry.data = zstandard.ZstdCompressor().compress(data)
                entry.compressor = ZSTD
            else:
                entry.data = data
        return response


class _ActionCache(re_grpc.ActionCacheServicer):
    def __init__(self, fake: FakeReapi) -> None:
        self.f = fake

    def GetActionResult(self, request: re_pb2.GetActionResultRequest,
                        context: grpc.ServicerContext) -> re_pb2.ActionResult:
        self.f.enter("GetActionResult", context, request.instance_name, request.digest_function)
        result = self.f.results.get(_digest(request.action_digest))
        if result is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no result")
        return result

    def UpdateActionResult(self, request: re_pb2.UpdateActionResultRequest,
                           context: grpc.ServicerContext) -> re_pb2.ActionResult:
        f = self.f
        f.enter("UpdateActionResult", context, request.instance_name, request.digest_function)
        if not f.update_enabled:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "read-only")
        f.results[_digest(request.action_digest)] = request.action_result
        return request.action_result


def _parse_name(name: str) -> tuple[str, Digest, bool]:
    """(instance, digest, compressed) of a ByteStream resource name."""
    parts = name.split("/")
    if "compressed-blobs" in parts:
        at = parts.index("compressed-blobs")
        assert parts[at + 1] == "zstd", name
        digest, compressed = Digest(parts[at + 2], int(parts[at + 3])), True
    else:
        at = parts.index("blobs")
        digest, compressed = Digest(parts[at + 1], int(parts[at + 2])), False
    start = parts.index("uploads") if "uploads" in parts else at
    return "/".join(parts[:start]), digest, compressed


class _ByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, fake: FakeReapi) -> None:
        self.f = fake

    def Read(self, request: bs_pb2.ReadRequest,
             context: grpc.ServicerContext) -> Iterator[bs_pb2.ReadResponse]:
        f = self.f
        f.enter("Read", context)
        f.resource_names.append(request.resource_name)
        f.read_offsets.append(request.read_offset)
        instance, digest, compressed = _parse_name(request.resource_name)
        f.instances.append(instance)
        data = f.read(digest)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        if compressed:
            data = zstandard.ZstdCompressor().compress(data)
        drop, f._drop_read = f._drop_read, None
        position = request.read_offset
        while position < len(data):
            if drop is not None and position - request.read_offset >= drop:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: read dropped")
            yield bs_pb2.ReadResponse(data=data[position:position + READ_PIECE])
            position += READ_PIECE

    def Write(self, request_iterator: Iterator[bs_pb2.WriteRequest],
              context: grpc.ServicerContext) -> bs_pb2.WriteResponse:
        f = self.f
        f.enter("Write", context)
        name = ""
        upload: _Upload | None = None
        drop, f._drop_write = f._drop_write, None
        received = 0
        for request in request_iterator:
            if upload is None:
                name = request.resource_name
                f.resource_names.append(name)
                f.write_offsets.append(request.write_offset)
                upload = f.uploads.setdefault(name, _Upload())
                if request.write_offset == 0:
                    upload.data.clear()
            if request.write_offset != len(upload.data):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"write_offset {request.write_offset}, have {len(upload.data)}")
            upload.data += request.data
            received += len(request.data)
            if drop is not None and received >= drop:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: write dropped")
            if request.finish_write:
                break
        assert upload is not None
        instance, digest, compressed = _parse_name(name)
        f.instances.append(instance)
        data = bytes(upload.data)
        if compressed:
            data = zstandard.ZstdDecompressor().decompress(data)
        if Digest(hashlib.sha256(data).hexdigest(), len(data)) != digest:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest mismatch")
        f.blobs[digest] = data
        upload.complete = True
        return bs_pb2.WriteResponse(committed_size=len(upload.data))

    def QueryWriteStatus(self, request: bs_pb2.QueryWriteStatusRequest,
                         context: grpc.ServicerContext) -> bs_pb2.QueryWriteStatusResponse:
        f = self.f
        f.enter("QueryWriteStatus", context)
        upload = f.uploads.get(request.resource_name)
        if upload is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown upload")
        return bs_pb2.QueryWriteStatusResponse(committed_size=len(upload.data),
                                               complete=upload.complete)
