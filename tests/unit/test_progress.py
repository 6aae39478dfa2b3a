"""What the progress observers print, asserted as exact text."""

from __future__ import annotations

import io
import json

from hitz.executor.events import Outcome, RunObserver, RunSummary, TaskResult
from hitz.executor.progress import (
    JsonSummary,
    LiveProgress,
    PlainProgress,
    format_seconds,
    summary_line,
)

OK = TaskResult("compile", Outcome.SUCCEEDED, "succeeded", exit_code=0, duration_s=0.42)
LINK_FAILED = TaskResult(
    "link",
    Outcome.FAILED,
    "failed",
    exit_code=1,
    duration_s=0.1,
    message="exited with status 1",
    stderr_tail="ld: cannot find -lfoo\ncollect2: error: ld returned 1 exit status\n",
    log_paths=(".hitz/logs/link.stderr",),
)
SKIPPED = TaskResult("test", Outcome.SKIPPED, "skipped", message='dependency ":link" failed')
CANCELLED = TaskResult(
    "docs", Outcome.CANCELLED, "cancelled", message='not started because ":link" failed'
)
RESULTS = [OK, LINK_FAILED, SKIPPED, CANCELLED]
SUMMARY = RunSummary(project="demo", results=RESULTS, duration_s=1.234)


def feed(observer: RunObserver, results: list[TaskResult], summary: RunSummary) -> None:
    """Send a run's events: plan everything, then start and finish each task."""
    for result in results:
        observer.task_planned(result.name, 1.0)
    for result in results:
        if result.outcome in (Outcome.SUCCEEDED, Outcome.FAILED):
            observer.task_started(result.name)
        observer.task_finished(result)
    observer.run_finished(summary)


# PlainProgress


def test_plain_progress_prints_one_line_per_task_and_failures_in_full() -> None:
    out = io.StringIO()
    feed(PlainProgress(out), RESULTS, SUMMARY)
    assert out.getvalue() == (
        "[1/4] ok      :compile (0.42s)\n"
        "[2/4] FAILED  :link (exit 1, 0.10s)\n"
        "    ld: cannot find -lfoo\n"
        "    collect2: error: ld returned 1 exit status\n"
        "  log: .hitz/logs/link.stderr\n"
        '[3/4] skipped :test (dependency ":link" failed)\n'
        '[4/4] cancelled :docs (not started because ":link" failed)\n'
        "4 tasks: 1 succeeded, 1 failed, 1 skipped, 1 cancelled in 1.23s\n"
    )


def test_plain_progress_explains_failures_that_are_not_an_exit_status() -> None:
    results = [
        TaskResult("a", Outcome.FAILED, "failed", exit_code=-9, duration_s=2.0),
        TaskResult(
            "b",
            Outcome.FAILED,
            "timed-out",
            exit_code=-9,
            duration_s=90.0,
            message="timed out after 1m30s",
        ),
        TaskResult(
            "c",
            Outcome.FAILED,
            "setup-failed",
            message='can\'t expose input "src/gen" to task ":c": path does not exist',
        ),
    ]
    out = io.StringIO()
    feed(PlainProgress(out), results, RunSummary("demo", results, 92.0))
    assert out.getvalue() == (
        "[1/3] FAILED  :a (killed by SIGKILL, 2.00s)\n"
        "[2/3] FAILED  :b (timed out, 1m30s)\n"
        "  timed out after 1m30s\n"
        "[3/3] FAILED  :c (setup failed, 0.00s)\n"
        '  can\'t expose input "src/gen" to task ":c": path does not exist\n'
        "3 tasks: 3 failed in 1m32s\n"
    )


def test_plain_progress_strips_control_codes_from_task_output() -> None:
    hostile = TaskResult(
        "evil",
        Outcome.FAILED,
        "failed",
        exit_code=1,
        stderr_tail="\x1b[31mred\x1b[0m \x1b]0;pwned\x07title\rback\x9b2J\tend",
    )
    out = io.StringIO()
    feed(PlainProgress(out), [hostile], RunSummary("demo", [hostile], 0.5))
    text = out.getvalue()
    assert "    red titleback2J\tend\n" in text
    assert not any(ch in text for ch in "\x1b\x07\r\x9b")


