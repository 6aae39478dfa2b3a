"""The cap on partial ByteStream uploads of `hitz cache serve` (``Uploads``):
which one is dropped, and that one in use never is. The server end to end,
with its open files counted, is in tests/integration/test_cache_server.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hitz.executor.server_bytestream import Upload, Uploads, parse_write_name
from hitz.executor.store import Digest, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "cache")
    yield opened
    opened.close()


def _begin(uploads: Uploads, n: int) -> Upload:
    digest = Digest.of(f"blob {n}".encode())
    name = f"uploads/{n:08d}-0000-0000-0000-000000000000/blobs/{digest.hash}/{digest.size}"
    upload = uploads.begin(name, parse_write_name(name))
    upload.append(b"bl")  # a partial upload: its temp file is open
    return upload


def test_the_least_recently_used_idle_upload_is_dropped(store: Store) -> None:
    uploads = Uploads(store, max_partial=2)
    try:
        first = _begin(uploads, 1)  # still in use
        second = _begin(uploads, 2)
        uploads.end(second)
        third = _begin(uploads, 3)
        # The cap drops the idle one, though the busy one is older.
        assert uploads.find(second.name) is None
        assert uploads.find(first.name) is first
        assert uploads.find(third.name) is third
        assert uploads.partial() == 2

        # Every upload busy: none is dropped, the count goes over the cap.
        fourth = _begin(uploads, 4)
        assert uploads.partial() == 3
        uploads.end(first)
        uploads.end(third)
        uploads.end(fourth)
        _begin(uploads, 5)  # drops the two least recently begun idle ones: 1, then 3
        assert [uploads.find(u.name) is not None for u in (first, third, fourth)] == [
            False, False, True]
        assert uploads.partial() == 2
    finally:
        uploads.close()


def test_a_cap_below_one_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="max_partial must be at least 1, got 0"):
        Uploads(store, max_partial=0)
