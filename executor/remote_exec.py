"""Remote execution: ``RemoteBackend`` runs tasks on a REAPI v2 execution server.

A task with ``backend = "remote"`` runs on the server named by ``[remote]
executor`` (or ``--remote-executor`` / ``$HITZ_REMOTE_EXECUTOR``):
buildbox-casd, BuildGrid with a worker (``hitz worker``), or any other REAPI
v2 engine. docs/remote-execution.md is the user's guide. What it promises:

- **The same Action as the cache key.** The runner computes the task's
  ``ActionKey`` (``hitz.executor.actions``) and this backend sends exactly
  that Action, so the remote's ActionCache, hitz's local cache and a remote
  cache all agree on what a result belongs to. Its ``hitz.rootfs`` platform
  property is ``remote:<instance>``: a result computed on the remote's system
  never passes for one computed on this host.
- **Upload only what is missing.** One ``FindMissingBlobs`` over the input
  root's files, its Directories, the Command and the Action, then the missing
  ones through ``hitz.executor.remote.RemoteCache`` (batches, ByteStream for
  big files). This starts at ``prestart``, while the scheduler's slots are
  busy; ``Execute`` waits for ``release``. Each input file is hashed again
  as it is read for the upload (``_CheckedFile``): one edited since it was
  keyed fails the task, never goes up under its old digest.
- **Follow the operation to its end.** ``Execute`` with
  ``skip_cache_lookup = false`` (the remote may answer from its own cache);
  a stream that drops is resumed with ``WaitExecution`` on the operation's
  name, and re-sent as ``Execute`` if the server forgot it. hitz waits the
  task's timeout plus ``QUEUE_ALLOWANCE_S`` for a busy remote.
- **Outputs are verified and confined.** stdout and stderr go to the spec's
  log files; declared outputs are downloaded (each blob checked against its
  digest) into the task's staging folder, never outside it, then checked by
  ``hitz.sandbox.outputs.collect`` like every backend's.
- **Failures are results, in the user's words.** A remote that is
  unreachable, refuses the action or loses it gives a ``SETUP_FAILED`` result
  whose message names the remote and what it said; a non-zero exit is
  ``FAILED`` with the task's stderr kept; the remote's DEADLINE_EXCEEDED is
  ``TIMED_OUT``. ``grpc.RpcError`` is translated here, for the Execution and
  Operations calls, and in ``hitz.executor.remote_errors`` for the CAS.
- **Cancellation.** ``cancel_all`` cancels the operation on the server
  (``CancelOperation``) and drops the stream; a server without Operations
  simply loses its client.

hitz's own sandbox policy (seccomp, Landlock, limits) is not applied on the
remote: every result says so in ``weakened``, and the remote's sandbox is
what isolates the task.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hitz.executor.errors import HitzError, ManifestError, ManifestErrorReason, Reason
from hitz.sandbox.outputs import OutputRejected, collect
from hitz.sandbox.spec import CollectedOutput, SandboxResult, SandboxSpec, Status

if TYPE_CHECKING:
    import grpc
    from google.longrunning.operations_proto_pb2 import Operation

    from hitz.executor.actions import ActionKey
    from hitz.executor.model import Manifest, TaskDef
    from hitz.executor.remote import RemoteCache
    from hitz.executor.remote_bytestream import Source
    from hitz.executor.store import Digest
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

__all__ = [
    "ENV_VAR",
    "InputChanged",
    "RemoteBackend",
    "RemoteExecError",
    "RemoteExecErrorReason",
    "RemoteSettings",
    "check_configured",
    "input_files",
    "settings_for",
]

log = logging.getLogger(__name__)

ENV_VAR = "HITZ_REMOTE_EXECUTOR"
# How long a task may wait in the remote's queue on top of its own timeout
# before hitz gives up on it (and cancels the operation).
QUEUE_ALLOWANCE_S = 600.0
STREAM_RETRIES = 4  # times a dropped Execute/WaitExecution stream is resumed
CANCEL_S = 5.0  # the deadline of the CancelOperation calls of an interrupted run, together
WORKERS = 64  # threads following operations: each waits on the network, not a CPU
WEAKENED = "sandbox: the remote executor's own, not hitz's policy"


class _QuietInputChanged(logging.Filter):
    """gRPC logs, with a traceback, any exception of a request iterator before
    it fails the call ("Exception iterating requests!"); an ``InputChanged``
    is reported as the task's result instead, so that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], InputChanged))