def test_summary_line() -> None:
    assert summary_line(RunSummary("p", [OK], 0.5)) == "1 task: 1 succeeded in 0.50s"
    assert summary_line(RunSummary("p", [], 0.0)) == "0 tasks in 0.00s"
    interrupted = RunSummary("p", [OK, CANCELLED], 3.0, interrupted=True)
    assert summary_line(interrupted) == ("2 tasks: 1 succeeded, 1 cancelled in 3.00s (interrupted)")


def test_format_seconds() -> None:
    assert format_seconds(0.004) == "0.00s"
    assert format_seconds(59.994) == "59.99s"
    assert format_seconds(125.2) == "2m05s"
    assert format_seconds(3725.0) == "1h02m"


# LiveProgress


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_live_progress_redraws_one_status_line_below_finished_tasks() -> None:
    out = io.StringIO()
    clock = FakeTime()
    live = LiveProgress(out, color=False, width=40, now=clock)
    live.task_planned("compile", 2.0)
    live.task_planned("link", 1.0)
    live.task_started("compile")
    clock.now = 1.0
    live.task_finished(OK)
    clock.now = 1.5
    live.task_started("link")
    clock.now = 2.0
    live.task_finished(LINK_FAILED)
    live.run_finished(RunSummary("demo", [OK, LINK_FAILED], 2.0))
    assert out.getvalue() == (
        "[0/2] running :compile"
        "\r\x1b[K[1/2] ok      :compile (0.42s)\n[1/2]"
        "\r\x1b[K[1/2] running :link"
        "\r\x1b[K[2/2] FAILED  :link (exit 1, 0.10s)\n"
        "    ld: cannot find -lfoo\n"
        "    collect2: error: ld returned 1 exit status\n"
        "  log: .hitz/logs/link.stderr\n"
        "[2/2]"
        "\r\x1b[K2 tasks: 1 succeeded, 1 failed in 2.00s\n"
    )


def test_live_progress_without_color_writes_no_other_escape_codes() -> None:
    out = io.StringIO()
    feed(LiveProgress(out, color=False, width=80, now=FakeTime()), RESULTS, SUMMARY)
    assert out.getvalue().replace("\r\x1b[K", "").count("\x1b") == 0


def test_live_progress_with_color_paints_the_labels_only() -> None:
    out = io.StringIO()
    feed(LiveProgress(out, color=True, width=80, now=FakeTime()), RESULTS, SUMMARY)
    text = out.getvalue()
    assert "\x1b[32mok\x1b[0m      :compile (0.42s)\n" in text
    assert "\x1b[1;31mFAILED\x1b[0m  :link (exit 1, 0.10s)\n" in text


def test_live_progress_throttles_redraws_of_started_tasks() -> None:
    out = io.StringIO()
    clock = FakeTime()
    live = LiveProgress(out, color=False, width=80, now=clock, interval=0.1)
    for i in range(1000):
        live.task_planned(f"t{i}", 1.0)
    for i in range(1000):
        live.task_started(f"t{i}")
    clock.now = 0.5
    live.task_started("late")
    assert out.getvalue().count("[0/1000]") == 2


def test_live_progress_cuts_the_status_line_to_the_terminal_width() -> None:
    out = io.StringIO()
    live = LiveProgress(out, color=False, width=20, now=FakeTime())
    live.task_planned("compile", 1.0)
    live.task_started("compile")
    assert out.getvalue() == "[0/1] running :com…"


# JsonSummary


