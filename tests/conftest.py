"""Fixtures shared by the real-kernel tests (security, integration).

``project`` is an empty project folder whose hitz processes are killed at
teardown; ``marker`` is a unique number to put in a task's command line,
and any host process still carrying it at teardown is killed, so a failing
test never leaves a sandbox behind. Both need a kernel that can create the
sandbox's namespaces; on a host that cannot, the tests that use them skip
and say so (and only then).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Project, kill_processes_with, new_marker

# The real REAPI servers (buildbox-casd, BuildGrid) as session fixtures.
pytest_plugins = ("tests.peers",)

# What a sandbox needs from the kernel: a new user namespace (mapping root,
# as hitz does for a task) holding new mount, pid, net, ipc, uts and cgroup
# namespaces.
_UNSHARE = ("unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork",
            "--net", "--ipc", "--uts", "--cgroup", "true")


@pytest.fixture(scope="session")
def kernel_namespaces() -> None:
    """Skip (saying why) when the kernel cannot create a sandbox's namespaces."""
    if shutil.which("unshare") is None:
        pytest.fail("util-linux `unshare` is missing; it is needed to probe the kernel")
    probe = subprocess.run(_UNSHARE, capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(
            "this kernel cannot create user, mount, pid, net, ipc, uts and cgroup "
            f"namespaces (`{' '.join(_UNSHARE)}`: {probe.stderr.strip()})"
        )


@pytest.fixture
def project(tmp_path: Path, kernel_namespaces: None) -> Iterator[Project]:
    root = tmp_path / "proj"
    root.mkdir()
    proj = Project(root)
    yield proj
    proj.close()


@pytest.fixture
def marker() -> Iterator[str]:
    value = new_marker()
    yield value
    kill_processes_with(value)
