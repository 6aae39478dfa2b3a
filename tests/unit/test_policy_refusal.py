"""Fail closed: a policy the host cannot enforce is refused, with a hint
naming the manifest key that would allow running with less. The host's
answers (Landlock ABI, who we are) are replaced here; the real probes are
tested by `hitz doctor` and the security suite."""

from __future__ import annotations

import pytest

from hitz.sandbox import hostcheck, landlock
from hitz.sandbox.errors import SandboxErrorReason, SandboxUnavailable
from hitz.sandbox.policy import Landlock, Limits, Policy, Seccomp


def test_required_landlock_on_a_kernel_without_it_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(landlock, "landlock_abi", lambda: 0)
    with pytest.raises(SandboxUnavailable) as caught:
        hostcheck.check_namespace_policy("build", Policy())
    assert caught.value.message == "task `:build` needs Landlock; this kernel has none"
    assert caught.value.hint is not None
    assert 'landlock = "best-effort"' in caught.value.hint
    assert caught.value.reason is SandboxErrorReason.UNAVAILABLE


def test_best_effort_landlock_runs_on_a_kernel_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(landlock, "landlock_abi", lambda: 0)
    assert hostcheck.check_namespace_policy("build", Policy(landlock=Landlock.BEST_EFFORT)) is None


def test_cgroup_limits_without_the_right_to_create_cgroups_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hostcheck.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(hostcheck.os, "access", lambda path, mode: False)
    with pytest.raises(SandboxUnavailable) as caught:
        hostcheck.check_namespace_policy("build", Policy(limits=Limits(memory=1 << 30)))
    assert caught.value.message == (
        "task `:build` asks for memory, pids or cpu limits, which need cgroups this user "
        "cannot create"
    )


def test_an_enforceable_policy_passes() -> None:
    assert hostcheck.check_namespace_policy("build", Policy(seccomp=Seccomp.DEFAULT)) is None
