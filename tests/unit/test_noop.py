"""The no-op fast path (``executor/uptodate.py``), on real files and a real store.

A task is "up to date" when its fingerprint and every output's stamp match
what the last run recorded: then nothing is built, read or written, and the
store is not even opened. These tests pin the other half: whatever could make
the outputs wrong (an output edited, chmod-ed, deleted, a file added to a
directory output; an input or the task's definition changed; a dependency
that produced something else; a run killed before it saved; a record that is
damaged or from another hitz) must send the task down the full path, which
then restores or runs it.

The runs are driven here, without the scheduler and the namespace sandbox:
``Checkout.run`` plans the manifest, calls ``Runner.prepare`` and
``Runner.finish`` in order, and runs each task's shell command in a scratch
folder holding copies of its inputs (``run_spec``). Each run says what
happened to each task: "ran", "restored" (the store was asked) or "up to
date" (it was not).

Outputs written by a run are recorded only once they are ``RACY_S`` old (a
change within the filesystem's timestamp tick would not show in a stamp).
``run(settled=True)``, the default, moves the record's clock on by that much
and then waits for the filesystem's clock to tick, as if the next command
came a little later; ``settled=False`` is a run that ends right away.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hitz.executor import planner
from hitz.executor.events import Outcome, RunSummary, TaskResult
from hitz.executor.history import History
from hitz.executor.manifest import load
from hitz.executor.model import TaskDef
from hitz.executor.progress import LiveProgress, PlainProgress
from hitz.executor.runner import Runner, state_dir_for
from hitz.executor.statcache import RACY_NS
from hitz.executor.store import Store
from hitz.executor.uptodate import RECORD_FILE, fingerprint
from hitz.sandbox.spec import CollectedOutput, SandboxResult, SandboxSpec, Status
from tests.helpers import manifest, task

UP_TO_DATE, RESTORED, RAN = "up to date", "restored", "ran"


def run_spec(spec: SandboxSpec, scratch: Path) -> SandboxResult:
    """Run ``spec`` roughly as the sandbox would: its command in a folder
    holding copies of its inputs; its outputs moved into the staging folder."""
    work = scratch / spec.task
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for mount in spec.inputs:
        dest = work / mount.target
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(mount.source):
            shutil.copytree(mount.source, dest, symlinks=True)
        else:
            shutil.copy2(mount.source, dest)
    for out in spec.outputs:
        (work / out.rstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(spec.argv, cwd=work, env=dict(spec.env), capture_output=True,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()
    collected = []
    for out in spec.outputs:
        rel = out.rstrip("/")
        staged = Path(spec.staging_dir) / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        os.rename(work / rel, staged)
        collected.append(CollectedOutput(out, str(staged)))
    return SandboxResult(spec.task, Status.SUCCEEDED, 0, 0.01, outputs=tuple(collected))


class Checkout:
    """A project folder with its own cache folder, run through ``Runner``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root.parent / "cache"
        self.scratch = root.parent / "scratch"
        self.store_opened = False
        self.results: dict[str, TaskResult] = {}
        root.mkdir(parents=True)

    def write(self, rel: str, text: str, mode: int = 0o644) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def manifest(self, *tables: str) -> None:
        self.write("hitz.toml", manifest(*tables))

    def run(self, *targets: str, settled: bool = True, no_cache: bool = False,
            killed: bool = False, explained: list[str] | None = None) -> dict[str, str]:
        """Run ``targets`` (default: all); what happened to each task.

        ``killed``: stop like ``kill -9`` would after the last task, before
        anything is saved. ``explained`` collects ``--explain``'s lines."""
        loaded = load(self.root / "hitz.toml")
        plan = planner.plan(loaded, targets)
        store: list[Store] = []
        self.store_opened = False

        def open_store() -> Store:
            self.store_opened = True
            store.append(Store(self.cache))
            return store[0]

        def hits() -> int:
            return store[0].counters.ac_hits if store else 0

        clock: Callable[[], int] = time.time_ns
        if settled:
            def clock() -> int:
                return time.time_ns() + RACY_NS + 10**9

        def explain(name: str, reasons: list[str]) -> None:
            assert explained is not None
            explained.append(f":{name}: {'; '.join(reasons)}")

        runner = Runner(loaded, state_dir_for(loaded), None if no_cache else open_store,
                        now=clock, explain=None if explained is None else explain)
        runner.preflight([plan.tasks[name] for name in plan.order])
        happened = {}
        for name in plan.order:
            definition = plan.tasks[name]
            before = hits()
            prepared = runner.prepare(definition)
            if isinstance(prepared, TaskResult):
                happened[name] = RESTORED if hits() > before else UP_TO_DATE
                result = prepared
            else:
                result = runner.finish(definition, run_spec(prepared, self.scratch))
                happened[name] = RAN
            assert result.outcome is Outcome.SUCCEEDED, result
            self.results[name] = result
        if killed:
            return happened
        runner.cleanup()
        if store:
            store[0].close()
        if settled:
            self.tick()
        return happened

    def tick(self) -> None:
        """Wait until the filesystem's clock is past every file of the project."""
        newest = max(max(st.st_mtime_ns, st.st_ctime_ns) for st in (
            p.lstat() for p in self.root.rglob("*")))
        probe = self.root.parent / "probe"
        while True:
            probe.write_text("")
            if probe.stat().st_ctime_ns > newest:
                return
            time.sleep(0.001)

    def record(self) -> dict[str, object]:
        data = json.loads((self.root / ".hitz" / RECORD_FILE).read_bytes())
        assert isinstance(data, dict)
        return data

    def identity(self, *rels: str) -> dict[str, tuple[int, int]]:
        """Inode and mtime of files: what a rewrite would change."""
        return {rel: ((st := (self.root / rel).lstat()).st_ino, st.st_mtime_ns) for rel in rels}


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path / "proj")


