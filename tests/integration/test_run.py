"""`hitz run` and its sibling commands end to end: the real CLI, the real
sandbox, real files. What lands in the project, what a failure leaves, how
the run reports it, and the exit statuses (0 ok, 1 a task failed, 2 the
manifest or the command line is wrong)."""

from __future__ import annotations

import os
import re
import shutil
import stat

import pytest

from tests.helpers import REPO, Project, task

pytestmark = pytest.mark.kernel


def statuses(result: object) -> dict[str, str]:
    return {t["name"]: t["status"] for t in result.json()["tasks"]}  # type: ignore[attr-defined]


# --- the example project ------------------------------------------------------------


def test_example_project_builds_and_its_test_passes(project: Project) -> None:
    shutil.copy(REPO / "hitz.toml.example", project.root / "hitz.toml")
    shutil.copytree(REPO / "example", project.root / "example")
    # `test` and what it needs: the tasks on the host's /usr (test_in_image,
    # on the cc image, is run by tests/integration/test_images.py).
    result = project.run("test")
    assert result.returncode == 0, str(result)
    summary = result.json()
    assert summary["ok"] is True
    assert summary["counts"] == {"succeeded": 6, "failed": 0, "skipped": 0, "cancelled": 0}
    assert "ok: build/bin/tiny-demo output matches" in project.log(result, "test", "stdout")
    binary = project.root / "build/bin/tiny-demo"
    assert binary.stat().st_mode & stat.S_IXUSR
    assert (project.root / "build/gen/version.h").read_text().count("TINY_VERSION") == 1


# --- outputs ----------------------------------------------------------------------


def test_file_and_directory_outputs_land_in_the_project(project: Project) -> None:
    project.write_manifest(task(
        "make",
        "echo file > out/file.txt && mkdir -p gen/a/b && echo deep > gen/a/b/c.txt"
        " && ln -s b/c.txt gen/a/link && echo top > result.txt"
        " && mkdir -p deep/er/path && echo nested > deep/er/path/f.txt",
        outputs=("out/file.txt", "gen/", "result.txt", "deep/er/path/f.txt"),
    ))
    result = project.run()
    assert result.returncode == 0, str(result)
    assert project.read("out/file.txt") == "file\n"
    assert project.read("gen/a/b/c.txt") == "deep\n"
    assert os.readlink(project.root / "gen/a/link") == "b/c.txt"
    assert project.read("result.txt") == "top\n"
    assert project.read("deep/er/path/f.txt") == "nested\n"
    for rel in ("out/file.txt", "gen", "gen/a/b/c.txt", "result.txt"):
        assert (project.root / rel).lstat().st_uid == os.getuid(), rel


def test_only_declared_outputs_are_kept(project: Project) -> None:
    project.write_manifest(task(
        "make", "echo a > out/kept.txt && echo b > out/stray.txt && echo c > /tmp/stray.txt",
        outputs=("out/kept.txt",),
    ))
    result = project.run()
    assert result.returncode == 0, str(result)
    assert project.snapshot() == {
        "hitz.toml": project.read("hitz.toml"), "out": "<dir>", "out/kept.txt": "a\n",
    }


def test_directory_output_replaces_the_previous_one(project: Project) -> None:
    project.write("gen/old.txt", "old\n")
    project.write_manifest(task("make", "echo new > gen/new.txt", outputs=("gen/",)))
    result = project.run()
    assert result.returncode == 0, str(result)
    assert sorted(os.listdir(project.root / "gen")) == ["new.txt"]


def test_missing_declared_output_fails_the_task(project: Project) -> None:
    project.write_manifest(task("make", "echo nothing", outputs=("out/result.txt",)))
    result = project.run()
    assert result.returncode == 1, str(result)
    entry = result.task("make")
    assert (entry["outcome"], entry["status"]) == ("failed", "output-missing")
    assert "out/result.txt" in entry["message"]
    assert not (project.root / "out").exists()


