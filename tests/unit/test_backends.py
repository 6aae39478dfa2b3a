"""The router in front of the sandbox backends (executor/backends.py), with
recording fakes: lazy creation, dispatch by ``spec.backend``, task ->
backend memory, and waiting on several busy backends."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hitz.executor.backends import Router
from hitz.executor.errors import SandboxError
from hitz.sandbox.spec import SandboxSpec, Status
from tests.fakes.backend import FakeBackend


def spec(task: str, backend: str) -> SandboxSpec:
    return SandboxSpec(task=task, argv=("true",), env={}, inputs=(), outputs=(),
                       staging_dir="/nonexistent", stdout_path="/nonexistent",
                       stderr_path="/nonexistent", backend=backend)


def router() -> tuple[Router, dict[str, FakeBackend], list[str]]:
    made: dict[str, FakeBackend] = {}
    order: list[str] = []

    def factory(name: str) -> FakeBackend:
        order.append(name)
        made[name] = FakeBackend()
        return made[name]

    return Router({"namespace": lambda: factory("namespace"),
                   "docker": lambda: factory("docker")}), made, order


def test_backends_are_made_on_first_use_only() -> None:
    r, made, order = router()
    assert r.running() == 0 and r.wait(0) == []
    r.start(spec("a", "docker"))
    r.start(spec("b", "docker"))
    assert order == ["docker"]
    assert made["docker"].started == ["a", "b"]
    r.close()
    assert made["docker"].closed


def test_a_run_without_sandboxed_tasks_imports_no_backend() -> None:
    # In a fresh interpreter: this one may have imported them already.
    code = (
        "import sys\n"
        "from hitz.executor.backends import Router\n"
        "r = Router(); r.wait(0); r.cancel_all(); r.close()\n"
        "print(sorted(m for m in ('docker', 'hitz.sandbox.docker', 'hitz.sandbox.namespace')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == "[]\n"


def test_release_and_cancel_go_to_the_backend_that_holds_the_task() -> None:
    r, made, _ = router()
    r.prestart(spec("n", "namespace"))
    r.prestart(spec("d", "docker"))
    r.release("d")
    r.cancel("n")
    assert made["docker"].started == ["d"]
    assert made["namespace"].held == {} and made["namespace"].started == []
    results = {res.task: res.status for _ in range(2) for res in r.wait()}
    assert results == {"d": Status.SUCCEEDED, "n": Status.CANCELLED}
    assert r.running() == 0


def test_wait_returns_results_from_every_busy_backend() -> None:
    r, _, _ = router()
    made_ns = r.backend("namespace")
    assert isinstance(made_ns, FakeBackend)
    made_ns.fail("n", 2)
    r.start(spec("n", "namespace"))
    r.start(spec("d", "docker"))
    seen = {}
    while r.running():
        for res in r.wait():
            seen[res.task] = (res.status, res.exit_code)
    assert seen == {"n": (Status.FAILED, 2), "d": (Status.SUCCEEDED, 0)}


def test_cancel_all_reaches_every_backend_and_close_closes_them_all() -> None:
    r, made, _ = router()
    r.start(spec("n", "namespace"))
    r.prestart(spec("d", "docker"))
    r.cancel_all()
    assert made["namespace"].cancel_calls == 1 and made["docker"].cancel_calls == 1
    r.close()
    assert made["namespace"].closed and made["docker"].closed


def test_close_closes_the_others_when_one_fails() -> None:
    class Broken(FakeBackend):
        def close(self) -> None:
            raise SandboxError("engine gone")

    kept = FakeBackend()
    r = Router({"namespace": Broken, "docker": lambda: kept})
    r.start(spec("n", "namespace"))
    r.start(spec("d", "docker"))
    with pytest.raises(SandboxError, match="engine gone"):
        r.close()
    assert kept.closed


def test_an_unknown_backend_is_an_error_in_words() -> None:
    r, _, _ = router()
    with pytest.raises(SandboxError, match="unknown sandbox backend `nope`"):
        r.start(spec("x", "nope"))


def test_remote_without_an_executor_says_how_to_set_one() -> None:
    r = Router()
    with pytest.raises(SandboxError, match="needs a remote executor") as info:
        r.start(spec("x", "remote"))
    assert info.value.hint is not None and "--remote-executor" in info.value.hint


def test_a_registered_factory_serves_its_backend() -> None:
    r, _, _ = router()
    remote = FakeBackend()
    r.register("remote", lambda: remote)
    r.start(spec("x", "remote"))
    assert remote.started == ["x"]
