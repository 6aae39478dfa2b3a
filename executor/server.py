"""`hitz cache serve`: the local store, served to REAPI clients over gRPC.

A REAPI v2 cache server (no execution) backed by one ``Store``: Bazel
(``--remote_cache=grpc://HOST:PORT``), hitz itself on another machine, or any
REAPI client can read and write the same cache that ``hitz run`` uses on this
one. docs/cache-server.md is the user's guide. What it serves:

- **Capabilities**: SHA-256; batches of up to ``MAX_BATCH_TOTAL_SIZE``; the
  action cache may be updated; zstd for ByteStream and batch calls; absolute
  symlink targets disallowed; REAPI 2.0 to 2.3.
- **ContentAddressableStorage**: FindMissingBlobs, BatchUpdateBlobs (each blob
  checked against its digest), BatchReadBlobs, GetTree (paged).
- **ByteStream** (``hitz.executor.server_bytestream``): Read, Write and
  QueryWriteStatus, with zstd ``compressed-blobs`` and resumable writes.
- **ActionCache**: GetActionResult answers ``NOT_FOUND`` for a result whose
  outputs the store no longer has all of (REAPI allows it, and a client then
  runs the action instead of failing to download); UpdateActionResult.

**Instance names** are accepted whatever they are and all reach the one
store: a blob is the same blob whoever asks, and an action digest already
says everything an instance name could.

**Threads.** gRPC runs each call on a thread of a pool of ``WORKERS``. The
``Store`` is safe to share between them: its entries are written to temp
files and renamed, so threads race like processes do (safely), its counters
have a lock, and zstd contexts are per thread. The uploads table has its own
lock.

**Errors** become gRPC statuses in one place, ``server_border.rpc_border``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from hitz.executor.errors import BlobMissing, HitzError, UsageError
from hitz.executor.server_border import (
    RequestReason,
    RequestRejected,
    digest_from_wire,
    digest_to_wire,
    require_sha256,
    rpc_border,
    status_of,
    zstd_compress,
    zstd_decompress,
)
from hitz.executor.server_bytestream import MAX_PARTIAL_UPLOADS, ByteStreamService, Uploads
from hitz.executor.store import Digest, Store, default_folder
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from hitz.protos.build.bazel.semver import semver_pb2
from hitz.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

__all__ = [
    "DEFAULT_LISTEN",
    "MAX_BATCH_TOTAL_SIZE",
    "CacheServer",
    "parse_listen",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8980"
MAX_BATCH_TOTAL_SIZE = 4 << 20  # blob bytes per batch call; bigger goes through ByteStream
# gRPC refuses messages over 4 MiB by default. A batch of 4 MiB of blobs is
# more than that on the wire (each blob adds its digest and framing), so the
# server accepts and sends up to this.
GRPC_MESSAGE_LIMIT = 16 << 20
WORKERS = 32  # calls served at once; a waiting ByteStream Write holds one
DRAIN_S = 10.0  # on SIGTERM/SIGINT, how long calls in flight may take to finish
# Partial ByteStream uploads kept open at most, over MAX_PARTIAL_UPLOADS
# (docs/cache-server.md); tests set a small one.
ENV_MAX_PARTIAL = "HITZ_SERVE_MAX_PARTIAL_UPLOADS"
TREE_PAGE_DIRECTORIES = 1000  # GetTree page size when the client names none
TREE_PAGE_BYTES = 2 << 20  # and a page stays under this, to fit gRPC's limit
INLINE_BYTES = 1 << 20  # GetActionResult inlines stdout/stderr/files up to this in all
_M = TypeVar("_M", bound=ProtoMessage)
LOW_API = semver_pb2.SemVer(major=2, minor=0)
HIGH_API = semver_pb2.SemVer(major=2, minor=3)  # our protos carry 2.3's fields (digest_function)


# --- the services ---------------------------------------------------------------------


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re_pb2.ServerCapabilities:
        with rpc_border(context, "GetCapabilities"):
            return re_pb2.ServerCapabilities(
                cache_capabilities=re_pb2.CacheCapabilities(
                    digest_functions=[re_pb2.DigestFunction.SHA256],
                    action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                        update_enabled=True),
                    max_batch_total_size_bytes=MAX_BATCH_TOTAL_SIZE,
                    symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
                    supported_compressors=[re_pb2.Compressor.ZSTD],
                    supported_batch_update_compressors=[re_pb2.Compressor.ZSTD],
                ),
                execution_capabilities=re_pb2.ExecutionCapabilities(
                    digest_function=re_pb2.DigestFunction.SHA256,
                    digest_functions=[re_pb2.DigestFunction.SHA256],
                    exec_enabled=False,
                ),
                low_api_version=LOW_API,
                high_api_version=HIGH_API,
            )


class CasService(re_grpc.ContentAddressableStorageServicer):
    """FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs and GetTree on ``store``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.FindMissingBlobsResponse:
        with rpc_border(context, "FindMissingBlobs"):
            require_sha256(request.digest_function)
            wanted = [digest_from_wire(d) for d in request.blob_digests]
            return re_pb2.FindMissingBlobsResponse(
                missing_blob_digests=[digest_to_wire(d) for d in self._store.missing(wanted)])

    def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchUpdateBlobsResponse:
        with rpc_border(context, "BatchUpdateBlobs"):
            require_sha256(request.digest_function)
            _check_batch_size(d.digest.size_bytes for d in request.requests)
            response = re_pb2.BatchUpdateBlobsResponse()
            for blob in request.requests:
                status = response.responses.add(digest=blob.digest).status
                try:
                    self._update_one(blob)
                except HitzError as exc:
                    status.CopyFrom(status_of(exc))
            return response

    def _update_one(self, blob: re_pb2.BatchUpdateBlobsRequest.Request) -> None:
        digest = digest_from_wire(blob.digest)
        if blob.compressor == re_pb2.Compressor.ZSTD:
            data = zstd_decompress(blob.data, digest.size)
        elif blob.compressor == re_pb2.Compressor.IDENTITY:
            data = blob.data
        else:
            raise RequestRejected(
                f"compressor {_compressor_name(blob.compressor)} is not supported; "
                "this server speaks ZSTD and IDENTITY", reason=RequestReason.UNSUPPORTED)
        got = Digest.of(data)
        if got != digest:
            raise RequestRejected(f"the data is {got}, not {digest} as its digest says",
                                  reason=RequestReason.BAD_DATA)
        self._store.put_bytes(data)

    def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchReadBlobsResponse:
        with rpc_border(context, "BatchReadBlobs"):
            require_sha256(request.digest_function)
            _check_batch_size(d.size_bytes for d in request.digests)
            zstd = re_pb2.Compressor.ZSTD in request.acceptable_compressors
            digests = [digest_from_wire(d) for d in request.digests]
            response = re_pb2.BatchReadBlobsResponse()
            for wire, digest in zip(request.digests, digests, strict=True):
                entry = response.responses.add(digest=wire)
                try:
                    data = self._store.read_bytes(digest)
                except BlobMissing as exc:
                    entry.status.CopyFrom(status_of(exc))
                    continue
                packed = zstd_compress(data) if zstd and data else None
                if packed is not None and len(packed) < len(data):
                    entry.data, entry.compressor = packed, re_pb2.Compressor.ZSTD
                else:
                    entry.data = data
            return response

    def GetTree(
        self, request: re_pb2.GetTreeRequest, context: grpc.ServicerContext
    ) -> Iterator[re_pb2.GetTreeResponse]:
        with rpc_border(context, "GetTree"):
            require_sha256(request.digest_function)
            root = digest_from_wire(request.root_digest)
            start = _page_token(request.page_token)
            page_size = request.page_size if request.page_size > 0 else TREE_PAGE_DIRECTORIES
            yield from _pages(self._walk(root), start, page_size)

    def _walk(self, root: Digest) -> Iterator[re_pb2.Directory]:
        """The Directory messages of the tree at ``root``, breadth first, each once.

        The root must be there (``BlobMissing``) and be a Directory
        (``RequestRejected``); a directory below it that is missing or is not
        one is left out with what is under it, as REAPI's GetTree says.
        """
        root_directory = _parse(re_pb2.Directory, self._store.read_bytes(root))
        if root_directory is None:
            raise RequestRejected(f"blob {root} is not a Directory",
                                  reason=RequestReason.BAD_DATA)
        seen = {root}
        level = [root_directory]
        while level:
            below: list[re_pb2.Directory] = []
            for directory in level:
                yield directory
                for node in directory.directories:
                    try:
                        digest = digest_from_wire(node.digest)
                    except RequestRejected:
                        continue
                    if digest in seen:
                        continue
                    seen.add(digest)
                    try:
                        child = _parse(re_pb2.Directory, self._store.read_bytes(digest))
                    except BlobMissing:
                        continue
                    if child is not None:
                        below.append(child)
            level = below


