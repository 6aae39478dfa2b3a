"""`hitz cache serve`, the real server, through the real gRPC stubs.

Each test starts ``hitz cache serve --listen 127.0.0.1:0`` as a subprocess
on a cache folder of its own, waits for its ``serving REAPI cache at ...``
line (which names the port it got) and talks to it as any REAPI client
would, with the generated stubs of ``hitz.protos``. A ``Store`` opened
directly on the same folder checks that what the server stores is the local
cache that ``hitz run`` uses, and the other way round. The server is killed
by PID at teardown if a test left it running.

``start_server`` and ``ServedCache`` are also what the Bazel interop test
(test_bazel_interop.py) uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import zstandard

from hitz.executor.store import Digest, Store
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from hitz.protos.google.bytestream import bytestream_pb2 as bs_pb2
from hitz.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from tests.helpers import EXIT_GUARD_S, HITZ, _default_signals, wait_for

MIB = 1 << 20
READY = re.compile(r"serving REAPI cache at (127\.0\.0\.1:(\d+)) \(cache: (.*)\)\n")
START_GUARD_S = 30.0  # the server is ready in well under a second; this only stops a hang
CALL_GUARD_S = 120.0  # a deadline on every call, so a hung server fails the test
ZSTD = re_pb2.Compressor.ZSTD


# --- the server under test ------------------------------------------------------------


@dataclass
class ServedCache:
    """A running `hitz cache serve` and the way to talk to it."""

    proc: subprocess.Popen[bytes]
    address: str  # 127.0.0.1:PORT
    cache_dir: Path
    log: Path  # its stderr

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> int:
        """Send ``signum`` and wait for the server to exit; its exit status."""
        self.proc.send_signal(signum)
        return self.wait()

    def wait(self) -> int:
        """Wait for the server to exit (failing the test if it does not); its exit status."""
        try:
            return self.proc.wait(timeout=EXIT_GUARD_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`hitz cache serve` (pid {self.proc.pid}) was still running "
                        f"{EXIT_GUARD_S:g}s after it was told to stop\n{self.stderr()}")

    def kill(self) -> None:
        """SIGKILL the server by its PID if it still runs, and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_server(cache_dir: Path, log: Path, listen: str = "127.0.0.1:0",
                 env: dict[str, str] | None = None) -> ServedCache:
    """Start `hitz cache serve` (``env`` added to its environment) and return once
    it says it is serving."""
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [*HITZ, "cache", "serve", "--listen", listen, "--cache-dir", str(cache_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
            start_new_session=True,  # signals from the test reach the server alone
            preexec_fn=_default_signals,
        )

    def ready() -> re.Match[str] | None:
        text = log.read_text(errors="replace")
        if proc.poll() is not None:
            pytest.fail(f"`hitz cache serve` exited with status {proc.returncode}:\n{text}")
        return READY.search(text)

    try:
        found = wait_for(ready, "`hitz cache serve` to say it is serving", guard_s=START_GUARD_S)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert found.group(3) == str(cache_dir)
    return ServedCache(proc, found.group(1), cache_dir, log)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServedCache]:
    served = start_server(tmp_path / "cache", tmp_path / "serve.log")
    yield served
    served.kill()


@dataclass
class Stubs:
    cas: re_grpc.ContentAddressableStorageStub
    ac: re_grpc.ActionCacheStub
    capabilities: re_grpc.CapabilitiesStub
    bytestream: bs_grpc.ByteStreamStub


@pytest.fixture
def stubs(server: ServedCache) -> Iterator[Stubs]:
    with grpc.insecure_channel(server.address) as channel:
        yield Stubs(
            re_grpc.ContentAddressableStorageStub(channel),
            re_grpc.ActionCacheStub(channel),
            re_grpc.CapabilitiesStub(channel),
            bs_grpc.ByteStreamStub(channel),
        )


# --- helpers --------------------------------------------------------------------------


