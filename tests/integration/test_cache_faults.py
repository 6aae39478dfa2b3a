"""The task cache when its store is damaged or unusable, end to end.

Corrupt data must never reach the project, and the cache must heal: a blob or
an action-cache entry damaged on disk (a flipped byte, a truncated file) is
found when it is read, the task runs again, and the next run is all cached.
A run killed with SIGKILL in the middle leaves no partial entry behind. A
cache folder that cannot be used at all (not a folder, read-only, full) costs
one `warning:` line and the cache, never the run.

Tests run as root, so "unwritable" must be real: a path under a regular file
(ENOTDIR), or a read-only bind mount or a tiny tmpfs made in a private mount
namespace (`unshare --mount`) around the one hitz command; the host's mount
table never changes. The store is checked afterwards through its own API,
which verifies every byte it reads.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from hitz.executor.store import CacheError, Digest, Store
from hitz.executor.store_codec import HEADER_LEN
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb
from tests.helpers import (
    COMMAND_GUARD_S,
    HITZ,
    Completed,
    Project,
    processes_with,
    task,
    wait_for,
)

pytestmark = pytest.mark.kernel

MIB = 1 << 20


# --- helpers ------------------------------------------------------------------------


def ok(result: Completed) -> Completed:
    assert result.returncode == 0, str(result)
    return result


def ran(result: Completed) -> set[str]:
    return {t["name"] for t in result.json()["tasks"] if not t["cached"]}


def cached(result: Completed) -> set[str]:
    return {t["name"] for t in result.json()["tasks"] if t["cached"]}


def warnings(result: Completed) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def cache_dir(project: Project) -> Path:
    """The project's own cache folder, as ``tests.helpers`` sets HITZ_CACHE_DIR."""
    return project.root.parent / f"{project.root.name}.hitz-cache"


def entry_path(project: Project, kind: str, digest: Digest) -> Path:
    """Where the store keeps a blob (``cas``) or an action result (``ac``)."""
    return (cache_dir(project) / "store-v1" / kind / digest.hash[:2]
            / f"{digest.hash}-{digest.size}")


def parse_digest(text: str) -> Digest:
    hash_, size = text.replace("-", "/").split("/")
    return Digest(hash_, int(size))


