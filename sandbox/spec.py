"""What the executor hands a sandbox backend, and what it gets back.

This is the one interface between ``hitz.executor`` and ``hitz.sandbox``: the
executor prepares a ``SandboxSpec`` (everything resolved to host paths and
sandbox paths, nothing left to look up), a backend runs it and reports a
``SandboxResult`` with the exit status, resource usage and collected outputs.
Plain frozen dataclasses: cheap to build for thousands of tasks, and
importable by the launcher helper without pulling in pydantic.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from hitz.sandbox.policy import Policy

# The project appears at this path inside every sandbox, whatever the host
# checkout path is, so the same task gets the same command on every machine.
WORKDIR = "/work"

# The fixed part of every task's environment (the manifest's `env` adds to it).
# 315532800 is 1980-01-01, the earliest time a ZIP archive can store.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "SOURCE_DATE_EPOCH": "315532800",
}


class Network(enum.StrEnum):
    NONE = "none"  # a private network namespace with only its own loopback, up
    HOST = "host"  # the host's network namespace: an opt-out, never hermetic


@dataclass(frozen=True, slots=True)
class InputMount:
    """One declared input: ``source`` (absolute host path) appears read-only at
    ``target`` (project-relative, POSIX, no leading slash) under ``WORKDIR``."""

    source: str
    target: str
    is_dir: bool = False


@dataclass(frozen=True, slots=True)
class Image:
    """A pinned root filesystem for a task (``rootfs = "image:NAME"`` or
    ``"docker:NAME@sha256:..."``), resolved by the executor.

    ``digest`` ("sha256:HEX") is the root filesystem's identity, the one the
    cache key holds, so a task gets the same key in every backend. ``root`` is
    the host path of the unpacked, read-only root for the namespace sandbox
    (None when only Docker has it); ``docker_ref`` is what the Docker engine
    runs (an image ID or NAME@sha256:..., None when it is not imported).
    """

    name: str
    digest: str
    root: str | None = None
    docker_ref: str | None = None


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a backend needs to run one task, fully resolved.

    ``outputs`` are project-relative; a trailing ``/`` declares a directory.
    ``staging_dir`` is an empty host directory, private to this task, on the
    same filesystem as the project: writable output locations are created in
    it, and ``SandboxResult.outputs`` point into it. ``stdout_path`` and
    ``stderr_path`` are host files that hold the task's streams once it has
    ended; a stream the task left empty leaves no file (an older one is
    removed).
    """

    task: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    inputs: tuple[InputMount, ...]
    outputs: tuple[str, ...]
    staging_dir: str
    stdout_path: str
    stderr_path: str
    cwd: str = WORKDIR
    rootfs: str = "host"  # as the manifest says: "host", "image:NAME", "docker:..."
    image: Image | None = None  # the resolved image when rootfs is not "host"
    backend: str = "namespace"  # the manifest's backend: "namespace", "docker", "remote"
    network: Network = Network.NONE
    timeout: float = 600.0  # wall-clock seconds
    kill_grace: float = 2.0  # seconds between SIGTERM and SIGKILL on timeout
    policy: Policy = field(default_factory=Policy)


class Status(enum.StrEnum):
    SUCCEEDED = "succeeded"  # exit status 0 and every declared output present
    FAILED = "failed"  # non-zero exit status, or killed by a signal
    TIMED_OUT = "timed-out"  # wall-clock timeout: terminated, then killed
    OUTPUT_MISSING = "output-missing"  # exit status 0 but an output is missing or invalid
    SETUP_FAILED = "setup-failed"  # the sandbox could not be built; the task never ran
    LIMIT_EXCEEDED = "limit-exceeded"  # killed for going past a limit of its policy
    CANCELLED = "cancelled"  # stopped by Ctrl-C / SIGTERM / fail-fast


@dataclass(frozen=True, slots=True)
class CollectedOutput:
    """A declared output as the task left it: ``path`` as declared (project
    relative, trailing ``/`` for a directory) and ``staged`` the host path of
    the file or directory inside the task's staging dir."""

    path: str
    staged: str


@dataclass(frozen=True, slots=True)
class Usage:
    user_s: float = 0.0
    system_s: float = 0.0
    max_rss_kib: int = 0


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """How one task ended.

    ``exit_code``: None = never ran (setup failed or cancelled before exec);
    >= 0 = the task's exit status; < 0 = killed by signal -n.
    ``message``: a sentence for the user when ``status`` is not SUCCEEDED.
    ``enforced``: what the sandbox actually enforced, by mechanism (seccomp
    profile and its digest, Landlock ABI, capabilities kept, limits);
    ``weakened``: the parts of the default policy this task did without,
    in words for every report ("network host", "seccomp unconfined").
    """

    task: str
    status: Status
    exit_code: int | None
    duration_s: float
    usage: Usage = field(default_factory=Usage)
    outputs: tuple[CollectedOutput, ...] = ()
    message: str | None = None
    enforced: Mapping[str, str] = field(default_factory=dict)
    weakened: tuple[str, ...] = ()


class SandboxBackend(Protocol):
    """Runs prepared specs concurrently. Single-threaded use only.

    ``start`` launches a task and returns at once; ``prestart`` and
    ``release`` do the same in two steps, so the set-up can happen while a
    slot is busy. ``wait`` blocks until at
    least one started task has ended or ``timeout`` seconds have passed, and
    returns the results of those that ended. ``cancel_all`` terminates every
    running task; their results (status CANCELLED) are still returned by
    ``wait``. ``close`` releases the backend's helpers; nothing it started
    outlives it.
    """

    def start(self, spec: SandboxSpec) -> None: ...

    def prestart(self, spec: SandboxSpec) -> None:
        """Prepare ``spec``'s sandbox now; its task starts on ``release``.
        A backend with nothing to prepare ahead may simply remember it."""
        ...

    def release(self, task: str) -> None:
        """Start the task of a prestarted sandbox; its timeout counts from now."""
        ...

    def cancel(self, task: str) -> None:
        """Drop a prestarted sandbox; ``wait`` returns it as CANCELLED."""
        ...

    def wait(self, timeout: float | None = None) -> list[SandboxResult]: ...

    def running(self) -> int: ...

    def cancel_all(self) -> None: ...

    def close(self) -> None: ...
