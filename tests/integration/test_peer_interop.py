"""hitz's REAPI client against real servers of other projects: BuildGrid and buildbox-casd.

The servers are the real programs (tests/peers.py starts them once per
session on free loopback ports, from what scripts/test installed): BuildGrid
as a cache in memory (and once with execution, its blobs on disk),
buildbox-casd as a cache (it also executes; that is test_remote_exec.py's).
The client is hitz's ``RemoteCache``, and the full runs are the real
``hitz run`` with ``[cache] remote`` pointing at a peer; a "second machine"
is a second project folder with a fresh local cache folder.

What each peer is known to say (../shared/peers/reapi/RECIPE.md) is asserted
here too, because hitz's client depends on it: casd advertises a batch limit
of 0 (REAPI: "no limit", which hitz reads as gRPC's 4 MiB), neither peer
advertises zstd (so hitz must not send ``compressed-blobs``, which both
refuse), and BuildGrid speaks REAPI 2.0 to 2.2 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hitz.executor.remote import RemoteBlobMissing, RemoteCache, RemoteError
from hitz.executor.store import Digest
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.helpers import Project
from tests.integration.test_remote_cache import BUILD, SUM, CountingProxy
from tests.peers import Peer, get_capabilities

MIB = 1 << 20
PEERS = ("buildgrid", "casd")
# What the client process may grow to while moving a 256 MiB blob each way:
# an interpreter with grpc and hitz loaded is ~60 MiB, and the client holds
# a few 1 MiB pieces at a time. Holding the blob would cost 256 MiB more.
STREAM_RSS_LIMIT = 160 * MIB


@pytest.fixture(params=PEERS)
def peer(request: pytest.FixtureRequest) -> Peer:
    """Each peer in turn (its session fixture from tests/peers.py)."""
    found: Peer = request.getfixturevalue(request.param)
    return found


@pytest.fixture
def client(peer: Peer) -> Iterator[RemoteCache]:
    with RemoteCache.connect(peer.url) as connected:
        yield connected


def blobs_of(*sizes: int) -> dict[Digest, bytes]:
    """Random blobs of these sizes, by digest (different on every call)."""
    found = {}
    for size in sizes:
        data = os.urandom(size)
        found[Digest.of(data)] = data
    return found


def wire(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


# --- what the peers advertise, and what hitz makes of it --------------------------------


def test_casd_batch_limit_zero_means_4_mib_and_no_zstd(casd: Peer) -> None:
    raw = get_capabilities(casd.address).cache_capabilities
    assert raw.max_batch_total_size_bytes == 0
    assert list(raw.supported_compressors) == []
    with RemoteCache.connect(casd.url) as connected:
        caps = connected.capabilities
    assert caps.max_batch_bytes == 4 * MIB
    assert not caps.zstd and not caps.zstd_batch
    assert (caps.low_api, caps.high_api) == ((2, 1), (2, 12))
    assert caps.update_enabled


def test_buildgrid_speaks_2_0_to_2_2_with_its_own_batch_limit(buildgrid: Peer) -> None:
    with RemoteCache.connect(buildgrid.url) as connected:
        caps = connected.capabilities
    assert (caps.low_api, caps.high_api) == ((2, 0), (2, 2))
    assert caps.max_batch_bytes == 4193280  # BuildGrid's, a little under 4 MiB
    assert not caps.zstd and not caps.zstd_batch
    assert caps.update_enabled
    assert re_pb2.DigestFunction.SHA256 in caps.digest_functions


def test_without_zstd_advertised_no_compressed_blobs_go_on_the_wire(
        peer: Peer, tmp_path: Path) -> None:
    compressible = bytes(6 * MIB)  # zeros: zstd would shrink them to nothing
    digest = Digest.of(compressible)
    data = b"x" * 5000 + uuid.uuid4().bytes  # compressible, and new to the peer
    small = {Digest.of(data): data}
    proxy = CountingProxy(peer.address)
    try:
        with RemoteCache.connect(proxy.url) as connected:
            connected.upload_blobs({digest: compressible, **small})
            connected.download_file(digest, tmp_path / "back")
            assert connected.read_blobs(small) == small
    finally:
        proxy.close()
    assert (tmp_path / "back").read_bytes() == compressible
    assert proxy.names, "the 6 MiB blob should have gone through ByteStream"
    assert not [n for n in proxy.names if "compressed-blobs" in n], proxy.names
    assert proxy.methods["BatchUpdateBlobs"] >= 1 and proxy.methods["BatchReadBlobs"] >= 1


# --- blobs ------------------------------------------------------------------------------


def test_small_blobs_round_trip_in_batches(client: RemoteCache) -> None:
    # 12 blobs of 1 MiB do not fit one batch under either peer's limit.
    blobs = blobs_of(1, 100, 4096, 200_000, *[MIB] * 12)
    assert client.find_missing(blobs) == list(blobs)
    assert client.upload_missing(blobs) == len(blobs)
    assert client.find_missing(blobs) == []
    assert client.upload_missing(blobs) == 0
    assert client.read_blobs(blobs) == blobs
    one = next(iter(blobs))
    assert client.read_blob(one) == blobs[one]
    assert client.read_blob(Digest.of(b"")) == b""


def test_a_blob_just_over_the_batch_limit_is_streamed(client: RemoteCache, tmp_path: Path
                                                      ) -> None:
    limit = client.batch_limit
    blobs = blobs_of(limit - 200, limit + 1, 9 * MIB)
    client.upload_blobs(blobs)
    assert client.find_missing(blobs) == []
    for n, (digest, data) in enumerate(blobs.items()):
        client.download_file(digest, tmp_path / f"blob{n}")
        assert (tmp_path / f"blob{n}").read_bytes() == data
    small_file = tmp_path / "small"
    small_file.write_bytes(os.urandom(3000))
    digest = Digest.of(small_file.read_bytes())
    client.upload_file(digest, small_file)
    assert client.read_blob(digest) == small_file.read_bytes()


def test_a_missing_blob_is_missing(client: RemoteCache, tmp_path: Path) -> None:
    absent = Digest.of(os.urandom(64))
    big_absent = Digest(hashlib.sha256(b"never stored").hexdigest(), 20 * MIB)
    assert client.find_missing([absent, big_absent]) == [absent, big_absent]
    with pytest.raises(RemoteBlobMissing):
        client.read_blob(absent)
    with pytest.raises(RemoteBlobMissing):
        client.download_file(big_absent, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


# A client in a process of its own, so its peak memory is its own: writes
# SIZE MiB of generated data to the remote from a file, reads it back into
# another, prints {"maxrss": bytes}. The peak is VmHWM, the high-water mark
# of this program's memory: getrusage's ru_maxrss would also count the
# pytest process it was forked from (Linux keeps the larger across execve).
STREAM_CLIENT = """
import json, re, sys
from hitz.executor.remote import RemoteCache
from hitz.executor.store import Digest
url, hash_hex, size, source, dest = sys.argv[1:6]
digest = Digest(hash_hex, int(size))
with RemoteCache.connect(url, timeout_s=120) as client:
    assert client.find_missing([digest]) == [digest]
    client.upload_file(digest, source)
    assert client.find_missing([digest]) == []
    client.download_file(digest, dest)
