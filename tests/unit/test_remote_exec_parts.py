"""Unit tests of remote execution: settings, the input root, the operation
stream's failure paths (a small in-process Execution server that drops its
stream), output confinement, and the worker's REAPI trees and protos.

The real servers are in tests/integration/test_remote_exec.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.longrunning import operations_proto_pb2

from hitz.executor.actions import InputFile, build_key, digest_of
from hitz.executor.model import Manifest, TaskDef
from hitz.executor.remote_exec import (
    RemoteBackend,
    RemoteExecError,
    RemoteSettings,
    _Job,
    _Plan,
    input_files,
    settings_for,
)
from hitz.executor.remote_retry import RetryPolicy
from hitz.executor.store import Digest
from hitz.executor.worker import _declared_outputs, _tree
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from hitz.protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2
from hitz.sandbox.spec import InputMount, SandboxSpec


def _manifest(executor: str | None = None, instance: str = "") -> Manifest:
    return Manifest(Path("/p/hitz.toml"), "hitz.toml", Path("/p"), "p", {},
                    remote_executor=executor, remote_instance=instance)


# --- settings -----------------------------------------------------------------------


def test_the_flag_wins_over_the_environment_and_the_manifest() -> None:
    manifest = _manifest("grpc://manifest:1", "ci")
    env = {"HITZ_REMOTE_EXECUTOR": "grpc://env:2"}
    assert settings_for(manifest, "grpc://flag:3", env) == RemoteSettings("grpc://flag:3", "ci")
    assert settings_for(manifest, None, env) == RemoteSettings("grpc://env:2", "ci")
    assert settings_for(manifest, None, {}) == RemoteSettings("grpc://manifest:1", "ci")
    assert settings_for(_manifest(), None, {}) is None


# --- the input root -----------------------------------------------------------------


def test_every_input_file_is_found_on_the_host(tmp_path: Path) -> None:
    task = TaskDef("t", ("true",))
    files = [InputFile("a.txt", Digest.of(b"a"), False),
             InputFile("dir/sub/b.txt", Digest.of(b"bb"), True),
             InputFile("dir/c.txt", Digest.of(b"a"), False),  # same content as a.txt
             InputFile("empty", Digest.of(b""), False)]
    key = build_key(task, {}, files, {"OSFamily": "linux"})
    spec = _spec(tmp_path, inputs=(InputMount("/src/a.txt", "a.txt"),
                                   InputMount("/src/dir", "dir", True),
                                   InputMount("/src/empty", "empty")))
    found = input_files(key, spec)
    # One host file per blob (a.txt or dir/c.txt, whichever comes first); the
    # empty blob is never uploaded.
    assert found[Digest.of(b"bb")] == Path("/src/dir/sub/b.txt")
    assert found[Digest.of(b"a")] in (Path("/src/a.txt"), Path("/src/dir/c.txt"))
    assert Digest.of(b"") not in found


def test_an_input_no_mount_holds_is_refused(tmp_path: Path) -> None:
    key = build_key(TaskDef("t", ("true",)), {}, [InputFile("x", Digest.of(b"x"), False)], {})
    with pytest.raises(RemoteExecError, match='input "x" of task ":t" has no host file'):
        input_files(key, _spec(tmp_path))


# --- outputs stay in the staging folder ---------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/passwd", "../up", "a/../../b", "a//b", "./a", ""])
def test_an_output_path_that_could_leave_the_staging_folder_is_refused(path: str) -> None:
    with pytest.raises(RemoteExecError, match="unsafe output path"):
        _Plan("/staging").path(path)


def test_a_nested_output_path_stays_inside() -> None:
    assert _Plan("/staging").path("out/deep/a.txt") == "/staging/out/deep/a.txt"


# --- the operation stream -------------------------------------------------------------------


@dataclass
class _FakeExecution(re_grpc.ExecutionServicer):
    """Execute sends one unfinished operation, then drops the stream (UNAVAILABLE)
    ``drops`` times; WaitExecution finishes it. Records the calls."""

    drops: int = 1
    forget: bool = False  # WaitExecution answers NOT_FOUND (a restarted server)
    calls: list[str] = field(default_factory=list)

    def _operation(self, done: bool) -> operations_proto_pb2.Operation:
        op = operations_proto_pb2.Operation(name="ops/1", done=done)
        if done:
            op.response.Pack(re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=3)))
        return op

    def Execute(self, request: Any, context: Any) -> Iterator[operations_proto_pb2.Operation]:
        self.calls.append("Execute")
        yield self._operation(False)
        if self.drops:
            self.drops -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "stream dropped")
        yield self._operation(True)

    def WaitExecution(self, request: Any, context: Any
                      ) -> Iterator[operations_proto_pb2.Operation]:
        self.calls.append(f"WaitExecution {request.name}")
        if self.forget:
            self.forget = False
            context.abort(grpc.StatusCode.NOT_FOUND, "no such operation")
        if self.drops:
            self.drops -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "stream dropped again")
        yield self._operation(True)


class _Remote:
    """What ``RemoteBackend._follow`` uses of a ``RemoteCache``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.metadata = ()
        self.policy = RetryPolicy(sleep=lambda _s: None)
        self.url = "grpc://fake"
        self.instance = ""
        self.timeout_s = 5.0


