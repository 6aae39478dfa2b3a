"""The sandbox policy a task runs under, shared by every backend.

Set per task (and in `[defaults]`) in the manifest; enforced by the backend;
part of the cache key (``describe``), so a result computed under one policy
never serves another. A plain frozen dataclass rather than a pydantic model:
the manifest's pydantic schema validates the keys, and the no-op path must
not import pydantic.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
from dataclasses import dataclass, field


class Landlock(enum.StrEnum):
    REQUIRED = "required"  # refuse to run where the kernel has no Landlock
    BEST_EFFORT = "best-effort"  # use it where the kernel has it, say so where not
    OFF = "off"  # an explicit opt-out


class Seccomp(enum.StrEnum):
    DEFAULT = "default"  # deny what a build never needs (see namespace/seccomp.py)
    STRICT = "strict"  # allow only what builds use (an allow-list)
    UNCONFINED = "unconfined"  # an explicit opt-out, shown in every report
    PROFILE = "profile"  # a profile in Docker's seccomp JSON format (Policy.seccomp_profile)


# Capability names (capabilities(7)) by number, for `capabilities = [...]`.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)

# <sys/resource.h> resource numbers (Linux, every architecture hitz runs on).
RLIMIT_CPU = 0
RLIMIT_FSIZE = 1
RLIMIT_CORE = 4
RLIMIT_NOFILE = 7


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-process resource limits (setrlimit), soft = hard.

    ``open_files``: RLIMIT_NOFILE. ``file_size``: RLIMIT_FSIZE in bytes, None =
    unlimited. ``cpu_time``: RLIMIT_CPU in seconds, None = unlimited. Core
    dumps are always off. ``output``: the most stdout + stderr hitz keeps; a
    task printing more is killed (not an rlimit: hitz measures it).
    """

    open_files: int = 4096
    file_size: int | None = None
    cpu_time: int | None = None
    output: int = 64 << 20  # bytes of stdout + stderr kept; more kills the task
    memory: int | None = None  # bytes, for the whole task (cgroup); None = unlimited
    pids: int | None = None  # processes and threads at once (cgroup); None = unlimited
    cpu: float | None = None  # CPUs' worth of time (cgroup quota); None = unlimited
    tmp: int = 1 << 30  # bytes of each of /tmp and /dev/shm (tmpfs, in memory)

    def rlimits(self) -> list[tuple[int, int]]:
        limits = [(RLIMIT_CORE, 0), (RLIMIT_NOFILE, self.open_files)]
        if self.file_size is not None:
            limits.append((RLIMIT_FSIZE, self.file_size))
        if self.cpu_time is not None:
            limits.append((RLIMIT_CPU, self.cpu_time))
        return limits


@dataclass(frozen=True, slots=True)
class Policy:
    seccomp: Seccomp = Seccomp.DEFAULT
    capabilities: tuple[str, ...] = ()  # kept; every other one is dropped
    limits: Limits = field(default_factory=Limits)
    landlock: Landlock = Landlock.REQUIRED
    seccomp_profile: str | None = None  # the JSON file, with Seccomp.PROFILE

    def capability_mask(self) -> int:
        return sum(1 << CAPABILITIES.index(name) for name in self.capabilities)

    def describe(self) -> str:
        """A stable text of everything enforced, for the cache key and reports."""
        caps = ",".join(sorted(self.capabilities)) or "none"
        limits = ",".join(f"{resource}={value}" for resource, value in self.limits.rlimits())
        if self.limits.output != Limits().output:
            limits += f",output={self.limits.output}"
        if self.limits.tmp != Limits().tmp:
            limits += f",tmp={self.limits.tmp}"
        for name in ("memory", "pids", "cpu"):
            value = getattr(self.limits, name)
            if value is not None:
                limits += f",{name}={value}"
        seccomp = self.seccomp.value
        if self.seccomp is Seccomp.PROFILE and self.seccomp_profile is not None:
            seccomp = f"profile:{profile_digest(self.seccomp_profile)}"
        return (f"seccomp={seccomp};caps={caps};rlimits={limits};"
                f"landlock={self.landlock.value}")


def profile_digest(path: str) -> str:
    """The SHA-256 of a seccomp profile file (by content: the key must move
    when the profile changes, not when it moves). "missing" if unreadable:
    the task then fails at launch, saying why."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return _digest(path, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int, ino: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