def test_json_summary_writes_one_document_at_the_end() -> None:
    out = io.StringIO()
    feed(JsonSummary(out), RESULTS, SUMMARY)
    assert out.getvalue().endswith("}\n")
    assert json.loads(out.getvalue()) == {
        "project": "demo",
        "ok": False,
        "interrupted": False,
        "duration_s": 1.234,
        "counts": {"succeeded": 1, "failed": 1, "skipped": 1, "cancelled": 1},
        "tasks": [
            {
                "name": "compile",
                "outcome": "succeeded",
                "status": "succeeded",
                "exit_code": 0,
                "duration_s": 0.42,
                "message": None,
                "logs": [],
                "cached": False,
                "cached_from": None,
                "action_digest": None,
                "enforced": None,
                "weakened": [],
            },
            {
                "name": "link",
                "outcome": "failed",
                "status": "failed",
                "exit_code": 1,
                "duration_s": 0.1,
                "message": "exited with status 1",
                "logs": [".hitz/logs/link.stderr"],
                "cached": False,
                "cached_from": None,
                "action_digest": None,
                "enforced": None,
                "weakened": [],
            },
            {
                "name": "test",
                "outcome": "skipped",
                "status": "skipped",
                "exit_code": None,
                "duration_s": 0.0,
                "message": 'dependency ":link" failed',
                "logs": [],
                "cached": False,
                "cached_from": None,
                "action_digest": None,
                "enforced": None,
                "weakened": [],
            },
            {
                "name": "docs",
                "outcome": "cancelled",
                "status": "cancelled",
                "exit_code": None,
                "duration_s": 0.0,
                "message": 'not started because ":link" failed',
                "logs": [],
                "cached": False,
                "cached_from": None,
                "action_digest": None,
                "enforced": None,
                "weakened": [],
            },
        ],
    }


def test_json_summary_of_a_clean_run_is_ok() -> None:
    out = io.StringIO()
    feed(JsonSummary(out), [OK], RunSummary("demo", [OK], 0.42))
    document = json.loads(out.getvalue())
    assert document["ok"] is True
    assert document["counts"] == {"succeeded": 1, "failed": 0, "skipped": 0, "cancelled": 0}


# Cached tasks: which cache served them

LOCAL_HIT = TaskResult("compile", Outcome.SUCCEEDED, "cached", 0, 0.01, cached=True,
                       cached_from="local")
REMOTE_HIT = TaskResult("link", Outcome.SUCCEEDED, "cached", 0, 0.02, cached=True,
                        cached_from="remote")
HITS = [LOCAL_HIT, REMOTE_HIT]


def test_plain_progress_says_which_cache_served_a_task() -> None:
    out = io.StringIO()
    feed(PlainProgress(out), HITS, RunSummary("demo", HITS, 0.5))
    # A local hit is only counted; a remote hit has its line.
    assert out.getvalue() == (
        "[2/2] ok      :link (cached (remote), 0.02s)\n"
        "2 tasks: 2 succeeded (2 from the cache, 1 remote) in 0.50s\n"
    )


def test_live_progress_says_which_cache_served_a_task() -> None:
    out = io.StringIO()
    feed(LiveProgress(out, color=False, width=80, now=FakeTime()), HITS,
         RunSummary("demo", HITS, 0.5))
    assert out.getvalue() == (
        "[0/2] running :compile"
        "\r\x1b[K[2/2] ok      :link (cached (remote), 0.02s)\n[2/2]"
        "\r\x1b[K2 tasks: 2 succeeded (2 from the cache, 1 remote) in 0.50s\n"
    )


def test_json_summary_says_which_cache_served_a_task() -> None:
    out = io.StringIO()
    ran = TaskResult("test", Outcome.SUCCEEDED, "succeeded", 0, 1.0)
    older = TaskResult("docs", Outcome.SUCCEEDED, "cached", 0, 0.0, cached=True)
    results = [*HITS, ran, older]
    feed(JsonSummary(out), results, RunSummary("demo", results, 1.5))
    tasks = json.loads(out.getvalue())["tasks"]
    assert [(t["name"], t["cached"], t["cached_from"]) for t in tasks] == [
        ("compile", True, "local"),
        ("link", True, "remote"),
        ("test", False, None),
        ("docs", True, "local"),  # a cached result that does not say: the local cache
    ]
