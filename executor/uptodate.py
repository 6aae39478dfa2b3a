"""The no-op fast path: a task whose outputs are already its result is left alone.

After a task succeeds (it ran, or its result came from the cache), the
runner records in ``.hitz/up-to-date.json``:

- the task's *fingerprint*: a hash of everything its REAPI Action is a
  function of: argv, env, declared outputs, timeout, network and sandbox
  policy, rootfs (every field of the task but the few ``_NOT_IN_ACTION``
  names), and each input file's (path, digest, executable bit), the digests
  coming from the stat cache, which only stats an unchanged file. What every
  task of the host shares (the rootfs identity, the sandbox contract, the
  base environment, the ISA, the code that turns a task into an Action) goes
  into the record's ``header`` instead: when it changes, every entry is stale;
- the action digest, reported for an up-to-date task as for a cache hit;
- a *stamp* of each output path (a directory output: of every path under
  it, the directory itself and its subfolders included): size, mtime_ns,
  inode, ctime_ns, and for a regular file its digest, which a task that
  needs it uses as the input's digest.

A later run (``UpToDate.check``) recomputes the fingerprint and lstat()s the
stamped paths. If the fingerprint is the same and every stamp still
matches, the task is up to date: no Action is built, the store is not
opened, nothing is written. Anything else (an input, the command or the
manifest's definition of the task changed, an output was edited, replaced,
chmod-ed or deleted, a file was added to or removed from a directory output,
the record is unreadable or from another version of hitz) sends the task
down the full path: build the Action, look it up, restore or run. That path
is always right; this one only has to be right when it says yes.

Why a stamp is enough: writing a file changes its mtime and ctime; chmod,
chown and link changes its ctime; creating, removing or renaming an entry
changes its directory's mtime and ctime (POSIX, ``<sys/stat.h>``: "upon
successful completion ... shall mark for update the last data modification
and last file status change timestamps of the parent directory"); a
replaced file is a new inode. The exception is a change in the same tick of
the filesystem's clock as the last one, so a task is recorded only once its
newest stamp is ``RACY_S`` older than the moment it was stamped (the stat
cache's rule); a task whose outputs were just written is stamped again at
the end of the run and recorded then if nothing moved and enough time has
passed, otherwise the next run takes the full path once and records it.

Crash safety: the file is replaced in one rename at the end of the run. A
run killed before that leaves the previous record, which describes the
project as it was: an output rewritten since has a new inode or ctime, an
input changed since gives another fingerprint, so nothing reads as up to
date that is not. A task that starts down the full path loses its entry
until it succeeds.

JSON, never pickle or marshal: ``.hitz/`` belongs to a project that may not
be trusted. Anything unreadable or of the wrong shape reads as "not up to
date".
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import stat
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hitz.executor import actions
from hitz.executor.model import TaskDef
from hitz.executor.statcache import RACY_NS, is_sha256_hex

__all__ = ["RECORD_FILE", "InputTuple", "UpToDate", "fingerprint", "record_header",
           "stamp_outputs"]

RECORD_FILE = "up-to-date.json"
_FORMAT = "hitz-up-to-date/1"

# One input file of a task's Action: (project path, sha256 hex, size, executable).
InputTuple = tuple[str, str, int, bool]
# One stamped output path: [project path, size, mtime_ns, ino, ctime_ns,
# sha256 hex of a regular file whose digest is known, else None, executable].
Stamp = list[Any]
# Digests of output files hitz knows: project path -> (sha256 hex, size, executable).
Digests = Mapping[str, tuple[str, int, bool]]


def record_header(rootfs_identity: str, base_env: Mapping[str, str]) -> str:
    """What every fingerprint of this host and this hitz shares; see the module docstring.

    Includes the source of ``actions`` and of this module, so a change to
    how an Action or a fingerprint is made cannot leave an entry that still
    matches; if the source cannot be read, a random value: nothing matches.
    """
    try:
        code = b"".join(Path(module).read_bytes() for module in (actions.__file__, __file__))
    except OSError:
        code = os.urandom(16)
    parts = (
        _FORMAT,
        hashlib.sha256(code).hexdigest(),
        sys.version_info[:2],  # repr(), which the fingerprint hashes, is Python's
        sorted(actions.host_properties(rootfs_identity).items()),
        sorted(base_env.items()),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# The fields of a task that cannot change its Action: its name (two tasks
# alike share an Action), where it is written, which tasks it waits for (what
# it reads of them is in its inputs), whether it may be cached (decided
# before the fingerprint is looked at), the backend (every backend keeps the
# same contract) and ``shell`` (``argv`` says it). Every other field is in the
# fingerprint, a field added to TaskDef later included: a task is stale when
# it changes, never wrongly up to date. ``env`` is added sorted.
_NOT_IN_ACTION = frozenset({"name", "line", "description", "deps", "cache", "backend", "shell",
                            "env"})
_action_fields = operator.attrgetter(
    *(name for name in TaskDef.__match_args__ if name not in _NOT_IN_ACTION))


def fingerprint(task: TaskDef, inputs: Sequence[InputTuple]) -> str:
    """A hash of what ``task``'s Action depends on besides the record's header.

    ``repr`` of a tuple of strings, numbers, booleans and None is unambiguous
    (two different tuples never print alike), and ~3 times cheaper than JSON
    on a 10,000-task no-op run. An input order that differs between runs (a
    reordered ``inputs``) only makes a task stale, never wrongly up to date.
    """
    env = sorted(task.env.items()) if task.env else ()
    text = repr((_action_fields(task), env, inputs))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def stamp_outputs(root: str, outputs: Iterable[str], digests: Digests) -> list[Stamp]:
    """Stamps of a task's declared ``outputs`` as they are in the project now.

    A directory output gives one stamp per path under it (sorted, folders
    included, symlinks not followed). Raises OSError if an output is missing.
    """
    stamps: list[Stamp] = []
    for declared in outputs:
        rel = declared.rstrip("/")
        st = os.lstat(f"{root}/{rel}")
        stamps.append(_stamp(rel, st, digests))
        if declared.endswith("/") and stat.S_ISDIR(st.st_mode):
            _stamp_tree(root, rel, digests, stamps)
    return stamps


def _stamp_tree(root: str, rel: str, digests: Digests, stamps: list[Stamp]) -> None:
    with os.scandir(f"{root}/{rel}") as entries:
        found = sorted((entry.name, entry) for entry in entries)
    for name, entry in found:
        child = f"{rel}/{name}"
        st = entry.stat(follow_symlinks=False)
        stamps.append(_stamp(child, st, digests))
        if stat.S_ISDIR(st.st_mode):
            _stamp_tree(root, child, digests, stamps)


def _stamp(rel: str, st: os.stat_result, digests: Digests) -> Stamp:
    known = digests.get(rel) if stat.S_ISREG(st.st_mode) else None
    hexdigest, executable = None, False
    if known is not None and known[1] == st.st_size:
        hexdigest, executable = known[0], known[2]
    return [rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, hexdigest, executable]


def _newest(stamps: Iterable[Stamp]) -> int:
    return max((max(s[2], s[4]) for s in stamps), default=0)


class UpToDate:
    """The record of one project (``<state dir>/up-to-date.json``), loaded once.

    ``check`` answers for one task; ``done`` and ``forget`` change the record
    in memory; ``save`` writes it, atomically, once at the end of the run.
    """

    def __init__(self, path: Path, header: str, now: Callable[[], int] = time.time_ns) -> None:
        """``now``: the wall clock in ns, for the racy rule (tests move it)."""
        self.path = path
        self.header = header
        self._now = now
        self._entries: dict[str, Any] = {}
        self._pending: dict[str, tuple[str, str, tuple[str, ...], list[Stamp], int]] = {}
        self._dirty = False
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            data = None
        if (isinstance(data, dict) and data.get("format") == _FORMAT
                and data.get("header") == header and isinstance(data.get("tasks"), dict)):
            self._entries = data["tasks"]
        elif data is not None:
            self._dirty = True  # another header: rewrite without its entries

    def has(self, name: str) -> bool:
        """Whether ``name`` has an entry (that ``check`` may find up to date)."""
        return name in self._entries

    def check(self, task: TaskDef, fingerprint: str, root: str
              ) -> tuple[str, dict[str, tuple[str, int, bool]]] | None:
        """``(action digest, digests of its output files)`` if ``task`` is up
        to date with ``fingerprint``, else None."""
        entry = self._entries.get(task.name)
        if entry is None:
            return None
        try:
            recorded, action, stamps = entry
            if recorded != fingerprint or type(action) is not str:
                return None
            if not (stamps or task.outputs):
                return action, {}
            declared = {out.rstrip("/") for out in task.outputs}
            roots = 0
            digests: dict[str, tuple[str, int, bool]] = {}
            for rel, size, mtime, ino, ctime, hexdigest, executable in stamps:
                st = os.lstat(f"{root}/{rel}")
                if (st.st_size != size or st.st_mtime_ns != mtime or st.st_ino != ino
                        or st.st_ctime_ns != ctime):
                    return None
                if rel in declared:
                    roots += 1
                if hexdigest is not None:
                    if not is_sha256_hex(hexdigest):
                        return None
                    digests[rel] = (hexdigest, size, executable is True)
            if roots != len(declared):
                return None
            return action, digests
        except (OSError, TypeError, ValueError):
            return None

    def done(self, task: TaskDef, fingerprint: str, action: str, root: str,
             digests: Digests) -> None:
        """``task`` just succeeded with ``fingerprint``: stamp its outputs now,
        to record them at ``save`` (see the module docstring for when)."""
        self.forget(task.name)
        try:
            stamps = stamp_outputs(root, task.outputs, digests)
        except OSError:
            return
        self._pending[task.name] = (fingerprint, action, task.outputs, stamps, self._now())

    def forget(self, name: str) -> None:
        """``name`` is no longer known to be up to date."""
        self._pending.pop(name, None)
        if self._entries.pop(name, None) is not None:
            self._dirty = True

    def save(self, root: str, tasks: Collection[str]) -> None:
        """Write the record, keeping only the entries of ``tasks`` (the
        manifest's). Never raises: a record that cannot be written only
        costs the next run its fast path."""
        for name, (fp, action, outputs, stamps, stamped_at) in self._pending.items():
            if stamped_at - _newest(stamps) < RACY_NS:
                digests = {s[0]: (s[5], s[1], s[6]) for s in stamps if s[5] is not None}
                try:
                    again = stamp_outputs(root, outputs, digests)
                except OSError:
                    continue
                if again != stamps or self._now() - _newest(stamps) < RACY_NS:
                    continue
            self._entries[name] = [fp, action, stamps]
            self._dirty = True
        self._pending.clear()
        stale = [name for name in self._entries if name not in tasks]
        for name in stale:
            del self._entries[name]
        if not (self._dirty or stale):
            return
        data = json.dumps({"format": _FORMAT, "header": self.header, "tasks": self._entries},
                          separators=(",", ":"))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(data)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            tmp.unlink(missing_ok=True)