def action_result(project: Project, action: Digest) -> pb.ActionResult:
    with Store(cache_dir(project)) as store:
        data = store.get_action_result(action)
    assert data is not None, f"no action cache entry for {action}"
    return pb.ActionResult.FromString(data)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped byte":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif how == "truncated":
        path.write_bytes(data[: HEADER_LEN // 2])
    else:
        assert how == "garbage", how
        path.write_bytes(b"not an entry at all")


def check_store(project: Project) -> None:
    """No temp file is left in the store, and every entry reads back verified:
    each action result, each blob it names, each blob there is."""
    root = cache_dir(project) / "store-v1"
    assert sorted(os.listdir(root / "tmp")) == []  # before Store() would sweep them
    problems = []
    with Store(cache_dir(project)) as store:
        named: list[Digest] = []
        for path in sorted((root / "ac").rglob("*-*")):
            data = store.get_action_result(parse_digest(path.name))
            if data is None:
                problems.append(f"action cache entry {path.name} does not verify")
                continue
            result = pb.ActionResult.FromString(data)
            named += [parse_digest(f"{f.digest.hash}/{f.digest.size_bytes}")
                      for f in result.output_files]
            for out in result.output_directories:
                tree_digest = parse_digest(f"{out.tree_digest.hash}/{out.tree_digest.size_bytes}")
                tree = pb.Tree.FromString(store.read_bytes(tree_digest))
                named += [parse_digest(f"{f.digest.hash}/{f.digest.size_bytes}")
                          for d in (tree.root, *tree.children) for f in d.files]
        for path in sorted((root / "cas").rglob("*-*")):
            named.append(parse_digest(path.name))
        for digest in named:
            try:
                store.read_bytes(digest)
            except CacheError as exc:  # BlobMissing, BlobCorrupt: report them all
                problems.append(f"blob {digest}: {exc}")
        assert store.counters.corrupt == 0
    assert problems == []


# --- damaged entries ------------------------------------------------------------------


OUTPUTS = task(
    "t",
    "mkdir -p gen/sub && printf 'small\\n' > small.txt"
    " && head -c 300000 /dev/zero > zeros.bin && printf 'tree\\n' > gen/sub/leaf.txt",
    outputs=["small.txt", "zeros.bin", "gen/"],
)
EXPECTED = {"small.txt": b"small\n", "zeros.bin": bytes(300000), "gen/sub/leaf.txt": b"tree\n"}


def outputs_of(project: Project) -> dict[str, bytes]:
    return {rel: (project.root / rel).read_bytes() for rel in EXPECTED}


def delete_outputs(project: Project) -> None:
    for rel in ("small.txt", "zeros.bin"):
        (project.root / rel).unlink()
    shutil.rmtree(project.root / "gen")


@pytest.mark.parametrize(("blob", "how"), [
    ("small.txt", "flipped byte"),  # stored raw
    ("zeros.bin", "flipped byte"),  # stored as a zstd frame
    ("gen/", "flipped byte"),  # the Tree message of a directory output
    ("gen/sub/leaf.txt", "flipped byte"),  # a file of a directory output
    ("small.txt", "truncated"),
])
def test_a_corrupt_blob_is_never_restored_and_the_cache_heals(
    project: Project, blob: str, how: str
) -> None:
    project.write_manifest(OUTPUTS)
    first = ok(project.run())
    result = action_result(project, parse_digest(first.task("t")["action_digest"]))
    if blob == "gen/":
        (tree,) = result.output_directories
        digest = parse_digest(f"{tree.tree_digest.hash}/{tree.tree_digest.size_bytes}")
        header = None
    else:
        digest = Digest.of(EXPECTED[blob])
        header = b"HZB1zst\n" if blob == "zeros.bin" else b"HZB1raw\n"
    path = entry_path(project, "cas", digest)
    if header is not None:
        assert path.read_bytes()[:HEADER_LEN] == header  # the encoding this case is about
    damage(path, how)

    delete_outputs(project)
    second = ok(project.run())
    assert outputs_of(project) == EXPECTED  # re-run or repaired, never the damaged bytes
    assert ran(second) == {"t"}  # a blob of the entry failed: the task ran again
    third = ok(project.run())
    assert cached(third) == {"t"}
    delete_outputs(project)
    assert cached(ok(project.run())) == {"t"}  # the repaired blob restores
    assert outputs_of(project) == EXPECTED
    check_store(project)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage"])
def test_a_corrupt_action_cache_entry_is_a_miss_and_the_task_runs_again(
    project: Project, how: str
) -> None:
    project.write_manifest(OUTPUTS)
    first = ok(project.run())
    action = parse_digest(first.task("t")["action_digest"])
    damage(entry_path(project, "ac", action), how)
    delete_outputs(project)

    second = ok(project.run("--explain"))
    assert ran(second) == {"t"}
    assert "explain: :t: no entry in the cache (evicted, or never stored)" in second.stderr
    assert outputs_of(project) == EXPECTED
    assert cached(ok(project.run())) == {"t"}
    check_store(project)


# --- a run killed in the middle ----------------------------------------------------------------


def test_kill_9_during_a_run_leaves_no_partial_entries(project: Project, marker: str) -> None:
    fast = task("fast", "head -c 300000 /dev/zero > fast.bin && echo fast > fast.txt",
                outputs=["fast.bin", "fast.txt"])
    project.write_manifest(
        fast, task("slow", f"sleep {marker}", deps=["fast"], outputs=["slow.txt"]))
    proc = project.start()
    wait_for(lambda: processes_with(f"sleep {marker}"), "the slow task to start")
    assert (project.root / "fast.txt").read_text() == "fast\n"  # done and recorded
    staging = project.root / ".hitz" / "tmp" / str(proc.pid)
    assert staging.is_dir()  # the dead run's staging folder, for the next run to sweep
    os.kill(proc.pid, signal.SIGKILL)
    killed = project.finish(proc)
    assert killed.returncode == -signal.SIGKILL
    wait_for(lambda: not processes_with(f"sleep {marker}"),
             "the sandbox of the slow task to die with hitz")

    project.write_manifest(
        fast, task("slow", "echo slow > slow.txt", deps=["fast"], outputs=["slow.txt"]))
    rerun = ok(project.run())
    assert cached(rerun) == {"fast"}
    assert ran(rerun) == {"slow"}
    assert project.read("fast.txt") == "fast\n"
    assert (project.root / "fast.bin").read_bytes() == bytes(300000)
    assert project.read("slow.txt") == "slow\n"
    assert not staging.exists()
    check_store(project)


def test_a_dead_writer_s_temp_file_is_swept_by_the_next_run(project: Project) -> None:
    """What SIGKILL during a store write leaves (a temp file nobody holds)."""
    project.write_manifest(task("t", "echo t > t.txt", outputs=["t.txt"]))
    ok(project.run())
    tmp = cache_dir(project) / "store-v1" / "tmp"
    (tmp / "0123456789abcdef.tmp").write_bytes(b"HZB1raw\nhalf a blo")
    assert cached(ok(project.run())) == {"t"}
    check_store(project)


# --- an unusable cache folder ----------------------------------------------------------------


def test_a_cache_path_under_a_regular_file_warns_once_and_runs_uncached(
    project: Project, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    project.write_manifest(task("a", "echo a > a.txt", outputs=["a.txt"]),
                           task("b", "echo b > b.txt", outputs=["b.txt"]))
    env = {"HITZ_CACHE_DIR": str(blocker / "cache")}
    for _ in range(2):
        result = ok(project.run(env=env))
        assert ran(result) == {"a", "b"}
        assert warnings(result) == [
            f"warning: cache folder `{blocker / 'cache'}` is not a folder; "
            "running without the cache"]
    assert project.read("a.txt") == "a\n"
    assert project.read("b.txt") == "b\n"
    assert blocker.read_text() == "not a folder\n"


# The one hitz command, in a private mount namespace: $1 is the folder to
# mount over, $2 the mount, $3 a file to list the folder's files into once
# hitz is done (the mount disappears with the namespace); then the command.
_NAMESPACE_SCRIPT = textwrap.dedent("""\
    set -e
    where=$1 how=$2 listing=$3
    shift 3
    case $how in
        read-only) mount --bind "$where" "$where"; mount -o remount,bind,ro "$where" ;;
        tmpfs=*) mount -t tmpfs -o "size=${how#tmpfs=}" tmpfs "$where" ;;
    esac
    set +e
    "$@"
    status=$?
    (cd "$where" && find . -type f | sort) > "$listing"
    exit $status
""")


def run_in_namespace(project: Project, where: Path, how: str, *args: str) -> tuple[
        Completed, list[str]]:
    """``hitz run --json ARGS`` with ``where`` mounted as ``how`` for it alone;
    the run's result and the files that were in ``where`` at its end."""
    assert shutil.which("unshare"), "util-linux `unshare` is needed for this test"
    listing = project.root.parent / "listing.txt"
    env = dict(os.environ, NO_COLOR="1", HITZ_CACHE_DIR=str(where / "cache"))
    command = [*HITZ, "run", "--config", "hitz.toml", "--json", *args]
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _NAMESPACE_SCRIPT,
         "sh", str(where), how, str(listing), *command],
        cwd=project.root, env=env, capture_output=True, text=True, timeout=COMMAND_GUARD_S,
        check=False)
    result = Completed(["run", *args], proc.returncode, proc.stdout, proc.stderr)
    assert listing.exists(), f"the namespace script failed:\n{result}"
    return result, listing.read_text().splitlines()


def test_a_read_only_cache_folder_warns_once_and_runs_uncached(
    project: Project, tmp_path: Path
) -> None:
    where = tmp_path / "cache-mount"
    where.mkdir()
    project.write_manifest(task("a", "echo a > a.txt", outputs=["a.txt"]),
                           task("b", "echo b > b.txt", outputs=["b.txt"]))
    ok(project.run(env={"HITZ_CACHE_DIR": str(where / "cache")}))  # fill it first
    before = sorted(p.relative_to(where).as_posix() for p in where.rglob("*"))
    (project.root / "a.txt").unlink()

    result, _ = run_in_namespace(project, where, "read-only")
    ok(result)
    assert ran(result) == {"a", "b"}
    assert warnings(result) == [
        f"warning: cache folder `{where / 'cache'}` is not writable: Read-only file system; "
        "running without the cache"]
    assert project.read("a.txt") == "a\n"
    assert sorted(p.relative_to(where).as_posix() for p in where.rglob("*")) == before


def test_a_full_cache_folder_warns_once_and_the_outputs_are_still_right(
    project: Project, tmp_path: Path
) -> None:
    where = tmp_path / "cache-mount"
    where.mkdir()
    data = {name: os.urandom(MIB) for name in ("one.bin", "two.bin")}  # incompressible
    for name, content in data.items():
        (project.root / name).write_bytes(content)
    project.write_manifest(
        task("one", "cp one.bin out/one.bin", inputs=["one.bin"], outputs=["out/one.bin"]),
        task("two", "cp two.bin out/two.bin", inputs=["two.bin"], outputs=["out/two.bin"]),
    )
    result, files = run_in_namespace(project, where, "tmpfs=64k")
    ok(result)
    assert ran(result) == {"one", "two"}
    assert warnings(result) == [
        f"warning: cache folder `{where / 'cache'}` is full: No space left on device; "
        "running without the cache"]
    for name, content in data.items():
        assert (project.root / "out" / name).read_bytes() == content
    assert [f for f in files if "/tmp/" in f] == []  # no partial blob left behind
    assert [f for f in files if "/ac/" in f] == []  # and no result naming a missing blob
