"""Bazel, the most widely used REAPI client, against `hitz cache serve`.

Bazel 4.2.3 (Debian's ``bazel-bootstrap``, which ``scripts/test`` installs;
it runs offline on OpenJDK 17 and speaks REAPI 2.0) builds a workspace of
two genrules with ``--remote_cache=grpc://127.0.0.1:PORT``, uploading its
results; after ``bazel clean`` the same build must come entirely from the
cache ("2 remote cache hit"), with the right bytes. That is the way Bazel
uses Capabilities, FindMissingBlobs, ByteStream Write and Read and the
ActionCache, and the test that hitz speaks REAPI as clients expect.

Bazel gets a ``HOME`` and an ``--output_user_root`` in the test's tmp folder
and one server for the whole test, shut down at the end (or killed by the
PID it recorded, if the test failed before).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hitz.executor.store import Digest, Store
from tests.integration.test_cache_server import ServedCache, start_server

BAZEL_GUARD_S = 300.0  # a build takes seconds; the first one starts Bazel's server (JVM)

WORKSPACE = 'workspace(name = "probe")\n'
BUILD = """\
genrule(
    name = "hello",
    outs = ["hello.txt"],
    cmd = "echo hello from hitz > $@",
)

genrule(
    name = "shout",
    srcs = [":hello"],
    outs = ["shout.txt"],
    cmd = "tr a-z A-Z < $< > $@",
)
"""


class Bazel:
    """Runs ``bazel`` in one workspace, with a home and an output root of its own."""

    def __init__(self, tmp_path: Path) -> None:
        found = shutil.which("bazel")
        if found is None:
            pytest.fail("`bazel` is not installed: this test needs Bazel 4.2.3 from Debian's "
                        "bazel-bootstrap (`apt-get install -y bazel-bootstrap`; `scripts/test` "
                        "installs it)")
        self.executable = found
        self.workspace = tmp_path / "workspace"
        self.output_root = tmp_path / "bazel-root"
        self.home = tmp_path / "home"
        for folder in (self.workspace, self.output_root, self.home):
            folder.mkdir()
        (self.workspace / "WORKSPACE").write_text(WORKSPACE)
        (self.workspace / "BUILD").write_text(BUILD)
        (self.workspace / ".bazelrc").write_text(
            f"startup --output_user_root={self.output_root}\n"
            "startup --host_jvm_args=-Xmx512m\n"
            # If the test dies without `bazel shutdown`, the server goes by itself.
            "startup --max_idle_secs=120\n"
            "build --color=no --curses=no\n"
        )
        self.env = {**os.environ, "HOME": str(self.home)}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(
                [self.executable, *args], cwd=self.workspace, env=self.env,
                capture_output=True, text=True, timeout=BAZEL_GUARD_S, check=False)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`bazel {' '.join(args)}` did not finish in {BAZEL_GUARD_S:g}s\n"
                        f"{exc.stderr!r}")
        assert done.returncode == 0, (
            f"`bazel {' '.join(args)}` exited with {done.returncode}\n{done.stderr}")
        return done

    def shutdown(self) -> None:
        """``bazel shutdown``; failing that, SIGKILL each server by its recorded PID."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([self.executable, "shutdown"], cwd=self.workspace, env=self.env,
                           capture_output=True, timeout=60, check=False)
        for pid_file in self.output_root.glob("*/server/server.pid.txt"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)


@pytest.fixture
def bazel(tmp_path: Path) -> Iterator[Bazel]:
    runner = Bazel(tmp_path)
    yield runner
    runner.shutdown()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServedCache]:
    served = start_server(tmp_path / "cache", tmp_path / "serve.log")
    yield served
    served.kill()


def test_bazel_builds_from_the_hitz_cache_after_clean(bazel: Bazel, server: ServedCache) -> None:
    remote = f"--remote_cache=grpc://{server.address}"

    first = bazel("build", remote, "//:all")
    assert "remote cache hit" not in first.stderr, first.stderr
    shout = bazel.workspace / "bazel-bin" / "shout.txt"
    assert shout.read_text() == "HELLO FROM HITZ\n"

    bazel("clean")
    assert not shout.exists()

    second = bazel("build", remote, "//:all")
    assert re.search(r"\b2 remote cache hit\b", second.stderr), second.stderr
    assert shout.read_text() == "HELLO FROM HITZ\n"

    # What Bazel uploaded is in the local store that `hitz run` would use.
    with Store(server.cache_dir) as store:
        for output in (b"hello from hitz\n", b"HELLO FROM HITZ\n"):
            assert store.read_bytes(Digest.of(output)) == output
    assert "error" not in server.stderr() and "warning" not in server.stderr(), server.stderr()
