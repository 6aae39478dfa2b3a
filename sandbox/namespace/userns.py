"""User namespaces: who the task is, inside and outside.

Two layers, so that no capability a task holds reaches anything it could use:

- *outer*: when hitz runs as an ordinary user, the launcher helper first
  enters a user namespace of its own mapping that user to 0, because only
  there may it create the sandbox's mount, pid, net, ipc and uts
  namespaces. When hitz runs as root, they are created directly, owned by
  the initial user namespace.
- *task*: after the root is built, the init process enters one more user
  namespace and becomes its uid 0. The task's capabilities apply to that
  namespace only, which owns no mount, network or uts namespace, so it can
  neither remount its read-only inputs nor touch the network or hostname.
  As root, that uid 0 is the unprivileged host uid ``SANDBOX_HOST_ID``:
  root inside is never root outside.

Mappings must be written from the parent namespace (user_namespaces(7),
"Defining user and group ID mappings"), so the launcher writes them for the
sandbox's init process.
"""

from __future__ import annotations

import os

# The host uid/gid that a task's root maps to when hitz runs as root.
SANDBOX_HOST_ID = 65534


def map_self_outer(uid: int, gid: int) -> None:
    """After unshare(CLONE_NEWUSER) as an ordinary user: map that user to 0.

    setgroups must be denied before an unprivileged process may write
    gid_map (since Linux 3.19, CVE-2014-8989)."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def map_task(pid: int, host_root: bool) -> None:
    """Map the task namespace of ``pid``: uid/gid 0 inside becomes
    ``SANDBOX_HOST_ID`` (hitz is root) or the outer namespace's 0 (the user)."""
    outer = SANDBOX_HOST_ID if host_root else 0
    _write(f"/proc/{pid}/uid_map", f"0 {outer} 1")
    _write(f"/proc/{pid}/gid_map", f"0 {outer} 1")


def become_root() -> None:
    """Inside the freshly mapped task namespace: take uid/gid 0 there."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
