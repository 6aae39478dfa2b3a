"""The C helpers are named by the digest of everything they are compiled
from, so a change to a shared header rebuilds every helper that includes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hitz.sandbox.errors import SandboxUnavailable
from hitz.sandbox.namespace import build

SANDBOX = Path(build.__file__).resolve().parent.parent


def copy_sources(to: Path) -> tuple[Path, Path]:
    """launcher.c and docker_init.c laid out as installed, with landlock.h."""
    (to / "namespace").mkdir()
    launcher = Path(shutil.copy(SANDBOX / "namespace" / "launcher.c", to / "namespace"))
    init = Path(shutil.copy(SANDBOX / "docker_init.c", to))
    shutil.copy(SANDBOX / "landlock.h", to)
    return launcher, init


def test_both_helpers_include_the_landlock_header() -> None:
    for source in (SANDBOX / "namespace" / "launcher.c", SANDBOX / "docker_init.c"):
        included = build._QUOTE_INCLUDE.findall(source.read_bytes())
        assert [(source.parent / name.decode()).resolve() for name in included] == [
            (SANDBOX / "landlock.h").resolve()], source


def test_a_change_to_the_shared_header_renames_both_helpers(tmp_path: Path) -> None:
    launcher, init = copy_sources(tmp_path)
    before = build.source_digest(launcher), build.source_digest(init)
    header = tmp_path / "landlock.h"
    header.write_text(header.read_text() + "/* changed */\n")
    after = build.source_digest(launcher), build.source_digest(init)
    assert after[0] != before[0] and after[1] != before[1]


def test_the_digest_depends_on_the_content_not_the_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = copy_sources(tmp_path / "a")
    second = copy_sources(tmp_path / "b")
    assert [build.source_digest(p) for p in first] == [build.source_digest(p) for p in second]
    assert build.source_digest(first[0]) != build.source_digest(first[1])


def test_a_missing_header_is_an_error_in_words(tmp_path: Path) -> None:
    launcher, _ = copy_sources(tmp_path)
    (tmp_path / "landlock.h").unlink()
    with pytest.raises(SandboxUnavailable) as caught:
        build.helper_path(launcher, "hitz-launch", "the sandbox launcher", static_only=False)
    assert caught.value.message == (
        f"cannot read the source of the sandbox launcher: {(tmp_path / 'landlock.h').resolve()}: "
        "No such file or directory")


def test_a_cc_that_names_no_program_is_an_error_in_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, init = copy_sources(tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(SandboxUnavailable) as caught:
        build.helper_path(init, "hitz-docker-init", "hitz's container init", static_only=True)
    assert caught.value.message == (
        f"cannot build hitz's container init: CC names `{tmp_path / 'no-such-cc'}`, "
        "which is not a program")
    assert not list(tmp_path.glob("*hitz-docker-init-*"))


def test_the_container_init_is_built_static_from_its_source_and_header(tmp_path: Path) -> None:
    _, init = copy_sources(tmp_path)
    path = Path(build.helper_path(init, "hitz-docker-init", "hitz's container init",
                                  static_only=True))
    assert path == tmp_path / f"hitz-docker-init-{build.source_digest(init)}"
    # A static executable has no program interpreter (PT_INTERP, type 3).
    data = path.read_bytes()
    assert data[:5] == b"\x7fELF\x02"  # ELF, 64-bit: the offsets below
    phoff, phentsize, phnum = (int.from_bytes(data[0x20:0x28], "little"),
                               int.from_bytes(data[0x36:0x38], "little"),
                               int.from_bytes(data[0x38:0x3A], "little"))
    types = [int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little")
             for i in range(phnum)]
    assert 3 not in types and 1 in types