def wire(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def blob_name(data: bytes, *, compressed: bool = False, instance: str = "") -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    name = f"{kind}/{hashlib.sha256(data).hexdigest()}/{len(data)}"
    return f"{instance}/{name}" if instance else name


def upload_name(data: bytes, *, compressed: bool = False, instance: str = "") -> str:
    name = f"uploads/{uuid.uuid4()}/{blob_name(data, compressed=compressed)}"
    return f"{instance}/{name}" if instance else name


def write_requests(name: str, payload: bytes, *, offset: int = 0,
                   finish: bool = True) -> Iterator[bs_pb2.WriteRequest]:
    """``payload`` (the bytes as sent: zstd for a compressed name) from ``offset`` on."""
    pieces = [payload[i:i + MIB] for i in range(0, len(payload), MIB)] or [b""]
    position = offset
    for i, piece in enumerate(pieces):
        yield bs_pb2.WriteRequest(
            resource_name=name if i == 0 else "",
            write_offset=position,
            data=piece,
            finish_write=finish and i == len(pieces) - 1,
        )
        position += len(piece)


def write(stubs: Stubs, name: str, payload: bytes, *, offset: int = 0, finish: bool = True) -> int:
    requests = write_requests(name, payload, offset=offset, finish=finish)
    return stubs.bytestream.Write(requests, timeout=CALL_GUARD_S).committed_size


def read(stubs: Stubs, name: str, offset: int = 0, limit: int = 0) -> bytes:
    request = bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    pieces = [r.data for r in stubs.bytestream.Read(request, timeout=CALL_GUARD_S)]
    assert all(len(p) <= MIB for p in pieces)
    return b"".join(pieces)


def committed_size(stubs: Stubs, name: str) -> int:
    """What QueryWriteStatus says of the upload ``name``; -1 while it is unknown."""
    try:
        return stubs.bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=name)).committed_size
    except grpc.RpcError as error:  # NOT_FOUND until the server has the first request
        assert code(error) == grpc.StatusCode.NOT_FOUND, details(error)
        return -1


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The ``grpc.RpcError`` that ``call()`` raises (failing the test if none)."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return caught.value


def code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()  # a grpc.Call too, as every RpcError of a call is


def details(error: grpc.RpcError) -> str:
    return error.details()


def mixed_bytes(size: int, seed: int) -> bytes:
    """``size`` bytes that zstd can shrink some but not all: text runs and noise."""
    rng = random.Random(seed)
    parts = []
    while sum(len(p) for p in parts) < size:
        parts.append(rng.randbytes(4096))
        parts.append((f"line {rng.random()} of a build log\n" * 200).encode())
    return b"".join(parts)[:size]


# --- capabilities ---------------------------------------------------------------------


def test_capabilities_say_what_the_server_does(stubs: Stubs) -> None:
    caps = stubs.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=""))
    cache = caps.cache_capabilities
    assert list(cache.digest_functions) == [re_pb2.DigestFunction.SHA256]
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.max_batch_total_size_bytes == 4 * MIB
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
    assert list(cache.supported_compressors) == [ZSTD]
    assert list(cache.supported_batch_update_compressors) == [ZSTD]
    assert not caps.execution_capabilities.exec_enabled
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 3)


# --- batch calls ----------------------------------------------------------------------


def test_batch_update_then_find_missing_and_batch_read(stubs: Stubs) -> None:
    small, empty, text = b"hello, cache", b"", b"compressible text\n" * 1000
    absent = b"never uploaded"
    missing = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[wire(small), wire(text), wire(empty), wire(absent)]))
    assert [d.hash for d in missing.missing_blob_digests] == [
        wire(small).hash, wire(text).hash, wire(absent).hash]  # the empty blob is always there

    Req = re_pb2.BatchUpdateBlobsRequest.Request
    updated = stubs.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        Req(digest=wire(small), data=small),
        Req(digest=wire(empty), data=empty),
        Req(digest=wire(text), data=zstandard.ZstdCompressor().compress(text), compressor=ZSTD),
    ]))
    assert [r.status.code for r in updated.responses] == [0, 0, 0]

    missing = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[wire(small), wire(text), wire(empty), wire(absent)]))
    assert [d.hash for d in missing.missing_blob_digests] == [wire(absent).hash]

    got = stubs.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[wire(small), wire(empty), wire(text), wire(absent)]))
    assert [(r.status.code, r.compressor, r.data) for r in got.responses] == [
        (0, 0, small), (0, 0, empty), (0, 0, text),
        (grpc.StatusCode.NOT_FOUND.value[0], 0, b"")]

    got = stubs.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[wire(text)], acceptable_compressors=[ZSTD]))
    (entry,) = got.responses
    assert entry.compressor == ZSTD and len(entry.data) < len(text)
    assert zstandard.ZstdDecompressor().decompress(entry.data) == text


