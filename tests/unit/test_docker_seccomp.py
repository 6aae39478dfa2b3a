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


def test_a_profile_file_gets_the_landlock_calls_only_when_it_would_refuse_them(
        tmp_path: Path) -> None:
    # hitz's container init applies Landlock after the engine installed the
    # profile (the namespace launcher: before), so an allow-list that does
    # not name the Landlock calls gets them; anything else passes as written.
    from hitz.sandbox.docker import seccomp_option
    from hitz.sandbox.policy import Landlock, Policy, Seccomp

    def option(profile: dict[str, object], landlock: Landlock = Landlock.REQUIRED) -> object:
        path = tmp_path / "p.json"
        path.write_text(json.dumps(profile))
        return json.loads(seccomp_option(
            Policy(Seccomp.PROFILE, landlock=landlock, seccomp_profile=str(path)), "t"))

    allow_list = {"defaultAction": "SCMP_ACT_ERRNO",
                  "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    assert option(allow_list)["syscalls"][-1] == {"names": list(LANDLOCK_SYSCALLS),
                                                  "action": "SCMP_ACT_ALLOW"}
    assert option(allow_list, Landlock.OFF) == allow_list
    deny_list = {"defaultAction": "SCMP_ACT_ALLOW",
                 "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}
    assert option(deny_list) == deny_list
    refuses = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["landlock_create_ruleset"], "action": "SCMP_ACT_ERRNO"}]}
    assert option(refuses) == refuses