@pytest.mark.parametrize("target", ["/etc/passwd", "../../etc/passwd", "../secret.txt"])
def test_symlink_output_pointing_outside_the_outputs_is_refused(
    project: Project, target: str
) -> None:
    project.write("secret.txt", "secret\n")
    project.write_manifest(task("make", f"ln -s {target} out/link", outputs=("out/link",)))
    result = project.run()
    assert result.returncode == 1, str(result)
    entry = result.task("make")
    assert entry["status"] == "output-missing"
    assert "outside the task's declared outputs" in entry["message"]
    assert not os.path.lexists(project.root / "out/link")


def test_symlink_inside_a_directory_output_pointing_outside_is_refused(project: Project) -> None:
    project.write_manifest(task(
        "make", "mkdir -p gen/sub && ln -s ../../../etc gen/sub/etc", outputs=("gen/",)
    ))
    result = project.run()
    assert result.returncode == 1, str(result)
    assert "outside the task's declared outputs" in result.task("make")["message"]
    assert not (project.root / "gen").exists()


def test_output_of_a_special_file_is_refused(project: Project) -> None:
    project.write_manifest(task("make", "mkfifo gen/pipe", outputs=("gen/",)))
    result = project.run()
    assert result.returncode == 1, str(result)
    assert result.task("make")["status"] == "output-missing"
    assert not (project.root / "gen").exists()


# --- dependencies -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["task-input", "deps"])
def test_dependency_outputs_are_visible_to_dependents(project: Project, how: str) -> None:
    gen = task("gen", "echo '#define X 1' > gen/x.h && echo v1 > version.txt",
               outputs=("gen/", "version.txt"))
    use = task("use", "cat gen/x.h version.txt > out/used.txt", outputs=("out/used.txt",),
               **({"inputs": (":gen",)} if how == "task-input" else {"deps": ("gen",)}))
    project.write_manifest(gen, use)
    result = project.run()
    assert result.returncode == 0, str(result)
    assert project.read("out/used.txt") == "#define X 1\nv1\n"


def test_dependency_outputs_are_read_only_to_dependents(project: Project) -> None:
    project.write_manifest(
        task("gen", "echo original > gen/x.h", outputs=("gen/",)),
        task("use", "echo evil > gen/x.h", inputs=(":gen",)),
    )
    result = project.run()
    assert result.returncode == 1, str(result)
    assert result.task("use")["exit_code"] != 0
    assert "Read-only file system" in project.log(result, "use", "stderr")
    assert project.read("gen/x.h") == "original\n"


def test_input_inside_a_dependents_output_folder_stays_readable(project: Project) -> None:
    """A dependency's output inside the folder where this task writes (as the
    example's compile_lib/compile_main share build/obj/) is bound over it."""
    project.write_manifest(
        task("lib", "echo lib > build/obj/lib/a.o", outputs=("build/obj/lib/",)),
        task("main", "cat build/obj/lib/a.o > build/obj/main.o", inputs=(":lib",),
             outputs=("build/obj/main.o",)),
    )
    result = project.run()
    assert result.returncode == 0, str(result)
    assert project.read("build/obj/main.o") == "lib\n"
    assert project.read("build/obj/lib/a.o") == "lib\n"


# --- failures -----------------------------------------------------------------------


def test_failed_task_leaves_the_project_untouched(project: Project) -> None:
    project.write("out/result.txt", "old\n")
    project.write("src/in.txt", "input\n")
    project.write_manifest(task(
        "make",
        "echo new > out/result.txt; echo stray > out/stray.txt; "
        "for i in $(seq 1 30); do echo \"problem line $i\" >&2; done; exit 3",
        inputs=("src/in.txt",),
        outputs=("out/result.txt",),
    ))
    before = project.snapshot()
    result = project.run()
    assert result.returncode == 1, str(result)
    assert project.snapshot() == before
    entry = result.task("make")
    assert (entry["outcome"], entry["status"], entry["exit_code"]) == ("failed", "failed", 3)
    stderr_log = [path for path in entry["logs"] if path.endswith(".stderr")]
    assert stderr_log, "no stderr log for a task that wrote to stderr"
    # The tail of the task's stderr, then where the whole of it is.
    assert "problem line 30" in result.stderr
    assert "problem line 1\n" not in result.stderr
    assert f"log: {stderr_log[0]}" in result.stderr
    assert "problem line 1\n" in project.log(result, "make", "stderr")


