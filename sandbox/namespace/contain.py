"""One sandbox's processes, and the order every mechanism is applied in.

The launcher helper (``zygote``) creates a new pid namespace and forks
*init* into it, then for each task::

    zygote   host side: writes the task's id maps, enforces the deadline,
      │      reaps, reports
      └─ init    pid 1 of the new pid namespace (Python): builds the root,
           │     pivots, enters the task's user namespace, reaps orphans,
           │     forwards SIGTERM to every process of the namespace
           └─ task   posix_spawn: new session, clean fds and signals,
                     no_new_privs, exec

When init exits, the kernel kills everything left in the pid namespace, so
no daemon outlives its task; init has PR_SET_PDEATHSIG(SIGKILL), so the
whole tree dies with the zygote, which dies with hitz.

Init talks to the zygote on ``report_fd`` in lines: ``U`` "my task user
namespace exists, map it" (answered by one byte ``M`` on ``reply_fd``),
``E <json>`` a setup or exec failure, ``X <wait status>`` how the task ended.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, NoReturn

from hitz.sandbox.namespace import mounts, network, userns
from hitz.sandbox.namespace import syscalls as sc
from hitz.sandbox.namespace.ops import decode

# Created by init itself; the pid namespace is created by the zygote (a new
# pid namespace only applies to children) and the user namespace last.
NAMESPACES = sc.CLONE_NEWNS | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWCGROUP
SCRATCH = "/tmp"  # where init mounts its scratch tmpfs (inside its own mount ns)

# Signals whose disposition the task gets reset to the default: Python
# ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec.
_RESET_SIGNALS = (
    signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD, signal.SIGQUIT,
    signal.SIGHUP, signal.SIGXFSZ, signal.SIGUSR1, signal.SIGUSR2,
)


def report(fd: int, kind: str, payload: Any = None) -> None:
    line = kind if payload is None else f"{kind} {json.dumps(payload)}"
    os.write(fd, (line + "\n").encode())


def init(req: dict[str, Any], report_fd: int, reply_fd: int) -> NoReturn:
    """pid 1 of the sandbox (forked by the zygote). Never returns."""
    try:
        task_pid = _build_and_spawn(req, report_fd, reply_fd)
    except mounts.SetupError as exc:
        report(report_fd, "E", {"step": "mount", "op": repr(exc.op), "errno": exc.errno,
                                "text": str(exc.__cause__)})
        os._exit(125)
    except _ExecFailed as exc:
        report(report_fd, "E", {"step": "exec", "errno": exc.errno, "text": exc.strerror,
                                "argv0": req["argv"][0]})
        os._exit(127)
    except OSError as exc:
        report(report_fd, "E", {"step": "init", "errno": exc.errno, "text": str(exc)})
        os._exit(125)
    except BaseException as exc:  # a bug: say so, never fall back into the zygote
        report(report_fd, "E", {"step": "init", "errno": None, "text": repr(exc)})
        os._exit(125)
    _reap_until(task_pid, report_fd)


class _ExecFailed(OSError):
    pass


def _forward(signum: int, frame: object) -> None:
    os.kill(-1, signum)  # every process of the namespace but init itself


def _build_and_spawn(req: dict[str, Any], report_fd: int, reply_fd: int) -> int:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    # pid 1 only receives the signals it handles: install before anything
    # slow, so a timeout's SIGTERM reaches the task.
    signal.signal(signal.SIGTERM, _forward)
    stdio = (
        os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC),
        os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644),
        os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644),
    )
    if req["host_root"]:
        os.setgroups([])  # root's supplementary groups must not reach the task

    # --- privileged over the sandbox's own namespaces ----------------------
    sc.unshare(NAMESPACES | (sc.CLONE_NEWNET if req["network"] == "none" else 0))
    # Nothing we mount may propagate back to the host's mount table.
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    # A scratch tmpfs becomes the root while building, with the host's root
    # under /oldroot, so bind sources stay reachable even where the scratch
    # tmpfs hides them (a project under /tmp).
    sc.mount("tmpfs", SCRATCH, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0700")
    os.chdir(SCRATCH)
    os.mkdir("newroot")
    os.mkdir("oldroot")
    sc.mount("newroot", "newroot", None, sc.MS_BIND)
    sc.pivot_root(".", "oldroot")
    sc.sethostname("hitz")
    if req["network"] == "none":
        network.loopback_up()
    mounts.apply(decode(req["ops"]))
    # Done with the host: drop it, then make the built root the root.
    sc.umount2(mounts.OLDROOT, sc.MNT_DETACH)
    os.chdir(mounts.NEWROOT)
    sc.pivot_root(".", ".")  # stacks the old root under the new one...
    sc.umount2(".", sc.MNT_DETACH)  # ...and this lazily detaches it

    # --- from here on, only the task's own user namespace -------------------
    sc.unshare(sc.CLONE_NEWUSER)
    report(report_fd, "U")
    if os.read(reply_fd, 1) != b"M":
        raise OSError(0, "the launcher did not map the task's user namespace")
    os.close(reply_fd)
    userns.become_root()
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)  # inherited by the task
    os.chdir(req["cwd"])

    env = req["env"]
    path = _resolve(req["argv"][0], env.get("PATH", ""))
    try:
        # posix_spawn (a vfork) rather than fork: no copy of this heap.
        return os.posix_spawn(
            path, req["argv"], env,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)],
            setsid=True, setsigdef=_RESET_SIGNALS, setsigmask=(),
        )
    except OSError as exc:
        raise _ExecFailed(exc.errno, exc.strerror) from exc


def _resolve(cmd: str, path: str) -> str:
    """execvp's search, but with the task's PATH (posix_spawnp would use ours)."""
    if "/" in cmd:
        return cmd
    for folder in path.split(":"):
        candidate = os.path.join(folder or ".", cmd)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise _ExecFailed(2, "command not found")


def _reap_until(task_pid: int, report_fd: int) -> NoReturn:
    """Be pid 1: reap every orphan; end when the task itself ends."""
    while True:
        pid, status = os.wait()
        if pid == task_pid:
            report(report_fd, "X", status)
            os._exit(0)
