"""The task cache end to end: the real CLI, the real sandbox, a real store.

What is served from the cache and what runs; that restored outputs are the
bytes and modes the task made; that tasks which must not be cached never are;
the reasons `hitz run --explain` and `hitz explain` give; `hitz cache stats`
and `gc`; `--no-cache`; and two checkouts sharing one cache.

Each project has a cache of its own (``HITZ_CACHE_DIR``, set by
``tests.helpers``). To prove that a task did not run, tasks here write a fresh
random UUID (``/proc/sys/kernel/random/uuid``) into their output or log: a
cached result brings back the old one, a run makes a new one.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Completed, Project, task

pytestmark = pytest.mark.kernel

UUID = "cat /proc/sys/kernel/random/uuid"


# --- helpers ------------------------------------------------------------------------


def ok(result: Completed) -> Completed:
    assert result.returncode == 0, str(result)
    return result


def tasks(result: Completed) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in result.json()["tasks"]}


def ran(result: Completed) -> set[str]:
    """The tasks that ran in a sandbox (rather than coming from the cache)."""
    return {name for name, entry in tasks(result).items() if not entry["cached"]}


def cached(result: Completed) -> set[str]:
    """The tasks that did not run: their result came from the cache."""
    return {name for name, entry in tasks(result).items() if entry["cached"]}


def explain_lines(result: Completed) -> list[str]:
    return sorted(line for line in result.stderr.splitlines() if line.startswith("explain: "))


def cache_dir(project: Project) -> Path:
    """The project's own cache folder, as ``tests.helpers`` sets HITZ_CACHE_DIR."""
    return project.root.parent / f"{project.root.name}.hitz-cache"


def store_entries(project: Project) -> list[Path]:
    root = cache_dir(project) / "store-v1"
    return sorted(p for sub in ("ac", "cas") for p in (root / sub).rglob("*") if p.is_file())


