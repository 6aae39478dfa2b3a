"""The REAPI v2 client of a remote cache: ``RemoteCache``.

``RemoteCache.connect("grpc://127.0.0.1:8980")`` talks to any REAPI v2 cache
(``hitz cache serve``, BuildGrid, buildbox-casd, bazel-remote...) over one
gRPC channel. What it promises (docs/remote-cache.md is the user's guide):

- **Capabilities first.** ``connect`` asks ``GetCapabilities`` and refuses a
  server that does not offer SHA-256 or whose API range has no version in
  common with 2.0-2.3. hitz only uses what REAPI 2.0 has unless the server
  says more: it never sets 2.1+'s ``digest_function`` fields or ``sha256/``
  resource-name prefixes, and compresses only as advertised
  (``supported_compressors`` for ByteStream's ``compressed-blobs/zstd``,
  ``supported_batch_update_compressors`` for batch calls).
- **Small blobs in batches, big ones streamed.** ``FindMissingBlobs`` in
  batches of ``FIND_MISSING_BATCH`` digests; blobs that fit go by
  ``BatchUpdateBlobs``/``BatchReadBlobs`` under the batch limit (0 means 4 MiB),
  counting each blob's framing; others by ByteStream in ``CHUNK`` pieces,
  never held whole in memory (``hitz.executor.remote_bytestream``). An
  interrupted Write resumes where ``QueryWriteStatus`` says the server is; an
  interrupted Read resumes at the offset it reached.
- **Every downloaded blob is verified** against its digest (hash and size);
  a wrong blob raises ``RemoteBlobCorrupt`` and is never written or returned.
- **Every call has a deadline** (``timeout_s``; a stream gets more in
  proportion to its size; the first contact, ``GetCapabilities``, at most
  ``CONTACT_TIMEOUT_S`` and a single try). UNAVAILABLE, RESOURCE_EXHAUSTED
  and ABORTED are retried with exponential backoff and jitter,
  DEADLINE_EXCEEDED only once (each try costs a whole deadline); a remote
  that fails all its retries opens a circuit breaker and every later call
  fails at once (``hitz.executor.remote_retry``). ``abort`` cancels every
  call in flight (an interrupted run).
- **Instance name** in every request and resource name. **TLS** for
  ``grpcs://`` (the system's roots, or ``ca_file``). **Auth**: a token is sent
  as ``authorization: Bearer <token>``; where it comes from is the caller's
  business (``load_token``: an environment variable or a file, never hitz.toml).
- **Errors** are ``RemoteError``s (``hitz.executor.remote_errors``), made from
  ``grpc.RpcError`` in one place. ``find_missing``, ``upload_*``,
  ``read_*``, ``download_file`` and the action-cache calls are thread-safe;
  ``upload_missing`` and ``read_blobs`` run their transfers concurrently.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc

from hitz.executor import remote_bytestream
from hitz.executor.remote_config import RemoteURL, load_token, parse_url
from hitz.executor.remote_errors import (
    RemoteBlobCorrupt,
    RemoteBlobMissing,
    RemoteError,
    RemoteErrorReason,
    RemoteUnavailable,
    rpc_errors,
    status_error,
)
from hitz.executor.remote_retry import Breaker, RetryPolicy
from hitz.executor.store import Digest
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from hitz.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

__all__ = [
    "CHUNK",
    "DEFAULT_BATCH_BYTES",
    "RemoteCache",
    "RemoteURL",
    "ServerCapabilities",
    "load_token",
    "parse_url",
]

T = TypeVar("T")

DEFAULT_BATCH_BYTES = 4 << 20  # REAPI: max_batch_total_size_bytes 0 means no limit; gRPC's is 4 MiB
CHUNK = remote_bytestream.CHUNK  # ByteStream piece: 1 MiB, well under gRPC's 4 MiB message
FIND_MISSING_BATCH = 4096  # digests per FindMissingBlobs (~90 bytes each on the wire)
# What a blob costs in a batch request beyond its bytes: the Request message's
# tag and length, the Digest (64-character hash, size), the data's tag and
# length, the compressor. Counted generously; plus the request's own envelope.
BLOB_OVERHEAD = 128
REQUEST_OVERHEAD = 1024
# The deadline of the first contact (GetCapabilities), tried once: a healthy
# server answers it in milliseconds, and one that accepts connections but
# never answers must not hold a run for long before hitz goes on without it.
CONTACT_TIMEOUT_S = 5.0
MIN_STREAM_RATE = 1 << 20  # bytes/s a stream is allowed on top of timeout_s for its deadline
READ_GROUP_BYTES = 32 << 20  # read_blob_groups: blobs held in memory at once, at most
TRANSFERS = 8  # blobs or batches moved at once by upload_missing and read_blobs
MESSAGE_LIMIT = 64 << 20  # what the channel accepts from a server (a generous batch response)
OUR_API = ((2, 0), (2, 3))  # the REAPI versions these protos speak
REQUEST_METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


# --- configuration values ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerCapabilities:
    """What the server said it can do, as hitz uses it."""

    digest_functions: tuple[int, ...]  # re_pb2.DigestFunction values; SHA256 is among them
    max_batch_bytes: int  # the server's max_batch_total_size_bytes; 0 there -> 4 MiB here
    low_api: tuple[int, int]  # (major, minor)
    high_api: tuple[int, int]
    zstd: bool  # ByteStream compressed-blobs/zstd (supported_compressors)
    zstd_batch: bool  # zstd in batch calls (supported_batch_update_compressors)
    update_enabled: bool  # UpdateActionResult is allowed


def _capabilities(url: str, caps: re_pb2.ServerCapabilities) -> ServerCapabilities:
    cache = caps.cache_capabilities
    low = _version(caps.low_api_version) or _version(caps.deprecated_api_version) or (2, 0)
    high = _version(caps.high_api_version) or _version(caps.deprecated_api_version) or (2, 0)
    result = ServerCapabilities(
        digest_functions=tuple(cache.digest_functions),
        max_batch_bytes=cache.max_batch_total_size_bytes or DEFAULT_BATCH_BYTES,
        low_api=low,
        high_api=high,
        zstd=re_pb2.Compressor.ZSTD in cache.supported_compressors,
        zstd_batch=re_pb2.Compressor.ZSTD in cache.supported_batch_update_compressors,
        update_enabled=cache.action_cache_update_capabilities.update_enabled,
    )
    if re_pb2.DigestFunction.SHA256 not in result.digest_functions:
        names = ", ".join(re_pb2.DigestFunction.Value.Name(f) for f in result.digest_functions)
        raise RemoteError(
            f"remote cache {url} does not offer SHA-256 digests (it offers: {names or 'none'})",
            hint="hitz keys everything by SHA-256; configure the server for it",
            reason=RemoteErrorReason.UNSUPPORTED)
    if result.high_api < OUR_API[0] or result.low_api > OUR_API[1]:
        raise RemoteError(
            f"remote cache {url} speaks REAPI {_v(low)} to {_v(high)}; "
            f"hitz speaks {_v(OUR_API[0])} to {_v(OUR_API[1])}",
            reason=RemoteErrorReason.UNSUPPORTED)
    return result


def _version(semver: object) -> tuple[int, int] | None:
    major, minor = getattr(semver, "major", 0), getattr(semver, "minor", 0)
    return (major, minor) if (major or minor) else None


def _v(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _wire(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def _from_wire(digest: re_pb2.Digest) -> Digest | None:
    try:
        return Digest(digest.hash, digest.size_bytes)
    except ValueError:
        return None


# --- the client -------------------------------------------------------------------------


class RemoteCache:
    """A REAPI v2 remote cache; see the module docstring. Make one with ``connect``."""

    def __init__(self, url: RemoteURL, channel: grpc.Channel, *, instance: str,
                 metadata: Sequence[tuple[str, str | bytes]], timeout_s: float,
                 policy: RetryPolicy, breaker: Breaker, compress: bool = True) -> None:
        """Use ``connect``; this wires a client to an open ``channel`` without asking
        anything (``capabilities`` is set by ``connect``)."""
        self.url = url.url
        self.instance = instance
        self.timeout_s = timeout_s
        self.policy = policy
        self.breaker = breaker
        self.compress = compress
        self._channel = channel
        self._metadata = tuple(metadata)
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._ac = re_grpc.ActionCacheStub(channel)
        self._caps_stub = re_grpc.CapabilitiesStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self._pool: futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._aborted = threading.Event()
        self.capabilities = ServerCapabilities((), DEFAULT_BATCH_BYTES, (2, 0), (2, 0),
                                               False, False, False)
        self.stats = TransferStats()

    @classmethod
    def connect(cls, url: str, *, instance: str = "", token: str | None = None,
                ca_file: str | None = None, timeout_s: float = 60.0, retries: int = 4,
                compress: bool = True, sleep: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] = time.monotonic,
                cooldown_s: float = 30.0) -> RemoteCache:
        """Open a channel to ``url`` and ask ``GetCapabilities``.

        ``token`` is sent as ``authorization: Bearer``; ``ca_file`` replaces the
        system's roots for ``grpcs://``. ``compress=False`` never uses zstd.
        ``sleep`` and ``clock`` drive backoff and the breaker (tests pass fakes).
        Raises ``RemoteError`` (bad URL, unreadable CA file, a server hitz can't
        work with) or ``RemoteUnavailable`` (unreachable after the retries).
        """
        try:
            parsed = parse_url(url)
        except ValueError as exc:
            raise RemoteError(str(exc), reason=RemoteErrorReason.BAD_URL) from None
        options = [("grpc.max_receive_message_length", MESSAGE_LIMIT),
                   ("grpc.max_send_message_length", MESSAGE_LIMIT),
                   # Our own retries and resumes; gRPC's would hide the status codes.
                   ("grpc.enable_retries", 0)]
        if parsed.tls:
            roots = None
            if ca_file:
                try:
                    roots = Path(ca_file).read_bytes()
                except OSError as exc:
                    raise RemoteError(f"can't read the CA file `{ca_file}`: {exc.strerror}",
                                      reason=RemoteErrorReason.BAD_URL) from None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            channel = grpc.secure_channel(parsed.target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(parsed.target, options=options)
        metadata: list[tuple[str, str | bytes]] = [
            (REQUEST_METADATA_KEY, re_pb2.RequestMetadata(
                tool_details=re_pb2.ToolDetails(tool_name="hitz")).SerializeToString())]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        client = cls(parsed, channel, instance=instance, metadata=metadata,
                     timeout_s=timeout_s, policy=RetryPolicy(retries=retries, sleep=sleep),
                     breaker=Breaker(parsed.url, clock=clock, cooldown_s=cooldown_s),
                     compress=compress)
        try:
            client.capabilities = client._get_capabilities()
        except BaseException:
            client.close()
            raise
        return client

    def _get_capabilities(self) -> ServerCapabilities:
        """Ask the server what it can do: a short deadline (``CONTACT_TIMEOUT_S``
        at most), not tried again after running out of time (an unreachable
        server, which fails at once, is still retried with backoff)."""
        request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance)
        deadline = min(self.timeout_s, CONTACT_TIMEOUT_S)
        caps = self._call("GetCapabilities", lambda _n: self._caps_stub.GetCapabilities(
            request, timeout=deadline, metadata=self._metadata), timeout_retries=0)
        return _capabilities(self.url, caps)

    @property
    def channel(self) -> grpc.Channel:
        """The open channel, for other REAPI services of the same server
        (Execution, Operations, Bots): they share its TLS and connection."""
        return self._channel

    @property
    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """What every call must carry: REAPI's RequestMetadata, and the bearer token."""
        return self._metadata

    # --- plumbing -----------------------------------------------------------------------

    def _call(self, what: str, attempt: Callable[[int], T],
              progress: Callable[[], int] | None = None,
              timeout_retries: int | None = None) -> T:
        """``attempt`` with retries and the breaker, ``grpc.RpcError`` translated.
        After ``abort`` every try fails at once."""
        def translated(n: int) -> T:
            if self._aborted.is_set():
                raise self._cancelled(what)
            try:
                with rpc_errors(self.url, what):
                    return attempt(n)
            except ValueError:
                # gRPC's "Cannot invoke RPC on closed channel!": aborted meanwhile.
                if self._aborted.is_set():
                    raise self._cancelled(what) from None
                raise
        return self.breaker.call(self.policy, translated, progress, timeout_retries)

    def _cancelled(self, what: str) -> RemoteError:
        return RemoteError(f"remote cache {self.url}: {what} cancelled",
                           reason=RemoteErrorReason.CANCELLED)

    def stream_timeout(self, size: int) -> float:
        """The deadline of a ByteStream call moving ``size`` bytes."""
        return self.timeout_s + size / MIN_STREAM_RATE

    @property
    def batch_limit(self) -> int:
        """Bytes a batch request may hold, framing included."""
        return min(self.capabilities.max_batch_bytes, DEFAULT_BATCH_BYTES) - REQUEST_OVERHEAD \
            - len(self.instance.encode())

    def fits_batch(self, digest: Digest) -> bool:
        return digest.size + BLOB_OVERHEAD <= self.batch_limit

    def _batches(self, digests: Iterable[Digest]) -> Iterator[list[Digest]]:
        """``digests`` that fit a batch, grouped into batches under the limit."""
        batch: list[Digest] = []
        used = 0
        for digest in digests:
            cost = digest.size + BLOB_OVERHEAD
            if batch and used + cost > self.batch_limit:
                yield batch
                batch, used = [], 0
            batch.append(digest)
            used += cost
        if batch:
            yield batch

    def _executor(self) -> futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(TRANSFERS,
                                                        thread_name_prefix="hitz-remote")
            return self._pool

    def _all(self, jobs: list[Callable[[], None]]) -> None:
        """Run ``jobs`` concurrently; wait for all; raise the first error."""
        if len(jobs) <= 1:
            for job in jobs:
                job()
            return
        pending = [self._executor().submit(job) for job in jobs]
        first: BaseException | None = None
        for future in pending:
            exc = future.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    # --- CAS: queries -------------------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests of ``digests`` the remote does not hold, without repeats.
        The empty blob is never missing (REAPI: every server has it)."""
        wanted = list(dict.fromkeys(d for d in digests if d.size))
        missing: list[Digest] = []
        for start in range(0, len(wanted), FIND_MISSING_BATCH):
            part = wanted[start:start + FIND_MISSING_BATCH]
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.instance, blob_digests=[_wire(d) for d in part])
            response = self._call("FindMissingBlobs", partial(self._find_missing, request))
            known = set(part)
            for wire in response.missing_blob_digests:
                digest = _from_wire(wire)
                if digest in known:  # ignore anything we did not ask about
                    missing.append(digest)
        return missing

    def _find_missing(self, request: re_pb2.FindMissingBlobsRequest,
                      _n: int) -> re_pb2.FindMissingBlobsResponse:
        return self._cas.FindMissingBlobs(request, timeout=self.timeout_s,
                                          metadata=self._metadata)

    # --- CAS: uploads -------------------------------------------------------------------

    def upload_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Store ``blobs`` (digest -> bytes, which the caller vouches for) on the
        remote: batches for those that fit, ByteStream for the others."""
        small = [d for d in blobs if d.size and self.fits_batch(d)]
        jobs: list[Callable[[], None]] = [
            partial(self._batch_update, {d: blobs[d] for d in batch})
            for batch in self._batches(small)]
        jobs += [partial(self._write, d, remote_bytestream.BytesSource(blobs[d]))
                 for d in blobs if d.size and not self.fits_batch(d)]
        self._all(jobs)

    def upload_file(self, digest: Digest, path: str | os.PathLike[str]) -> None:
        """Store the file at ``path``, whose content is ``digest``, on the remote.
        A small file goes in one batch call, a big one is streamed from disk."""
        if not digest.size:
            return
        if self.fits_batch(digest):
            self._batch_update({digest: Path(path).read_bytes()})
        else:
            self._write(digest, remote_bytestream.FileSource(path, digest.size))

    def upload_missing(self, blobs: Mapping[Digest, bytes | Path | remote_bytestream.Source]
                       ) -> int:
        """Upload those of ``blobs`` (bytes, the path of a file holding them, or a
        ``Source`` of chunks) that the remote lacks, concurrently. Returns how
        many were uploaded."""
        missing = self.find_missing(blobs)
        small: dict[Digest, bytes | Path | remote_bytestream.Source] = {}
        jobs: list[Callable[[], None]] = []
        for digest in missing:
            value = blobs[digest]
            if self.fits_batch(digest):
                small[digest] = value
            elif isinstance(value, Path):
                jobs.append(partial(self._write, digest,
                                    remote_bytestream.FileSource(value, digest.size)))
            elif isinstance(value, bytes):
                jobs.append(partial(self._write, digest, remote_bytestream.BytesSource(value)))
            else:
                jobs.append(partial(self._write, digest, value))
        for batch in self._batches(small):
            jobs.append(partial(self._upload_batch, {d: small[d] for d in batch}))
        self._all(jobs)
        return len(missing)

    def _upload_batch(self, blobs: Mapping[Digest, bytes | Path | remote_bytestream.Source]
                      ) -> None:
        """``_batch_update`` of files or bytes; files are read here, in the worker."""
        self._batch_update({d: _content(v) for d, v in blobs.items()})

    def _batch_update(self, blobs: Mapping[Digest, bytes]) -> None:
        """One BatchUpdateBlobs of ``blobs``; blobs that failed retryably are sent again."""
        zstd = self.compress and self.capabilities.zstd_batch
        pending = dict(blobs)

        def attempt(_n: int) -> None:
            request = re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance)
            for digest, data in pending.items():
                entry = request.requests.add(digest=_wire(digest))
                packed = remote_bytestream.compress(data) if zstd and data else None
                if packed is not None and len(packed) < len(data):
                    entry.data, entry.compressor = packed, re_pb2.Compressor.ZSTD
                else:
                    entry.data = data
            response = self._cas.BatchUpdateBlobs(request, timeout=self.timeout_s,
                                                  metadata=self._metadata)
            self._settle(response.responses, pending, "BatchUpdateBlobs")
            self.stats.add(uploaded=len(blobs) - len(pending))

        self._call("BatchUpdateBlobs", attempt)

    def _settle(self, responses: Iterable[re_pb2.BatchUpdateBlobsResponse.Response],
                pending: dict[Digest, bytes], what: str) -> None:
        """Drop the blobs that succeeded from ``pending``; raise for the others
        (``RemoteUnavailable`` if all failures are retryable, so the batch is retried)."""
        errors: list[RemoteError] = []
        for entry in responses:
            digest = _from_wire(entry.digest)
            if digest not in pending:
                continue
            if entry.status.code == 0:
                del pending[digest]
            else:
                errors.append(status_error(self.url, what, _CODES.get(entry.status.code),
                                           f"{digest}: {entry.status.message}"))
        if pending and not errors:
            errors.append(RemoteError(
                f"remote cache {self.url} did not answer for {len(pending)} blobs of "
                f"a {what}", reason=RemoteErrorReason.SERVER_ERROR))
        if errors:
            final = next((e for e in errors if not isinstance(e, RemoteUnavailable)), None)
            raise final or errors[0]

    def _write(self, digest: Digest, source: remote_bytestream.Source) -> None:
        zstd = self.compress and self.capabilities.zstd and \
            remote_bytestream.worth_compressing(source)
        upload = remote_bytestream.Upload(self, digest, source, str(uuid.uuid4()), zstd)
        self._call("ByteStream.Write", upload.attempt, upload.progress)
        self.stats.add(uploaded=1, streamed=1)

    # --- CAS: downloads -----------------------------------------------------------------

    def read_blob(self, digest: Digest) -> bytes:
        """The blob ``digest``, verified. Raises ``RemoteBlobMissing``,
        ``RemoteBlobCorrupt`` (the remote sent other bytes), ``RemoteError``."""
        if not digest.size:
            return b""
        if self.fits_batch(digest):
            return self._batch_read([digest])[digest]
        return remote_bytestream.Download(self, digest).to_bytes()

    def download_file(self, digest: Digest, dest: str | os.PathLike[str]) -> None:
        """Write the blob ``digest`` to ``dest``, streamed and verified: a temp file
        beside ``dest`` is renamed over it only once the whole blob matched, so
        ``dest`` is untouched on any error. Raises like ``read_blob``, and
        ``OSError`` if ``dest`` can't be written."""
        remote_bytestream.Download(self, digest).to_file(dest)

    def download_to(self, digest: Digest, fd: int) -> None:
        """Write the blob ``digest`` into the open file ``fd``, streamed and
        verified, for a caller that owns a temp file (the task cache puts it in
        the store's tmp/, which is swept after a crash). On any error the file
        holds something else: the caller drops it. Raises like ``read_blob``."""
        remote_bytestream.Download(self, digest).to_fd(fd)

    def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The blobs ``digests``, verified, read concurrently: small ones in
        batches, big ones streamed. Raises as ``read_blob`` for the first that fails."""
        wanted = list(dict.fromkeys(digests))
        found: dict[Digest, bytes] = {d: b"" for d in wanted if not d.size}
        lock = threading.Lock()

        def batch(part: list[Digest]) -> None:
            got = self._batch_read(part)
            with lock:
                found.update(got)

        def stream(digest: Digest) -> None:
            data = remote_bytestream.Download(self, digest).to_bytes()
            with lock:
                found[digest] = data

        small = [d for d in wanted if d.size and self.fits_batch(d)]
        jobs: list[Callable[[], None]] = [partial(batch, p) for p in self._batches(small)]
        jobs += [partial(stream, d) for d in wanted if d.size and not self.fits_batch(d)]
        self._all(jobs)
        return found

    def read_blob_groups(self, digests: Iterable[Digest], limit: int = READ_GROUP_BYTES
                         ) -> Iterator[dict[Digest, bytes]]:
        """``read_blobs`` of ``digests`` a group of at most ``limit`` bytes at a
        time (a blob bigger than that alone): concurrent within a group, and
        never more than a group in memory, however many blobs are asked."""
        group: list[Digest] = []
        size = 0
        for digest in dict.fromkeys(digests):
            if group and size + digest.size > limit:
                yield self.read_blobs(group)
                group, size = [], 0
            group.append(digest)
            size += digest.size
        if group:
            yield self.read_blobs(group)

    def _batch_read(self, digests: list[Digest]) -> dict[Digest, bytes]:
        """One BatchReadBlobs; every blob verified, retryable failures asked again."""
        zstd = self.compress and self.capabilities.zstd_batch
        found: dict[Digest, bytes] = {}
        pending = set(digests)

        def attempt(_n: int) -> None:
            request = re_pb2.BatchReadBlobsRequest(
                instance_name=self.instance, digests=[_wire(d) for d in digests if d in pending])
            if zstd:
                request.acceptable_compressors.append(re_pb2.Compressor.ZSTD)
            response = self._cas.BatchReadBlobs(request, timeout=self.timeout_s,
                                                metadata=self._metadata)
            errors: list[RemoteError] = []
            for entry in response.responses:
                digest = _from_wire(entry.digest)
                if digest not in pending:
                    continue
                if entry.status.code != 0:
                    errors.append(status_error(self.url, "BatchReadBlobs",
                                               _CODES.get(entry.status.code),
                                               f"{digest}: {entry.status.message}"))
                    continue
                data = entry.data
                if entry.compressor == re_pb2.Compressor.ZSTD:
                    data = remote_bytestream.decompress(self.url, digest, data)
                elif entry.compressor != re_pb2.Compressor.IDENTITY:
                    raise RemoteError(f"remote cache {self.url} sent a blob compressed in a "
                                      "way hitz did not ask for",
                                      reason=RemoteErrorReason.REFUSED)
                remote_bytestream.verify(self.url, digest, data)
                found[digest] = data
                pending.discard(digest)
            if pending and not errors:
                errors.append(RemoteError(
                    f"remote cache {self.url} did not answer for {len(pending)} blobs of "
                    "a BatchReadBlobs", reason=RemoteErrorReason.SERVER_ERROR))
            if errors:
                final = next((e for e in errors if not isinstance(e, RemoteUnavailable)), None)
                raise final or errors[0]

        self._call("BatchReadBlobs", attempt)
        self.stats.add(downloaded=len(found))
        return found

    # --- action cache -------------------------------------------------------------------

    def get_action_result(self, action: Digest) -> re_pb2.ActionResult | None:
        """The remote's result for ``action``, or None if it has none (NOT_FOUND)."""
        request = re_pb2.GetActionResultRequest(instance_name=self.instance,
                                                action_digest=_wire(action))
        try:
            return self._call("GetActionResult", lambda _n: self._ac.GetActionResult(
                request, timeout=self.timeout_s, metadata=self._metadata))
        except RemoteBlobMissing:
            return None

    def update_action_result(self, action: Digest, result: re_pb2.ActionResult) -> None:
        """Store ``result`` for ``action``. The caller uploads the blobs it names
        first (REAPI asks that of clients). Raises ``RemoteError`` if the server
        refuses updates (``capabilities.update_enabled`` says so beforehand)."""
        request = re_pb2.UpdateActionResultRequest(instance_name=self.instance,
                                                   action_digest=_wire(action),
                                                   action_result=result)
        self._call("UpdateActionResult", lambda _n: self._ac.UpdateActionResult(
            request, timeout=self.timeout_s, metadata=self._metadata))

    # --- lifetime -----------------------------------------------------------------------

    def abort(self) -> None:
        """Cancel every call in flight and refuse new ones (a Ctrl-C): closing
        the channel ends the calls of other threads with CANCELLED at once;
        queued transfers are dropped. Returns without waiting. Idempotent;
        ``close`` still applies."""
        self._aborted.set()
        self._channel.close()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the transfer threads and close the channel. Idempotent."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass
class TransferStats:
    """What one client moved; thread-safe through ``add``."""

    uploaded: int = 0  # blobs
    downloaded: int = 0
    streamed: int = 0  # of which through ByteStream
    bytes_up: int = 0
    bytes_down: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


def _content(value: bytes | Path | remote_bytestream.Source) -> bytes:
    if isinstance(value, Path):
        return value.read_bytes()
    if isinstance(value, bytes):
        return value
    return b"".join(value.chunks())


__all__ += ["RemoteBlobCorrupt", "RemoteBlobMissing", "RemoteError", "RemoteUnavailable",
            "TransferStats"]
