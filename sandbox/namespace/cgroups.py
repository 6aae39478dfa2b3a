"""Memory, process and CPU limits through cgroups (v2, or v1 and hybrid).

One cgroup per task and controller, created by hitz before the launcher
starts and joined by the launcher first thing, so everything the task will
ever run is inside. After the task: was it killed by the memory limit, did
it hit the process limit; then the cgroups are removed.

Only when a task asks for a limit (`limits.memory`, `limits.pids`,
`limits.cpu`), and only where hitz can create cgroups (as root, or in a
delegated cgroup v2 subtree): anywhere else a task asking for one is refused
with a hint, never run without it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from hitz.sandbox.errors import SandboxUnavailable
from hitz.sandbox.hostcheck import CGROUP_ROOT

ROOT = CGROUP_ROOT
_CFS_PERIOD_US = 100_000


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each controller lives: v2 (one folder for all) or v1 (one each)."""

    unified: str | None  # the v2 folder with the controllers enabled, else None
    v1: dict[str, str]  # controller -> its v1 hierarchy

    @classmethod
    def probe(cls) -> Layout:
        if os.path.exists(os.path.join(ROOT, "cgroup.controllers")):
            return cls(ROOT, {})
        v1 = {c: os.path.join(ROOT, c) for c in ("memory", "pids", "cpu")
              if os.path.exists(os.path.join(ROOT, c, "cgroup.procs"))}
        return cls(None, v1)


@dataclass
class TaskCgroups:
    """The cgroups of one task: ``paths`` to join, and what to read after."""

    paths: list[str]
    memory: str | None  # the folder holding the memory controller's files
    pids: str | None
    v2: bool

    def oom_killed(self) -> bool:
        if self.memory is None:
            return False
        name = "memory.events" if self.v2 else "memory.oom_control"
        return _counter(os.path.join(self.memory, name), "oom_kill") > 0

    def hit_pids_limit(self) -> bool:
        if self.pids is None:
            return False
        return _counter(os.path.join(self.pids, "pids.events"), "max") > 0

    def remove(self) -> bool:
        """Remove the cgroups; False if one is still busy (try again later)."""
        done = True
        for path in self.paths:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                done = False
        return done


def create(layout: Layout, name: str, memory: int | None, pids: int | None,
           cpu: float | None) -> TaskCgroups | None:
    """Cgroups for a task with these limits, or None when it asks for none.

    Raises SandboxUnavailable when a limit cannot be enforced here.
    """
    if memory is None and pids is None and cpu is None:
        return None
    wanted = {"memory": memory, "pids": pids, "cpu": cpu}
    try:
        if layout.unified is not None:
            return _create_v2(layout.unified, name, wanted)
        return _create_v1(layout, name, wanted)
    except OSError as exc:
        raise SandboxUnavailable(
            f"cannot create the cgroups for the limits of task `:{name.split('-', 2)[-1]}`: "
            f"{exc.strerror}",
            hint="memory, pids and cpu limits need hitz to run as root (or in a delegated "
            "cgroup v2 subtree); remove them from the task's `limits` to run without",
        ) from exc


def _create_v2(root: str, name: str, wanted: dict[str, float | int | None]) -> TaskCgroups:
    parent = os.path.join(root, "hitz")
    os.makedirs(parent, exist_ok=True)
    controllers = [c for c, v in wanted.items() if v is not None]
    with contextlib.suppress(OSError):  # already enabled, or the root's own business
        _write(os.path.join(parent, "cgroup.subtree_control"),
               " ".join("+" + c for c in controllers))
    path = os.path.join(parent, name)
    os.mkdir(path)
    if wanted["memory"] is not None:
        _write(os.path.join(path, "memory.max"), str(int(wanted["memory"])))
        with contextlib.suppress(FileNotFoundError):
            _write(os.path.join(path, "memory.swap.max"), "0")
    if wanted["pids"] is not None:
        _write(os.path.join(path, "pids.max"), str(int(wanted["pids"])))
    if wanted["cpu"] is not None:
        quota = max(1000, int(float(wanted["cpu"]) * _CFS_PERIOD_US))
        _write(os.path.join(path, "cpu.max"), f"{quota} {_CFS_PERIOD_US}")
    memory = path if wanted["memory"] is not None else None
    pids = path if wanted["pids"] is not None else None
    return TaskCgroups([path], memory, pids, v2=True)


def _create_v1(layout: Layout, name: str, wanted: dict[str, float | int | None]) -> TaskCgroups:
    made: dict[str, str] = {}
    try:
        for controller, value in wanted.items():
            if value is None:
                continue
            hierarchy = layout.v1.get(controller)
            if hierarchy is None:
                raise OSError(2, f"no cgroup v1 {controller} controller is mounted")
            parent = os.path.join(hierarchy, "hitz")
            os.makedirs(parent, exist_ok=True)
            path = os.path.join(parent, name)
            os.mkdir(path)
            made[controller] = path
            if controller == "memory":
                _write(os.path.join(path, "memory.limit_in_bytes"), str(int(value)))
                with contextlib.suppress(OSError):  # no swap accounting: nothing to bound
                    _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(int(value)))
            elif controller == "pids":
                _write(os.path.join(path, "pids.max"), str(int(value)))
            else:
                _write(os.path.join(path, "cpu.cfs_period_us"), str(_CFS_PERIOD_US))
                quota = max(1000, int(float(value) * _CFS_PERIOD_US))
                _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
    except OSError:
        for path in made.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    return TaskCgroups(list(made.values()), made.get("memory"), made.get("pids"), v2=False)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _counter(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0
