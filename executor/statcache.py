"""File digests reused while a file's metadata is unchanged.

A no-op run must not read every input again: a file whose size, mtime,
inode and ctime are what they were when it was hashed keeps its digest (the
same test git's index and ninja's log rely on). A file modified within the
filesystem's timestamp granularity of being hashed could keep its old
metadata, so entries younger than ``_RACY_S`` are hashed but not recorded
(git's "racily clean" rule).

Kept in ``.hitz/stat-cache.json``: plain JSON, since ``.hitz/`` belongs to a
project that may not be trusted; anything unreadable is an empty cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from hitz.executor.store import Digest

_RACY_S = 2.0
_CHUNK = 1 << 20


def hash_file(path: str) -> Digest:
    """SHA-256 and size of the file at ``path`` (following symlinks), streamed."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return Digest(digest.hexdigest(), size)


class StatCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, list[int | str]] = {}
        self._dirty = False
        try:
            data = json.loads(path.read_bytes())
            if isinstance(data, dict) and data.get("version") == 1:
                self._entries = data["files"]
        except (OSError, ValueError, KeyError, TypeError):
            self._entries = {}

    def digest(self, path: str) -> tuple[Digest, bool]:
        """The digest of the file at ``path`` and whether it is executable.

        Raises OSError if the file cannot be read.
        """
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        executable = bool(st.st_mode & 0o111)
        entry = self._entries.get(path)
        if entry is not None and entry[:4] == stamp:
            return Digest(str(entry[4]), st.st_size), executable
        digest = hash_file(path)
        if time.time() - max(st.st_mtime, st.st_ctime) > _RACY_S:
            self._entries[path] = [*stamp, digest.hash]
            self._dirty = True
        return digest, executable

    def remember(self, path: str, digest: Digest) -> None:
        """Record ``digest`` for a file hitz just wrote from that digest."""
        try:
            st = os.stat(path)
        except OSError:
            return
        if time.time() - max(st.st_mtime, st.st_ctime) > _RACY_S:
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
