"""Properties of a task's cache key (``executor/actions.py``), on real files.

A key must move exactly when the task's result could: with an input's content
or executable bit, the set of input files, the command, the environment, the
network policy, the rootfs identity or the timeout; and must not move with
what cannot change the result: the checkout's path, file mtimes, the order in
which the manifest lists env variables or inputs. Keys are computed the way a
run computes them, by ``Runner.key_for`` on a manifest loaded from disk; the
REAPI messages are checked against the spec's ordering rules and against a
Merkle tree built by hand.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from hitz.executor import statcache
from hitz.executor.actions import (
    ActionKey,
    InputFile,
    build_key,
    digest_of,
    host_rootfs_identity,
    platform_properties,
)
from hitz.executor.manifest import load
from hitz.executor.model import TaskDef
from hitz.executor.runner import Runner, state_dir_for
from hitz.executor.store import Digest
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb
from tests.helpers import task, wait_for

ROOTFS = "host:test"
OLD = 1_000_000_000  # an mtime (2001) well outside the stat cache's racy window

BASE = task("t", "cc -c src/main.c -o build/main.o", inputs=["src/*.c", "include/"],
            outputs=["build/main.o"], env={"A": "1", "B": "2"}, timeout="90s")
FILES = {
    "src/main.c": "int main(void) { return 0; }\n",
    "src/util.c": "int util(void) { return 1; }\n",
    "include/util.h": "int util(void);\n",
}


class Checkout:
    """A project folder on disk; ``key()`` loads its manifest afresh each time."""

    def __init__(self, root: Path, manifest: str = BASE,
                 files: Mapping[str, str] = FILES) -> None:
        self.root = root
        if manifest == "" and not files:  # an existing folder: see `at`
            return
        root.mkdir(parents=True)
        self.write("hitz.toml", manifest)
        for rel, text in files.items():
            self.write(rel, text)

    @classmethod
    def at(cls, root: Path) -> Checkout:
        """The project already in ``root``."""
        return cls(root, "", {})

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def runner(self, rootfs: str = ROOTFS) -> Runner:
        manifest = load(self.root / "hitz.toml")
        state_dir = state_dir_for(manifest)
        state_dir.mkdir(exist_ok=True)  # as `hitz run` makes it, for the stat cache
        runner = Runner(manifest, state_dir)
        runner._rootfs = rootfs  # the host's identity: see test_the_rootfs_identity_*
        return runner

    def key(self, name: str = "t", rootfs: str = ROOTFS) -> ActionKey:
        runner = self.runner(rootfs)
        return runner.key_for(runner.manifest.tasks[name])[0]


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path / "proj")


# --- what does not move the key ----------------------------------------------------


def test_the_same_task_in_two_checkout_paths_has_the_same_key(tmp_path: Path) -> None:
    first = Checkout(tmp_path / "home" / "alice" / "proj")
    second = Checkout(tmp_path / "srv" / "ci" / "build-1234" / "other-name")
    one, two = first.key(), second.key()
    assert one.digest == two.digest
    assert one.blobs == two.blobs
    for blob in one.blobs.values():  # the path is in no message at all
        assert str(first.root).encode() not in blob
        assert b"alice" not in blob


@pytest.fixture
def trusting_stat_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every hashed file in the stat cache at once. A file is recorded
    only once its last change is ``RACY_S`` (2 s) old, and ctime cannot be
    set back: without this the tests would have to wait. (The tests check
    that the stat cache did record the file.)"""
    monkeypatch.setattr(statcache, "RACY_NS", -(10**30))


def test_touching_an_input_does_not_change_the_key(
    checkout: Checkout, trusting_stat_cache: None
) -> None:
    source = checkout.root / "src/main.c"
    runner = checkout.runner()
    before = runner.key_for(runner.manifest.tasks["t"])[0]
    runner.stat.save()
    assert str(source) in (checkout.root / ".hitz/stat-cache.json").read_text()
    assert checkout.key().digest == before.digest  # from the stat cache
    os.utime(source, (OLD, OLD))
    assert checkout.key().digest == before.digest  # hashed again: same content
    source.touch()
    assert checkout.key().digest == before.digest


