"""The validated manifest as the rest of hitz sees it.

``hitz.executor.manifest.load`` builds these from ``hitz.toml``; the planner,
scheduler and runner only read them. Every value keeps the line it came from
(``Manifest.locations``), so later stages can still point at the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hitz.executor.remote_config import RemoteCacheSettings

# A key path into the manifest, e.g. ("tasks", "build", "inputs", 2).
KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class TaskDef:
    """One task with `[defaults]` applied.

    ``argv``: a `run` string becomes ("/bin/sh", "-c", run) and ``shell`` is
    True. ``inputs`` are as written (globs, "dir/", ":task"). ``outputs`` are
    normalised project-relative POSIX paths, a trailing "/" for a directory.
    ``deps`` are task names without ":", from `deps` and from ":task" inputs,
    deduplicated in order of appearance. ``env`` is `[defaults] env` updated by
    the task's `env` (the fixed base environment is added by the backend spec).
    ``line`` is the line of the task's table header.
    """

    name: str
    argv: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    backend: str = "namespace"
    rootfs: str = "host"
    network: str = "none"
    timeout_s: float = 600.0
    description: str | None = None
    line: int = 0
    shell: bool = False
    cache: bool | None = None  # None = the default rule (see docs/cache.md)
    seccomp: str = "default"
    capabilities: tuple[str, ...] = ()  # kept; all others dropped
    open_files: int | None = None  # None = the sandbox's default
    file_size: int | None = None  # bytes; None = unlimited
    cpu_time: int | None = None  # seconds; None = unlimited
    landlock: str = "required"  # "required" | "best-effort" | "off"
    output_limit: int | None = None  # bytes of stdout + stderr; None = the default
    memory_limit: int | None = None  # bytes for the whole task (cgroup); None = unlimited
    pids_limit: int | None = None  # processes at once (cgroup); None = unlimited
    cpu_limit: float | None = None  # CPUs' worth of time (cgroup); None = unlimited
    tmp_limit: int | None = None  # bytes of /tmp and of /dev/shm; None = the default


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest. ``path`` is absolute, ``display_path`` is how the user
    named it (used in messages), ``root`` is the project folder (the manifest's
    folder). ``locations`` maps key paths to 1-based lines; ``lines`` is the
    source text for excerpts."""

    path: Path
    display_path: str
    root: Path
    project: str
    tasks: Mapping[str, TaskDef]
    locations: Mapping[KeyPath, int] = field(default_factory=dict)
    lines: Sequence[str] = ()
    cache_dir: str | None = None  # [cache] dir, as written (relative to root)
    cache_max_bytes: int | None = None  # [cache] max_size
    # [cache] remote, instance, upload, token_env, token_file, ca_file, timeout
    cache_remote: RemoteCacheSettings = field(default_factory=RemoteCacheSettings)
    remote_executor: str | None = None  # [remote] executor, a grpc:// or grpcs:// URL
    remote_instance: str = ""  # [remote] instance: the REAPI instance name
    # [remote] token_env, token_file, ca_file: as in [cache], paths relative to root
    remote_token_env: str | None = None
    remote_token_file: str | None = None
    remote_ca_file: str | None = None

    def line_of(self, *key: str | int) -> int | None:
        """The line of the most specific known prefix of ``key``."""
        for end in range(len(key), 0, -1):
            line = self.locations.get(tuple(key[:end]))
            if line is not None:
                return line
        return None

    def where(self, *key: str | int) -> str:
        """``hitz.toml:14`` for ``key`` (just the path if no line is known)."""
        line = self.line_of(*key)
        return f"{self.display_path}:{line}" if line else self.display_path

    def excerpt(self, line: int, column: int | None = None) -> str:
        """The source line, numbered, with a caret under ``column`` (1-based)."""
        if not 1 <= line <= len(self.lines):
            return ""
        text = self.lines[line - 1].rstrip("\n")
        gutter = f"{line:>4} | "
        out = gutter + text
        if column is not None:
            out += "\n" + " " * (len(gutter) - 2) + "| " + " " * (column - 1) + "^"
        return out
