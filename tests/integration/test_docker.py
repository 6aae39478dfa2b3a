"""The docker backend against the real Docker engine.

Each test runs the real CLI on a task with ``backend = "docker"`` in a small
busybox image built here from Debian's busybox-static package (no registry
is reachable) and imported into the engine, named by its image ID. The
engine must answer: these tests never skip; without one they fail and say
how to start it (scripts/test starts one, see scripts/_docker.sh).

Containers are found by their labels (``hitz.task``, ``hitz.pid``); task
names carry a random number, so concurrent test runs never see each
other's containers.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Project, new_marker, task, wait_for

pytestmark = pytest.mark.kernel

_APPLETS_MTIME = 315532800


def _engine() -> Any:
    from hitz.sandbox.docker import connect
    from hitz.sandbox.errors import SandboxError

    try:
        return connect()
    except SandboxError as exc:
        pytest.fail(f"{exc.message}\nhint: {exc.hint}\n(scripts/test starts an engine: "
                    "`source scripts/_common.sh; source scripts/_docker.sh; ensure_docker`)")


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    client = _engine()
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``docker:NAME@sha256:ID`` of a busybox image: /bin/busybox with its
    applets as symlinks, /etc/passwd; nothing else."""
    folder = tmp_path_factory.mktemp("busybox")
    fetched = subprocess.run(["apt-get", "download", "busybox-static"], cwd=folder,
                             capture_output=True, text=True, check=False)
    debs = list(folder.glob("busybox-static_*.deb"))
    assert debs, f"`apt-get download busybox-static` failed:\n{fetched.stderr}"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(folder / "root")], check=True)
    binary = (folder / "root/bin/busybox").read_bytes()
    applets = subprocess.run([str(folder / "root/bin/busybox"), "--list"], capture_output=True,
                             text=True, check=True).stdout.split()
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        def add(name: str, content: bytes | None = None, link: str | None = None,
                mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = _APPLETS_MTIME, mode
            if content is None and link is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                assert content is not None
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))

        add("bin")
        add("etc")
        add("bin/busybox", binary)
        for applet in sorted(set(applets) - {"busybox"}):
            add(f"bin/{applet}", link="busybox")
        add("etc/passwd", b"root:x:0:0:root:/tmp:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", mode=0o644)
    # Tagged by content and imported once: `docker import` makes a new image
    # ID each time, and moving the tag would take it from an image a
    # concurrent test session is using.
    name = "hitz-test-docker/busybox"
    tag = hashlib.sha256(data.getvalue()).hexdigest()[:16]
    if not engine.api.images(name=f"{name}:{tag}", quiet=True):
        engine.api.import_image_from_data(data.getvalue(), repository=name, tag=tag)
    image_id = engine.api.inspect_image(f"{name}:{tag}")["Id"]
    return f"docker:{name}@{image_id}"


def docker_task(name: str, run: str, image: str, **kwargs: Any) -> str:
    extra = {"backend": "docker", "rootfs": image, **kwargs.pop("extra", {})}
    return task(name, ["/bin/sh", "-c", run], extra=extra, **kwargs)


def containers(engine: Any, **labels: str) -> list[dict[str, Any]]:
    wanted = [f"{key.replace('_', '.')}={value}" for key, value in labels.items()]
    return list(engine.api.containers(all=True, filters={"label": wanted}))


@pytest.fixture
def name() -> str:
    return f"t{new_marker()}"


# --- the contract ----------------------------------------------------------------


def test_only_declared_inputs_visible_read_only_and_outputs_kept(
        project: Project, busybox: str, engine: Any, name: str) -> None:
    project.write("src/a.txt", "hello\n")
    project.write("src/secret.txt", "SECRET\n")
    project.write("TODO", "SECRET\n")
    script = (
        "cat src/a.txt; ls -A /work /work/src\n"
        "if cat src/secret.txt TODO; then exit 77; fi\n"
        "if echo evil > src/a.txt; then exit 77; fi\n"
        "if echo evil > /etc/passwd; then exit 77; fi\n"
        "if touch /new; then exit 77; fi\n"
        "echo made > out/result.txt; echo t > /tmp/x; echo s > /dev/shm/x\n"
        "id -u; id -g; cat /proc/net/dev | tail -n +3 | cut -d: -f1; ls -A /sys\n"
    )
    project.write_manifest(docker_task(name, script, busybox, inputs=["src/a.txt"],
                                       outputs=["out/result.txt"]))
    result = project.run()
    assert result.returncode == 0, str(result)
    entry = result.task(name)
    assert entry["status"] == "succeeded", str(result)
    out = project.log(result, name, "stdout").split()
    uid = "65534" if os.geteuid() == 0 else str(os.getuid())
    gid = "65534" if os.geteuid() == 0 else str(os.getgid())
    # /sys is empty: nothing follows the only interface, "lo".
    assert out == ["hello", "/work:", "out", "src", "/work/src:", "a.txt", uid, gid, "lo"], (
        str(result))
    err = project.log(result, name, "stderr")
    assert err.count("No such file or directory") == 2, err
    assert err.count("Read-only file system") == 3, err
    assert project.read("src/a.txt") == "hello\n"
    assert project.read("out/result.txt") == "made\n"
    assert (project.root / "out/result.txt").stat().st_uid == os.getuid()
    assert entry["enforced"]["sandbox"] == "docker"
    assert entry["enforced"]["seccomp"].startswith("default sha256:")
    assert entry["weakened"] == []
    assert containers(engine, hitz_task=name) == [], "a container was left behind"


