"""The scheduler against a recording fake backend and a manual clock.

Nothing here sleeps or measures real time: every task "takes" fake seconds
(1 unless told otherwise) and the backend jumps the clock to the next end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hitz.executor.errors import HitzError, OutputError
from hitz.executor.events import Outcome, RunSummary, TaskResult
from hitz.executor.model import Manifest, TaskDef
from hitz.executor.planner import plan
from hitz.executor.scheduler import Scheduler
from hitz.sandbox.spec import SandboxResult, SandboxSpec, Status
from tests.fakes.backend import FakeBackend


def task(name: str, *deps: str) -> TaskDef:
    return TaskDef(name=name, argv=("true",), deps=deps)


def manifest(*tasks: TaskDef) -> Manifest:
    return Manifest(
        path=Path("/project/hitz.toml"),
        display_path="hitz.toml",
        root=Path("/project"),
        project="project",
        tasks={t.name: t for t in tasks},
    )


def prepare(task: TaskDef) -> SandboxSpec:
    return SandboxSpec(
        task=task.name,
        argv=task.argv,
        env={},
        inputs=(),
        outputs=(),
        staging_dir=f"/stage/{task.name}",
        stdout_path=f"/logs/{task.name}.stdout",
        stderr_path=f"/logs/{task.name}.stderr",
    )


_OUTCOMES = {Status.SUCCEEDED: Outcome.SUCCEEDED, Status.CANCELLED: Outcome.CANCELLED}


@dataclass
class Finisher:
    """A ``finish`` callback that records which results it was given."""

    finished: list[str] = field(default_factory=list)

    def __call__(self, task: TaskDef, result: SandboxResult) -> TaskResult:
        self.finished.append(task.name)
        return TaskResult(
            name=task.name,
            outcome=_OUTCOMES.get(result.status, Outcome.FAILED),
            status=result.status.value,
            exit_code=result.exit_code,
            duration_s=result.duration_s,
            message=result.message,
        )


@dataclass
class Recorder:
    """A ``RunObserver`` that writes down every event."""

    events: list[tuple[str, ...]] = field(default_factory=list)

    def task_planned(self, name: str, priority: float) -> None:
        self.events.append(("planned", name, str(priority)))

    def task_started(self, name: str) -> None:
        self.events.append(("started", name))

    def task_finished(self, result: TaskResult) -> None:
        self.events.append(("finished", result.name, result.outcome.value))

    def run_finished(self, summary: RunSummary) -> None:
        self.events.append(("run_finished", str(summary.interrupted)))


@dataclass
class Run:
    summary: RunSummary
    backend: FakeBackend
    recorder: Recorder
    finisher: Finisher

    def outcome(self, name: str) -> Outcome:
        return self.result(name).outcome

    def result(self, name: str) -> TaskResult:
        return next(r for r in self.summary.results if r.name == name)


def run(
    tasks: list[TaskDef],
    backend: FakeBackend | None = None,
    *,
    jobs: int = 4,
    keep_going: bool = False,
    history: Mapping[str, float] | None = None,
    prepare: Callable[[TaskDef], SandboxSpec] = prepare,
) -> Run:
    backend = backend or FakeBackend()
    recorder, finisher = Recorder(), Finisher()
    summary = Scheduler(
        plan(manifest(*tasks), history=history),
        backend,
        prepare=prepare,
        finish=finisher,
        observers=[recorder],
        jobs=jobs,
        keep_going=keep_going,
        clock=backend.clock,
        project="project",
    ).run()
    return Run(summary, backend, recorder, finisher)


# compile (3) -> link (2) -> test (1); lint (1) stands alone, declared first.
BUILD = [task("lint"), task("compile"), task("link", "compile"), task("test", "link")]


# Order and concurrency


def test_one_job_starts_the_highest_priority_ready_task_first() -> None:
    # Ties (lint and test, priority 1) go to the task declared first.
    assert run(BUILD, jobs=1).backend.started == ["compile", "link", "lint", "test"]


def test_recorded_durations_change_the_order() -> None:
    started = run(BUILD, jobs=1, history={"lint": 10.0}).backend.started
    assert started == ["lint", "compile", "link", "test"]


def test_tasks_are_planned_in_priority_order() -> None:
    planned = [e[1:] for e in run(BUILD).recorder.events if e[0] == "planned"]
    assert planned == [("compile", "3.0"), ("link", "2.0"), ("lint", "1.0"), ("test", "1.0")]


def test_never_more_than_jobs_tasks_at_once() -> None:
    tasks = [task(f"t{i}") for i in range(10)]
    finished = run(tasks, jobs=3)
    assert finished.backend.max_running == 3
    assert finished.summary.ok
    assert finished.summary.duration_s == 4.0  # 10 one-second tasks, 3 at a time


def test_a_task_starts_only_after_its_dependencies_succeed() -> None:
    backend = FakeBackend().take("compile", 5.0)
    finished = run(BUILD, backend, jobs=4)
    assert finished.backend.started == ["compile", "lint", "link", "test"]
    assert finished.summary.duration_s == 7.0  # compile 5 + link 1 + test 1
    assert finished.backend.max_running == 2


def test_observers_receive_events_in_order() -> None:
    events = run([task("a"), task("b", "a")], jobs=2).recorder.events
    assert events == [
        ("planned", "a", "2.0"),
        ("planned", "b", "1.0"),
        ("started", "a"),
        ("finished", "a", "succeeded"),
        ("started", "b"),
        ("finished", "b", "succeeded"),
        ("run_finished", "False"),
    ]


def test_summary_lists_results_in_plan_order_with_counts() -> None:
    summary = run(BUILD).summary
    assert [r.name for r in summary.results] == ["lint", "compile", "link", "test"]
    assert summary.counts == {"succeeded": 4, "failed": 0, "skipped": 0, "cancelled": 0}
    assert summary.project == "project"
    assert summary.ok


def test_jobs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Scheduler(
            plan(manifest(task("a"))), FakeBackend(), prepare=prepare, finish=Finisher(), jobs=0
        )


# Failure


def test_fail_fast_lets_running_tasks_finish_and_cancels_the_rest() -> None:
    backend = FakeBackend().fail("a").take("b", 5.0)
    finished = run([task("a"), task("b"), task("c"), task("d", "a")], backend, jobs=2)
    assert backend.started == ["a", "b"]
    assert finished.outcome("a") is Outcome.FAILED
    assert finished.outcome("b") is Outcome.SUCCEEDED
    assert finished.outcome("c") is Outcome.CANCELLED
    assert finished.result("c").message == 'not started because ":a" failed'
    assert finished.outcome("d") is Outcome.CANCELLED
    assert finished.summary.duration_s == 5.0
    assert not finished.summary.ok
    assert not finished.summary.interrupted


def test_keep_going_skips_only_what_needs_the_failure() -> None:
    backend = FakeBackend().fail("gen", exit_code=2)
    tasks = [task("gen"), task("compile", "gen"), task("link", "compile"), task("lint")]
    finished = run(tasks, backend, jobs=1, keep_going=True)
    assert backend.started == ["gen", "lint"]
    assert finished.result("gen").exit_code == 2
    for name in ("compile", "link"):
        assert finished.outcome(name) is Outcome.SKIPPED
        assert finished.result(name).message == 'dependency ":gen" failed'
        assert finished.result(name).status == "skipped"
    assert finished.outcome("lint") is Outcome.SUCCEEDED
    assert finished.summary.counts == {"succeeded": 1, "failed": 1, "skipped": 2, "cancelled": 0}


def test_prepare_error_fails_the_task_without_reaching_the_backend() -> None:
    def prepare_or_fail(task: TaskDef) -> SandboxSpec:
        if task.name == "bad":
            raise HitzError('can\'t expose input "src/gen" to task ":bad": path does not exist')
        return prepare(task)

    finished = run(
        [task("bad"), task("good"), task("after", "bad")],
        jobs=1,
        keep_going=True,
        prepare=prepare_or_fail,
    )
    bad = finished.result("bad")
    assert bad.outcome is Outcome.FAILED
    assert bad.status == "setup-failed"
    assert bad.exit_code is None
    assert bad.message == 'can\'t expose input "src/gen" to task ":bad": path does not exist'
    assert finished.backend.started == ["good"]
    assert finished.outcome("after") is Outcome.SKIPPED
    assert "bad" not in finished.finisher.finished


def test_finish_error_fails_the_task() -> None:
    def finish(task: TaskDef, result: SandboxResult) -> TaskResult:
        raise OutputError('output "dist/app" was not created')

    summary = Scheduler(
        plan(manifest(task("a"))), FakeBackend(), prepare=prepare, finish=finish
    ).run()
    (result,) = summary.results
    assert result.outcome is Outcome.FAILED
    assert result.status == "succeeded"  # what the sandbox said
    assert result.message == 'output "dist/app" was not created'


# Interruption


def test_ctrl_c_cancels_running_tasks_and_finishes_each_of_them() -> None:
    backend = FakeBackend(interrupt_on_wait={1})
    finished = run([task("a"), task("b"), task("c"), task("d")], backend, jobs=2)
    assert backend.cancel_calls == 1
    assert backend.running() == 0
    # Their temp folders get removed, and c's: it was prepared ahead (held).
    assert sorted(finished.finisher.finished) == ["a", "b", "c"]
    assert backend.prestarted == ["c"]
    assert finished.summary.interrupted
    assert not finished.summary.ok
    assert [r.outcome for r in finished.summary.results] == [Outcome.CANCELLED] * 4
    assert finished.result("c").message == "not started: the run was interrupted"
    assert finished.recorder.events[-1] == ("run_finished", "True")
    assert [e for e in finished.recorder.events if e[0] == "run_finished"] == [
        ("run_finished", "True")
    ]


def test_a_second_ctrl_c_does_not_abandon_the_drain() -> None:
    backend = FakeBackend(interrupt_on_wait={2, 3})
    finished = run([task("a"), task("b", "a"), task("c", "a")], backend, jobs=2)
    assert finished.outcome("a") is Outcome.SUCCEEDED
    assert backend.running() == 0
    assert finished.finisher.finished == ["a", "b", "c"]
    assert finished.summary.interrupted
    assert finished.summary.counts == {"succeeded": 1, "failed": 0, "skipped": 0, "cancelled": 2}


def test_ctrl_c_with_keep_going_cancels_rather_than_skips() -> None:
    backend = FakeBackend(interrupt_on_wait={1})
    finished = run([task("a"), task("b", "a")], backend, keep_going=True)
    assert finished.outcome("b") is Outcome.CANCELLED
    assert finished.result("b").message == "not started: the run was interrupted"


def test_ctrl_c_inside_an_observer_stops_the_run() -> None:
    class InterruptOnStart(Recorder):
        def task_started(self, name: str) -> None:
            super().task_started(name)
            if name == "b":
                raise KeyboardInterrupt

    backend = FakeBackend()
    recorder = InterruptOnStart()
    summary = Scheduler(
        plan(manifest(task("a"), task("b"), task("c"))),
        backend,
        prepare=prepare,
        finish=Finisher(),
        observers=[recorder],
        jobs=1,
        clock=backend.clock,
    ).run()
    assert summary.interrupted
    assert backend.started == ["a"]
    assert [r.outcome for r in summary.results] == [
        Outcome.SUCCEEDED,
        Outcome.CANCELLED,
        Outcome.CANCELLED,
    ]
    assert summary.results[1].message == "stopped: the run was interrupted"


def test_a_ready_task_starts_before_the_ended_one_is_finished() -> None:
    # a and b are independent: when a ends, b takes its slot before a's
    # outputs are moved (finishing is the slow part of the main loop).
    finished = run([task("a"), task("b")], jobs=1)
    events = [e for e in finished.recorder.events if e[0] in ("started", "finished")]
    assert events == [
        ("started", "a"),
        ("started", "b"),
        ("finished", "a", "succeeded"),
        ("finished", "b", "succeeded"),
    ]


def test_no_early_start_when_finishing_releases_a_more_urgent_task() -> None:
    # link (after compile) outranks lint: lint must wait for compile to be
    # finished, so link can go first.
    started = run(BUILD, jobs=1).backend.started
    assert started.index("link") < started.index("lint")


def test_no_early_start_after_a_failure() -> None:
    backend = FakeBackend().fail("a")
    finished = run([task("a"), task("b")], backend, jobs=1)
    assert finished.backend.started == ["a"]
    assert finished.outcome("b") is Outcome.CANCELLED


def test_the_next_task_is_prepared_while_the_slots_are_busy() -> None:
    backend = FakeBackend()
    finished = run([task("a"), task("b"), task("c")], backend, jobs=1)
    assert backend.prestarted == ["b", "c"]  # each one while its predecessor ran
    assert backend.started == ["a", "b", "c"]
    assert backend.max_running == 1
    assert finished.summary.ok


def test_a_prepared_task_waits_while_a_more_urgent_one_goes_first() -> None:
    # lint is prepared while compile runs; compile's end makes link ready,
    # which outranks lint: link starts first, lint stays prepared.
    backend = FakeBackend()
    run(BUILD, backend, jobs=1)
    assert backend.prestarted[0] == "lint"
    assert backend.started == ["compile", "link", "lint", "test"]


# Several sandboxes prepared ahead (a backend's ``lookahead``)


@dataclass
class AheadBackend(FakeBackend):
    """A fake that wants ``lookahead`` sandboxes prepared ahead, records the
    most it held at once, and can fail a sandbox's set-up before release."""

    lookahead: int = 3
    max_held: int = 0
    setup_fails: set[str] = field(default_factory=set)
    _failed: list[str] = field(default_factory=list)

    def prestart(self, spec: SandboxSpec) -> None:
        if spec.task in self.setup_fails:
            self.prestarted.append(spec.task)
            self._failed.append(spec.task)
            return
        super().prestart(spec)
        self.max_held = max(self.max_held, len(self.held))

    def wait(self, timeout: float | None = None) -> list[SandboxResult]:
        if self._failed and self.wait_calls + 1 not in self.interrupt_on_wait:
            self.wait_calls += 1
            failed, self._failed = self._failed, []
            return [SandboxResult(name, Status.SETUP_FAILED, None, 0.0, message="no image")
                    for name in failed]
        return super().wait(timeout)

    def running(self) -> int:
        return super().running() + len(self._failed)


