"""Expanding declared inputs into files (executor/inputs.py), on real
folders in tmp_path; the exact messages users see are asserted here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hitz.executor.errors import ManifestError, ManifestErrorReason
from hitz.executor.inputs import OutputIndex, expand
from hitz.executor.manifest import load
from hitz.executor.model import Manifest


@pytest.fixture(autouse=True)
def _restore_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(os.getcwd())  # project() changes folder; undone after each test


def project(root: Path, manifest: str, files: dict[str, str]) -> Manifest:
    """Write a project and load its manifest as `hitz.toml`, as a user in its
    folder would."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    (root / "hitz.toml").write_text(manifest)
    os.chdir(root)
    return load("hitz.toml")


def files_of(manifest: Manifest, task: str) -> list[str]:
    return expand(manifest, manifest.tasks[task], OutputIndex(manifest))


SOURCES = {
    "src/a.c": "",
    "src/b.c": "",
    "src/sub/c.c": "",
    "src/.hidden.c": "",
    "include/x/y.h": "",
    "data/one.txt": "",
    "data/.dot": "",
    ".hitz/history.json": "",
}


def test_star_stays_in_one_folder_and_skips_hidden_names(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = ["src/*.c"]\n', SOURCES)
    assert files_of(m, "t") == ["src/a.c", "src/b.c"]


def test_double_star_spans_folders(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = ["**/*.h", "src/**/*.c"]\n',
                SOURCES)
    assert files_of(m, "t") == ["include/x/y.h", "src/a.c", "src/b.c", "src/sub/c.c"]


def test_a_folder_brings_its_whole_tree_hidden_files_included(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = ["data/"]\n', SOURCES)
    assert files_of(m, "t") == ["data/.dot", "data/one.txt"]


def test_outputs_of_any_task_are_never_matched(tmp_path: Path) -> None:
    m = project(
        tmp_path,
        '[tasks.gen]\nrun = "true"\noutputs = ["src/gen.c", "src/out/"]\n\n'
        '[tasks.t]\nrun = "true"\ninputs = ["src/**/*.c"]\n',
        {**SOURCES, "src/gen.c": "stale", "src/out/z.c": "stale"},
    )
    assert files_of(m, "t") == ["src/a.c", "src/b.c", "src/sub/c.c"]


def test_a_glob_matching_nothing_names_the_line(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = [\n  "src/*.c",\n  "lib/*.c",\n]\n',
                SOURCES)
    with pytest.raises(ManifestError) as caught:
        files_of(m, "t")
    assert caught.value.message == 'hitz.toml:5: task "t": input glob "lib/*.c" matches no file'
    assert caught.value.hint == "paths are relative to the folder of hitz.toml"
    assert caught.value.reason is ManifestErrorReason.NO_MATCH


def test_a_missing_literal_input(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = ["src/nope.c"]\n', SOURCES)
    with pytest.raises(ManifestError) as caught:
        files_of(m, "t")
    assert caught.value.message == 'hitz.toml:3: task "t": input "src/nope.c" does not exist'


def test_naming_another_tasks_output_suggests_the_task_input(tmp_path: Path) -> None:
    m = project(
        tmp_path,
        '[tasks.gen]\nrun = "true"\noutputs = ["build/gen.h"]\n\n'
        '[tasks.t]\nrun = "true"\ninputs = ["build/gen.h"]\n',
        {"build/gen.h": "stale"},
    )
    with pytest.raises(ManifestError) as caught:
        files_of(m, "t")
    assert caught.value.message == (
        'hitz.toml:7: task "t": input "build/gen.h" names an output of task "gen"'
    )
    assert caught.value.hint == 'write ":gen" in `inputs` to use the outputs of that task'


def test_a_symlink_out_of_the_project_is_refused(tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("secret")
    m = project(tmp_path / "p", '[tasks.t]\nrun = "true"\ninputs = ["src/"]\n', {"src/a.c": ""})
    os.symlink(outside, tmp_path / "p" / "src" / "link.c")
    with pytest.raises(ManifestError) as caught:
        files_of(m, "t")
    assert caught.value.message == (
        f'hitz.toml:3: task "t": input "src/link.c" is a symlink to "{outside}", '
        "outside the project"
    )
    assert caught.value.reason is ManifestErrorReason.PATH_ESCAPES


def test_a_symlink_inside_the_project_is_an_input(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = ["src/*.c"]\n', {"src/a.c": ""})
    os.symlink("a.c", tmp_path / "src" / "alias.c")
    assert files_of(m, "t") == ["src/a.c", "src/alias.c"]


def test_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = ["src/*.c"]\n', {"src/a.c": ""})
    os.symlink("gone.c", tmp_path / "src" / "dangling.c")
    with pytest.raises(ManifestError) as caught:
        files_of(m, "t")
    assert caught.value.message == (
        'hitz.toml:3: task "t": input "src/dangling.c" is a dangling symlink'
    )


def test_the_state_folder_is_never_an_input(tmp_path: Path) -> None:
    m = project(tmp_path, '[tasks.t]\nrun = "true"\ninputs = ["**/*.json", "src/a.c"]\n',
                {**SOURCES, "x/y.json": ""})
    assert files_of(m, "t") == ["src/a.c", "x/y.json"]
