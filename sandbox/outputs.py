"""Collect a finished task's declared outputs from its staging folder.

Shared by every backend. Only declared outputs are kept; each is checked
before it can reach the project: it exists with the declared kind (file or
directory), holds only regular files, directories and symlinks, and every
symlink is relative and stays inside the task's declared outputs (a link to
/etc/passwd or ../../secret would let a later reader of the output escape).
When hitz runs as root, the task wrote as an unprivileged uid: ownership is
handed back to hitz's own uid/gid here.
"""

from __future__ import annotations

import os
import posixpath
import stat

from hitz.sandbox.spec import CollectedOutput, SandboxSpec


class OutputRejected(Exception):
    """A declared output is missing or unsafe; the message says which and why."""


def collect(spec: SandboxSpec, *, chown: bool = False) -> tuple[CollectedOutput, ...]:
    declared = [out.rstrip("/") for out in spec.outputs]
    collected = []
    for out in spec.outputs:
        rel = out.rstrip("/")
        staged = os.path.join(spec.staging_dir, rel)
        try:
            st = os.lstat(staged)
        except FileNotFoundError:
            kind = "directory" if out.endswith("/") else "file"
            raise OutputRejected(f'declared output {kind} "{out}" was not created') from None
        if out.endswith("/"):
            if not stat.S_ISDIR(st.st_mode):
                raise OutputRejected(f'declared output "{out}" is not a directory')
            _check_tree(staged, rel, declared)
        elif stat.S_ISLNK(st.st_mode):
            _check_link(staged, rel, declared)
        elif not stat.S_ISREG(st.st_mode):
            raise OutputRejected(f'declared output "{out}" is not a regular file')
        if chown:
            _chown_tree(staged)
        collected.append(CollectedOutput(out, staged))
    return tuple(collected)


def _check_tree(top: str, rel_top: str, declared: list[str]) -> None:
    for folder, dirs, files in os.walk(top):
        rel_folder = posixpath.join(rel_top, os.path.relpath(folder, top)).removesuffix("/.")
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            rel = posixpath.join(rel_folder, name)
            if stat.S_ISLNK(mode):
                _check_link(path, rel, declared)
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise OutputRejected(
                    f'output "{rel}" is a special file (fifo, socket or device); outputs may '
                    "hold only files, directories and symlinks"
                )


def _check_link(path: str, rel: str, declared: list[str]) -> None:
    target = os.readlink(path)
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    inside = not posixpath.isabs(target) and any(
        resolved == d or resolved.startswith(d + "/") for d in declared
    )
    if not inside:
        raise OutputRejected(
            f'output "{rel}" is a symlink to "{target}", outside the task\'s declared outputs'
        )


def _chown_tree(top: str) -> None:
    uid, gid = os.getuid(), os.getgid()
    os.lchown(top, uid, gid)
    if os.path.isdir(top) and not os.path.islink(top):
        for folder, dirs, files in os.walk(top):
            for name in dirs + files:
                os.lchown(os.path.join(folder, name), uid, gid)
