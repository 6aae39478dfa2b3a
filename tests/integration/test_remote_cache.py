"""The remote cache client and the tiered cache, against the real `hitz cache serve`.

The server is the real subprocess (``start_server`` of test_cache_server.py),
on a loopback port of its own. The client is hitz's (``RemoteCache``), and
full runs are the real command line (``hitz run``) in real sandboxes. A
"second machine" is a second project folder with the same files and a
fresh local cache folder: only the remote can give it hits.

Two faults need a server that misbehaves on purpose, which the real one
never does: a wrong blob, and a server that never answers. Those use the
in-process fake (tests/fakes/reapi_server.py), still over real gRPC and
with the real `hitz run`.

``CountingProxy`` sits between client and server, forwarding every call
unchanged and recording method names and ByteStream resource names: that is
how the tests see that zstd was really used on the wire.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from hitz.executor.remote import RemoteCache
from hitz.executor.store import Digest, Store
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.google.bytestream import bytestream_pb2 as bs_pb2
from tests.fakes.reapi_server import FakeReapi
from tests.helpers import Project, processes_with, task, wait_for
from tests.integration.test_cache_server import ServedCache, start_server

MIB = 1 << 20
REMOTE_WARNING = "warning: remote cache "


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServedCache]:
    served = start_server(tmp_path / "server-cache", tmp_path / "serve.log")
    yield served
    served.kill()


# --- a proxy that counts ----------------------------------------------------------------


class CountingProxy:
    """Forwards every gRPC call to ``target`` as raw bytes and records what passed."""

    def __init__(self, target: str) -> None:
        limits = [("grpc.max_receive_message_length", 64 << 20),
                  ("grpc.max_send_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(target, options=limits)
        self.methods: Counter[str] = Counter()
        self.names: list[str] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(16), options=limits)
        self.server.add_generic_rpc_handlers([_Forward(self)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(grace=None).wait()
        self.channel.close()


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        proxy = self.proxy

        def forward(requests: Iterator[bytes],
                    context: grpc.ServicerContext) -> Iterator[bytes]:
            proxy.methods[method.rsplit("/", 1)[-1]] += 1

            def observed() -> Iterator[bytes]:
                first = True
                for raw in requests:
                    if first and method.endswith("/Read"):
                        proxy.names.append(bs_pb2.ReadRequest.FromString(raw).resource_name)
                    elif first and method.endswith("/Write"):
                        proxy.names.append(bs_pb2.WriteRequest.FromString(raw).resource_name)
                    first = False
                    yield raw

            call = proxy.channel.stream_stream(method)(
                observed(), metadata=context.invocation_metadata(),
                timeout=context.time_remaining())
            try:
                yield from call
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")

        return grpc.stream_stream_rpc_method_handler(forward)


# --- the client against the real server -------------------------------------------------


def test_small_and_big_blobs_and_results_round_trip(server: ServedCache, tmp_path: Path) -> None:
    small = {Digest.of(b): b for b in (os.urandom(n) for n in (1, 100, 5000, 200_000))}
    big = os.urandom(9 * MIB) + bytes(3 * MIB)
    blobs = {**small, Digest.of(big): big}
    with RemoteCache.connect(f"grpc://{server.address}", instance="any/instance") as client:
        assert client.find_missing(blobs) == list(blobs)
        assert client.upload_missing(blobs) == len(blobs)
        assert client.find_missing(blobs) == []
        assert client.read_blobs(blobs) == blobs
        client.download_file(Digest.of(big), tmp_path / "big")
        assert (tmp_path / "big").read_bytes() == big

        action = Digest.of(b"an action")
        result = re_pb2.ActionResult(exit_code=0)
        for n, digest in enumerate(blobs):
            result.output_files.add(path=f"out/{n}", digest=re_pb2.Digest(
                hash=digest.hash, size_bytes=digest.size))
        assert client.get_action_result(action) is None
        client.update_action_result(action, result)
        assert client.get_action_result(action) == result
    with Store(server.cache_dir) as store:  # what the server keeps is the local cache
        assert store.read_bytes(Digest.of(big)) == big


def test_a_256_mib_blob_streams_both_ways_with_zstd_in_bounded_memory(
        server: ServedCache, tmp_path: Path) -> None:
    source = tmp_path / "source"
    piece = os.urandom(MIB)
    with open(source, "wb") as f:  # half random, half zeros: zstd has work either way
        for n in range(256):
            f.write(piece[:MIB // 2] + n.to_bytes(4, "big") + bytes(MIB // 2 - 4))
    digest = Store(tmp_path / "hash-only").put_file(source)
    proxy = CountingProxy(server.address)
    try:
        # In a process of its own, whose peak memory no earlier test has
        # raised: the transfer's own peak is measured, so the check can fail.
        done = subprocess.run(
            [sys.executable, "-c", TRANSFER_SCRIPT, proxy.url, digest.hash, str(digest.size),
             str(source), str(tmp_path / "back")],
            capture_output=True, text=True, timeout=600, check=False)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    grown = after - before
    assert grown < 128 * MIB, f"peak memory grew by {grown >> 20} MiB for a 256 MiB blob"
    assert os.path.getsize(tmp_path / "back") == 256 * MIB + 0
    with open(source, "rb") as a, open(tmp_path / "back", "rb") as b:
        while chunk := a.read(MIB):
            assert chunk == b.read(MIB)
    name = f"compressed-blobs/zstd/{digest.hash}/{digest.size}"
    assert [n for n in proxy.names if n.endswith(name)] == proxy.names
    assert proxy.names[0].startswith("uploads/") and proxy.names[1] == name


# Uploads then downloads one blob; prints its peak memory (ru_maxrss, bytes)
# once connected and after the transfers.
TRANSFER_SCRIPT = """
import resource, sys
from hitz.executor.remote import RemoteCache
from hitz.executor.store import Digest
url, hash, size, source, dest = sys.argv[1:]
digest = Digest(hash, int(size))
with RemoteCache.connect(url) as client:
    assert client.capabilities.zstd
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    client.upload_file(digest, source)
    client.download_file(digest, dest)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(before, after)
