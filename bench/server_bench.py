#!/usr/bin/env python3
"""Measure `hitz cache serve` over loopback and print a Markdown table.

    .venv/bin/python bench/server_bench.py                 # ~1 minute
    .venv/bin/python bench/server_bench.py --stream-mib 64 --calls 500

Starts ``hitz cache serve --listen 127.0.0.1:0`` on a fresh cache folder
(``--workdir``, default a temp folder, removed afterwards) and measures, with
one single-threaded Python client using the generated stubs, as
../shared/peers/reapi/RECIPE.md measured the peer servers:

1. a one-blob call round trip (FindMissingBlobs of one digest), p50;
2. GetActionResult of a hit (one small output, checked present), p50 / p99
   over ``--calls`` calls;
3. 1000 small blobs (100-400 bytes) in one BatchUpdateBlobs, then in one
   BatchReadBlobs (medians of ``--reps``);
4. a ``--stream-mib`` ByteStream Write and Read of random bytes (stored raw:
   zstd cannot shrink them), and of mixed text and noise through
   ``compressed-blobs/zstd`` both ways (medians of ``--reps``; each rep writes
   a new blob).

Progress goes to stderr, the table to stdout. Peers are compared elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import zstandard

from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from hitz.protos.google.bytestream import bytestream_pb2 as bs_pb2
from hitz.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

MIB = 1 << 20
READY = re.compile(r"serving REAPI cache at (\S+) ")


def log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def wire(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@contextlib.contextmanager
def served(cache_dir: Path) -> Iterator[str]:
    """A `hitz cache serve` on ``cache_dir``; its address."""
    stderr = cache_dir.parent / "serve.log"
    with open(stderr, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hitz.executor", "cache", "serve", "--listen", "127.0.0.1:0",
             "--cache-dir", str(cache_dir)], stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not (found := READY.search(stderr.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"hitz cache serve did not start:\n{stderr.read_text()}")
            time.sleep(0.02)
        yield found.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def write_requests(name: str, payload: bytes) -> Iterator[bs_pb2.WriteRequest]:
    for offset in range(0, len(payload), MIB):
        yield bs_pb2.WriteRequest(
            resource_name=name if offset == 0 else "", write_offset=offset,
            data=payload[offset:offset + MIB], finish_write=offset + MIB >= len(payload))


def mixed_bytes(size: int, rng: random.Random) -> bytes:
    parts, total = [], 0
    while total < size:
        parts.append(rng.randbytes(4096))
        parts.append((f"line {rng.random()} of a build log\n" * 200).encode())
        total += len(parts[-1]) + 4096
    return b"".join(parts)[:size]


def bench(address: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    rng = random.Random(1)
    with grpc.insecure_channel(address) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        ac = re_grpc.ActionCacheStub(channel)
        bs = bs_grpc.ByteStreamStub(channel)
        re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())

        log("round trips")
        output = b"an output"
        Req = re_pb2.BatchUpdateBlobsRequest.Request
        cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            requests=[Req(digest=wire(output), data=output)]))
        one = re_pb2.FindMissingBlobsRequest(blob_digests=[wire(output)])
        trips = [timed(lambda: cas.FindMissingBlobs(one)) for _ in range(args.calls)]
        rows.append(("one-blob call round trip (FindMissingBlobs), p50",
                     f"{statistics.median(trips) * 1e3:.2f} ms"))

        action = wire(b"an action")
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="out", digest=wire(output))])
        ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=action, action_result=result))
        get = re_pb2.GetActionResultRequest(action_digest=action)
        hits = [timed(lambda: ac.GetActionResult(get)) for _ in range(args.calls)]
        rows.append((f"GetActionResult, hit, p50 / p99 ({args.calls} calls)",
                     f"{percentile(hits, 50) * 1e3:.2f} / {percentile(hits, 99) * 1e3:.2f} ms"))

        log("batches")
        updates, reads = [], []
        for _ in range(args.reps):
            blobs = [rng.randbytes(rng.randrange(100, 400)) for _ in range(1000)]
            request = re_pb2.BatchUpdateBlobsRequest(
                requests=[Req(digest=wire(b), data=b) for b in blobs])
            updates.append(timed(lambda request=request: cas.BatchUpdateBlobs(request)))
            read = re_pb2.BatchReadBlobsRequest(digests=[wire(b) for b in blobs])
            reads.append(timed(lambda read=read: cas.BatchReadBlobs(read)))
        rows.append(("1000 small blobs in one BatchUpdateBlobs",
                     f"{statistics.median(updates):.3f} s"))
        rows.append(("the same 1000 in one BatchReadBlobs", f"{statistics.median(reads):.3f} s"))

        size = args.stream_mib * MIB
        for label, compressed in (("random bytes", False), ("mixed, zstd both ways", True)):
            log(f"ByteStream, {args.stream_mib} MiB, {label}")
            w_rates, r_rates = [], []
            for _ in range(args.reps):
                data = mixed_bytes(size, rng) if compressed else os.urandom(size)
                digest = wire(data)
                kind = "compressed-blobs/zstd" if compressed else "blobs"
                payload = zstandard.ZstdCompressor(level=1).compress(data) if compressed else data
                name = f"uploads/{uuid.uuid4()}/{kind}/{digest.hash}/{size}"
                w_rates.append(size / MIB / timed(
                    lambda name=name, payload=payload: bs.Write(write_requests(name, payload))))
                read_name = f"{kind}/{digest.hash}/{size}"

                def read_all(read_name: str = read_name) -> None:
                    for _ in bs.Read(bs_pb2.ReadRequest(resource_name=read_name)):
                        pass

                r_rates.append(size / MIB / timed(read_all))
                del data, payload
            rows.append((f"{args.stream_mib} MiB ByteStream Write, {label}",
                         f"{statistics.median(w_rates):.0f} MiB/s"))
            rows.append((f"{args.stream_mib} MiB ByteStream Read, {label}",
                         f"{statistics.median(r_rates):.0f} MiB/s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stream-mib", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hitz-server-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with served(workdir / "cache") as address:
            rows = bench(address, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"`hitz cache serve` on loopback; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, one client thread\n")
    print("| measure | hitz cache serve |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