def test_batch_update_refuses_a_blob_that_does_not_match_its_digest(stubs: Stubs) -> None:
    good, claimed, sent = b"good blob", b"what the digest says", b"what was sent"
    Req = re_pb2.BatchUpdateBlobsRequest.Request
    updated = stubs.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        Req(digest=wire(claimed), data=sent),
        Req(digest=wire(good), data=good),
        Req(digest=wire(claimed), data=b"not zstd", compressor=ZSTD),
    ]))
    statuses = [(r.status.code, r.status.message) for r in updated.responses]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert statuses[0] == (invalid, f"the data is {Digest.of(sent)}, not {Digest.of(claimed)} "
                                    "as its digest says")
    assert statuses[1] == (0, "")
    assert statuses[2][0] == invalid
    assert statuses[2][1].startswith("the data is not a valid zstd frame")
    missing = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[wire(claimed), wire(sent), wire(good)]))
    assert [d.hash for d in missing.missing_blob_digests] == [wire(claimed).hash, wire(sent).hash]


def test_batch_calls_over_the_size_limit_are_refused(stubs: Stubs) -> None:
    big = re_pb2.Digest(hash="ab" * 32, size_bytes=4 * MIB + 1)
    error = rpc_error(lambda: stubs.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[big])))
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error) == (
        "the batch holds 4194305 bytes of blobs, over this server's max_batch_total_size_bytes "
        "(4194304); send bigger blobs with ByteStream")


def test_a_malformed_digest_is_invalid_argument(stubs: Stubs) -> None:
    bad = re_pb2.Digest(hash="ABC", size_bytes=3)
    error = rpc_error(lambda: stubs.cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[bad])))
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error) == ("`ABC/3` is not a digest: REAPI wants `HASH/SIZE`, a SHA-256 in "
                              "64 lowercase hex digits and a size >= 0")


# --- ByteStream -----------------------------------------------------------------------


def test_bytestream_round_trips_64_mib_plain_and_zstd(stubs: Stubs) -> None:
    plain = mixed_bytes(64 * MIB, seed=1)
    assert write(stubs, upload_name(plain), plain) == len(plain)
    assert read(stubs, blob_name(plain)) == plain
    frame = read(stubs, blob_name(plain, compressed=True))
    assert len(frame) < len(plain)
    assert zstandard.ZstdDecompressor().decompress(frame) == plain

    packed = mixed_bytes(64 * MIB, seed=2)
    frame = zstandard.ZstdCompressor(level=3).compress(packed)
    assert write(stubs, upload_name(packed, compressed=True), frame) == len(frame)
    assert read(stubs, blob_name(packed)) == packed
    assert zstandard.ZstdDecompressor().decompress(
        read(stubs, blob_name(packed, compressed=True))) == packed


def test_the_empty_blob_over_bytestream(stubs: Stubs) -> None:
    assert write(stubs, upload_name(b""), b"") == 0
    assert read(stubs, blob_name(b"")) == b""
    frame = read(stubs, blob_name(b"", compressed=True))
    assert zstandard.ZstdDecompressor().decompress(frame) == b""


