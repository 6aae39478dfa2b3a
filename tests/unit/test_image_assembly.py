"""Image definitions (``images_def``) and the reproducible root assembly
(``images_tar``), without a mirror: definitions are written by hand and the
.debs are built on the spot with the real ``dpkg-deb --build``.

The assembly's promise is that the same packages give the same bytes
whatever the files' mtimes, owners and umask were; these tests build the
same package twice with different ones and compare digests and headers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from hitz.executor.errors import ManifestError, ManifestErrorReason
from hitz.executor.images_def import (
    ImageError,
    ImageErrorReason,
    LockedImage,
    LockedPackage,
    find_definition,
    load_definition,
    read_lock,
    write_lock,
)
from hitz.executor.images_tar import EPOCH, assemble, image_path, normal_mode


def _definition(tmp_path: Path, text: str, name: str = "img") -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


# --- definitions -----------------------------------------------------------------------


def test_a_definition_has_defaults_and_keeps_package_lines(tmp_path: Path) -> None:
    path = _definition(tmp_path, 'suite = "bookworm"\npackages = [\n  "gcc",\n  "make",\n]\n'
                       '[symlinks]\n"/usr/bin/cc" = "gcc"\n'
                       '[files."/etc/motd"]\ncontent = "hi\\n"\nmode = "0600"\n')
    found = load_definition(path, "images/img.toml")
    assert found.name == "img"
    assert found.mirror == "http://deb.debian.org/debian"
    assert found.components == ("main",)
    assert found.packages == ("gcc", "make")
    assert found.package_lines == {"gcc": 3, "make": 4}
    assert found.symlinks == {"/usr/bin/cc": "gcc"}
    assert found.files["/etc/motd"].mode == 0o600


def test_an_unknown_key_names_the_file_and_line_and_a_near_key(tmp_path: Path) -> None:
    path = _definition(tmp_path, 'suite = "bookworm"\npackges = ["gcc"]\n')
    with pytest.raises(ManifestError) as caught:
        load_definition(path, "images/img.toml")
    assert caught.value.message == 'images/img.toml:2: unknown key "packges"'
    assert caught.value.hint == 'did you mean "packages"?'
    assert caught.value.reason is ManifestErrorReason.UNKNOWN_KEY


def test_a_bad_package_name_points_at_its_line(tmp_path: Path) -> None:
    path = _definition(tmp_path, 'suite = "bookworm"\npackages = [\n  "gcc",\n  "Bad Name",\n]\n')
    with pytest.raises(ManifestError) as caught:
        load_definition(path, "images/img.toml")
    assert caught.value.line == 4
    assert "packages" in caught.value.message and '"Bad Name"' in caught.value.message
    assert caught.value.detail is not None and "^" in caught.value.detail


def test_a_missing_suite_is_an_error(tmp_path: Path) -> None:
    path = _definition(tmp_path, 'packages = ["gcc"]\n')
    with pytest.raises(ManifestError) as caught:
        load_definition(path, "images/img.toml")
    assert caught.value.reason is ManifestErrorReason.MISSING_KEY
    assert 'missing "suite"' in caught.value.message


@pytest.mark.parametrize("link", ["bin/sh", "/", "/usr/../etc/x", "/usr//bin"])
def test_a_symlink_path_must_be_absolute_and_normal(tmp_path: Path, link: str) -> None:
    path = _definition(tmp_path, f'suite = "bookworm"\npackages = ["gcc"]\n[symlinks]\n'
                       f'"{link}" = "x"\n')
    with pytest.raises(ManifestError) as caught:
        load_definition(path, "images/img.toml")
    assert caught.value.line == 4


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = _definition(tmp_path, 'suite = "bookworm"\npackages = ["gcc"\n')
    with pytest.raises(ManifestError) as caught:
        load_definition(path, "images/img.toml")
    assert caught.value.reason is ManifestErrorReason.TOML_SYNTAX
    assert caught.value.message.startswith("images/img.toml:")


def test_an_unknown_image_suggests_the_nearest(tmp_path: Path) -> None:
    _definition(tmp_path, 'suite = "bookworm"\npackages = ["gcc"]\n', "busybox")
    with pytest.raises(ImageError) as caught:
        find_definition(tmp_path, "busybx")
    assert caught.value.message == "unknown image `busybx`: there is no `images/busybx.toml`"
    assert caught.value.hint == "did you mean `busybox`?"
    assert caught.value.reason is ImageErrorReason.UNKNOWN_IMAGE
    assert caught.value.exit_code == 2


def test_the_lock_file_round_trips_sorted(tmp_path: Path) -> None:
    packages = (LockedPackage("zlib1g", "1:1.2", "amd64", "a" * 64, 10),
                LockedPackage("gcc", "4:12", "amd64", "b" * 64, 20))
    images = {"cc": LockedImage("sha256:" + "c" * 64, "d" * 64, "bookworm", "amd64", packages),
              "bb": LockedImage("sha256:" + "e" * 64, "f" * 64, "bookworm", "amd64",
                                packages[:1])}
    write_lock(tmp_path / "hitz.lock", images)
    text = (tmp_path / "hitz.lock").read_text()
    assert text.index("[images.bb]") < text.index("[images.cc]")
    assert text.index('"gcc"') < text.index('"zlib1g"', text.index("[images.cc]"))
    back = read_lock(tmp_path / "hitz.lock")
    assert back["cc"].digest == images["cc"].digest
    assert {p.name for p in back["cc"].packages} == {"gcc", "zlib1g"}
    assert back["cc"].packages[0].pin == "gcc:amd64=4:12"


def test_a_damaged_lock_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "hitz.lock").write_text("version = 1\n[images.x]\ndigest = 3\n")
    with pytest.raises(ImageError) as caught:
        read_lock(tmp_path / "hitz.lock")
    assert caught.value.reason is ImageErrorReason.BAD_LOCK


# --- the root's assembly ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), [
    ("./", None), ("./bin/sh", "usr/bin/sh"), ("./lib64/ld.so", "usr/lib64/ld.so"),
    ("./etc/", "etc"), ("./usr/bin/gcc", "usr/bin/gcc"), ("./binary/x", "binary/x"),
])
def test_member_paths_are_laid_out_for_a_merged_usr(name: str, path: str | None) -> None:
    assert image_path(name) == path


@pytest.mark.parametrize("name", ["./../etc/passwd", "/etc/passwd", "./a/../../x"])
def test_a_member_outside_the_image_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        image_path(name)


def test_modes_are_normalised() -> None:
    assert normal_mode("file", 0o4755) == 0o755
    assert normal_mode("file", 0o600) == 0o644
    assert normal_mode("file", 0o700) == 0o755
    assert normal_mode("dir", 0o700) == 0o755


def _deb(folder: Path, name: str, files: dict[str, tuple[bytes, int]], *, mtime: int,
         owner: int, links: dict[str, str] | None = None,
         hardlinks: dict[str, str] | None = None) -> Path:
    """A real .deb of ``files`` (path -> (content, mode)), built by dpkg-deb."""
    tree = folder / f"{name}-{mtime}"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n")
    for rel, (content, mode) in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, mode)
    for rel, target in (links or {}).items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tree / rel)
    for rel, source in (hardlinks or {}).items():
        os.link(tree / source, tree / rel)
    for parent, dirs, names in os.walk(tree):
        for entry in [*dirs, *names]:
            path = os.path.join(parent, entry)
            os.lchown(path, owner, owner)
            if not os.path.islink(path):
                os.utime(path, (mtime, mtime))
    out = folder / f"{name}-{mtime}.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(tree), str(out)], check=True,
                   capture_output=True)
    return out


_FILES = {"bin/tool": (b"#!/bin/sh\necho tool\n", 0o4775), "usr/share/doc/a": (b"doc", 0o600),
          "etc/tool.conf": (b"x=1\n", 0o640)}


def _build(tmp_path: Path, label: str, mtime: int, owner: int) -> tuple[str, Path]:
    work = tmp_path / label
    work.mkdir()
    deb = _deb(work, "tool", _FILES, mtime=mtime, owner=owner,
               links={"usr/bin/t": "tool"}, hardlinks={"usr/bin/tool2": "bin/tool"})
    (work / "root").mkdir()
    digest = assemble([("tool", deb)], {"/bin/sh": "tool"}, {}, work / "root",
                      work / "image.tar")
    return digest, work


def test_the_same_packages_give_the_same_bytes_whatever_mtime_and_owner(tmp_path: Path) -> None:
    one, first = _build(tmp_path, "a", 1_600_000_000, 0)
    two, second = _build(tmp_path, "b", 1_700_000_000, 1234)
    assert one == two
    assert (first / "image.tar").read_bytes() == (second / "image.tar").read_bytes()


def test_tar_entries_are_sorted_and_normalised(tmp_path: Path) -> None:
    _, work = _build(tmp_path, "a", 1_600_000_000, 1234)
    with tarfile.open(work / "image.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert {m.mtime for m in members} == {EPOCH}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    by_name = {m.name: m for m in members}
    assert by_name["bin"].issym() and by_name["bin"].linkname == "usr/bin"
    assert by_name["usr/bin/tool"].mode == 0o755  # setuid dropped
    assert by_name["usr/share/doc/a"].mode == 0o644
    assert by_name["usr/bin/tool2"].isreg()  # a hard link became a copy
    assert by_name["usr/bin/sh"].linkname == "tool"  # the definition's symlink
    assert by_name["tmp"].mode == 0o1777


def test_the_unpacked_root_is_read_only_and_matches_the_tar(tmp_path: Path) -> None:
    _, work = _build(tmp_path, "a", 1_600_000_000, 0)
    root = work / "root"
    assert (root / "usr/bin/tool").read_bytes() == _FILES["bin/tool"][0]
    assert os.readlink(root / "bin") == "usr/bin"
    assert not os.stat(root / "usr/bin").st_mode & 0o222
    assert not os.stat(root / "usr/bin/tool").st_mode & 0o222


def test_nothing_is_written_through_a_symlink_of_the_image(tmp_path: Path) -> None:
    from hitz.executor.images_def import FileSpec

    outside = tmp_path / "outside"
    outside.mkdir()
    linker = _deb(tmp_path, "aaa", {}, mtime=1, owner=0, links={"usr/x": str(outside)})
    (tmp_path / "root").mkdir()
    with pytest.raises(ImageError) as caught:
        assemble([("aaa", linker)], {}, {"/usr/x/passwd": FileSpec("pwned", 0o644)},
                 tmp_path / "root", tmp_path / "image.tar")
    assert caught.value.reason is ImageErrorReason.BAD_PACKAGE
    assert "/usr/x, which is a symlink (from aaa)" in caught.value.message
    assert list(outside.iterdir()) == []


def test_a_later_package_s_folder_replaces_an_earlier_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    linker = _deb(tmp_path, "aaa", {}, mtime=1, owner=0, links={"usr/x": str(outside)})
    files = _deb(tmp_path, "bbb", {"usr/x/passwd": (b"pwned", 0o644)}, mtime=1, owner=0)
    (tmp_path / "root").mkdir()
    assemble([("aaa", linker), ("bbb", files)], {}, {}, tmp_path / "root",
             tmp_path / "image.tar")
    assert (tmp_path / "root/usr/x/passwd").read_bytes() == b"pwned"
    assert not (tmp_path / "root/usr/x").is_symlink()
    assert list(outside.iterdir()) == []


_GOOD_PACKAGE = ('{ name = "busybox-static", version = "1:1.35.0-4+b3", architecture = "amd64",'
                 ' size = 10, sha256 = "' + "a" * 64 + '" }')


@pytest.mark.parametrize(("field", "bad"), [
    # Each of these becomes a path in the image cache (debs/SHA256.deb,
    # built/HEX/, apt/SUITE-ARCH-MIRROR/) or an argument of apt-get.
    ("sha256", '"../../../../tmp/planted"'),
    ("digest", '"sha256:../../../tmp/planted"'),
    ("architecture", '"../../x"'),
    ("name", '"-oDir::Etc=/tmp"'),
    ("version", '"1.0 --allow-unauthenticated"'),
    ("suite", '"../../bookworm"'),
    ("definition", '"../x"'),
    ("image name", None),
])
def test_a_lock_file_s_paths_and_arguments_are_checked(tmp_path: Path, field: str,
                                                       bad: str | None) -> None:
    package = _GOOD_PACKAGE
    image = {"digest": '"sha256:' + "c" * 64 + '"', "definition": '"' + "d" * 64 + '"',
             "suite": '"bookworm"', "architecture": '"amd64"'}
    if bad is None:
        pass
    elif field in image:
        image[field] = bad
    else:
        package = package.replace(f'{field} = ', f'{field} = {bad}, _old_{field} = ', 1)
    header = '[images."../bb"]' if field == "image name" else "[images.bb]"
    text = f"version = 1\n{header}\n" + "".join(f"{k} = {v}\n" for k, v in image.items())
    (tmp_path / "hitz.lock").write_text(text + f"packages = [\n  {package},\n]\n")
    with pytest.raises(ImageError) as caught:
        read_lock(tmp_path / "hitz.lock")
    assert caught.value.reason is ImageErrorReason.BAD_LOCK
    assert field in str(caught.value)


def test_a_well_formed_lock_file_still_reads(tmp_path: Path) -> None:
    text = ("version = 1\n[images.bb]\n" f'digest = "sha256:{"c" * 64}"\n'
            f'definition = "{"d" * 64}"\nsuite = "bookworm"\narchitecture = "amd64"\n'
            f"packages = [\n  {_GOOD_PACKAGE},\n]\n")
    (tmp_path / "hitz.lock").write_text(text)
    assert read_lock(tmp_path / "hitz.lock")["bb"].packages[0].version == "1:1.35.0-4+b3"


@pytest.mark.parametrize("name", ["../../../victim/important", "../built", "ABSOLUTE",
                                  "../../../a/../victim/important"])
def test_image_rm_never_removes_anything_outside_the_cache(tmp_path: Path, name: str) -> None:
    # `hitz image rm NAME` used to unlink images/names/NAME whatever NAME
    # was: `hitz image rm ../../../victim/important` deleted that file.
    from hitz.executor.images import remove_image

    if name == "ABSOLUTE":
        name = str(tmp_path / "victim" / "important")

    cache = tmp_path / "cache"
    (cache / "images" / "names").mkdir(parents=True)
    (cache / "images" / "built").mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important").write_text("keep\n")
    (tmp_path / "a").mkdir()
    with pytest.raises(ImageError) as caught:
        remove_image(name, tmp_path, cache)
    assert caught.value.reason is ImageErrorReason.UNKNOWN_IMAGE
    assert (victim / "important").read_text() == "keep\n"
    assert (cache / "images" / "built").is_dir()


def test_image_rm_removes_only_builds_in_the_cache(tmp_path: Path) -> None:
    # names/NAME is a symlink hitz wrote; one that points elsewhere (a
    # hand-edited or damaged cache) must not make `rm` delete that folder.
    from hitz.executor.images import remove_image

    names = tmp_path / "cache" / "images" / "names"
    names.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important").write_text("keep\n")
    (names / "img").symlink_to(victim)
    _definition(tmp_path, 'suite = "bookworm"\npackages = ["busybox-static"]\n')
    assert remove_image("img", tmp_path, tmp_path / "cache") == []
    assert (victim / "important").read_text() == "keep\n"
    assert not (names / "img").is_symlink()