def files_of(project: Project, *rels: str) -> dict[str, tuple[str, int, bytes | str]]:
    """Every file, folder and symlink under ``rels``: kind, permission bits (files
    only: REAPI keeps no folder modes) and content or target."""
    found: dict[str, tuple[str, int, bytes | str]] = {}
    for rel in rels:
        top = project.root / rel
        paths = [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]
        for path in paths:
            key = path.relative_to(project.root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[key] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[key] = ("folder", 0, "")
            else:
                found[key] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


def remove(project: Project, *rels: str) -> None:
    for rel in rels:
        path = project.root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def with_cache(table: str, value: bool) -> str:
    return table + f"cache = {'true' if value else 'false'}\n"


GEN = task("gen", f"mkdir -p gen/sub && {UUID} > gen/sub/id.txt && cp VERSION gen/version.txt",
           inputs=["VERSION"], outputs=["gen/"])
USE = task("use", f"cat gen/version.txt > out/use.txt && {UUID} >> out/use.txt",
           inputs=[":gen"], outputs=["out/use.txt"])


@pytest.fixture
def chain(project: Project) -> Project:
    """:gen (a directory output) -> :use (a file output), both never the same twice."""
    project.write("VERSION", "1.0\n")
    project.write_manifest(GEN, USE)
    return project


# --- hits ---------------------------------------------------------------------------------


def test_a_second_run_of_an_unchanged_project_is_all_cached(chain: Project) -> None:
    first = ok(chain.run())
    assert ran(first) == {"gen", "use"}
    outputs = files_of(chain, "gen", "out")
    second = ok(chain.run())
    assert cached(second) == {"gen", "use"}
    for name in ("gen", "use"):
        assert tasks(second)[name]["action_digest"] == tasks(first)[name]["action_digest"]
    assert files_of(chain, "gen", "out") == outputs


def test_deleted_outputs_are_restored_from_the_cache_without_running_the_task(
    project: Project,
) -> None:
    project.write_manifest(task("t", f"{UUID} > out/id.txt && {UUID}", outputs=["out/id.txt"]))
    ok(project.run())
    made = project.read("out/id.txt")
    log = project.root / ".hitz/logs/t.stdout"
    logged = log.read_text()
    shutil.rmtree(project.root / "out")
    again = ok(project.run())
    assert cached(again) == {"t"}
    assert tasks(again)["t"]["status"] == "cached"
    assert project.read("out/id.txt") == made  # a run would have made a new UUID
    assert log.read_text() == logged  # and written a new log


def test_a_changed_input_reruns_exactly_the_tasks_that_depend_on_it(project: Project) -> None:
    project.write("a.txt", "a1\n")
    project.write("b.txt", "b1\n")
    project.write_manifest(
        task("a", "cp a.txt out/a.txt", inputs=["a.txt"], outputs=["out/a.txt"]),
        task("b", "cp b.txt out/b.txt", inputs=["b.txt"], outputs=["out/b.txt"]),
        task("c", "cp out/a.txt out/c.txt", inputs=[":a"], outputs=["out/c.txt"]),
        task("d", "cp out/b.txt out/d.txt", inputs=[":b"], outputs=["out/d.txt"]),
        task("e", "cat out/c.txt out/d.txt > out/e.txt", inputs=[":c", ":d"],
             outputs=["out/e.txt"]),
    )
    ok(project.run())
    project.write("a.txt", "a2\n")
    result = ok(project.run("--explain"))
    assert ran(result) == {"a", "c", "e"}
    assert cached(result) == {"b", "d"}
    assert project.read("out/e.txt") == "a2\nb1\n"
    assert explain_lines(result) == [
        "explain: :a: input a.txt changed",
        "explain: :c: input out/a.txt changed",
        "explain: :e: input out/c.txt changed",
    ]


def test_an_input_changed_and_changed_back_is_a_hit_again(project: Project) -> None:
    project.write("in.txt", "one\n")
    project.write_manifest(task("t", f"cp in.txt out.txt && {UUID}", inputs=["in.txt"],
                                outputs=["out.txt"]))
    ok(project.run())
    project.write("in.txt", "two\n")
    assert ran(ok(project.run())) == {"t"}
    project.write("in.txt", "one\n")
    assert cached(ok(project.run())) == {"t"}
    assert project.read("out.txt") == "one\n"


# --- what is never cached ---------------------------------------------------------------


def test_a_task_with_cache_false_is_never_cached(project: Project) -> None:
    project.write_manifest(with_cache(task("t", f"{UUID} > id.txt", outputs=["id.txt"]), False))
    ok(project.run())
    first = project.read("id.txt")
    again = ok(project.run("--explain"))
    assert ran(again) == {"t"}
    assert project.read("id.txt") != first
    assert explain_lines(again) == ["explain: :t: caching is off for this task"]
    assert store_entries(project) == []
    assert ok(project.hitz("explain", "t")).stdout.splitlines()[1:] == [
        ":t: runs: caching is off for this task"]


def test_a_host_network_task_is_cached_only_if_it_says_cache_true(project: Project) -> None:
    project.write_manifest(
        task("net", f"{UUID} > net.txt", outputs=["net.txt"], network="host"),
        with_cache(task("net_cached", f"{UUID} > cached.txt", outputs=["cached.txt"],
                        network="host"), True),
    )
    ok(project.run())
    kept = project.read("cached.txt")
    again = ok(project.run("--explain"))
    assert ran(again) == {"net"}
    assert cached(again) == {"net_cached"}
    assert project.read("cached.txt") == kept
    assert explain_lines(again) == [
        'explain: :net: network = "host" tasks are not cached unless cache = true']


def test_hitz_explain_gives_run_explain_s_reason_for_a_host_network_task(
    project: Project,
) -> None:
    """The reason is decided in one place (STYLE 12); `hitz explain` must not
    say "caching is off" for a task that never turned it off."""
    project.write_manifest(task("net", "true", network="host"))
    result = ok(project.hitz("explain", "net"))
    assert result.stdout.splitlines()[1:] == [
        ':net: runs: network = "host" tasks are not cached unless cache = true']


def test_a_failed_task_is_never_cached(project: Project) -> None:
    project.write("flag", "bad\n")
    project.write_manifest(task(
        "t", f'{UUID} >&2; test "$(cat flag)" = ok && cp flag out.txt',
        inputs=["flag"], outputs=["out.txt"]))

    def stderr_log() -> str:
        return (project.root / ".hitz/logs/t.stderr").read_text()

    first = project.run()
    assert (first.returncode, tasks(first)["t"]["status"]) == (1, "failed"), str(first)
    failed_id = stderr_log()
    second = project.run()
    assert (second.returncode, tasks(second)["t"]["status"]) == (1, "failed"), str(second)
    assert stderr_log() != failed_id  # it ran again
    assert store_entries(project) == []  # not even its inputs' blobs
    assert ok(project.hitz("explain", "t")).stdout.splitlines()[1] == (
        ":t: runs: no entry in the cache (evicted, or never stored)")

    project.write("flag", "ok\n")
    assert ran(ok(project.run())) == {"t"}
    assert cached(ok(project.run())) == {"t"}
    project.write("flag", "bad\n")  # the failing key again: still not in the cache
    third = project.run()
    assert (third.returncode, tasks(third)["t"]["status"]) == (1, "failed"), str(third)


def test_a_timed_out_task_is_never_cached(project: Project) -> None:
    project.write_manifest(task("t", "exec sleep 30", timeout="300ms"))
    for _ in range(2):
        result = project.run()
        assert (result.returncode, tasks(result)["t"]["status"]) == (1, "timed-out"), str(result)
    assert store_entries(project) == []


# --- what a hit restores --------------------------------------------------------------------


def test_directory_and_executable_outputs_round_trip_through_the_cache(project: Project) -> None:
    project.write_manifest(task(
        "t",
        "mkdir -p gen/sub/deeper gen/empty bin"
        " && printf '#!/bin/sh\\necho tool\\n' > bin/tool && chmod 755 bin/tool"
        " && ln -s tool bin/alias"
        " && printf 'data\\n' > gen/sub/deeper/data.txt"
        " && printf '#!/bin/sh\\n' > gen/run.sh && chmod +x gen/run.sh"
        " && ln -s sub/deeper/data.txt gen/link && : > gen/sub/empty-file"
        " && head -c 100000 /dev/zero > gen/big.bin",  # compressible: stored as zstd
        outputs=["gen/", "bin/tool", "bin/alias"]))
    ok(project.run())
    made = files_of(project, "gen", "bin")
    assert made["bin/tool"][1] == 0o755
    assert made["gen/run.sh"][1] == 0o755
    assert made["gen/sub/deeper/data.txt"][1] == 0o644
    assert made["bin/alias"] == ("symlink", 0, "tool")
    remove(project, "gen", "bin/tool", "bin/alias")
    assert cached(ok(project.run())) == {"t"}
    assert files_of(project, "gen", "bin") == made


def test_a_directory_output_is_restored_where_its_parent_folder_is_gone(
    project: Project,
) -> None:
    # A fresh checkout sharing the cache has no build/ folder at all.
    project.write_manifest(task("t", "mkdir -p build/obj/lib && echo o > build/obj/lib/a.o",
                                outputs=["build/obj/lib/"]))
    ok(project.run())
    remove(project, "build")
    assert cached(ok(project.run())) == {"t"}
    assert (project.root / "build/obj/lib/a.o").read_text() == "o\n"


def test_a_restored_output_replaces_what_the_user_left_there(project: Project) -> None:
    project.write_manifest(task("t", "mkdir -p gen && echo ok > gen/a && echo ok > f.txt",
                                outputs=["gen/", "f.txt"]))
    ok(project.run())
    made = files_of(project, "gen", "f.txt")
    project.write("f.txt", "edited\n")
    project.write("gen/a", "edited\n")
    project.write("gen/stray", "stray\n")
    (project.root / "f.txt").chmod(0o755)
    assert cached(ok(project.run())) == {"t"}
    assert files_of(project, "gen", "f.txt") == made


@pytest.mark.parametrize("output", ["out/x.txt", "out/gen/"])
def test_a_cache_hit_never_writes_through_a_symlink_out_of_the_project(
    project: Project, tmp_path: Path, output: str
) -> None:
    """A run refuses to put an output where a symlinked folder would carry it
    out of the project; restoring the same output from the cache must too."""
    make = "mkdir -p out/gen && echo g > out/gen/g" if output.endswith("/") \
        else "echo x > out/x.txt"
    project.write_manifest(task("t", make, outputs=[output]))
    ok(project.run())
    shutil.rmtree(project.root / "out")
    outside = tmp_path / "outside"
    outside.mkdir()
    (project.root / "out").symlink_to(outside)

    uncached = project.run("--no-cache")
    assert uncached.returncode == 1, str(uncached)
    assert "outside the project" in tasks(uncached)["t"]["message"]
    assert list(outside.iterdir()) == []

    hit = project.run()
    assert list(outside.iterdir()) == []
    assert hit.returncode == 1, str(hit)
    assert "outside the project" in tasks(hit)["t"]["message"]


@pytest.mark.parametrize("output", ["f.txt", "gen/"])
def test_a_cached_run_leaves_outputs_already_in_place_untouched(
    project: Project, output: str
) -> None:
    """A no-op run must not rewrite what is already right: same inode, same
    mtime, for a file output and for the files of a directory output."""
    make = "mkdir -p gen/sub && echo a > gen/a && echo b > gen/sub/b" if output == "gen/" \
        else "echo f > f.txt"
    project.write_manifest(task("t", make, outputs=[output]))
    ok(project.run())
    rel = output.rstrip("/")
    paths = [p for p in [project.root / rel, *(project.root / rel).rglob("*")] if p.is_file()]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}
    assert cached(ok(project.run())) == {"t"}
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths} == before