def test_program_that_cannot_be_found_fails_with_status_127(project: Project) -> None:
    project.write_manifest(task("make", ["no-such-program-hitz", "--flag"]))
    result = project.run()
    assert result.returncode == 1, str(result)
    entry = result.task("make")
    assert (entry["status"], entry["exit_code"]) == ("failed", 127)
    assert "no-such-program-hitz" in entry["message"]


def test_fail_fast_cancels_what_has_not_started(project: Project) -> None:
    project.write_manifest(
        task("bad", "exit 1"),
        task("after_bad", "echo x > a.txt", deps=("bad",), outputs=("a.txt",)),
        task("other", "echo x > b.txt", outputs=("b.txt",)),
    )
    result = project.run("-j", "1")
    assert result.returncode == 1, str(result)
    assert statuses(result) == {"bad": "failed", "after_bad": "cancelled", "other": "cancelled"}
    assert result.json()["counts"] == {"succeeded": 0, "failed": 1, "skipped": 0, "cancelled": 2}
    assert not (project.root / "a.txt").exists()
    assert not (project.root / "b.txt").exists()


def test_keep_going_runs_independent_tasks_and_skips_dependents(project: Project) -> None:
    project.write_manifest(
        task("bad", "exit 1"),
        task("after_bad", "echo x > a.txt", deps=("bad",), outputs=("a.txt",)),
        task("after_after", "true", deps=("after_bad",)),
        task("other", "echo x > b.txt", outputs=("b.txt",)),
    )
    result = project.run("-j", "1", "--keep-going")
    assert result.returncode == 1, str(result)
    assert statuses(result) == {
        "bad": "failed", "after_bad": "skipped", "after_after": "skipped", "other": "succeeded",
    }
    assert result.task("after_bad")["outcome"] == "skipped"
    assert project.read("b.txt") == "x\n"
    assert not (project.root / "a.txt").exists()


# --- reports ------------------------------------------------------------------------


def test_json_summary_shape(project: Project) -> None:
    project.write_manifest(
        task("first", "echo hello"),
        task("second", "echo oops >&2; exit 2", deps=("first",)),
        project="demo",
    )
    result = project.run()
    assert result.returncode == 1, str(result)
    summary = result.json()
    assert set(summary) == {"project", "ok", "interrupted", "duration_s", "counts", "tasks"}
    assert (summary["project"], summary["ok"], summary["interrupted"]) == ("demo", False, False)
    assert isinstance(summary["duration_s"], float)
    assert summary["counts"] == {"succeeded": 1, "failed": 1, "skipped": 0, "cancelled": 0}
    assert [t["name"] for t in summary["tasks"]] == ["first", "second"]
    for entry in summary["tasks"]:
        assert set(entry) == {
            "name", "outcome", "status", "exit_code", "duration_s", "message", "logs",
            "cached", "cached_from", "action_digest", "enforced", "weakened",
        }
    first, second = summary["tasks"]
    assert (first["outcome"], first["exit_code"], first["message"]) == ("succeeded", 0, None)
    assert (first["cached"], first["cached_from"]) == (False, None)
    assert re.fullmatch(r"[0-9a-f]{64}/[0-9]+", first["action_digest"])
    assert second["action_digest"] is None  # a failure has no cache entry
    assert (second["outcome"], second["exit_code"]) == ("failed", 2)
    assert all(path.startswith(str(project.root)) for path in first["logs"] + second["logs"])
    # Progress goes to stderr; stdout holds only the JSON document.
    assert "second" in result.stderr