def test_read_offset_and_limit(stubs: Stubs) -> None:
    data = mixed_bytes(3 * MIB + 12345, seed=3)
    write(stubs, upload_name(data), data)
    name = blob_name(data)
    assert read(stubs, name, offset=MIB + 7) == data[MIB + 7:]
    assert read(stubs, name, offset=5, limit=2 * MIB) == data[5:5 + 2 * MIB]
    assert read(stubs, name, offset=len(data)) == b""
    assert read(stubs, name, offset=len(data) - 1, limit=100) == data[-1:]
    # Offsets of a compressed read count bytes of the frame, which is the same every time.
    frame = read(stubs, blob_name(data, compressed=True))
    assert read(stubs, blob_name(data, compressed=True), offset=1000, limit=5000) == (
        frame[1000:6000])
    error = rpc_error(lambda: read(stubs, name, offset=len(data) + 1))
    assert code(error) == grpc.StatusCode.OUT_OF_RANGE


def test_a_corrupt_blob_is_never_served_whole(server: ServedCache, stubs: Stubs) -> None:
    data = random.Random(7).randbytes(3 * MIB)  # noise: stored raw, so a flipped byte is easy
    write(stubs, upload_name(data), data)
    digest = Digest.of(data)
    entry = server.cache_dir / "store-v1" / "cas" / digest.hash[:2] / f"{digest.hash}-{digest.size}"
    with open(entry, "r+b") as f:  # the layout of docs/cache.md: an 8-byte header, the blob
        f.seek(8 + 2 * MIB + 5)
        f.write(bytes([data[2 * MIB + 5] ^ 0xFF]))

    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in stubs.bytestream.Read(bs_pb2.ReadRequest(resource_name=blob_name(data))):
            received.append(response.data)
    assert code(caught.value) == grpc.StatusCode.NOT_FOUND
    assert len(b"".join(received)) < len(data)
    missing = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[wire(data)]))
    assert len(missing.missing_blob_digests) == 1  # removed, for the next upload to repair
    assert "failed verification; removed" in server.stderr()


def test_read_of_a_missing_blob_is_not_found(stubs: Stubs) -> None:
    error = rpc_error(lambda: read(stubs, blob_name(b"nobody wrote this")))
    assert code(error) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zstd"])
def test_write_resumes_after_query_write_status(stubs: Stubs, compressed: bool) -> None:
    data = mixed_bytes(5 * MIB + 333, seed=4)
    payload = zstandard.ZstdCompressor().compress(data) if compressed else data
    name = upload_name(data, compressed=compressed)
    half = len(payload) // 2

    assert write(stubs, name, payload[:half], finish=False) == half  # the stream ends unfinished
    status = stubs.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (half, False)
    missing = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[wire(data)]))
    assert len(missing.missing_blob_digests) == 1

    assert write(stubs, name, payload[half:], offset=half) == len(payload)
    status = stubs.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (len(payload), True)
    assert read(stubs, blob_name(data)) == data


def test_a_cancelled_write_can_be_resumed(server: ServedCache, stubs: Stubs) -> None:
    data = mixed_bytes(3 * MIB, seed=6)
    name = upload_name(data)
    sent, cancelled = threading.Event(), threading.Event()

    def first_half_then_hang() -> Iterator[bs_pb2.WriteRequest]:
        yield from write_requests(name, data[:MIB], finish=False)
        sent.set()
        cancelled.wait(CALL_GUARD_S)  # the stream stays open until the client cancels

    call = stubs.bytestream.Write.future(first_half_then_hang())
    sent.wait(CALL_GUARD_S)

    wait_for(lambda: committed_size(stubs, name) == MIB, "the server to have the first MiB")
    call.cancel()
    cancelled.set()

    def resumed() -> int | None:
        try:
            return write(stubs, name, data[MIB:], offset=MIB)
        except grpc.RpcError as error:  # ABORTED until the server sees the cancellation
            assert code(error) == grpc.StatusCode.ABORTED, details(error)
            return None

    assert wait_for(resumed, "the resumed write to be accepted") == len(data)
    assert read(stubs, blob_name(data)) == data
    assert "error" not in server.stderr(), server.stderr()