def test_hardening_inside_the_container(project: Project, busybox: str, name: str) -> None:
    script = ("grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status\n"
              "ulimit -c; ulimit -n; hostname; env | sort\n"
              "if unshare -U true; then exit 77; fi\n")
    project.write_manifest(docker_task(name, script, busybox, env={"DECLARED": "yes"}))
    result = project.run(env={"HITZ_PROBE_SECRET": "leak"})
    assert result.returncode == 0, str(result)
    out = project.log(result, name, "stdout").split()
    assert out[:14] == ["CapInh:", "0000000000000000", "CapPrm:", "0000000000000000",
                        "CapEff:", "0000000000000000", "CapBnd:", "0000000000000000",
                        "CapAmb:", "0000000000000000", "NoNewPrivs:", "1", "Seccomp:", "2"]
    assert out[14:17] == ["0", "4096", "hitz"]
    env = {line.split("=", 1)[0] for line in out[17:]}
    # PWD and SHLVL come from the shell itself; nothing of Docker's or the host's.
    assert env == {"PATH", "HOME", "TMPDIR", "SOURCE_DATE_EPOCH", "DECLARED", "PWD", "SHLVL"}
    assert "Operation not permitted" in project.log(result, name, "stderr")


def test_a_failed_task_leaves_the_workspace_untouched(
        project: Project, busybox: str, engine: Any, name: str) -> None:
    project.write("out/result.txt", "old\n")
    project.write_manifest(docker_task(name, "echo new > out/result.txt; exit 3", busybox,
                                       outputs=["out/result.txt"]))
    before = project.snapshot()
    result = project.run()
    assert result.returncode == 1, str(result)
    entry = result.task(name)
    assert (entry["status"], entry["exit_code"]) == ("failed", 3), str(result)
    assert project.snapshot() == before
    assert containers(engine, hitz_task=name) == []


def test_timeout_kills_the_task_and_removes_its_container(
        project: Project, busybox: str, engine: Any, name: str) -> None:
    project.write_manifest(docker_task(name, "trap '' TERM; sleep 1000", busybox, timeout="1s"))
    result = project.run()
    entry = result.task(name)
    assert (entry["status"], entry["message"]) == ("timed-out", "timed out after 1s"), str(result)
    assert containers(engine, hitz_task=name) == []


def test_a_missing_output_is_reported(project: Project, busybox: str, name: str) -> None:
    project.write_manifest(docker_task(name, "true", busybox, outputs=["out/x"]))
    entry = project.run().task(name)
    assert entry["status"] == "output-missing"
    assert entry["message"] == 'declared output file "out/x" was not created'


def test_memory_limit_is_reported_as_such(project: Project, busybox: str, name: str) -> None:
    project.write_manifest(docker_task(
        name, "x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo ${#x}", busybox,
        extra={"limits": {"memory": "64MiB"}, "cache": False}))
    entry = project.run().task(name)
    assert (entry["status"], entry["message"]) == (
        "limit-exceeded", "killed: out of memory (limits.memory = 67108864 bytes)")


def test_printing_past_the_output_cap_fails_the_task(
        project: Project, busybox: str, name: str) -> None:
    project.write_manifest(docker_task(name, "head -c 3000000 /dev/zero | tr '\\0' x", busybox,
                                       extra={"limits": {"output": "1MiB"}, "cache": False}))
    result = project.run()
    entry = result.task(name)
    assert (entry["status"], entry["message"]) == (
        "limit-exceeded", "printed more than 1 MiB to stdout and stderr (limits.output)")
    assert len(project.log(result, name, "stdout")) <= 1 << 20


