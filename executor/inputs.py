"""Expand a task's declared inputs into the files the sandbox will expose.

Globs are relative to the project folder: ``*`` and ``?`` stay within one
path component, ``**`` spans any depth, hidden names are matched only by a
pattern that names them, and a matching directory brings its whole tree.
Declared outputs of any task, and the ``.hitz`` state folder, are never
matched: a task that needs another's output says ``:task``, so the
dependency is explicit and the output is never a stale copy. ``:task``
entries are resolved by the runner from the dependency's outputs.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from hitz.executor.errors import ManifestError, ManifestErrorReason
from hitz.executor.model import Manifest, TaskDef

STATE_DIR = ".hitz"
_GLOB_CHARS = frozenset("*?[")


class OutputIndex:
    """Every task's declared outputs, to keep them out of glob matches."""

    def __init__(self, manifest: Manifest) -> None:
        self.files: dict[str, str] = {}
        self.dirs: dict[str, str] = {}
        for task in manifest.tasks.values():
            for out in task.outputs:
                if out.endswith("/"):
                    self.dirs[out.rstrip("/")] = task.name
                else:
                    self.files[out] = task.name

    def owner(self, rel: str) -> str | None:
        """The task that declares ``rel`` or a directory containing it."""
        owner = self.files.get(rel) or self.dirs.get(rel)
        if owner:
            return owner
        parts = rel.split("/")
        for end in range(len(parts) - 1, 0, -1):
            owner = self.dirs.get("/".join(parts[:end]))
            if owner:
                return owner
        return None


def expand(manifest: Manifest, task: TaskDef, outputs: OutputIndex) -> list[str]:
    """The project-relative files ``task``'s non-``:task`` inputs name, sorted.

    Raises ManifestError when an entry matches nothing, names another task's
    output, or reaches outside the project through a symlink.
    """
    root = str(manifest.root)
    found: set[str] = set()
    for index, pattern in enumerate(task.inputs):
        if pattern.startswith(":"):
            continue
        where = ("tasks", task.name, "inputs", index)
        matches = _matches(root, pattern.rstrip("/"))
        files: list[str] = []
        for rel in matches:
            files.extend(_files_under(root, rel, manifest, where))
        kept = [f for f in files if outputs.owner(f) is None and not _in_state_dir(f)]
        if not kept:
            raise _no_match(manifest, task, pattern, files, outputs, where)
        found.update(kept)
    return sorted(found)


def _matches(root: str, pattern: str) -> list[str]:
    if _GLOB_CHARS.isdisjoint(pattern):
        return [pattern] if os.path.lexists(os.path.join(root, pattern)) else []
    return glob.glob(pattern, root_dir=root, recursive=True)


def _files_under(
    root: str, rel: str, manifest: Manifest, where: tuple[str | int, ...]
) -> list[str]:
    path = os.path.join(root, rel)
    _check_inside(root, rel, manifest, where)
    if not os.path.isdir(path):
        return [rel]
    files = []
    for folder, dirs, names in os.walk(path):
        rel_folder = os.path.relpath(folder, root)
        kept_dirs = []
        for name in dirs:
            sub = os.path.join(rel_folder, name)
            if os.path.islink(os.path.join(folder, name)):
                _check_inside(root, sub, manifest, where)
                files.append(sub)  # bound as what it points to
            elif not _in_state_dir(sub):
                kept_dirs.append(name)
        dirs[:] = kept_dirs
        for name in names:
            sub = os.path.join(rel_folder, name)
            if os.path.islink(os.path.join(folder, name)):
                _check_inside(root, sub, manifest, where)
            files.append(sub)
    return files


def _check_inside(root: str, rel: str, manifest: Manifest, where: tuple[str | int, ...]) -> None:
    """An input must resolve to an existing path inside the project, through
    whatever symlinks it or its parent folders are."""
    path = os.path.join(root, rel)
    real = os.path.realpath(path)
    real_root = os.path.realpath(root)
    inside = (real + "/").startswith(real_root + "/") and not _in_state_dir(
        os.path.relpath(real, real_root)
    )
    if inside and os.path.exists(real):
        return
    link = _first_link_out(root, rel, real_root) if not inside else None
    if inside or link is None:
        raise ManifestError(
            f'task "{where[1]}": input "{rel}" is a dangling symlink',
            path=manifest.display_path,
            line=manifest.line_of(*where),
            reason=ManifestErrorReason.NOT_FOUND,
        )
    shown = (
        f'"{rel}" is a symlink'
        if link == rel
        else f'"{rel}" is reached through "{link}", a symlink'
    )
    raise ManifestError(
        f'task "{where[1]}": input {shown} to "{os.readlink(os.path.join(root, link))}", '
        "outside the project",
        path=manifest.display_path,
        line=manifest.line_of(*where),
        hint="a task sees only files inside the project folder; copy the file in, "
        'or fetch it in a task with network = "host"',
        reason=ManifestErrorReason.PATH_ESCAPES,
    )


def _first_link_out(root: str, rel: str, real_root: str) -> str | None:
    """The first component of ``rel`` that is a symlink leading out of the project."""
    parts = rel.split("/")
    for end in range(1, len(parts) + 1):
        prefix = "/".join(parts[:end])
        path = os.path.join(root, prefix)
        if os.path.islink(path):
            real = os.path.realpath(path)
            if not (real + "/").startswith(real_root + "/") or _in_state_dir(
                os.path.relpath(real, real_root)
            ):
                return prefix
    return None


def _in_state_dir(rel: str) -> bool:
    return rel == STATE_DIR or rel.startswith(STATE_DIR + "/")


def _no_match(
    manifest: Manifest,
    task: TaskDef,
    pattern: str,
    files: Iterable[str],
    outputs: OutputIndex,
    where: tuple[str | int, ...],
) -> ManifestError:
    line = manifest.line_of(*where)
    owners = sorted({o for f in files if (o := outputs.owner(f))})
    if owners:
        return ManifestError(
            f'task "{task.name}": input "{pattern}" names an output of task "{owners[0]}"',
            path=manifest.display_path,
            line=line,
            hint=f'write ":{owners[0]}" in `inputs` to use the outputs of that task',
            reason=ManifestErrorReason.NO_MATCH,
        )
    literal = _GLOB_CHARS.isdisjoint(pattern)
    message = (
        f'task "{task.name}": input "{pattern}" does not exist'
        if literal
        else f'task "{task.name}": input glob "{pattern}" matches no file'
    )
    return ManifestError(
        message,
        path=manifest.display_path,
        line=line,
        hint=f"paths are relative to the folder of {Path(manifest.display_path).name}",
        reason=ManifestErrorReason.NO_MATCH,
    )