class ActionCacheService(re_grpc.ActionCacheServicer):
    """GetActionResult and UpdateActionResult on ``store``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        with rpc_border(context, "GetActionResult"):
            require_sha256(request.digest_function)
            action = digest_from_wire(request.action_digest)
            data = self._store.get_action_result(action)
            result = None if data is None else _parse(re_pb2.ActionResult, data)
            if result is None:
                raise RequestRejected(f"no result for action {action}",
                                      reason=RequestReason.NO_RESULT)
            missing = self._missing_outputs(result)
            if missing:
                raise RequestRejected(
                    f"the result for action {action} names {len(missing)} blobs that are "
                    f"no longer in the cache, such as {missing[0]}",
                    reason=RequestReason.NO_RESULT)
            self._inline(result, request)
            return result

    def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        with rpc_border(context, "UpdateActionResult"):
            require_sha256(request.digest_function)
            action = digest_from_wire(request.action_digest)
            self._store.put_action_result(
                action, request.action_result.SerializeToString(deterministic=True))
            return request.action_result

    def _missing_outputs(self, result: re_pb2.ActionResult) -> list[Digest]:
        """The blobs ``result`` refers to that the store lacks, output trees' files included.

        A tree that is there but unreadable counts as missing.
        """
        direct = [f.digest for f in result.output_files]
        direct += [d.tree_digest for d in result.output_directories if d.HasField("tree_digest")]
        direct += [d.root_directory_digest for d in result.output_directories
                   if d.HasField("root_directory_digest")]
        direct += [d for d in (result.stdout_digest, result.stderr_digest) if d.size_bytes]
        wanted = [digest_from_wire(d) for d in direct]
        missing = self._store.missing(wanted)
        if missing:
            return missing
        files: list[Digest] = []
        for out_dir in result.output_directories:
            if not out_dir.HasField("tree_digest"):
                continue
            tree_digest = digest_from_wire(out_dir.tree_digest)
            try:
                tree = _parse(re_pb2.Tree, self._store.read_bytes(tree_digest))
            except BlobMissing:
                return [tree_digest]
            if tree is None:
                return [tree_digest]
            for directory in (tree.root, *tree.children):
                files += [digest_from_wire(f.digest) for f in directory.files]
        return self._store.missing(files)

    def _inline(self, result: re_pb2.ActionResult, request: re_pb2.GetActionResultRequest) -> None:
        """Fill in the raw stdout, stderr and file contents the client asked for, while
        they fit in ``INLINE_BYTES`` (REAPI lets a server inline less than asked)."""
        budget = INLINE_BYTES
        stdout, stderr = result.stdout_digest, result.stderr_digest
        if request.inline_stdout and not result.stdout_raw and 0 < stdout.size_bytes <= budget:
            budget -= stdout.size_bytes
            result.stdout_raw = self._store.read_bytes(digest_from_wire(stdout))
        if request.inline_stderr and not result.stderr_raw and 0 < stderr.size_bytes <= budget:
            budget -= stderr.size_bytes
            result.stderr_raw = self._store.read_bytes(digest_from_wire(stderr))
        wanted = set(request.inline_output_files)
        for out in result.output_files:
            if out.path in wanted and not out.contents and 0 < out.digest.size_bytes <= budget:
                budget -= out.digest.size_bytes
                out.contents = self._store.read_bytes(digest_from_wire(out.digest))


def _check_batch_size(sizes: Iterable[int]) -> None:
    total = sum(sizes)
    if total > MAX_BATCH_TOTAL_SIZE:
        raise RequestRejected(
            f"the batch holds {total} bytes of blobs, over this server's "
            f"max_batch_total_size_bytes ({MAX_BATCH_TOTAL_SIZE}); "
            "send bigger blobs with ByteStream", reason=RequestReason.TOO_BIG)


def _compressor_name(value: int) -> str:
    if value in re_pb2.Compressor.Value.values():
        return re_pb2.Compressor.Value.Name(value)
    return str(value)


def _parse(cls: type[_M], data: bytes) -> _M | None:
    """``data`` parsed as a ``cls``; None if it is not one."""
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


def _page_token(token: str) -> int:
    """GetTree's page token: how many directories earlier pages returned."""
    if not token:
        return 0
    if not token.isascii() or not token.isdigit():
        raise RequestRejected(f"page_token `{token}` is not one this server gave",
                              reason=RequestReason.BAD_OFFSET)
    return int(token)