def test_partial_uploads_beyond_the_cap_are_dropped_least_recently_used_first(
        tmp_path: Path) -> None:
    served = start_server(tmp_path / "cache", tmp_path / "serve.log",
                          env={"HITZ_SERVE_MAX_PARTIAL_UPLOADS": "3"})
    try:
        with grpc.insecure_channel(served.address) as channel:
            stubs = Stubs(re_grpc.ContentAddressableStorageStub(channel),
                          re_grpc.ActionCacheStub(channel), re_grpc.CapabilitiesStub(channel),
                          bs_grpc.ByteStreamStub(channel))
            blobs = [mixed_bytes(100_000, seed=20 + n) for n in range(5)]
            names = [upload_name(data) for data in blobs]
            for data, name in zip(blobs, names, strict=True):  # five abandoned uploads
                assert write(stubs, name, data[:1000], finish=False) == 1000

            # The two oldest were dropped (NOT_FOUND: -1), so a client starts over at 0.
            assert [committed_size(stubs, name) for name in names] == [-1, -1, 1000, 1000, 1000]
            fds = f"/proc/{served.proc.pid}/fd"
            open_temps = [link for link in (os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds))
                          if link.startswith(f"{served.cache_dir}/") and "/tmp/" in link]
            assert len(open_temps) == 3, open_temps

            # A dropped upload restarts from 0; a kept one resumes where it was.
            assert write(stubs, names[0], blobs[0]) == len(blobs[0])
            assert write(stubs, names[4], blobs[4][1000:], offset=1000) == len(blobs[4])
            assert read(stubs, blob_name(blobs[0])) == blobs[0]
            assert read(stubs, blob_name(blobs[4])) == blobs[4]
    finally:
        served.kill()


def test_a_bad_partial_upload_cap_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [*HITZ, "cache", "serve", "--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path)],
        env={**os.environ, "NO_COLOR": "1", "HITZ_SERVE_MAX_PARTIAL_UPLOADS": "0"},
        capture_output=True, text=True, timeout=CALL_GUARD_S, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: $HITZ_SERVE_MAX_PARTIAL_UPLOADS must be a whole "
                                  "number of uploads, at least 1, got `0`\n"), done.stderr


def test_write_at_an_offset_that_does_not_follow_on_is_refused(stubs: Stubs) -> None:
    data = b"x" * 1000
    name = upload_name(data)
    write(stubs, name, data[:100], finish=False)
    error = rpc_error(lambda: write(stubs, name, data[300:], offset=300))
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error) == (f"write_offset 300 does not follow on: the server has 100 bytes "
                              f"of `{name}` (as QueryWriteStatus says)")
    assert write(stubs, name, data[100:], offset=100) == len(data)  # the upload is still there

    fresh = upload_name(b"y" * 1000)
    error = rpc_error(lambda: write(stubs, fresh, b"y" * 500, offset=500))
    assert details(error) == (
        f"write_offset 500 does not follow on: the server has nothing of `{fresh}`; start at 0")
    assert committed_size(stubs, fresh) == -1  # unknown: no empty upload was left behind


def test_write_with_a_wrong_digest_is_invalid_argument(stubs: Stubs) -> None:
    claimed, sent = b"a" * (2 * MIB), b"b" * (2 * MIB)
    name = f"uploads/{uuid.uuid4()}/blobs/{hashlib.sha256(claimed).hexdigest()}/{len(claimed)}"
    error = rpc_error(lambda: write(stubs, name, sent))
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error) == (f"the bytes written are {Digest.of(sent)}, not {Digest.of(claimed)} "
                              f"as `{name}` says")
    missing = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[wire(claimed), wire(sent)]))
    assert len(missing.missing_blob_digests) == 2
    error = rpc_error(lambda: stubs.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name)))
    assert code(error) == grpc.StatusCode.NOT_FOUND  # the wrong bytes were dropped

    error = rpc_error(lambda: write(stubs, name, claimed + b"!"))
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error) == f"the upload holds more than the digest's {len(claimed)} bytes"


