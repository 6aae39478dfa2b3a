"""Shared helpers for the tests that run hitz against the real kernel.

A ``Project`` is a folder in ``tmp_path`` with a ``hitz.toml``; its ``hitz``
method runs the real command line (``python -m hitz.executor``) as a
subprocess with a guard timeout, and ``run`` adds ``--json`` and parses the
summary. ``task`` and ``manifest`` write TOML without quoting mistakes (every
value goes through ``json.dumps``, whose strings and arrays are valid TOML).

Processes a test starts inside a sandbox are found on the host by a unique
marker in their command line (``processes_with``), e.g. ``sleep 81234567``:
the sandbox's pid namespace hides the host from the task, not the task from
the host.

Nothing here sleeps for a fixed time: ``wait_for`` polls a condition until a
generous deadline and fails the test if the deadline passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
HITZ = (sys.executable, "-m", "hitz.executor")

# Guards, not expectations: a hitz command here takes well under a second;
# these only stop a hung run from hanging the test session.
COMMAND_GUARD_S = 60.0
EXIT_GUARD_S = 15.0  # for hitz (or a sandbox) to go away once told to

T = TypeVar("T")


# --- manifests ------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A string, list of strings or table of strings as TOML (via JSON)."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def task(
    name: str,
    run: str | Sequence[str],
    *,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    deps: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: str | None = None,
    network: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """One ``[tasks.NAME]`` table. A string ``run`` is a shell command, a list an argv;
    ``extra`` adds any other keys (``seccomp``, ``limits``...)."""
    lines = [f"[tasks.{name}]", f"run = {toml_value(run if isinstance(run, str) else list(run))}"]
    for key, value in (("inputs", inputs), ("outputs", outputs), ("deps", deps)):
        if value:
            lines.append(f"{key} = {toml_value(list(value))}")
    if env:
        lines.append(f"env = {toml_value(env)}")
    if timeout is not None:
        lines.append(f"timeout = {toml_value(timeout)}")
    if network is not None:
        lines.append(f"network = {toml_value(network)}")
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def manifest(*tasks: str, project: str | None = None) -> str:
    head = f"[project]\nname = {toml_value(project)}\n\n" if project else ""
    return head + "\n".join(tasks)


# --- running hitz -----------------------------------------------------------------


@dataclass
class Completed:
    """A finished hitz command."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout is not a JSON summary ({exc}):\n{self}") from None
        return document

    def task(self, name: str) -> dict[str, Any]:
        """The ``--json`` summary's entry for task ``name``."""
        for entry in self.json()["tasks"]:
            if entry["name"] == name:
                return dict(entry)
        raise AssertionError(f"task {name!r} is not in the summary:\n{self}")

    def __str__(self) -> str:
        return (
            f"$ hitz {' '.join(self.args)}\n[exit status {self.returncode}]\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


@dataclass
class Project:
    """A project folder in which hitz is run (cwd), with ``hitz.toml`` as manifest."""

    root: Path
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def write(self, rel: str, text: str = "", mode: int | None = None) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if mode is not None:
            path.chmod(mode)
        return path

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def write_manifest(self, *tasks: str, project: str | None = None) -> None:
        self.write("hitz.toml", manifest(*tasks, project=project))

    def hitz(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        guard_s: float = COMMAND_GUARD_S,
    ) -> Completed:
        """Run ``hitz ARGS`` in the project folder; fail the test if it hangs."""
        try:
            proc = subprocess.run(
                [*HITZ, *args],
                cwd=self.root,
                env=_hitz_env(env, self.root),
                capture_output=True,
                text=True,
                timeout=guard_s,
                pass_fds=pass_fds,
                preexec_fn=_default_signals,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"`hitz {' '.join(args)}` did not finish within the {guard_s:g}s guard\n"
                f"--- stderr so far\n{_text(exc.stderr)}"
            )
        return Completed(list(args), proc.returncode, proc.stdout, proc.stderr)

    def run(self, *args: str, **kwargs: Any) -> Completed:
        """``hitz run --config hitz.toml --json ARGS``."""
        return self.hitz("run", "--config", "hitz.toml", "--json", *args, **kwargs)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start ``hitz run --config hitz.toml --json ARGS`` without waiting, in a
        session of its own so a test can signal it alone (as a terminal's
        Ctrl-C would signal only the foreground job)."""
        proc = subprocess.Popen(
            [*HITZ, "run", "--config", "hitz.toml", "--json", *args],
            cwd=self.root,
            env=_hitz_env(None, self.root),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_default_signals,
        )
        self.started.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen[str], guard_s: float = EXIT_GUARD_S) -> Completed:
        """Wait for a started hitz to exit; fail the test if it does not."""
        try:
            stdout, stderr = proc.communicate(timeout=guard_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"hitz (pid {proc.pid}) was still running {guard_s:g}s after the test "
                        "expected it to exit")
        args = [str(arg) for arg in proc.args][len(HITZ):]  # type: ignore[union-attr]
        return Completed(args, proc.returncode, stdout, stderr)

    def log(self, result: Completed, name: str, stream: str) -> str:
        """A task's ``stdout`` or ``stderr`` log, found by the paths the summary
        lists ("" when hitz kept none because the stream was empty)."""
        for path in result.task(name)["logs"]:
            if path.endswith("." + stream):
                return Path(path).read_text(errors="replace")
        return ""

    def snapshot(self) -> dict[str, str]:
        """Every path of the project except hitz's state folder, with its
        content (files), target (symlinks) or "<dir>"."""
        found: dict[str, str] = {}
        for folder, dirs, files in os.walk(self.root):
            rel_folder = os.path.relpath(folder, self.root)
            if rel_folder == ".":
                dirs[:] = [d for d in dirs if d != ".hitz"]
            for name in dirs + files:
                path = os.path.join(folder, name)
                rel = os.path.normpath(os.path.join(rel_folder, name))
                if os.path.islink(path):
                    found[rel] = "-> " + os.readlink(path)
                elif os.path.isdir(path):
                    found[rel] = "<dir>"
                else:
                    found[rel] = Path(path).read_text(errors="replace")
        return found

    def close(self) -> None:
        """Kill whatever hitz this project started and the test left running."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _hitz_env(extra: Mapping[str, str] | None, root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    # Each project its own cache: a result one test cached must not make
    # another test's task a cache hit that never runs its sandbox.
    env["HITZ_CACHE_DIR"] = str(root.parent / f"{root.name}.hitz-cache")
    env.update(extra or {})
    return env


def _default_signals() -> None:
    """In the child before exec: hitz must meet SIGINT and SIGTERM with their
    default dispositions, as from a shell, even if pytest was started with
    them ignored (a background job of a non-interactive shell ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


# --- host processes ---------------------------------------------------------------


def new_marker() -> str:
    """A number to put in a task's command line (as ``sleep MARKER1``) that no
    other process on the host carries; long enough that ``sleep`` never ends."""
    return str(random.randrange(10**7, 10**8))


def processes_with(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live host process whose command line
    contains ``marker``. Zombies have an empty command line and are not listed."""
    found = []
    needle = marker.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in cmdline:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def kill_processes_with(marker: str) -> None:
    """SIGKILL every process carrying ``marker`` (a test's own leftovers)."""
    for pid, _ in processes_with(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], T], what: str, guard_s: float = EXIT_GUARD_S) -> T:
    """Poll ``condition`` until it returns something truthy and return that;
    fail the test naming ``what`` if ``guard_s`` seconds pass first."""
    deadline = time.monotonic() + guard_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"gave up after {guard_s:g}s waiting for {what}")
        time.sleep(0.02)


# Mounts the Docker engine makes for its containers (overlay roots, network
# namespaces): they come and go with containers that are not this test's.
_DOCKER_MOUNTS = ("/var/lib/docker/", "/run/docker/")


def mountinfo() -> list[str]:
    """This process's mount table, one line per mount, sorted, without the
    Docker engine's own mounts."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    return sorted(line for line in lines
                  if not line.split(" ")[4].startswith(_DOCKER_MOUNTS))

