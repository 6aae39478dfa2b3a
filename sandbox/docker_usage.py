"""What a docker task used (CPU time, peak memory), read from the host's
view of its container's cgroup.

Why sampling: runc removes the container's cgroup as soon as its last
process exits (measured: on cgroup v1 with the cgroupfs driver the folder
is gone when `docker wait` returns, long before the container is removed),
and the engine's exit event carries no resource usage. So the task's
thread reads the counters while the task runs, each time the task's
output stream is idle for ``SAMPLE_S`` or at most that often while it
prints, and once more when the stream ends. CPU time is cumulative and
the v1 memory peak is the kernel's own high-water mark, so the last
sample is a lower bound that misses at most the task's last ``SAMPLE_S``
of CPU (and, on cgroup v2 before Linux 5.19, which has no ``memory.peak``,
a peak that came and went between two samples). The reads cost ~20 µs
and no engine call.

Which cgroup: the engine names it after the container ID, under the
driver's parent (``docker/<id>`` with cgroupfs, ``system.slice/docker-
<id>.scope`` with systemd), in one folder per controller on cgroup v1 and
one folder on v2. The first that exists is used. An engine on another
host (``DOCKER_HOST=tcp://...``) or a rootless one has none here: its
tasks report zeros.
"""

from __future__ import annotations

import os
from pathlib import Path

from hitz.sandbox.spec import Usage

CGROUP_ROOT = Path("/sys/fs/cgroup")
SAMPLE_S = 0.05  # how often a running task's counters are read


def _parents(container: str) -> tuple[str, ...]:
    return (f"docker/{container}", f"system.slice/docker-{container}.scope")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # not there (yet, or any more): this sample has nothing
        return None


def _fields(text: str | None) -> dict[str, int]:
    """``key value`` lines (cpuacct.stat, cpu.stat) as a dict."""
    found: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[key] = int(value)
    return found


class CgroupUsage:
    """The latest counters of one container's cgroup; ``sample`` reads
    them (never raises), ``usage`` is what was last read."""

    def __init__(self, container: str, root: Path = CGROUP_ROOT) -> None:
        self._cpu: Path | None = None  # a v1 cpuacct folder or the v2 folder
        self._memory: Path | None = None
        self._v2 = False
        for parent in _parents(container):
            if (root / parent / "cpu.stat").exists():
                self._cpu = self._memory = root / parent
                self._v2 = True
                break
            for cpu in ("cpuacct", "cpu,cpuacct"):
                if (root / cpu / parent / "cpuacct.stat").exists():
                    self._cpu = root / cpu / parent
                    self._memory = root / "memory" / parent
                    break
            if self._cpu is not None:
                break
        self._user_s = 0.0
        self._system_s = 0.0
        self._peak = 0  # bytes

    @property
    def found(self) -> bool:
        return self._cpu is not None

    def sample(self) -> None:
        if self._cpu is None or self._memory is None:
            return
        if self._v2:
            cpu = _fields(_read(self._cpu / "cpu.stat"))
            if "user_usec" in cpu:
                self._user_s = max(self._user_s, cpu["user_usec"] / 1e6)
                self._system_s = max(self._system_s, cpu.get("system_usec", 0) / 1e6)
            peak = _read(self._memory / "memory.peak") or _read(self._memory / "memory.current")
        else:
            user, system = (_read(self._cpu / "cpuacct.usage_user"),
                            _read(self._cpu / "cpuacct.usage_sys"))
            if user and system and user.strip().isdigit() and system.strip().isdigit():
                self._user_s = max(self._user_s, int(user) / 1e9)
                self._system_s = max(self._system_s, int(system) / 1e9)
            else:  # older kernels: ticks of USER_HZ only
                ticks = _fields(_read(self._cpu / "cpuacct.stat"))
                hz = os.sysconf("SC_CLK_TCK")
                if "user" in ticks:
                    self._user_s = max(self._user_s, ticks["user"] / hz)
                    self._system_s = max(self._system_s, ticks.get("system", 0) / hz)
            peak = _read(self._memory / "memory.max_usage_in_bytes")
        if peak and peak.strip().isdigit():
            self._peak = max(self._peak, int(peak))

    def usage(self) -> Usage:
        return Usage(user_s=self._user_s, system_s=self._system_s, max_rss_kib=self._peak >> 10)