def test_lookahead_one_holds_one_sandbox() -> None:
    backend = AheadBackend(lookahead=1)
    finished = run([task(f"t{i}") for i in range(5)], backend, jobs=1)
    assert backend.max_held == 1
    assert backend.prestarted == ["t1", "t2", "t3", "t4"]
    assert finished.summary.ok


def test_a_backend_with_lookahead_gets_that_many_prepared_ahead() -> None:
    backend = AheadBackend(lookahead=3)
    finished = run([task(f"t{i}") for i in range(6)], backend, jobs=2)
    # t0 and t1 start at once; t2..t4 are prepared while they run, and t5
    # as soon as one of those is released.
    assert backend.prestarted == ["t2", "t3", "t4", "t5"]
    assert backend.max_held == 3
    assert backend.started == [f"t{i}" for i in range(6)]
    assert backend.max_running == 2
    assert finished.summary.ok
    assert finished.summary.duration_s == 3.0  # six one-second tasks, two at a time


def test_a_task_that_outranks_every_held_one_goes_first() -> None:
    # lint is held while compile runs; compile's end makes link ready, which
    # outranks lint: link starts first even though lint is prepared.
    backend = AheadBackend(lookahead=2)
    run(BUILD, backend, jobs=1)
    assert backend.started == ["compile", "link", "lint", "test"]


