"""Remote execution: first run vs cached ``Execute``, per task, on real servers.

    .venv/bin/python bench/remote_exec_bench.py [--tasks 20] [--peers casd,buildgrid]

For each peer (buildbox-casd; BuildGrid with a ``hitz worker``; both started
on free loopback ports through tests/peers.py and tests/peers_exec.py, so
``scripts/test`` must have installed them), N distinct small actions
(``/bin/sh -c "echo I > out.txt"``, built as hitz builds a task's Action) are
uploaded, then each is executed once ("first": the remote runs it) and once
more ("cached": the remote answers from its ActionCache, ``cached_result``).
A task's time is from sending ``Execute`` to the done operation, the way
``RemoteBackend`` follows it; uploads are not counted. Prints the median and
p90 of each, in milliseconds, as a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hitz.executor.actions import ActionKey, build_key, platform_properties  # noqa: E402
from hitz.executor.model import TaskDef  # noqa: E402
from hitz.executor.remote import RemoteCache  # noqa: E402
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2  # noqa: E402
from hitz.protos.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2_grpc as re_grpc,
)
from hitz.sandbox.spec import BASE_ENV  # noqa: E402
from tests.peers import start_casd  # noqa: E402
from tests.peers_exec import start_buildgrid_exec, start_worker  # noqa: E402


def _keys(count: int, salt: str) -> list[ActionKey]:
    keys = []
    for n in range(count):
        task = TaskDef(f"t{n}", ("/bin/sh", "-c", f"echo {salt}-{n} > out.txt"),
                       outputs=("out.txt",))
        keys.append(build_key(task, dict(BASE_ENV), [],
                              platform_properties(task, "remote:")))
    return keys


def _execute(remote: RemoteCache, key: ActionKey) -> tuple[float, bool]:
    stub = re_grpc.ExecutionStub(remote.channel)
    request = re_pb2.ExecuteRequest(
        instance_name=remote.instance,
        action_digest=re_pb2.Digest(hash=key.digest.hash, size_bytes=key.digest.size))
    start = time.perf_counter()
    for operation in stub.Execute(request, timeout=120, metadata=remote.metadata):
        if operation.done:
            elapsed = time.perf_counter() - start
            response = re_pb2.ExecuteResponse()
            operation.response.Unpack(response)
            if response.status.code or response.result.exit_code:
                raise SystemExit(f"{key.digest}: failed: {response}")
            return elapsed, response.cached_result
    raise SystemExit(f"{key.digest}: the stream ended without a result")


def _measure(url: str, count: int) -> dict[str, list[float]]:
    remote = RemoteCache.connect(url)
    try:
        keys = _keys(count, f"{time.time_ns()}")  # new actions: nothing cached yet
        for key in keys:
            remote.upload_missing(dict(key.blobs))
        # Warm up: a worker's session (BuildGrid's first lease waits for it).
        warm = _keys(1, f"warm-up-{time.time_ns()}")[0]
        remote.upload_missing(dict(warm.blobs))
        _execute(remote, warm)
        first, cached = [], []
        for key in keys:
            elapsed, was_cached = _execute(remote, key)
            assert not was_cached, "a new action came from the cache"
            first.append(elapsed)
        for key in keys:
            elapsed, was_cached = _execute(remote, key)
            assert was_cached, "the second Execute of an action ran it again"
            cached.append(elapsed)
        return {"first": first, "cached": cached}
    finally:
        remote.close()


@contextlib.contextmanager
def _peer(name: str, folder: Path) -> Iterator[str]:
    if name == "casd":
        with start_casd(folder / "casd") as peer:
            yield peer.url
    elif name == "buildgrid":
        with start_buildgrid_exec(folder / "bgd") as peer, \
                start_worker(peer, folder / "worker", jobs=1):
            yield peer.url
    else:
        raise SystemExit(f"unknown peer {name!r}: casd or buildgrid")


def _ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--peers", default="casd,buildgrid")
    args = parser.parse_args()
    print("| peer | tasks | first run p50 / p90 (ms) | cached p50 / p90 (ms) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="hitz-remote-exec-bench-") as tmp:
        for name in args.peers.split(","):
            with _peer(name, Path(tmp)) as url:
                times = _measure(url, args.tasks)
            print(f"| {name} | {args.tasks} | "
                  f"{statistics.median(times['first']) * 1000:.1f} / {_ms(times['first'], 0.9)} | "
                  f"{statistics.median(times['cached']) * 1000:.1f} / "
                  f"{_ms(times['cached'], 0.9)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