# --- explanations ------------------------------------------------------------------------


def test_run_explain_says_why_each_task_runs(project: Project) -> None:
    project.write("src/x", "1\n")
    tables = {
        "inputs": task("inputs", "cat src/* > inputs.txt", inputs=["src/*"],
                       outputs=["inputs.txt"]),
        "env": task("env", 'echo "$FOO" > env.txt', outputs=["env.txt"], env={"FOO": "1"}),
        "cmd": task("cmd", "echo 1 > cmd.txt", outputs=["cmd.txt"]),
        "time": task("time", "echo 1 > time.txt", outputs=["time.txt"], timeout="1m"),
    }
    project.write_manifest(*tables.values())
    first = ok(project.run("--explain"))
    assert explain_lines(first) == [f"explain: :{name}: no earlier run recorded"
                                    for name in sorted(tables)]

    project.write("src/x", "2\n")
    tables["env"] = task("env", 'echo "$FOO" > env.txt', outputs=["env.txt"], env={"FOO": "2"})
    tables["cmd"] = task("cmd", "echo 2 > cmd.txt", outputs=["cmd.txt"])
    tables["time"] = task("time", "echo 1 > time.txt", outputs=["time.txt"], timeout="2m")
    project.write_manifest(*tables.values())
    changed = ok(project.run("--explain"))
    assert explain_lines(changed) == [
        "explain: :cmd: command changed",
        "explain: :env: env FOO changed",
        "explain: :inputs: input src/x changed",
        "explain: :time: timeout changed",
    ]
    assert "explain:" not in ok(project.run("--explain")).stderr  # all cached: nothing to say

    project.write("src/y", "new\n")
    assert explain_lines(ok(project.run("--explain"))) == [
        "explain: :inputs: input src/y added"]
    (project.root / "src/x").unlink()
    assert explain_lines(ok(project.run("--explain"))) == [
        "explain: :inputs: input src/x removed"]