class RemoteExecErrorReason(Reason):
    NOT_CONFIGURED = "not-configured"  # a remote task, but no executor URL anywhere
    NO_EXECUTION = "no-execution"  # the server does not offer Execute
    UNAUTHENTICATED = "unauthenticated"  # UNAUTHENTICATED or PERMISSION_DENIED on connecting
    UNREACHABLE = "unreachable"  # UNAVAILABLE after the retries
    REFUSED = "refused"  # the server refused the action (INVALID_ARGUMENT, ...)
    LOST = "lost"  # the operation vanished or the stream ended without a result
    BAD_RESULT = "bad-result"  # an ActionResult hitz cannot accept (unsafe output path)
    INPUT_CHANGED = "input-changed"  # an input file's bytes differ from its digest
    SERVER_ERROR = "server-error"  # INTERNAL, UNKNOWN, ...


class RemoteExecError(HitzError):
    """A remote executor could not run a task; the message names it."""


# --- configuration ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """Where remote tasks go: ``url`` (grpc:// or grpcs://) and the REAPI ``instance``;
    how to be let in: ``token_env`` or ``token_file`` (absolute), ``ca_file`` (absolute)."""

    url: str
    instance: str = ""
    timeout_s: float = 60.0  # deadline of each unary call (not of Execute: see QUEUE_ALLOWANCE_S)
    token_env: str | None = None  # the variable holding the bearer token
    token_file: str | None = None  # the file holding it
    ca_file: str | None = None  # PEM roots for grpcs://; None: the system's


def settings_for(manifest: Manifest, flag: str | None = None,
                 environ: Mapping[str, str] | None = None) -> RemoteSettings | None:
    """The executor for ``manifest``'s remote tasks: ``--remote-executor``, else
    ``$HITZ_REMOTE_EXECUTOR``, else ``[remote] executor``; None when none is set.
    The token and CA file come from `[remote]` whichever way the address was given."""
    environ = os.environ if environ is None else environ
    url = flag or environ.get(ENV_VAR) or manifest.remote_executor
    if not url:
        return None

    def absolute(path: str | None) -> str | None:
        return None if path is None else str(manifest.root / path)

    return RemoteSettings(url, manifest.remote_instance, token_env=manifest.remote_token_env,
                          token_file=absolute(manifest.remote_token_file),
                          ca_file=absolute(manifest.remote_ca_file))


def check_configured(manifest: Manifest, tasks: list[TaskDef],
                     settings: RemoteSettings | None) -> None:
    """Refuse, before anything runs, a remote task with nowhere to run it."""
    if settings is not None:
        return
    for task in tasks:
        if task.backend == "remote":
            raise ManifestError(
                f'task "{task.name}": backend = "remote", but no remote executor is set',
                path=manifest.display_path,
                line=manifest.line_of("tasks", task.name, "backend") or task.line,
                hint='add `[remote]` with `executor = "grpc://HOST:PORT"` to the manifest, '
                f"or pass `--remote-executor grpc://HOST:PORT` (or set ${ENV_VAR})",
                reason=ManifestErrorReason.MISSING_KEY,
            )


# --- the input root -----------------------------------------------------------------


def input_files(key: ActionKey, spec: SandboxSpec) -> dict[Digest, Path]:
    """The host file holding each file blob of ``key``'s input root."""
    return {digest: path for digest, (_rel, path) in _input_files(key, spec).items()}


def _input_files(key: ActionKey, spec: SandboxSpec) -> dict[Digest, tuple[str, Path]]:
    """The input-root path and host file of each file blob of ``key``'s input root.

    The root's Directories are in ``key.blobs``; each file's project path is
    found among ``spec.inputs`` (a file mount, or a file under a folder mount).
    Raises ``RemoteExecError`` for a file no mount holds (a bug, not bad input).
    """
    from hitz.executor.store import Digest
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    action = re_pb2.Action.FromString(key.blobs[key.digest])
    mounts = sorted(spec.inputs, key=lambda m: len(m.target), reverse=True)
    found: dict[Digest, tuple[str, Path]] = {}
    pending = [("", Digest(action.input_root_digest.hash, action.input_root_digest.size_bytes))]
    while pending:
        folder, digest = pending.pop()
        directory = re_pb2.Directory.FromString(key.blobs[digest])
        for sub in directory.directories:
            pending.append((posixpath.join(folder, sub.name),
                            Digest(sub.digest.hash, sub.digest.size_bytes)))
        for node in directory.files:
            rel = posixpath.join(folder, node.name)
            blob = Digest(node.digest.hash, node.digest.size_bytes)
            if blob in found or not blob.size:
                continue
            for mount in mounts:
                if rel == mount.target or rel.startswith(mount.target + "/"):
                    found[blob] = (rel, Path(mount.source + rel[len(mount.target):]))
                    break
            else:
                raise RemoteExecError(f'input "{rel}" of task ":{spec.task}" has no host file',
                                      reason=RemoteExecErrorReason.BAD_RESULT)
    return found