def test_ctrl_c_with_several_held_finishes_each_held_sandbox() -> None:
    backend = AheadBackend(lookahead=3, interrupt_on_wait={1})
    finished = run([task(f"t{i}") for i in range(6)], backend, jobs=1)
    assert backend.prestarted == ["t1", "t2", "t3"]
    assert backend.running() == 0
    # Every sandbox, held or running, came back through ``finish`` (which
    # removes its folders); none of the held ones was released.
    assert sorted(finished.finisher.finished) == ["t0", "t1", "t2", "t3"]
    assert backend.started == ["t0"]
    assert [r.outcome for r in finished.summary.results] == [Outcome.CANCELLED] * 6
    for name in ("t1", "t2", "t3", "t4", "t5"):
        assert finished.result(name).message == "not started: the run was interrupted"


def test_a_failure_cancels_every_held_sandbox() -> None:
    backend = AheadBackend(lookahead=3).fail("t0")
    finished = run([task(f"t{i}") for i in range(5)], backend, jobs=1)
    assert backend.started == ["t0"]
    assert backend.held == {}
    assert sorted(finished.finisher.finished) == ["t0", "t1", "t2", "t3"]
    for name in ("t1", "t2", "t3", "t4"):
        assert finished.result(name).message == 'not started because ":t0" failed'


def test_a_held_sandbox_whose_set_up_fails_is_never_released() -> None:
    backend = AheadBackend(lookahead=2, setup_fails={"t1"})
    finished = run([task(f"t{i}") for i in range(4)], backend, jobs=1, keep_going=True)
    assert "t1" not in backend.started
    assert backend.started == ["t0", "t2", "t3"]
    assert finished.result("t1").status == "setup-failed"
    assert finished.outcome("t1") is Outcome.FAILED
    assert backend.max_running == 1
    assert ("started", "t1") in finished.recorder.events  # reported as a task that ran


def test_the_router_reports_the_largest_lookahead_of_the_backends_it_made() -> None:
    from hitz.executor.backends import Router

    router = Router({"namespace": lambda: AheadBackend(lookahead=1),
                     "docker": lambda: AheadBackend(lookahead=4)})
    assert router.lookahead == 1  # nothing made yet
    router.backend("namespace")
    assert router.lookahead == 1
    router.backend("docker")
    assert router.lookahead == 4
