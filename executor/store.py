"""The local store: blobs by digest (CAS) and action results by action digest (AC).

A ``Store`` is a folder on local disk that several hitz processes may share at
once. It stores bytes; the caller serialises REAPI messages. Its promises
(docs/cache.md has the layout and the measurements behind the choices):

- **Every read is verified.** A blob is hashed as it is read and must match
  its digest (hash and size); an AC entry carries a SHA-256 of its payload.
  An entry that fails is removed and reads as a miss, so the next store of
  the same bytes repairs it. Corrupt data never reaches the caller.
- **Writes are atomic.** An entry is written to a locked temp file in
  ``tmp/`` and renamed into place; readers see the whole entry or none. Two
  processes storing the same blob both succeed. A writer killed at any
  moment (``kill -9`` included) leaves at most a temp file, which the next
  ``Store`` on the folder sweeps once no process holds its lock.
- **Misses.** ``get_action_result`` returns None on a miss (the normal path of
  a cache lookup). CAS reads raise ``BlobMissing``, and ``BlobCorrupt`` (a
  ``BlobMissing``) when the blob failed verification and was removed: a blob
  missing after an AC hit is not the normal path, and the caller must fall
  back to running the task.
- **Size.** With ``max_bytes``, a store that grows past it evicts least
  recently used entries down to ``low_water * max_bytes``; ``gc`` does it on
  demand. Use (a hit, or a query by ``contains``/``missing``) moves an entry's
  mtime forward, at most once per ``TOUCH_AFTER_NS``.
- **Errors.** Any failure of the cache folder itself (unwritable, read-only,
  full, I/O error) raises ``CacheUnavailable``, which the caller may turn into
  an uncached run with one warning. Failures on the caller's own files (the
  file to store, the destination to materialise) raise ``OutputError``.
  ``OSError`` becomes a hitz error only through ``store_errors.cache_io`` and
  ``output_io``, zstd errors only in ``store_codec`` (as corruption).

Entry files and the compression rule are ``hitz.executor.store_codec``'s;
recounting, eviction and temp sweeping are ``hitz.executor.store_gc``'s; the
error classes and the ``OSError`` border are ``hitz.executor.store_errors``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields
from io import FileIO
from pathlib import Path
from types import TracebackType
from typing import Self

from hitz.executor import store_codec, store_gc
from hitz.executor.store_errors import (
    BlobCorrupt,
    BlobMissing,
    CacheError,
    CacheErrorReason,
    CacheUnavailable,
    cache_io,
    output_io,
)

__all__ = [
    "EMPTY_DIGEST",
    "BlobCorrupt",
    "BlobMissing",
    "BlobWriter",
    "CacheError",
    "CacheErrorReason",
    "CacheUnavailable",
    "Counters",
    "Digest",
    "GcResult",
    "Store",
    "StoreStats",
    "default_folder",
]

log = logging.getLogger(__name__)

LAYOUT = "store-v1"  # the folder, inside the caller's cache folder, of this format
SMALL_FILE = 4 << 20  # put_file reads a regular file up to this size at once
TOUCH_AFTER_NS = 60 * 10**9  # a hit refreshes an entry's mtime if older than this
DEFAULT_LOW_WATER = 0.8
_HEX64 = re.compile(r"[0-9a-f]{64}")


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Digest:
    """A blob's identity as REAPI defines it: lowercase hex SHA-256 and size in bytes."""

    hash: str
    size: int

    def __post_init__(self) -> None:
        if not (isinstance(self.hash, str) and _HEX64.fullmatch(self.hash)):
            raise ValueError(f"not a lowercase hex SHA-256: {self.hash!r}")
        if not (isinstance(self.size, int) and self.size >= 0):
            raise ValueError(f"not a blob size: {self.size!r}")

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


EMPTY_DIGEST = Digest.of(b"")


