"""What a run shows while it happens: three ``RunObserver``s.

``PlainProgress`` writes one line per finished task, for CI logs and other
non-terminals. ``LiveProgress`` keeps one redrawn status line at the bottom of
a terminal with finished tasks scrolling above it. ``JsonSummary`` writes one
JSON document when the run ends. The CLI picks them and their streams:
progress goes to stderr, only the JSON goes to stdout (STYLE 18). Observers
only watch; they never call back into the scheduler.

A plain line reads::

    [3/10] ok      :compile (0.42s)
    [4/10] FAILED  :link (exit 1, 0.10s)
        ld: cannot find -lfoo
      log: .hitz/logs/link.stderr
    10 tasks: 9 succeeded, 1 failed in 1.23s

A task served from the cache (up to date, or its outputs restored) ran
nothing, so it gets no line of its own, as Bazel counts cache hits rather
than listing them: it is counted in the ``[n/N]`` of the next line and in the
summary (``10000 tasks: 10000 succeeded (10000 from the cache) in 0.12s``).
A no-op run of 10,000 tasks then writes one line, not 10,000 flushed ones.
``--json`` still lists every task.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from hitz.executor.events import Outcome, RunSummary, TaskResult

__all__ = ["JsonSummary", "LiveProgress", "PlainProgress"]

# At most this many lines of a failed task's stderr are shown; the log has all.
TAIL_LINES = 20

_LABELS = {
    Outcome.SUCCEEDED: "ok",
    Outcome.FAILED: "FAILED",
    Outcome.SKIPPED: "skipped",
    Outcome.CANCELLED: "cancelled",
}
_LABEL_WIDTH = 7

# SGR colours, used only when the CLI asks for colour (a TTY and no NO_COLOR).
_COLORS = {
    Outcome.SUCCEEDED: "\x1b[32m",
    Outcome.FAILED: "\x1b[1;31m",
    Outcome.SKIPPED: "\x1b[33m",
    Outcome.CANCELLED: "\x1b[33m",
}
_RESET = "\x1b[0m"
# Carriage return, then erase to the end of the line (ECMA-48 EL, CSI K).
_CLEAR_LINE = "\r\x1b[K"

# A task's stderr is untrusted: escape sequences in it could retitle or
# rewrite the terminal, set the clipboard (OSC 52) or hide lines. Only
# printable text and tabs get through: CSI and OSC sequences, other escapes,
# C0 and C1 control characters are dropped.
_UNPRINTABLE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC, ended by BEL or ST
    r"|\x1b.?"  # any other escape
    r"|[\x00-\x08\x0a-\x1f\x7f-\x9f]"  # C0 (but tab), DEL, C1
)


class _Observer:
    """Ignores every event; observers override the ones they show."""

    def task_planned(self, name: str, priority: float) -> None:
        pass

    def task_started(self, name: str) -> None:
        pass

    def task_finished(self, result: TaskResult) -> None:
        pass

    def run_finished(self, summary: RunSummary) -> None:
        pass


class PlainProgress(_Observer):
    """One line per finished task, a failure's stderr tail and logs, a final count.

    Plain text only, flushed after every event so CI shows it as it happens.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._total = 0
        self._done = 0

    def task_planned(self, name: str, priority: float) -> None:
        self._total += 1

    def task_finished(self, result: TaskResult) -> None:
        self._done += 1
        if _from_cache(result):
            return  # counted in the next line and in the summary
        lines = _result_lines(self._done, self._total, result, _plain_label)
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()

    def run_finished(self, summary: RunSummary) -> None:
        self._stream.write(summary_line(summary) + "\n")
        self._stream.flush()


