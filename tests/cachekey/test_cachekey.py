"""Golden cache keys: every task of the manifests in this folder keeps its key.

Each folder here holding a ``hitz.toml`` is a small project (the manifest and
the input files it needs) with one ``<task>.expected`` file per task: the
task's action digest as ``hash/size``. The test copies each project to a
temporary folder (so the checkout path cannot matter, and the repository
stays clean), computes every key through the real code path (``load`` the
manifest, ``Runner.key_for``), and compares. Tasks that need another task's
outputs get them the real way: by running ``hitz run`` on their dependencies
first.

Two things of the host are part of a key and differ between machines, so they
are pinned here, and only here: the rootfs identity (``hitz.rootfs``, digests
of /etc/os-release and the package database) is set to ``host:golden``, and
the ISA (``platform.machine()``) to ``x86_64``.

A task whose key moved gets a ``<task>.actual`` file and the test fails listing
every moved task; README.md says how to accept an intended change.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import pytest

from hitz.executor.manifest import load
from hitz.executor.runner import Runner, state_dir_for
from tests.helpers import Project

HERE = Path(__file__).resolve().parent
CASES = sorted(p.parent.name for p in HERE.glob("*/hitz.toml"))
GOLDEN_ROOTFS = "host:golden"
GOLDEN_MACHINE = "x86_64"

# Git keeps only the executable bit, and a checkout may not even keep that
# (core.fileMode = false), so the copy sets every mode: 0644, or 0755 for these.
EXECUTABLE = {"basic": {"tools/gen.sh"}}


def copy_case(case: str, dest: Path) -> Path:
    """The project ``case`` as a fresh checkout under ``dest``, modes set."""
    root = dest / case
    shutil.copytree(HERE / case, root, ignore=shutil.ignore_patterns("*.expected", "*.actual"))
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            path.chmod(0o755 if rel in EXECUTABLE.get(case, set()) else 0o644)
    return root


def compute_keys(root: Path) -> dict[str, str]:
    """Every task's action digest, dependencies run first by the real `hitz run`."""
    manifest = load(root / "hitz.toml")
    needed = sorted({dep for task in manifest.tasks.values() for dep in task.deps})
    if needed:
        result = Project(root).run(*needed)
        assert result.returncode == 0, f"running the dependencies failed:\n{result}"
    runner = Runner(manifest, state_dir_for(manifest))
    runner._rootfs = GOLDEN_ROOTFS  # the host's identity, pinned (see the module docstring)
    return {name: str(runner.key_for(task)[0].digest) for name, task in manifest.tasks.items()}


def test_there_are_golden_cases() -> None:
    assert CASES == ["basic", "defaults", "deps"]


def test_cache_keys_match_the_golden_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_namespaces: None
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: GOLDEN_MACHINE)
    moved: list[str] = []
    for case in CASES:
        keys = compute_keys(copy_case(case, tmp_path))
        for name, key in keys.items():
            expected = HERE / case / f"{name}.expected"
            actual = HERE / case / f"{name}.actual"
            want = expected.read_text().strip() if expected.exists() else None
            if key == want:
                actual.unlink(missing_ok=True)
                continue
            actual.write_text(key + "\n")
            moved.append(f"{case}/{name}: {want or '(no .expected file)'} -> {key}")
        stale = sorted(p.stem for p in (HERE / case).glob("*.expected") if p.stem not in keys)
        moved.extend(f"{case}/{name}: .expected names no task of the manifest" for name in stale)
    assert not moved, (
        f"the cache keys of {len(moved)} task(s) moved:\n  " + "\n  ".join(moved)
        + f"\n<task>.actual files hold the new keys (in {HERE}); if the change is "
        "intended, follow tests/cachekey/README.md to accept it"
    )
