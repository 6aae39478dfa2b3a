"""Unit tests of what remote execution sends before ``Execute``: the `[remote]`
token on the executor's connection, and input files checked against their
digests as they are uploaded. The server is the in-process fake
(tests/fakes/reapi_server.py); it has no Execution service, so the tests
stop before ``Execute`` (the real servers are in
tests/integration/test_remote_exec.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from hitz.executor import remote_exec
from hitz.executor.actions import InputFile, build_key
from hitz.executor.model import Manifest, TaskDef
from hitz.executor.remote import RemoteCache
from hitz.executor.remote_errors import RemoteError
from hitz.executor.remote_exec import (
    InputChanged,
    RemoteBackend,
    RemoteExecError,
    RemoteExecErrorReason,
    RemoteSettings,
    _connect,
    _Job,
    settings_for,
)
from hitz.executor.store import Digest
from hitz.sandbox.spec import InputMount, SandboxSpec
from tests.fakes.reapi_server import FakeReapi

MIB = 1 << 20


def _manifest(root: Path, **remote: str) -> Manifest:
    return Manifest(root / "hitz.toml", "hitz.toml", root, "p", {},
                    remote_executor="grpc://127.0.0.1:1", **remote)  # type: ignore[arg-type]


# --- the token ------------------------------------------------------------------------


def test_the_executor_connection_sends_the_token_of_token_env(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HITZ_TEST_EXEC_TOKEN", "s3cret")
    with FakeReapi(require_token="s3cret") as fake:
        settings = settings_for(_manifest(tmp_path, remote_token_env="HITZ_TEST_EXEC_TOKEN"),
                                fake.url, {})
        assert settings is not None
        remote = _connect(settings)
        try:
            assert fake.metadata["authorization"] == "Bearer s3cret"
        finally:
            remote.close()


def test_the_token_file_is_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "exec.token").write_text("fromfile\n")
    with FakeReapi(require_token="fromfile") as fake:
        settings = settings_for(_manifest(tmp_path, remote_token_file="secrets/exec.token"),
                                fake.url, {})
        assert settings is not None
        assert settings.token_file == str(tmp_path / "secrets" / "exec.token")
        remote = _connect(settings)
        try:
            assert fake.metadata["authorization"] == "Bearer fromfile"
        finally:
            remote.close()


def test_without_the_token_the_executor_refuses(tmp_path: Path) -> None:
    with FakeReapi(require_token="s3cret") as fake:
        settings = settings_for(_manifest(tmp_path), fake.url, {})
        assert settings is not None
        with pytest.raises(RemoteExecError) as caught:
            _connect(settings)
        assert "authorization" not in fake.metadata
        assert caught.value.reason is RemoteExecErrorReason.UNAUTHENTICATED
        assert caught.value.message == \
            f"remote executor {fake.url} refused hitz's credentials"
        assert caught.value.hint == ("give it a token with `token_env` or `token_file` in "
                                     "`[remote]`; the token itself never goes in hitz.toml")


def test_an_unset_token_variable_is_named_with_its_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HITZ_TEST_NO_SUCH_TOKEN", raising=False)
    settings = settings_for(_manifest(tmp_path, remote_token_env="HITZ_TEST_NO_SUCH_TOKEN"),
                            None, {})
    assert settings is not None
    with pytest.raises(RemoteError) as caught:
        _connect(settings)
    assert caught.value.message == \
        "the remote executor token variable `HITZ_TEST_NO_SUCH_TOKEN` is not set"
    assert caught.value.hint == \
        "export HITZ_TEST_NO_SUCH_TOKEN=..., or drop `token_env` from `[remote]`"


# --- inputs are checked as they are sent ------------------------------------------------


def _upload_run(tmp_path: Path, fake: FakeReapi, original: bytes, now: bytes
                ) -> tuple[RemoteBackend, _Job, Digest]:
    """A backend connected to ``fake`` and a job whose one input was hashed as
    ``original`` but holds ``now`` when it is uploaded."""
    source = tmp_path / "src.bin"
    source.write_bytes(now)
    digest = Digest.of(original)
    key = build_key(TaskDef("t", ("true",)), {}, [InputFile("src.bin", digest, False)],
                    {"OSFamily": "linux"})
    staging = tmp_path / "staging"
    staging.mkdir()
    spec = SandboxSpec(task="t", argv=("true",), env={},
                       inputs=(InputMount(str(source), "src.bin"),), outputs=(),
                       staging_dir=str(staging), stdout_path=str(tmp_path / "out"),
                       stderr_path=str(tmp_path / "err"), backend="remote")

    def connect(settings: RemoteSettings) -> RemoteCache:
        return RemoteCache.connect(settings.url, sleep=lambda _s: None)

    backend = RemoteBackend(RemoteSettings(fake.url), lambda _t: key, connect=connect)
    return backend, _Job(spec, key, started=time.monotonic()), digest


@pytest.mark.parametrize(("original", "now", "max_batch"), [
    (b"a" * 1000, b"b" * 1000, 0),  # same size, batch upload
    (b"a" * 1000, b"a" * 1001, 0),  # grown, batch upload
    (bytes(range(256)) * 10_000, bytes(range(256)) * 9_999 + bytes(255) + b"!", 64 << 10),
    (bytes(range(256)) * 10_000, bytes(range(256)) * 9_000, 64 << 10),  # shrunk, streamed
])
def test_an_input_edited_after_hashing_fails_the_task_and_is_never_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        original: bytes, now: bytes, max_batch: int) -> None:
    monkeypatch.setattr(remote_exec, "_check_execution", lambda _remote: None)
    with FakeReapi(max_batch=max_batch) as fake:
        backend, job, digest = _upload_run(tmp_path, fake, original, now)
        try:
            with pytest.raises(InputChanged) as caught:
                backend._run(job)
        finally:
            backend.close()
        assert digest not in fake.blobs
        streamed = fake.calls["Write"] > 0
    assert streamed == bool(max_batch)
    assert caught.value.message == "input `src.bin` of task `:t` changed during the run"
    assert caught.value.reason is RemoteExecErrorReason.INPUT_CHANGED
    assert caught.value.detail is not None
    size = "longer than 1000 bytes" if len(now) > len(original) else f"{len(now)} bytes"
    assert caught.value.detail.startswith(f"{tmp_path / 'src.bin'}: now {size}")
    # gRPC's own traceback of the failed request stream is not printed.
    assert "Exception iterating requests" not in caplog.text


def test_an_input_removed_after_hashing_fails_the_task(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_exec, "_check_execution", lambda _remote: None)
    with FakeReapi() as fake:
        backend, job, _digest = _upload_run(tmp_path, fake, b"x" * 100, b"x" * 100)
        (tmp_path / "src.bin").unlink()
        try:
            with pytest.raises(InputChanged, match="changed during the run") as caught:
                backend._run(job)
        finally:
            backend.close()
    assert caught.value.detail is not None
    assert "can't be read: No such file or directory" in caught.value.detail


def test_an_unchanged_input_is_uploaded_once_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 10_000  # 2.4 MiB: three pieces over ByteStream
    monkeypatch.setattr(remote_exec, "_check_execution", lambda _remote: None)
    with FakeReapi(max_batch=64 << 10) as fake:
        backend, job, digest = _upload_run(tmp_path, fake, data, data)
        job.go.set()
        try:
            # The fake has no Execution service: the run ends there, after the upload.
            with pytest.raises(remote_exec.RemoteExecError):
                backend._run(job)
        finally:
            backend.close()
        assert fake.blobs[digest] == data
        assert fake.calls["Write"] == 1


def test_grpc_records_of_other_errors_are_still_logged() -> None:
    record = logging.LogRecord("grpc._channel", logging.ERROR, __file__, 1,
                               "Exception iterating requests!", None,
                               (ValueError, ValueError("x"), None))
    assert remote_exec._QuietInputChanged().filter(record)
