"""How long each task took the last time it succeeded.

The planner uses these durations as task weights for critical-path priority
(``planner.task_weight``). They live in the project's state folder as
``<project>/.hitz/history.json``::

    {"version": 1, "durations": {"compile": 0.42, "test": 3.1}}

History is advice, never a source of truth: a missing, unreadable or corrupt
file reads as empty, and a failure to write it does not fail the run. Only
tasks that ran are timed: a task served from the cache says nothing about
how long it takes, and a run in which nothing ran leaves the file alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from hitz.executor.events import Outcome, RunSummary

__all__ = ["HISTORY_FILE", "History"]

HISTORY_FILE = "history.json"
_VERSION = 1

log = logging.getLogger(__name__)


class History:
    """Task durations of earlier runs, read from and written to ``state_dir``."""

    def __init__(self, path: Path, durations: Mapping[str, float] | None = None) -> None:
        self.path = path
        self._durations: dict[str, float] = dict(durations or {})
        self._changed = False  # since loaded: save() has something to write

    @classmethod
    def load(cls, state_dir: Path) -> History:
        """The history in ``state_dir``; empty if the file is missing or unreadable.

        Never raises: entries that are not a task name with a finite,
        non-negative number of seconds are dropped.
        """
        path = state_dir / HISTORY_FILE
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
            return cls(path)
        durations = document.get("durations") if isinstance(document, dict) else None
        if not isinstance(durations, dict):
            return cls(path)
        # Exact type tests, not isinstance: True is an int, and this loop
        # runs once per task of a 10,000-task manifest on every run.
        return cls(
            path,
            {
                name: float(seconds)
                for name, seconds in durations.items()
                if (type(seconds) is float and 0 <= seconds < math.inf)  # NaN compares False
                or (type(seconds) is int and seconds >= 0)
            },
        )

    @property
    def durations(self) -> Mapping[str, float]:
        """Task name -> seconds of its last successful run (read-only)."""
        return MappingProxyType(self._durations)

    def record(self, name: str, seconds: float) -> None:
        """Remember that ``name`` just succeeded in ``seconds``."""
        if self._durations.get(name) != seconds:
            self._durations[name] = seconds
            self._changed = True

    def record_run(self, summary: RunSummary) -> None:
        """Record the duration of every task of ``summary`` that ran and succeeded.

        Failed, skipped and cancelled tasks keep their previous duration: a
        task that fails early says nothing about how long it takes; nor does
        one served from the cache, which took no time at all.
        """
        for result in summary.results:
            if result.outcome is Outcome.SUCCEEDED and not result.cached:
                self.record(result.name, result.duration_s)

    def save(self) -> bool:
        """Write the history atomically (temp file + rename), creating the
        folder; nothing if no duration changed since it was loaded.

        Returns False, after logging a warning, if it could not be written.
        """
        if not self._changed and self.path.exists():
            return True
        import tempfile  # ~4 ms, for the runs that write

        document = {"version": _VERSION, "durations": dict(sorted(self._durations.items()))}
        data = json.dumps(document, indent=1).encode() + b"\n"
        temp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".history-", suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            # No fsync: after a crash the worst case is a corrupt file, which
            # loads as empty history, and a run should not pay for a disk flush.
            os.replace(temp, self.path)
            self._changed = False
        except OSError as exc:
            log.warning("could not save task durations to %s: %s", self.path, exc)
            if temp is not None:
                Path(temp).unlink(missing_ok=True)
            return False
        return True
