"""``hitz worker``: a bot of the Remote Workers API that runs leases in hitz's sandbox.

BuildGrid schedules REAPI ``Execute`` requests but runs nothing itself: a
*bot* opens a session (``Bots.CreateBotSession``), keeps it alive with
``UpdateBotSession`` and receives *leases* through it, each holding an
Action (or its Digest). ``hitz worker --server grpc://HOST:PORT`` is such a
bot. For each lease it:

1. reads the Action, its Command and input root from the server's CAS
   (``hitz.executor.remote.RemoteCache``, every blob verified) and writes the
   input root into a private folder;
2. runs the command in hitz's namespace sandbox (``hitz.sandbox.namespace``):
   the input root read-only at /work, only the Command's output paths
   writable, no network, the Action's timeout, hitz's default policy;
3. uploads stdout, stderr and the outputs that exist (files, and folders as
   REAPI ``Tree``s) and reports the lease COMPLETED with an ``ActionResult``
   (status OK and the exit code), or with an error status when the sandbox
   could not be built (INTERNAL) or the task timed out (DEADLINE_EXCEEDED).

Leases run one at a time per worker (``--jobs`` runs more at once); while
one runs, the session is still updated at least every ``POLL_S`` so the
server does not take the bot for dead. A lease the server cancels (dropped from the
session) has its sandbox cancelled.

The worker's primary device advertises this host's ``OSFamily`` and
``ISA``; a server matches an action's ``Platform`` against them.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hitz.executor.errors import HitzError, Reason
from hitz.sandbox.spec import InputMount, SandboxBackend, SandboxResult, SandboxSpec, Status

if TYPE_CHECKING:
    import grpc

    from hitz.executor.remote import RemoteCache
    from hitz.executor.store import Digest
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
    from hitz.protos.google.devtools.remoteworkers.v1test2 import bots_pb2

__all__ = ["Worker", "WorkerError", "run_worker"]

# The deadline of each CreateBotSession/UpdateBotSession. BuildGrid holds the
# call up to 80% of it waiting for work (and assigns none below 3 s of that),
# so this is also how often an idle worker checks in. A finished lease does
# not wait for it: the pending call is cancelled and the result sent at once.
POLL_S = 10.0
DEFAULT_TIMEOUT_S = 600.0  # an Action without a timeout gets this one


class WorkerErrorReason(Reason):
    UNREACHABLE = "unreachable"
    REFUSED = "refused"


class WorkerError(HitzError):
    """The worker could not open or keep its session with the server."""


@dataclass
class _Running:
    lease: bots_pb2.Lease
    thread: threading.Thread
    done: bots_pb2.Lease | None = None  # the COMPLETED lease, once finished
    cancel: threading.Event | None = None


class Worker:
    """One bot session on ``remote``'s server; see the module docstring.

    ``backend`` builds the sandbox backend of one lease (hitz's namespace
    backend by default). ``work_dir`` holds each lease's input root, staging
    folder and logs, removed as the lease ends.
    """

    def __init__(self, remote: RemoteCache, *, work_dir: Path, jobs: int = 1,
                 backend: Callable[[], SandboxBackend] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        from hitz.protos.google.devtools.remoteworkers.v1test2 import bots_pb2_grpc

        self.remote = remote
        self.work_dir = work_dir
        self.jobs = jobs
        self._backend = backend or _namespace_backend
        self._log = log or (lambda text: None)
        self._bots = bots_pb2_grpc.BotsStub(remote.channel)
        self._running: dict[str, _Running] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # a lease finished: report it now
        self.completed = 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def serve(self) -> None:
        """Open the session and take leases until ``stop`` (or Ctrl-C)."""
        session = self._create()
        self._log(f"worker: session {session.name} on {self.remote.url}")
        try:
            # The server may hand out a lease in its answer to CreateBotSession already.
            self._take(session)
            while not self._stop.is_set():
                session = self._update(session)
                self._take(session)
        finally:
            for running in self._running.values():
                if running.cancel is not None:
                    running.cancel.set()
            for running in self._running.values():
                running.thread.join()

    # --- the session ------------------------------------------------------------------

    def _create(self) -> bots_pb2.BotSession:
        from hitz.protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2

        # Schedulers match an action's platform against the primary (first)
        # device's properties, the one that runs the commands.
        device = worker_pb2.Device(handle=socket.gethostname(), properties=[
            worker_pb2.Device.Property(key="OSFamily", value="linux"),
            worker_pb2.Device.Property(key="ISA", value=platform.machine().replace("_", "-")),
        ])
        worker = worker_pb2.Worker(devices=[device])
        session = bots_pb2.BotSession(bot_id=f"hitz-{socket.gethostname()}-{uuid.uuid4()}",
                                      status=bots_pb2.BotStatus.OK, worker=worker)
        request = bots_pb2.CreateBotSessionRequest(parent=self.remote.instance,
                                                   bot_session=session)
        with _rpc(self.remote.url, "CreateBotSession"):
            created: bots_pb2.BotSession = self._bots.CreateBotSession(
                request, timeout=POLL_S, metadata=self.remote.metadata)
        return created

    def _update(self, session: bots_pb2.BotSession) -> bots_pb2.BotSession:
        """Report finished leases; receive the session as the server sees it.
        The server holds the call until it has work (``POLL_S`` caps that); a
        lease finishing meanwhile cancels it, and the caller asks again."""
        import grpc

        from hitz.protos.google.devtools.remoteworkers.v1test2 import bots_pb2

        mine = bots_pb2.BotSession()
        mine.CopyFrom(session)
        del mine.leases[:]
        finished = []
        for lease_id, running in self._running.items():
            if running.done is not None:
                mine.leases.append(running.done)
                finished.append(lease_id)
            else:
                mine.leases.append(running.lease)
        request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=mine)
        self._wake.clear()
        call = self._bots.UpdateBotSession.future(request, timeout=POLL_S,
                                                  metadata=self.remote.metadata)
        call.add_done_callback(lambda _call: self._wake.set())
        while not call.done():
            self._wake.wait()
            self._wake.clear()
            if not call.done() and not _finished_all(self._running, finished):
                call.cancel()  # a lease finished after this call was sent: report it now
                break
        try:
            updated: bots_pb2.BotSession = call.result()
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() in (
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                return session  # nothing new; finished leases are reported next time
            raise _translate(self.remote.url, "UpdateBotSession", exc) from exc
        except grpc.FutureCancelledError:
            return session
        for lease_id in finished:
            self._running.pop(lease_id).thread.join()
            self.completed += 1
        return updated

    def _take(self, session: bots_pb2.BotSession) -> None:
        """Start the ACTIVE leases not yet running; cancel those the server dropped."""
        from hitz.protos.google.devtools.remoteworkers.v1test2 import bots_pb2

        offered = {lease.id for lease in session.leases}
        for lease_id, running in self._running.items():
            if lease_id not in offered and running.done is None and running.cancel is not None:
                running.cancel.set()
        for lease in session.leases:
            if lease.state != bots_pb2.LeaseState.ACTIVE or lease.id in self._running:
                continue
            if len(self._running) >= self.jobs:
                break
            running = _Running(lease, threading.Thread(), cancel=threading.Event())
            running.thread = threading.Thread(target=self._run_lease, args=(running,),
                                              name=f"hitz-lease-{lease.id}", daemon=True)
            self._running[lease.id] = running
            running.thread.start()

    # --- one lease ----------------------------------------------------------------------

    def _run_lease(self, running: _Running) -> None:
        from google.rpc import code_pb2

        from hitz.protos.google.devtools.remoteworkers.v1test2 import bots_pb2

        done = bots_pb2.Lease()
        done.CopyFrom(running.lease)
        done.state = bots_pb2.LeaseState.COMPLETED
        folder = Path(tempfile.mkdtemp(prefix="lease-", dir=self.work_dir))
        try:
            assert running.cancel is not None
            result, status, message = self._execute(running.lease, folder, running.cancel)
            done.status.code = status
            done.status.message = message
            if result is not None:
                done.result.Pack(result)
        except HitzError as exc:
            done.status.code = code_pb2.INTERNAL
            done.status.message = exc.message
        except OSError as exc:
            done.status.code = code_pb2.INTERNAL
            done.status.message = f"hitz worker: {exc.strerror or exc}: {exc.filename or ''}"
        except Exception as exc:
            # A blob that is not the message it should be (DecodeError), or a
            # bug: the lease still ends, else it would hold its job slot forever.
            done.status.code = code_pb2.INTERNAL
            done.status.message = f"hitz worker: {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self._log(f"worker: lease {running.lease.id} done: status {done.status.code}")
        running.done = done
        self._wake.set()

    def _execute(self, lease: bots_pb2.Lease, folder: Path, cancel: threading.Event
                 ) -> tuple[re_pb2.ActionResult | None, int, str]:
        from google.rpc import code_pb2

        from hitz.executor.store import Digest
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

        action = re_pb2.Action()
        if not lease.payload.Unpack(action):
            wire = re_pb2.Digest()
            if not lease.payload.Unpack(wire):
                return None, code_pb2.INVALID_ARGUMENT, "the lease holds no Action"
            action = re_pb2.Action.FromString(
                self.remote.read_blob(Digest(wire.hash, wire.size_bytes)))
        command = re_pb2.Command.FromString(self.remote.read_blob(
            Digest(action.command_digest.hash, action.command_digest.size_bytes)))
        root = folder / "root"
        mounts = self._stage_inputs(action.input_root_digest, root)
        staging = folder / "staging"
        staging.mkdir()
        outputs = _declared_outputs(command)
        timeout = action.timeout.ToNanoseconds() / 1e9 or DEFAULT_TIMEOUT_S
        workdir = "/work" + ("/" + command.working_directory if command.working_directory
                             else "")
        spec = SandboxSpec(
            task=f"lease-{lease.id}".replace("/", "_"),
            argv=tuple(command.arguments),
            env={var.name: var.value for var in command.environment_variables},
            inputs=tuple(mounts), outputs=tuple(outputs), staging_dir=str(staging),
            stdout_path=str(folder / "stdout"), stderr_path=str(folder / "stderr"),
            cwd=workdir, timeout=timeout)
        sandbox = self._backend()
        try:
            outcome = _run(sandbox, spec, cancel)
        finally:
            sandbox.close()
        if outcome.status is Status.CANCELLED:
            return None, code_pb2.CANCELLED, "cancelled"
        result = self._upload_result(spec, outcome)
        if outcome.status is Status.TIMED_OUT:
            return result, code_pb2.DEADLINE_EXCEEDED, outcome.message or "timed out"
        if outcome.exit_code is None:  # the sandbox could not be built
            return result, code_pb2.INTERNAL, outcome.message or "the sandbox failed"
        return result, code_pb2.OK, ""

    def _stage_inputs(self, wire: re_pb2.Digest, root: Path) -> list[InputMount]:
        """Write the input root into ``root``; the mounts that show it at /work."""
        from hitz.executor.store import Digest
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

        files: dict[Digest, list[tuple[Path, bool]]] = {}
        pending = [(root, Digest(wire.hash, wire.size_bytes))]
        while pending:
            folder, digest = pending.pop()
            folder.mkdir(mode=0o755)
            directory = re_pb2.Directory.FromString(self.remote.read_blob(digest))
            # REAPI: names are unique in a Directory. A symlink named like a
            # file or folder beside it would carry that file's write (or the
            # folder's contents) out of ``root``, onto this host.
            names = [*(f.name for f in directory.files),
                     *(d.name for d in directory.directories),
                     *(s.name for s in directory.symlinks)]
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise WorkerError(f'the server sent an input folder naming "{twice[0]}" '
                                  "twice", reason=WorkerErrorReason.REFUSED)
            for node in directory.files:
                _check_name(node.name)
                files.setdefault(Digest(node.digest.hash, node.digest.size_bytes), []).append(
                    (folder / node.name, node.is_executable))
            for link in directory.symlinks:
                _check_name(link.name)
                (folder / link.name).symlink_to(link.target)
            for sub in directory.directories:
                _check_name(sub.name)
                pending.append((folder / sub.name, Digest(sub.digest.hash, sub.digest.size_bytes)))
        small = [d for d in files if self.remote.fits_batch(d)]
        # Small blobs a bounded group at a time (never all in memory at once).
        for contents in self.remote.read_blob_groups(small):
            for digest, data in contents.items():
                for path, executable in files[digest]:
                    # A new file, never one that is there (nor a symlink).
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o644)
                    with open(fd, "wb") as f:
                        f.write(data)
                    path.chmod(0o755 if executable else 0o644)
        for digest, places in files.items():
            if self.remote.fits_batch(digest):
                continue
            for path, executable in places:
                self.remote.download_file(digest, path)
                path.chmod(0o755 if executable else 0o644)
        root.chmod(0o755)
        return [InputMount(str(root / name), name, (root / name).is_dir())
                for name in sorted(os.listdir(root))]

    def _upload_result(self, spec: SandboxSpec, outcome: SandboxResult) -> re_pb2.ActionResult:
        """Upload the streams and the declared outputs that exist; their ActionResult."""
        from hitz.executor.store import Digest
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

        blobs: dict[Digest, bytes | Path] = {}
        # A task killed by signal n (exit_code -n) exits 128 + n, as a shell reports it.
        code = outcome.exit_code
        result = re_pb2.ActionResult(exit_code=1 if code is None else code if code >= 0
                                     else 128 - code)
        for stream, field in ((spec.stdout_path, result.stdout_digest),
                              (spec.stderr_path, result.stderr_digest)):
            if os.path.exists(stream):
                digest = _file_digest(Path(stream))
                blobs[digest] = Path(stream)
                field.CopyFrom(_wire(digest))
        staging = Path(spec.staging_dir)
        for declared in spec.outputs:
            rel = declared.rstrip("/")
            path = staging / rel
            if declared.endswith("/"):
                if path.is_dir() and not path.is_symlink():
                    tree = _tree(path, blobs)
                    data = tree.SerializeToString(deterministic=True)
                    digest = Digest.of(data)
                    blobs[digest] = data
                    result.output_directories.add(path=rel, tree_digest=_wire(digest))
            elif path.is_symlink():
                result.output_symlinks.add(path=rel, target=os.readlink(path))
            elif path.is_file():
                digest = _file_digest(path)
                blobs[digest] = path
                result.output_files.add(path=rel, digest=_wire(digest),
                                        is_executable=os.access(path, os.X_OK))
        self.remote.upload_missing(blobs)
        return result


# --- helpers ----------------------------------------------------------------------------


def _finished_all(running: dict[str, _Running], reported: list[str]) -> bool:
    """Whether every finished lease is among those being ``reported`` already."""
    return all(r.done is None or lease_id in reported for lease_id, r in running.items())


def _namespace_backend() -> SandboxBackend:
    from hitz.sandbox.namespace import NamespaceBackend

    return NamespaceBackend()


def _run(sandbox: SandboxBackend, spec: SandboxSpec, cancel: threading.Event) -> SandboxResult:
    """Run ``spec`` to its end in ``sandbox``, cancelling it when ``cancel`` is set."""
    sandbox.start(spec)
    cancelled = False
    while True:
        for result in sandbox.wait(0.2):
            return result
        if cancel.is_set() and not cancelled:
            sandbox.cancel_all()
            cancelled = True


def _declared_outputs(command: re_pb2.Command) -> list[str]:
    """The Command's outputs as a SandboxSpec declares them ("dir/" for a folder).
    REAPI 2.1's output_paths do not say which is which: those are taken as files
    unless also listed in output_directories."""
    dirs = set(command.output_directories)
    found = [f"{d}/" for d in command.output_directories]
    found += [f for f in command.output_files if f not in dirs]
    found += [p for p in command.output_paths
              if p not in dirs and p not in command.output_files]
    for out in found:
        for part in out.rstrip("/").split("/"):
            _check_name(part)
    return found


def _check_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name:
        raise WorkerError(f'the server sent an unsafe path component "{name}"',
                          reason=WorkerErrorReason.REFUSED)


def _file_digest(path: Path) -> Digest:
    import hashlib

    from hitz.executor.store import Digest

    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return Digest(sha.hexdigest(), size)


def _wire(digest: Digest) -> re_pb2.Digest:
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def _tree(top: Path, blobs: dict[Digest, bytes | Path]) -> re_pb2.Tree:
    """The REAPI Tree of folder ``top``; its files go into ``blobs``."""
    from hitz.executor.actions import digest_of
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    children: list[re_pb2.Directory] = []

    def directory(folder: Path) -> re_pb2.Directory:
        node = re_pb2.Directory()
        # REAPI Directory: files, directories and symlinks sorted by name.
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_symlink():
                node.symlinks.add(name=entry.name, target=os.readlink(path))
            elif entry.is_dir():
                child = directory(path)
                children.append(child)
                node.directories.add(name=entry.name, digest=_wire(digest_of(child)[0]))
            elif entry.is_file():
                digest = _file_digest(path)
                blobs[digest] = path
                node.files.add(name=entry.name, digest=_wire(digest),
                               is_executable=os.access(path, os.X_OK))
        return node

    root = directory(top)
    return re_pb2.Tree(root=root, children=children)


def _rpc(url: str, what: str) -> _RpcErrors:
    return _RpcErrors(url, what)


class _RpcErrors:
    """``with _rpc(url, what):`` turns a ``grpc.RpcError`` into a WorkerError."""

    def __init__(self, url: str, what: str) -> None:
        self.url, self.what = url, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        import grpc

        if isinstance(exc, grpc.RpcError):
            raise _translate(self.url, self.what, exc) from exc


def _translate(url: str, what: str, exc: grpc.RpcError) -> WorkerError:
    import grpc

    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    text = (exc.details() if isinstance(exc, grpc.Call) else str(exc)) or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerError(f"server {url} is unreachable: {text}",
                           detail=f"{what}: {code.name}", reason=WorkerErrorReason.UNREACHABLE,
                           hint="check that the server runs with the Bots service "
                           "(BuildGrid with an `!execution` service) at that address",
                           retryable=True)
    return WorkerError(f"server {url} refused {what}: {code.name}: {text}",
                       reason=WorkerErrorReason.REFUSED)


def run_worker(url: str, instance: str, *, jobs: int = 1, work_dir: str | None = None,
               log: Callable[[str], None] | None = None) -> int:
    """``hitz worker``: serve leases until interrupted. Exit status 0 on Ctrl-C/SIGTERM."""
    from hitz.executor.remote import RemoteCache

    folder = Path(work_dir or tempfile.mkdtemp(prefix="hitz-worker-"))
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # the sandbox's unprivileged user must reach the input roots
    from hitz.executor.remote_errors import RemoteUnavailable

    try:
        remote = RemoteCache.connect(url, instance=instance)
    except RemoteUnavailable as exc:
        raise WorkerError(f"server {url} is unreachable", detail=exc.detail,
                          hint="check that the server runs at that address (BuildGrid with "
                          "an `!execution` service serves the Bots API)",
                          reason=WorkerErrorReason.UNREACHABLE, retryable=True) from exc
    worker = Worker(remote, work_dir=folder, jobs=jobs, log=log)
    try:
        worker.serve()
    except KeyboardInterrupt:
        return 0
    finally:
        remote.close()
        if work_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0
