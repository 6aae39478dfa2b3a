"""What this host can enforce, probed once (``hitz doctor``).

Each check tries the real thing where it can (create the namespaces, ask
the kernel for its Landlock ABI) rather than reading version numbers, and
says what is missing in the user's terms with a hint.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_SYS_LANDLOCK_CREATE_RULESET = 444  # x86-64 and aarch64 alike
_LANDLOCK_CREATE_RULESET_VERSION = 1


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str | None = None
    required: bool = False  # the namespace backend cannot run without it


def user_namespaces() -> Check:
    """Fork a child that creates the namespaces a sandbox needs."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0 if _libc.unshare(flags) == 0 else ctypes.get_errno() or 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        who = "as root (tasks map to uid 65534)" if os.geteuid() == 0 else "as an ordinary user"
        return Check("namespaces", True, f"user, mount, pid, net, ipc, uts: available {who}",
                     required=True)
    hint = ("enable unprivileged user namespaces: `sysctl kernel.unprivileged_userns_clone=1` "
            "and `sysctl user.max_user_namespaces=15000`, or run hitz as root")
    return Check("namespaces", False, f"cannot create them: {os.strerror(code)}", hint,
                 required=True)


def seccomp() -> Check:
    try:
        with open("/proc/self/status") as f:
            kernel = any(line.startswith("Seccomp:") for line in f)
    except OSError:
        kernel = False
    if not kernel:
        return Check("seccomp", False, "this kernel has no seccomp filter support",
                     'set seccomp = "unconfined" on tasks to run without a filter',
                     required=True)
    try:
        from hitz.sandbox.namespace.seccomp import compile_default

        program = compile_default()
    except (ImportError, OSError) as exc:
        return Check("seccomp", False, f"cannot compile profiles: {exc}",
                     "install libseccomp: `apt-get install libseccomp2`", required=True)
    return Check("seccomp", True, f"default profile: {len(program) // 8} BPF instructions",
                 required=True)


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is off)."""
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0,
                        _LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, int(abi))


def landlock() -> Check:
    abi = landlock_abi()
    if abi < 1:
        return Check("landlock", False, "not available in this kernel (or not in lsm=)",
                     'tasks need landlock = "best-effort" (or false) to run here',
                     required=True)
    scopes = "; abstract unix sockets and signals scoped" if abi >= 6 else ""
    return Check("landlock", True, f"ABI {abi}: filesystem rules{scopes}", required=True)


def cgroups() -> Check:
    try:
        with open("/proc/self/mountinfo") as f:
            kinds = {line.split(" - ")[1].split()[0] for line in f if " - cgroup" in line}
    except OSError:
        kinds = set()
    if kinds == {"cgroup2"}:
        layout = "v2 (unified)"
    elif "cgroup" in kinds:
        layout = "v1" + (" + v2 (hybrid)" if "cgroup2" in kinds else "")
    else:
        return Check("cgroups", False, "no cgroup filesystem mounted",
                     "tasks with memory, pids or cpu limits are refused here")
    who = "can be set" if os.geteuid() == 0 else "need root or a delegated v2 subtree"
    return Check("cgroups", True, f"{layout}; memory, pids and cpu limits {who}")


def docker() -> Check:
    """Does a Docker engine answer (``DOCKER_HOST``, else the local socket)?
    Not required: only tasks with backend = "docker" need one."""
    from hitz.sandbox.docker import engine_address, engine_version
    from hitz.sandbox.errors import SandboxError

    try:
        version = engine_version()
    except SandboxError as exc:
        return Check("docker", False, exc.message.removeprefix("cannot reach the Docker engine "),
                     exc.hint)
    return Check("docker", True, f"engine {version} at {engine_address()}: "
                 'backend = "docker" can run here')


def launcher() -> Check:
    from hitz.sandbox.errors import SandboxUnavailable
    from hitz.sandbox.namespace.build import launcher_path

    try:
        path = launcher_path()
    except SandboxUnavailable as exc:
        return Check("launcher", False, exc.message, exc.hint, required=True)
    return Check("launcher", True, path, required=True)


def all_checks() -> list[Check]:
    return [user_namespaces(), seccomp(), launcher(), landlock(), cgroups(), docker()]