def test_a_same_size_edit_behind_a_restored_mtime_still_changes_the_key(
    checkout: Checkout, trusting_stat_cache: None
) -> None:
    """The stat cache must not hide an edit: ctime moves even when mtime is
    put back (size, mtime and inode stay what the cache recorded)."""
    source = checkout.root / "src/main.c"
    os.utime(source, (OLD, OLD))
    runner = checkout.runner()
    before = runner.key_for(runner.manifest.tasks["t"])[0]
    runner.stat.save()
    assert str(source) in (checkout.root / ".hitz/stat-cache.json").read_text()
    recorded = source.stat()
    # The filesystem's clock ticks coarsely; an edit within the same tick would
    # keep ctime too (the racy case RACY_S exists for). Wait for the next tick.
    probe = checkout.root / "probe"
    wait_for(lambda: (probe.write_text(""), probe.stat().st_ctime_ns > recorded.st_ctime_ns)[1],
             "the filesystem's ctime clock to tick")
    source.write_text(FILES["src/main.c"].replace("0", "7"))
    os.utime(source, (OLD, OLD))
    edited = source.stat()
    assert (edited.st_size, edited.st_mtime_ns, edited.st_ino) == (
        recorded.st_size, recorded.st_mtime_ns, recorded.st_ino)
    assert checkout.key().digest != before.digest


def test_the_order_of_env_keys_and_of_inputs_in_the_manifest_does_not_matter(
    checkout: Checkout,
) -> None:
    before = checkout.key()
    checkout.write("hitz.toml", task(
        "t", "cc -c src/main.c -o build/main.o", inputs=["include/", "src/*.c"],
        outputs=["build/main.o"], env={"B": "2", "A": "1"}, timeout="90s"))
    assert checkout.key().digest == before.digest


def test_an_input_named_twice_counts_once(checkout: Checkout) -> None:
    before = checkout.key()
    checkout.write("hitz.toml", task(
        "t", "cc -c src/main.c -o build/main.o",
        inputs=["src/*.c", "include/", "src/main.c", "include/util.h"],
        outputs=["build/main.o"], env={"A": "1", "B": "2"}, timeout="90s"))
    assert checkout.key().digest == before.digest


def test_build_key_is_deterministic() -> None:
    definition = TaskDef(name="t", argv=("/bin/sh", "-c", "true"), outputs=("b/", "a"),
                         timeout_s=30.0)
    files = [InputFile("z/1", Digest.of(b"1"), False), InputFile("a/2", Digest.of(b"2"), True),
             InputFile("m", Digest.of(b"3"), False)]
    env = {"Z": "1", "A": "2"}
    props = platform_properties(definition, ROOTFS)
    first = build_key(definition, env, files, props)
    again = build_key(definition, dict(reversed(env.items())), list(reversed(files)),
                      dict(reversed(props.items())))
    assert again.digest == first.digest
    assert again.blobs == first.blobs
    assert Digest.of(first.blobs[first.digest]) == first.digest


# --- what moves the key -----------------------------------------------------------------


VARIANTS = {
    "command": task("t", "cc -O2 -c src/main.c -o build/main.o", inputs=["src/*.c", "include/"],
                    outputs=["build/main.o"], env={"A": "1", "B": "2"}, timeout="90s"),
    "an env value": task("t", "cc -c src/main.c -o build/main.o", inputs=["src/*.c", "include/"],
                         outputs=["build/main.o"], env={"A": "1", "B": "3"}, timeout="90s"),
    "a new env variable": task("t", "cc -c src/main.c -o build/main.o",
                               inputs=["src/*.c", "include/"], outputs=["build/main.o"],
                               env={"A": "1", "B": "2", "C": ""}, timeout="90s"),
    "network": task("t", "cc -c src/main.c -o build/main.o", inputs=["src/*.c", "include/"],
                    outputs=["build/main.o"], env={"A": "1", "B": "2"}, timeout="90s",
                    network="host"),
    "timeout": task("t", "cc -c src/main.c -o build/main.o", inputs=["src/*.c", "include/"],
                    outputs=["build/main.o"], env={"A": "1", "B": "2"}, timeout="91s"),
    "outputs": task("t", "cc -c src/main.c -o build/main.o", inputs=["src/*.c", "include/"],
                    outputs=["build/main.o", "build/main.d"], env={"A": "1", "B": "2"},
                    timeout="90s"),
}


