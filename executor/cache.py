"""The task cache: decide hit or miss, restore outputs, record results.

``TaskCache.lookup`` is where a miss is decided, so it is also where the
reason is recorded in the user's words (``:build: input src/main.c changed``)
for ``hitz run --explain`` and ``hitz explain``; the reasons cannot drift from
the logic. ``TaskCache.record`` stores a successful task's outputs and its
``ActionResult``.

Never cached: a task that failed, timed out or was killed (only successes
reach ``record``), a task with ``cache = false``, and a task with
``network = "host"`` unless it says ``cache = true``.

With a remote cache (``[cache] remote``), a local miss asks the remote
(``hitz.executor.remote_tier``): a remote hit lands in the local store and
is restored like a local one; a recorded result is also uploaded, in the
background (``flush`` waits for it at the end of the run).

The store is optional at every step: when the cache folder cannot be used,
hitz warns once and runs everything uncached; a blob that has gone missing
behind an action-cache hit makes that lookup a miss (the run repairs it).

Outputs already in the project with the right digests are not rewritten (a
file, a symlink, or a whole directory output, compared through the stat
cache): a hit then costs reads, not writes.

The store and protobuf are imported by the methods that use them: a run in
which every task is up to date imports this module (``cacheable``) but never
needs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hitz.executor.errors import OutputError
from hitz.executor.model import TaskDef
from hitz.executor.statcache import StatCache

if TYPE_CHECKING:
    from hitz.executor.actions import ActionKey
    from hitz.executor.remote_tier import RemoteTier
    from hitz.executor.store import CacheUnavailable, Digest, Store
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

log = logging.getLogger(__name__)


def cacheable(task: TaskDef) -> bool:
    if task.cache is not None:
        return task.cache
    return task.network != "host"


def uncacheable_reason(task: TaskDef) -> str | None:
    """Why ``task``'s result is never cached, in the user's words (None: it is cached)."""
    if cacheable(task):
        return None
    if task.cache is False:
        return "caching is off for this task"
    return 'network = "host" tasks are not cached unless cache = true'


def check_outputs(result: pb.ActionResult, command: pb.Command) -> None:
    """Raise ``ValueError`` unless ``result`` holds exactly the outputs ``command``
    declares: each file as a file (or a symlink in its place, in
    ``output_symlinks``, the field hitz restores), each directory as a tree.
    Another path would be written where the task has no business writing; a
    missing one would be a hit that leaves an output missing."""
    files = set(command.output_files)
    folders = set(command.output_directories)
    links = {s.path for s in result.output_symlinks}
    for kind, paths, allowed in (
            ("file", [f.path for f in result.output_files], files),
            ("directory", [d.path for d in result.output_directories], folders),
            ("symlink", links, files),
            # REAPI 2.0's symlink fields: only as copies of output_symlinks.
            ("symlink", [s.path for s in result.output_file_symlinks], links),
            ("symlink", [s.path for s in result.output_directory_symlinks], links)):
        for path in paths:
            if path not in allowed:
                raise ValueError(f"it names the output {kind} {path!r}, "
                                 "which the task does not declare")
    present = {f.path for f in result.output_files} | links \
        | {d.path for d in result.output_directories}
    for path in sorted((files | folders) - present):
        raise ValueError(f"it lacks the declared output {path!r}")


def check_names(directory: pb.Directory) -> None:
    """Raise ``ValueError`` unless every entry of ``directory`` has a plain name."""
    names = [*(f.name for f in directory.files), *(d.name for d in directory.directories),
             *(s.name for s in directory.symlinks)]
    for name in names:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise ValueError(f"a tree holds the name {name!r}, not a plain file name")


class Destinations:
    """Where outputs may be written: inside the project for real.

    A folder on the way that is a symlink out of the project would carry an
    output out of it, whether the output comes from a run or from the cache.
    Folders found inside are remembered for the run: resolving a path costs
    an lstat per component, for every one of 10,000 outputs otherwise.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._real_root: str | None = None
        self._inside: set[Path] = set()

    def check(self, dest: Path, declared: str) -> None:
        """Raise OutputError unless ``dest``, the place of output ``declared``,
        is inside the project."""
        parent = dest.parent
        if parent in self._inside:
            return
        while not parent.exists() and parent != self.root:
            parent = parent.parent
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        real_root = self._real_root
        real = os.path.realpath(parent)
        if (real + "/").startswith(real_root + "/") or real == real_root:
            if parent == dest.parent:
                self._inside.add(parent)
            return
        link = next((p for p in [parent, *parent.parents] if p.is_symlink()), parent)
        raise OutputError(
            f'cannot write output "{declared}": `{link.relative_to(self.root)}` is a symlink '
            f"to `{os.readlink(link)}`, outside the project",
            hint="remove the symlink, or declare outputs in a folder of the project",
        )