def _pages(
    directories: Iterator[re_pb2.Directory], start: int, page_size: int
) -> Iterator[re_pb2.GetTreeResponse]:
    """GetTree's responses: the ``directories`` after the first ``start``, in pages of
    at most ``page_size`` and about ``TREE_PAGE_BYTES``. Each page's
    ``next_page_token`` resumes after it; the last page's is empty."""
    page = re_pb2.GetTreeResponse()
    page_bytes = 0
    position = 0
    for directory in directories:
        position += 1
        if position <= start:
            continue
        size = directory.ByteSize()
        if page.directories and (len(page.directories) >= page_size
                                 or page_bytes + size > TREE_PAGE_BYTES):
            page.next_page_token = str(position - 1)
            yield page
            page = re_pb2.GetTreeResponse()
            page_bytes = 0
        page.directories.append(directory)
        page_bytes += size
    yield page


# --- the server -----------------------------------------------------------------------


class CacheServer:
    """The gRPC server of the services above, on one ``Store``.

    ``start`` binds and serves in gRPC's threads; ``stop`` drains. The caller
    owns the store and closes it after ``stop``.
    """

    def __init__(self, store: Store, *, workers: int = WORKERS,
                 max_partial_uploads: int = MAX_PARTIAL_UPLOADS) -> None:
        self.store = store
        self.uploads = Uploads(store, max_partial=max_partial_uploads)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reapi"),
            options=[
                # gRPC sets SO_REUSEPORT by default: a second server on a port
                # in use would then share it silently instead of failing.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
                ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
            ],
        )
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(), self._server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(store), self._server)
        re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(store), self._server)
        bs_grpc.add_ByteStreamServicer_to_server(ByteStreamService(store, self.uploads),
                                                 self._server)

    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0: any free one) and serve; return the port.

        Raises ``UsageError`` if the address can't be listened on.
        """
        address = _grpc_address(host, port)
        _check_can_listen(host, port)
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError:  # gRPC says only "Failed to bind"; the probe said why if it could
            raise _cannot_listen(host, port, "gRPC could not bind it") from None
        self._server.start()
        return bound

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls; cancel those still running after ``grace`` seconds
        (None: at once). The event is set once all have ended."""
        return self._server.stop(grace)

    def close(self) -> None:
        """Stop at once if not stopped yet, and remove the partial uploads' temp files."""
        self._server.stop(None).wait()
        self.uploads.close()