def test_each_part_of_the_task_moves_the_key(tmp_path: Path) -> None:
    base = Checkout(tmp_path / "base").key().digest
    keys = {what: Checkout(tmp_path / what.replace(" ", "-"), manifest).key().digest
            for what, manifest in VARIANTS.items()}
    assert [what for what, key in keys.items() if key == base] == []
    assert len(set(keys.values())) == len(keys), "two different changes gave the same key"


def test_changing_an_input_s_content_changes_the_key(checkout: Checkout) -> None:
    before = checkout.key()
    checkout.write("include/util.h", "int util(int);\n")
    after = checkout.key()
    assert after.digest != before.digest
    assert after.inputs["include/util.h"] != before.inputs["include/util.h"]
    checkout.write("include/util.h", FILES["include/util.h"])
    assert checkout.key().digest == before.digest  # a function of content, nothing else


def test_adding_or_removing_an_input_file_changes_the_key(checkout: Checkout) -> None:
    before = checkout.key()
    checkout.write("src/new.c", "")  # matches src/*.c; empty, so only its name is new
    added = checkout.key()
    assert added.digest != before.digest
    assert "src/new.c" in added.inputs
    (checkout.root / "src/new.c").unlink()
    (checkout.root / "src/util.c").unlink()
    removed = checkout.key()
    assert removed.digest not in (before.digest, added.digest)
    assert "src/util.c" not in removed.inputs


def test_renaming_an_input_file_changes_the_key(checkout: Checkout) -> None:
    before = checkout.key()
    (checkout.root / "src/util.c").rename(checkout.root / "src/utils.c")
    assert checkout.key().digest != before.digest


def test_the_executable_bit_of_an_input_changes_the_key(checkout: Checkout) -> None:
    source = checkout.root / "src/main.c"
    source.chmod(0o644)
    before = checkout.key()
    source.chmod(0o755)
    assert checkout.key().digest != before.digest
    source.chmod(0o600)  # other mode bits are not part of the key
    assert checkout.key().digest == before.digest


def test_the_rootfs_identity_changes_the_key(checkout: Checkout) -> None:
    assert checkout.key(rootfs="host:aaaa").digest != checkout.key(rootfs="host:bbbb").digest


def test_the_host_rootfs_identity_follows_the_os_release_digest() -> None:
    """What ``runner._rootfs`` stands for: digests of the host's distribution files."""
    def hashed_as(content: bytes) -> Callable[[str], tuple[Digest, bool]]:
        def digest_file(path: str) -> tuple[Digest, bool]:
            return Digest.of(content + path.encode()), False
        return digest_file

    one = host_rootfs_identity(hashed_as(b"VERSION_ID=12"))
    two = host_rootfs_identity(hashed_as(b"VERSION_ID=13"))
    assert one.startswith("host:")
    assert one != two
    assert host_rootfs_identity(hashed_as(b"VERSION_ID=12")) == one


def test_the_output_of_a_dependency_is_part_of_the_key(tmp_path: Path) -> None:
    manifest = (task("gen", "true", outputs=["gen/"])
                + task("use", "cat gen/a", inputs=[":gen"], outputs=["out"]))
    checkout = Checkout(tmp_path / "proj", manifest, {"gen/a": "1\n", "gen/sub/b": "2\n"})
    before = checkout.key("use")
    assert sorted(before.inputs) == ["gen/a", "gen/sub/b"]
    checkout.write("gen/sub/b", "3\n")
    assert checkout.key("use").digest != before.digest


# --- the REAPI messages -------------------------------------------------------------------