class InputChanged(RemoteExecError):
    """An input file no longer holds the bytes its digest in the Action names."""


class _CheckedFile:
    """An input file as an upload ``Source`` that hashes what it reads and
    refuses to finish unless that matches the digest the Action was keyed with.

    The file was hashed when the action key was made; a file edited since
    would otherwise be sent, under its old digest, with other bytes.
    ``chunks`` raises ``InputChanged`` (and sets ``changed``) instead of
    ending, so a changed file never completes an upload: a batch is built
    only once ``chunks`` ends, and a ByteStream Write sends ``finish_write``
    only then. The piece that reaches the digest's size is also held back
    until the end of the file is seen, for a server that commits once it has
    that many bytes. The pieces before it go out as they are read: the file
    is read once per try, and a look at its start (``worth_compressing``)
    reads one piece.
    """

    def __init__(self, task: str, rel: str, path: Path, digest: Digest) -> None:
        self.task = task
        self.rel = rel  # the path in the input root, as the user knows it
        self.path = path
        self.digest = digest
        self.size = digest.size
        self.changed: InputChanged | None = None  # set when a read found other bytes

    def chunks(self) -> Iterator[bytes]:
        from hitz.executor.remote_bytestream import CHUNK

        sha = hashlib.sha256()
        size = 0
        held = b""  # the piece that reaches the digest's size, sent once all is checked
        try:
            with open(self.path, "rb", buffering=0) as f:
                while piece := f.read(CHUNK):
                    sha.update(piece)
                    size += len(piece)
                    if size < self.digest.size:
                        yield piece
                    elif size > self.digest.size:
                        break  # it grew: changed, whatever follows
                    else:
                        held = piece  # one more read must find the end
        except OSError as exc:
            raise self._changed(f"can't be read: {exc.strerror or exc}") from None
        if size > self.digest.size:
            raise self._changed(f"now longer than {self.digest.size} bytes, "
                                "the size it was hashed at")
        if size != self.digest.size or sha.hexdigest() != self.digest.hash:
            raise self._changed(f"now {size} bytes, sha256 {sha.hexdigest()}; hashed as "
                                f"{self.digest.size} bytes, sha256 {self.digest.hash}")
        yield held

    def _changed(self, detail: str) -> InputChanged:
        self.changed = InputChanged(
            f"input `{self.rel}` of task `:{self.task}` changed during the run",
            detail=f"{self.path}: {detail}",
            hint="run again once nothing edits the task's inputs; hitz sends only the "
            "bytes it hashed",
            reason=RemoteExecErrorReason.INPUT_CHANGED)
        return self.changed


# --- the backend --------------------------------------------------------------------


class _Cancelled(Exception):
    """The job was cancelled while it waited or ran."""


class _TimedOut(Exception):
    """The operation did not end within the task's timeout plus the queue allowance."""


@dataclass(eq=False)
class _Job:
    spec: SandboxSpec
    key: ActionKey | None
    go: threading.Event = field(default_factory=threading.Event)  # released or cancelled
    cancelled: bool = False
    started: float = 0.0  # monotonic, at release
    call: grpc.Call | None = None  # the Execute/WaitExecution stream being read
    operation: str = ""  # the server's operation name, once known


logging.getLogger("grpc._channel").addFilter(_QuietInputChanged())


