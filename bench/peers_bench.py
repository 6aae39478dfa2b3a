#!/usr/bin/env python3
"""`hitz cache serve` beside buildbox-casd and BuildGrid, over loopback: one Markdown table.

    .venv/bin/python bench/peers_bench.py                  # ~2 minutes
    .venv/bin/python bench/peers_bench.py --reps 5 --stream-mib 64 --server hitz --server casd

Starts each server on a free port of 127.0.0.1 (the peers as the test suite
does, through tests/peers.py, from what scripts/test installed; hitz as
``hitz cache serve`` on a fresh cache folder) and measures all of them with
the same single-threaded Python client (hitz's generated stubs), as
../shared/peers/reapi/RECIPE.md measured the peers:

1. one-blob call round trip (FindMissingBlobs of one present digest), p50;
2. GetActionResult of a hit (a result with one small output), p50 and p99
   over ``--calls`` calls;
3. 1000 small blobs (100-400 random bytes) in one BatchUpdateBlobs, then the
   same 1000 in one BatchReadBlobs;
4. a ``--stream-mib`` MiB ByteStream Write, then Read, of random bytes in
   1 MiB messages (a new blob each repetition).

Every measure is repeated ``--reps`` times; the table gives the median of
the repetitions (for 1 and 2, the median of each repetition's percentile).
Within each repetition the servers take turns in a rotating order, so a slow
moment of the machine does not always land on the same one. Every server
runs for the whole benchmark; the machine has 2 cores, so compare numbers of
one invocation, not across invocations. Progress goes to stderr, the table
to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from server_bench import MIB, percentile, served, timed, wire, write_requests  # noqa: E402

from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2  # noqa: E402
from hitz.protos.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2_grpc as re_grpc,
)
from hitz.protos.google.bytestream import bytestream_pb2 as bs_pb2  # noqa: E402
from hitz.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc  # noqa: E402
from tests import peers  # noqa: E402

SERVERS = ("hitz", "casd", "buildgrid")
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * MIB),
                ("grpc.max_send_message_length", 64 * MIB)]
Req = re_pb2.BatchUpdateBlobsRequest.Request


def log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@dataclass
class Samples:
    """One server's measures, a list of values (one per repetition) per measure."""

    label: str
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, measure: str, value: float) -> None:
        self.values.setdefault(measure, []).append(value)

    def median(self, measure: str) -> float | None:
        found = self.values.get(measure)
        return statistics.median(found) if found else None


