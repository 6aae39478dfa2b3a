#!/usr/bin/env python3
"""Measure hitz's REAPI client (``RemoteCache``) against `hitz cache serve` on loopback.

    .venv/bin/python bench/remote_bench.py                  # ~1 minute
    .venv/bin/python bench/remote_bench.py --stream-mib 64 --reps 1

Starts ``hitz cache serve --listen 127.0.0.1:0`` on a fresh cache folder (a
temp folder, removed afterwards) and measures what ``hitz run`` does
through the client, with its own concurrency (``TRANSFERS`` threads):

1. ``get_action_result`` of a hit, p50 / p99 over ``--calls`` calls;
2. ``upload_missing`` of 1000 small blobs (100-400 bytes: FindMissingBlobs,
   then batches sent concurrently), then ``read_blobs`` of them;
3. ``upload_file`` and ``download_file`` of one ``--stream-mib`` blob
   (random bytes, and half random half zeros), with zstd and without;
4. ``upload_missing`` and ``read_blobs`` of 8 blobs of ``--stream-mib``/8
   each at once (concurrent ByteStream streams), MiB/s of blob bytes.

Every rep uses new blobs (nothing is already there); medians of ``--reps``.
Progress goes to stderr, a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from server_bench import served  # the same `hitz cache serve`, started the same way

from hitz.executor.remote import RemoteCache
from hitz.executor.store import Digest
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

MIB = 1 << 20


def log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_file(path: Path, size: int, mixed: bool) -> Digest:
    """Write ``size`` new bytes (random, or half random half zeros) to ``path``."""
    import hashlib

    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(MIB, left)
            piece = os.urandom(n // 2) + bytes(n - n // 2) if mixed else os.urandom(n)
            f.write(piece)
            sha.update(piece)
            left -= n
    return Digest(sha.hexdigest(), size)


def bench(address: str, work: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    url = f"grpc://{address}"
    with RemoteCache.connect(url) as client:
        # 1. GetActionResult of a hit.
        out = os.urandom(200)
        out_digest = Digest.of(out)
        client.upload_blobs({out_digest: out})
        action = Digest.of(b"bench action")
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path="o", digest=re_pb2.Digest(hash=out_digest.hash,
                                                               size_bytes=out_digest.size))
        client.update_action_result(action, result)
        times = sorted(timed(lambda: client.get_action_result(action))
                       for _ in range(args.calls))
        p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
        rows.append((f"`get_action_result`, hit, p50 / p99 ({args.calls} calls)",
                     f"{p50 * 1000:.2f} / {p99 * 1000:.2f} ms"))
        log(rows[-1][1])

        # 2. 1000 small blobs.
        ups, downs = [], []
        for _ in range(args.reps):
            blobs = {Digest.of(b): b for b in (os.urandom(100 + n % 300) for n in range(1000))}
            ups.append(timed(lambda b=blobs: client.upload_missing(b)))
            downs.append(timed(lambda b=blobs: client.read_blobs(b)))
        rows.append(("1000 small blobs: `upload_missing` / `read_blobs`",
                     f"{statistics.median(ups):.3f} / {statistics.median(downs):.3f} s"))
        log(rows[-1][1])

    # 3. One big blob, each way, zstd or not.
    size = args.stream_mib * MIB
    for compress in (False, True):
        with RemoteCache.connect(url, compress=compress) as client:
            for mixed in (False, True):
                ups, downs = [], []
                for rep in range(args.reps):
                    source = work / f"blob-{compress}-{mixed}-{rep}"
                    digest = make_file(source, size, mixed)
                    ups.append(timed(lambda d=digest, s=source: client.upload_file(d, s)))
                    back = work / "back"
                    downs.append(timed(lambda d=digest, b=back: client.download_file(d, b)))
                    source.unlink()
                    back.unlink()
                kind = "half random, half zeros" if mixed else "random"
                wire = "zstd" if compress else "raw"
                rows.append((f"{args.stream_mib} MiB blob ({kind}), {wire}: upload / download",
                             f"{size / MIB / statistics.median(ups):.0f} / "
                             f"{size / MIB / statistics.median(downs):.0f} MiB/s"))
                log(rows[-1][1])

    # 4. Concurrent streams.
    with RemoteCache.connect(url) as client:
        ups, downs = [], []
        part = size // 8
        for rep in range(args.reps):
            files = {}
            for n in range(8):
                path = work / f"part-{rep}-{n}"
                files[make_file(path, part, mixed=True)] = path
            ups.append(timed(lambda f=files: client.upload_missing(f)))
            downs.append(timed(lambda f=files: client.read_blobs(f)))
            for path in files.values():
                path.unlink()
        rows.append((f"8 blobs of {part // MIB} MiB at once (zstd): "
                     "`upload_missing` / `read_blobs`",
                     f"{size / MIB / statistics.median(ups):.0f} / "
                     f"{size / MIB / statistics.median(downs):.0f} MiB/s"))
        log(rows[-1][1])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stream-mib", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hitz-remote-bench-"))
    try:
        with served(work / "cache") as address:
            rows = bench(address, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"hitz `RemoteCache` -> `hitz cache serve`, loopback; {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}\n")
    print("| measure | result |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
