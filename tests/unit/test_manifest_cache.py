"""The validated-manifest cache: same bytes give the same Manifest without
parsing again; anything else is a miss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hitz.executor.errors import ManifestError
from hitz.executor.manifest import load

MANIFEST = """\
[project]
name = "demo"

[defaults]
timeout = "90s"
env = { LANG = "C.UTF-8" }

[tasks.gen]
run = "echo hi > out/gen.txt"
outputs = ["out/gen.txt"]

[tasks.use]
run = ["cat", "out/gen.txt"]
inputs = [":gen", "src/*.c"]
network = "host"
"""


def write(tmp_path: Path, text: str = MANIFEST) -> Path:
    path = tmp_path / "hitz.toml"
    path.write_text(text)
    return path


def test_a_cached_manifest_equals_a_freshly_validated_one(tmp_path: Path) -> None:
    path = write(tmp_path)
    fresh = load(path)
    first = load(path, cache_dir=tmp_path / ".hitz")
    assert (tmp_path / ".hitz" / "manifest.json").exists()
    second = load(path, cache_dir=tmp_path / ".hitz")
    for manifest in (first, second):
        assert manifest.tasks == fresh.tasks
        assert manifest.project == fresh.project
        assert manifest.root == fresh.root
    assert second.line_of("tasks", "use", "network") == 15


def test_the_cache_is_used_without_parsing_again(tmp_path: Path) -> None:
    path = write(tmp_path)
    load(path, cache_dir=tmp_path / ".hitz")
    cache = tmp_path / ".hitz" / "manifest.json"
    data = json.loads(cache.read_text())
    data["project"] = "from-the-cache"
    cache.write_text(json.dumps(data))
    assert load(path, cache_dir=tmp_path / ".hitz").project == "from-the-cache"


def test_changed_bytes_are_validated_again(tmp_path: Path) -> None:
    path = write(tmp_path)
    load(path, cache_dir=tmp_path / ".hitz")
    write(tmp_path, MANIFEST.replace('timeout = "90s"', "timeout = 5"))
    with pytest.raises(ManifestError, match=r'"timeout" must be a duration'):
        load(path, cache_dir=tmp_path / ".hitz")


@pytest.mark.parametrize("garbage", ["", "{", '{"key": 1}', "[]", '{"key": "x", "tasks": 3}'])
def test_a_corrupt_cache_is_a_miss(tmp_path: Path, garbage: str) -> None:
    path = write(tmp_path)
    (tmp_path / ".hitz").mkdir()
    (tmp_path / ".hitz" / "manifest.json").write_text(garbage)
    assert load(path, cache_dir=tmp_path / ".hitz").tasks == load(path).tasks


def test_a_corrupt_cache_with_the_right_key_is_a_miss(tmp_path: Path) -> None:
    path = write(tmp_path)
    load(path, cache_dir=tmp_path / ".hitz")
    cache = tmp_path / ".hitz" / "manifest.json"
    data = json.loads(cache.read_text())
    data["tasks"][0] = data["tasks"][0][:3]  # a row with missing fields
    cache.write_text(json.dumps(data))
    assert load(path, cache_dir=tmp_path / ".hitz").tasks == load(path).tasks


def test_an_unwritable_cache_folder_only_loses_the_speed_up(tmp_path: Path) -> None:
    path = write(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert load(path, cache_dir=blocker).tasks == load(path).tasks


def test_the_cache_keeps_the_remote_token_and_ca_settings(tmp_path: Path) -> None:
    path = write(tmp_path, MANIFEST + '\n[remote]\nexecutor = "grpcs://build.example.com:443"\n'
                 'instance = "ci"\ntoken_file = "secrets/token"\nca_file = "ca.pem"\n')
    load(path, cache_dir=tmp_path / ".hitz")
    cached = json.loads((tmp_path / ".hitz" / "manifest.json").read_text())
    assert cached["remote"] == ["grpcs://build.example.com:443", "ci", None, "secrets/token",
                                "ca.pem"]
    again = load(path, cache_dir=tmp_path / ".hitz")
    assert (again.remote_executor, again.remote_instance, again.remote_token_env,
            again.remote_token_file, again.remote_ca_file) == (
        "grpcs://build.example.com:443", "ci", None, "secrets/token", "ca.pem")
