"""The docker backend's error border (``_engine_errors`` in sandbox/docker.py)
with an SDK that refuses: an engine too old for an option hitz sets, or one
that answers with an error, must reach the user as a SandboxError in words,
with a hint, never as a docker-py exception and its traceback.

The client is a real ``docker.DockerClient`` pinned to an old API version
(so the SDK's own version checks run), pointed at a socket that does not
exist; the few calls that would reach the engine are replaced on its
``api`` to answer or raise as the test says. No engine is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from hitz.sandbox import docker as backend_module
from hitz.sandbox.docker import DockerBackend, DockerUnavailable
from hitz.sandbox.errors import SandboxError
from hitz.sandbox.spec import SandboxSpec, Status

IMAGE_ID = "sha256:" + "1" * 64
TOO_NEW = "client version 1.41 is too new. Maximum supported API version is 1.40"


def client(version: str, **calls: Any) -> docker.DockerClient:
    made = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version=version)
    api: Any = made.api
    api.containers = lambda **_: []  # nothing to reap
    api.inspect_image = lambda ref: {"Id": IMAGE_ID, "RepoTags": []}
    for name, call in calls.items():
        setattr(api, name, call)
    return made


def raising(exc: BaseException) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return call


def run_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            made: docker.DockerClient) -> list[Any]:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.setattr(backend_module, "init_path", lambda: "/bin/true")
    (tmp_path / "staging").mkdir()
    backend = DockerBackend(client=made)
    try:
        backend.start(SandboxSpec("build", ("true",), {}, (), (), str(tmp_path / "staging"),
                                  str(tmp_path / "out"), str(tmp_path / "err"),
                                  backend="docker", rootfs="docker:x@" + IMAGE_ID))
        return backend.wait()
    finally:
        backend.close()


def test_an_option_the_sdk_refuses_for_the_engine_api_is_a_too_old_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # API 1.24 predates Docker's init (1.25): the SDK itself raises
    # InvalidVersion while building the host config, before any request.
    with pytest.raises(DockerUnavailable) as caught:
        run_one(tmp_path, monkeypatch, client("1.24"))
    assert caught.value.message == (
        "the Docker engine at `unix:///nonexistent/docker.sock` speaks API 1.24; "
        "hitz needs 1.41 (Docker 20.10 or newer)")
    assert caught.value.hint is not None and "upgrade the engine" in caught.value.hint
    assert isinstance(caught.value.__cause__, docker.errors.InvalidVersion)


def test_an_engine_that_finds_the_client_too_new_is_a_too_old_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = docker.errors.APIError("400 Client Error: Bad Request", explanation=TOO_NEW)
    with pytest.raises(DockerUnavailable) as caught:
        run_one(tmp_path, monkeypatch, client("1.41", create_container=raising(refused)))
    assert caught.value.message == (
        "the Docker engine at `unix:///nonexistent/docker.sock` speaks API 1.40; "
        "hitz needs 1.41 (Docker 20.10 or newer)")
    assert caught.value.__cause__ is refused


def test_an_engine_error_fails_only_its_task_in_words(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = docker.errors.APIError("500 Server Error", explanation="no space left on device")
    (result,) = run_one(tmp_path, monkeypatch,
                        client("1.41", create_container=raising(refused)))
    assert result.status is Status.SETUP_FAILED
    assert result.message == ("the Docker engine could not create the container of task "
                              "`:build`: no space left on device")


def test_connecting_to_an_engine_older_than_1_41_fails_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Such an engine ignores `cgroupns` instead of refusing it: hitz must
    # not run tasks there with less isolation than they asked for.
    old = client("1.40", ping=lambda: True)
    monkeypatch.setattr(docker, "DockerClient", lambda **kwargs: old)
    with pytest.raises(DockerUnavailable) as caught:
        backend_module.connect()
    assert "speaks API 1.40; hitz needs 1.41" in caught.value.message
    assert isinstance(caught.value, SandboxError) and caught.value.exit_code == 2


def test_hitz_run_refuses_an_engine_older_than_1_41_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # check_engine asks a local engine over plain HTTP (no SDK): a stand-in
    # that answers the ping and says it speaks API 1.40.
    import http.server
    import socketserver
    import threading

    class Engine(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"ApiVersion": "1.40", "Version": "19.03.15"}' if (
                self.path == "/version") else b"OK"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    path = str(tmp_path / "docker.sock")
    with Server(path, Engine) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
        try:
            with pytest.raises(DockerUnavailable) as caught:
                backend_module.check_engine({})
        finally:
            server.shutdown()
    assert caught.value.message == (f"the Docker engine at `unix://{path}` speaks API 1.40; "
                                    "hitz needs 1.41 (Docker 20.10 or newer)")