class LiveProgress(_Observer):
    """A status line redrawn in place, finished tasks scrolling above it.

    ``color``: paint the outcome labels (the CLI decides: a TTY and no
    ``NO_COLOR``). Without colour the only control codes written are the
    line redraw (carriage return, erase line). ``width``: the terminal's
    columns (default: asked of ``stream``, else 80). ``now`` and ``interval``
    throttle redraws: a started task redraws the status line at most every
    ``interval`` seconds, so a burst of thousands of starts costs few writes;
    a finished task always writes, since its line has to appear.
    """

    def __init__(
        self,
        stream: TextIO,
        color: bool,
        *,
        width: int | None = None,
        now: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self._stream = stream
        self._color = color
        self._width = width
        self._now = now
        self._interval = interval
        self._total = 0
        self._done = 0
        self._running: dict[str, None] = {}  # in start order
        self._last_draw = -math.inf
        self._status_shown = False

    def task_planned(self, name: str, priority: float) -> None:
        self._total += 1

    def task_started(self, name: str) -> None:
        self._running[name] = None
        if self._now() - self._last_draw >= self._interval:
            self._draw([])

    def task_finished(self, result: TaskResult) -> None:
        self._running.pop(result.name, None)
        self._done += 1
        if _from_cache(result):  # no line of its own: redraw the count, throttled
            if self._now() - self._last_draw >= self._interval:
                self._draw([])
            return
        label = self._painted_label if self._color else _plain_label
        self._draw(_result_lines(self._done, self._total, result, label))

    def run_finished(self, summary: RunSummary) -> None:
        clear = _CLEAR_LINE if self._status_shown else ""
        self._stream.write(clear + summary_line(summary) + "\n")
        self._stream.flush()
        self._status_shown = False

    def _draw(self, above: list[str]) -> None:
        """Erase the status line, print ``above`` (if any), draw the status line."""
        text = _CLEAR_LINE if self._status_shown else ""
        if above:
            text += "\n".join(above) + "\n"
        text += self._status()
        self._stream.write(text)
        self._stream.flush()
        self._status_shown = True
        self._last_draw = self._now()

    def _status(self) -> str:
        status = f"[{self._done}/{self._total}]"
        if self._running:
            status += " running " + ", ".join(f":{name}" for name in self._running)
        # Stay one column short of the edge: writing the last column wraps
        # the cursor on some terminals and the redraw would then leave a line.
        width = (self._width or _columns(self._stream)) - 1
        if len(status) > width:
            status = status[: max(width - 1, 0)] + "…"
        return status

    @staticmethod
    def _painted_label(outcome: Outcome) -> str:
        label = _LABELS[outcome]
        return _COLORS[outcome] + label + _RESET + " " * (_LABEL_WIDTH - len(label))


class JsonSummary(_Observer):
    """At the end of the run, one JSON document (for ``--json``, on stdout)::

    {"project", "ok", "interrupted", "duration_s", "counts": {outcome: n},
     "tasks": [{"name", "outcome", "status", "exit_code", "duration_s",
                "message", "logs"}]}

    Tasks are in the summary's order (the plan's topological order); every
    outcome has a count, zero included. A task served from the cache, up to
    date or restored, has ``"status": "cached"``, ``"cached": true`` and
    ``"cached_from"``: ``"local"``, or ``"remote"`` when this run fetched it
    from the remote cache (``null`` for a task that was not cached).

    Each task is one line: ``json`` encodes a document without ``indent`` in
    C, and with it in Python, 5 times slower (0.1 s for 10,000 tasks).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def run_finished(self, summary: RunSummary) -> None:
        head: dict[str, Any] = {
            "project": summary.project,
            "ok": summary.ok,
            "interrupted": summary.interrupted,
            "duration_s": round(summary.duration_s, 3),
            "counts": _counts(summary.results),
        }
        encode = json.JSONEncoder().encode
        lines = [f"  {encode(key)}: {encode(value)}," for key, value in head.items()]
        tasks = [
            "    " + encode({
                "name": result.name,
                "outcome": result.outcome.value,
                "status": result.status,
                "exit_code": result.exit_code,
                "duration_s": round(result.duration_s, 3),
                "message": result.message,
                "logs": list(result.log_paths),
                "cached": result.cached,
                "cached_from": _cached_from(result),
                "action_digest": result.action_digest,
                "enforced": dict(result.enforced) if result.enforced else None,
                "weakened": list(result.weakened),
            })
            for result in summary.results
        ]
        body = ",\n".join(tasks)
        self._stream.write("{\n" + "\n".join(lines) + '\n  "tasks": ['
                           + (f"\n{body}\n  " if tasks else "") + "]\n}\n")
        self._stream.flush()


def summary_line(summary: RunSummary) -> str:
    """``10 tasks: 9 succeeded, 1 failed in 1.23s`` (zero counts left out)."""
    total = len(summary.results)
    line = f"{total} task{'' if total == 1 else 's'}"
    counts = [f"{n} {outcome}" for outcome, n in _counts(summary.results).items() if n]
    if counts:
        line += ": " + ", ".join(counts)
    cached = sum(1 for r in summary.results if r.cached)
    remote = sum(1 for r in summary.results if r.cached and r.cached_from == "remote")
    if cached:
        line += f" ({cached} from the cache" + (f", {remote} remote)" if remote else ")")
    line += f" in {format_seconds(summary.duration_s)}"
    if summary.interrupted:
        line += " (interrupted)"
    return line


def format_seconds(seconds: float) -> str:
    """``0.42s`` under a minute, then ``2m05s``, then ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.2f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _result_lines(
    done: int, total: int, result: TaskResult, label: Callable[[Outcome], str]
) -> list[str]:
    """The line for a finished task; for a failure, its message, stderr tail and logs."""
    lines = [f"[{done}/{total}] {label(result.outcome)} :{result.name} ({_how(result)})"]
    if result.weakened:
        # A policy weaker than the default is shown wherever the task is.
        lines[0] += f" [weakened: {', '.join(result.weakened)}]"
    if result.outcome is not Outcome.FAILED:
        return lines
    # For a plain non-zero exit or signal the first line already says it all.
    if result.message and result.status != "failed":
        lines.append("  " + _printable(result.message))
    if result.stderr_tail:
        tail = result.stderr_tail.rstrip("\n").split("\n")[-TAIL_LINES:]
        lines.extend("    " + _printable(line) for line in tail)
    lines.extend(f"  log: {path}" for path in result.log_paths)
    return lines


def _how(result: TaskResult) -> str:
    """What goes in parentheses after the task's name."""
    took = format_seconds(result.duration_s)
    if result.outcome is Outcome.SUCCEEDED:
        if not result.cached:
            return took
        return f"cached (remote), {took}" if result.cached_from == "remote" else f"cached, {took}"
    if result.outcome is not Outcome.FAILED:
        return _printable(result.message or result.status)
    code = result.exit_code
    if result.status == "failed" and code is not None:
        return f"exit {code}, {took}" if code >= 0 else f"killed by {_signal_name(-code)}, {took}"
    return f"{result.status.replace('-', ' ')}, {took}"  # "timed out", "setup failed"


def _cached_from(result: TaskResult) -> str | None:
    """Which cache served ``result``: "local" or "remote"; None if it ran."""
    if not result.cached:
        return None
    return result.cached_from or "local"


def _from_cache(result: TaskResult) -> bool:
    """A task the local cache served: no line of its own, only a count. A
    remote hit has its line (``cached (remote)``): it moved bytes over the
    network, and says where the result came from."""
    return result.cached and result.outcome is Outcome.SUCCEEDED \
        and result.cached_from != "remote"


def _plain_label(outcome: Outcome) -> str:
    return f"{_LABELS[outcome]:<{_LABEL_WIDTH}}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub("", text)


def _counts(results: Iterable[TaskResult]) -> dict[str, int]:
    counts = {outcome.value: 0 for outcome in Outcome}
    for result in results:
        counts[result.outcome.value] += 1
    return counts


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):  # not a terminal, or no file descriptor (StringIO)
        return 80
