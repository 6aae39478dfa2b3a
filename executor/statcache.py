"""File digests reused while a file's metadata is unchanged.

A no-op run must not read every input again: a file whose size, mtime,
inode and ctime are what they were when it was hashed keeps its digest (the
same test git's index and ninja's log rely on). A file modified within the
filesystem's timestamp granularity of being hashed could keep its old
metadata, so entries younger than ``RACY_S`` are hashed but not recorded
(git's "racily clean" rule).

Kept in ``.hitz/stat-cache.json``: plain JSON, since ``.hitz/`` belongs to a
project that may not be trusted; anything unreadable is an empty cache, and
an entry that is not ``[size, mtime_ns, ino, ctime_ns, sha256 hex]`` is
ignored (the file is hashed again).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from hitz.executor.store import Digest

# How long after a file's last change its stat signature can be trusted to
# reveal the next change: the coarsest timestamp granularity of a common
# filesystem (FAT: 2 s) bounds it. Also the up-to-date record's rule.
RACY_S = 2.0
RACY_NS = int(RACY_S * 1e9)
_CHUNK = 1 << 20


def is_sha256_hex(text: object) -> TypeGuard[str]:
    """Whether ``text`` is a SHA-256 in lowercase hex (what a JSON file says is one)."""
    return type(text) is str and len(text) == 64 and not text.strip("0123456789abcdef")


def hash_file(path: str) -> Digest:
    """SHA-256 and size of the file at ``path`` (following symlinks), streamed."""
    from hitz.executor.store import Digest

    return Digest(*_sha256_of(path))


def _sha256_of(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


class StatCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, list[int | str]] = {}
        self._dirty = False
        try:
            data = json.loads(path.read_bytes())
            if isinstance(data, dict) and data.get("version") == 1:
                files = data["files"]
                if isinstance(files, dict):
                    self._entries = files
        except (OSError, ValueError, KeyError, TypeError):
            self._entries = {}

    def lookup(self, path: str) -> tuple[str, int, bool]:
        """``(sha256 hex, size, executable)`` of the file at ``path``: from the
        cache while its metadata is unchanged, else hashed now.

        The fast path of ``digest``, building no ``Digest``. Raises OSError
        if the file cannot be read.
        """
        st = os.stat(path)
        executable = bool(st.st_mode & 0o111)
        entry = self._entries.get(path)
        if type(entry) is list and len(entry) == 5 and entry[:4] == [
            st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns
        ]:
            known = entry[4]
            if is_sha256_hex(known):
                return known, st.st_size, executable
        hexdigest, size = _sha256_of(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            self._entries[path] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                                   hexdigest]
            self._dirty = True
        return hexdigest, size, executable

    def digest(self, path: str) -> tuple[Digest, bool]:
        """The digest of the file at ``path`` and whether it is executable.

        Raises OSError if the file cannot be read.
        """
        from hitz.executor.store import Digest

        hexdigest, size, executable = self.lookup(path)
        return Digest(hexdigest, size), executable

    def remember(self, path: str, digest: Digest) -> None:
        """Record ``digest`` for a file hitz just wrote from that digest."""
        try:
            st = os.stat(path)
        except OSError:
            return
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            self._entries[path] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                                   digest.hash]
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"version": 1, "files": self._entries}))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            tmp.unlink(missing_ok=True)
