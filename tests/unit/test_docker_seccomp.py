"""The docker backend's seccomp profiles mean what the namespace backend's
mean: the rendered Docker JSON, compiled back to BPF by the namespace
backend's own compiler of Docker profiles, gives the very same program."""

from __future__ import annotations

import json
from pathlib import Path

from hitz.sandbox.docker_seccomp import LANDLOCK_SYSCALLS, render_default, render_strict
from hitz.sandbox.namespace.seccomp import compile_default, compile_docker, compile_strict


def compiled(tmp_path: Path, text: str) -> bytes:
    path = tmp_path / "profile.json"
    path.write_text(text)
    return compile_docker(str(path), text, ())


def test_default_profile_is_the_same_program_in_both_backends(tmp_path: Path) -> None:
    assert compiled(tmp_path, render_default()) == compile_default()


def test_strict_profile_is_the_same_program_but_for_landlock(tmp_path: Path) -> None:
    profile = json.loads(render_strict())
    landlock = {"names": list(LANDLOCK_SYSCALLS), "action": "SCMP_ACT_ALLOW"}
    assert profile["syscalls"][-1] == landlock  # docker_init.c applies Landlock under it
    profile["syscalls"].pop()
    assert compiled(tmp_path, json.dumps(profile)) == compile_strict()


def test_a_rendered_profile_is_stable_text() -> None:
    assert render_default() == render_default.__wrapped__()
    assert json.loads(render_default())["defaultAction"] == "SCMP_ACT_ALLOW"
    assert json.loads(render_strict())["defaultErrnoRet"] == 1