class RemoteBackend:
    """A ``SandboxBackend`` (``hitz.sandbox.spec``) for specs whose ``backend``
    is "remote"; see the module docstring.

    ``key_of(task)`` gives the task's ``ActionKey`` (the runner's ``keys.get``):
    a spec without one is refused. ``connect`` opens the CAS client
    (``RemoteCache.connect``; tests pass their own); it is called on the first
    task, from a worker thread, so a run whose tasks are all cached never
    connects.
    """

    def __init__(self, settings: RemoteSettings,
                 key_of: Callable[[str], ActionKey | None],
                 *, connect: Callable[[RemoteSettings], RemoteCache] | None = None,
                 workers: int = WORKERS) -> None:
        self.settings = settings
        self._key_of = key_of
        self._connect_fn = connect or _connect
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="hitz-remote-exec")
        self._results: queue.SimpleQueue[SandboxResult] = queue.SimpleQueue()
        self._jobs: dict[str, _Job] = {}  # started or held, result not yet returned by wait
        self._lock = threading.Lock()  # guards _remote and each job's call/operation
        self._connecting = threading.Lock()  # one connection attempt at a time; guards _failure
        self._remote: RemoteCache | None = None
        self._failure: HitzError | None = None  # why connecting failed; every task gets it
        self._closed = False
        # CancelOperation calls sent, their answers not awaited (see close).
        self._cancels: list[grpc.Future[Any]] = []

    # --- the SandboxBackend protocol --------------------------------------------------

    def start(self, spec: SandboxSpec) -> None:
        self.prestart(spec)
        self.release(spec.task)

    def prestart(self, spec: SandboxSpec) -> None:
        """Upload the task's missing inputs now; ``Execute`` waits for ``release``."""
        assert spec.task not in self._jobs, f"{spec.task} started twice"
        job = _Job(spec, self._key_of(spec.task))
        self._jobs[spec.task] = job
        self._pool.submit(self._work, job)

    def release(self, task: str) -> None:
        job = self._jobs[task]
        job.started = time.monotonic()
        job.go.set()

    def cancel(self, task: str) -> None:
        job = self._jobs[task]
        self._cancel(job)

    def wait(self, timeout: float | None = None) -> list[SandboxResult]:
        """Results of jobs that ended: blocks until one has, or ``timeout``."""
        if not self._jobs:
            return []
        try:
            first = self._results.get(timeout=timeout)
        except queue.Empty:
            return []
        ended = [first]
        with contextlib.suppress(queue.Empty):
            while True:
                ended.append(self._results.get_nowait())
        for result in ended:
            self._jobs.pop(result.task, None)
        return ended

    def running(self) -> int:
        return len(self._jobs)

    def cancel_all(self) -> None:
        for job in list(self._jobs.values()):
            self._cancel(job)

    def close(self) -> None:
        """Cancel what still runs, wait for the worker threads, close the channel."""
        if self._closed:
            return
        self._closed = True
        self.cancel_all()
        self._pool.shutdown(wait=True)
        with self._lock:
            remote, self._remote = self._remote, None
            cancels, self._cancels = self._cancels, []
        # Give the CancelOperation calls a moment, all together, before the
        # channel closes under them.
        until = time.monotonic() + CANCEL_S
        for future in cancels:
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, until - time.monotonic()))
        if remote is not None:
            remote.close()

    # --- one task, on a worker thread ------------------------------------------------

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        job.go.set()
        with self._lock:
            call, name, remote = job.call, job.operation, self._remote
        if name and remote is not None:
            future = _cancel_operation(remote, name)
            if future is not None:
                with self._lock:
                    self._cancels.append(future)
        if call is not None:
            call.cancel()

    def _work(self, job: _Job) -> None:
        begun = time.monotonic()
        try:
            result = self._run(job)
        except _Cancelled:
            result = self._result(job, Status.CANCELLED, None, "cancelled")
        except _TimedOut:
            result = self._result(
                job, Status.TIMED_OUT, None,
                f"timed out after {job.spec.timeout:g}s (plus {QUEUE_ALLOWANCE_S:g}s in the "
                f"queue of the remote executor {self.settings.url})")
        except HitzError as exc:
            status = Status.CANCELLED if job.cancelled else Status.SETUP_FAILED
            result = self._result(job, status, None, exc.message)
        except OSError as exc:  # writing logs or outputs into the staging folder
            result = self._result(
                job, Status.SETUP_FAILED, None,
                f"cannot write the remote result of `:{job.spec.task}`: "
                f"{exc.strerror or exc} ({exc.filename or ''})")
        except Exception as exc:
            # A bug, or an answer of the remote's that nothing above expected:
            # the task still gets a result (a worker thread that ends without
            # one leaves the run waiting forever), and the traceback is logged.
            log.exception("remote execution of :%s", job.spec.task)
            result = self._result(
                job, Status.SETUP_FAILED, None,
                f"remote execution of `:{job.spec.task}` on {self.settings.url} failed: "
                f"{type(exc).__name__}: {exc}")
        if not job.started:
            job.started = begun
        self._results.put(result)

    def _result(self, job: _Job, status: Status, exit_code: int | None,
                message: str | None, outputs: tuple[CollectedOutput, ...] = (),
                cached: bool = False) -> SandboxResult:
        enforced = {"executor": f"remote {self.settings.url}",
                    "remote.instance": self.settings.instance}
        if job.operation:
            enforced["remote.operation"] = job.operation
        if cached:
            enforced["remote.cached"] = "true"
        started = job.started or time.monotonic()
        return SandboxResult(job.spec.task, status, exit_code, time.monotonic() - started,
                             outputs=outputs, message=message, enforced=enforced,
                             weakened=(WEAKENED,))

    def _run(self, job: _Job) -> SandboxResult:
        spec = job.spec
        if job.key is None:
            raise RemoteExecError(f"task `:{spec.task}` has no action to send to the remote "
                                  "executor", reason=RemoteExecErrorReason.BAD_RESULT)
        remote = self._remote_client()
        files = {digest: _CheckedFile(spec.task, rel, path, digest)
                 for digest, (rel, path) in _input_files(job.key, spec).items()}
        blobs: dict[Digest, bytes | Source] = {**job.key.blobs, **files}
        if job.cancelled:
            raise _Cancelled
        try:
            remote.upload_missing(blobs)
        except HitzError:
            # A change found in a ByteStream upload surfaces as the failed
            # Write (gRPC ends a call whose request iterator raised): say why.
            for checked in files.values():
                if checked.changed is not None:
                    raise checked.changed from None
            raise
        job.go.wait()
        if job.cancelled:
            raise _Cancelled
        response = self._follow(job, remote)
        return self._settle(job, remote, response)

    def _remote_client(self) -> RemoteCache:
        """The CAS client, connected on first use; a failure is kept and raised again
        for every later task, so an unreachable remote costs its retries once."""
        # Its own lock: connecting may take the retries' time, and cancel (which
        # takes self._lock) must not wait for it.
        with self._connecting:
            if self._remote is not None:
                return self._remote
            if self._failure is not None:
                raise self._failure
            try:
                remote = self._connect_fn(self.settings)
                _check_execution(remote)
            except HitzError as exc:
                self._failure = exc
                raise
            with self._lock:
                self._remote = remote
            return remote

    def _follow(self, job: _Job, remote: RemoteCache) -> re_pb2.ExecuteResponse:
        """Execute the job's action and read its operation until it is done."""
        import grpc

        from hitz.executor.remote_errors import RETRYABLE_CODES
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
        from hitz.protos.build.bazel.remote.execution.v2 import (
            remote_execution_pb2_grpc as re_grpc,
        )

        assert job.key is not None
        stub = re_grpc.ExecutionStub(remote.channel)
        metadata = remote.metadata
        execute = re_pb2.ExecuteRequest(
            instance_name=self.settings.instance,
            action_digest=re_pb2.Digest(hash=job.key.digest.hash,
                                        size_bytes=job.key.digest.size),
            skip_cache_lookup=False)
        deadline = job.started + job.spec.timeout + QUEUE_ALLOWANCE_S
        drops = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut
            with self._lock:
                if job.cancelled:
                    raise _Cancelled
                if job.operation:
                    call = stub.WaitExecution(re_pb2.WaitExecutionRequest(name=job.operation),
                                              timeout=left, metadata=metadata)
                else:
                    call = stub.Execute(execute, timeout=left, metadata=metadata)
                job.call = call
            try:
                for operation in call:
                    if operation.name and operation.name != job.operation:
                        with self._lock:
                            job.operation = operation.name
                    if operation.done:
                        return _response_of(self.settings.url, operation)
                problem: grpc.RpcError | None = None  # ended without a result: resume it
            except grpc.RpcError as exc:
                problem = exc
            finally:
                with self._lock:
                    job.call = None
            if job.cancelled:
                raise _Cancelled
            code = problem.code() if isinstance(problem, grpc.Call) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() >= deadline:
                raise _TimedOut
            if code == grpc.StatusCode.NOT_FOUND and job.operation:
                job.operation = ""  # the server forgot it (restarted?): send it again
            elif problem is not None and code not in RETRYABLE_CODES:
                raise _translate(self.settings.url, "Execute", problem)
            drops += 1
            if drops > STREAM_RETRIES:
                if problem is not None:
                    raise _translate(self.settings.url, "Execute", problem)
                raise RemoteExecError(
                    f"remote executor {self.settings.url} kept ending the operation of "
                    f"`:{job.spec.task}` without a result", reason=RemoteExecErrorReason.LOST)
            remote.policy.sleep(remote.policy.backoff(drops - 1))

    def _settle(self, job: _Job, remote: RemoteCache,
                response: re_pb2.ExecuteResponse) -> SandboxResult:
        """The SandboxResult of a finished operation; logs and outputs written."""
        spec = job.spec
        if job.cancelled:  # the server's answer to our CancelOperation
            return self._result(job, Status.CANCELLED, None, "cancelled")
        result = response.result
        _write_stream(remote, result.stdout_raw, result.stdout_digest, spec.stdout_path)
        _write_stream(remote, result.stderr_raw, result.stderr_digest, spec.stderr_path)
        cached = response.cached_result
        if response.status.code != 0:
            words = _status_words(response.status.code)
            text = response.status.message or response.message or words
            if words == "DEADLINE_EXCEEDED":
                return self._result(job, Status.TIMED_OUT, None,
                                    f"timed out after {spec.timeout:g}s on the remote executor "
                                    f"{self.settings.url}: {text}")
            return self._result(job, Status.SETUP_FAILED, None,
                                f"remote executor {self.settings.url} could not run the task: "
                                f"{words}: {text}")
        if result.exit_code != 0:
            return self._result(job, Status.FAILED, result.exit_code,
                                f"exited with status {result.exit_code} on the remote "
                                f"executor {self.settings.url}", cached=cached)
        _materialize(remote, result, spec)
        try:
            outputs = collect(spec)
        except OutputRejected as exc:
            return self._result(job, Status.OUTPUT_MISSING, 0, str(exc), cached=cached)
        return self._result(job, Status.SUCCEEDED, 0, None, outputs, cached=cached)


