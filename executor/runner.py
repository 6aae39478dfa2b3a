"""Glue between the plan and a sandbox backend: prepare specs, keep outputs.

``Runner.prepare`` turns a task into a ``SandboxSpec`` (inputs expanded,
staging folder and log files chosen), or into its result at once: when the
task is up to date (``hitz.executor.uptodate``: nothing is built, read or
written), or when the cache holds its result (its outputs are restored).
``Runner.finish`` turns the backend's result into a ``TaskResult``, moving
the declared outputs of a successful task into the project and nothing of a
failed one.

The project's state folder ``.hitz/`` holds ``lock`` (one run per project at
a time), ``tmp/`` (staging folders of running tasks, removed as tasks end
and swept at the next start after a crash), ``logs/`` (each task's last
stdout and stderr), ``history.json`` (durations, for priorities),
``stat-cache.json`` (file digests), ``keys.json`` (the last key of each task,
for explanations) and ``up-to-date.json`` (the no-op fast path's record).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from hitz.executor.actions import (
    ActionKey,
    InputFile,
    build_key,
    host_rootfs_identity,
    platform_properties,
    policy_of,
)
from hitz.executor.cache import Destinations, TaskCache, cacheable
from hitz.executor.errors import HitzError, ManifestError, ManifestErrorReason, OutputError
from hitz.executor.events import Outcome, TaskResult
from hitz.executor.inputs import STATE_DIR, OutputIndex, expand
from hitz.executor.model import Manifest, TaskDef
from hitz.executor.statcache import StatCache
from hitz.executor.uptodate import RECORD_FILE, InputTuple, UpToDate, fingerprint, record_header
from hitz.sandbox.spec import (
    BASE_ENV,
    Image,
    InputMount,
    Network,
    SandboxResult,
    SandboxSpec,
    Status,
)

if TYPE_CHECKING:
    from hitz.executor.remote_tier import RemoteTier
    from hitz.executor.store import Digest, Store

STDERR_TAIL_LINES = 20
_RENAME_EXCHANGE = 2

# Opens the store when a task first needs it (None: it cannot be used).
StoreOpener = Callable[[], "Store | None"]


class Runner:
    """Prepares and finishes the tasks of one run; see the module docstring.

    ``store`` is the local store, or a function that opens it (called the
    first time a task is not up to date, so a no-op run never opens it), or
    None to run without the cache, and then without the up-to-date check.
    ``now`` is the wall clock in ns (see ``hitz.executor.uptodate``'s racy rule).
    """

    def __init__(
        self,
        manifest: Manifest,
        state_dir: Path,
        store: Store | StoreOpener | None = None,
        *,
        warn: Callable[[str], None] | None = None,
        explain: Callable[[str, list[str]], None] | None = None,
        now: Callable[[], int] = time.time_ns,
        remote: RemoteTier | None = None,
    ) -> None:
        self.manifest = manifest
        self.root = manifest.root
        self._root = str(manifest.root)
        self.state_dir = state_dir
        self.tmp = state_dir / "tmp" / str(os.getpid())
        self.logs = state_dir / "logs"
        self.outputs = OutputIndex(manifest)
        # The tasks that declare outputs: only they add files to a dependent's inputs.
        self._producers = {*self.outputs.files.values(), *self.outputs.dirs.values()}
        self.expanded: dict[str, list[str]] = {}
        self._trash = _Trash()
        self.stat = StatCache(state_dir / "stat-cache.json")
        self._store = store
        self._opened: Store | None = None  # opened here through ``store``: closed here
        self._cache: TaskCache | None = None
        self._warn = warn
        self._remote = remote  # the remote cache tier, asked after the store
        self._uptodate: UpToDate | None = None
        self._now = now  # wall clock, ns: when outputs are old enough to be recorded
        self.explain = explain
        self.keys: dict[str, ActionKey] = {}
        # Output files in the project whose digests this run knows (written,
        # restored, or found up to date): path -> (sha256 hex, size, executable).
        self.produced: dict[str, tuple[str, int, bool]] = {}
        self._fingerprints: dict[str, str] = {}  # of the key each task last got
        self._rootfs: str | None = None
        self._images: dict[str, str] = {}  # rootfs "image:NAME"/"docker:..." -> its identity
        self._resolved: dict[tuple[str, str], Image] = {}  # by (rootfs, backend)
        self._made_dirs = False
        self._project_dirs: set[Path] = set()  # folders known to exist in the project
        self._destinations = Destinations(self.root)

    @property
    def cache(self) -> TaskCache:
        """The task cache, opening the store through its opener on first use."""
        if self._cache is None:
            store = self._store
            if callable(store):
                store = self._opened = store()
            self._cache = TaskCache(store, self.root, self.state_dir, self.stat, self._warn,
                                    self._destinations, self._remote)
        return self._cache

    # --- before anything runs ----------------------------------------------------
    def preflight(self, tasks: list[TaskDef]) -> None:
        """Expand every selected task's inputs now, so a glob that matches
        nothing stops the run before any task starts."""
        for task in tasks:
            if task.inputs:
                self.expanded[task.name] = expand(self.manifest, task, self.outputs)
                self._check_dir_inputs(task)
            else:
                self.expanded[task.name] = []
        for task in tasks:
            if task.rootfs.startswith("image:"):
                from hitz.executor.images_def import find_definition

                find_definition(self.root, task.rootfs.removeprefix("image:"))

    def prepare_images(self, tasks: list[TaskDef]) -> None:
        """Find the digest of every image ``tasks`` run on, building (and
        pinning) one that is not pinned yet, before any task starts: the
        digest is part of each key that names it, and a bad image (a stale
        pin, a missing package) stops the run with exit status 2."""
        for task in tasks:
            if task.rootfs != "host":
                self._rootfs_of(task)

    def _check_dir_inputs(self, task: TaskDef) -> None:
        own = [o.rstrip("/") for o in task.outputs]
        for index, pattern in enumerate(task.inputs):
            folder = pattern.rstrip("/")
            if pattern.startswith(":") or not os.path.isdir(self.root / folder):
                continue
            for out in own:
                if out.startswith(folder + "/"):
                    raise ManifestError(
                        f'task "{task.name}": output "{out}" is inside its input folder '
                        f'"{pattern}"',
                        path=self.manifest.display_path,
                        line=self.manifest.line_of("tasks", task.name, "inputs", index),
                        hint="declare outputs in a folder of their own, such as build/",
                        reason=ManifestErrorReason.BAD_VALUE,
                    )

    # --- per task ---------------------------------------------------------------
    def key_for(self, task: TaskDef) -> tuple[ActionKey, list[InputMount]]:
        """``task``'s action key and the mounts of its inputs.

        Raises OutputError when a dependency's output is missing."""
        return self._key(task, self._input_files(task)), self._mounts(task)

    def prepare(self, task: TaskDef) -> SandboxSpec | TaskResult:
        """The sandbox spec to run ``task`` in, or its result when it is up
        to date, or when the cache holds it (its outputs are then restored in
        the project)."""
        started = time.monotonic()
        files = None
        record = self._record()
        if record is not None and record.has(task.name):
            if cacheable(task):
                try:
                    files = self._input_files(task)
                except OutputError:
                    pass  # the full path reports it
                else:
                    hit = record.check(task, self._fingerprint(task, files), self._root)
                    if hit is not None:
                        action, digests = hit
                        if digests:
                            self.produced.update(digests)
                        return TaskResult(task.name, Outcome.SUCCEEDED, "cached", 0,
                                          time.monotonic() - started, cached=True,
                                          cached_from="local", action_digest=action)
            record.forget(task.name)  # until it succeeds again
        key = self._key(task, self._input_files(task) if files is None else files)
        restored = self.cache.lookup(task, key)
        if restored is not None:
            self._add_produced(restored.files)
            self._succeeded(task, key)
            return TaskResult(task.name, Outcome.SUCCEEDED, "cached", 0,
                              time.monotonic() - started, cached=True,
                              cached_from=restored.source, action_digest=str(key.digest))
        if self.explain is not None:
            self.explain(task.name, self.cache.reasons.get(task.name, []))
        self.keys[task.name] = key
        staging = self.tmp / task.name
        if not self._made_dirs:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.logs.mkdir(parents=True, exist_ok=True)
            self._made_dirs = True
        staging.mkdir()
        return SandboxSpec(
            task=task.name,
            argv=task.argv,
            env={**BASE_ENV, **task.env},
            inputs=tuple(self._mounts(task)),
            outputs=task.outputs,
            staging_dir=str(staging),
            stdout_path=str(self.logs / f"{task.name}.stdout"),
            stderr_path=str(self.logs / f"{task.name}.stderr"),
            rootfs=task.rootfs,
            # A remote executor brings its own system (see _rootfs_of).
            image=None if task.rootfs == "host" or task.backend == "remote"
            else self._image(task),
            backend=task.backend,
            network=Network(task.network),
            timeout=task.timeout_s,
            policy=policy_of(task),
        )

    def _record(self) -> UpToDate | None:
        """The up-to-date record, loaded on first use; None when running
        without the cache (``--no-cache`` runs every task)."""
        if self._store is None:
            return None
        if self._uptodate is None:
            self._uptodate = UpToDate(self.state_dir / RECORD_FILE,
                                      record_header(self._rootfs_identity(), BASE_ENV),
                                      self._now)
        return self._uptodate

    def _succeeded(self, task: TaskDef, key: ActionKey) -> None:
        """``task``'s outputs are in the project: record it as up to date
        (if its result was cached: a task that may not be cached always runs)."""
        record = self._record()
        if record is not None and self.cache.store is not None and cacheable(task):
            record.done(task, self._fingerprints[task.name], str(key.digest), self._root,
                        self.produced)

    def _key(self, task: TaskDef, files: list[InputTuple]) -> ActionKey:
        from hitz.executor.store import Digest

        inputs = [InputFile(path, Digest(sha256, size), executable)
                  for path, sha256, size, executable in files]
        env = {**BASE_ENV, **task.env}
        properties = platform_properties(task, self._rootfs_of(task))
        self._fingerprints[task.name] = self._fingerprint(task, files)
        return build_key(task, env, inputs, properties)

    def _input_files(self, task: TaskDef) -> list[InputTuple]:
        """Every file of ``task``'s input root: its expanded inputs, then the
        outputs of the tasks it needs, as ``(path, sha256, size, executable)``.

        Raises OutputError when a dependency's output is missing or an input
        cannot be read."""
        files = self.expanded.get(task.name)
        if files is None:
            files = self.expanded[task.name] = expand(self.manifest, task, self.outputs)
        found = [self._input_file(rel) for rel in files]
        if self._producers.isdisjoint(task.deps):
            return found
        for dep in task.deps:
            for out in self.manifest.tasks[dep].outputs:
                rel = out.rstrip("/")
                if not os.path.lexists(f"{self._root}/{rel}"):
                    raise OutputError(
                        f'output "{out}" of task ":{dep}" is missing from the project',
                        hint=f"run `hitz run :{dep}` first",
                    )
                found.extend(self._input_file(f) for f in self._files_of_output(out))
        return found

    def _mounts(self, task: TaskDef) -> list[InputMount]:
        mounts = [InputMount(f"{self._root}/{rel}", rel) for rel in self.expanded[task.name]]
        for dep in task.deps:
            for out in self.manifest.tasks[dep].outputs:
                rel = out.rstrip("/")
                mounts.append(InputMount(f"{self._root}/{rel}", rel, out.endswith("/")))
        return mounts

    def _input_file(self, rel: str) -> InputTuple:
        known = self.produced.get(rel)
        if known is not None:
            return (rel, *known)
        try:
            return (rel, *self.stat.lookup(f"{self._root}/{rel}"))
        except OSError as exc:
            raise OutputError(f'cannot read input "{rel}": {exc.strerror}') from exc

    def _add_produced(self, files: Mapping[str, tuple[Digest, bool]]) -> None:
        for path, (digest, executable) in files.items():
            self.produced[path] = (digest.hash, digest.size, executable)

    def _files_of_output(self, declared: str) -> list[str]:
        """The files a dependency's output consists of, project-relative."""
        rel = declared.rstrip("/")
        if not declared.endswith("/"):
            return [rel]
        found = []
        for folder, _, names in os.walk(self.root / rel):
            for name in names:
                found.append(os.path.relpath(os.path.join(folder, name), self.root))
        return found

    def _rootfs_of(self, task: TaskDef) -> str:
        """The ``hitz.rootfs`` of ``task``'s key. A remote executor runs the
        task on its own system, which the instance name stands for
        (docs/remote-execution.md): such a result never passes for a local one."""
        if task.backend == "remote":
            return f"remote:{self.manifest.remote_instance}"
        if task.rootfs != "host":
            return self._image_identity(task.rootfs)
        return self._rootfs_identity()

    def _fingerprint(self, task: TaskDef, files: list[InputTuple]) -> str:
        """The up-to-date record's fingerprint of ``task``. The record's header
        holds the host's rootfs identity; a task on an image adds the image's
        digest, so re-pinning an image makes its tasks stale; a remote task adds
        "remote:<instance>", so moving a task to or from a remote makes it stale."""
        found = fingerprint(task, files)
        if task.rootfs == "host" and task.backend != "remote":
            return found
        return f"{found}:{self._rootfs_of(task)}"

    def _image_identity(self, rootfs: str) -> str:
        """``hitz.rootfs`` of a task on an image: its digest, whatever the
        backend ("image:sha256:HEX"; "docker:sha256:HEX" for a Docker image
        named by digest), so the key is the same in every backend. An image
        not yet pinned in hitz.lock is built and pinned here."""
        identity = self._images.get(rootfs)
        if identity is not None:
            return identity
        if rootfs.startswith("docker:"):
            identity = "docker:" + rootfs.rpartition("@")[2]
        else:
            from hitz.executor.images import build_image, image_identity

            name = rootfs.removeprefix("image:")
            digest = image_identity(name, self.root)
            if digest is None:
                digest = build_image(name, self.root, cache_folder(self.manifest),
                                     progress=_note).digest
            identity = "image:" + digest
        self._images[rootfs] = identity
        return identity

    def _image(self, task: TaskDef) -> Image:
        """The image ``task`` runs on, built (once) and, for the docker
        backend, imported into the engine."""
        found = self._resolved.get((task.rootfs, task.backend))
        if found is None:
            from hitz.executor.images import resolve

            found = resolve(task.rootfs, task.backend, project_root=self.root,
                            cache_root=cache_folder(self.manifest), progress=_note)
            self._resolved[(task.rootfs, task.backend)] = found
        return found

    def _rootfs_identity(self) -> str:
        if self._rootfs is None:
            self._rootfs = host_rootfs_identity(self._sha256)
        return self._rootfs

    def _sha256(self, path: str) -> tuple[_Sha256, bool]:
        sha256, _, executable = self.stat.lookup(path)
        return _Sha256(sha256), executable

    def finish(self, task: TaskDef, result: SandboxResult) -> TaskResult:
        staging = self.tmp / task.name
        logs = tuple(
            path for path in (str(self.logs / f"{task.name}.stdout"),
                              str(self.logs / f"{task.name}.stderr"))
            if os.path.exists(path)
        )
        try:
            if result.status is Status.SUCCEEDED:
                key = self.keys.pop(task.name, None)
                try:
                    digests = None
                    if key is not None:
                        digests = self.cache.record(
                            task, key, [(out.path, out.staged) for out in result.outputs])
                    for out in result.outputs:
                        self._promote(out.staged, out.path)
                except OutputError as exc:
                    return TaskResult(task.name, Outcome.FAILED, "output-failed",
                                      result.exit_code, result.duration_s, exc.message,
                                      None, logs)
                if digests:
                    self._add_produced(digests)
                if key is not None:
                    self._succeeded(task, key)
                return TaskResult(task.name, Outcome.SUCCEEDED, result.status.value,
                                  result.exit_code, result.duration_s, None, None, logs,
                                  action_digest=str(key.digest) if key else None,
                                  enforced=result.enforced, weakened=result.weakened)
            self.keys.pop(task.name, None)
            outcome = Outcome.CANCELLED if result.status is Status.CANCELLED else Outcome.FAILED
            tail = None if outcome is Outcome.CANCELLED else _tail(
                str(self.logs / f"{task.name}.stderr"))
            return TaskResult(
                task.name,
                outcome,
                result.status.value,
                result.exit_code,
                result.duration_s,
                result.message,
                tail,
                logs,
                enforced=result.enforced or None,
                weakened=result.weakened,
            )
        finally:
            # Removing a folder tree costs ~0.4 ms per folder on ext4 here; done
            # on the scheduler's thread it would leave a CPU idle each time.
            self._trash.put(staging)

    def _promote(self, staged: str, declared: str) -> None:
        """Move one output into the project, replacing what was there in one
        rename (a directory is swapped with renameat2(RENAME_EXCHANGE))."""
        rel = declared.rstrip("/")
        dest = self.root / rel
        self._destinations.check(dest, declared)
        try:
            if dest.parent not in self._project_dirs:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._project_dirs.add(dest.parent)
            if declared.endswith("/") and dest.is_dir() and not dest.is_symlink():
                _exchange(staged, str(dest))
                _remove(Path(staged))
            else:
                if dest.is_dir() and not dest.is_symlink():
                    _remove(dest)
                os.rename(staged, dest)
        except OSError as exc:
            raise OutputError(
                f'cannot write output "{declared}" into the project: {exc.strerror}'
            ) from exc

    def cleanup(self, *, interrupted: bool = False) -> None:
        """Remove every staging folder (returns when they are gone); keep the
        digests, keys and up-to-date record learnt for the next run; close
        the store if it was opened here. ``interrupted``: drop the remote
        uploads still queued or in flight rather than wait for them."""
        self._trash.close()
        _remove(self.tmp)
        self.stat.save()
        try:
            if self._cache is not None:
                self._cache.save()
                # Remote uploads read the store: before it closes.
                self._cache.flush(drop=interrupted)
        finally:
            if self._uptodate is not None:
                self._uptodate.save(self._root, self.manifest.tasks)
            if self._opened is not None:
                self._opened.close()


def _note(text: str) -> None:
    """One progress line of an image build, on stderr like every progress."""
    sys.stderr.write(f"hitz: {text}\n")
    sys.stderr.flush()


class _Sha256(NamedTuple):
    """A file's hash where a ``Digest`` would do but the store is not imported."""

    hash: str


class _Trash:
    """Removes folders on a background thread, in the order given."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, path: Path) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="hitz-trash", daemon=True)
            self._thread.start()
        self._queue.put(path)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _work(self) -> None:
        while (path := self._queue.get()) is not None:
            _remove(path)


def _exchange(a: str, b: str) -> None:
    import ctypes  # ~2 ms with the dlopen: only for a directory output replacing another

    libc = ctypes.CDLL(None, use_errno=True)
    res = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), b)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _tail(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = text.splitlines()[-STDERR_TAIL_LINES:]
    return "\n".join(lines) if lines else None


@contextlib.contextmanager
def project_lock(state_dir: Path) -> Iterator[None]:
    """Hold the project's run lock; sweep staging folders a crashed run left."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HitzError(
            f"cannot create the state folder `{state_dir}`: {exc.strerror}",
            hint="hitz keeps logs and temporary files in .hitz/ next to the manifest; "
            "make that folder writable",
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise HitzError(
                f"another hitz run is using this project (`{state_dir}/lock` is held)",
                hint="wait for it to finish, or stop it",
            ) from exc
        _remove(state_dir / "tmp")  # we hold the lock: anything in tmp/ is stale
        yield
    finally:
        os.close(fd)


def state_dir_for(manifest: Manifest) -> Path:
    return manifest.root / STATE_DIR


DEFAULT_CACHE_BYTES = 10 << 30


def cache_folder(manifest: Manifest) -> Path:
    """`[cache] dir` (relative to the manifest), else $HITZ_CACHE_DIR, else
    $XDG_CACHE_HOME/hitz, else ~/.cache/hitz."""
    if manifest.cache_dir:
        return manifest.root / manifest.cache_dir
    from hitz.executor.store import default_folder

    return default_folder()


def open_store(manifest: Manifest, warn: Callable[[str], None] | None) -> Store | None:
    """The local store, or None (after one warning) when it cannot be used:
    a run then goes on uncached rather than failing."""
    from hitz.executor.store import CacheUnavailable, Store

    try:
        return Store(cache_folder(manifest),
                     max_bytes=manifest.cache_max_bytes or DEFAULT_CACHE_BYTES)
    except CacheUnavailable as exc:
        if warn is None:
            raise
        warn(f"{exc.message}; running without the cache"
             + (f"\n\nhint: {exc.hint}" if exc.hint else ""))
        return None