"""


# --- full runs --------------------------------------------------------------------------


def two_machines(tmp_path: Path, *tasks: str, cache: str = "") -> tuple[Project, Project]:
    """Two project folders with the same manifest and files (and their own local caches)."""
    machines = []
    for name in ("machine-a", "machine-b"):
        root = tmp_path / name
        root.mkdir()
        project = Project(root)
        project.write("hitz.toml", f"[cache]\n{cache}\n" + "\n".join(tasks))
        project.write("src/input.txt", "the input\n")
        machines.append(project)
    return machines[0], machines[1]


BUILD = task(
    "build",
    "mkdir -p out/tree/sub && tr a-z A-Z < src/input.txt > out/upper.txt"
    " && head -c 6000000 /dev/zero | tr '\\0' x > out/big.bin"
    " && echo nested > out/tree/sub/file && ln -s ../upper.txt out/tree/link",
    inputs=["src/input.txt"],
    outputs=["out/upper.txt", "out/big.bin", "out/tree/"],
)
SUM = task("sum", "cat out/upper.txt out/tree/sub/file > out/sum.txt",
           inputs=[":build"], outputs=["out/sum.txt"])


def test_a_second_machine_gets_remote_hits(server: ServedCache, tmp_path: Path,
                                          kernel_namespaces: None) -> None:
    a, b = two_machines(tmp_path, BUILD, SUM,
                        cache=f'remote = "grpc://{server.address}"\ninstance = "ci"')
    first = a.run()
    assert first.returncode == 0, first
    assert not any(t["cached"] for t in first.json()["tasks"])
    second = b.run()
    assert second.returncode == 0, second
    assert [(t["cached"], t["cached_from"]) for t in second.json()["tasks"]] == \
        [(True, "remote")] * 2, second
    assert REMOTE_WARNING not in second.stderr
    assert "ok      :build (cached (remote), " in second.stderr
    assert "2 tasks: 2 succeeded (2 from the cache, 2 remote) in " in second.stderr
    third = b.run()  # now up to date, locally
    assert [(t["cached"], t["cached_from"]) for t in third.json()["tasks"]] == \
        [(True, "local")] * 2, third
    assert "(cached (remote)" not in third.stderr
    assert b.snapshot() == {**a.snapshot(), "hitz.toml": b.read("hitz.toml")}
    assert os.readlink(b.root / "out/tree/link") == "../upper.txt"
    assert b.read("out/sum.txt") == "THE INPUT\nnested\n"


def test_remote_flags_and_the_environment_choose_the_remote(
        server: ServedCache, tmp_path: Path, kernel_namespaces: None) -> None:
    a, b = two_machines(tmp_path, BUILD)
    assert a.run("--remote", f"grpc://{server.address}").returncode == 0
    no_remote = b.run("--no-remote", env={"HITZ_REMOTE_CACHE": f"grpc://{server.address}"})
    assert not no_remote.task("build")["cached"]
    shutil.rmtree(b.root / ".hitz")
    shutil.rmtree(b.root / "out")
    fresh = {"HITZ_CACHE_DIR": str(tmp_path / "third-cache"),
             "HITZ_REMOTE_CACHE": f"grpc://{server.address}"}
    assert b.run(env=fresh).task("build")["cached"]
    bad = b.run("--remote", "http://nope")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --remote: 'http://nope' is not a remote cache address")


def test_upload_false_uploads_nothing(server: ServedCache, tmp_path: Path,
                                      kernel_namespaces: None) -> None:
    a, b = two_machines(tmp_path, BUILD,
                        cache=f'remote = "grpc://{server.address}"\nupload = false')
    assert a.run().returncode == 0
    assert not list((server.cache_dir / "store-v1" / "ac").rglob("*-*"))
    assert not list((server.cache_dir / "store-v1" / "cas").rglob("*-*"))
    assert not b.run().task("build")["cached"]


def test_a_server_killed_mid_run_leaves_correct_outputs_and_one_warning(
        server: ServedCache, tmp_path: Path, marker: str, kernel_namespaces: None) -> None:
    # :gate waits in `sleep MARKER` until the test has killed the server; the
    # tasks after it then meet a dead remote, and so do the uploads.
    gate = task("gate", f"sleep {marker}; echo gate > out/g", outputs=["out/g"], deps=["build"])
    after = [task(f"after{n}", f"cat out/g > out/after{n}", inputs=[":gate"],
                  outputs=[f"out/after{n}"]) for n in range(3)]
    a, _ = two_machines(tmp_path, BUILD, gate, *after,
                        cache=f'remote = "grpc://{server.address}"')
    proc = a.start()
    try:
        sleeping = wait_for(
            lambda: [pid for pid, cmd in processes_with(marker) if cmd.startswith("sleep")],
            ":gate to be running", guard_s=60.0)
        server.kill()
        os.kill(sleeping[0], signal.SIGKILL)
        done = a.finish(proc, guard_s=120.0)
    finally:
        a.close()
    assert done.returncode == 0, done
    assert a.read("out/upper.txt") == "THE INPUT\n"
    assert all(a.read(f"out/after{n}") == "gate\n" for n in range(3))
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    assert warnings[0].startswith(f"{REMOTE_WARNING}grpc://{server.address} ")
    assert warnings[0].endswith("; going on with the local cache only")


def test_a_wrong_blob_from_the_remote_is_not_used(tmp_path: Path,
                                                  kernel_namespaces: None) -> None:
    with FakeReapi() as fake:
        a, b = two_machines(tmp_path, BUILD, cache=f'remote = "{fake.url}"')
        assert a.run().returncode == 0
        upper = Digest.of(b"THE INPUT\n")
        assert upper in fake.blobs
        fake.corrupt_blob(upper)
        second = b.run()
    assert second.returncode == 0, second
    assert not second.task("build")["cached"]  # it ran again
    assert b.read("out/upper.txt") == "THE INPUT\n"
    assert REMOTE_WARNING not in second.stderr


@pytest.mark.parametrize("stalled, timeout, asked", [
    # The first contact: one try, with the deadline from [cache] timeout.
    ("GetCapabilities", {"cache": 'timeout = "300ms"'}, 1),
    # A lookup: one try and one retry, with the deadline from the environment.
    ("GetActionResult", {"env": "0.3"}, 2),
])
def test_a_server_that_never_answers_costs_one_or_two_deadlines(
        tmp_path: Path, kernel_namespaces: None, stalled: str, timeout: dict[str, str],
        asked: int) -> None:
    with FakeReapi() as fake:
        fake.stall(stalled)
        a, _ = two_machines(tmp_path, BUILD, SUM,
                            cache=f'remote = "{fake.url}"\n{timeout.get("cache", "")}')
        env = {"HITZ_REMOTE_TIMEOUT": timeout["env"]} if "env" in timeout else {}
        done = a.run(env=env)
        calls = dict(fake.calls)
        fake.unstall()
    assert done.returncode == 0, done
    assert a.read("out/sum.txt") == "THE INPUT\nnested\n"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"{REMOTE_WARNING}{fake.url} did not answer in time"
                        "; going on with the local cache only"], done.stderr
    assert 'hint: a slow remote can be given more time: `timeout = "30s"` in `[cache]`' \
        in done.stderr
    # The bound on the run's wait, counted rather than timed: this many
    # deadlines in all, then the remote is off for the rest of the run.
    assert calls[stalled] == asked
    assert sum(calls.values()) == (1 if stalled == "GetCapabilities" else 1 + asked)


def test_an_interrupted_run_drops_its_uploads_and_exits_at_once(
        tmp_path: Path, marker: str, kernel_namespaces: None) -> None:
    # Four quick tasks queue their uploads against a remote that never
    # answers FindMissingBlobs (and whose deadline is an hour); :gate keeps
    # the run going until the test presses Ctrl-C.
    quick = [task(f"quick{n}", f"echo {n} > out/q{n}", outputs=[f"out/q{n}"]) for n in range(4)]
    gate = task("gate", f"sleep {marker}; echo gate > out/g", outputs=["out/g"],
                deps=[f"quick{n}" for n in range(4)])
    with FakeReapi() as fake:
        fake.stall("FindMissingBlobs")
        a, _ = two_machines(tmp_path, *quick, gate,
                            cache=f'remote = "{fake.url}"\ntimeout = "1h"')
        proc = a.start()
        try:
            wait_for(lambda: [pid for pid, cmd in processes_with(marker)
                              if cmd.startswith("sleep")], ":gate to be running", guard_s=60.0)
            wait_for(lambda: fake.calls["FindMissingBlobs"] == 2 or None,
                     "two uploads in flight", guard_s=60.0)
            proc.send_signal(signal.SIGINT)
            # The guard only catches a hang: waiting for the uploads would
            # take the hour of their deadline.
            done = a.finish(proc, guard_s=60.0)
            wait_for(lambda: fake.ended_by_client["FindMissingBlobs"] == 2 or None,
                     "the uploads in flight to be cancelled", guard_s=30.0)
            calls = dict(fake.calls)
        finally:
            a.close()
            fake.unstall()
    assert done.returncode == 130, done
    assert calls["FindMissingBlobs"] == 2  # the 2 queued uploads never started
    assert "UpdateActionResult" not in calls
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"{REMOTE_WARNING}{fake.url}: the run was interrupted; "
                        "4 task results were not uploaded"], done.stderr
    assert all(a.read(f"out/q{n}") == f"{n}\n" for n in range(4))


def test_a_stopped_server_is_not_a_failed_run(server: ServedCache, tmp_path: Path,
                                              kernel_namespaces: None) -> None:
    a, _ = two_machines(tmp_path, BUILD, cache=f'remote = "grpc://{server.address}"')
    assert server.signal(signal.SIGTERM) == 0
    done = a.run()
    assert done.returncode == 0, done
    assert done.stderr.count(REMOTE_WARNING) == 1
    assert a.read("out/upper.txt") == "THE INPUT\n"
