"""How sandboxes end: on timeout, when the task exits, on Ctrl-C and SIGTERM,
and when hitz itself is killed. Whatever happens, no process of a sandbox
survives on the host, and the project and the host's mount table are left
as they were.

Tasks carry a unique marker in their command line (``sleep MARKER1``), so
the test can see them from the host; the ``marker`` fixture kills any that
a failing test leaves behind. Waits poll a condition under a generous
guard; nothing asserts how fast anything happened.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import EXIT_GUARD_S, Project, mountinfo, processes_with, task, wait_for

pytestmark = pytest.mark.kernel


def long_task(marker: str, outputs: tuple[str, ...] = (), before: str = "") -> str:
    """A task that runs until stopped: a shell waiting on two marked sleeps."""
    return task("long", f"{before}sleep {marker}1 & sleep {marker}2; wait", outputs=outputs)


def wait_until_running(marker: str) -> None:
    """Until the task's shell and both sleeps are up (seen from the host)."""
    wait_for(lambda: len(processes_with(marker)) >= 3, "the task's processes to start", 30.0)


def staging_left(project: Project) -> list[str]:
    tmp = project.root / ".hitz" / "tmp"
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")) if tmp.exists() else []


# --- timeout --------------------------------------------------------------------------


def test_timeout_terminates_the_whole_process_tree(project: Project, marker: str) -> None:
    project.write_manifest(task("slow", f"sleep {marker}1 & sleep {marker}2; wait", timeout="1s"))
    result = project.run()
    assert result.returncode == 1, str(result)
    entry = result.task("slow")
    assert (entry["outcome"], entry["status"]) == ("failed", "timed-out")
    assert processes_with(marker) == []


def test_timeout_kills_a_task_that_ignores_sigterm(project: Project, marker: str) -> None:
    project.write_manifest(task(
        "stubborn", f"trap '' TERM; sleep {marker}1 & sleep {marker}2; wait", timeout="1s"
    ))
    result = project.run(guard_s=EXIT_GUARD_S)
    assert result.returncode == 1, str(result)
    assert result.task("stubborn")["status"] == "timed-out"
    assert processes_with(marker) == []


def test_timeout_stops_a_task_that_detached_into_its_own_session(
    project: Project, marker: str
) -> None:
    project.write_manifest(task(
        "sneaky", f"setsid sleep {marker}1 & setsid sleep {marker}2 & wait", timeout="1s"
    ))
    result = project.run(guard_s=EXIT_GUARD_S)
    assert result.task("sneaky")["status"] == "timed-out", str(result)
    assert processes_with(marker) == []


# --- the task's end ends the sandbox ------------------------------------------------------


def test_daemon_left_behind_by_a_successful_task_is_killed(project: Project, marker: str) -> None:
    project.write_manifest(task(
        "daemon",
        f"setsid sleep {marker}1 </dev/null >/dev/null 2>&1 &\n"
        f"(trap '' HUP TERM; nohup sleep {marker}2 </dev/null >/dev/null 2>&1 &)\n"
        "echo started",
    ))
    result = project.run()
    assert result.returncode == 0, str(result)
    assert result.task("daemon")["status"] == "succeeded"
    assert processes_with(marker) == []


# --- Ctrl-C and SIGTERM -----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_the_run_and_leaves_everything_as_it_was(
    project: Project, marker: str, signum: int
) -> None:
    project.write("out/result.txt", "old\n")
    project.write_manifest(
        long_task(marker, outputs=("out/result.txt",), before="echo new > out/result.txt; "),
        task("later", "echo ran > later.txt", deps=("long",), outputs=("later.txt",)),
    )
    before = project.snapshot()
    mounts_before = mountinfo()
    proc = project.start()
    wait_until_running(marker)

    os.kill(proc.pid, signum)
    result = project.finish(proc)

    assert result.returncode == 130, str(result)
    summary = result.json()
    assert summary["interrupted"] is True
    assert {t["name"]: t["outcome"] for t in summary["tasks"]} == {
        "long": "cancelled", "later": "cancelled",
    }
    assert processes_with(marker) == []
    assert staging_left(project) == []
    assert project.snapshot() == before
    assert mountinfo() == mounts_before
    assert "Traceback" not in result.stderr


def test_interrupt_with_several_tasks_running_stops_them_all(
    project: Project, marker: str
) -> None:
    project.write_manifest(
        task("one", f"sleep {marker}1 & sleep {marker}2; wait"),
        task("two", f"sleep {marker}3 & sleep {marker}4; wait"),
    )
    proc = project.start("-j", "2")
    wait_for(lambda: len(processes_with(marker)) >= 6, "both tasks to start", 30.0)
    os.kill(proc.pid, signal.SIGINT)
    result = project.finish(proc)
    assert result.returncode == 130, str(result)
    assert processes_with(marker) == []
    assert staging_left(project) == []


# --- hitz killed ---------------------------------------------------------------------


def test_killing_hitz_kills_its_sandboxes(project: Project, marker: str) -> None:
    project.write_manifest(long_task(marker))
    proc = project.start()
    wait_until_running(marker)

    proc.kill()  # SIGKILL: hitz gets no chance to clean up
    proc.wait()

    wait_for(lambda: processes_with(marker) == [], "the sandbox's processes to die")


def test_run_after_hitz_was_killed_succeeds_and_sweeps_stale_staging(
    project: Project, marker: str
) -> None:
    project.write("out/result.txt", "old\n")
    project.write_manifest(long_task(marker, outputs=("out/result.txt",),
                                     before="echo partial > out/result.txt; "))
    proc = project.start()
    wait_until_running(marker)
    proc.kill()
    proc.wait()
    stale = project.root / ".hitz" / "tmp" / str(proc.pid)
    assert stale.exists(), "the killed run left no staging folder to sweep"
    assert project.read("out/result.txt") == "old\n"
    wait_for(lambda: processes_with(marker) == [], "the sandbox's processes to die")

    project.write_manifest(task("quick", "echo new > out/result.txt",
                                outputs=("out/result.txt",)))
    result = project.run()
    assert result.returncode == 0, str(result)
    assert project.read("out/result.txt") == "new\n"
    assert not stale.exists(), "the next run did not sweep the killed run's staging folder"


def test_a_second_run_is_refused_while_one_holds_the_project(
    project: Project, marker: str
) -> None:
    project.write_manifest(long_task(marker))
    proc = project.start()
    wait_until_running(marker)
    second = project.run()
    assert second.returncode == 1, str(second)
    assert "another hitz run is using this project" in second.stderr
    os.kill(proc.pid, signal.SIGINT)
    assert project.finish(proc).returncode == 130
    assert processes_with(marker) == []