@pytest.fixture
def fake_execution() -> Iterator[tuple[_FakeExecution, _Remote]]:
    service = _FakeExecution()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    re_grpc.add_ExecutionServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, _Remote(channel)
    finally:
        channel.close()
        server.stop(None)


def _follow(remote: _Remote, tmp_path: Path) -> re_pb2.ExecuteResponse:
    key = build_key(TaskDef("t", ("true",)), {}, [], {})
    backend = RemoteBackend(RemoteSettings("grpc://fake"), lambda _t: key)
    try:
        job = _Job(_spec(tmp_path), key, started=time.monotonic())
        return backend._follow(job, remote)  # type: ignore[arg-type]
    finally:
        backend.close()


def test_a_dropped_stream_is_resumed_with_wait_execution(
        fake_execution: tuple[_FakeExecution, _Remote], tmp_path: Path) -> None:
    service, remote = fake_execution
    response = _follow(remote, tmp_path)
    assert response.result.exit_code == 3
    assert service.calls == ["Execute", "WaitExecution ops/1"]


def test_a_forgotten_operation_is_executed_again(
        fake_execution: tuple[_FakeExecution, _Remote], tmp_path: Path) -> None:
    service, remote = fake_execution
    service.forget = True
    response = _follow(remote, tmp_path)
    assert response.result.exit_code == 3
    assert service.calls == ["Execute", "WaitExecution ops/1", "Execute"]


def test_a_stream_that_keeps_dropping_is_an_error_naming_the_remote(
        fake_execution: tuple[_FakeExecution, _Remote], tmp_path: Path) -> None:
    service, remote = fake_execution
    service.drops = 100
    with pytest.raises(RemoteExecError) as caught:
        _follow(remote, tmp_path)
    assert caught.value.message == (
        "remote executor grpc://fake is unreachable: stream dropped again")
    assert service.calls.count("WaitExecution ops/1") == 4  # STREAM_RETRIES resumes


def test_a_job_cancelled_while_it_connects_ends_cancelled(tmp_path: Path) -> None:
    key = build_key(TaskDef("t", ("true",)), {}, [], {})
    cancelled = threading.Event()

    def connect(_settings: RemoteSettings) -> Any:
        cancelled.wait()
        raise RemoteExecError("the connection failed after the cancel")

    backend = RemoteBackend(RemoteSettings("grpc://fake:1"), lambda _t: key, connect=connect)
    spec = _spec(tmp_path)
    backend.prestart(spec)
    backend.cancel(spec.task)
    cancelled.set()
    results = backend.wait()
    backend.close()
    assert [(r.task, r.status.value, r.message) for r in results] == [
        ("t", "cancelled", "the connection failed after the cancel")]
    assert backend.running() == 0


# --- the worker -------------------------------------------------------------------------------


def test_the_worker_declares_directories_and_files_as_a_spec_does() -> None:
    command = re_pb2.Command(output_files=["a.txt"], output_directories=["out"],
                             output_paths=["a.txt", "out", "new"])
    assert _declared_outputs(command) == ["out/", "a.txt", "new"]


def test_the_worker_refuses_an_unsafe_output_path() -> None:
    from hitz.executor.worker import WorkerError

    with pytest.raises(WorkerError, match=r'unsafe path component "\.\."'):
        _declared_outputs(re_pb2.Command(output_files=["../escape"]))


def test_the_worker_builds_a_tree_the_client_can_walk(tmp_path: Path) -> None:
    top = tmp_path / "out"
    (top / "sub").mkdir(parents=True)
    (top / "a.txt").write_text("a")
    (top / "sub" / "b.sh").write_text("b")
    (top / "sub" / "b.sh").chmod(0o755)
    (top / "link").symlink_to("a.txt")
    blobs: dict[Digest, Any] = {}
    tree = _tree(top, blobs)
    assert [f.name for f in tree.root.files] == ["a.txt"]
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("link", "a.txt")]
    (child,) = tree.children
    assert tree.root.directories[0].digest == re_pb2.Digest(
        hash=digest_of(child)[0].hash, size_bytes=digest_of(child)[0].size)
    assert [(f.name, f.is_executable) for f in child.files] == [("b.sh", True)]
    assert set(blobs) == {Digest.of(b"a"), Digest.of(b"b")}


