#!/usr/bin/env python3
"""Measure the local store (``hitz.executor.store``) against its baselines and
print a Markdown report: the numbers behind docs/cache.md.

    .venv/bin/python bench/store_bench.py                  # 512 MiB, 3 reps
    .venv/bin/python bench/store_bench.py --size-mib 128 --reps 1

Everything is measured in one run, on the same bytes, one core:

1. **Storing a 512 MiB output.** The output is real machine code: static
   archives and object files first, then executables and shared libraries
   (ELF or ``ar`` files under /usr/lib and /usr/bin, at most 16 MiB from any
   one file), concatenated up to ``--size-mib``. It is stored with
   ``Store.put_file`` and compared with SHA-256 alone and with SHA-256 +
   zstd-1 over the same file in the same 1 MiB chunks (the target: the store
   reaches at least 80% of the latter). Other codecs (zstd -1, 3; lz4 if the
   ``lz4`` package is installed) show what the choice of zstd-1 gives up.
2. **Materialising it** (``Store.copy_to``, verified) from a compressed and
   from a raw store, next to a plain ``shutil.copyfile``.
3. **The compression rule** on single files of every size (headers, objects,
   executables, Python sources, and already compressed .gz and .png files):
   by size bucket, what zstd-1 saves on disk in 4 KiB blocks, what share of
   the files the rule compresses, and what a verified read costs.
4. **Hits**: 10,000 action-cache hits, each followed by reading its small
   output blob, with recency already fresh and with every entry due for a
   touch; then a ``gc`` recount of the store, and 1,000 puts with and
   without ``fsync``.

Files read are in the page cache (each is read once before timing), so the
numbers are CPU costs, not disk speed. Stores and data go to ``--workdir``
(default ``bench/out/store``), removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import zstandard

from hitz.executor import store, store_codec

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
CHUNK = store_codec.CHUNK_SIZE
PER_FILE_CAP = 16 * MIB
SOURCES = (  # in this order: objects first, as a build's outputs mostly are
    "/usr/lib/x86_64-linux-gnu/*.a",
    "/usr/lib/x86_64-linux-gnu/*.o",
    "/usr/lib/gcc/x86_64-linux-gnu/*/*.a",
    "/usr/lib/gcc/x86_64-linux-gnu/*/*.o",
    "/usr/lib/gcc/x86_64-linux-gnu/*/*",
    "/usr/bin/*",
    "/usr/lib/x86_64-linux-gnu/*.so*",
    "/usr/lib/x86_64-linux-gnu/**/*.so*",
)
SMALL_SOURCES = (
    "/usr/include/**/*.h",
    "/usr/lib/x86_64-linux-gnu/*.o",
    "/usr/lib/gcc/x86_64-linux-gnu/*/*.o",
    "/usr/bin/*",
    "/usr/lib/python3*/**/*.py",
    "/usr/share/doc/*/*.gz",  # already compressed, as some outputs are (archives, images)
    "/usr/share/**/*.png",
)
SECTIONS = ("output", "rule", "hits")
BUCKETS = (0, 1024, 4096, 16 * 1024, 64 * 1024, MIB, 1 << 40)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--hits", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "store")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only these sections (repeatable; default: all)")
    args = parser.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        report = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report)
    return 0


def run(args: argparse.Namespace, work: Path) -> str:
    out: list[str] = [f"# Store benchmark\n\n{machine(work)}\n"]
    sections = args.only or SECTIONS
    if "output" in sections:
        corpus = work / "output.bin"
        mix = build_corpus(corpus, args.size_mib * MIB)
        size = corpus.stat().st_size
        progress(f"corpus: {size / MIB:.0f} MiB ({mix})")
        out.append(f"Output: {size / MIB:.0f} MiB of machine code ({mix}); "
                   f"median of {args.reps} runs.\n")
        out += store_output(corpus, work, args.reps)
    if "rule" in sections:
        out += compression_rule(work)
    if "hits" in sections:
        out += hits(work, args.hits)
    return "\n".join(out)


# --- 1, 2: one big output --------------------------------------------------------------


def store_output(corpus: Path, work: Path, reps: int) -> list[str]:
    size = corpus.stat().st_size
    data = corpus.read_bytes()  # warms the page cache; codecs' one-shot timings use it
    digest = store.Digest(hashlib.sha256(data).hexdigest(), size)
    stores = {"zstd": work / "store-zstd", "raw": work / "store-raw"}
    dest = work / "materialised"

    def fresh_store(kind: str) -> Callable[[], None]:
        def setup() -> None:
            shutil.rmtree(stores[kind], ignore_errors=True)
            os.sync()  # each write starts with no dirty pages of the last one to flush
        return setup

    def put(kind: str) -> Callable[[], object]:
        def go() -> object:
            with store.Store(stores[kind], compress=kind == "zstd") as s:
                return s.put_file(corpus)
        return go

    def copy(kind: str) -> Callable[[], object]:
        def go() -> None:
            with store.Store(stores[kind]) as s:
                s.copy_to(digest, dest)
        return go

    def no_dest() -> None:
        dest.unlink(missing_ok=True)
        os.sync()

    # (label, setup, timed, note); setups are not timed, and the reps of all
    # measurements are interleaved so that noise from the rest of the machine
    # spreads over all of them alike.
    plan: list[tuple[str, Callable[[], None], Callable[[], object], str]] = [
        ("SHA-256 alone (1 MiB chunks)", _nothing, lambda: chunked(corpus, True), ""),
        ("SHA-256 + zstd-1 (1 MiB chunks, streaming)", _nothing, lambda: chunked(corpus), ""),
        ("**`Store.put_file`, compressed**", fresh_store("zstd"), put("zstd"), "zstd"),
        ("`Store.put_file`, `compress=False`", fresh_store("raw"), put("raw"), "raw"),
        ("`Store.copy_to` from the compressed store", no_dest, copy("zstd"),
         "verified: decompress + SHA-256 + write"),
        ("`Store.copy_to` from the raw store", no_dest, copy("raw"), "verified: SHA-256 + write"),
        ("`shutil.copyfile` (no verification)", no_dest,
         lambda: shutil.copyfile(corpus, dest), ""),
    ]
    times: dict[str, list[float]] = {label: [] for label, *_ in plan}
    for rep in range(max(1, reps)):
        for label, setup, fn, _ in plan:
            setup()
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
        progress(f"rep {rep + 1}: " + ", ".join(
            f"{label.strip('*`')}: {size / MIB / t[-1]:.0f}" for label, t in times.items()))
    rate = {label: size / MIB / statistics.median(t) for label, t in times.items()}
    sha, zstd_sha = rate[plan[0][0]], rate[plan[1][0]]
    notes = {"zstd": f"{rate[plan[2][0]] / zstd_sha:.0%} of SHA-256 + zstd-1",
             "raw": f"{rate[plan[3][0]] / sha:.0%} of SHA-256 alone"}
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest.hash
    on_disk = {k: sum(f.stat().st_size for f in (p / store.LAYOUT / "cas").rglob("*-*"))
               for k, p in stores.items()}
    lines = ["## Storing and materialising one output\n",
             "| operation | MiB/s | |", "|---|---:|---|"]
    lines += [f"| {label} | {rate[label]:.0f} | {notes.get(note, note)} |"
              for label, _, _, note in plan]
    lines.append(f"\nOn disk: compressed store {on_disk['zstd'] / MIB:.0f} MiB "
                 f"(ratio {size / on_disk['zstd']:.2f}), raw store {on_disk['raw'] / MIB:.0f} "
                 "MiB.\n")
    lines += codecs(data, reps)
    return lines


def _nothing() -> None:
    pass


def chunked(path: Path, sha_only: bool = False) -> None:
    sha = hashlib.sha256()
    zstd = None if sha_only else zstandard.ZstdCompressor(level=1).compressobj()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
            if zstd is not None:
                zstd.compress(view[:n])
    if zstd is not None:
        zstd.flush()


def codecs(data: bytes, reps: int) -> list[str]:
    """Each codec's ratio and one-core speed over ``data`` in 1 MiB chunks."""
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    candidates: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {}
    for level in (-1, 1, 3):
        c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        candidates[f"zstd {level}"] = (c.compress, d.decompress)
    with contextlib.suppress(ImportError):
        import lz4.frame  # type: ignore[import-untyped,import-not-found,unused-ignore]

        candidates["lz4 (frame, default)"] = (lz4.frame.compress, lz4.frame.decompress)
    lines = ["### Codecs on the same bytes (1 MiB chunks, one core)\n",
             "| codec | ratio | compress MiB/s | decompress MiB/s |", "|---|---:|---:|---:|"]
    for name, (compress, decompress) in candidates.items():
        packed = [compress(c) for c in chunks]
        ratio = len(data) / sum(len(p) for p in packed)
        c_rate = len(data) / MIB / median_time(
            lambda compress=compress: [compress(c) for c in chunks], reps)  # type: ignore[misc]
        d_rate = len(data) / MIB / median_time(
            lambda d=decompress, p=packed: [d(x) for x in p], reps)  # type: ignore[misc]
        progress(f"{name}: ratio {ratio:.2f}, {c_rate:.0f} / {d_rate:.0f} MiB/s")
        lines.append(f"| {name} | {ratio:.2f} | {c_rate:.0f} | {d_rate:.0f} |")
    if not any(name.startswith("lz4") for name in candidates):
        lines.append("\n(lz4 not measured: `pip install lz4` to include it.)")
    return [*lines, ""]