# --- gRPC, at this module's border ----------------------------------------------------


def _connect(settings: RemoteSettings) -> RemoteCache:
    from hitz.executor.remote import RemoteCache
    from hitz.executor.remote_config import load_token
    from hitz.executor.remote_errors import RemoteError, RemoteErrorReason, RemoteUnavailable

    token = load_token(env=settings.token_env, file=settings.token_file,
                       table="remote", what="remote executor")
    try:
        return RemoteCache.connect(settings.url, instance=settings.instance, token=token,
                                   ca_file=settings.ca_file, timeout_s=settings.timeout_s)
    except RemoteUnavailable as exc:
        raise RemoteExecError(
            f"remote executor {settings.url} is unreachable", detail=exc.detail,
            hint="check that the server runs and the address in `[remote] executor` "
            "(or --remote-executor) is right",
            reason=RemoteExecErrorReason.UNREACHABLE, retryable=True) from exc
    except RemoteError as exc:
        if exc.reason is not RemoteErrorReason.UNAUTHENTICATED:
            raise
        # The CAS client's words are about `[cache]`; these credentials are `[remote]`'s.
        raise RemoteExecError(
            f"remote executor {settings.url} refused hitz's credentials", detail=exc.detail,
            hint="give it a token with `token_env` or `token_file` in `[remote]`; the token "
            "itself never goes in hitz.toml",
            reason=RemoteExecErrorReason.UNAUTHENTICATED) from exc


