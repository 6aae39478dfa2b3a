"""A recording in-memory sandbox backend and a manual clock.

``FakeBackend`` runs nothing: every started spec "takes" a number of fake
seconds on a ``ManualClock``, and ``wait()`` jumps the clock to the earliest
end and returns what ended then. Tests tell it which tasks fail, how long
tasks take and on which ``wait()`` call a Ctrl-C arrives, then read back what
it started, in which order and how many ran at once. Nothing sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hitz.sandbox.spec import SandboxResult, SandboxSpec, Status


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.time += seconds


@dataclass
class FakeBackend:
    """A ``SandboxBackend`` that records what it was asked to do.

    Knobs: ``take(name, seconds)`` (default 1 fake second per task),
    ``fail(name, exit_code)``, ``interrupt_on_wait`` (1-based numbers of the
    ``wait()`` calls that raise KeyboardInterrupt instead of waiting).
    Records: ``specs`` and ``started`` (start order), ``max_running``,
    ``wait_calls``, ``cancel_calls``, ``closed``.
    """

    clock: ManualClock = field(default_factory=ManualClock)
    durations: dict[str, float] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    interrupt_on_wait: set[int] = field(default_factory=set)

    specs: list[SandboxSpec] = field(default_factory=list)
    max_running: int = 0
    wait_calls: int = 0
    cancel_calls: int = 0
    closed: bool = False
    prestarted: list[str] = field(default_factory=list)  # prestart order
    held: dict[str, SandboxSpec] = field(default_factory=dict)  # prestarted, not released
    # name -> (started at, ends at), in start order
    _running: dict[str, tuple[float, float]] = field(default_factory=dict)
    _dropped: list[str] = field(default_factory=list)  # held, then cancelled
    _cancelled: bool = False

    def take(self, name: str, seconds: float) -> FakeBackend:
        self.durations[name] = seconds
        return self

    def fail(self, name: str, exit_code: int = 1) -> FakeBackend:
        self.exit_codes[name] = exit_code
        return self

    @property
    def started(self) -> list[str]:
        return [spec.task for spec in self.specs]

    # The SandboxBackend protocol.

    def start(self, spec: SandboxSpec) -> None:
        assert spec.task not in self._running, f"{spec.task} started twice"
        self.specs.append(spec)
        now = self.clock.now()
        self._running[spec.task] = (now, now + self.durations.get(spec.task, 1.0))
        self.max_running = max(self.max_running, len(self._running))

    def prestart(self, spec: SandboxSpec) -> None:
        self.prestarted.append(spec.task)
        self.held[spec.task] = spec

    def release(self, task: str) -> None:
        self.start(self.held.pop(task))

    def cancel(self, task: str) -> None:
        del self.held[task]
        self._dropped.append(task)

    def wait(self, timeout: float | None = None) -> list[SandboxResult]:
        self.wait_calls += 1
        if self.wait_calls in self.interrupt_on_wait:
            raise KeyboardInterrupt
        if self._dropped:
            dropped, self._dropped = self._dropped, []
            return [SandboxResult(name, Status.CANCELLED, None, 0.0, message="cancelled")
                    for name in dropped]
        if not self._running:
            return []
        if self._cancelled:
            ended = list(self._running)
        else:
            end = min(ends for _, ends in self._running.values())
            self.clock.advance(end - self.clock.now())
            ended = [name for name, (_, ends) in self._running.items() if ends == end]
        return [self._result(name) for name in ended]

    def running(self) -> int:
        return len(self._running) + len(self.held) + len(self._dropped)

    def cancel_all(self) -> None:
        self.cancel_calls += 1
        self._cancelled = True
        for task in list(self.held):
            self.cancel(task)

    def close(self) -> None:
        self.closed = True

    def _result(self, name: str) -> SandboxResult:
        started_at, _ = self._running.pop(name)
        duration = self.clock.now() - started_at
        if self._cancelled:
            return SandboxResult(name, Status.CANCELLED, -15, duration, message="cancelled")
        code = self.exit_codes.get(name, 0)
        status = Status.SUCCEEDED if code == 0 else Status.FAILED
        message = None if code == 0 else f"exited with status {code}"
        return SandboxResult(name, status, code, duration, message=message)