def test_the_remote_workers_messages_have_the_published_field_numbers() -> None:
    # google.devtools.remoteworkers.v1test2, as BuildGrid and the published API number them.
    numbers = {f.name: f.number for f in bots_pb2.Lease.DESCRIPTOR.fields}
    assert numbers == {"assignment": 1, "state": 2, "status": 3, "requirements": 4,
                       "expire_time": 5, "inline_assignment": 6, "id": 7, "payload": 8,
                       "result": 9}
    numbers = {f.name: f.number for f in bots_pb2.BotSession.DESCRIPTOR.fields}
    assert numbers == {"name": 1, "bot_id": 2, "status": 3, "worker": 4, "leases": 5,
                       "expire_time": 6, "version": 7}
    assert bots_pb2.LeaseState.Value("COMPLETED") == 4
    assert bots_pb2.LeaseState.Value("CANCELLED") == 5
    assert [f.number for f in worker_pb2.Device.DESCRIPTOR.fields] == [1, 2]
    service = bots_pb2.DESCRIPTOR.services_by_name["Bots"]
    assert service.full_name == "google.devtools.remoteworkers.v1test2.Bots"
    assert {m.name for m in service.methods} == {"CreateBotSession", "UpdateBotSession"}


# --- helpers ---------------------------------------------------------------------------------


def _spec(tmp_path: Path, inputs: tuple[InputMount, ...] = ()) -> SandboxSpec:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    return SandboxSpec(task="t", argv=("true",), env={}, inputs=inputs, outputs=(),
                       staging_dir=str(staging), stdout_path=str(tmp_path / "out"),
                       stderr_path=str(tmp_path / "err"), backend="remote")



# --- a result hitz cannot read ----------------------------------------------------------------


class _TreeRemote:
    """Just enough of a RemoteCache for ``_settle``: every blob read is ``blob``."""

    url = "grpc://fake:1"

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def upload_missing(self, _blobs: object) -> int:
        return 0

    def read_blobs(self, digests: Any) -> dict[Digest, bytes]:
        return {d: self.blob for d in digests}

    def fits_batch(self, _digest: Digest) -> bool:
        return True

    def close(self) -> None:
        pass


def test_an_output_tree_that_is_not_a_tree_fails_the_task_and_never_hangs_the_run(
        tmp_path: Path) -> None:
    """A remote whose "tree" of an output directory does not parse: the task
    fails with a message naming the remote, and ``wait`` gets its result (an
    error escaping the worker thread would leave the run waiting forever)."""
    key = build_key(TaskDef("t", ("true",), outputs=("out/",)), {}, [], {})
    backend = RemoteBackend(RemoteSettings("grpc://fake:1"), lambda _t: key)
    backend._remote = _TreeRemote(b"\xff\xff\xff not a tree")  # type: ignore[assignment]
    response = re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=0))
    response.result.output_directories.add(
        path="out", tree_digest=re_pb2.Digest(hash="ab" * 32, size_bytes=17))
    backend._follow = lambda _job, _remote: response  # type: ignore[method-assign]
    spec = SandboxSpec(task="t", argv=("true",), env={}, inputs=(), outputs=("out/",),
                       staging_dir=str(tmp_path), stdout_path=str(tmp_path / "o"),
                       stderr_path=str(tmp_path / "e"), backend="remote")
    try:
        backend.start(spec)
        results = backend.wait(timeout=10)
    finally:
        backend.close()
    assert [(r.task, r.status.value) for r in results] == [("t", "setup-failed")]
    assert "grpc://fake:1" in (results[0].message or "")


def test_an_unexpected_error_on_the_worker_thread_is_a_result_not_a_hang(
        tmp_path: Path) -> None:
    class Broken(_TreeRemote):
        def upload_missing(self, _blobs: object) -> int:
            raise RuntimeError("something nobody expected")

    key = build_key(TaskDef("t", ("true",)), {}, [], {})
    backend = RemoteBackend(RemoteSettings("grpc://fake:1"), lambda _t: key)
    backend._remote = Broken(b"")  # type: ignore[assignment]
    try:
        backend.start(_spec(tmp_path))
        results = backend.wait(timeout=10)
    finally:
        backend.close()
    assert [(r.task, r.status.value, r.message) for r in results] == [
        ("t", "setup-failed", "remote execution of `:t` on grpc://fake:1 failed: "
                              "RuntimeError: something nobody expected")]


# --- the worker's input root and leases -------------------------------------------------------