def _check_execution(remote: RemoteCache) -> None:
    """Refuse a server that does not offer Execute (a cache-only server)."""
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

    request = re_pb2.GetCapabilitiesRequest(instance_name=remote.instance)
    with _rpc_errors(remote.url, "GetCapabilities"):
        caps = re_grpc.CapabilitiesStub(remote.channel).GetCapabilities(
            request, timeout=remote.timeout_s, metadata=remote.metadata)
    if not caps.execution_capabilities.exec_enabled:
        raise RemoteExecError(
            f"{remote.url} does not offer remote execution (it is a cache only)",
            hint="point `[remote] executor` at an execution server, such as buildbox-casd or "
            "BuildGrid with a `hitz worker`; a cache goes in `[cache] remote`",
            reason=RemoteExecErrorReason.NO_EXECUTION)


def _cancel_operation(remote: RemoteCache, name: str) -> grpc.Future[Any] | None:
    """Ask the server to stop operation ``name``, without waiting for its answer:
    an interrupted run cancels all its operations at once, and a slow server
    must not hold it a deadline per task. A server without Operations, or one
    that already forgot the operation, is fine: the stream is dropped anyway.
    Returns the call (``close`` gives it a moment), None if it could not start."""
    from google.longrunning import operations_proto_pb2
    from google.protobuf import empty_pb2

    # googleapis-common-protos' OperationsStub is untyped: the one call, by its wire name.
    cancel = remote.channel.unary_unary(
        "/google.longrunning.Operations/CancelOperation",
        request_serializer=operations_proto_pb2.CancelOperationRequest.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString)
    try:
        future: grpc.Future[Any] = cancel.future(
            operations_proto_pb2.CancelOperationRequest(name=name),
            timeout=min(remote.timeout_s, CANCEL_S), metadata=remote.metadata)
    except ValueError:  # the channel is closed: nothing to tell the server any more
        return None
    return future