def test_run_explain_names_an_input_whose_executable_bit_changed(project: Project) -> None:
    """The executable bit is part of the key, so a change to it must be
    explained as a change of that input, not blamed on something else."""
    project.write("tools/run.sh", "#!/bin/sh\necho ran > out.txt\n").chmod(0o644)
    project.write_manifest(task("t", "sh tools/run.sh", inputs=["tools/run.sh"],
                                outputs=["out.txt"]))
    ok(project.run())
    (project.root / "tools/run.sh").chmod(0o755)
    result = ok(project.run("--explain"))
    assert ran(result) == {"t"}
    assert explain_lines(result) == ["explain: :t: input tools/run.sh changed"]


def test_hitz_explain_says_whether_a_task_is_in_the_cache(project: Project) -> None:
    project.write("src/x", "1\n")
    project.write_manifest(task("t", "cp src/x out.txt", inputs=["src/x"], outputs=["out.txt"]))
    digest = tasks(ok(project.run()))["t"]["action_digest"]
    assert ok(project.hitz("explain", ":t")).stdout.splitlines() == [
        f":t: action {digest}",
        ":t: in the cache; `hitz run` restores its outputs without running it",
    ]
    project.write("src/x", "2\n")
    explained = ok(project.hitz("explain", "t")).stdout.splitlines()
    assert explained[0] != f":t: action {digest}"
    assert explained[1:] == [":t: runs: input src/x changed"]
    result = ok(project.run("--explain"))  # `hitz explain` changed nothing
    assert explain_lines(result) == ["explain: :t: input src/x changed"]
    assert explained[0] == f":t: action {tasks(result)['t']['action_digest']}"


