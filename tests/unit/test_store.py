"""The local store: round trips, the compression rule, verification and repair,
atomicity under concurrent and killed writers, eviction, stats.

Tests look at the files through the documented layout (docs/cache.md):
``<folder>/store-v1/{cas,ac}/<2 hex>/<sha256>-<size>``, temp files in
``store-v1/tmp/``. Nothing here sleeps or times anything: a writer is known to
be mid-write because a pipe it reads from has taken the bytes written to it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from hitz.executor import store, store_codec, store_gc
from hitz.executor.errors import HitzError, OutputError
from hitz.executor.store import (
    EMPTY_DIGEST,
    BlobCorrupt,
    BlobMissing,
    CacheErrorReason,
    CacheUnavailable,
    Digest,
    Store,
)

REPO = Path(__file__).resolve().parents[2]
COMPRESSIBLE = b"".join(b"line %06d of a very repetitive text\n" % i for i in range(2000))
GUARD_S = 60  # a child that has not finished by then is hung, not slow


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def st(folder: Path) -> Iterator[Store]:
    with Store(folder) as s:
        yield s


def layout(folder: Path) -> Path:
    return folder / "store-v1"


def blob_file(folder: Path, digest: Digest) -> Path:
    return layout(folder) / "cas" / digest.hash[:2] / f"{digest.hash}-{digest.size}"


def ac_file(folder: Path, digest: Digest) -> Path:
    return layout(folder) / "ac" / digest.hash[:2] / f"{digest.hash}-{digest.size}"


def temps(folder: Path) -> list[Path]:
    return sorted((layout(folder) / "tmp").iterdir())


def entries(folder: Path, kind: str = "cas") -> list[Path]:
    return sorted((layout(folder) / kind).glob("*/*"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def header(folder: Path, digest: Digest) -> bytes:
    return blob_file(folder, digest).read_bytes()[:8]


# --- digests ------------------------------------------------------------------------------


def test_a_digest_is_the_sha256_and_size_of_the_bytes() -> None:
    digest = Digest.of(b"hello")
    assert digest == Digest(hashlib.sha256(b"hello").hexdigest(), 5)
    assert str(digest) == f"{hashlib.sha256(b'hello').hexdigest()}/5"
    assert Digest(hashlib.sha256(b"").hexdigest(), 0) == EMPTY_DIGEST


@pytest.mark.parametrize(("hash_hex", "size"), [("AB" * 32, 1), ("ab" * 31, 1), ("ab" * 32, -1)])
def test_a_malformed_digest_is_refused(hash_hex: str, size: int) -> None:
    with pytest.raises(ValueError):
        Digest(hash_hex, size)


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"x", b"small blob", COMPRESSIBLE, os.urandom(100_000)],
    ids=["1 byte", "small", "compressible", "incompressible"],
)
def test_put_bytes_then_read_bytes_gives_the_bytes_back(st: Store, data: bytes) -> None:
    digest = st.put_bytes(data)
    assert digest == Digest.of(data)
    assert st.contains(digest)
    assert st.read_bytes(digest) == data


def test_the_empty_blob_is_always_present_and_never_stored(st: Store, folder: Path) -> None:
    assert st.put_bytes(b"") == EMPTY_DIGEST
    assert st.contains(EMPTY_DIGEST)
    assert st.missing([EMPTY_DIGEST]) == []
    assert st.read_bytes(EMPTY_DIGEST) == b""
    assert list(st.read_chunks(EMPTY_DIGEST)) == []
    st.copy_to(EMPTY_DIGEST, folder.parent / "empty")
    assert (folder.parent / "empty").read_bytes() == b""
    assert entries(folder) == []


def test_put_file_of_a_small_file_round_trips(st: Store, tmp_path: Path) -> None:
    source = tmp_path / "a.o"
    source.write_bytes(COMPRESSIBLE)
    digest = st.put_file(source)
    assert digest == Digest.of(COMPRESSIBLE)
    assert st.read_bytes(digest) == COMPRESSIBLE


@pytest.mark.parametrize("kind", ["compressible", "incompressible"])
def test_put_file_streams_a_big_file_in_chunks(
    st: Store, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # A "big" file is one over SMALL_FILE; shrink both limits to keep the test small.
    monkeypatch.setattr(store, "SMALL_FILE", 64 * 1024)
    monkeypatch.setattr(store_codec, "CHUNK_SIZE", 16 * 1024)
    data = COMPRESSIBLE * 5 if kind == "compressible" else os.urandom(300_000)
    source = tmp_path / "big"
    source.write_bytes(data)
    digest = st.put_file(source)
    assert digest == Digest.of(data)
    assert st.read_bytes(digest) == data
    assert b"".join(st.read_chunks(digest)) == data
    assert all(len(c) <= 16 * 1024 for c in st.read_chunks(digest))
    assert header(folder, digest) == (b"HZB1zst\n" if kind == "compressible" else b"HZB1raw\n")
    assert temps(folder) == []


def test_put_file_of_a_pipe_streams_it(st: Store, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(COMPRESSIBLE), daemon=True)
    writer.start()
    digest = st.put_file(fifo)
    writer.join(timeout=GUARD_S)
    assert digest == Digest.of(COMPRESSIBLE)
    assert st.read_bytes(digest) == COMPRESSIBLE


def test_a_blob_of_several_megabytes_round_trips_through_every_read(
    st: Store, tmp_path: Path
) -> None:
    data = (COMPRESSIBLE + os.urandom(50_000)) * 80  # ~10 MiB, over SMALL_FILE
    source = tmp_path / "big"
    source.write_bytes(data)
    digest = st.put_file(source)
    assert digest == Digest.of(data)
    assert st.read_bytes(digest) == data
    assert b"".join(st.read_chunks(digest)) == data
    st.copy_to(digest, tmp_path / "out" / "big")
    assert (tmp_path / "out" / "big").read_bytes() == data


def test_storing_a_blob_again_does_not_rewrite_it(
    st: Store, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small"
    small.write_bytes(COMPRESSIBLE)
    digest = st.put_file(small)
    before = os.stat(blob_file(folder, digest))
    assert st.put_file(small) == digest
    assert st.put_bytes(COMPRESSIBLE) == digest
    monkeypatch.setattr(store, "SMALL_FILE", 1024)  # now the streaming path
    assert st.put_file(small) == digest
    after = os.stat(blob_file(folder, digest))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert st.counters.stored == 1
    assert st.counters.already_present == 3
    assert temps(folder) == []


def test_missing_lists_absent_digests_in_order_without_repeats(st: Store) -> None:
    present = st.put_bytes(b"present")
    absent_1, absent_2 = Digest.of(b"absent 1"), Digest.of(b"absent 2")
    asked = [absent_2, present, EMPTY_DIGEST, absent_1, absent_2]
    assert st.missing(asked) == [absent_2, absent_1]


def test_a_digest_with_the_wrong_size_is_not_present(st: Store) -> None:
    digest = st.put_bytes(b"twelve bytes")
    wrong = Digest(digest.hash, 13)
    assert not st.contains(wrong)
    with pytest.raises(BlobMissing):
        st.read_bytes(wrong)
    assert st.read_bytes(digest) == b"twelve bytes"


def test_reading_an_absent_blob_raises_blob_missing(st: Store) -> None:
    digest = Digest.of(b"never stored")
    with pytest.raises(BlobMissing) as info:
        st.read_bytes(digest)
    assert not isinstance(info.value, BlobCorrupt)
    assert info.value.reason is CacheErrorReason.MISSING
    assert str(info.value) == f"blob {digest} is not in the cache"
    for read in (lambda: st.read_chunks(digest), lambda: st.copy_to(digest, "/nonexistent/x")):
        with pytest.raises(BlobMissing):
            read()
    assert st.counters.cas_misses == 3


# --- materialising ------------------------------------------------------------------------


@pytest.mark.parametrize(("executable", "mode"), [(False, 0o644), (True, 0o755)])
def test_copy_to_writes_the_blob_with_the_mode_asked_whatever_the_umask(
    st: Store, tmp_path: Path, executable: bool, mode: int
) -> None:
    digest = st.put_bytes(COMPRESSIBLE)
    dest = tmp_path / "out" / "deep" / "tool"
    old_umask = os.umask(0o077)
    try:
        st.copy_to(digest, dest, executable=executable)
    finally:
        os.umask(old_umask)
    assert dest.read_bytes() == COMPRESSIBLE
    assert dest.stat().st_mode & 0o7777 == mode
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tool"]


def test_copy_to_replaces_an_existing_file(st: Store, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.write_bytes(b"old content")
    st.copy_to(st.put_bytes(b"new content"), dest)
    assert dest.read_bytes() == b"new content"


def test_copy_to_a_destination_that_cannot_be_written_is_an_output_error(
    st: Store, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(OutputError) as info:
        st.copy_to(st.put_bytes(b"data"), tmp_path / "file" / "out")
    assert str(info.value).startswith(f"can't write `{tmp_path / 'file' / 'out'}`: ")


def test_put_file_of_a_missing_file_is_an_output_error(st: Store, tmp_path: Path) -> None:
    with pytest.raises(OutputError) as info:
        st.put_file(tmp_path / "nope")
    assert str(info.value) == f"can't read `{tmp_path / 'nope'}`: No such file or directory"


# --- the compression rule -----------------------------------------------------------------


def test_small_blobs_are_stored_raw(st: Store, folder: Path) -> None:
    data = COMPRESSIBLE[: store_codec.MIN_COMPRESS_SIZE - 1]
    assert header(folder, st.put_bytes(data)) == b"HZB1raw\n"


def test_compressible_blobs_are_stored_as_one_standard_zstd_frame(
    st: Store, folder: Path
) -> None:
    digest = st.put_bytes(COMPRESSIBLE)
    stored = blob_file(folder, digest).read_bytes()
    assert stored[:8] == b"HZB1zst\n"
    assert len(stored) < len(COMPRESSIBLE) * store_codec.MAX_COMPRESSED_FRACTION
    # What follows the header is what REAPI calls a zstd-compressed blob.
    assert zstandard.ZstdDecompressor().decompress(stored[8:]) == COMPRESSIBLE


def test_incompressible_blobs_are_stored_raw(st: Store, folder: Path) -> None:
    assert header(folder, st.put_bytes(os.urandom(64 * 1024))) == b"HZB1raw\n"


def test_a_durable_store_round_trips(folder: Path, tmp_path: Path) -> None:
    with Store(folder, fsync=True) as s:
        digest = s.put_bytes(COMPRESSIBLE)
        s.put_action_result(Digest.of(b"action"), digest.hash.encode())
        s.copy_to(digest, tmp_path / "out")
        assert s.get_action_result(Digest.of(b"action")) == digest.hash.encode()
    assert (tmp_path / "out").read_bytes() == COMPRESSIBLE


def test_compression_can_be_turned_off(folder: Path) -> None:
    with Store(folder, compress=False) as s:
        digest = s.put_bytes(COMPRESSIBLE)
        assert header(folder, digest) == b"HZB1raw\n"
        assert s.read_bytes(digest) == COMPRESSIBLE


def test_a_stream_is_compressed_or_not_by_its_first_chunk(
    st: Store, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "SMALL_FILE", 0)
    monkeypatch.setattr(store_codec, "CHUNK_SIZE", 32 * 1024)
    noisy_first = tmp_path / "noisy-first"
    noisy_first.write_bytes(os.urandom(32 * 1024) + COMPRESSIBLE)
    text_first = tmp_path / "text-first"
    text_first.write_bytes(COMPRESSIBLE + os.urandom(32 * 1024))
    assert header(folder, st.put_file(noisy_first)) == b"HZB1raw\n"
    assert header(folder, st.put_file(text_first)) == b"HZB1zst\n"


# --- verification and repair --------------------------------------------------------------


@pytest.mark.parametrize("data", [b"raw blob" * 10, COMPRESSIBLE], ids=["raw", "zstd"])
def test_a_corrupt_blob_is_a_miss_is_removed_and_is_repaired_by_the_next_put(
    st: Store, folder: Path, data: bytes
) -> None:
    digest = st.put_bytes(data)
    path = blob_file(folder, digest)
    flip_byte(path, len(path.read_bytes()) - 2)
    with pytest.raises(BlobCorrupt) as info:
        st.read_bytes(digest)
    assert info.value.reason is CacheErrorReason.CORRUPT
    assert str(info.value) == f"blob {digest} in the cache was corrupt and has been removed"
    assert isinstance(info.value, BlobMissing)  # a caller handling misses handles this too
    assert not path.exists()
    assert not st.contains(digest)
    assert st.put_bytes(data) == digest
    assert st.read_bytes(digest) == data
    assert (st.counters.corrupt, st.counters.cas_misses, st.counters.cas_hits) == (1, 1, 1)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "other bytes of the same size", "unknown header", "a frame of 2x"],
)
def test_every_kind_of_damage_is_detected(st: Store, folder: Path, damage: str) -> None:
    digest = st.put_bytes(COMPRESSIBLE)
    path = blob_file(folder, digest)
    stored = path.read_bytes()
    replacement = {
        "truncated": stored[:-100],
        "empty": b"",
        "other bytes of the same size": b"HZB1raw\n" + bytes(len(COMPRESSIBLE)),
        "unknown header": b"HZB9zst\n" + stored[8:],
        # A valid frame of other, longer content: its size field must not be trusted.
        "a frame of 2x": b"HZB1zst\n" + zstandard.ZstdCompressor().compress(COMPRESSIBLE * 2),
    }[damage]
    path.write_bytes(replacement)
    with pytest.raises(BlobCorrupt):
        st.read_bytes(digest)
    assert not path.exists()


def test_a_corrupt_blob_never_reaches_a_streaming_reader_whole(
    st: Store, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_codec, "CHUNK_SIZE", 4096)
    data = os.urandom(20_000)  # raw: the damage shows only once everything is hashed
    digest = st.put_bytes(data)
    flip_byte(blob_file(folder, digest), 10)
    got = bytearray()
    with pytest.raises(BlobCorrupt):
        for chunk in st.read_chunks(digest):
            got += chunk
    assert len(got) < len(data)  # the last piece was held back
    assert not blob_file(folder, digest).exists()


def test_copy_to_of_a_corrupt_blob_leaves_the_destination_untouched(
    st: Store, folder: Path, tmp_path: Path
) -> None:
    digest = st.put_bytes(COMPRESSIBLE)
    flip_byte(blob_file(folder, digest), 20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dest").write_bytes(b"previous")
    with pytest.raises(BlobCorrupt):
        st.copy_to(digest, out / "dest")
    assert (out / "dest").read_bytes() == b"previous"
    assert sorted(p.name for p in out.iterdir()) == ["dest"]  # no temp file left


def test_a_zero_length_blob_file_is_replaced_by_the_next_put(st: Store, folder: Path) -> None:
    # What a power loss can leave behind without fsync.
    digest = st.put_bytes(COMPRESSIBLE)
    blob_file(folder, digest).write_bytes(b"")
    assert not st.contains(digest)
    st.put_bytes(COMPRESSIBLE)
    assert st.read_bytes(digest) == COMPRESSIBLE


# --- action cache -------------------------------------------------------------------------


def test_an_action_result_round_trips_and_can_be_replaced(st: Store) -> None:
    action = Digest.of(b"an action")
    assert st.get_action_result(action) is None
    st.put_action_result(action, b"result 1")
    assert st.get_action_result(action) == b"result 1"
    st.put_action_result(action, b"result 2")
    assert st.get_action_result(action) == b"result 2"
    st.put_action_result(action, b"")
    assert st.get_action_result(action) == b""
    assert (st.counters.ac_hits, st.counters.ac_misses) == (3, 1)


@pytest.mark.parametrize("damage", ["flipped payload", "flipped checksum", "torn", "foreign"])
def test_a_corrupt_action_result_is_a_miss_and_is_removed(
    st: Store, folder: Path, damage: str
) -> None:
    action = Digest.of(b"an action")
    st.put_action_result(action, b"serialised ActionResult")
    path = ac_file(folder, action)
    match damage:
        case "flipped payload":
            flip_byte(path, len(path.read_bytes()) - 1)
        case "flipped checksum":
            flip_byte(path, 9)
        case "torn":
            path.write_bytes(path.read_bytes()[:20])
        case "foreign":
            path.write_bytes(b"serialised ActionResult")
    assert st.get_action_result(action) is None
    assert not path.exists()
    assert (st.counters.corrupt, st.counters.ac_misses) == (1, 1)
    st.put_action_result(action, b"serialised ActionResult")
    assert st.get_action_result(action) == b"serialised ActionResult"


# --- concurrency and crashes --------------------------------------------------------------


def _write_same_blob(
    folder: str, source: str, barrier: threading.Barrier, results: multiprocessing.Queue[str]
) -> None:
    with Store(folder) as s:
        barrier.wait()
        first = s.put_file(source)
        second = s.put_bytes(Path(source).read_bytes()[:100_000])
    results.put(f"{first} {second}")


@pytest.mark.parametrize("size", [200_000, 6_000_000], ids=["read at once", "streamed"])
def test_concurrent_writers_of_one_blob_all_succeed(
    folder: Path, tmp_path: Path, size: int
) -> None:
    data = (COMPRESSIBLE + os.urandom(10_000)) * (size // 80_000 + 1)
    source = tmp_path / "source"
    source.write_bytes(data)
    Store(folder).close()
    count = 6
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(count)  # all start writing at once
    results: multiprocessing.Queue[str] = context.Queue()
    writers = [
        context.Process(target=_write_same_blob, args=(str(folder), str(source), barrier, results))
        for _ in range(count)
    ]
    for writer in writers:
        writer.start()
    got = [results.get(timeout=GUARD_S) for _ in writers]
    for writer in writers:
        writer.join(timeout=GUARD_S)
    assert [w.exitcode for w in writers] == [0] * count
    assert got == [f"{Digest.of(data)} {Digest.of(data[:100_000])}"] * count
    with Store(folder) as s:
        assert s.read_bytes(Digest.of(data)) == data
        assert s.read_bytes(Digest.of(data[:100_000])) == data[:100_000]
    assert len(entries(folder)) == 2
    assert temps(folder) == []


def test_threads_can_share_one_store(st: Store) -> None:
    def work(i: int) -> bool:
        data = COMPRESSIBLE + b"%d" % i
        digest = st.put_bytes(data)
        st.put_action_result(Digest.of(b"%d" % i), digest.hash.encode())
        return st.read_bytes(digest) == data and st.get_action_result(
            Digest.of(b"%d" % i)) == digest.hash.encode()

    threads_results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: threads_results.append(work(i)))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert threads_results == [True] * 16
    assert st.counters.stored == 32


_KILLED_WRITER = """
import os, sys
from hitz.executor.store import Store
# A reader of the FIFO from the start, so that the test can open it for
# writing at once, and gets EPIPE rather than hanging if this process dies.
keep = os.open(sys.argv[2], os.O_RDONLY | os.O_NONBLOCK)
print("ready", flush=True)
print(Store(sys.argv[1]).put_file(sys.argv[2]), flush=True)
"""


def test_a_writer_killed_mid_write_leaves_no_entry_and_its_temp_is_swept(
    folder: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "output-being-stored"
    os.mkfifo(fifo)
    Store(folder).close()
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(folder), str(fifo)],
        cwd=REPO, stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        with open(fd, "wb") as pipe:
            # When this write returns the child has taken all but a pipe buffer
            # (64 KiB) of it: it has written its first 1 MiB chunk to a temp
            # file and is waiting for the rest of the output.
            pipe.write(os.urandom(3 * 1024 * 1024))
            assert len(temps(folder)) == 1
            assert temps(folder)[0].stat().st_size > 1024 * 1024
            with Store(folder) as other:  # a sweep must spare a live writer's temp
                assert other.gc(1 << 40).temps_swept == 0
            assert len(temps(folder)) == 1
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=GUARD_S) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(timeout=GUARD_S)
    assert entries(folder) == []
    assert len(temps(folder)) == 1
    with Store(folder) as s:  # opening a store sweeps dead writers' temps
        assert temps(folder) == []
        assert s.stats().entries == 0


def test_a_temp_file_held_by_a_writer_is_not_swept(folder: Path) -> None:
    Store(folder).close()
    fd, path = store_gc.new_temp(str(layout(folder) / "tmp"))
    try:
        stale = layout(folder) / "tmp" / "0123456789abcdef.tmp"
        stale.write_bytes(b"left by a writer that died")
        with Store(folder) as s:
            assert temps(folder) == [Path(path)]
            assert s.gc(1 << 40).temps_swept == 0
    finally:
        os.close(fd)
    with Store(folder):
        assert temps(folder) == []


def test_a_sweeper_that_wins_the_race_makes_the_writer_start_over(folder: Path) -> None:
    # The sweeper locked and unlinked the temp between the writer's open and
    # flock: the writer must notice (its file has no name left) and retry.
    tmp = str(layout(folder) / "tmp")
    Store(folder).close()
    real_flock = fcntl.flock
    raced: list[str] = []

    def flock_after_a_sweep(fd: int, op: int) -> None:
        if not raced:
            name = os.readlink(f"/proc/self/fd/{fd}")
            raced.append(name)
            assert store_gc.sweep_temps(tmp) == 1
        real_flock(fd, op)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fcntl, "flock", flock_after_a_sweep)
        fd, path = store_gc.new_temp(tmp)
    try:
        assert path != raced[0]
        assert os.fstat(fd).st_nlink == 1
        assert temps(folder) == [Path(path)]
    finally:
        os.close(fd)


# --- size limit and eviction --------------------------------------------------------------


def _age(paths: list[Path], seconds_ago: list[int]) -> None:
    now = time.time()
    for path, ago in zip(paths, seconds_ago, strict=True):
        os.utime(path, (now - ago, now - ago))


def test_gc_evicts_least_recently_used_first_and_a_hit_makes_an_entry_recent(
    st: Store, folder: Path
) -> None:
    blobs = [st.put_bytes(os.urandom(10_000)) for _ in range(4)]
    paths = [blob_file(folder, d) for d in blobs]
    _age(paths, [4000, 3000, 2000, 1000])  # oldest first
    st.read_bytes(blobs[0])  # used now: the most recent
    one = store_gc.disk_size(os.stat(paths[0]))
    result = st.gc(2 * one)
    assert (result.evicted, result.evicted_bytes) == (2, 2 * one)
    assert (result.entries, result.bytes) == (2, 2 * one)
    assert [p.exists() for p in paths] == [True, False, False, True]
    assert (st.counters.evicted, st.counters.evicted_bytes) == (2, 2 * one)


def test_a_query_also_counts_as_use(st: Store, folder: Path) -> None:
    blobs = [st.put_bytes(os.urandom(10_000)) for _ in range(3)]
    paths = [blob_file(folder, d) for d in blobs]
    _age(paths, [3000, 2000, 1000])
    assert st.missing(blobs[:1]) == []
    st.gc(store_gc.disk_size(os.stat(paths[0])))
    assert [p.exists() for p in paths] == [True, False, False]


def test_an_entry_used_after_the_scan_is_not_evicted(st: Store, folder: Path) -> None:
    blobs = [st.put_bytes(os.urandom(10_000)) for _ in range(2)]
    paths = [blob_file(folder, d) for d in blobs]
    _age(paths, [2000, 1000])
    scanned = store_gc.scan([str(layout(folder) / "cas")])
    st.read_bytes(blobs[0])  # another process's hit, between the scan and the eviction
    removed, _, _ = store_gc.evict(scanned, 0)
    assert removed == 1
    assert [p.exists() for p in paths] == [True, False]


def test_action_results_are_evicted_like_blobs(st: Store, folder: Path) -> None:
    actions = [Digest.of(b"action %d" % i) for i in range(3)]
    for action in actions:
        st.put_action_result(action, b"result")
    _age([ac_file(folder, a) for a in actions], [300, 200, 100])
    st.gc(store_gc.disk_size(os.stat(ac_file(folder, actions[0]))))
    assert [st.get_action_result(a) for a in actions] == [None, None, b"result"]


def test_growing_past_max_bytes_evicts_down_to_the_low_water_mark(folder: Path) -> None:
    with Store(folder) as probe:
        one = store_gc.disk_size(os.stat(blob_file(folder, probe.put_bytes(os.urandom(10_000)))))
        probe.gc(0)
    with Store(folder, max_bytes=10 * one, low_water=0.5) as s:
        blobs = []
        for i in range(10):
            blobs.append(s.put_bytes(os.urandom(10_000)))
            _age([blob_file(folder, b) for b in blobs], list(range(1000 * (i + 1), 0, -1000)))
        assert s.counters.evicted == 0  # exactly at the limit: nothing to do yet
        blobs.append(s.put_bytes(os.urandom(10_000)))  # one over
        assert s.counters.evicted == 6  # 11 entries down to 5
        assert [s.contains(b) for b in blobs] == [False] * 6 + [True] * 5
        assert s.stats().bytes == 5 * one


def test_a_store_opened_over_its_limit_collects_at_once(folder: Path) -> None:
    with Store(folder) as s:
        for _ in range(4):
            s.put_bytes(os.urandom(10_000))
        total = s.stats().bytes
    with Store(folder, max_bytes=total // 2) as s:
        assert s.counters.evicted >= 2
        assert s.stats().bytes <= total // 2 * 0.8


# --- stats --------------------------------------------------------------------------------


def test_stats_count_entries_bytes_and_the_last_runs_counters(folder: Path) -> None:
    with Store(folder) as s:
        blob = s.put_bytes(COMPRESSIBLE)
        s.put_action_result(Digest.of(b"action"), blob.hash.encode())
        s.get_action_result(Digest.of(b"action"))
        s.get_action_result(Digest.of(b"other action"))
        s.read_bytes(blob)
    disk = sum(store_gc.disk_size(os.stat(p)) for p in entries(folder) + entries(folder, "ac"))
    with Store(folder) as s:
        stats = s.stats()
        assert (stats.entries, stats.bytes) == (2, disk)
        assert (stats.last_run.ac_hits, stats.last_run.ac_misses) == (1, 1)
        assert (stats.last_run.cas_hits, stats.last_run.stored) == (1, 2)
    # A run that did nothing does not replace the last run's counters.
    with Store(folder) as s:
        assert s.stats().last_run.ac_hits == 1
    document = json.loads((layout(folder) / "state.json").read_text())
    assert document["version"] == 1 and document["entries"] == 2


def test_a_damaged_state_file_is_rebuilt_by_a_recount(folder: Path) -> None:
    with Store(folder) as s:
        s.put_bytes(COMPRESSIBLE)
    (layout(folder) / "state.json").write_text("{not json")
    with Store(folder) as s:
        assert s.stats().entries == 1


# --- the cache folder itself --------------------------------------------------------------


def test_a_file_where_the_cache_folder_should_be_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(CacheUnavailable) as info:
        Store(tmp_path / "cache")
    assert info.value.reason is CacheErrorReason.NOT_A_FOLDER
    assert str(info.value) == f"cache folder `{tmp_path / 'cache'}` is not a folder"


def test_os_errors_become_cache_unavailable_with_a_reason(
    st: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = [(errno.ENOSPC, CacheErrorReason.DISK_FULL, "is full: No space left on device"),
             (errno.EDQUOT, CacheErrorReason.DISK_FULL, "is full: Disk quota exceeded"),
             (errno.EROFS, CacheErrorReason.UNWRITABLE, "is not writable: Read-only file system"),
             (errno.EIO, CacheErrorReason.IO_ERROR, "can't be used: Input/output error")]
    for number, reason, text in cases:
        def fail(*args: object, number: int = number) -> tuple[int, str]:
            raise OSError(number, os.strerror(number), "somewhere")

        monkeypatch.setattr(store_gc, "new_temp", fail)
        with pytest.raises(CacheUnavailable) as info:
            st.put_bytes(b"data %d" % number)
        assert info.value.reason is reason
        assert str(info.value) == f"cache folder `{st.folder}` {text}"
        assert isinstance(info.value.__cause__, OSError)
        assert isinstance(info.value, HitzError)
