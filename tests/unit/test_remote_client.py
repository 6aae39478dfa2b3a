"""The REAPI client (``hitz.executor.remote``) against a fault-injecting fake.

The fake (tests/fakes/reapi_server.py) is a real gRPC server on loopback
whose servicers can be told to fail, stall, send a wrong blob or break a
stream midway; it records what it saw on the wire. Backoff sleeps and the
breaker's clock are fakes, so nothing here sleeps: a "slow server" is one
that never answers, and the client's deadline ends the call.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from hitz.executor.remote import BLOB_OVERHEAD, CHUNK, REQUEST_OVERHEAD, RemoteCache
from hitz.executor.remote_config import RemoteCacheSettings, load_token, parse_url, resolve
from hitz.executor.remote_errors import (
    RemoteBlobCorrupt,
    RemoteBlobMissing,
    RemoteError,
    RemoteErrorReason,
    RemoteUnavailable,
)
from hitz.executor.remote_retry import Breaker, RetryPolicy
from hitz.executor.remote_tier import RemoteTier
from hitz.executor.store import Digest, Store
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.fakes.backend import ManualClock
from tests.fakes.reapi_server import SHA256, ZSTD, FakeReapi

MIB = 1 << 20


class Sleeps:
    """Records the backoff pauses instead of sleeping."""

    def __init__(self) -> None:
        self.pauses: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


@pytest.fixture
def fake() -> Iterator[FakeReapi]:
    with FakeReapi() as server:
        yield server


def connect(server: FakeReapi, **kwargs: object) -> RemoteCache:
    options: dict[str, object] = {"sleep": Sleeps(), "timeout_s": 30.0}
    options.update(kwargs)
    return RemoteCache.connect(server.url, **options)  # type: ignore[arg-type]


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# --- capabilities -----------------------------------------------------------------------


def test_capabilities_come_first_and_a_zero_batch_limit_means_4_mib(fake: FakeReapi) -> None:
    with connect(fake) as client:
        caps = client.capabilities
    assert fake.calls["GetCapabilities"] == 1
    assert caps.max_batch_bytes == 4 * MIB
    assert caps.digest_functions == (SHA256,)
    assert (caps.low_api, caps.high_api) == ((2, 0), (2, 3))
    assert caps.zstd and caps.zstd_batch and caps.update_enabled


def test_a_server_without_sha256_is_refused() -> None:
    with FakeReapi(digest_functions=(re_pb2.DigestFunction.SHA1,)) as server, \
            pytest.raises(RemoteError) as caught:
        connect(server)
    assert caught.value.reason is RemoteErrorReason.UNSUPPORTED
    assert caught.value.message == (
        f"remote cache {server.url} does not offer SHA-256 digests (it offers: SHA1)")


def test_a_server_speaking_only_a_later_api_is_refused() -> None:
    with FakeReapi(api=((3, 0), (3, 1))) as server, pytest.raises(RemoteError) as caught:
        connect(server)
    assert caught.value.message == (
        f"remote cache {server.url} speaks REAPI 3.0 to 3.1; hitz speaks 2.0 to 2.3")


def test_a_reapi_2_0_server_gets_2_0_requests_and_no_compression() -> None:
    with FakeReapi(api=((2, 0), (2, 0)), zstd=False, zstd_batch=False) as server, \
            connect(server) as client:
        big, small = blob(5 * MIB, 1), b"small"
        client.upload_blobs({Digest.of(big): big, Digest.of(small): small})
        assert client.read_blobs([Digest.of(big), Digest.of(small)]) == {
            Digest.of(big): big, Digest.of(small): small}
    assert set(server.digest_functions_seen) == {re_pb2.DigestFunction.UNKNOWN}
    assert server.resource_names and not any("compressed-blobs" in n
                                              for n in server.resource_names)
    assert set(server.batch_compressors) == {re_pb2.Compressor.IDENTITY}


# --- compression only when advertised ---------------------------------------------------


def test_zstd_resource_names_when_the_server_advertises_zstd(fake: FakeReapi) -> None:
    data = bytes(6 * MIB)  # compresses well
    with connect(fake) as client:
        client.upload_blobs({Digest.of(data): data})
        assert client.read_blob(Digest.of(data)) == data
    digest = Digest.of(data)
    assert fake.resource_names[0].startswith("uploads/")
    assert fake.resource_names[0].endswith(f"/compressed-blobs/zstd/{digest.hash}/{digest.size}")
    assert fake.resource_names[1] == f"compressed-blobs/zstd/{digest.hash}/{digest.size}"


def test_a_write_of_bytes_zstd_cannot_shrink_goes_uncompressed(fake: FakeReapi) -> None:
    data = blob(6 * MIB, 12)
    with connect(fake) as client:
        client.upload_blobs({Digest.of(data): data})
    assert fake.blobs[Digest.of(data)] == data
    assert fake.resource_names[0].endswith(f"/blobs/{Digest.of(data).hash}/{6 * MIB}")


def test_zstd_for_bytestream_but_not_batches_when_only_that_is_advertised() -> None:
    with FakeReapi(zstd=True, zstd_batch=False) as server, connect(server) as client:
        small = bytes(100_000)
        client.upload_blobs({Digest.of(small): small})
        assert client.read_blob(Digest.of(small)) == small
    assert server.batch_compressors == [re_pb2.Compressor.IDENTITY]


def test_batches_are_compressed_when_advertised(fake: FakeReapi) -> None:
    small = bytes(100_000)
    with connect(fake) as client:
        client.upload_blobs({Digest.of(small): small})
        assert client.read_blob(Digest.of(small)) == small
    assert fake.batch_compressors == [ZSTD]


def test_compress_false_never_uses_zstd(fake: FakeReapi) -> None:
    data = bytes(6 * MIB)
    with connect(fake, compress=False) as client:
        client.upload_blobs({Digest.of(data): data})
        assert client.read_blob(Digest.of(data)) == data
    assert not any("compressed-blobs" in n for n in fake.resource_names)


# --- batching and chunking --------------------------------------------------------------


def test_a_blob_that_fits_a_batch_with_its_framing_goes_in_a_batch() -> None:
    with FakeReapi(max_batch=1 * MIB) as server, connect(server, compress=False) as client:
        limit = 1 * MIB - REQUEST_OVERHEAD
        fits, too_big = blob(limit - BLOB_OVERHEAD, 1), blob(limit - BLOB_OVERHEAD + 1, 2)
        client.upload_blobs({Digest.of(fits): fits})
        assert (server.calls["BatchUpdateBlobs"], server.calls["Write"]) == (1, 0)
        client.upload_blobs({Digest.of(too_big): too_big})
        assert (server.calls["BatchUpdateBlobs"], server.calls["Write"]) == (1, 1)
        assert server.blobs[Digest.of(too_big)] == too_big


def test_many_small_blobs_are_split_into_batches_under_the_limit() -> None:
    with FakeReapi(max_batch=64 << 10) as server, connect(server) as client:
        blobs = {Digest.of(b): b for b in (blob(3000, n) for n in range(100))}
        assert client.upload_missing(blobs) == 100
        assert client.read_blobs(blobs) == blobs
    assert server.calls["BatchUpdateBlobs"] > 1
    assert max(server.batch_bytes) <= 64 << 10
    assert all(server.blobs[d] == b for d, b in blobs.items())


def test_find_missing_asks_only_for_what_is_missing(fake: FakeReapi) -> None:
    present = fake.put(b"present")
    absent = Digest.of(b"absent")
    with connect(fake) as client:
        assert client.find_missing([present, absent, absent, Digest.of(b"")]) == [absent]
        assert client.upload_missing({present: b"present", absent: b"absent"}) == 1
    assert fake.blobs[absent] == b"absent"


def test_big_blobs_go_in_chunks_of_at_most_1_mib(fake: FakeReapi, tmp_path: Path) -> None:
    data = blob(5 * MIB + 10, 3)
    path = tmp_path / "big"
    path.write_bytes(data)
    with connect(fake, compress=False) as client:
        client.upload_file(Digest.of(data), path)
        client.download_file(Digest.of(data), tmp_path / "back")
    assert fake.blobs[Digest.of(data)] == data
    assert (tmp_path / "back").read_bytes() == data
    assert CHUNK == MIB


# --- resuming ---------------------------------------------------------------------------


def test_a_broken_write_resumes_where_the_server_is(fake: FakeReapi) -> None:
    data = blob(5 * MIB, 4)
    fake.drop_write_after(2 * MIB)
    with connect(fake, compress=False) as client:
        client.upload_blobs({Digest.of(data): data})
    assert fake.blobs[Digest.of(data)] == data
    assert fake.calls["QueryWriteStatus"] == 1
    assert fake.write_offsets == [0, 2 * MIB]


def test_a_broken_compressed_write_resumes_too(fake: FakeReapi) -> None:
    data = bytes(3 * MIB) + blob(3 * MIB, 5)
    fake.drop_write_after(1 * MIB)
    with connect(fake) as client:
        client.upload_blobs({Digest.of(data): data})
    assert fake.blobs[Digest.of(data)] == data
    assert all("/compressed-blobs/zstd/" in name for name in fake.resource_names)
    assert fake.write_offsets[0] == 0 and fake.write_offsets[1] >= 1 * MIB


def test_a_broken_read_resumes_at_the_offset_reached(fake: FakeReapi, tmp_path: Path) -> None:
    data = blob(5 * MIB, 6)
    digest = fake.put(data)
    fake.drop_read_after(3 * MIB)
    with connect(fake, compress=False) as client:
        client.download_file(digest, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert fake.read_offsets == [0, 3 * MIB]


# --- retries, deadlines, breaker --------------------------------------------------------


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED])
def test_transient_failures_are_retried_with_growing_backoff(fake: FakeReapi,
                                                             code: grpc.StatusCode) -> None:
    sleeps = Sleeps()
    with connect(fake, sleep=sleeps) as client:
        fake.fail("FindMissingBlobs", code, times=3)
        assert client.find_missing([Digest.of(b"x")]) == [Digest.of(b"x")]
    assert fake.calls["FindMissingBlobs"] == 4
    assert len(sleeps.pauses) == 3
    assert all(0 <= p <= 0.1 * 2 ** n for n, p in enumerate(sleeps.pauses))


def test_a_timeout_is_retried_at_most_once(fake: FakeReapi) -> None:
    # Each try of a server that does not answer costs a whole deadline: one
    # more try, not four.
    with connect(fake) as client:
        fake.fail("FindMissingBlobs", grpc.StatusCode.DEADLINE_EXCEEDED, times=1)
        assert client.find_missing([Digest.of(b"x")]) == [Digest.of(b"x")]
        assert fake.calls["FindMissingBlobs"] == 2
        fake.fail("FindMissingBlobs", grpc.StatusCode.DEADLINE_EXCEEDED, times=3)
        with pytest.raises(RemoteUnavailable) as caught:
            client.find_missing([Digest.of(b"x")])
    assert caught.value.reason is RemoteErrorReason.TIMEOUT
    assert fake.calls["FindMissingBlobs"] == 4  # 2 + the first try and its one retry


def test_backoff_has_full_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=5.0, rng=random.Random(7))
    pauses = [policy.backoff(n) for n in range(12)]
    assert all(0 <= p <= min(5.0, 0.1 * 2 ** n) for n, p in enumerate(pauses))
    assert len(set(pauses)) == len(pauses)  # jittered, not fixed steps


def test_other_errors_are_not_retried(fake: FakeReapi) -> None:
    with connect(fake) as client:
        fake.fail("FindMissingBlobs", grpc.StatusCode.INVALID_ARGUMENT, times=1)
        with pytest.raises(RemoteError) as caught:
            client.find_missing([Digest.of(b"x")])
    assert fake.calls["FindMissingBlobs"] == 1
    assert caught.value.reason is RemoteErrorReason.REFUSED
    assert not isinstance(caught.value, RemoteUnavailable)


def test_a_remote_that_keeps_failing_opens_the_breaker(fake: FakeReapi) -> None:
    clock = ManualClock()
    with connect(fake, retries=2, clock=clock.now, cooldown_s=30.0) as client:
        fake.fail("GetActionResult", grpc.StatusCode.UNAVAILABLE, times=100)
        with pytest.raises(RemoteUnavailable) as first:
            client.get_action_result(Digest.of(b"a"))
        assert first.value.message.startswith(f"remote cache {client.url} is unreachable: ")
        assert fake.calls["GetActionResult"] == 3  # the first try and 2 retries
        with pytest.raises(RemoteUnavailable) as second:
            client.get_action_result(Digest.of(b"a"))
        assert "kept failing" in second.value.message
        assert fake.calls["GetActionResult"] == 3  # failed at once, without the network
        clock.advance(30.0)
        fake._failures.clear()
        assert client.get_action_result(Digest.of(b"a")) is None  # the trial call: closed
        assert not client.breaker.is_open


def test_a_failed_trial_call_opens_the_breaker_again() -> None:
    clock = ManualClock()
    breaker = Breaker("grpc://x:1", cooldown_s=10.0, clock=clock.now)
    policy = RetryPolicy(retries=0, sleep=Sleeps())

    def down(_n: int) -> None:
        raise RemoteUnavailable("down", retryable=True)

    with pytest.raises(RemoteUnavailable):
        breaker.call(policy, down)
    clock.advance(10.0)
    with pytest.raises(RemoteUnavailable, match=r"^down$"):
        breaker.call(policy, down)  # the trial, which fails
    with pytest.raises(RemoteUnavailable, match="kept failing"):
        breaker.call(policy, down)
    assert breaker.opened == 2


def test_a_slow_server_meets_the_deadline(fake: FakeReapi) -> None:
    with connect(fake, timeout_s=0.2, retries=1) as client:
        fake.stall("GetActionResult")
        with pytest.raises(RemoteUnavailable) as caught:
            client.get_action_result(Digest.of(b"a"))
    assert caught.value.reason is RemoteErrorReason.TIMEOUT
    assert fake.calls["GetActionResult"] == 2


def test_a_server_that_never_answers_capabilities_is_asked_once(
        fake: FakeReapi, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first contact has a short deadline of its own (here shortened
    # further), under a long per-call timeout, and is not tried again.
    monkeypatch.setattr("hitz.executor.remote.CONTACT_TIMEOUT_S", 0.2)
    fake.stall("GetCapabilities")
    with pytest.raises(RemoteUnavailable) as caught:
        connect(fake, timeout_s=3600.0)
    fake.unstall()
    assert caught.value.reason is RemoteErrorReason.TIMEOUT
    assert fake.calls["GetCapabilities"] == 1
    assert caught.value.hint is not None and "`[cache]`" in caught.value.hint


def test_a_listener_that_never_speaks_grpc_meets_the_contact_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A port that accepts connections and then says nothing at all (a hung
    # server, a wrong service behind a load balancer).
    import socket

    monkeypatch.setattr("hitz.executor.remote.CONTACT_TIMEOUT_S", 0.3)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"grpc://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(RemoteUnavailable) as caught:
            RemoteCache.connect(url, sleep=Sleeps(), timeout_s=3600.0)
    assert caught.value.reason is RemoteErrorReason.TIMEOUT
    assert caught.value.message == f"remote cache {url} did not answer in time"


def test_an_unreachable_server_is_remote_unavailable() -> None:
    with FakeReapi() as server:
        url = server.url
    with pytest.raises(RemoteUnavailable) as caught:
        RemoteCache.connect(url, sleep=Sleeps(), retries=1, timeout_s=5.0)
    assert caught.value.message.startswith(f"remote cache {url} is unreachable: ")


# --- verification -----------------------------------------------------------------------


def test_a_wrong_small_blob_is_refused(fake: FakeReapi) -> None:
    digest = fake.put(b"the right bytes")
    fake.corrupt_blob(digest)
    with connect(fake) as client, pytest.raises(RemoteBlobCorrupt) as caught:
        client.read_blob(digest)
    assert caught.value.message.startswith(f"remote cache {fake.url} sent a wrong blob for "
                                           f"{digest}: its SHA-256 is ")
    assert isinstance(caught.value, RemoteBlobMissing)


def test_a_wrong_big_blob_is_never_written(fake: FakeReapi, tmp_path: Path) -> None:
    digest = fake.put(blob(3 * MIB, 8))
    fake.corrupt_blob(digest)
    dest = tmp_path / "out"
    dest.write_bytes(b"what was there")
    with connect(fake) as client, pytest.raises(RemoteBlobCorrupt):
        client.download_file(digest, dest)
    assert dest.read_bytes() == b"what was there"
    assert os.listdir(tmp_path) == ["out"]  # no temp file left


def test_a_wrong_blob_in_a_batch_of_many_fails_the_read(fake: FakeReapi) -> None:
    digests = [fake.put(blob(1000, n)) for n in range(5)]
    fake.corrupt_blob(digests[3])
    with connect(fake) as client, pytest.raises(RemoteBlobCorrupt):
        client.read_blobs(digests)


def test_a_missing_blob_is_remote_blob_missing(fake: FakeReapi) -> None:
    with connect(fake) as client, pytest.raises(RemoteBlobMissing):
        client.read_blob(Digest.of(b"nobody has this"))


# --- action cache, instance, auth -------------------------------------------------------


def test_action_results_round_trip_under_the_instance_name(fake: FakeReapi) -> None:
    action = Digest.of(b"action")
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="out/a", digest=re_pb2.Digest(hash=action.hash, size_bytes=6))
    with connect(fake, instance="ci/main") as client:
        assert client.get_action_result(action) is None
        client.update_action_result(action, result)
        assert client.get_action_result(action) == result
        data = blob(5 * MIB, 9)
        client.upload_blobs({Digest.of(data): data})
    assert set(fake.instances) == {"ci/main"}
    assert fake.resource_names[0].startswith("ci/main/uploads/")


def test_a_token_is_sent_as_a_bearer_header() -> None:
    with FakeReapi(require_token="s3cret") as server:
        with connect(server, token="s3cret") as client:
            assert client.find_missing([Digest.of(b"x")]) == [Digest.of(b"x")]
        with pytest.raises(RemoteError) as caught:
            connect(server)
    assert caught.value.reason is RemoteErrorReason.UNAUTHENTICATED
    assert caught.value.hint is not None and "token_env" in caught.value.hint


def test_tokens_come_from_a_variable_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(env="T", environ={"T": "from-env"}) == "from-env"
    assert load_token(file=tmp_path / "token") == "from-file"
    assert load_token() is None
    with pytest.raises(RemoteError, match=r"^the remote cache token variable `T` is not set$"):
        load_token(env="T", environ={})
    with pytest.raises(RemoteError, match="can't read the remote cache token file"):
        load_token(file=tmp_path / "nope")


def test_addresses_and_their_precedence() -> None:
    assert parse_url("grpc://127.0.0.1:8980").target == "127.0.0.1:8980"
    assert parse_url("grpcs://cache.example.com:443/").tls
    for bad in ("http://x:1", "grpc://x", "grpc://x:0", "grpc://x:99999", "x:1"):
        with pytest.raises(ValueError, match="is not a remote cache address"):
            parse_url(bad)
    manifest = RemoteCacheSettings(url="grpc://m:1", instance="i", upload=False)
    env = {"HITZ_REMOTE_CACHE": "grpc://e:1"}
    assert resolve(manifest, flag=None, no_remote=False, environ={}).url == "grpc://m:1"
    assert resolve(manifest, flag=None, no_remote=False, environ=env).url == "grpc://e:1"
    assert resolve(manifest, flag="grpc://f:1", no_remote=False, environ=env).url == "grpc://f:1"
    chosen = resolve(manifest, flag="grpc://f:1", no_remote=True, environ=env)
    assert chosen.url is None and chosen.instance == "i" and chosen.upload is False


# --- the remote tier of the task cache ----------------------------------------------------


def tier_for(server_url: str, tmp_path: Path, warnings: list[str], *, upload: bool = True,
             **kwargs: object) -> RemoteTier:
    settings = RemoteCacheSettings(url=server_url, upload=upload)
    options: dict[str, object] = {"sleep": Sleeps(), "timeout_s": 30.0, "retries": 1}
    options.update(kwargs)
    return RemoteTier(settings, tmp_path, warnings.append,
                      connect=lambda: RemoteCache.connect(server_url, **options))  # type: ignore[arg-type]


def stored_result(fake: FakeReapi, files: dict[str, bytes]) -> Digest:
    """An action result on the fake naming ``files`` (path -> content); its action digest."""
    result = re_pb2.ActionResult(exit_code=0)
    for path, data in files.items():
        digest = fake.put(data)
        result.output_files.add(path=path, digest=re_pb2.Digest(hash=digest.hash,
                                                                size_bytes=digest.size))
    action = Digest.of(b"action " + repr(sorted(files)).encode())
    fake.results[action] = result
    return action


def test_a_remote_hit_lands_in_the_local_store(fake: FakeReapi, tmp_path: Path) -> None:
    files = {"small": b"small output", "big": blob(5 * MIB, 10)}
    action = stored_result(fake, files)
    warnings: list[str] = []
    with Store(tmp_path / "cache") as store:
        tier = tier_for(fake.url, tmp_path, warnings)
        result = tier.fetch("t", action, store)
        assert result is not None and tier.hits == {"t"}
        assert all(store.read_bytes(Digest.of(data)) == data for data in files.values())
        assert store.get_action_result(action) is not None  # the next lookup is local
        tier.flush()
    assert warnings == []


def test_a_wrong_blob_behind_a_remote_hit_is_a_miss(fake: FakeReapi, tmp_path: Path) -> None:
    action = stored_result(fake, {"out": b"good bytes"})
    fake.corrupt_blob(Digest.of(b"good bytes"))
    warnings: list[str] = []
    with Store(tmp_path / "cache") as store:
        tier = tier_for(fake.url, tmp_path, warnings)
        assert tier.fetch("t", action, store) is None
        assert not store.contains(Digest.of(b"good bytes"))
        assert store.get_action_result(action) is None
        assert not tier.disabled  # one bad blob is not a bad remote
        tier.flush()
    assert warnings == []


def test_an_unreachable_remote_warns_once(tmp_path: Path) -> None:
    with FakeReapi() as server:
        url = server.url
    warnings: list[str] = []
    with Store(tmp_path / "cache") as store:
        tier = tier_for(url, tmp_path, warnings)
        for n in range(5):
            assert tier.fetch(f"t{n}", Digest.of(b"%d" % n), store) is None
        tier.flush()
    assert len(warnings) == 1
    assert warnings[0].startswith(f"remote cache {url} is unreachable: ")
    assert warnings[0].endswith("; going on with the local cache only")


def test_a_remote_that_stalls_lookups_costs_two_deadlines_and_one_warning(
        fake: FakeReapi, tmp_path: Path) -> None:
    # GetCapabilities answers, GetActionResult never does: the first lookup
    # tries twice (one retry after a timeout), the breaker opens, the tier is
    # off; every later lookup is a miss without the network.
    fake.stall("GetActionResult")
    warnings: list[str] = []
    with Store(tmp_path / "cache") as store:
        tier = tier_for(fake.url, tmp_path, warnings, timeout_s=0.2, retries=4)
        for n in range(5):
            assert tier.fetch(f"t{n}", Digest.of(b"%d" % n), store) is None
        tier.flush()
    fake.unstall()
    assert fake.calls["GetActionResult"] == 2
    assert warnings == [f"remote cache {fake.url} did not answer in time; going on with the "
                        "local cache only\n\nhint: a slow remote can be given more time: "
                        '`timeout = "30s"` in `[cache]`, or $HITZ_REMOTE_TIMEOUT=30 (seconds)']


def test_an_interrupted_run_drops_queued_uploads_and_cancels_running_ones(
        fake: FakeReapi, tmp_path: Path) -> None:
    warnings: list[str] = []
    with Store(tmp_path / "cache") as store:
        digest = store.put_bytes(b"output")
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path="o", digest=re_pb2.Digest(hash=digest.hash, size_bytes=6))
        tier = tier_for(fake.url, tmp_path, warnings, timeout_s=3600.0)
        tier.client()
        fake.stall("FindMissingBlobs")
        for n in range(5):
            tier.upload(f"t{n}", Digest.of(b"%d" % n), result, store, {})
        wait_until(lambda: fake.calls["FindMissingBlobs"] == 2)  # UPLOADERS in flight
        tier.flush(drop=True)
        # Both calls in flight were cancelled by hitz (the server saw them end
        # with an hour of deadline left); the 3 queued never started.
        wait_until(lambda: fake.ended_by_client["FindMissingBlobs"] == 2)
        fake.unstall()
    assert fake.calls["FindMissingBlobs"] == 2
    assert fake.results == {}
    assert warnings == [f"remote cache {fake.url}: the run was interrupted; "
                        "5 task results were not uploaded"]


def test_a_ctrl_c_while_flushing_drops_the_uploads(fake: FakeReapi, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent import futures

    real_wait = futures.wait

    def interrupted_wait(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(futures, "wait", real_wait)  # the next wait is the drop's
        raise KeyboardInterrupt

    warnings: list[str] = []
    with Store(tmp_path / "cache") as store:
        digest = store.put_bytes(b"output")
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path="o", digest=re_pb2.Digest(hash=digest.hash, size_bytes=6))
        tier = tier_for(fake.url, tmp_path, warnings, timeout_s=3600.0)
        tier.client()
        fake.stall("FindMissingBlobs")
        for n in range(3):
            tier.upload(f"t{n}", Digest.of(b"%d" % n), result, store, {})
        wait_until(lambda: fake.calls["FindMissingBlobs"] == 2)
        monkeypatch.setattr(futures, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            tier.flush()
        wait_until(lambda: fake.ended_by_client["FindMissingBlobs"] == 2)
        fake.unstall()
    assert warnings == [f"remote cache {fake.url}: the run was interrupted; "
                        "3 task results were not uploaded"]


def wait_until(condition: Callable[[], bool], guard_s: float = 30.0) -> None:
    """Wait for ``condition``; fail the test if it is not met within the (hang) guard."""
    import time

    end = time.monotonic() + guard_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"condition not met within the {guard_s:g}s guard")
        time.sleep(0.01)


def test_a_download_cut_short_by_kill_9_leaves_a_temp_file_the_store_sweeps(
        fake: FakeReapi, tmp_path: Path) -> None:
    # The big blob's Read stalls; the process fetching it is killed with
    # SIGKILL. Its temp file is one of the store's own (tmp/, locked while
    # the process lived), so the next Store on the folder removes it.
    action = stored_result(fake, {"big": blob(5 * MIB, 12)})
    fake.stall("Read")
    folder = tmp_path / "cache"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from hitz.executor.remote_config import RemoteCacheSettings\n"
        "from hitz.executor.remote_tier import RemoteTier\n"
        "from hitz.executor.store import Digest, Store\n"
        "store = Store(sys.argv[2])\n"
        "tier = RemoteTier(RemoteCacheSettings(url=sys.argv[1]), Path('.'), None)\n"
        "tier.fetch('t', Digest(sys.argv[3], int(sys.argv[4])), store)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, fake.url, str(folder),
                             action.hash, str(action.size)])
    try:
        wait_until(lambda: fake.calls["Read"] == 1)
        temps = list((folder / "store-v1" / "tmp").iterdir())
        assert len(temps) == 1 and temps[0].name.endswith(".tmp")
        with Store(folder):  # a live download's temp file is left alone
            assert temps[0].exists()
    finally:
        proc.kill()
        proc.wait()
        fake.unstall()
    assert proc.returncode == -signal.SIGKILL
    with Store(folder):
        assert not temps[0].exists()
    assert sorted(p.name for p in folder.iterdir()) == ["store-v1"]  # nothing else left


def test_uploads_run_in_the_background_and_flush_waits(fake: FakeReapi, tmp_path: Path) -> None:
    warnings: list[str] = []
    data = blob(5 * MIB, 11)
    with Store(tmp_path / "cache") as store:
        digest = store.put_bytes(data)
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path="o", digest=re_pb2.Digest(hash=digest.hash,
                                                               size_bytes=digest.size))
        tier = tier_for(fake.url, tmp_path, warnings)
        action = Digest.of(b"the action")
        tier.upload("t", action, result, store, {Digest.of(b"cmd"): b"cmd"})
        tier.flush()
    assert fake.results[action] == result
    assert fake.blobs[digest] == data and fake.blobs[Digest.of(b"cmd")] == b"cmd"
    assert warnings == []


@pytest.mark.parametrize("server_options, upload", [({}, False), ({"update_enabled": False}, True)])
def test_a_read_only_consumer_uploads_nothing(tmp_path: Path, server_options: dict[str, bool],
                                              upload: bool) -> None:
    warnings: list[str] = []
    with FakeReapi(**server_options) as server, Store(tmp_path / "cache") as store:
        digest = store.put_bytes(b"output")
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path="o", digest=re_pb2.Digest(hash=digest.hash, size_bytes=6))
        tier = tier_for(server.url, tmp_path, warnings, upload=upload)
        tier.upload("t", Digest.of(b"a"), result, store, {})
        tier.flush()
        calls = dict(server.calls)
    assert {k: v for k, v in calls.items() if k != "GetCapabilities"} == {}
    assert warnings == []


def test_flush_gives_up_on_a_stalled_remote_with_one_warning(fake: FakeReapi,
                                                             tmp_path: Path) -> None:
    warnings: list[str] = []
    with Store(tmp_path / "cache") as store:
        digest = store.put_bytes(b"output")
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path="o", digest=re_pb2.Digest(hash=digest.hash, size_bytes=6))
        tier = tier_for(fake.url, tmp_path, warnings)
        tier.client()
        fake.stall("FindMissingBlobs")
        for n in range(3):
            tier.upload(f"t{n}", Digest.of(b"%d" % n), result, store, {})
        tier.flush(timeout=0.1)
        fake.unstall()
    assert len(warnings) == 1
    assert "did not take 3 task results within 0.1s" in warnings[0]
    assert fake.results == {}


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (key, cert), made with the openssl tool."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_grpcs_with_the_servers_ca_file(certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    with FakeReapi(tls=(key.read_bytes(), cert.read_bytes())) as server:
        assert server.url.startswith("grpcs://")
        with connect(server, ca_file=str(cert)) as client:
            assert client.find_missing([Digest.of(b"x")]) == [Digest.of(b"x")]
        with pytest.raises(RemoteUnavailable):  # the system's roots don't know this CA
            connect(server, retries=0)