COPY = task("copy", "cp in.txt out/copy.txt", inputs=["in.txt"], outputs=["out/copy.txt"])
TREE = task("tree", "mkdir -p gen/sub && cp in.txt gen/a.txt && cp in.txt gen/sub/b.txt"
            " && ln -s a.txt gen/link", inputs=["in.txt"], outputs=["gen/"])


@pytest.fixture
def built(checkout: Checkout) -> Checkout:
    """A project with a file output and a directory output, built and recorded."""
    checkout.write("in.txt", "one\n")
    checkout.manifest(COPY, TREE)
    assert checkout.run() == {"copy": RAN, "tree": RAN}
    return checkout


# --- up to date ------------------------------------------------------------------------


def test_an_unchanged_project_is_up_to_date_without_opening_the_store(built: Checkout) -> None:
    before = built.identity("out/copy.txt", "gen/a.txt", "gen/sub/b.txt", "gen/link")
    assert built.run() == {"copy": UP_TO_DATE, "tree": UP_TO_DATE}
    assert built.store_opened is False
    assert built.identity("out/copy.txt", "gen/a.txt", "gen/sub/b.txt", "gen/link") == before
    assert built.run() == {"copy": UP_TO_DATE, "tree": UP_TO_DATE}  # and it stays so


def test_an_up_to_date_task_reports_a_cache_hit_with_its_action_digest(built: Checkout) -> None:
    ran = built.results["copy"]
    built.run()
    result = built.results["copy"]
    assert (result.outcome, result.status, result.cached) == (Outcome.SUCCEEDED, "cached", True)
    assert result.action_digest == ran.action_digest is not None


def test_the_record_is_json(built: Checkout) -> None:
    record = built.record()
    assert sorted(record) == ["format", "header", "tasks"]
    assert sorted(record["tasks"]) == ["copy", "tree"]  # type: ignore[arg-type]


def test_explain_says_nothing_of_an_up_to_date_task_and_why_one_runs(built: Checkout) -> None:
    explained: list[str] = []
    built.run(explained=explained)
    assert explained == []
    built.write("in.txt", "two\n")
    built.run(explained=explained)
    assert explained == [":copy: input in.txt changed", ":tree: input in.txt changed"]