def test_a_fork_bomb_stops_at_the_process_limit(project: Project, busybox: str,
                                                name: str) -> None:
    # Bounded: at most 100 sleeps are attempted; the limit lets 16 exist.
    # Docker does not say a fork failed for its pids limit: the task fails
    # with the shell's own words (docs/docker.md).
    project.write_manifest(docker_task(
        name, "for i in $(seq 100); do sleep 5 & done; wait", busybox,
        extra={"limits": {"pids": 16}, "cache": False}))
    result = project.run()
    assert result.task(name)["status"] == "failed", str(result)
    assert "can't fork" in project.log(result, name, "stderr"), str(result)


# --- no leaked containers -------------------------------------------------------------


def test_sigterm_cancels_and_removes_every_container(
        project: Project, busybox: str, engine: Any, marker: str) -> None:
    project.write_manifest(
        docker_task("a", f"sleep {marker}", busybox),
        docker_task("b", f"sleep {marker}", busybox),
    )
    proc = project.start("-j", "2")
    wait_for(lambda: len([c for c in containers(engine, hitz_pid=str(proc.pid))
                          if c["State"] == "running"]) == 2, "both containers to run")
    proc.send_signal(signal.SIGTERM)
    result = project.finish(proc)
    assert result.returncode == 130, str(result)
    assert containers(engine, hitz_pid=str(proc.pid)) == []


def test_sigterm_removes_the_containers_held_ahead_too(
        project: Project, busybox: str, engine: Any, marker: str) -> None:
    # -j 1: one task runs while the backend's lookahead (4) more are
    # created and started ahead, each waiting in hitz's init; none of them
    # may run its task or outlive the run.
    project.write_manifest(
        docker_task("a", f"sleep {marker}", busybox),
        *(docker_task(f"h{i}", f"sleep {marker}", busybox) for i in range(5)),
    )
    proc = project.start("-j", "1")
    wait_for(lambda: len([c for c in containers(engine, hitz_pid=str(proc.pid))
                          if c["State"] == "running"]) == 5,
             "the running container and four held ones")
    proc.send_signal(signal.SIGTERM)
    result = project.finish(proc)
    assert result.returncode == 130, str(result)
    assert containers(engine, hitz_pid=str(proc.pid)) == []


def test_a_crashed_run_is_reaped_by_the_next(
        project: Project, busybox: str, engine: Any, marker: str, name: str) -> None:
    project.write_manifest(docker_task("hang", f"sleep {marker}", busybox),
                           docker_task(name, "true", busybox))
    proc = project.start("hang")
    wait_for(lambda: [c for c in containers(engine, hitz_pid=str(proc.pid))
                      if c["State"] == "running"], "the container to run")
    proc.kill()  # SIGKILL: hitz cannot clean up
    proc.communicate()
    assert len(containers(engine, hitz_pid=str(proc.pid))) == 1  # left behind, for now
    result = project.run(name)
    assert result.returncode == 0, str(result)
    assert containers(engine, hitz_pid=str(proc.pid)) == [], "the next run did not reap it"


# --- errors in the user's words ------------------------------------------------------


def test_an_unreachable_engine_stops_the_run_before_it_starts(
        project: Project, busybox: str, tmp_path: Path, name: str) -> None:
    project.write_manifest(docker_task(name, "true", busybox))
    dead = tmp_path / "dead.sock"
    result = project.run(env={"DOCKER_HOST": f"unix://{dead}"})
    assert result.returncode == 2, str(result)
    line = next(i for i, text in enumerate(project.read("hitz.toml").splitlines(), 1)
                if text.startswith("backend"))
    assert result.stderr == (
        f"error: cannot reach the Docker engine at `unix://{dead}`: No such file or directory\n"
        f'needed by task "{name}" (hitz.toml:{line})\n'
        "\nhint: start it (`sudo systemctl start docker`, or `sudo dockerd` by hand) and check "
        '`docker info`, or run the task with backend = "namespace"\n'
    ), str(result)


def test_a_missing_image_stops_the_run_before_it_starts(
        project: Project, engine: Any, name: str) -> None:
    missing = "docker:hitz-test-docker/none@sha256:" + "0" * 64
    project.write_manifest(task(name, "true", extra={"backend": "docker", "rootfs": missing}))
    result = project.run()
    assert result.returncode == 2, str(result)
    assert result.stderr.startswith(
        f"error: task `:{name}` runs on `{missing}`, which the Docker engine does not have\n"
        "\nhint: `docker images --digests` lists the local images"), str(result)
    assert "Traceback" not in result.stderr