def test_write_of_a_blob_already_present_ends_at_once(stubs: Stubs) -> None:
    data = b"already here" * 1000
    write(stubs, upload_name(data), data)

    def never_finished() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=upload_name(data), data=data[:10])
        yield bs_pb2.WriteRequest(write_offset=10, data=data[10:20])  # the server stops reading

    assert stubs.bytestream.Write(never_finished()).committed_size == len(data)
    assert write(stubs, upload_name(data, compressed=True), b"anything") == -1


@pytest.mark.parametrize("name", [
    "blobs/abc/12",
    "blobs/" + "a" * 64,
    "compressed-blobs/deflate/" + "a" * 64 + "/1",
    "something/else",
])
def test_bad_resource_names_are_refused(stubs: Stubs, name: str) -> None:
    error = rpc_error(lambda: read(stubs, name))
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_resource_name_message(stubs: Stubs) -> None:
    error = rpc_error(lambda: read(stubs, "main/blobs/abc/12"))
    assert details(error) == (
        "resource name `main/blobs/abc/12` is not of the form `{instance}/blobs/{hash}/{size}` or "
        "`{instance}/compressed-blobs/zstd/{hash}/{size}`")


def test_every_instance_name_reaches_the_same_store(stubs: Stubs) -> None:
    data = b"shared by every instance"
    write(stubs, upload_name(data, instance="team/a"), data)
    assert read(stubs, blob_name(data, instance="other/instance/name")) == data
    assert read(stubs, f"blobs/sha256/{wire(data).hash}/{len(data)}") == data  # REAPI 2.3's form
    missing = stubs.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name="x", blob_digests=[wire(data)]))
    assert not missing.missing_blob_digests


# --- action cache ---------------------------------------------------------------------


def test_action_cache_update_get_and_miss(stubs: Stubs) -> None:
    out, log = b"the output\n", b"compiler said nothing\n"
    Req = re_pb2.BatchUpdateBlobsRequest.Request
    stubs.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[Req(digest=wire(out), data=out), Req(digest=wire(log), data=log)]))
    action = wire(b"an action")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out.txt", digest=wire(out), is_executable=True)],
        stdout_digest=wire(log), exit_code=0)

    error = rpc_error(lambda: stubs.ac.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=action)))
    assert code(error) == grpc.StatusCode.NOT_FOUND
    assert details(error) == f"no result for action {Digest.of(b'an action')}"

    assert stubs.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name="ci", action_digest=action, action_result=result)) == result
    assert stubs.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action)) == result
    inlined = stubs.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=action, inline_stdout=True, inline_output_files=["out.txt"]))
    assert inlined.stdout_raw == log and inlined.output_files[0].contents == out


def test_a_result_whose_outputs_are_gone_is_not_found(stubs: Stubs) -> None:
    action = wire(b"another action")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="gone", digest=wire(b"never stored"))])
    stubs.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=result))
    error = rpc_error(lambda: stubs.ac.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=action)))
    assert code(error) == grpc.StatusCode.NOT_FOUND
    assert "no longer in the cache" in details(error)


# --- one store, shared ----------------------------------------------------------------


def test_the_server_and_a_local_store_share_the_cache(server: ServedCache, stubs: Stubs) -> None:
    served = mixed_bytes(6 * MIB, seed=5)
    write(stubs, upload_name(served), served)
    action = wire(b"stored by a client")
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="o", digest=wire(served))])
    stubs.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=result))

    local = b"stored by hitz run" * 500
    local_action = Digest.of(b"a local action")
    local_result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="l", digest=wire(local))])
    with Store(server.cache_dir) as store:
        assert store.read_bytes(Digest.of(served)) == served
        assert store.get_action_result(Digest.of(b"stored by a client")) == (
            result.SerializeToString(deterministic=True))
        store.put_bytes(local)
        store.put_action_result(local_action, local_result.SerializeToString())

    assert read(stubs, blob_name(local)) == local
    assert stubs.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=wire(b"a local action"))) == local_result


# --- GetTree --------------------------------------------------------------------------


