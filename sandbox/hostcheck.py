"""Can this host enforce a namespace task's policy? Asked for every task
before a run starts, so it stays cheap: it imports neither the namespace
backend (≈40 ms) nor pyseccomp (≈27 ms: it asks ``ldconfig`` where its
libraries are), which a run whose tasks are all up to date never needs.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

from hitz.sandbox import landlock
from hitz.sandbox.errors import SandboxUnavailable
from hitz.sandbox.policy import Policy, Seccomp

CGROUP_ROOT = "/sys/fs/cgroup"


def check_namespace_policy(task: str, policy: Policy) -> None:
    """Refuse, before anything runs, a task whose policy this host cannot
    enforce (fail closed; the hint names the manifest key that would allow
    running with less)."""
    landlock.check(task, policy)
    limits = policy.limits
    wants_cgroups = limits.memory is not None or limits.pids is not None or limits.cpu is not None
    if wants_cgroups and os.geteuid() != 0 and not os.access(CGROUP_ROOT, os.W_OK):
        raise SandboxUnavailable(
            f"task `:{task}` asks for memory, pids or cpu limits, which need cgroups this "
            "user cannot create",
            hint="run hitz as root or in a delegated cgroup v2 subtree, or remove those "
            "limits from the task",
        )
    if policy.seccomp is not Seccomp.UNCONFINED:
        problem = _seccomp_problem()
        if problem is not None:
            raise SandboxUnavailable(
                f"task `:{task}` needs a seccomp filter, and libseccomp cannot be loaded: "
                f"{problem}",
                hint='install libseccomp (`apt-get install libseccomp2`), or set '
                'seccomp = "unconfined" on the task to run it without a filter',
            )


@functools.cache
def _seccomp_problem() -> str | None:
    """Why the seccomp compiler cannot be used here (None: it can)."""
    if importlib.util.find_spec("pyseccomp") is None:
        return "the pyseccomp module is not installed"
    try:
        ctypes.CDLL("libseccomp.so.2")  # what pyseccomp finds, by its soname: a cheap dlopen
    except OSError:
        try:  # another soname or place: let pyseccomp itself look
            import pyseccomp  # noqa: F401
        except (ImportError, OSError) as exc:
            return str(exc)
    return None
