"""The operations a namespace sandbox is built from.

``plan.build_ops`` turns a ``SandboxSpec`` into an ordered list of these;
the launcher (``launcher.c``, ``apply_ops``) executes them, one case and one
syscall per operation. Paths are sandbox paths, absolute; ``source`` of a
bind is a host path. The list is plain data: printable (``hitz sandbox
explain``), testable without a kernel, and sent to the launcher as
NUL-separated fields (``flatten``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Tmpfs:
    path: str
    size: int = 0  # bytes; 0 = the kernel's default (half of RAM)
    mode: int = 0o755


@dataclass(frozen=True, slots=True)
class MakeDir:
    path: str
    mode: int = 0o755


@dataclass(frozen=True, slots=True)
class MakeFile:
    """An empty file to bind a file over (a bind needs an existing target)."""

    path: str


@dataclass(frozen=True, slots=True)
class WriteFile:
    path: str
    content: str
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Symlink:
    target: str
    path: str


@dataclass(frozen=True, slots=True)
class MakeStagingDir:
    """A folder of the task's staging area on the host (``source``), made
    with its parents and owned by the uid the task runs as: where an output
    will be written. Made by the launcher, off hitz's own thread."""

    source: str


@dataclass(frozen=True, slots=True)
class BindReadOnly:
    source: str
    path: str


@dataclass(frozen=True, slots=True)
class BindWritable:
    source: str
    path: str


@dataclass(frozen=True, slots=True)
class BindDevice:
    """A host device node (/dev/null, ...): bound, since a user namespace
    cannot mknod."""

    source: str
    path: str


@dataclass(frozen=True, slots=True)
class MountProc:
    path: str


@dataclass(frozen=True, slots=True)
class ReadOnlySubtree:
    """Bind ``path`` onto itself and make that read-only (e.g. /proc/sys)."""

    path: str


@dataclass(frozen=True, slots=True)
class Mask:
    """Hide ``path`` (under /proc) if it exists: /dev/null over a file, an
    empty read-only tmpfs over a folder."""

    path: str


@dataclass(frozen=True, slots=True)
class RemountReadOnly:
    """Make the existing mount at ``path`` read-only (the tmpfs root, /dev)."""

    path: str


Op = (
    Tmpfs
    | MakeDir
    | MakeFile
    | WriteFile
    | MakeStagingDir
    | Symlink
    | BindReadOnly
    | BindWritable
    | BindDevice
    | MountProc
    | ReadOnlySubtree
    | Mask
    | RemountReadOnly
)

_KINDS: dict[str, type[Op]] = {
    cls.__name__: cls
    for cls in (
        Tmpfs, MakeDir, MakeFile, WriteFile, MakeStagingDir, Symlink, BindReadOnly,
        BindWritable,
        BindDevice, MountProc, ReadOnlySubtree, Mask, RemountReadOnly,
    )
}


_FIELDS: dict[type[Op], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in _KINDS.values()
}


def encode(ops: list[Op]) -> list[list[Any]]:
    """Ops as JSON-ready lists: ``[kind, field...]``."""
    return [[type(op).__name__, *(getattr(op, f) for f in _FIELDS[type(op)])] for op in ops]


def decode(raw: list[list[Any]]) -> list[Op]:
    return [_KINDS[kind](*fields) for kind, *fields in raw]


def flatten(ops: list[Op]) -> list[str]:
    """Ops as the launcher reads them: the kind, then each field, as strings."""
    return [str(value) for op in encode(ops) for value in op]


def describe(op: Op) -> str:
    """One line for ``hitz sandbox explain``."""
    match op:
        case Tmpfs(path, size, mode):
            return f"tmpfs      {path}" + (f" size={size}" if size else "") + f" mode={mode:o}"
        case MakeDir(path, mode):
            return f"mkdir      {path}"
        case MakeFile(path):
            return f"touch      {path}"
        case WriteFile(path, content, mode):
            return f"write      {path} ({len(content)} bytes)"
        case Symlink(target, path):
            return f"symlink    {path} -> {target}"
        case MakeStagingDir(source):
            return f"staging    {source}"
        case BindReadOnly(source, path):
            return f"bind ro    {source} -> {path}"
        case BindWritable(source, path):
            return f"bind rw    {source} -> {path}"
        case BindDevice(source, path):
            return f"bind dev   {source} -> {path}"
        case MountProc(path):
            return f"proc       {path}"
        case ReadOnlySubtree(path):
            return f"ro subtree {path}"
        case Mask(path):
            return f"mask       {path}"
        case RemountReadOnly(path):
            return f"remount ro {path}"
