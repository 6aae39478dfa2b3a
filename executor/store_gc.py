"""Housekeeping of the local store: recount, evict, sweep temps, remember totals.

``hitz.executor.store`` owns the entries; this module keeps their folder in
shape. It works on plain paths and lets ``OSError`` propagate: the store's
public methods are the one border where it becomes a ``CacheUnavailable``.

- ``scan`` lists every entry (CAS blob or AC entry) with its size and its
  recency, the file's mtime, which the store moves forward on use (atime is
  useless here: relatime updates it at most once a day, noatime never).
- ``evict`` removes least recently used entries until a target is met.
- ``sweep_temps`` removes temp files whose writer is gone. A writer holds an
  ``flock`` on its temp file from creation to rename; the kernel drops it
  when the writer exits, however it exits (``kill -9`` included), so a temp
  file that can be locked has no writer left.
- ``State`` is the small ``state.json``: the total size and entry count as of
  the last recount plus what closed runs added since, and the last run's
  counters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeGuard

__all__ = [
    "ENTRY_NAME",
    "Entry",
    "State",
    "disk_size",
    "evict",
    "flocked",
    "load_state",
    "new_temp",
    "save_state",
    "scan",
    "sweep_temps",
]

# An entry's file name: "<sha256 hex>-<size in bytes>" (see docs/cache.md).
ENTRY_NAME = re.compile(r"[0-9a-f]{64}-[0-9]+")
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")
TEMP_SUFFIX = ".tmp"
_STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    size: int  # disk used, see disk_size
    mtime_ns: int  # last use: written, or read/queried (see Store._touch)


def scan(folders: Iterable[str]) -> list[Entry]:
    """Every entry under ``folders`` (each a CAS or AC folder of 2-hex shards).

    Files that do not look like entries are left out (and never evicted);
    an entry removed while the scan runs is simply not listed.
    """
    entries: list[Entry] = []
    for folder in folders:
        for shard in _subfolders(folder):
            with os.scandir(shard) as files:
                for item in files:
                    if not ENTRY_NAME.fullmatch(item.name):
                        continue
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries.append(Entry(item.path, disk_size(st), st.st_mtime_ns))
    return entries


def disk_size(st: os.stat_result) -> int:
    """The disk a file uses: its allocated blocks, not its length.

    Entries are small and many (an AC entry of 200 bytes takes a 4 KiB
    block), so the size limit counts what they really cost.
    """
    return st.st_blocks * 512  # st_blocks is in 512-byte units whatever the block size


def _subfolders(folder: str) -> Iterator[str]:
    try:
        with os.scandir(folder) as shards:
            found = [s.path for s in shards if _SHARD_NAME.fullmatch(s.name) and s.is_dir()]
    except FileNotFoundError:
        return
    yield from found


def evict(entries: list[Entry], target_bytes: int) -> tuple[int, int, int]:
    """Remove least recently used ``entries`` until they total at most ``target_bytes``.

    Returns (entries removed, bytes removed, bytes left). An entry whose mtime
    moved since the scan was used meanwhile by some process and is kept; one
    already gone counts as removed by someone else (not in the first two
    numbers). Ties in recency go by path, so the order is reproducible.
    """
    total = sum(e.size for e in entries)
    removed = removed_bytes = 0
    for entry in sorted(entries, key=lambda e: (e.mtime_ns, e.path)):
        if total <= target_bytes:
            break
        try:
            if os.stat(entry.path, follow_symlinks=False).st_mtime_ns != entry.mtime_ns:
                continue
            # Between this stat and the unlink another process may touch or
            # rewrite the entry; removing it then costs that process a miss,
            # never a wrong result (reads verify, and open files stay readable).
            os.unlink(entry.path)
        except FileNotFoundError:
            total -= entry.size
            continue
        total -= entry.size
        removed += 1
        removed_bytes += entry.size
    return removed, removed_bytes, total


def new_temp(folder: str, mode: int = 0o644) -> tuple[int, str]:
    """Create and lock a fresh temp file in ``folder``; return (fd, path).

    The lock is held until the fd is closed (or the process dies), which tells
    ``sweep_temps`` that the file is in use.
    """
    while True:
        path = os.path.join(folder, secrets.token_hex(8) + TEMP_SUFFIX)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A sweeper may have locked and unlinked the file between our open
            # and our flock (it could not tell a writer that has not locked yet
            # from a dead one); then the name is gone and we start over.
            if os.fstat(fd).st_nlink > 0:
                return fd, path
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def sweep_temps(folder: str) -> int:
    """Remove the temp files in ``folder`` that no live writer holds; return how many."""
    swept = 0
    try:
        with os.scandir(folder) as items:
            names = [i.path for i in items if i.name.endswith(TEMP_SUFFIX)]
    except FileNotFoundError:
        return 0
    for path in names:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            # Locked: its writer is gone, or finished and renamed the file
            # between our open and flock (then the name no longer points to it).
            held = os.fstat(fd)
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(path)
                swept += 1
        finally:
            os.close(fd)
    return swept


@contextlib.contextmanager
def flocked(path: str, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    Yields True when the lock is held; with ``blocking=False`` yields False at
    once if another process holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


@dataclass
class State:
    """What ``state.json`` holds.

    ``bytes`` and ``entries`` are the store's size as of the last recount
    (every ``gc`` recounts) plus what each run added after it, counted when
    that run closed its store. A run killed before closing adds nothing; two
    runs storing the same new blob both count it. The totals may therefore
    drift until the next recount; they decide when to collect, never what
    a read returns.
    """

    bytes: int = 0
    entries: int = 0
    last_run: dict[str, int] = field(default_factory=dict)


def load_state(path: str) -> State | None:
    """The state at ``path``; None if it is missing or not a state this code wrote."""
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:  # bad JSON or bad UTF-8: a torn or foreign file
        return None
    if not isinstance(document, dict) or document.get("version") != _STATE_VERSION:
        return None
    total, entries, last_run = (
        document.get("bytes"), document.get("entries"), document.get("last_run", {}))
    if not (_count(total) and _count(entries) and isinstance(last_run, dict)):
        return None
    return State(total, entries, {k: v for k, v in last_run.items() if _count(v)})


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def save_state(path: str, state: State, temp_folder: str) -> None:
    """Replace the state at ``path`` atomically (temp file in ``temp_folder``, rename)."""
    document = {
        "version": _STATE_VERSION,
        "bytes": max(0, state.bytes),
        "entries": max(0, state.entries),
        "last_run": state.last_run,
    }
    fd, temp = new_temp(temp_folder)
    try:
        with os.fdopen(fd, "w", closefd=False) as f:
            json.dump(document, f, sort_keys=True)
            f.write("\n")
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)