def test_the_command_lists_are_sorted_as_reapi_requires() -> None:
    definition = TaskDef(name="t", argv=("run",), outputs=("z.txt", "m/", "a/b.txt", "b/"))
    env = {"ZED": "1", "ALPHA": "2", "MID": "3", "BETA": "4"}
    key = build_key(definition, env, [], platform_properties(definition, ROOTFS))
    command = key.command
    # REAPI Command.environment_variables: "MUST be sorted by name".
    assert [v.name for v in command.environment_variables] == ["ALPHA", "BETA", "MID", "ZED"]
    assert {v.name: v.value for v in command.environment_variables} == env
    # REAPI Command.output_paths (and the deprecated output_files and
    # output_directories): "MUST be sorted lexicographically by code point".
    assert list(command.output_paths) == ["a/b.txt", "b", "m", "z.txt"]
    assert list(command.output_files) == ["a/b.txt", "z.txt"]
    assert list(command.output_directories) == ["b", "m"]
    # REAPI Platform.properties: "MUST be sorted by name, then value".
    names = [p.name for p in command.platform.properties]
    assert names == sorted(names)
    action = pb.Action.FromString(key.blobs[key.digest])
    assert action.platform == command.platform
    assert list(command.arguments) == ["run"]
    assert command.working_directory == ""


def test_the_action_names_its_command_and_timeout(checkout: Checkout) -> None:
    key = checkout.key()
    action = pb.Action.FromString(key.blobs[key.digest])
    command_digest = Digest(action.command_digest.hash, action.command_digest.size_bytes)
    assert key.blobs[command_digest] == key.command.SerializeToString(deterministic=True)
    assert action.timeout.ToNanoseconds() == 90 * 10**9
    assert action.do_not_cache is False
    assert {p.name: p.value for p in action.platform.properties} == {
        "ISA": key.platform["ISA"],
        "OSFamily": "linux",
        "hitz.network": "none",
        "hitz.rootfs": ROOTFS,
        "hitz.sandbox": key.platform["hitz.sandbox"],
        "hitz.policy": "seccomp=default;caps=none;rlimits=4=0,7=4096;landlock=required",
    }
    assert list(key.command.arguments) == ["/bin/sh", "-c", "cc -c src/main.c -o build/main.o"]


def test_the_input_root_is_the_merkle_tree_of_the_input_files(tmp_path: Path) -> None:
    files = {
        "README": "top\n",
        "src/main.c": "int main(void);\n",
        "src/lib/util.c": "int util(void);\n",
        "tools/run.sh": "#!/bin/sh\n",
    }
    manifest = task("t", "true", inputs=["README", "src/", "tools/run.sh"])
    checkout = Checkout(tmp_path / "proj", manifest, files)
    for rel in files:
        (checkout.root / rel).chmod(0o644)
    (checkout.root / "tools/run.sh").chmod(0o755)
    key = checkout.key()

    def file(name: str, rel: str, executable: bool = False) -> pb.FileNode:
        digest = Digest.of(files[rel].encode())
        return pb.FileNode(name=name, digest=pb.Digest(hash=digest.hash, size_bytes=digest.size),
                           is_executable=executable)

    def folder(name: str, directory: pb.Directory) -> pb.DirectoryNode:
        digest, _ = digest_of(directory)
        return pb.DirectoryNode(name=name,
                                digest=pb.Digest(hash=digest.hash, size_bytes=digest.size))

    lib = pb.Directory(files=[file("util.c", "src/lib/util.c")])
    src = pb.Directory(files=[file("main.c", "src/main.c")], directories=[folder("lib", lib)])
    tools = pb.Directory(files=[file("run.sh", "tools/run.sh", executable=True)])
    root = pb.Directory(files=[file("README", "README")],
                        directories=[folder("src", src), folder("tools", tools)])

    action = pb.Action.FromString(key.blobs[key.digest])
    root_digest, _ = digest_of(root)
    assert Digest(action.input_root_digest.hash, action.input_root_digest.size_bytes) \
        == root_digest
    for directory in (root, src, lib, tools):  # every Directory is there for a remote
        digest, data = digest_of(directory)
        assert key.blobs[digest] == data
    assert len(key.blobs) == 6  # the Action, the Command and the four Directories


def test_an_input_root_with_no_files_is_the_empty_directory(tmp_path: Path) -> None:
    checkout = Checkout(tmp_path / "proj", task("t", "true", outputs=["x"]), {})
    key = checkout.key()
    action = pb.Action.FromString(key.blobs[key.digest])
    empty, _ = digest_of(pb.Directory())
    assert Digest(action.input_root_digest.hash, action.input_root_digest.size_bytes) == empty