def test_a_weakened_policy_is_shown_in_every_report(project: Project, busybox: str,
                                                    name: str) -> None:
    project.write_manifest(docker_task(
        name, "grep '^Seccomp:' /proc/self/status", busybox, network="host",
        extra={"seccomp": "unconfined", "landlock": False, "cache": False}))
    result = project.run()
    entry = result.task(name)
    assert entry["status"] == "succeeded", str(result)
    assert entry["weakened"] == ["network host", "seccomp unconfined", "landlock off"]
    assert entry["enforced"]["seccomp"] == "unconfined"
    assert project.log(result, name, "stdout").split() == ["Seccomp:", "0"]
    assert "[weakened: network host, seccomp unconfined, landlock off]" in result.stderr


def test_an_allow_list_profile_without_landlock_still_gets_landlock(
        project: Project, busybox: str, name: str) -> None:
    # A Docker-format allow-list that does not name the Landlock calls (as
    # Docker's own default profile of 20.10 does not): the namespace
    # backend applies Landlock before the profile, so the task runs there;
    # in a container hitz's init applies it after the engine installed the
    # profile, and must still be able to.
    import json

    from hitz.sandbox.docker_seccomp import LANDLOCK_SYSCALLS, render_strict

    profile = json.loads(render_strict())
    profile["syscalls"] = [rule for rule in profile["syscalls"]
                           if not set(rule["names"]) & set(LANDLOCK_SYSCALLS)]
    project.write("allow.json", json.dumps(profile))
    project.write_manifest(docker_task(name, "echo ok; if touch /work/x; then exit 77; fi",
                                       busybox, extra={"seccomp": "allow.json",
                                                       "cache": False}))
    result = project.run()
    entry = result.task(name)
    assert entry["status"] == "succeeded", str(result)
    assert project.log(result, name, "stdout") == "ok\n"
    assert entry["enforced"]["landlock"].startswith("ABI "), str(result)


def test_closing_after_the_engine_went_away_does_not_hang(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine stops answering mid-run: the task's thread hands the
    # failure to wait(), which raises it; the run then closes the backend,
    # which must return although that task will never have a result.
    import threading

    from hitz.sandbox.docker import DockerBackend, DockerUnavailable
    from hitz.sandbox.spec import SandboxSpec

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'gone.sock'}")
    backend = DockerBackend()
    (tmp_path / "staging").mkdir()
    backend.start(SandboxSpec("gone", ("true",), {}, (), (), str(tmp_path / "staging"),
                              str(tmp_path / "out"), str(tmp_path / "err"), backend="docker",
                              rootfs="docker:x@sha256:" + "0" * 64))
    with pytest.raises(DockerUnavailable):
        backend.wait()
    closer = threading.Thread(target=backend.close, daemon=True)
    closer.start()
    wait_for(lambda: not closer.is_alive(), "close() to return")
    assert backend.running() == 0


def _run_alone(tmp_path: Path, busybox: str, script: str) -> Any:
    """``script``'s SandboxResult, run straight through the backend (the
    reports do not show resource usage)."""
    from hitz.sandbox.docker import DockerBackend
    from hitz.sandbox.spec import SandboxSpec, Status

    (tmp_path / "staging").mkdir(parents=True)
    backend = DockerBackend()
    try:
        backend.start(SandboxSpec("usage", ("/bin/sh", "-c", script), {}, (), (),
                                  str(tmp_path / "staging"), str(tmp_path / "out"),
                                  str(tmp_path / "err"), backend="docker", rootfs=busybox))
        (result,) = backend.wait()
    finally:
        backend.close()
    assert result.status is Status.SUCCEEDED, result
    return result


def test_resource_usage_is_read_from_the_container_cgroup(tmp_path: Path, busybox: str) -> None:
    # 64 MB held in a shell variable, then ~0.3 s and more of busy loop
    # (on the reference machine) while it is still held.
    held = 64_000_000
    script = (f"x=$(head -c {held} /dev/zero | tr '\\0' a); i=0\n"
              "while [ $i -lt 300000 ]; do i=$((i+1)); done; echo ${#x}\n")
    busy = _run_alone(tmp_path / "busy", busybox, script)
    assert (tmp_path / "busy/out").read_text() == f"{held}\n"
    assert busy.usage.user_s > 0.1, busy.usage
    assert busy.usage.max_rss_kib > held // 1024, busy.usage
    # Read at least once (before the go byte): the init's own few pages.
    trivial = _run_alone(tmp_path / "trivial", busybox, "true")
    assert trivial.usage.max_rss_kib > 0, trivial.usage
    assert trivial.usage.user_s < 0.05, trivial.usage
    assert trivial.usage.max_rss_kib < 16 * 1024, trivial.usage
