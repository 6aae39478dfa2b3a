"""The events a run emits, and the protocol every observer implements.

The scheduler calls these in order: ``task_planned`` for every task of the
run (in priority order), then ``task_started`` / ``task_finished`` as tasks
run, then ``run_finished`` once. Observers (progress display, JSON summary,
later reports and tracing) only watch: they never call back into the
scheduler, and an observer must not raise.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # non-zero exit, killed, timed out, missing output, setup failure
    SKIPPED = "skipped"  # not run because a dependency failed (with --keep-going)
    CANCELLED = "cancelled"  # not run or stopped: fail-fast, Ctrl-C, SIGTERM


@dataclass(frozen=True, slots=True)
class TaskResult:
    """How one task of the run ended, in the user's terms.

    ``status`` is the sandbox's finer status (``hitz.sandbox.spec.Status``
    value) or "skipped"; ``exit_code``: None = did not run to an exit, >= 0 =
    exit status, < 0 = killed by signal -n. ``message`` explains any outcome
    other than SUCCEEDED. ``log_paths`` are the task's stdout/stderr files.
    """

    name: str
    outcome: Outcome
    status: str
    exit_code: int | None = None
    duration_s: float = 0.0
    message: str | None = None
    stderr_tail: str | None = None
    log_paths: Sequence[str] = ()
    cached: bool = False  # outputs restored from the cache; no sandbox started
    cached_from: str | None = None  # with cached: "local" (up to date, local cache) or "remote"
    action_digest: str | None = None  # the task's cache key, "hash/size"
    enforced: Mapping[str, str] | None = None  # what the sandbox enforced (None: no sandbox)
    weakened: Sequence[str] = ()  # what of the default policy the task went without


@dataclass(frozen=True, slots=True)
class RunSummary:
    project: str
    results: Sequence[TaskResult]
    duration_s: float
    interrupted: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(
            r.outcome is Outcome.SUCCEEDED for r in self.results
        )


class RunObserver(Protocol):
    def task_planned(self, name: str, priority: float) -> None: ...

    def task_started(self, name: str) -> None: ...

    def task_finished(self, result: TaskResult) -> None: ...

    def run_finished(self, summary: RunSummary) -> None: ...