def _response_of(url: str, operation: Operation) -> re_pb2.ExecuteResponse:
    """The ExecuteResponse of a done ``operation``, or the error it carries."""
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    if operation.HasField("error"):
        error = operation.error
        words = _status_words(error.code)
        raise RemoteExecError(f"remote executor {url} could not run the task: {words}: "
                              f"{error.message or words}",
                              reason=RemoteExecErrorReason.SERVER_ERROR)
    response = re_pb2.ExecuteResponse()
    if not operation.response.Unpack(response):
        raise RemoteExecError(f"remote executor {url} answered with something other than an "
                              "ExecuteResponse", reason=RemoteExecErrorReason.BAD_RESULT)
    return response


def _status_words(code: int) -> str:
    import grpc

    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return f"status {code}"


@contextlib.contextmanager
def _rpc_errors(url: str, what: str) -> Iterator[None]:
    import grpc

    try:
        yield
    except grpc.RpcError as exc:
        raise _translate(url, what, exc) from exc


def _translate(url: str, what: str, exc: grpc.RpcError) -> RemoteExecError:
    """The RemoteExecError for the failed call ``what`` to the executor at ``url``."""
    import grpc

    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    text = (exc.details() if isinstance(exc, grpc.Call) else str(exc)) or code.name
    detail = f"{what}: {code.name}: {text}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return RemoteExecError(f"remote executor {url} is unreachable: {text}", detail=detail,
                               hint="check that the server runs and the address in "
                               "`[remote] executor` (or --remote-executor) is right",
                               reason=RemoteExecErrorReason.UNREACHABLE, retryable=True)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.UNIMPLEMENTED):
        return RemoteExecError(f"remote executor {url} refused {what}: {text}", detail=detail,
                               reason=RemoteExecErrorReason.REFUSED)
    return RemoteExecError(f"remote executor {url} failed {what}: {code.name}: {text}",
                           detail=detail, reason=RemoteExecErrorReason.SERVER_ERROR,
                           retryable=code in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                              grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              grpc.StatusCode.ABORTED))


# --- downloading a result ---------------------------------------------------------------


def _write_stream(remote: RemoteCache, raw: bytes, wire: re_pb2.Digest, path: str) -> None:
    """Write a stdout/stderr to ``path``; an empty stream leaves no file."""
    from hitz.executor.store import Digest

    if raw:
        Path(path).write_bytes(raw)
    elif wire.size_bytes:
        remote.download_file(Digest(wire.hash, wire.size_bytes), path)
    else:
        Path(path).unlink(missing_ok=True)