def default_folder() -> Path:
    """The cache folder when a manifest names none: $HITZ_CACHE_DIR, else
    $XDG_CACHE_HOME/hitz, else ~/.cache/hitz (`hitz run` and `hitz cache serve`)."""
    if os.environ.get("HITZ_CACHE_DIR"):
        return Path(os.environ["HITZ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hitz"


@dataclass(frozen=True, slots=True)
class Counters:
    """What one ``Store`` did, from its opening to now."""

    ac_hits: int = 0
    ac_misses: int = 0  # includes corrupt entries, which were removed
    cas_hits: int = 0
    cas_misses: int = 0  # includes corrupt blobs, which were removed
    corrupt: int = 0  # entries (AC or CAS) that failed verification
    stored: int = 0  # entries written (AC entries and new blobs)
    stored_bytes: int = 0  # the disk they use (allocated blocks)
    already_present: int = 0  # blobs not written because the store had them
    evicted: int = 0
    evicted_bytes: int = 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int  # estimate between recounts, see store_gc.State
    bytes: int  # disk used (allocated blocks), same estimate
    last_run: Counters  # the counters of the last Store closed on this folder


@dataclass(frozen=True, slots=True)
class GcResult:
    evicted: int  # entries removed
    evicted_bytes: int
    entries: int  # what is left, recounted
    bytes: int
    temps_swept: int  # temp files of dead writers removed


# --- the store ------------------------------------------------------------------------


class Store:
    """A local CAS + action cache in ``<folder>/store-v1``; see the module docstring."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        low_water: float = DEFAULT_LOW_WATER,
        compress: bool = True,
        fsync: bool = False,
    ) -> None:
        """Open (creating if needed) the store in ``folder``.

        ``max_bytes`` bounds the disk used (None: unbounded); when exceeded,
        entries are evicted down to ``low_water * max_bytes``. ``compress=False``
        stores every blob raw (for a filesystem that compresses by itself).
        ``fsync=True`` makes each entry durable before it becomes visible;
        without it a power loss may leave torn entries, which verification
        turns into misses (docs/cache.md measures the cost).

        Sweeps temp files of dead writers and checks that the folder is
        writable. Raises ``CacheUnavailable`` when it is not.
        """
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if not 0 < low_water <= 1:
            raise ValueError(f"low_water must be in (0, 1], got {low_water}")
        self.folder = Path(folder)
        self.root = os.path.join(os.path.abspath(folder), LAYOUT)
        self.max_bytes = max_bytes
        self.low_water = low_water
        self.compress = compress
        self.fsync = fsync
        self._cas = os.path.join(self.root, "cas")
        self._ac = os.path.join(self.root, "ac")
        self._tmp = os.path.join(self.root, "tmp")
        self._state_path = os.path.join(self.root, "state.json")
        self._lock = threading.Lock()  # guards the counters and the size estimate
        self._counts = dict.fromkeys((f.name for f in fields(Counters)), 0)
        self._base = store_gc.State()
        self._delta_bytes = self._delta_entries = 0
        self._closed = False
        with self._cache_io():
            self._create_layout()
            store_gc.sweep_temps(self._tmp)
            fd, probe = store_gc.new_temp(self._tmp)  # fails now if nothing can be stored
            os.unlink(probe)
            os.close(fd)
            with store_gc.flocked(self._lock_path("state")):
                state = store_gc.load_state(self._state_path)
                if state is None:
                    state = self._recount_locked()
            self._base = state
        self._collect_if_over()

    def _create_layout(self) -> None:
        try:
            for path in (self._cas, self._ac, self._tmp):
                os.makedirs(path, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise CacheUnavailable(
                f"cache folder `{self.folder}` is not a folder",
                detail=f"{exc.filename}: {exc.strerror}",
                hint="remove the file there, or choose another cache folder",
                reason=CacheErrorReason.NOT_A_FOLDER,
            ) from exc

    # --- CAS: queries -----------------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        """True if the store holds a blob under ``digest`` (not verified: reads verify)."""
        if digest.size == 0:
            return True
        with self._cache_io():
            return self._present(self._blob_path(digest))

    def missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests of ``digests`` the store does not hold, in order, without repeats."""
        seen: set[Digest] = set()
        absent: list[Digest] = []
        with self._cache_io():
            for digest in digests:
                if digest in seen:
                    continue
                seen.add(digest)
                if digest.size and not self._present(self._blob_path(digest)):
                    absent.append(digest)
        return absent

    # --- CAS: writes ------------------------------------------------------------------

    def put_bytes(self, data: bytes) -> Digest:
        """Store ``data``; return its digest. A blob already present is not rewritten.

        Raises ``CacheUnavailable``.
        """
        digest = Digest.of(data)
        if digest.size == 0:
            return digest
        path = self._blob_path(digest)
        with self._cache_io():
            if self._present(path):
                self._count(already_present=1)
                return digest
            self._write_entry(path, store_codec.encode_blob(data, self.compress))
        return digest

    def put_file(self, path: str | os.PathLike[str]) -> Digest:
        """Store the content of the file at ``path``; return its digest.

        A regular file up to ``SMALL_FILE`` bytes is read at once and, if the
        store has it already, not written. A bigger one (or a pipe) is read,
        hashed, compressed and written in one streaming pass of
        ``store_codec.CHUNK_SIZE`` pieces, then dropped if the store turns out
        to have it.

        Raises ``OutputError`` if ``path`` cannot be read, ``CacheUnavailable``
        if the store cannot be written.
        """
        with output_io(path, "read"):
            source = open(path, "rb", buffering=0)  # noqa: SIM115 -- closed below
        with source:
            with output_io(path, "read"):
                st = os.fstat(source.fileno())
                small = _is_regular(st.st_mode) and st.st_size <= SMALL_FILE
                data = source.readall() if small else b""
            if small:
                return self.put_bytes(data)
            return self._put_stream(source, path)

    def _put_stream(self, source: FileIO, path: str | os.PathLike[str]) -> Digest:
        buffer = bytearray(store_codec.CHUNK_SIZE)
        view = memoryview(buffer)
        sha = hashlib.sha256()
        with self._cache_io():
            fd, temp = store_gc.new_temp(self._tmp)
            try:
                with output_io(path, "read"):
                    n = _read_full(source, buffer)
                sha.update(view[:n])
                size = n
                encoder = store_codec.StreamEncoder(view[:n], self.compress)
                _write_all(fd, encoder.header)
                _write_all(fd, encoder.first)
                while n:
                    with output_io(path, "read"):
                        n = _read_full(source, buffer)
                    sha.update(view[:n])
                    size += n
                    _write_all(fd, encoder.encode(view[:n]))
                _write_all(fd, encoder.finish())
                digest = Digest(sha.hexdigest(), size)
                final = self._blob_path(digest)
                if digest.size == 0 or self._present(final):
                    os.unlink(temp)
                    self._count(already_present=1 if digest.size else 0)
                    return digest
                self._commit(fd, temp, final)
            except BaseException:
                _discard(temp)
                raise
            finally:
                os.close(fd)
        return digest

    def blob_writer(self) -> BlobWriter:
        """A ``BlobWriter``: a blob that arrives in pieces, stored in one pass.

        Raises ``CacheUnavailable`` if no temp file can be made.
        """
        return BlobWriter(self)

    # --- CAS: reads -------------------------------------------------------------------

    def read_bytes(self, digest: Digest) -> bytes:
        """The blob under ``digest``, verified.

        Raises ``BlobMissing`` if absent, ``BlobCorrupt`` if it failed
        verification (it is then removed), ``CacheUnavailable`` on I/O errors.
        """
        if digest.size == 0:
            self._count(cas_hits=1)
            return b""
        path = self._blob_path(digest)
        with self._cache_io():
            found = _read_entry(path)
            if found is None:
                raise self._blob_missing(digest)
            raw, st = found
            try:
                data = store_codec.decode_blob(raw, digest.hash, digest.size)
            except store_codec.Corrupt:
                raise self._blob_corrupt(path, st, digest) from None
            self._touch(path, st)
        self._count(cas_hits=1)
        return data

    def read_chunks(self, digest: Digest) -> Iterator[bytes]:
        """The blob under ``digest``, verified, in pieces of ``store_codec.CHUNK_SIZE``.

        Checks presence now (raising ``BlobMissing``); the pieces come as they
        are read. The last piece is held back until the whole blob has been
        verified: a consumer that did not see the iteration end normally must
        discard what it got, and never sees a complete corrupt blob. Raises
        ``BlobCorrupt`` from the iteration if verification fails.
        """
        if digest.size == 0:
            self._count(cas_hits=1)
            return iter(())
        f, st = self._open_blob(digest)
        return self._chunks_closing(f, st, digest)

    def _chunks_closing(self, f: FileIO, st: os.stat_result, digest: Digest) -> Iterator[bytes]:
        with f, self._cache_io():
            yield from self._verified_chunks(f, st, digest)

    def copy_to(
        self, digest: Digest, dest: str | os.PathLike[str], *, executable: bool = False
    ) -> None:
        """Materialise the blob under ``digest`` as the file ``dest``, verified.

        Writes a temp file in ``dest``'s folder (created if missing) and
        renames it over ``dest`` only once the blob has been verified, so
        ``dest`` is either untouched or complete. Mode 0755 if ``executable``,
        else 0644, whatever the umask.

        Raises ``BlobMissing``/``BlobCorrupt`` (``dest`` untouched),
        ``OutputError`` if ``dest`` cannot be written, ``CacheUnavailable``.
        """
        mode = 0o755 if executable else 0o644
        if digest.size == 0:
            self._count(cas_hits=1)
            self._write_dest(dest, mode, iter(()))
            return
        f, st = self._open_blob(digest)
        with f, self._cache_io():
            self._write_dest(dest, mode, self._verified_chunks(f, st, digest))

    def _write_dest(self, dest: str | os.PathLike[str], mode: int, chunks: Iterator[bytes]) -> None:
        dest = os.fspath(dest)
        folder, name = os.path.split(os.path.abspath(dest))
        temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.hitz-tmp")
        with output_io(dest, "write"):
            os.makedirs(folder, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for chunk in chunks:
                with output_io(dest, "write"):
                    _write_all(fd, chunk)
            with output_io(dest, "write"):
                os.fchmod(fd, mode)
                os.rename(temp, dest)
        except BaseException:
            _discard(temp)
            raise
        finally:
            os.close(fd)

    # --- action cache -----------------------------------------------------------------

    def put_action_result(self, action_digest: Digest, data: bytes) -> None:
        """Record ``data`` (a serialised ActionResult) for ``action_digest``.

        Replaces an earlier entry atomically. Raises ``CacheUnavailable``.
        """
        with self._cache_io():
            self._write_entry(self._ac_path(action_digest), store_codec.encode_ac(data))

    def get_action_result(self, action_digest: Digest) -> bytes | None:
        """The data recorded for ``action_digest``, verified; None on a miss.

        A corrupt entry is removed and reads as a miss. Raises ``CacheUnavailable``.
        """
        path = self._ac_path(action_digest)
        with self._cache_io():
            found = _read_entry(path)
            if found is None:
                self._count(ac_misses=1)
                return None
            raw, st = found
            try:
                payload = store_codec.decode_ac(raw)
            except store_codec.Corrupt:
                self._remove_corrupt(path, st, f"action {action_digest}")
                self._count(ac_misses=1)
                return None
            self._touch(path, st)
        self._count(ac_hits=1)
        return payload

    # --- size -------------------------------------------------------------------------

    def gc(self, target_bytes: int) -> GcResult:
        """Evict least recently used entries until the store holds at most ``target_bytes``.

        Also sweeps dead writers' temp files and recounts the store. Waits for
        a collection another process is running. Raises ``CacheUnavailable``.
        """
        with self._cache_io(), store_gc.flocked(self._lock_path("gc")):
            return self._collect(target_bytes)

    def _collect(self, target_bytes: int) -> GcResult:
        swept = store_gc.sweep_temps(self._tmp)
        with store_gc.flocked(self._lock_path("state")):
            entries = store_gc.scan((self._cas, self._ac))
            evicted, evicted_bytes, left = store_gc.evict(entries, max(0, target_bytes))
            state = store_gc.load_state(self._state_path) or store_gc.State()
            state.bytes, state.entries = left, len(entries) - evicted
            store_gc.save_state(self._state_path, state, self._tmp)
        with self._lock:
            self._base = state
            self._delta_bytes = self._delta_entries = 0
            self._counts["evicted"] += evicted
            self._counts["evicted_bytes"] += evicted_bytes
        if evicted:
            log.info("cache: evicted %d entries (%d bytes)", evicted, evicted_bytes)
        return GcResult(evicted, evicted_bytes, state.entries, state.bytes, swept)

    def _collect_if_over(self) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            over = self._base.bytes + self._delta_bytes > self.max_bytes
        if not over:
            return
        with self._cache_io(), store_gc.flocked(self._lock_path("gc"), blocking=False) as mine:
            if mine:  # else another process is collecting right now
                self._collect(int(self.max_bytes * self.low_water))

    def _recount_locked(self) -> store_gc.State:
        entries = store_gc.scan((self._cas, self._ac))
        state = store_gc.load_state(self._state_path) or store_gc.State()
        state.bytes, state.entries = sum(e.size for e in entries), len(entries)
        store_gc.save_state(self._state_path, state, self._tmp)
        return state

    # --- stats and closing ------------------------------------------------------------

    @property
    def counters(self) -> Counters:
        """What this store did since it was opened."""
        with self._lock:
            return Counters(**self._counts)

    def stats(self) -> StoreStats:
        """Entries and bytes (estimated, see ``store_gc.State``) and the last run's counters."""
        with self._cache_io():
            state = store_gc.load_state(self._state_path) or self._base
        with self._lock:
            return StoreStats(
                entries=state.entries + self._delta_entries,
                bytes=state.bytes + self._delta_bytes,
                last_run=_counters_from(state.last_run),
            )

    def close(self, *, record_run: bool = True) -> None:
        """Add this run's growth to ``state.json`` and, if it did anything and
        ``record_run``, its counters as the "last run" of ``stats()`` (a
        `hitz explain` or `hitz cache gc` is not a run of the tasks).

        Idempotent. Never raises: the state is advice (it decides when to
        collect), and a cache that can no longer be written has said so already.
        """
        if self._closed:
            return
        self._closed = True
        counters = self.counters
        with self._lock:
            delta_bytes, delta_entries = self._delta_bytes, self._delta_entries
        if not (delta_bytes or delta_entries or any(asdict(counters).values())):
            return
        try:
            with self._cache_io(), store_gc.flocked(self._lock_path("state")):
                state = store_gc.load_state(self._state_path) or self._recount_locked()
                state.bytes += delta_bytes
                state.entries += delta_entries
                if record_run and any(asdict(counters).values()):
                    state.last_run = asdict(counters)
                store_gc.save_state(self._state_path, state, self._tmp)
        except CacheUnavailable as exc:
            log.debug("cache: can't save %s: %s", self._state_path, exc)
            return
        with self._lock:
            self._base = state
            self._delta_bytes = self._delta_entries = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals: paths, presence, recency ------------------------------------------

    def _blob_path(self, digest: Digest) -> str:
        return os.path.join(self._cas, digest.hash[:2], f"{digest.hash}-{digest.size}")

    def _ac_path(self, digest: Digest) -> str:
        return os.path.join(self._ac, digest.hash[:2], f"{digest.hash}-{digest.size}")

    def _lock_path(self, name: str) -> str:
        return os.path.join(self.root, f"{name}.lock")

    def _present(self, path: str) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if st.st_size < store_codec.HEADER_LEN:  # torn by a power loss: let the next put replace it
            return False
        self._touch(path, st)
        return True

    def _touch(self, path: str, st: os.stat_result) -> None:
        """Mark the entry as used now, for LRU eviction, unless it was recently."""
        now = time.time_ns()
        if now - st.st_mtime_ns < TOUCH_AFTER_NS:
            return
        try:
            os.utime(path, ns=(st.st_atime_ns, now))
        except OSError as exc:  # best effort: a read-only store still serves hits
            log.debug("cache: can't refresh %s: %s", path, exc)

    # --- internals: reading -----------------------------------------------------------

    def _verified_chunks(self, f: FileIO, st: os.stat_result, digest: Digest) -> Iterator[bytes]:
        """``store_codec.verified_chunks`` of the open blob ``f``, counting and repairing."""
        try:
            yield from store_codec.verified_chunks(f, digest.hash, digest.size)
        except store_codec.Corrupt:
            raise self._blob_corrupt(self._blob_path(digest), st, digest) from None
        self._touch(self._blob_path(digest), st)
        self._count(cas_hits=1)

    # --- internals: files -------------------------------------------------------------

    def _open_blob(self, digest: Digest) -> tuple[FileIO, os.stat_result]:
        with self._cache_io():
            try:
                f = open(self._blob_path(digest), "rb", buffering=0)  # noqa: SIM115
            except FileNotFoundError:
                raise self._blob_missing(digest) from None
            try:
                return f, os.fstat(f.fileno())
            except BaseException:
                f.close()
                raise

    def _write_entry(self, final: str, parts: Iterable[bytes]) -> None:
        """Write ``parts`` as the entry ``final``: temp file, (fsync,) rename."""
        fd, temp = store_gc.new_temp(self._tmp)
        try:
            for part in parts:
                _write_all(fd, part)
            self._commit(fd, temp, final)
        except BaseException:
            _discard(temp)
            raise
        finally:
            os.close(fd)

    def _commit(self, fd: int, temp: str, final: str) -> None:
        """Rename the written temp file (open as ``fd``) to ``final``, and count it."""
        size = store_gc.disk_size(os.fstat(fd))
        if self.fsync:
            os.fsync(fd)
        try:
            os.rename(temp, final)
        except FileNotFoundError:  # first entry of its shard
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(temp, final)
        if self.fsync:
            _fsync_folder(os.path.dirname(final))
        self._count(stored=1, stored_bytes=size)
        with self._lock:
            self._delta_bytes += size
            self._delta_entries += 1
        self._collect_if_over()

    def _blob_missing(self, digest: Digest) -> BlobMissing:
        self._count(cas_misses=1)
        return BlobMissing(
            f"blob {digest} is not in the cache", reason=CacheErrorReason.MISSING
        )

    def _blob_corrupt(self, path: str, st: os.stat_result, digest: Digest) -> BlobCorrupt:
        self._remove_corrupt(path, st, f"blob {digest}")
        self._count(cas_misses=1)
        return BlobCorrupt(
            f"blob {digest} in the cache was corrupt and has been removed",
            reason=CacheErrorReason.CORRUPT,
        )

    def _remove_corrupt(self, path: str, st: os.stat_result, what: str) -> None:
        """Remove the corrupt entry at ``path`` unless it was replaced since it was read."""
        log.warning("cache: %s failed verification; removed", what)
        self._count(corrupt=1)
        try:
            current = os.stat(path)
            if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
                with self._lock:
                    self._delta_bytes -= store_gc.disk_size(st)
                    self._delta_entries -= 1
        except FileNotFoundError:
            pass

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value

    def _cache_io(self) -> AbstractContextManager[None]:
        return cache_io(self.folder)


class BlobWriter:
    """A blob that arrives in pieces (a ByteStream upload), written into the store as it comes.

    ``write`` hashes each piece and appends it, encoded as ``put_file`` would
    (raw or zstd, chosen from the first ``store_codec.CHUNK_SIZE`` bytes), to a
    locked temp file in the store's ``tmp/``; ``commit`` renames it into place
    under the digest of what was written. So an upload is hashed and written
    once, not received into a file and then stored by ``put_file``. A writer
    neither committed nor discarded keeps its temp file (and its lock) until
    the process ends; the next ``Store`` on the folder then sweeps it.

    One thread at a time. Every method raises ``CacheUnavailable`` on I/O errors.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        with store._cache_io():
            self._fd, self._temp = store_gc.new_temp(store._tmp)
        self._sha = hashlib.sha256()
        self.size = 0  # blob bytes written so far
        self._head: bytearray | None = bytearray()  # first bytes, until the encoding is chosen
        self._encoder: store_codec.StreamEncoder | None = None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``, the next bytes of the blob."""
        self._sha.update(data)
        self.size += len(data)
        if self._head is not None:
            self._head += data
            if len(self._head) >= store_codec.CHUNK_SIZE:
                self._start()
            return
        assert self._encoder is not None
        with self._store._cache_io():
            _write_all(self._fd, self._encoder.encode(memoryview(data)))

    def digest(self) -> Digest:
        """The digest of the bytes written so far."""
        return Digest(self._sha.hexdigest(), self.size)

    def commit(self) -> Digest:
        """Store what was written as the blob it is; return its digest. The temp
        file is gone afterwards (renamed into place, or dropped if the store had
        the blob already)."""
        if self._head is not None:
            self._start()
        assert self._encoder is not None
        digest = self.digest()
        store = self._store
        with store._cache_io():
            try:
                _write_all(self._fd, self._encoder.finish())
                final = store._blob_path(digest)
                if digest.size == 0 or store._present(final):
                    store._count(already_present=1 if digest.size else 0)
                    _discard(self._temp)
                else:
                    store._commit(self._fd, self._temp, final)
            except BaseException:
                _discard(self._temp)
                raise
            finally:
                self._close()
        return digest

    def discard(self) -> None:
        """Drop what was written (idempotent)."""
        if self._fd >= 0:
            with self._store._cache_io():
                _discard(self._temp)
                self._close()

    def _start(self) -> None:
        head = memoryview(self._head or b"")
        self._encoder = store_codec.StreamEncoder(head, self._store.compress)
        self._head = None
        with self._store._cache_io():
            _write_all(self._fd, self._encoder.header)
            _write_all(self._fd, self._encoder.first)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- helpers --------------------------------------------------------------------------


def _counters_from(values: dict[str, int]) -> Counters:
    known = {f.name for f in fields(Counters)}
    return Counters(**{k: v for k, v in values.items() if k in known})


def _is_regular(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


def _read_full(source: FileIO, buffer: bytearray) -> int:
    """Fill ``buffer`` from ``source`` (short only at the end); return the count."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        n = source.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def _read_entry(path: str) -> tuple[bytes, os.stat_result] | None:
    """The whole content of the entry file ``path`` and its stat; None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        # Entries are never written in place (only renamed into place whole),
        # so st_size is the length; a short read just means reading on.
        parts = [os.read(fd, st.st_size)]
        got = len(parts[0])
        while got < st.st_size and parts[-1]:
            parts.append(os.read(fd, st.st_size - got))
            got += len(parts[-1])
        return b"".join(parts) if len(parts) > 1 else parts[0], st
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _discard(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_folder(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
