"""Landlock for both backends: the Python half of ``landlock.h``.

The namespace launcher and the docker backend's container init apply the
same Landlock rules with the same C code (``landlock.h``). This module
decides, once for both, whether a task may run at all on this kernel, and
what those programs are told: ``MODE N PATH1..PATHN``, where MODE is 0 off,
1 required, 2 best effort, and the paths are the sandbox paths the task may
write beneath.
"""

from __future__ import annotations

import posixpath

from hitz.sandbox.errors import SandboxUnavailable
from hitz.sandbox.policy import Landlock, Policy
from hitz.sandbox.probe import landlock_abi
from hitz.sandbox.spec import SandboxSpec

# MODE as landlock.h reads it (LL_MODE_OFF, LL_MODE_REQUIRED, LL_MODE_BEST_EFFORT).
_MODE = {Landlock.OFF: "0", Landlock.REQUIRED: "1", Landlock.BEST_EFFORT: "2"}


def check(task: str, policy: Policy) -> None:
    """Refuse, before anything runs, a task that requires Landlock on a
    kernel without it (fail closed; the hint names the manifest key that
    would run it without). Raises SandboxUnavailable."""
    if policy.landlock is Landlock.REQUIRED and landlock_abi() < 1:
        raise SandboxUnavailable(
            f"task `:{task}` needs Landlock; this kernel has none",
            hint='set landlock = "best-effort" on the task (or in [defaults]) to run it '
            "without; `hitz doctor` shows what the kernel offers",
        )


def writable_paths(spec: SandboxSpec) -> list[str]:
    """The sandbox paths where ``spec``'s task may write: /tmp, /dev/shm and
    its output folders (the fewest that hold every declared output)."""
    from hitz.sandbox.namespace.plan import writable_roots

    return ["/tmp", "/dev/shm"] + [posixpath.join(spec.cwd, root) if root else spec.cwd
                                   for root in writable_roots(spec.outputs)]


def arguments(spec: SandboxSpec) -> list[str]:
    """``MODE N PATH1..PATHN`` for ``spec``, as both C programs take them."""
    if spec.policy.landlock is Landlock.OFF:
        return [_MODE[Landlock.OFF], "0"]
    paths = writable_paths(spec)
    return [_MODE[spec.policy.landlock], str(len(paths)), *paths]