def test_get_tree_streams_a_three_level_tree_in_pages(stubs: Stubs) -> None:
    def directory(files: dict[str, bytes], dirs: dict[str, re_pb2.Directory]) -> re_pb2.Directory:
        return re_pb2.Directory(
            files=[re_pb2.FileNode(name=n, digest=wire(d)) for n, d in sorted(files.items())],
            directories=[re_pb2.DirectoryNode(name=n, digest=wire(d.SerializeToString()))
                         for n, d in sorted(dirs.items())])

    leaf_a = directory({"a.c": b"int a;"}, {})
    leaf_b = directory({"b.c": b"int b;"}, {})
    middle = directory({"m.h": b"#pragma once"}, {"a": leaf_a, "b": leaf_b})
    twin = directory({}, {"a": leaf_a})  # leaf_a a second time: returned once
    root = directory({"README": b"hi"}, {"src": middle, "twin": twin})
    all_dirs = [root, middle, twin, leaf_a, leaf_b]  # breadth first
    Req = re_pb2.BatchUpdateBlobsRequest.Request
    stubs.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        Req(digest=wire(d.SerializeToString()), data=d.SerializeToString()) for d in all_dirs]))
    root_digest = wire(root.SerializeToString())

    pages = list(stubs.cas.GetTree(re_pb2.GetTreeRequest(root_digest=root_digest)))
    assert [list(p.directories) for p in pages] == [all_dirs]
    assert pages[-1].next_page_token == ""

    pages = list(stubs.cas.GetTree(re_pb2.GetTreeRequest(root_digest=root_digest, page_size=2)))
    assert [len(p.directories) for p in pages] == [2, 2, 1]
    assert [d for p in pages for d in p.directories] == all_dirs
    resumed = list(stubs.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=root_digest, page_size=2, page_token=pages[0].next_page_token)))
    assert [d for p in resumed for d in p.directories] == all_dirs[2:]

    error = rpc_error(lambda: stubs.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=wire(b"no such directory"))))
    assert code(error) == grpc.StatusCode.NOT_FOUND


# --- the process ----------------------------------------------------------------------


def test_sigterm_drains_and_exits_0(server: ServedCache, stubs: Stubs) -> None:
    stubs.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert server.signal(signal.SIGTERM) == 0
    assert "SIGTERM: stopping" in server.stderr()


def test_sigterm_lets_a_call_in_flight_finish(server: ServedCache, stubs: Stubs) -> None:
    data = mixed_bytes(2 * MIB, seed=8)
    name = upload_name(data)
    go_on = threading.Event()

    def first_half_then_the_rest() -> Iterator[bs_pb2.WriteRequest]:
        requests = list(write_requests(name, data))
        yield requests[0]
        go_on.wait(CALL_GUARD_S)
        yield from requests[1:]

    call = stubs.bytestream.Write.future(first_half_then_the_rest(), timeout=CALL_GUARD_S)
    wait_for(lambda: committed_size(stubs, name) == MIB, "the server to have the first MiB")
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM: stopping" in server.stderr(), "the server to start stopping")
    go_on.set()
    assert call.result().committed_size == len(data)
    assert server.wait() == 0
    with Store(server.cache_dir) as store:
        assert store.read_bytes(Digest.of(data)) == data


def test_ctrl_c_exits_130(server: ServedCache) -> None:
    assert server.signal(signal.SIGINT) == 130


def test_a_port_in_use_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*HITZ, "cache", "serve", "--listen", f"127.0.0.1:{port}",
             "--cache-dir", str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=START_GUARD_S,
            env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: can't listen on `127.0.0.1:{port}`: the port is in use\n\n"
        "hint: choose another port, such as `--listen 127.0.0.1:0` for any free one\n")


def test_a_bad_listen_address_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*HITZ, "cache", "serve", "--listen", "8980", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=START_GUARD_S,
        env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --listen wants HOST:PORT, got `8980`\n\n"
        "hint: for example `--listen 127.0.0.1:8980`, or `--listen 127.0.0.1:0` for any "
        "free port\n")