NO_OP = """
import sys
from pathlib import Path
from hitz.executor import planner
from hitz.executor.events import TaskResult
from hitz.executor.manifest import load
from hitz.executor.runner import Runner, state_dir_for

def refuse_the_store():
    raise AssertionError("a no-op run opened the store")

loaded = load(sys.argv[1], cache_dir=Path(sys.argv[2]))
plan = planner.plan(loaded)
runner = Runner(loaded, state_dir_for(loaded), refuse_the_store)
runner.preflight([plan.tasks[name] for name in plan.order])
for name in plan.order:
    assert isinstance(runner.prepare(plan.tasks[name]), TaskResult), name
runner.cleanup()
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in
                      ("pydantic", "grpc", "google", "zstandard") or "_pb2" in m)))
"""


def test_an_up_to_date_run_imports_neither_protobuf_grpc_nor_pydantic(built: Checkout) -> None:
    """The manifest comes from its validated cache, every task is up to date:
    what a no-op run loads must stay small (pydantic, protobuf and grpc
    alone cost ~0.2 s to import)."""
    hitz_toml, state = built.root / "hitz.toml", built.root / ".hitz"
    load(hitz_toml, cache_dir=state)  # validate once, as the first `hitz run` did
    done = subprocess.run([sys.executable, "-c", NO_OP, str(hitz_toml), str(state)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_hitz_version_imports_neither_protobuf_grpc_nor_pydantic() -> None:
    script = ("import sys\nfrom hitz.executor import cli\ntry:\n    cli.main(['--version'])\n"
              "except SystemExit:\n    pass\nprint(' '.join(m for m in sys.modules if "
              "m.split('.')[0] in ('pydantic', 'grpc', 'google', 'zstandard')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hitz", "0.1.0"]


# --- what is never up to date ------------------------------------------------------------


@pytest.mark.parametrize("edit", ["same size", "other size", "mtime put back"])
def test_an_output_edited_by_the_user_is_not_up_to_date(built: Checkout, edit: str) -> None:
    path = built.root / "out/copy.txt"
    st = path.stat()
    path.write_text({"same size": "two\n", "other size": "three\n",
                     "mtime put back": "two\n"}[edit])
    if edit == "mtime put back":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert built.run() == {"copy": RESTORED, "tree": UP_TO_DATE}
    assert built.read("out/copy.txt") == "one\n"


def test_an_output_replaced_by_another_file_is_not_up_to_date(built: Checkout) -> None:
    built.write("out/other.txt", "one\n")
    os.replace(built.root / "out/other.txt", built.root / "out/copy.txt")  # same content
    assert built.run()["copy"] == RESTORED


def test_a_deleted_output_is_not_up_to_date(built: Checkout) -> None:
    (built.root / "out/copy.txt").unlink()
    shutil.rmtree(built.root / "gen")
    assert built.run() == {"copy": RESTORED, "tree": RESTORED}
    assert built.read("out/copy.txt") == built.read("gen/sub/b.txt") == "one\n"


def test_an_output_whose_mode_changed_is_not_up_to_date(built: Checkout) -> None:
    (built.root / "out/copy.txt").chmod(0o755)
    assert built.run()["copy"] == RESTORED
    assert (built.root / "out/copy.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("change", ["file added", "file removed", "folder added",
                                    "file renamed", "symlink retargeted", "deep file edited"])
def test_a_changed_directory_output_is_not_up_to_date(built: Checkout, change: str) -> None:
    gen = built.root / "gen"
    if change == "file added":
        (gen / "sub/stray.txt").write_text("")
    elif change == "file removed":
        (gen / "sub/b.txt").unlink()
    elif change == "folder added":
        (gen / "sub/new").mkdir()
    elif change == "file renamed":
        (gen / "sub/b.txt").rename(gen / "sub/c.txt")
    elif change == "symlink retargeted":
        (gen / "link").unlink()
        (gen / "link").symlink_to("sub/b.txt")
    else:
        (gen / "sub/b.txt").write_text("eno\n")
    assert built.run() == {"copy": UP_TO_DATE, "tree": RESTORED}
    assert sorted(str(p.relative_to(gen)) for p in gen.rglob("*")) == [
        "a.txt", "link", "sub", "sub/b.txt"]
    assert os.readlink(gen / "link") == "a.txt"
    assert (gen / "sub/b.txt").read_text() == "one\n"


def test_a_changed_input_is_not_up_to_date(built: Checkout) -> None:
    built.write("in.txt", "two\n")
    assert built.run() == {"copy": RAN, "tree": RAN}
    assert built.read("out/copy.txt") == "two\n"
    assert built.run() == {"copy": UP_TO_DATE, "tree": UP_TO_DATE}
    (built.root / "in.txt").chmod(0o755)  # the executable bit is part of an input
    assert built.run() == {"copy": RAN, "tree": RAN}


def test_an_input_added_to_a_glob_is_not_up_to_date(checkout: Checkout) -> None:
    checkout.write("src/a.c", "a\n")
    checkout.manifest(task("cat", "cat src/*.c > all.txt", inputs=["src/*.c"],
                           outputs=["all.txt"]))
    checkout.run()
    checkout.write("src/b.c", "b\n")
    assert checkout.run() == {"cat": RAN}
    assert checkout.read("all.txt") == "a\nb\n"


CHANGED_DEFINITIONS = {
    "command": task("copy", "cp in.txt out/copy.txt && echo >> out/copy.txt",
                    inputs=["in.txt"], outputs=["out/copy.txt"]),
    "env": task("copy", "cp in.txt out/copy.txt", inputs=["in.txt"], outputs=["out/copy.txt"],
                env={"LANG": "C"}),
    "timeout": task("copy", "cp in.txt out/copy.txt", inputs=["in.txt"],
                    outputs=["out/copy.txt"], timeout="5m"),
    "outputs": task("copy", "cp in.txt out/copy.txt && touch out/more.txt", inputs=["in.txt"],
                    outputs=["out/copy.txt", "out/more.txt"]),
    "inputs": task("copy", "cp in.txt out/copy.txt", inputs=["in.txt", "extra.txt"],
                   outputs=["out/copy.txt"]),
}


@pytest.mark.parametrize("what", sorted(CHANGED_DEFINITIONS))
def test_a_task_changed_in_the_manifest_is_not_up_to_date(built: Checkout, what: str) -> None:
    built.write("extra.txt", "")
    built.manifest(CHANGED_DEFINITIONS[what], TREE)
    assert built.run() == {"copy": RAN, "tree": UP_TO_DATE}


class Other:
    """A value unlike any a field holds; prints as its field's name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Other({self.name})"


def test_every_field_of_a_task_is_in_its_fingerprint_but_those_outside_its_action() -> None:
    """A field added to TaskDef is fingerprinted until someone decides it
    cannot change the Action (and adds it here, for review)."""
    base = TaskDef("t", ("true",), env={"A": "1"})
    files = [("in.txt", "0" * 64, 3, False)]
    outside = {"name", "line", "description", "deps", "cache", "backend", "shell"}
    moved = set()
    for name in TaskDef.__match_args__:
        value: object = {"A": "2"} if name == "env" else Other(name)
        if fingerprint(dataclasses.replace(base, **{name: value}), files) != \
                fingerprint(base, files):
            moved.add(name)
    assert moved == set(TaskDef.__match_args__) - outside
    assert fingerprint(base, [("in.txt", "1" * 64, 3, False)]) != fingerprint(base, files)
    assert fingerprint(base, [("in.txt", "0" * 64, 3, True)]) != fingerprint(base, files)
    reordered = dataclasses.replace(base, env={"B": "2", "A": "1"})
    assert fingerprint(reordered, files) == fingerprint(
        dataclasses.replace(base, env={"A": "1", "B": "2"}), files)


def test_an_edit_of_the_manifest_elsewhere_keeps_a_task_up_to_date(built: Checkout) -> None:
    built.manifest("# a comment\n", COPY, TREE, task("new", "true"))
    assert built.run() == {"copy": UP_TO_DATE, "tree": UP_TO_DATE, "new": RAN}


def test_a_dependency_that_made_other_bytes_makes_its_dependents_stale(
    checkout: Checkout,
) -> None:
    checkout.write("in.txt", "one\n")
    use = task("use", "cp out/copy.txt used.txt", inputs=[":copy"], outputs=["used.txt"])
    checkout.manifest(COPY, use)
    checkout.run()
    assert checkout.run() == {"copy": UP_TO_DATE, "use": UP_TO_DATE}
    checkout.write("in.txt", "two\n")
    assert checkout.run() == {"copy": RAN, "use": RAN}
    assert checkout.read("used.txt") == "two\n"


def test_a_dependency_that_made_the_same_bytes_keeps_its_dependents_up_to_date(
    checkout: Checkout,
) -> None:
    checkout.write("in.txt", "one\n")
    head = task("head", "head -n 1 in.txt > out/head.txt", inputs=["in.txt"],
                outputs=["out/head.txt"])
    use = task("use", "cp out/head.txt used.txt", inputs=[":head"], outputs=["used.txt"])
    checkout.manifest(head, use)
    checkout.run()
    checkout.write("in.txt", "one\nmore\n")  # :head runs again and makes the same file
    assert checkout.run() == {"head": RAN, "use": UP_TO_DATE}


def test_a_task_that_may_not_be_cached_always_runs(checkout: Checkout) -> None:
    checkout.manifest(task("net", "echo hi > net.txt", outputs=["net.txt"], network="host"),
                      task("off", "echo hi > off.txt", outputs=["off.txt"]) + "cache = false\n")
    checkout.run()
    assert checkout.run() == {"net": RAN, "off": RAN}


def test_no_cache_neither_reads_nor_writes_the_record(built: Checkout) -> None:
    record = built.record()
    assert built.run(no_cache=True) == {"copy": RAN, "tree": RAN}
    assert built.record() == record
    assert built.run() == {"copy": RESTORED, "tree": RESTORED}  # outputs rewritten since


# --- racy outputs, crashes, damaged records -----------------------------------------------


def test_outputs_just_written_are_recorded_only_once_they_are_old_enough(
    checkout: Checkout,
) -> None:
    checkout.write("in.txt", "one\n")
    checkout.manifest(COPY, task("quiet", "true"))
    checkout.run(settled=False)
    assert checkout.run(settled=False) == {"copy": RESTORED, "quiet": UP_TO_DATE}
    assert checkout.run() == {"copy": RESTORED, "quiet": UP_TO_DATE}  # now old enough
    assert checkout.run() == {"copy": UP_TO_DATE, "quiet": UP_TO_DATE}


def test_a_run_killed_before_saving_leaves_its_tasks_stale(built: Checkout) -> None:
    """kill -9 after :copy ran on a changed input: the record still says "one";
    with the input changed back, the output is still "two", and must not pass
    for up to date."""
    built.write("in.txt", "two\n")
    assert built.run("copy", killed=True) == {"copy": RAN}
    assert built.read("out/copy.txt") == "two\n"
    built.write("in.txt", "one\n")
    assert built.run() == {"copy": RESTORED, "tree": UP_TO_DATE}
    assert built.read("out/copy.txt") == "one\n"


def test_an_interrupted_run_keeps_what_it_finished(built: Checkout) -> None:
    """Ctrl-C after :copy finished: the run still saves (the CLI calls
    cleanup), :copy is recorded, :tree, never prepared, keeps its entry."""
    built.write("in.txt", "two\n")
    assert built.run("copy") == {"copy": RAN}
    assert built.run() == {"copy": UP_TO_DATE, "tree": RAN}


@pytest.mark.parametrize("damage", [b"", b"{not json", b"[]", b'{"format": 1}',
                                    b"\x80\x04\x95", b'{"tasks": {"copy": [1, 2, 3]}}'])
def test_a_damaged_record_reads_as_stale(built: Checkout, damage: bytes) -> None:
    (built.root / ".hitz" / RECORD_FILE).write_bytes(damage)
    assert built.run() == {"copy": RESTORED, "tree": RESTORED}
    assert built.run() == {"copy": UP_TO_DATE, "tree": UP_TO_DATE}


def test_entries_of_the_wrong_shape_read_as_stale(built: Checkout) -> None:
    record = built.record()
    tasks = record["tasks"]
    assert isinstance(tasks, dict)
    tasks["copy"][2] = [["out/copy.txt", "big", 0, 0, 0, None, False]]
    tasks["tree"][2] = [[1, 2]]
    (built.root / ".hitz" / RECORD_FILE).write_text(json.dumps(record))
    assert built.run() == {"copy": RESTORED, "tree": RESTORED}


def test_a_record_of_another_host_or_hitz_reads_as_stale(built: Checkout) -> None:
    record = built.record()
    record["header"] = "0" * 64  # another rootfs identity, sandbox contract or version
    (built.root / ".hitz" / RECORD_FILE).write_text(json.dumps(record))
    assert built.run() == {"copy": RESTORED, "tree": RESTORED}


def test_an_entry_that_omits_a_declared_output_reads_as_stale(built: Checkout) -> None:
    record = built.record()
    tasks = record["tasks"]
    assert isinstance(tasks, dict)
    tasks["copy"][2] = []  # fingerprint right, stamps missing
    (built.root / ".hitz" / RECORD_FILE).write_text(json.dumps(record))
    (built.root / "out/copy.txt").unlink()
    assert built.run()["copy"] == RESTORED


def test_tasks_gone_from_the_manifest_leave_the_record(built: Checkout) -> None:
    built.manifest(COPY)
    built.run()
    assert sorted(built.record()["tasks"]) == ["copy"]  # type: ignore[arg-type]


# --- what a no-op run shows and keeps --------------------------------------------------------


def cached(name: str) -> TaskResult:
    return TaskResult(name, Outcome.SUCCEEDED, "cached", 0, 0.001, cached=True,
                      action_digest="0" * 64 + "/1")


def test_plain_progress_prints_no_line_per_cached_task() -> None:
    ran = TaskResult("link", Outcome.SUCCEEDED, "succeeded", 0, 0.5)
    results = [cached(f"t{i}") for i in range(1000)] + [ran]
    out = io.StringIO()
    progress = PlainProgress(out)
    for result in results:
        progress.task_planned(result.name, 1.0)
    for result in results:
        progress.task_finished(result)
    progress.run_finished(RunSummary("p", results, 0.12))
    assert out.getvalue() == (
        "[1001/1001] ok      :link (0.50s)\n"
        "1001 tasks: 1001 succeeded (1000 from the cache) in 0.12s\n"
    )


def test_live_progress_redraws_the_count_of_cached_tasks_throttled() -> None:
    out = io.StringIO()
    now = [0.0]
    live = LiveProgress(out, color=False, width=80, now=lambda: now[0], interval=0.1)
    results = [cached(f"t{i}") for i in range(1000)]
    for result in results:
        live.task_planned(result.name, 1.0)
    for result in results:
        live.task_finished(result)
    now[0] = 1.0
    live.run_finished(RunSummary("p", results, 1.0))
    assert out.getvalue() == (
        "[1/1000]\r\x1b[K1000 tasks: 1000 succeeded (1000 from the cache) in 1.00s\n")


def test_history_keeps_durations_of_tasks_that_ran_and_is_not_rewritten_by_a_no_op(
    tmp_path: Path,
) -> None:
    history = History.load(tmp_path)
    history.record_run(RunSummary("p", [TaskResult("a", Outcome.SUCCEEDED, "succeeded", 0, 2.0),
                                        cached("b")], 2.0))
    assert history.save()
    assert History.load(tmp_path).durations == {"a": 2.0}
    path = tmp_path / "history.json"
    before = path.stat().st_mtime_ns, path.stat().st_ino
    again = History.load(tmp_path)
    again.record_run(RunSummary("p", [cached("a"), cached("b")], 0.1))
    assert again.save()
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