def serve(listen: str, cache_dir: str | None) -> int:
    """Run `hitz cache serve` until SIGTERM (exit status 0) or SIGINT (130).

    Prints ``serving REAPI cache at HOST:PORT (cache: DIR)`` on stderr once
    clients can connect. On a signal, stops taking calls and lets those in
    flight finish for up to ``DRAIN_S`` seconds (a second signal cuts that
    short). Raises ``UsageError`` for a bad or busy ``listen`` address and
    ``CacheUnavailable`` if the cache folder can't be used.
    """
    from hitz.executor.runner import DEFAULT_CACHE_BYTES

    host, port = parse_listen(listen)
    max_partial = _max_partial_uploads(os.environ.get(ENV_MAX_PARTIAL))
    folder = Path(cache_dir) if cache_dir else default_folder()
    _log_to_stderr()
    with _StopSignals() as signals, contextlib.ExitStack() as cleanup:
        store = Store(folder, max_bytes=DEFAULT_CACHE_BYTES)
        # record_run=False: serving is not a run of tasks, whose hit rate
        # `hitz cache stats` reports; the store's growth is still recorded.
        cleanup.callback(store.close, record_run=False)
        server = CacheServer(store, max_partial_uploads=max_partial)
        cleanup.callback(server.close)
        signals.on_second = lambda: server.stop(None)
        address = _grpc_address(host, server.start(host, port))
        if not _is_loopback(host):
            sys.stderr.write(f"warning: `hitz cache serve` has no TLS and no authentication; "
                             f"anyone who can reach {address} can read and write this cache\n")
        sys.stderr.write(f"serving REAPI cache at {address} (cache: {folder})\n")
        sys.stderr.flush()
        signum = signals.wait()
        sys.stderr.write(f"{signal.Signals(signum).name}: stopping; calls in flight have "
                         f"{DRAIN_S:g} s to finish\n")
        sys.stderr.flush()
        server.stop(DRAIN_S).wait()
    return 130 if signum == signal.SIGINT else 0