@dataclass(frozen=True)
class Restored:
    """Outputs restored from the cache: project path -> (digest, executable).
    ``source`` says which tier held the result: "local", or "remote" when it
    was fetched from the remote cache this run (reported as ``cached_from``)."""

    files: Mapping[str, tuple[Digest, bool]]
    source: str = "local"


class TaskCache:
    def __init__(self, store: Store | None, root: Path, state_dir: Path, stat: StatCache,
                 warn: object = None, destinations: Destinations | None = None,
                 remote: RemoteTier | None = None) -> None:
        self.store = store
        # Asked after the store, fed after it (hitz.executor.remote_tier); only
        # with a store, which is where its blobs land.
        self.remote = remote
        self.root = root
        self.destinations = destinations or Destinations(root)
        self.stat = stat
        self._keys_path = state_dir / "keys.json"
        self._loaded: dict[str, dict[str, object]] | None = None  # keys.json, when needed
        # This run's key of each task looked up, described at ``save`` only if
        # it is not the one ``keys.json`` already holds.
        self._current: dict[str, ActionKey] = {}
        self.reasons: dict[str, list[str]] = {}
        self._warn = warn
        self.warning: str | None = None
        # Store each result's Action, Command and input tree too (for a remote).
        self.keep_action_blobs = False

    @property
    def _previous(self) -> dict[str, dict[str, object]]:
        """The keys of earlier runs (``keys.json``), read on first use: a run
        whose lookups all hit reads it once at ``save``, to compare."""
        if self._loaded is None:
            self._loaded = _load_keys(self._keys_path)
        return self._loaded

    # --- lookups -----------------------------------------------------------------
    def lookup(self, task: TaskDef, key: ActionKey) -> Restored | None:
        """Restore ``task``'s outputs if the cache holds its result; else
        record why not in ``reasons[task.name]`` and return None."""
        from hitz.executor.store import BlobMissing, CacheUnavailable
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

        self._current[task.name] = key
        reason = uncacheable_reason(task)
        if reason is not None:
            self._miss(task, [reason])
            return None
        if self.store is None:
            self._miss(task, ["no cache available"])
            return None
        try:
            data = self.store.get_action_result(key.digest)
            if data is None:
                remote = self._from_remote(task, key)
                if remote is not None:
                    return replace(self._restore(task, remote), source="remote")
                self._miss(task, self.explain(task.name, key))
                return None
            result = pb.ActionResult.FromString(data)
            if result.exit_code != 0:
                self._miss(task, ["the cached result is a failure"])
                return None
            try:
                # `hitz cache serve` lets its clients write results into this
                # store: a result is checked here, not trusted for being local.
                check_outputs(result, key.command)
            except ValueError:
                self._miss(task, ["the cached result's outputs are not the task's declared "
                                  "outputs"])
                return None
            return self._restore(task, result)
        except ValueError as exc:  # check_names (a tree naming ".." or "a/b"), a bad digest
            self._miss(task, [f"the cached result cannot be restored: {exc}"])
            return None
        except BlobMissing:
            self._miss(task, ["a cached output is missing from the cache"])
            return None
        except CacheUnavailable as exc:
            self._disable(exc)
            self._miss(task, ["no cache available"])
            return None

    def _from_remote(self, task: TaskDef, key: ActionKey) -> pb.ActionResult | None:
        """The remote's result for ``key``, its blobs now in the store; None on a miss."""
        if self.remote is None or self.store is None:
            return None
        return self.remote.fetch(task.name, key.digest, self.store, key.command)

    def flush(self, *, drop: bool = False) -> None:
        """Wait (boundedly) for the remote uploads of this run; close the remote.
        ``drop``: the run was interrupted; cancel them instead of waiting."""
        if self.remote is not None:
            self.remote.flush(drop=drop)

    def explain(self, name: str, key: ActionKey) -> list[str]:
        """Why ``key`` differs from the last one recorded for ``name``."""
        before = self._previous.get(name)
        if not isinstance(before, dict):
            return ["no earlier run recorded"]
        now = _describe(key)
        if before.get("action") == now["action"]:
            return ["no entry in the cache (evicted, or never stored)"]
        reasons = []
        old_inputs, new_inputs = before.get("inputs", {}), now["inputs"]
        if not isinstance(old_inputs, dict):
            old_inputs = {}
        assert isinstance(new_inputs, dict)
        for path in sorted(set(old_inputs) | set(new_inputs)):
            if path not in old_inputs:
                reasons.append(f"input {path} added")
            elif path not in new_inputs:
                reasons.append(f"input {path} removed")
            elif old_inputs[path] != new_inputs[path]:
                reasons.append(f"input {path} changed")
        if before.get("argv") != now["argv"]:
            reasons.append("command changed")
        old_env, new_env = before.get("env", {}), now["env"]
        if not isinstance(old_env, dict):
            old_env = {}
        assert isinstance(new_env, dict)
        for name_ in sorted(set(old_env) | set(new_env)):
            if old_env.get(name_) != new_env.get(name_):
                reasons.append(f"env {name_} changed")
        old_platform, new_platform = before.get("platform", {}), now["platform"]
        if not isinstance(old_platform, dict):
            old_platform = {}
        assert isinstance(new_platform, dict)
        words = {"hitz.rootfs": "rootfs", "hitz.network": "network policy",
                 "hitz.sandbox": "sandbox policy"}
        for prop in sorted(set(old_platform) | set(new_platform)):
            if old_platform.get(prop) != new_platform.get(prop):
                reasons.append(f"{words.get(prop, prop)} changed")
        if before.get("outputs") != now["outputs"]:
            reasons.append("declared outputs changed")
        return reasons or ["timeout changed"]

    def _miss(self, task: TaskDef, reasons: list[str]) -> None:
        self.reasons[task.name] = reasons

    # --- restoring -----------------------------------------------------------------
    def _restore(self, task: TaskDef, result: pb.ActionResult) -> Restored:
        from hitz.executor.store import Digest
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

        assert self.store is not None
        places = [*(out.path for out in result.output_files),
                  *(out.path + "/" for out in result.output_directories),
                  *(link.path for link in result.output_symlinks)]
        for declared in places:  # all of them before anything is written
            self.destinations.check(self.root / declared.rstrip("/"), declared)
        files: dict[str, tuple[Digest, bool]] = {}
        for out in result.output_files:
            digest = Digest(out.digest.hash, out.digest.size_bytes)
            self._restore_file(out.path, digest, out.is_executable)
            files[out.path] = (digest, out.is_executable)
        for out_dir in result.output_directories:
            tree = pb.Tree.FromString(
                self.store.read_bytes(Digest(out_dir.tree_digest.hash,
                                             out_dir.tree_digest.size_bytes)))
            files.update(self._restore_tree(out_dir.path, tree))
        for link in result.output_symlinks:
            self._restore_symlink(link.path, link.target)
        return Restored(files)

    def _restore_file(self, rel: str, digest: Digest, executable: bool) -> None:
        assert self.store is not None
        dest = self.root / rel
        if self._in_place(dest, digest, executable):
            return  # already there: do not rewrite it
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        self.store.copy_to(digest, dest, executable=executable)

    def _in_place(self, path: Path, digest: Digest, executable: bool) -> bool:
        """Is ``path`` a regular file (not a symlink) with this content and executable bit?"""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            sha256, size, is_exec = self.stat.lookup(str(path))
        except OSError:
            return False
        return (sha256, size, is_exec) == (digest.hash, digest.size, executable)

    def _restore_symlink(self, rel: str, target: str) -> None:
        dest = self.root / rel
        with contextlib.suppress(OSError):
            if os.readlink(dest) == target:
                return  # already there: do not rewrite it
        tmp = dest.with_name(f".{dest.name}.hitz-tmp")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, dest)

    def _restore_tree(self, rel: str, tree: pb.Tree) -> dict[str, tuple[Digest, bool]]:
        """Rebuild a directory output beside its place, then swap it in;
        unless the project already holds exactly this tree."""
        from hitz.executor.store import BlobMissing, Digest

        assert self.store is not None
        children = {}
        for child in tree.children:
            data = child.SerializeToString(deterministic=True)
            children[Digest.of(data).hash] = child
        dest = self.root / rel
        files: dict[str, tuple[Digest, bool]] = {}
        links: dict[str, str] = {}
        folders: list[str] = []

        def walk(directory: pb.Directory, prefix: str) -> None:
            check_names(directory)
            for f in directory.files:
                files[f"{prefix}/{f.name}"] = (Digest(f.digest.hash, f.digest.size_bytes),
                                               f.is_executable)
            for link in directory.symlinks:
                links[f"{prefix}/{link.name}"] = link.target
            for d in directory.directories:
                sub = children.get(d.digest.hash)
                if sub is None:
                    raise BlobMissing(f"directory {d.digest.hash} missing from a cached tree")
                folders.append(f"{prefix}/{d.name}")
                walk(sub, f"{prefix}/{d.name}")

        walk(tree.root, rel)
        if self._tree_in_place(dest, rel, files, links, set(folders)):
            return files
        staging = dest.with_name(f".{dest.name}.hitz-restore")
        if staging.exists():
            shutil.rmtree(staging)
        inside = len(rel) + 1
        # A fresh checkout has no build/ yet (files and symlinks make their
        # folders too); Destinations.check ruled out symlinked parents.
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.mkdir()
            for folder in folders:  # parents before children: walk() lists them so
                (staging / folder[inside:]).mkdir()
            for path, target in links.items():
                os.symlink(target, staging / path[inside:])
            for path, (digest, executable) in files.items():
                self.store.copy_to(digest, staging / path[inside:], executable=executable)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.hitz-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dest, old)
            os.rename(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            os.rename(staging, dest)
        return files

    def _tree_in_place(self, dest: Path, rel: str, files: Mapping[str, tuple[Digest, bool]],
                       links: Mapping[str, str], folders: set[str]) -> bool:
        """Does the project hold exactly this tree under ``dest``: the same
        paths, files with the same content and executable bit, the same
        symlink targets, nothing else?"""
        if not dest.is_dir() or dest.is_symlink():
            return False
        found = 0
        for folder, dirs, names in os.walk(dest):
            prefix = rel + folder[len(str(dest)):]
            for name in dirs + names:
                path, full = f"{prefix}/{name}", f"{folder}/{name}"
                try:
                    if path in folders:
                        same = os.path.isdir(full) and not os.path.islink(full)
                    elif path in links:
                        same = os.readlink(full) == links[path]
                    elif path in files:
                        same = self._in_place(Path(full), *files[path])
                    else:
                        same = False
                except OSError:
                    same = False
                if not same:
                    return False
                found += 1
        return found == len(files) + len(links) + len(folders)

    # --- recording ---------------------------------------------------------------------
    def record(self, task: TaskDef, key: ActionKey,
               outputs: list[tuple[str, str]]) -> dict[str, tuple[Digest, bool]] | None:
        """Store a successful task's outputs (``(declared path, staged path)``)
        and its ActionResult. Returns the digests of the output files by
        project path, or None when nothing was stored."""
        from hitz.executor.store import CacheUnavailable

        if self.store is None or not cacheable(task):
            return None
        try:
            files, result = self._record(key, outputs)
        except CacheUnavailable as exc:
            self._disable(exc)
            return None
        if self.remote is not None:
            self.remote.upload(task.name, key.digest, result, self.store, dict(key.blobs))
        return files

    def _record(self, key: ActionKey, outputs: list[tuple[str, str]]
                ) -> tuple[dict[str, tuple[Digest, bool]], pb.ActionResult]:
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

        assert self.store is not None
        result = pb.ActionResult(exit_code=0)
        files: dict[str, tuple[Digest, bool]] = {}
        for declared, staged in sorted(outputs):
            rel = declared.rstrip("/")
            st = os.lstat(staged)
            if declared.endswith("/"):
                tree, tree_files = self._tree(staged, rel)
                data = tree.SerializeToString(deterministic=True)
                digest = self.store.put_bytes(data)
                result.output_directories.add(
                    path=rel, tree_digest=pb.Digest(hash=digest.hash, size_bytes=digest.size))
                files.update(tree_files)
            elif stat.S_ISLNK(st.st_mode):
                result.output_symlinks.add(path=rel, target=os.readlink(staged))
            else:
                digest = self.store.put_file(staged)
                executable = bool(st.st_mode & 0o111)
                result.output_files.add(
                    path=rel, digest=pb.Digest(hash=digest.hash, size_bytes=digest.size),
                    is_executable=executable)
                files[rel] = (digest, executable)
        # The Action, Command and input Directory blobs matter only to a
        # remote (execution, or a cache that checks them); locally they would
        # cost three more files per task, for nothing a lookup reads.
        if self.keep_action_blobs:
            for digest, blob in key.blobs.items():
                if not self.store.contains(digest):
                    self.store.put_bytes(blob)
        self.store.put_action_result(key.digest, result.SerializeToString(deterministic=True))
        return files, result

    def _tree(self, folder: str, rel: str) -> tuple[pb.Tree, dict[str, tuple[Digest, bool]]]:
        from hitz.executor.store import Digest
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

        assert self.store is not None
        files: dict[str, tuple[Digest, bool]] = {}
        children: list[pb.Directory] = []

        def directory(path: str, prefix: str) -> pb.Directory:
            node = pb.Directory()
            # REAPI Directory: entries "MUST be sorted in lexicographical order by name".
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    node.symlinks.add(name=name, target=os.readlink(full))
                elif stat.S_ISDIR(st.st_mode):
                    child = directory(full, f"{prefix}/{name}")
                    children.append(child)
                    data = child.SerializeToString(deterministic=True)
                    d = Digest.of(data)
                    node.directories.add(name=name,
                                         digest=pb.Digest(hash=d.hash, size_bytes=d.size))
                else:
                    assert self.store is not None
                    d = self.store.put_file(full)
                    executable = bool(st.st_mode & 0o111)
                    node.files.add(name=name, digest=pb.Digest(hash=d.hash, size_bytes=d.size),
                                   is_executable=executable)
                    files[f"{prefix}/{name}"] = (d, executable)
            return node

        root = directory(folder, rel)
        return pb.Tree(root=root, children=children), files

    # --- state ---------------------------------------------------------------------------
    def _disable(self, exc: CacheUnavailable) -> None:
        if self.warning is None:
            self.warning = f"{exc.message}; running without the cache"
            if exc.hint:
                self.warning += f"\n\nhint: {exc.hint}"
            if callable(self._warn):
                self._warn(self.warning)
        self.store = None

    def save(self) -> None:
        """Remember this run's keys, for the explanations of the next one.
        A key that is the one already remembered is not described again."""
        if not self._current:
            return
        previous = self._previous
        changed = {name: _describe(key) for name, key in self._current.items()
                   if not _same_action(previous.get(name), key)}
        if not changed:
            return
        merged = {**previous, **changed}
        tmp = self._keys_path.with_name(f".{self._keys_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, self._keys_path)
        except OSError:
            tmp.unlink(missing_ok=True)


def _same_action(described: object, key: ActionKey) -> bool:
    return isinstance(described, dict) and described.get("action") == str(key.digest)


def _describe(key: ActionKey) -> dict[str, object]:
    return {
        "action": str(key.digest),
        "argv": list(key.command.arguments),
        "env": {v.name: v.value for v in key.command.environment_variables},
        "platform": dict(key.platform),
        "outputs": list(key.command.output_paths),
        "inputs": dict(key.inputs),
    }


def _load_keys(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_bytes())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