def test_validate_plan_and_graph(project: Project) -> None:
    project.write("src/a.c", "")
    project.write_manifest(
        task("gen", "true", outputs=("gen/",)),
        task("build", "true", inputs=(":gen", "src/*.c")),
    )
    validate = project.hitz("validate", "--config", "hitz.toml")
    assert validate.returncode == 0, str(validate)
    assert "2 tasks, no problems found" in validate.stdout

    plan = project.hitz("plan", "--config", "hitz.toml")
    assert plan.returncode == 0, str(plan)
    rows = [line.split() for line in plan.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == [":gen", ":build"]
    assert rows[1][-1] == ":gen"

    dot = project.hitz("graph", "--config", "hitz.toml", "--format", "dot")
    assert dot.returncode == 0, str(dot)
    assert dot.stdout.startswith("digraph")
    assert '"build" -> "gen"' in dot.stdout

    mermaid = project.hitz("graph", "--config", "hitz.toml", "--format", "mermaid")
    assert mermaid.returncode == 0, str(mermaid)
    assert mermaid.stdout.startswith("flowchart")
    assert mermaid.stdout.count("-->") == 1


def test_sandbox_explain_lists_the_tasks_mounts(project: Project) -> None:
    project.write("src/a.c", "")
    project.write_manifest(task("build", "true", inputs=("src/a.c",), outputs=("out/a.o",)))
    result = project.hitz("sandbox", "explain", ":build", "--config", "hitz.toml")
    assert result.returncode == 0, str(result)
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["bind", "ro"] and line.endswith("-> /work/src/a.c")
               for line in lines)
    assert any(line.split()[:2] == ["bind", "rw"] and line.endswith("-> /work/out")
               for line in lines)
    assert lines[-1].split() == ["remount", "ro", "/"]


# --- manifest errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('[tasks.a]\nrun = "true"\nimputs = []\n', 3, 'unknown key "imputs"'),
        ('[tasks.a]\nrun = "true"\n\n[tasks.b]\nrun = "true"\ntimeout = 5\n', 6, '"timeout"'),
        ('[tasks.a]\nrun = "true"\ndeps = ["nope"]\n', 3, 'unknown task ":nope"'),
        ('[tasks.a]\nrun = "true"\noutputs = ["../x"]\n', 3, "outside the project"),
    ],
    ids=["unknown-key", "bad-timeout", "unknown-dep", "output-outside"],
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_manifest_error_exits_2_naming_the_line(
    project: Project, command: str, text: str, line: int, words: str
) -> None:
    project.write("hitz.toml", text)
    result = project.hitz(command, "--config", "hitz.toml")
    assert result.returncode == 2, str(result)
    assert result.stderr.startswith(f"error: hitz.toml:{line}: "), result.stderr
    assert words in result.stderr.splitlines()[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (project.root / ".hitz" / "logs").exists()


def test_input_glob_matching_nothing_stops_the_run_before_any_task_starts(
    project: Project,
) -> None:
    project.write_manifest(
        task("first", "echo ran > first.txt", outputs=("first.txt",)),
        task("second", "true", inputs=("src/*.c",)),
    )
    result = project.run()
    assert result.returncode == 2, str(result)
    first_line = result.stderr.splitlines()[0]
    assert first_line.startswith("error: hitz.toml:"), result.stderr
    assert '"src/*.c" matches no file' in first_line
    assert "Traceback" not in result.stderr
    assert not (project.root / "first.txt").exists()
    assert not (project.root / ".hitz" / "logs").exists()


def test_dependency_cycle_exits_2(project: Project) -> None:
    project.write_manifest(task("a", "true", deps=("b",)), task("b", "true", deps=("a",)))
    result = project.run()
    assert result.returncode == 2, str(result)
    assert result.stderr.startswith("error: dependency cycle: "), result.stderr
    assert "Traceback" not in result.stderr
