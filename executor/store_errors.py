"""The local store's errors, and the one border where ``OSError`` becomes them.

::

    HitzError
    └── CacheError                 a cache could not give or keep what was asked
        ├── CacheUnavailable       the cache folder can't be used: unwritable,
        │                          full, not a folder, I/O error (run uncached)
        └── BlobMissing            a blob is not in the store
            └── BlobCorrupt        it was there but failed verification; removed

The classes belong in ``hitz.executor.errors`` beside the rest of the tree;
they live here until they move. ``cache_io`` and ``output_io`` are the only
places in ``hitz.executor.store*`` that turn an ``OSError`` into a hitz error:
one for the cache folder (``CacheUnavailable``), one for the caller's own
files that are stored or materialised (``OutputError``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from hitz.executor.errors import (
    BlobCorrupt,
    BlobMissing,
    CacheError,
    CacheErrorReason,
    CacheUnavailable,
    OutputError,
)

__all__ = [
    "BlobCorrupt",
    "BlobMissing",
    "CacheError",
    "CacheErrorReason",
    "CacheUnavailable",
    "cache_io",
    "output_io",
]


@contextlib.contextmanager
def cache_io(folder: Path) -> Iterator[None]:
    """``with cache_io(folder):`` turns an ``OSError`` into ``CacheUnavailable``.

    For operations on the cache folder ``folder`` (named in the message) and
    nothing else: the reason says whether it is full, unwritable or failing.
    """
    try:
        yield
    except OSError as exc:
        raise _unavailable(folder, exc) from exc


@contextlib.contextmanager
def output_io(path: str | os.PathLike[str], verb: str) -> Iterator[None]:
    """``with output_io(path, "read"):`` turns an ``OSError`` into ``OutputError``.

    For the caller's file ``path`` that is being stored or materialised.
    """
    try:
        yield
    except OSError as exc:
        raise OutputError(
            f"can't {verb} `{os.fspath(path)}`: {exc.strerror}",
            detail=f"{exc.filename}: {exc.strerror}" if exc.filename else None,
        ) from exc


_FULL = {errno.ENOSPC, errno.EDQUOT}
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _unavailable(folder: Path, exc: OSError) -> CacheUnavailable:
    detail = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if exc.errno in _FULL:
        return CacheUnavailable(
            f"cache folder `{folder}` is full: {exc.strerror}",
            detail=detail,
            hint="free some space, or give the cache a smaller size limit",
            reason=CacheErrorReason.DISK_FULL,
        )
    if exc.errno in _UNWRITABLE:
        return CacheUnavailable(
            f"cache folder `{folder}` is not writable: {exc.strerror}",
            detail=detail,
            hint="choose another cache folder (`HITZ_CACHE_DIR`)",
            reason=CacheErrorReason.UNWRITABLE,
        )
    return CacheUnavailable(
        f"cache folder `{folder}` can't be used: {exc.strerror}",
        detail=detail,
        reason=CacheErrorReason.IO_ERROR,
    )
