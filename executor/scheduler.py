"""Run a plan's tasks on a sandbox backend, highest priority first.

The scheduler owns the order of work and nothing else: ``prepare`` turns a
task into a ``SandboxSpec`` (or into its ``TaskResult`` at once, when the
cache holds it), the backend runs it, ``finish`` turns the
backend's result into the task's ``TaskResult`` (promoting outputs, deciding
the outcome). Observers watch through ``RunObserver`` events. There is no file
I/O and no sleeping here: time comes from a ``Clock`` and from the backend's
results, so tests drive it with a fake backend and a manual clock.

Failure policy, as in ninja: by default the first failure stops new work,
running tasks finish and the never-started ones are CANCELLED. With
``keep_going`` everything that does not need a failed task still runs, and
the tasks that do are SKIPPED. Ctrl-C / SIGTERM (a ``KeyboardInterrupt``)
cancels everything, drains the backend and still returns a summary.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from hitz.executor.errors import HitzError
from hitz.executor.events import Outcome, RunObserver, RunSummary, TaskResult
from hitz.executor.model import TaskDef
from hitz.executor.planner import Plan
from hitz.sandbox.spec import SandboxBackend, SandboxResult, SandboxSpec, Status

__all__ = ["DEFAULT_JOBS", "Clock", "MonotonicClock", "Scheduler"]

DEFAULT_JOBS = os.cpu_count() or 1


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


_MONOTONIC = MonotonicClock()


class Scheduler:
    """Runs every task of ``plan`` at most once; see the module docstring.

    ``jobs``: how many tasks may run at once (at least 1). Besides those,
    the sandboxes of up to ``backend.lookahead`` ready tasks (1 if the
    backend has no such attribute) are prepared ahead and held until a
    slot frees. ``project`` is copied into the summary. One ``run()`` per scheduler; the caller owns
    ``backend`` and closes it.
    """

    def __init__(
        self,
        plan: Plan,
        backend: SandboxBackend,
        *,
        prepare: Callable[[TaskDef], SandboxSpec | TaskResult],
        finish: Callable[[TaskDef, SandboxResult], TaskResult],
        observers: Sequence[RunObserver] = (),
        jobs: int = DEFAULT_JOBS,
        keep_going: bool = False,
        clock: Clock = _MONOTONIC,
        project: str = "",
    ) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self._plan = plan
        self._backend = backend
        self._prepare = prepare
        self._finish = finish
        self._observers = tuple(observers)
        self._jobs = jobs
        self._keep_going = keep_going
        self._clock = clock
        self._project = project
        # Ties in priority go to the task declared first.
        self._rank = {name: index for index, name in enumerate(plan.tasks)}

        # Run state.
        self._results: dict[str, TaskResult] = {}
        # How many of its deps each task still waits for.
        self._waiting_on = {name: len(task.deps) for name, task in plan.tasks.items()}
        self._ready: list[tuple[float, int, str]] = []  # heap of (-priority, rank, name)
        self._running: dict[str, float] = {}  # name -> clock time it started
        self._ended: list[SandboxResult] = []  # returned by wait(), not yet finished
        self._first_failure: str | None = None
        self._started_at: float | None = None
        self._interrupted = False  # Ctrl-C or SIGTERM arrived
        self._held: list[str] = []  # prepared ahead by the backend, not started
        self._unreleased: set[str] = set()  # prepared ahead and never started
        self._announcing: str | None = None  # being released, task_started emitted
        self._stopped: set[str] = set()  # announced as started, cancelled before it ran
        self._absorb_interrupts = False  # set once a Ctrl-C can no longer stop anything

    def run(self) -> RunSummary:
        """Run the plan and return its summary; never raises KeyboardInterrupt.

        Exceptions from ``prepare``/``finish`` other than ``HitzError``, and
        from the backend, are bugs and propagate. One run per scheduler.
        """
        if self._started_at is not None:
            raise RuntimeError("Scheduler.run() called twice")
        self._started_at = self._clock.now()
        try:
            for name in sorted(self._plan.tasks, key=self._ready_key):
                self._planned(name)
            self._schedule()
        except KeyboardInterrupt:
            self._interrupted = True
            self._drain()
        summary = self._summarize()
        self._emit(lambda o: o.run_finished(summary))
        return summary

    def _schedule(self) -> None:
        for name, count in self._waiting_on.items():
            if count == 0:
                heapq.heappush(self._ready, self._ready_key(name))
        while True:
            self._fill()
            if not self._running:
                return
            self._ended.extend(self._backend.wait())
            # Keep the slots busy: when every task that just ended succeeded,
            # start what is already ready before the slower work of finishing
            # them (moving outputs); a failure must be seen first (fail-fast).
            if self._may_start_early():
                self._fill()
            self._finish_ended()

    def _may_start_early(self) -> bool:
        """May ready tasks start before the ended ones are finished? Only if
        they all succeeded (a failure stops new starts) and finishing them
        releases no task that outranks the best one ready now."""
        candidates = [self._ready[0]] if self._ready else []
        candidates += [self._ready_key(name) for name in self._held]
        if not candidates or not all(e.status is Status.SUCCEEDED for e in self._ended):
            return False
        best = min(candidates)
        released: dict[str, int] = {}
        for ended in self._ended:
            for dep in self._plan.dependents.get(ended.task, ()):
                released[dep] = released.get(dep, 0) + 1
        return not any(
            self._waiting_on[name] == count and self._ready_key(name) < best
            for name, count in released.items()
        )

    def _fill(self) -> None:
        """Start ready tasks, highest priority first, while slots are free,
        then prepare the next ones ahead (see ``_hold``). A task that ended
        but is not finished yet no longer holds a slot; a held one never did,
        and one whose result came back before its release is not released.
        """
        while not self._stopping:
            ended = {e.task for e in self._ended}
            busy = sum(name not in ended and name not in self._held for name in self._running)
            if busy >= self._jobs:
                break
            held = min((h for h in self._held if h not in ended), key=self._ready_key,
                       default=None)
            if held is not None and (not self._ready or self._ready_key(held) < self._ready[0]):
                self._held.remove(held)
                self._running[held] = self._clock.now()
                self._announcing = held
                self._started(held)  # a Ctrl-C may land here
                self._backend.release(held)
                self._announcing = None
                self._unreleased.discard(held)
            elif self._ready:
                self._start(heapq.heappop(self._ready)[2])
            else:
                break
        self._hold()

    def _hold(self) -> None:
        """Build the sandboxes of the best ready tasks now, while the slots
        are busy, so that each starts the moment a slot frees (the set-up
        of a sandbox is time a slot would otherwise sit idle). The backend
        says how many it wants prepared ahead (``_lookahead``). A held task
        is started and observed only when released."""
        if self._stopping:
            while self._held:
                self._backend.cancel(self._held.pop())  # its result comes back CANCELLED
            return
        while len(self._held) < self._lookahead() and self._ready and not self._stopping:
            name = heapq.heappop(self._ready)[2]
            try:
                prepared = self._prepare(self._plan.tasks[name])
            except HitzError as exc:
                self._running[name] = self._clock.now()
                self._started(name)
                self._fail_unstarted(name, exc)
                continue
            if isinstance(prepared, TaskResult):  # from the cache: done already
                self._started(name)
                self._record(prepared)
                continue
            self._backend.prestart(prepared)
            self._held.append(name)
            self._unreleased.add(name)
            self._running[name] = self._clock.now()

    def _drain(self) -> None:
        """After Ctrl-C: cancel the running tasks and finish each of them.

        ``finish`` is where a task's temporary folders are removed, so every
        result the backend still owes has to come back through it; a second
        Ctrl-C only restarts this loop.
        """
        self._absorb_interrupts = True
        cancelled = False
        while True:
            try:
                if not cancelled:
                    self._backend.cancel_all()
                    cancelled = True
                self._finish_ended()
                if self._backend.running() == 0:
                    return
                self._ended.extend(self._backend.wait())
            except KeyboardInterrupt:
                continue

    def _lookahead(self) -> int:
        """How many sandboxes the backend wants prepared ahead: its
        ``lookahead`` attribute, read each time (a router learns it only
        once it made the backend a task uses), at least 1. The namespace
        sandbox wants 1 (its set-up is a few milliseconds); the docker
        backend more, since the engine starts several containers at once
        faster than one after another."""
        return max(1, int(getattr(self._backend, "lookahead", 1)))

    @property
    def _stopping(self) -> bool:
        return self._interrupted or (self._first_failure is not None and not self._keep_going)

    def _ready_key(self, name: str) -> tuple[float, int, str]:
        return (-self._plan.priority[name], self._rank[name], name)

    def _start(self, name: str) -> None:
        task = self._plan.tasks[name]
        self._running[name] = self._clock.now()
        self._emit(lambda o: o.task_started(name))
        try:
            prepared = self._prepare(task)
            if isinstance(prepared, TaskResult):
                # Served from the cache: done without a sandbox.
                self._running.pop(name)
                self._record(prepared)
            else:
                self._backend.start(prepared)
        except HitzError as exc:
            self._fail_unstarted(name, exc)

    def _fail_unstarted(self, name: str, exc: HitzError) -> None:
        """The sandbox was never entered: fail the task here, not the run."""
        started_at = self._running.pop(name)
        self._record(
            TaskResult(
                name=name,
                outcome=Outcome.FAILED,
                status=Status.SETUP_FAILED.value,
                duration_s=self._clock.now() - started_at,
                message=exc.message,
            )
        )

    def _finish_ended(self) -> None:
        # Pop before finishing: a Ctrl-C inside ``finish`` must not make the
        # drain finish the same result twice.
        while self._ended:
            ended = self._ended.pop(0)
            if self._running.pop(ended.task, None) is None:
                continue  # not ours, or already finished
            task = self._plan.tasks[ended.task]
            if ended.task in self._unreleased:
                # Prepared ahead, never started: ``finish`` still cleans up.
                self._unreleased.discard(ended.task)
                if ended.task in self._held:
                    self._held.remove(ended.task)
                if ended.status is Status.CANCELLED:
                    with contextlib.suppress(HitzError):
                        self._finish(task, ended)
                    if ended.task == self._announcing:
                        self._stopped.add(ended.task)  # observers saw it start
                    continue  # reported with the never-started tasks
                self._started(task.name)  # its set-up failed
            try:
                result = self._finish(task, ended)
            except HitzError as exc:
                result = TaskResult(
                    name=task.name,
                    outcome=Outcome.FAILED,
                    status=ended.status.value,
                    exit_code=ended.exit_code,
                    duration_s=ended.duration_s,
                    message=exc.message,
                )
            self._record(result)

    def _record(self, result: TaskResult) -> None:
        """Store a task's result, tell the observers, release or skip what needs it."""
        self._results[result.name] = result
        self._finished(result)
        if result.outcome is Outcome.SUCCEEDED:
            for dependent in self._plan.dependents[result.name]:
                self._waiting_on[dependent] -= 1
                if self._waiting_on[dependent] == 0:
                    heapq.heappush(self._ready, self._ready_key(dependent))
            return
        if self._interrupted:
            return  # cancelled by the drain: what needs it is cancelled, not skipped
        if self._first_failure is None:
            self._first_failure = result.name
        if self._keep_going:
            self._skip_dependents(result.name)

    def _skip_dependents(self, failed: str) -> None:
        """Mark every task that needs ``failed``, directly or not, SKIPPED."""
        queue = list(self._plan.dependents[failed])
        for name in queue:  # the loop also visits what it appends
            if name in self._results:
                continue  # already skipped through another path
            result = TaskResult(
                name=name,
                outcome=Outcome.SKIPPED,
                status="skipped",
                message=f'dependency ":{failed}" failed',
            )
            self._results[name] = result
            self._finished(result)
            queue.extend(self._plan.dependents[name])

    def _summarize(self) -> RunSummary:
        """Mark every task without a result CANCELLED, then sum up the run."""
        self._absorb_interrupts = True
        while True:
            try:
                self._cancel_unfinished()
                break
            except KeyboardInterrupt:  # raised outside an observer: resume
                self._interrupted = True
        assert self._started_at is not None
        return RunSummary(
            project=self._project,
            results=[self._results[name] for name in self._plan.order],
            duration_s=self._clock.now() - self._started_at,
            interrupted=self._interrupted,
            counts=_counts(self._results.values()),
        )

    def _cancel_unfinished(self) -> None:
        for name in self._plan.order:
            if name in self._results:
                continue
            result = TaskResult(
                name=name,
                outcome=Outcome.CANCELLED,
                status=Status.CANCELLED.value,
                message=self._cancel_message(name),
            )
            self._results[name] = result
            self._finished(result)

    def _cancel_message(self, name: str) -> str:
        if name in self._running or name in self._stopped:  # started, never ran to an end
            return "stopped: the run was interrupted"
        if self._interrupted:
            return "not started: the run was interrupted"
        if self._first_failure is not None:
            return f'not started because ":{self._first_failure}" failed'
        return "not started"

    def _started(self, name: str) -> None:
        self._emit(lambda o: o.task_started(name))

    def _planned(self, name: str) -> None:
        priority = self._plan.priority[name]
        self._emit(lambda o: o.task_planned(name, priority))

    def _finished(self, result: TaskResult) -> None:
        self._emit(lambda o: o.task_finished(result))

    def _emit(self, event: Callable[[RunObserver], None]) -> None:
        for observer in self._observers:
            try:
                event(observer)
            except KeyboardInterrupt:
                # While draining or summing up, a further Ctrl-C must not cut
                # the run short of its summary; before that, it stops the run.
                if not self._absorb_interrupts:
                    raise


def _counts(results: Iterable[TaskResult]) -> dict[str, int]:
    counts = {outcome.value: 0 for outcome in Outcome}
    for result in results:
        counts[result.outcome.value] += 1
    return counts
