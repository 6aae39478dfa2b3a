"""One SandboxBackend in front of several: each spec goes to the backend its
``spec.backend`` names.

Backends are created on first use, so a run whose tasks all come from the
cache imports neither the namespace sandbox nor the Docker SDK. The router
remembers which backend holds each task (for ``release`` and ``cancel``).
Its ``wait`` works with tasks running in several backends at once: with
one busy backend it simply waits there; with more, it takes turns, each
backend waiting at most ``SLICE_S`` (a short, not a busy, poll: a result
that arrives in one backend is seen within a slice while another blocks).

Registered: "namespace" and "docker"; "remote" is registered by the command
line (``register``) with a factory of ``hitz.executor.remote_exec``'s
``RemoteBackend`` that knows the executor's address. ``register`` adds or
replaces a factory (tests, a future backend).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hitz.executor.errors import SandboxError
from hitz.sandbox.spec import SandboxBackend, SandboxResult, SandboxSpec

SLICE_S = 0.05  # the longest one backend waits while another has tasks too

Factory = Callable[[], SandboxBackend]


def _namespace() -> SandboxBackend:
    from hitz.sandbox.namespace import NamespaceBackend

    return NamespaceBackend()


def _docker() -> SandboxBackend:
    from hitz.sandbox.docker import DockerBackend

    return DockerBackend()


def _remote() -> SandboxBackend:
    # The command line registers the real factory (it needs the executor's
    # address, see executor/remote_exec.py); this one only says so.
    raise SandboxError(
        'backend = "remote" needs a remote executor, and none is set for this run',
        hint="set [remote] executor in the manifest, or pass `--remote-executor URL`",
    )


FACTORIES: dict[str, Factory] = {"namespace": _namespace, "docker": _docker, "remote": _remote}


class Router:
    """A SandboxBackend that dispatches to per-kind backends, made lazily."""

    def __init__(self, factories: dict[str, Factory] | None = None) -> None:
        self._factories = dict(FACTORIES if factories is None else factories)
        self._backends: dict[str, SandboxBackend] = {}
        self._owner: dict[str, str] = {}  # task -> backend name, until its result is out

    def register(self, name: str, factory: Factory) -> None:
        self._factories[name] = factory

    def backend(self, name: str) -> SandboxBackend:
        """The backend called ``name``, created on first use."""
        made = self._backends.get(name)
        if made is None:
            factory = self._factories.get(name)
            if factory is None:
                raise SandboxError(f"unknown sandbox backend `{name}`",
                                   hint=f"known: {', '.join(sorted(self._factories))}")
            made = self._backends[name] = factory()
        return made

    @property
    def lookahead(self) -> int:
        """How many sandboxes the scheduler should prepare ahead: the most
        any backend made so far wants (1 before the first is made). The
        scheduler cannot know a task's backend before preparing it, so in a
        run mixing backends the namespace sandbox may hold as many as the
        docker backend asks for; it holds any number."""
        return max((int(getattr(b, "lookahead", 1)) for b in self._backends.values()),
                   default=1)

    # --- SandboxBackend ---------------------------------------------------
    def start(self, spec: SandboxSpec) -> None:
        self.backend(spec.backend).start(spec)
        self._owner[spec.task] = spec.backend

    def prestart(self, spec: SandboxSpec) -> None:
        self.backend(spec.backend).prestart(spec)
        self._owner[spec.task] = spec.backend

    def release(self, task: str) -> None:
        self._backends[self._owner[task]].release(task)

    def cancel(self, task: str) -> None:
        self._backends[self._owner[task]].cancel(task)

    def wait(self, timeout: float | None = None) -> list[SandboxResult]:
        busy = [b for b in self._backends.values() if b.running()]
        if not busy:
            return []
        if len(busy) == 1:
            return self._forget(busy[0].wait(timeout))
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            for backend in busy:
                left = SLICE_S if end is None else max(0.0, min(SLICE_S, end - time.monotonic()))
                results = backend.wait(left)
                if results:
                    return self._forget(results)
            if end is not None and time.monotonic() >= end:
                return []

    def running(self) -> int:
        return sum(b.running() for b in self._backends.values())

    def cancel_all(self) -> None:
        for backend in self._backends.values():
            backend.cancel_all()

    def close(self) -> None:
        """Close every backend that was made, even if one fails to."""
        failure: BaseException | None = None
        for backend in self._backends.values():
            try:
                backend.close()
            except BaseException as exc:  # close the others first, then report it
                failure = failure or exc
        if failure is not None:
            raise failure

    def _forget(self, results: list[SandboxResult]) -> list[SandboxResult]:
        for result in results:
            self._owner.pop(result.task, None)
        return results
