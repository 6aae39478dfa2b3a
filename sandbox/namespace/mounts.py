"""Execute a plan of operations: one ``match``, one case per operation.

Runs in the sandbox's init process, inside its new mount namespace, after
``contain`` has pivoted into a scratch tmpfs where the host root is at
``/oldroot`` and the sandbox's root is being built at ``/newroot``. Bind
sources are host paths, so they are looked up under ``/oldroot``.
"""

from __future__ import annotations

import os

from hitz.sandbox.namespace import syscalls as sc
from hitz.sandbox.namespace.ops import (
    BindDevice,
    BindReadOnly,
    BindWritable,
    MakeDir,
    MakeFile,
    MountProc,
    Op,
    ReadOnlySubtree,
    RemountReadOnly,
    Symlink,
    Tmpfs,
    WriteFile,
)

NEWROOT = "/newroot"
OLDROOT = "/oldroot"

# statvfs flags -> mount flags that a remount in a user namespace must repeat:
# the kernel refuses (EPERM) to clear "locked" flags of a mount inherited
# from a more privileged namespace (mount_namespaces(7), "restrictions").
_LOCKED_FLAGS = (
    (os.ST_NOSUID, sc.MS_NOSUID),
    (os.ST_NODEV, sc.MS_NODEV),
    (os.ST_NOEXEC, sc.MS_NOEXEC),
    (os.ST_NOATIME, sc.MS_NOATIME),
    (os.ST_NODIRATIME, sc.MS_NODIRATIME),
    (os.ST_RELATIME, sc.MS_RELATIME),
)


class SetupError(Exception):
    """An operation failed; ``op`` is the operation, ``__cause__`` the OSError."""

    def __init__(self, op: Op, exc: OSError) -> None:
        super().__init__(f"{op}: {exc}")
        self.op = op
        self.errno = exc.errno


def apply(ops: list[Op]) -> None:
    for op in ops:
        try:
            _apply_one(op)
        except OSError as exc:
            raise SetupError(op, exc) from exc


def _apply_one(op: Op) -> None:
    match op:
        case Tmpfs(path, size, mode):
            data = f"mode={mode:o}" + (f",size={size}" if size else "")
            sc.mount("tmpfs", NEWROOT + path, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, data)
        case MakeDir(path, mode):
            try:
                os.mkdir(NEWROOT + path, mode)
            except FileExistsError:
                pass
            else:
                if mode & 0o7000:
                    os.chmod(NEWROOT + path, mode)  # mkdir applies the umask and drops sticky
        case MakeFile(path):
            os.close(os.open(NEWROOT + path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        case WriteFile(path, content, mode):
            fd = os.open(NEWROOT + path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, mode)
            try:
                os.write(fd, content.encode())
            finally:
                os.close(fd)
        case Symlink(target, path):
            os.symlink(target, NEWROOT + path)
        case BindReadOnly(source, path):
            sc.mount(OLDROOT + source, NEWROOT + path, None, sc.MS_BIND | sc.MS_REC)
            _make_read_only(NEWROOT + path, recursive=True)
        case BindWritable(source, path):
            sc.mount(OLDROOT + source, NEWROOT + path, None, sc.MS_BIND)
        case BindDevice(source, path):
            sc.mount(OLDROOT + source, NEWROOT + path, None, sc.MS_BIND)
        case MountProc(path):
            sc.mount("proc", NEWROOT + path, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        case ReadOnlySubtree(path):
            sc.mount(NEWROOT + path, NEWROOT + path, None, sc.MS_BIND | sc.MS_REC)
            _make_read_only(NEWROOT + path, recursive=True)
        case RemountReadOnly(path):
            _make_read_only(NEWROOT + path)


def _make_read_only(path: str, *, recursive: bool = False) -> None:
    # mount_setattr (5.12+) flips only the read-only bit, and for a recursive
    # bind also on every submount; older kernels need a remount that restates
    # the flags the mount already has (and leave submounts writable).
    if sc.mount_setattr_rdonly(path, recursive=recursive):
        return
    flags = os.statvfs(path).f_flag
    keep = 0
    for st_flag, ms_flag in _LOCKED_FLAGS:
        if flags & st_flag:
            keep |= ms_flag
    sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | keep)


