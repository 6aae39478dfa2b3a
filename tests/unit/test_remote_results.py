"""A remote cache's action results are checked before anything is restored.

The remote's blobs are verified against their digests, but an ActionResult
has no digest of its own: the remote (or whoever could write to it) says
what the outputs are and where they go. A result for a task's key is only
restored when it names the task's declared outputs and nothing else, and
when the trees of its output directories hold plain names: a result that
would write a source file, or a file outside the project, is a miss.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hitz.executor.actions import build_key
from hitz.executor.cache import TaskCache
from hitz.executor.model import TaskDef
from hitz.executor.remote import RemoteCache
from hitz.executor.remote_config import RemoteCacheSettings
from hitz.executor.remote_tier import RemoteTier
from hitz.executor.statcache import StatCache
from hitz.executor.store import Digest, Store
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.fakes.reapi_server import FakeReapi


@pytest.fixture
def fake() -> Iterator[FakeReapi]:
    with FakeReapi() as server:
        yield server


def _wire(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def _lookup(fake: FakeReapi, tmp_path: Path, task: TaskDef,
            result: re_pb2.ActionResult) -> tuple[object, list[str]]:
    """Put ``result`` on the fake under ``task``'s key; look the task up in a
    fresh local cache whose remote is the fake."""
    key = build_key(task, {}, [], {"OSFamily": "linux"})
    fake.results[key.digest] = result
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    warnings: list[str] = []
    tier = RemoteTier(RemoteCacheSettings(url=fake.url), project, warnings.append,
                      connect=lambda: RemoteCache.connect(fake.url, timeout_s=30.0,
                                                          retries=1, sleep=lambda _s: None))
    with Store(tmp_path / "cache") as store:
        cache = TaskCache(store, project, tmp_path / "state", StatCache(tmp_path / "stat.json"),
                          warnings.append, remote=tier)
        try:
            restored = cache.lookup(task, key)
        finally:
            tier.flush()
        stored = store.get_action_result(key.digest)
    assert stored is None or restored is not None, "an unusable result was kept locally"
    return restored, warnings


def test_a_declared_output_from_the_remote_is_restored(fake: FakeReapi, tmp_path: Path) -> None:
    task = TaskDef("t", ("true",), outputs=("out/a.txt",))
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="out/a.txt", digest=_wire(fake.put(b"A\n")))
    restored, warnings = _lookup(fake, tmp_path, task, result)
    assert restored is not None
    assert (tmp_path / "project/out/a.txt").read_bytes() == b"A\n"
    assert warnings == []


def test_a_remote_result_naming_an_undeclared_file_is_a_miss(fake: FakeReapi,
                                                             tmp_path: Path) -> None:
    (tmp_path / "project/src").mkdir(parents=True)
    (tmp_path / "project/src/main.c").write_text("int main(void) { return 0; }\n")
    task = TaskDef("t", ("true",), outputs=("out/a.txt",))
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="out/a.txt", digest=_wire(fake.put(b"A\n")))
    result.output_files.add(path="src/main.c", digest=_wire(fake.put(b"evil\n")))
    restored, warnings = _lookup(fake, tmp_path, task, result)
    assert restored is None
    assert (tmp_path / "project/src/main.c").read_text() == "int main(void) { return 0; }\n"
    assert not (tmp_path / "project/out/a.txt").exists()
    assert warnings == []


@pytest.mark.parametrize("path", ["../outside.txt", "/tmp/hitz-absolute-output.txt",
                                  "out/../../outside.txt"])
def test_a_remote_result_writing_outside_the_project_is_a_miss(fake: FakeReapi, tmp_path: Path,
                                                               path: str) -> None:
    task = TaskDef("t", ("true",), outputs=("out/a.txt",))
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path=path, digest=_wire(fake.put(b"evil\n")))
    restored, _ = _lookup(fake, tmp_path, task, result)
    assert restored is None
    assert not (tmp_path / "outside.txt").exists()
    assert not Path("/tmp/hitz-absolute-output.txt").exists()


@pytest.mark.parametrize("name", ["../../../outside.txt", "..", "a/b", "", "."])
def test_a_remote_tree_with_a_name_that_is_not_plain_is_a_miss(fake: FakeReapi, tmp_path: Path,
                                                               name: str) -> None:
    task = TaskDef("t", ("true",), outputs=("out/",))
    tree = re_pb2.Tree(root=re_pb2.Directory(files=[
        re_pb2.FileNode(name="ok.txt", digest=_wire(fake.put(b"fine\n"))),
        re_pb2.FileNode(name=name, digest=_wire(fake.put(b"evil\n")))]))
    result = re_pb2.ActionResult(exit_code=0)
    result.output_directories.add(path="out", tree_digest=_wire(fake.put(
        tree.SerializeToString(deterministic=True))))
    restored, _ = _lookup(fake, tmp_path, task, result)
    assert restored is None
    assert not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / "project/out").exists()


def test_a_remote_tree_with_a_subfolder_named_dot_dot_is_a_miss(fake: FakeReapi,
                                                                tmp_path: Path) -> None:
    task = TaskDef("t", ("true",), outputs=("out/",))
    child = re_pb2.Directory(files=[re_pb2.FileNode(name="outside.txt",
                                                    digest=_wire(fake.put(b"evil\n")))])
    child_digest = Digest.of(child.SerializeToString(deterministic=True))
    tree = re_pb2.Tree(root=re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="..", digest=_wire(child_digest))]), children=[child])
    result = re_pb2.ActionResult(exit_code=0)
    result.output_directories.add(path="out", tree_digest=_wire(fake.put(
        tree.SerializeToString(deterministic=True))))
    restored, _ = _lookup(fake, tmp_path, task, result)
    assert restored is None
    assert not (tmp_path / "project/outside.txt").exists()


def test_a_full_disk_while_a_big_blob_downloads_is_the_local_cache_failing(
        fake: FakeReapi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file of a streamed download is the local store's: an error
    writing it is ``CacheUnavailable`` (the cache turns itself off with one
    warning), not an ``OSError`` escaping as a traceback."""
    import errno
    import os

    from hitz.executor import remote_bytestream
    from hitz.executor.store import CacheUnavailable

    big = bytes(range(256)) * (5 * 4096 + 7)  # > 4 MiB: streamed, not batched
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="out/big", digest=_wire(fake.put(big)))
    action = Digest.of(b"a full disk")
    fake.results[action] = result

    def full(_fd: int, _data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(remote_bytestream.os, "write", full)
    tier = RemoteTier(RemoteCacheSettings(url=fake.url), tmp_path, None,
                      connect=lambda: RemoteCache.connect(fake.url, timeout_s=30.0,
                                                          retries=1, sleep=lambda _s: None))
    with Store(tmp_path / "cache") as store:
        try:
            with pytest.raises(CacheUnavailable):
                tier.fetch("t", action, store)
        finally:
            monkeypatch.undo()
            tier.flush()
        temps = [p for p in (tmp_path / "cache").rglob("*.tmp") if p.is_file()]
        assert temps == []


def test_a_result_planted_in_the_local_store_is_checked_too(tmp_path: Path) -> None:
    """`hitz cache serve` serves the local cache folder: its clients write
    action results straight into the store a local run reads. Such a result
    gets the same checks as one fetched from a remote."""
    task = TaskDef("t", ("true",), outputs=("out/",))
    key = build_key(task, {}, [], {"OSFamily": "linux"})
    project = tmp_path / "project"
    project.mkdir()
    with Store(tmp_path / "cache") as store:
        evil = store.put_bytes(b"evil\n")
        tree = re_pb2.Tree(root=re_pb2.Directory(files=[
            re_pb2.FileNode(name="../../outside.txt", digest=_wire(evil))]))
        tree_digest = store.put_bytes(tree.SerializeToString(deterministic=True))
        result = re_pb2.ActionResult(exit_code=0)
        result.output_directories.add(path="out", tree_digest=_wire(tree_digest))
        result.output_files.add(path="hitz.toml", digest=_wire(evil))
        store.put_action_result(key.digest, result.SerializeToString(deterministic=True))
        cache = TaskCache(store, project, tmp_path / "state", StatCache(tmp_path / "stat.json"))
        assert cache.lookup(task, key) is None
        assert cache.reasons["t"] == ["the cached result's outputs are not the task's "
                                      "declared outputs"]
        result.ClearField("output_files")
        store.put_action_result(key.digest, result.SerializeToString(deterministic=True))
        assert cache.lookup(task, key) is None
        assert cache.reasons["t"] == ["the cached result cannot be restored: a tree holds the "
                                      "name '../../outside.txt', not a plain file name"]
    assert not (tmp_path / "outside.txt").exists()
    assert not (project / "hitz.toml").exists()
    assert not (project / "out").exists()


class _EverLaterDrops(FakeReapi):
    """A server whose every Read breaks, each one a little further in."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    @property  # type: ignore[override]
    def _drop_read(self) -> int:
        self.reads += 1
        return self.reads * (64 << 10)

    @_drop_read.setter
    def _drop_read(self, _value: object) -> None:
        pass


def test_a_compressed_read_that_keeps_breaking_is_given_up_after_its_retries(
        tmp_path: Path) -> None:
    """A broken compressed Read starts over from 0: getting further than the try
    before is no progress kept, so it does not reset the count of failures (a
    server breaking each Read a bit later would be read again and again)."""
    import random

    from hitz.executor.remote_errors import RemoteUnavailable

    data = random.Random(3).randbytes(5 << 20)  # streamed; zstd can't shrink it
    with _EverLaterDrops() as server:
        digest = server.put(data)
        with RemoteCache.connect(server.url, timeout_s=30.0, retries=4,
                                 sleep=lambda _s: None) as client:
            assert client.capabilities.zstd
            with pytest.raises(RemoteUnavailable):
                client.download_file(digest, tmp_path / "out")
        assert server.calls["Read"] == 5  # the first try and 4 retries
    assert not (tmp_path / "out").exists()


def test_a_remote_result_lacking_a_declared_output_is_a_miss(fake: FakeReapi,
                                                            tmp_path: Path) -> None:
    """A task succeeds only with all its declared outputs: a result without one
    (or with it only as a kind of symlink hitz does not restore) would be a
    hit that leaves the output missing."""
    task = TaskDef("t", ("true",), outputs=("out/a.txt", "out/b.txt"))
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="out/a.txt", digest=_wire(fake.put(b"A\n")))
    result.output_file_symlinks.add(path="out/b.txt", target="a.txt")
    restored, _ = _lookup(fake, tmp_path, task, result)
    assert restored is None
    assert not (tmp_path / "project/out/a.txt").exists()


def test_a_remote_hit_with_many_small_blobs_is_read_in_bounded_groups(
        fake: FakeReapi, tmp_path: Path) -> None:
    """Small blobs are read concurrently, but not all at once into memory: a
    result of 10,000 files of 1 MiB would otherwise hold 10 GiB."""
    from hitz.executor.remote import READ_GROUP_BYTES

    blobs = {f"out/f{n}": bytes([n]) * (3 << 20) for n in range(12)}  # 36 MiB, each batched
    task = TaskDef("t", ("true",), outputs=tuple(blobs))
    result = re_pb2.ActionResult(exit_code=0)
    for path, data in blobs.items():
        result.output_files.add(path=path, digest=_wire(fake.put(data)))
    asked: list[int] = []
    real = RemoteCache.read_blobs

    def counting(self: RemoteCache, digests: Any) -> dict[Digest, bytes]:
        wanted = list(digests)
        asked.append(sum(d.size for d in wanted))
        return real(self, wanted)

    RemoteCache.read_blobs = counting  # type: ignore[method-assign]
    try:
        restored, _ = _lookup(fake, tmp_path, task, result)
    finally:
        RemoteCache.read_blobs = real  # type: ignore[method-assign]
    assert restored is not None
    assert all((tmp_path / "project" / p).read_bytes() == d for p, d in blobs.items())
    assert sum(asked) == 36 << 20
    assert max(asked) <= READ_GROUP_BYTES