class _Plan:
    """What to write into the staging folder: files by digest, folders, symlinks."""

    def __init__(self, top: str) -> None:
        self.top = top
        self.files: dict[Digest, list[tuple[str, bool]]] = {}  # digest -> (path, executable)
        self.dirs: list[str] = []
        self.links: list[tuple[str, str]] = []  # (path, target)

    def path(self, rel: str) -> str:
        """``rel`` under the staging folder; refuses anything that could leave it."""
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise RemoteExecError(f'the remote executor sent an unsafe output path "{rel}"',
                                  reason=RemoteExecErrorReason.BAD_RESULT)
        return os.path.join(self.top, *parts)

    def file(self, rel: str, wire: re_pb2.Digest, executable: bool) -> None:
        from hitz.executor.store import Digest

        digest = Digest(wire.hash, wire.size_bytes)
        self.files.setdefault(digest, []).append((self.path(rel), executable))


def _materialize(remote: RemoteCache, result: re_pb2.ActionResult, spec: SandboxSpec) -> None:
    """Write ``result``'s outputs that ``spec`` declares into its staging folder,
    every blob verified; undeclared ones are left on the server."""
    declared_files = {o for o in spec.outputs if not o.endswith("/")}
    declared_dirs = {o.rstrip("/") for o in spec.outputs if o.endswith("/")}
    plan = _Plan(spec.staging_dir)
    for out in result.output_files:
        if out.path in declared_files:
            plan.file(out.path, out.digest, out.is_executable)
    links = [*result.output_symlinks, *result.output_file_symlinks,
             *result.output_directory_symlinks]
    for link in links:
        if link.path in declared_files or link.path in declared_dirs:
            plan.links.append((plan.path(link.path), link.target))
    trees = [(out.path, out.tree_digest) for out in result.output_directories
             if out.path in declared_dirs]
    _plan_trees(remote, plan, trees)
    _write_plan(remote, plan)


def _plan_trees(remote: RemoteCache, plan: _Plan,
                trees: list[tuple[str, re_pb2.Digest]]) -> None:
    from google.protobuf.message import DecodeError

    from hitz.executor.actions import digest_of
    from hitz.executor.store import Digest
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    wanted = {Digest(wire.hash, wire.size_bytes) for _, wire in trees}
    blobs = remote.read_blobs(wanted) if wanted else {}
    for top, wire in trees:
        try:
            tree = re_pb2.Tree.FromString(blobs[Digest(wire.hash, wire.size_bytes)])
        except DecodeError:
            raise RemoteExecError(
                f'remote executor {remote.url} sent a tree of output "{top}/" that is not a '
                "REAPI Tree",
                reason=RemoteExecErrorReason.BAD_RESULT) from None
        children = {digest_of(child)[0]: child for child in tree.children}
        pending = [(top, tree.root)]
        while pending:
            folder, directory = pending.pop()
            plan.dirs.append(plan.path(folder))
            for node in directory.files:
                plan.file(f"{folder}/{node.name}", node.digest, node.is_executable)
            for link in directory.symlinks:
                plan.links.append((plan.path(f"{folder}/{link.name}"), link.target))
            for sub in directory.directories:
                child = children.get(Digest(sub.digest.hash, sub.digest.size_bytes))
                if child is None:
                    raise RemoteExecError(
                        f'the remote executor\'s tree of output "{top}/" lacks the folder '
                        f'"{folder}/{sub.name}"', reason=RemoteExecErrorReason.BAD_RESULT)
                pending.append((f"{folder}/{sub.name}", child))


def _write_plan(remote: RemoteCache, plan: _Plan) -> None:
    for folder in plan.dirs:
        os.makedirs(folder, exist_ok=True)
    small = [d for d in plan.files if remote.fits_batch(d)]
    # Small blobs are read concurrently, a bounded group at a time, and each
    # written as soon as its group is in; the others are streamed.
    for contents in remote.read_blob_groups(small):
        for digest, data in contents.items():
            _write_copies(plan.files[digest], partial(_write_bytes, data=data))
    for digest, places in plan.files.items():
        if not remote.fits_batch(digest):
            _write_copies(places, partial(_download, remote, digest))
    for path, target in plan.links:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)


def _write_bytes(path: str, *, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _download(remote: RemoteCache, digest: Digest, path: str) -> None:
    remote.download_file(digest, path)


def _write_copies(places: list[tuple[str, bool]], write: Callable[[str], object]) -> None:
    """Write a blob at the first of ``places`` with ``write``, copy it to the others."""
    first, executable = places[0]
    os.makedirs(os.path.dirname(first), exist_ok=True)
    write(first)
    os.chmod(first, 0o755 if executable else 0o644)
    for path, executable in places[1:]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(first, "rb") as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(path, 0o755 if executable else 0o644)