# --- 3: the compression rule -----------------------------------------------------------


def compression_rule(work: Path) -> list[str]:
    files = small_corpus()
    compressor = zstandard.ZstdCompressor(level=store_codec.ZSTD_LEVEL)
    rows = []
    for low, high in itertools.pairwise(BUCKETS):
        inside = [f for f in files if low <= len(f) < high]
        if not inside:
            continue
        raw_blocks = packed_blocks = ruled_blocks = compressed = 0
        raw_bytes = packed_bytes = 0
        for data in inside:
            packed = compressor.compress(data)
            raw_bytes += len(data)
            packed_bytes += len(packed)
            raw_blocks += blocks(len(data) + store_codec.HEADER_LEN)
            packed_blocks += blocks(len(packed) + store_codec.HEADER_LEN)
            header, payload = store_codec.encode_blob(data, compress=True)
            compressed += header == store_codec.ZSTD
            ruled_blocks += blocks(len(payload) + store_codec.HEADER_LEN)
        read_raw, read_ruled = verify_cost(work, inside)
        rows.append(
            f"| {size_label(low)}–{size_label(high)} | {len(inside)} "
            f"| {raw_bytes / max(packed_bytes, 1):.2f} "
            f"| {1 - packed_blocks / raw_blocks:.0%} | {compressed / len(inside):.0%} "
            f"| {1 - ruled_blocks / raw_blocks:.0%} | {read_raw:.0f} | {read_ruled:.0f} |"
        )
    return [
        "## The compression rule, file by file\n",
        f"{len(files)} files: headers, objects, executables, Python sources, and already "
        "compressed .gz and .png files. Disk is counted in 4 KiB blocks (header included). "
        "A verified read is `Store.read_bytes`: open, read, decode, SHA-256.\n",
        "| size | files | zstd-1 ratio (bytes) | blocks saved if all compressed "
        "| compressed by the rule | blocks saved by the rule "
        "| verified read, raw store (µs/file) | verified read, by the rule (µs/file) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def small_corpus(limit: int = 6000) -> list[bytes]:
    paths: list[str] = []
    for pattern in SMALL_SOURCES:
        found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        paths += found[: limit // len(SMALL_SOURCES)]
    out = []
    for path in paths:
        with contextlib.suppress(OSError):
            data = Path(path).read_bytes()
            if 0 < len(data) <= 64 * MIB:
                out.append(data)
    return out


def verify_cost(work: Path, files: list[bytes]) -> tuple[float, float]:
    """µs per verified read of ``files``, from a raw store and from one following the rule."""
    costs = []
    for compress in (False, True):
        folder = work / f"rule-{compress}"
        with store.Store(folder, compress=compress) as s:
            digests = [s.put_bytes(data) for data in files]
            start = time.perf_counter()
            for digest in digests:
                s.read_bytes(digest)
            costs.append((time.perf_counter() - start) / len(digests) * 1e6)
        shutil.rmtree(folder)
    return costs[0], costs[1]


def blocks(size: int) -> int:
    return -(-size // 4096)


def size_label(size: int) -> str:
    if size >= 1 << 40:
        return "∞"
    if size >= MIB:
        return f"{size // MIB} MiB"
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


# --- 4: hits, recount, fsync ------------------------------------------------------------


def hits(work: Path, count: int) -> list[str]:
    folder = work / "hits"
    outputs = [(b"%08d " % i) * 1200 for i in range(count)]  # ~10 KiB each, distinct
    with store.Store(folder) as s:
        pairs = []
        for i, data in enumerate(outputs):
            action = store.Digest.of(b"action %d" % i)
            blob = s.put_bytes(data)
            s.put_action_result(action, blob.hash.encode() + b" " + str(blob.size).encode())
            pairs.append((action, blob))
    rows = []
    with store.Store(folder) as s:
        start = time.perf_counter()
        for action, _ in pairs:
            s.get_action_result(action)
        seconds = time.perf_counter() - start
    rows.append(f"| {count:,} AC hits alone (a no-op run: outputs already in place) "
                f"| {seconds * 1e3:.0f} ms | {seconds / count * 1e6:.1f} µs |")
    variants = (("recency fresh: no write (`TOUCH_AFTER_NS` = 60 s)", store.TOUCH_AFTER_NS),
                ("a touch (`utime`) on every hit (`TOUCH_AFTER_NS` = 0)", 0))
    for label, touch_after in variants:
        store.TOUCH_AFTER_NS = touch_after
        with store.Store(folder) as s:
            start = time.perf_counter()
            for action, _ in pairs:
                hash_hex, size = s.get_action_result(action).split()  # type: ignore[union-attr]
                s.read_bytes(store.Digest(hash_hex.decode(), int(size)))
            seconds = time.perf_counter() - start
        rows.append(f"| {count:,} AC hits + blob reads, {label} | {seconds * 1e3:.0f} ms "
                    f"| {seconds / count * 1e6:.1f} µs |")
        progress(rows[-1])
    store.TOUCH_AFTER_NS = variants[0][1]
    with store.Store(folder) as s:
        start = time.perf_counter()
        result = s.gc(1 << 50)
        seconds = time.perf_counter() - start
    rows.append(f"| `gc` recount of {result.entries:,} entries | {seconds * 1e3:.0f} ms "
                f"| {seconds / result.entries * 1e6:.1f} µs |")
    for fsync in (False, True):
        shutil.rmtree(folder, ignore_errors=True)
        blobs = [os.urandom(16 * 1024) for _ in range(1000)]
        with store.Store(folder, fsync=fsync) as s:
            start = time.perf_counter()
            for data in blobs:
                s.put_bytes(data)
            seconds = time.perf_counter() - start
        rows.append(f"| 1,000 puts of 16 KiB, `fsync={fsync}` | {seconds * 1e3:.0f} ms "
                    f"| {seconds / 1000 * 1e6:.0f} µs |")
        progress(rows[-1])
    shutil.rmtree(folder, ignore_errors=True)
    return ["## Hits, recount, durability\n", "| operation | total | each |", "|---|---:|---:|",
            *rows, ""]


# --- helpers ----------------------------------------------------------------------------


def build_corpus(dest: Path, size: int) -> str:
    """Concatenate machine code into ``dest`` up to ``size`` bytes; describe the mix."""
    seen: set[str] = set()
    kinds = {"archives and objects": 0, "executables and shared libraries": 0}
    written = 0
    with open(dest, "wb") as out:
        for path in candidate_files(seen):
            if written >= size:
                break
            with contextlib.suppress(OSError), open(path, "rb") as f:
                head = f.read(8)
                if not (head.startswith(b"\x7fELF") or head == b"!<arch>\n"):
                    continue
                data = head + f.read(PER_FILE_CAP - 8)
                data = data[: size - written]
                out.write(data)
                written += len(data)
                kind = ("archives and objects" if path.endswith((".a", ".o"))
                        else "executables and shared libraries")
                kinds[kind] += len(data)
    if written < size:
        raise SystemExit(f"error: found only {written / MIB:.0f} MiB of machine code")
    return ", ".join(f"{v / written:.0%} {k}" for k, v in kinds.items())


def candidate_files(seen: set[str]) -> Iterator[str]:
    for pattern in SOURCES:
        for path in sorted(glob.glob(pattern, recursive=True)):
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            yield real


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(work: Path) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                        text=True, check=False).stdout.strip()
    return (f"Machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"work folder on {fs or 'unknown fs'}; Python {platform.python_version()}, "
            f"zstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION[0]}."
            f"{zstandard.ZSTD_VERSION[1]}.{zstandard.ZSTD_VERSION[2]}).")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