def test_copying_a_checkout_keeps_every_key(tmp_path: Path) -> None:
    """A copy (new inodes, new mtimes, another path) is the same project."""
    original = Checkout(tmp_path / "a" / "proj")
    shutil.copytree(original.root, tmp_path / "b" / "proj")
    copy = Checkout.at(tmp_path / "b" / "proj")
    assert copy.key().digest == original.key().digest


# --- tasks on an image ---------------------------------------------------------------


def _pinned_image(root: Path, digest: str) -> None:
    """images/bb.toml and a hitz.lock pinning it to ``digest`` (nothing is
    built: a pinned image's key needs only the pin)."""
    from hitz.executor.images_def import LockedImage, LockedPackage, load_definition, write_lock

    (root / "images").mkdir(exist_ok=True)
    (root / "images" / "bb.toml").write_text('suite = "bookworm"\npackages = ["busybox-static"]\n')
    definition = load_definition(root / "images" / "bb.toml")
    package = LockedPackage("busybox-static", "1:1.35.0-4", "amd64", "ab" * 32, 1000)
    write_lock(root / "hitz.lock",
               {"bb": LockedImage(digest, definition.digest, "bookworm", "amd64", (package,))})


_ON_IMAGE = "\n".join([
    task("ns", "echo hi", extra={"rootfs": "image:bb", "backend": "namespace"}),
    task("docker", "echo hi", extra={"rootfs": "image:bb", "backend": "docker"}),
    task("host", "echo hi"),
])


def test_a_task_on_an_image_has_the_same_key_in_every_backend(tmp_path: Path) -> None:
    checkout = Checkout(tmp_path / "proj", _ON_IMAGE, {})
    _pinned_image(checkout.root, "sha256:" + "1" * 64)
    runner = checkout.runner()
    ns = runner.key_for(runner.manifest.tasks["ns"])[0]
    docker = runner.key_for(runner.manifest.tasks["docker"])[0]
    host = runner.key_for(runner.manifest.tasks["host"])[0]
    assert ns.platform["hitz.rootfs"] == "image:sha256:" + "1" * 64
    assert ns.digest == docker.digest
    assert ns.digest != host.digest


def test_the_image_digest_moves_the_key_of_a_task_on_it(tmp_path: Path) -> None:
    checkout = Checkout(tmp_path / "proj", _ON_IMAGE, {})
    _pinned_image(checkout.root, "sha256:" + "1" * 64)
    before = checkout.key("ns")
    _pinned_image(checkout.root, "sha256:" + "2" * 64)
    after = checkout.key("ns")
    assert before.digest != after.digest
    assert after.platform["hitz.rootfs"] == "image:sha256:" + "2" * 64


def test_a_docker_image_named_by_digest_is_keyed_by_that_digest(tmp_path: Path) -> None:
    digest = "sha256:" + "3" * 64
    manifest = "\n".join([
        task("a", "echo hi", extra={"rootfs": f"docker:debian@{digest}", "backend": "docker"}),
        task("b", "echo hi", extra={"rootfs": f"docker:other/name@{digest}", "backend": "docker"}),
    ])
    checkout = Checkout(tmp_path / "proj", manifest, {})
    a, b = checkout.key("a"), checkout.key("b")
    assert a.platform["hitz.rootfs"] == "docker:" + digest
    assert a.digest == b.digest  # the content, not the name


def test_re_pinning_an_image_makes_its_tasks_stale_for_the_no_op_path(tmp_path: Path) -> None:
    checkout = Checkout(tmp_path / "proj", _ON_IMAGE, {})
    _pinned_image(checkout.root, "sha256:" + "1" * 64)
    runner = checkout.runner()
    before = runner._fingerprint(runner.manifest.tasks["ns"], [])
    _pinned_image(checkout.root, "sha256:" + "2" * 64)
    runner = checkout.runner()
    assert runner._fingerprint(runner.manifest.tasks["ns"], []) != before