with open("/proc/self/status") as status:
    kib = int(re.search(r"^VmHWM:\\s+(\\d+) kB", status.read(), re.M).group(1))
print(json.dumps({"maxrss": kib * 1024}))
"""


def test_a_256_mib_blob_round_trips_in_bounded_memory(peer: Peer, tmp_path: Path) -> None:
    source, back = tmp_path / "source", tmp_path / "back"
    sha = hashlib.sha256()
    piece = os.urandom(MIB)
    with open(source, "wb") as f:  # 256 different MiB, written and hashed a MiB at a time
        for n in range(256):
            chunk = n.to_bytes(4, "big") + piece[4:]
            sha.update(chunk)
            f.write(chunk)
    digest = Digest(sha.hexdigest(), 256 * MIB)
    done = subprocess.run(
        [sys.executable, "-c", STREAM_CLIENT, peer.url, digest.hash, str(digest.size),
         str(source), str(back)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{peer.name}:\n{done.stderr}"
    maxrss = json.loads(done.stdout)["maxrss"]
    assert maxrss < STREAM_RSS_LIMIT, f"the client peaked at {maxrss >> 20} MiB"
    assert back.stat().st_size == digest.size
    got = hashlib.sha256()
    with open(back, "rb") as f:
        while chunk := f.read(MIB):
            got.update(chunk)
    assert got.hexdigest() == digest.hash


# --- action results ---------------------------------------------------------------------


def test_action_results_round_trip(client: RemoteCache) -> None:
    outputs = blobs_of(10, 3000)
    stdout = b"it worked\n"
    client.upload_blobs({**outputs, Digest.of(stdout): stdout})
    action = Digest.of(f"an action {uuid.uuid4()}".encode())
    result = re_pb2.ActionResult(exit_code=0, stdout_digest=wire(Digest.of(stdout)))
    for n, digest in enumerate(outputs):
        result.output_files.add(path=f"out/{n}.bin", digest=wire(digest),
                                is_executable=n == 0)
    assert client.get_action_result(action) is None
    client.update_action_result(action, result)
    got = client.get_action_result(action)
    assert got is not None
    assert got.exit_code == 0
    assert got.stdout_digest == result.stdout_digest
    assert [(f.path, f.digest, f.is_executable) for f in got.output_files] == [
        (f.path, f.digest, f.is_executable) for f in result.output_files]

    # A failed result is stored and given back too (both peers cache failures).
    failed_action = Digest.of(f"a failing action {uuid.uuid4()}".encode())
    client.update_action_result(failed_action, re_pb2.ActionResult(exit_code=3))
    failed = client.get_action_result(failed_action)
    assert failed is not None and failed.exit_code == 3


def test_buildgrid_instances_are_kept_apart(buildgrid: Peer) -> None:
    blobs = blobs_of(100, 2 * MIB, 5 * MIB)
    with RemoteCache.connect(buildgrid.url, instance="ci") as ci, \
            RemoteCache.connect(buildgrid.url) as default:
        ci.upload_blobs(blobs)
        assert ci.find_missing(blobs) == []
        assert default.find_missing(blobs) == list(blobs)
        assert ci.read_blobs(blobs) == blobs
        action = Digest.of(f"an action {uuid.uuid4()}".encode())
        ci.update_action_result(action, re_pb2.ActionResult(exit_code=0))
        assert ci.get_action_result(action) is not None
        assert default.get_action_result(action) is None


def test_an_instance_the_peer_lacks_is_refused_when_connecting(peer: Peer) -> None:
    with pytest.raises(RemoteError) as refused:
        RemoteCache.connect(peer.url, instance="no-such-instance", retries=0)
    assert peer.url in refused.value.message


# --- full runs --------------------------------------------------------------------------


def two_machines(tmp_path: Path, cache: str) -> tuple[Project, Project]:
    """Two project folders with the same manifest and files, each with its own
    local cache folder (tests/helpers.py gives each project one)."""
    machines = []
    for name in ("machine-a", "machine-b"):
        root = tmp_path / name
        root.mkdir()
        project = Project(root)
        project.write("hitz.toml", f"[cache]\n{cache}\n\n{BUILD}\n{SUM}")
        project.write("src/input.txt", "the input, on machine a or b\n")
        machines.append(project)
    return machines[0], machines[1]


@pytest.mark.parametrize(("peer_name", "instance"), [("buildgrid", "ci"), ("casd", "")])
def test_a_second_machine_gets_remote_hits(peer_name: str, instance: str, tmp_path: Path,
                                          request: pytest.FixtureRequest,
                                          kernel_namespaces: None) -> None:
    remote: Peer = request.getfixturevalue(peer_name)
    a, b = two_machines(tmp_path, f"remote = {json.dumps(remote.url)}\n"
                                  f"instance = {json.dumps(instance)}")
    first = a.run()
    assert first.returncode == 0, first
    assert not any(t["cached"] for t in first.json()["tasks"]), first
    assert "warning: remote cache" not in first.stderr, first

    second = b.run()
    assert second.returncode == 0, second
    assert all(t["cached"] for t in second.json()["tasks"]), second
    assert "warning: remote cache" not in second.stderr, second
    assert b.snapshot() == {**a.snapshot(), "hitz.toml": b.read("hitz.toml")}
    assert os.readlink(b.root / "out/tree/link") == "../upper.txt"
    assert b.read("out/sum.txt") == "THE INPUT, ON MACHINE A OR B\nnested\n"
    assert (b.root / "out/big.bin").stat().st_size == 6_000_000


def test_buildgrid_with_execution_keeps_blobs_and_results_on_disk(buildgrid_full: Peer) -> None:
    caps = get_capabilities(buildgrid_full.address)
    assert caps.execution_capabilities.exec_enabled
    blobs = blobs_of(100, 6 * MIB)
    action = Digest.of(f"an action {uuid.uuid4()}".encode())
    with RemoteCache.connect(buildgrid_full.url) as connected:
        connected.upload_missing(blobs)
        assert connected.read_blobs(blobs) == blobs
        result = re_pb2.ActionResult(exit_code=0)
        for n, digest in enumerate(blobs):
            result.output_files.add(path=f"out/{n}", digest=wire(digest))
        connected.update_action_result(action, result)
        got = connected.get_action_result(action)
    assert got is not None and list(got.output_files) == list(result.output_files)
