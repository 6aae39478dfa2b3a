"""`backend = "remote"` against real execution servers.

buildbox-casd runs each action locally in bubblewrap with the input root as
``/`` (tests/peers.py binds the host's /usr, /bin, /lib read-only, so
``/bin/sh`` works). BuildGrid has no worker of its own: the tests that use it
start ``hitz worker`` beside it (tests/peers_exec.py). Every test runs the
real ``hitz run`` against the real server, and checks the files the task
left in the project.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import peers_exec
from tests.helpers import Project, processes_with, task, wait_for
from tests.peers import Peer

# BuildGrid with execution, and a `hitz worker` serving it: fixtures of tests/peers_exec.py.
buildgrid_exec = peers_exec.buildgrid_exec
hitz_worker = peers_exec.hitz_worker

BIG = 12 << 20  # bytes: three times gRPC's 4 MiB message, so it is streamed


def _remote(url: str, instance: str | None = None) -> str:
    head = f'[remote]\nexecutor = "{url}"\n'
    if instance is not None:
        head += f'instance = "{instance}"\n'
    return head + '\n[defaults]\nbackend = "remote"\n\n'


@pytest.fixture
def proj(tmp_path: Path) -> Iterator[Project]:
    """A project folder; remote tasks need no sandbox on this host."""
    root = tmp_path / "proj"
    root.mkdir()
    project = Project(root)
    yield project
    project.close()


def _write(proj: Project, url: str, *tasks: str) -> None:
    proj.write("hitz.toml", _remote(url) + "\n".join(tasks))


# --- buildbox-casd ------------------------------------------------------------------


def test_a_remote_task_gives_its_outputs_in_the_project(proj: Project, casd: Peer) -> None:
    proj.write("src/greeting.txt", "hello\n")
    proj.write("src/tool.sh", "#!/bin/sh\necho tool ran\n", mode=0o755)
    _write(proj, casd.url,
           task("gen", "mkdir -p out/deep/er && cat src/greeting.txt > out/deep/er/a.txt"
                " && ./src/tool.sh > out/top.txt && printf x > out/exe && chmod +x out/exe",
                inputs=["src/"], outputs=["out/"]),
           task("use", "cat out/deep/er/a.txt out/top.txt > result.txt", inputs=[":gen"],
                outputs=["result.txt"]))
    done = proj.run()
    assert done.returncode == 0, done
    assert proj.read("out/deep/er/a.txt") == "hello\n"
    assert proj.read("out/top.txt") == "tool ran\n"
    assert (proj.root / "out/exe").stat().st_mode & 0o111
    assert not (proj.root / "out/top.txt").stat().st_mode & 0o111
    assert proj.read("result.txt") == "hello\ntool ran\n"
    entry = done.task("gen")
    assert entry["enforced"]["executor"] == f"remote {casd.url}"
    assert entry["weakened"] == ["sandbox: the remote executor's own, not hitz's policy"]


def test_a_failing_remote_task_reports_its_exit_status_and_stderr(
        proj: Project, casd: Peer) -> None:
    _write(proj, casd.url, task("bad", "echo some words; echo it broke >&2; exit 7",
                                outputs=["never.txt"]))
    done = proj.run()
    assert done.returncode == 1, done
    entry = done.task("bad")
    assert (entry["outcome"], entry["status"], entry["exit_code"]) == ("failed", "failed", 7)
    assert entry["message"] == f"exited with status 7 on the remote executor {casd.url}"
    assert proj.log(done, "bad", "stderr") == "it broke\n"
    assert proj.log(done, "bad", "stdout") == "some words\n"
    assert "it broke" in done.stderr  # the tail, shown by the progress output
    assert not (proj.root / "never.txt").exists()


def test_a_missing_output_is_reported(proj: Project, casd: Peer) -> None:
    _write(proj, casd.url, task("lazy", "true", outputs=["made.txt"]))
    done = proj.run()
    assert done.returncode == 1, done
    entry = done.task("lazy")
    assert entry["status"] == "output-missing"
    assert entry["message"] == 'declared output file "made.txt" was not created'


def test_a_second_run_is_a_cache_hit_locally_then_on_the_remote(
        proj: Project, casd: Peer, tmp_path: Path) -> None:
    proj.write("in.txt", "stable input\n")
    _write(proj, casd.url, task("copy", "cp in.txt out.txt; date +%s%N > stamp.txt",
                                inputs=["in.txt"], outputs=["out.txt", "stamp.txt"]))
    first = proj.run()
    assert first.returncode == 0, first
    stamp = proj.read("stamp.txt")
    assert "remote.cached" not in first.task("copy")["enforced"]

    again = proj.run()
    assert again.returncode == 0, again
    assert again.task("copy")["cached"] is True  # hitz's own cache: nothing sent

    # Another machine: no local cache, no outputs. The remote answers from its own.
    shutil.rmtree(proj.root / ".hitz")
    (proj.root / "out.txt").unlink()
    (proj.root / "stamp.txt").unlink()
    other = proj.run(env={"HITZ_CACHE_DIR": str(tmp_path / "other-machine-cache")})
    assert other.returncode == 0, other
    entry = other.task("copy")
    assert entry["enforced"]["remote.cached"] == "true"
    assert entry["action_digest"] == first.task("copy")["action_digest"]
    assert proj.read("out.txt") == "stable input\n"
    assert proj.read("stamp.txt") == stamp  # the first run's, not a new one


def test_a_large_output_is_streamed_and_verified(proj: Project, casd: Peer) -> None:
    # A pattern that is not all zeros: 12 MiB of repeated line numbers.
    _write(proj, casd.url, task(
        "big", f"seq 1 2000000 | head -c {BIG} > big.bin", outputs=["big.bin"]))
    done = proj.run()
    assert done.returncode == 0, done
    data = (proj.root / "big.bin").read_bytes()
    expected = "".join(f"{n}\n" for n in range(1, 2_000_001)).encode()[:BIG]
    assert len(data) == BIG
    assert hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()


def test_a_large_input_is_uploaded(proj: Project, casd: Peer) -> None:
    payload = bytes(range(256)) * (BIG // 256)
    (proj.root / "blob.bin").write_bytes(payload)
    _write(proj, casd.url, task("sum", "sha256sum blob.bin > sum.txt", inputs=["blob.bin"],
                                outputs=["sum.txt"]))
    done = proj.run()
    assert done.returncode == 0, done
    assert proj.read("sum.txt") == f"{hashlib.sha256(payload).hexdigest()}  blob.bin\n"


def test_remote_and_local_results_never_share_a_key(
        proj: Project, casd: Peer, kernel_namespaces: None) -> None:
    proj.write("in.txt", "x\n")
    copy = task("remote", "cp in.txt o.txt", inputs=["in.txt"], outputs=["o.txt"])
    _write(proj, casd.url, copy,
           task("local", "cat o.txt > local.txt", deps=["remote"], outputs=["local.txt"],
                extra={"backend": "namespace"}))
    done = proj.run()
    assert done.returncode == 0, done
    assert proj.read("local.txt") == "x\n"  # a local task reads a remote task's output
    # The same command as a local task gets another key: rootfs "remote:" vs "host:...".
    proj.write("hitz.toml", _remote(casd.url).replace('backend = "remote"',
                                                       'backend = "namespace"')
               + copy)
    local = proj.run()
    assert local.returncode == 0, local
    assert local.task("remote")["cached"] is False
    assert local.task("remote")["action_digest"] != done.task("remote")["action_digest"]


# --- errors in the user's words ---------------------------------------------------------


def test_a_remote_task_without_an_executor_is_refused_before_anything_runs(
        proj: Project) -> None:
    proj.write("hitz.toml", task("t", "true", extra={"backend": "remote"}))
    done = proj.run()
    assert done.returncode == 2, done
    assert done.stderr == (
        'error: hitz.toml:3: task "t": backend = "remote", but no remote executor is set\n'
        "\n"
        'hint: add `[remote]` with `executor = "grpc://HOST:PORT"` to the manifest, or pass '
        "`--remote-executor grpc://HOST:PORT` (or set $HITZ_REMOTE_EXECUTOR)\n")


def test_a_bad_executor_flag_is_a_usage_error(proj: Project) -> None:
    proj.write("hitz.toml", task("t", "true", extra={"backend": "remote"}))
    done = proj.run("--remote-executor", "http://nope")
    assert done.returncode == 2, done
    assert done.stderr == (
        "error: --remote-executor: 'http://nope' is not an executor address such as "
        '"grpc://127.0.0.1:8980" or "grpcs://build.example.com:443"\n'
        "\n"
        "hint: for example `hitz run --remote-executor grpc://127.0.0.1:8980`\n")


def test_an_unreachable_executor_fails_the_task_with_a_clear_message(proj: Project) -> None:
    from tests.peers import free_port

    url = f"grpc://127.0.0.1:{free_port()}"
    proj.write("hitz.toml", _remote(url) + task("t", "true"))
    done = proj.run()
    assert done.returncode == 1, done
    entry = done.task("t")
    assert entry["status"] == "setup-failed"
    assert entry["message"] == f"remote executor {url} is unreachable"
    assert "Traceback" not in done.stderr


def test_a_cache_only_server_is_refused_as_an_executor(proj: Project, buildgrid: Peer) -> None:
    _write(proj, buildgrid.url, task("t", "true"))
    done = proj.run()
    assert done.returncode == 1, done
    assert done.task("t")["message"] == (
        f"{buildgrid.url} does not offer remote execution (it is a cache only)")


# --- BuildGrid + hitz worker ---------------------------------------------------------------


def test_buildgrid_runs_remote_tasks_through_hitz_worker(
        proj: Project, buildgrid_exec: Peer, hitz_worker: object,
        kernel_namespaces: None) -> None:
    proj.write("src/greeting.txt", "hello from the grid\n")
    _write(proj, buildgrid_exec.url,
           task("gen", "mkdir -p out/sub && cat src/greeting.txt > out/sub/a.txt"
                " && printf x > out/exe && chmod +x out/exe && hostname > out/host.txt",
                inputs=["src/"], outputs=["out/"]),
           task("use", "cat out/sub/a.txt > result.txt", inputs=[":gen"],
                outputs=["result.txt"]),
           task("bad", "echo grid failure >&2; exit 5"))
    done = proj.run("-k")
    assert done.returncode == 1, done
    assert proj.read("out/sub/a.txt") == "hello from the grid\n"
    assert (proj.root / "out/exe").stat().st_mode & 0o111
    assert proj.read("result.txt") == "hello from the grid\n"
    # The worker ran it in hitz's namespace sandbox, whose hostname is "hitz".
    assert proj.read("out/host.txt") == "hitz\n"
    bad = done.task("bad")
    assert (bad["status"], bad["exit_code"]) == ("failed", 5)
    assert proj.log(done, "bad", "stderr") == "grid failure\n"
    assert done.task("gen")["enforced"]["executor"] == f"remote {buildgrid_exec.url}"


def test_ctrl_c_cancels_the_remote_operation(proj: Project, casd: Peer, marker: str) -> None:
    _write(proj, casd.url, task("slow", f"sleep {marker}1"))
    hitz = proj.start()
    wait_for(lambda: processes_with(f"sleep {marker}1"), "the remote task to start")
    hitz.send_signal(signal.SIGINT)
    done = proj.finish(hitz)
    assert done.returncode == 130, done
    assert done.task("slow")["outcome"] == "cancelled"
    # CancelOperation made casd stop the action, not only hitz stop waiting for it.
    wait_for(lambda: not processes_with(f"sleep {marker}1"), "casd to stop the cancelled task")


def test_moving_a_task_to_the_remote_makes_it_run_there(
        proj: Project, casd: Peer, kernel_namespaces: None) -> None:
    proj.write("in.txt", "moved\n")
    local = task("t", "cp in.txt o.txt", inputs=["in.txt"], outputs=["o.txt"])
    proj.write("hitz.toml", _remote(casd.url).replace('"remote"', '"namespace"') + local)
    first = proj.run()
    assert first.returncode == 0, first
    _write(proj, casd.url, local)
    moved = proj.run()
    assert moved.returncode == 0, moved
    # Not "up to date" from the local run: it has another key, and ran remotely.
    entry = moved.task("t")
    assert entry["cached"] is False
    assert entry["enforced"]["executor"] == f"remote {casd.url}"
    assert entry["action_digest"] != first.task("t")["action_digest"]