def _max_partial_uploads(text: str | None) -> int:
    """``$HITZ_SERVE_MAX_PARTIAL_UPLOADS``, a whole number >= 1; the default if unset."""
    if text is None or not text.strip():
        return MAX_PARTIAL_UPLOADS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(
            f"${ENV_MAX_PARTIAL} must be a whole number of uploads, at least 1, got `{text}`",
            hint=f"unset it for the default ({MAX_PARTIAL_UPLOADS}), or set for example "
            f"`{ENV_MAX_PARTIAL}=1024`")
    return value


# What signal.signal() returns and takes: a function, SIG_DFL/SIG_IGN, or None.
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _StopSignals:
    """SIGINT and SIGTERM, caught while in the ``with`` block (the previous
    handlers come back after): ``wait`` returns the first one, and a second
    one calls ``on_second``."""

    def __init__(self) -> None:
        self.on_second: Callable[[], object] | None = None
        self._received: list[int] = []
        self._event = threading.Event()
        self._previous: dict[int, _Handler] = {}

    def __enter__(self) -> Self:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)
        self._event.set()
        if len(self._received) > 1 and self.on_second is not None:
            self.on_second()

    def wait(self) -> int:
        self._event.wait()
        return self._received[0]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); ``UsageError`` if not."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isascii() or not port_text.isdigit() or (
            int(port_text) > 65535):
        raise UsageError(
            f"--listen wants HOST:PORT, got `{text}`",
            hint=f"for example `--listen {DEFAULT_LISTEN}`, or `--listen 127.0.0.1:0` "
            "for any free port")
    return host, int(port_text)


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` with a plain socket and let go, to say in words why it
    can't be listened on (gRPC only says "Failed to bind"). ``UsageError`` if not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _cannot_listen(host, port, f"unknown host ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    reason = "the port is in use"
                raise _cannot_listen(host, port, reason) from None


def _cannot_listen(host: str, port: int, reason: str) -> UsageError:
    return UsageError(
        f"can't listen on `{_grpc_address(host, port)}`: {reason}",
        hint="choose another port, such as `--listen 127.0.0.1:0` for any free one")


class _Voice(logging.Formatter):
    """Log records as the CLI speaks: ``warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _log_to_stderr() -> None:
    """Warnings of the store and the services (a corrupt blob removed, a full
    disk, a bug's traceback) go to stderr, the server's log."""
    root = logging.getLogger("hitz")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Voice())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