class _CasRemote:
    """Just enough of a RemoteCache for the worker's staging: a dict of blobs."""

    url = "grpc://fake:1"
    instance = ""
    metadata = ()

    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.channel = grpc.insecure_channel("127.0.0.1:1")  # never called

    def put(self, data: bytes) -> re_pb2.Digest:
        digest = Digest.of(data)
        self.blobs[digest] = data
        return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)

    def read_blob(self, digest: Digest) -> bytes:
        return self.blobs[digest]

    def read_blobs(self, digests: Any) -> dict[Digest, bytes]:
        return {d: self.blobs[d] for d in digests}

    def read_blob_groups(self, digests: Any) -> Iterator[dict[Digest, bytes]]:
        yield self.read_blobs(digests)

    def fits_batch(self, _digest: Digest) -> bool:
        return True


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_the_worker_refuses_an_input_root_whose_symlink_shadows_a_file(
        tmp_path: Path, kind: str) -> None:
    """A Directory naming a symlink and a file (or folder) alike: writing the file
    would follow the symlink out of the lease's folder, onto the worker's host."""
    from hitz.executor.worker import Worker, WorkerError

    victim = tmp_path / "victim"
    victim.write_text("the worker host's file\n")
    victim.chmod(0o600)
    remote = _CasRemote()
    node = re_pb2.FileNode(name="x", digest=remote.put(b"evil\n"))
    link = re_pb2.SymlinkNode(name="x", target=str(victim))
    if kind == "file":
        root = re_pb2.Directory(files=[node], symlinks=[link])
    else:
        sub = remote.put(re_pb2.Directory(files=[re_pb2.FileNode(
            name="y", digest=remote.put(b"evil\n"))]).SerializeToString(deterministic=True))
        root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="x", digest=sub)],
                                symlinks=[link])
    wire = remote.put(root.SerializeToString(deterministic=True))
    (tmp_path / "work").mkdir()
    worker = Worker(remote, work_dir=tmp_path / "work")  # type: ignore[arg-type]
    try:
        with pytest.raises(WorkerError, match='"x"'):
            worker._stage_inputs(wire, tmp_path / "work" / "root")
    finally:
        remote.channel.close()
    assert victim.read_text() == "the worker host's file\n"
    assert victim.stat().st_mode & 0o777 == 0o600


def test_a_lease_the_worker_cannot_read_is_completed_with_an_error(tmp_path: Path) -> None:
    """A lease whose Command blob is not a Command: reported INTERNAL, not a
    lease thread that dies and holds the worker's only job slot forever."""
    from google.rpc import code_pb2

    from hitz.executor.worker import Worker, _Running

    remote = _CasRemote()
    action = re_pb2.Action(command_digest=remote.put(b"\xff\xff not a Command"),
                           input_root_digest=remote.put(b""))
    lease = bots_pb2.Lease(id="l1", state=bots_pb2.LeaseState.ACTIVE)
    lease.payload.Pack(action)
    (tmp_path / "work").mkdir()
    worker = Worker(remote, work_dir=tmp_path / "work")  # type: ignore[arg-type]
    running = _Running(lease, threading.current_thread(), cancel=threading.Event())
    try:
        worker._run_lease(running)
    finally:
        remote.channel.close()
    assert running.done is not None
    assert running.done.state == bots_pb2.LeaseState.COMPLETED
    assert running.done.status.code == code_pb2.INTERNAL
    assert "Command" in running.done.status.message
    assert list((tmp_path / "work").iterdir()) == []


def test_cancelling_many_operations_does_not_wait_on_each_answer(tmp_path: Path) -> None:
    """Ctrl-C with several remote tasks running: their CancelOperation calls go
    out at once, not one after the other each waiting for the server's answer
    (a slow server would hold the interrupted run a whole deadline per task)."""
    from google.protobuf import empty_pb2

    release = threading.Event()
    lock = threading.Lock()
    pending: list[int] = [0, 0]  # calls the client still waits on, most at once

    def ended() -> None:
        with lock:
            pending[0] -= 1

    def cancel_operation(_request: Any, context: Any) -> empty_pb2.Empty:
        with lock:
            pending[0] += 1
            pending[1] = max(pending)
        context.add_callback(ended)  # the call ends: answered, or the client gave up
        release.wait(30)
        return empty_pb2.Empty()

    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "google.longrunning.Operations", {"CancelOperation": grpc.unary_unary_rpc_method_handler(
            cancel_operation,
            request_deserializer=operations_proto_pb2.CancelOperationRequest.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class Remote(_TreeRemote):
        metadata = ()
        timeout_s = 5.0
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    key = build_key(TaskDef("t", ("true",)), {}, [], {})
    backend = RemoteBackend(RemoteSettings("grpc://fake:1"), lambda _t: key)
    backend._remote = Remote(b"")  # type: ignore[assignment]
    jobs = [_Job(_spec(tmp_path), key, operation=f"ops/{n}") for n in range(3)]
    try:
        for job in jobs:
            backend._cancel(job)
        for _ in range(300):  # until the three calls are in, or 30 s at most
            with lock:
                if pending[1] == 3:
                    break
            time.sleep(0.1)
        with lock:
            assert pending[1] == 3
    finally:
        release.set()
        backend.close()
        Remote.channel.close()
        server.stop(None)
