"""Every security probe runs for every backend where it applies.

Tests that take the ``project`` fixture run twice: in the namespace sandbox
and in a Docker container (``backend = "docker"``). A probe that guards a
property only one backend has is marked ``namespace_only("why")`` and runs
once; the reason is part of the test's definition, so review sees it.

The docker runs use a probe image built here from the host's own programs
(bash, perl with perl-base, coreutils, util-linux, iproute2, grep...) and
their libraries, so a probe prints the same words in both backends. The
engine must answer: these tests never skip for want of one (see
tests/integration/test_docker.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Project

BACKENDS = ("namespace", "docker")

# What the probes run, found on the host's PATH.
_PROGRAMS = (
    "bash", "sh", "perl", "cat", "ls", "cp", "chmod", "rm", "mknod", "tr", "cut", "hostname",
    "grep", "wc", "head", "tail", "du", "seq", "sleep", "ip", "unshare", "mount", "umount",
    "readlink", "env", "id", "touch", "mkdir", "kill", "stat", "true", "false", "echo", "dd",
    "sort",
)
_TREES = ("/usr/lib/x86_64-linux-gnu/perl-base", "/usr/lib/aarch64-linux-gnu/perl-base")
_MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "namespace_only(reason): a probe of a property only the namespace "
                   "backend has; not run for the docker backend")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "project" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("namespace_only")
    backends = ("namespace",) if only else BACKENDS
    metafunc.parametrize("backend", backends, scope="function")


@pytest.fixture
def project(tmp_path: Path, kernel_namespaces: None, backend: str,
            request: pytest.FixtureRequest) -> Iterator[Project]:
    """An empty project; for the docker backend, every probe's task runs in
    the probe image (``Project.sandbox`` holds the task keys to add)."""
    root = tmp_path / "proj"
    root.mkdir()
    proj = Project(root)
    if backend == "docker":
        image = request.getfixturevalue("probe_image")
        proj.sandbox = {"backend": "docker", "rootfs": image}  # type: ignore[attr-defined]
    yield proj
    proj.close()


def sandbox_keys(project: Project) -> dict[str, Any]:
    """The task keys that put a probe in ``project``'s backend."""
    return dict(getattr(project, "sandbox", {}))


def is_docker(project: Project) -> bool:
    return sandbox_keys(project).get("backend") == "docker"


def _libraries(path: str) -> list[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                found.append(target)
        elif parts and parts[0].startswith("/"):
            found.append(parts[0])  # the dynamic loader
    return found


@pytest.fixture(scope="session")
def probe_image() -> str:
    """``docker:NAME@sha256:ID`` of an image made of the host's probe tools."""
    from hitz.sandbox.docker import connect
    from hitz.sandbox.errors import SandboxError

    try:
        client = connect()
    except SandboxError as exc:
        pytest.fail(f"{exc.message}\nhint: {exc.hint}\n(scripts/test starts an engine: "
                    "`source scripts/_common.sh; source scripts/_docker.sh; ensure_docker`)")
    files: set[str] = set()  # real files, and symlinks under their real folder
    for name in _PROGRAMS:
        found = shutil.which(name, path="/usr/bin:/usr/sbin:/bin:/sbin")
        if found is not None:
            for path in (found, *_libraries(os.path.realpath(found))):
                files.add(os.path.realpath(path))
                # /usr/bin/sh -> dash, /usr/lib64/ld-linux-x86-64.so.2 -> ...: keep the link
                files.add(os.path.join(os.path.realpath(os.path.dirname(path)),
                                       os.path.basename(path)))
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 315532800
            tar.addfile(info)

        for link, target in _MERGED.items():
            info = tarfile.TarInfo(link)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 315532800
            tar.addfile(info)
        made: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder not in made and folder not in _MERGED:
                    made.add(folder)
                    add_dir(folder)
            tar.add(path, arcname=path.lstrip("/"), recursive=False)
        for tree in _TREES:
            if os.path.isdir(tree):
                tar.add(tree, arcname=tree.lstrip("/"))
        for name, text in (("etc/passwd", "root:x:0:0:root:/tmp:/bin/sh\n"
                                          "nobody:x:65534:65534:nobody:/nonexistent:"
                                          "/usr/sbin/nologin\n"),
                           ("etc/group", "root:x:0:\nnogroup:x:65534:\n")):
            if "etc" not in made:
                made.add("etc")
                add_dir("etc")
            content = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 315532800
            tar.addfile(info, io.BytesIO(content))
    # Tagged by content and imported once: `docker import` makes a new image
    # ID each time, and moving the tag would take it from an image a
    # concurrent test session is using.
    name = "hitz-test-security/probe"
    tag = hashlib.sha256(data.getvalue()).hexdigest()[:16]
    try:
        if not client.api.images(name=f"{name}:{tag}", quiet=True):
            client.api.import_image_from_data(data.getvalue(), repository=name, tag=tag)
        image_id = client.api.inspect_image(f"{name}:{tag}")["Id"]
    finally:
        client.close()
    return f"docker:{name}@{image_id}"