class Client:
    """The stubs for one server, and the blobs it already holds."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.bs = bs_grpc.ByteStreamStub(self.channel)
        self.caps = re_grpc.CapabilitiesStub(self.channel).GetCapabilities(
            re_pb2.GetCapabilitiesRequest(), timeout=30)
        output = b"an output of the benchmark"
        self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            requests=[Req(digest=wire(output), data=output)]))
        self.one = re_pb2.FindMissingBlobsRequest(blob_digests=[wire(output)])
        action = wire(f"an action of the benchmark {uuid.uuid4()}".encode())
        self.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=action, action_result=re_pb2.ActionResult(
                output_files=[re_pb2.OutputFile(path="out", digest=wire(output))])))
        self.get = re_pb2.GetActionResultRequest(action_digest=action)

    def close(self) -> None:
        self.channel.close()


def measure(client: Client, samples: Samples, args: argparse.Namespace,
            rng: random.Random) -> None:
    cas, ac, bs = client.cas, client.ac, client.bs
    trips = [timed(lambda: cas.FindMissingBlobs(client.one)) for _ in range(args.calls)]
    samples.add("trip", percentile(trips, 50))
    hits = [timed(lambda: ac.GetActionResult(client.get)) for _ in range(args.calls)]
    samples.add("ac50", percentile(hits, 50))
    samples.add("ac99", percentile(hits, 99))

    blobs = [rng.randbytes(rng.randrange(100, 400)) for _ in range(1000)]
    update = re_pb2.BatchUpdateBlobsRequest(requests=[Req(digest=wire(b), data=b) for b in blobs])
    samples.add("batch_update", timed(lambda: _all_ok(cas.BatchUpdateBlobs(update).responses)))
    read = re_pb2.BatchReadBlobsRequest(digests=[wire(b) for b in blobs])
    samples.add("batch_read", timed(lambda: _all_ok(cas.BatchReadBlobs(read).responses)))

    size = args.stream_mib * MIB
    data = os.urandom(size)
    digest = wire(data)
    name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{size}"
    samples.add("bs_write", size / MIB / timed(lambda: bs.Write(write_requests(name, data))))

    def read_all() -> None:
        got = 0
        for piece in bs.Read(bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{size}")):
            got += len(piece.data)
        if got != size:
            raise SystemExit(f"{samples.label}: read {got} bytes of a {size}-byte blob")

    samples.add("bs_read", size / MIB / timed(read_all))


def _all_ok(responses: Iterable[Any]) -> None:
    for response in responses:
        if response.status.code != 0:
            raise SystemExit(f"a batch call failed for a blob: {response.status}")


@contextlib.contextmanager
def start(server: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """(label, address) of ``server`` running on a free loopback port."""
    folder = workdir / server
    folder.mkdir(parents=True)
    if server == "hitz":
        with served(folder / "cache") as address:
            yield "hitz cache serve", address
    elif server == "casd":
        with peers.start_casd(folder) as peer:
            yield "buildbox-casd 1.4.25", peer.address
    else:
        with peers.start_buildgrid(folder, memory="2GB") as peer:
            yield peer.name, peer.address


ROWS: list[tuple[str, str, Callable[[float], str]]] = [
    ("trip", "one-blob call round trip (FindMissingBlobs), p50", lambda v: f"{v * 1e3:.2f} ms"),
    ("ac50", "GetActionResult, hit, p50", lambda v: f"{v * 1e3:.2f} ms"),
    ("ac99", "GetActionResult, hit, p99", lambda v: f"{v * 1e3:.2f} ms"),
    ("batch_update", "1000 small blobs in one BatchUpdateBlobs", lambda v: f"{v * 1e3:.0f} ms"),
    ("batch_read", "the same 1000 in one BatchReadBlobs", lambda v: f"{v * 1e3:.0f} ms"),
    ("bs_write", "ByteStream Write, random bytes", lambda v: f"{v:.0f} MiB/s"),
    ("bs_read", "ByteStream Read, random bytes", lambda v: f"{v:.0f} MiB/s"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", choices=SERVERS,
                        help="measure only these (repeatable; default: all three)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per latency sample")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stream-mib", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the servers' folders and logs here (default: a temp folder)")
    args = parser.parse_args()
    servers = args.server or list(SERVERS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hitz-peers-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    try:
        with contextlib.ExitStack() as stack:
            clients: dict[str, Client] = {}
            samples: dict[str, Samples] = {}
            for server in servers:
                log(f"starting {server}")
                label, address = stack.enter_context(start(server, workdir))
                clients[server] = Client(address)
                stack.callback(clients[server].close)
                samples[server] = Samples(label)
            for rep in range(args.reps):
                order = servers[rep % len(servers):] + servers[:rep % len(servers)]
                for server in order:
                    log(f"rep {rep + 1}/{args.reps}: {server}")
                    measure(clients[server], samples[server], args, rng)
    except peers.PeerError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"REAPI servers on loopback; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, one client thread; "
          f"medians of {args.reps} repetitions, {args.calls} calls per latency sample, "
          f"{args.stream_mib} MiB streams\n")
    print("| measure | " + " | ".join(samples[s].label for s in servers) + " |")
    print("|---|" + "---:|" * len(servers))
    for key, title, fmt in ROWS:
        cells = []
        for server in servers:
            value = samples[server].median(key)
            cells.append("–" if value is None else fmt(value))
        title = title.replace("ByteStream", f"{args.stream_mib} MiB ByteStream")
        print(f"| {title} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