# --- cache commands -------------------------------------------------------------------------


def test_cache_stats_prints_entries_and_the_last_run_s_hits(chain: Project) -> None:
    ok(chain.run())
    first = ok(chain.hitz("cache", "stats"))
    assert first.stdout.splitlines()[3] == "last run: 0 hits, 2 misses (hit rate 0%)"
    remove(chain, "gen", "out")  # so that both are looked up, whatever else could skip them
    ok(chain.run())
    lines = ok(chain.hitz("cache", "stats")).stdout.splitlines()
    entries = store_entries(chain)
    assert lines[0] == f"cache: {cache_dir(chain)}"
    assert lines[1] == f"entries: {len(entries)}"
    size = int(lines[2].removeprefix("size: ").removesuffix(" bytes"))
    assert size >= sum(p.stat().st_size for p in entries)
    assert lines[3] == "last run: 2 hits, 0 misses (hit rate 100%)"
    assert len(lines) == 4


def test_hitz_explain_does_not_replace_the_last_run_s_counters(chain: Project) -> None:
    ok(chain.run())
    remove(chain, "gen", "out")
    ok(chain.run())
    ok(chain.hitz("explain", "use"))  # one lookup, not a run
    lines = ok(chain.hitz("cache", "stats")).stdout.splitlines()
    assert lines[3] == "last run: 2 hits, 0 misses (hit rate 100%)"


def test_cache_gc_evicts_and_the_next_run_reruns(chain: Project) -> None:
    ok(chain.run())
    outputs = files_of(chain, "gen", "out")
    entries = store_entries(chain)
    assert entries
    gc = ok(chain.hitz("cache", "gc", "--max-size", "1"))
    assert gc.stdout.startswith(f"evicted {len(entries)} entries (")
    assert gc.stdout.endswith("; 0 entries, 0 bytes left\n")
    assert store_entries(chain) == []
    assert ok(chain.hitz("cache", "stats")).stdout.splitlines()[1] == "entries: 0"
    remove(chain, "gen", "out")  # nothing left to restore them from

    rerun = ok(chain.run("--explain"))
    assert ran(rerun) == {"gen", "use"}
    assert files_of(chain, "gen", "out") != outputs  # new UUIDs: they really ran
    assert explain_lines(rerun)[0] == (
        "explain: :gen: no entry in the cache (evicted, or never stored)")
    assert cached(ok(chain.run())) == {"gen", "use"}


def test_no_cache_runs_everything_and_stores_nothing(chain: Project) -> None:
    first = ok(chain.run("--no-cache"))
    assert ran(first) == {"gen", "use"}
    assert not cache_dir(chain).exists()
    assert ran(ok(chain.run())) == {"gen", "use"}  # nothing was stored by --no-cache
    outputs = files_of(chain, "gen", "out")
    entries = store_entries(chain)
    warm = ok(chain.run("--no-cache"))
    assert ran(warm) == {"gen", "use"}  # a warm cache is not read either
    assert files_of(chain, "gen", "out") != outputs
    assert store_entries(chain) == entries


def test_a_second_checkout_sharing_the_cache_gets_all_hits(chain: Project, tmp_path: Path) -> None:
    first = ok(chain.run())
    other = Project(tmp_path / "elsewhere" / "checkout-2")
    other.root.mkdir(parents=True)
    for rel in ("hitz.toml", "VERSION"):
        shutil.copy2(chain.root / rel, other.root / rel)
    shared = {"HITZ_CACHE_DIR": str(cache_dir(chain))}
    second = ok(other.run(env=shared))
    assert cached(second) == {"gen", "use"}
    for name in ("gen", "use"):
        assert tasks(second)[name]["action_digest"] == tasks(first)[name]["action_digest"]
    assert files_of(other, "gen", "out") == files_of(chain, "gen", "out")
