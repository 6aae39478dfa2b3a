"""Images of images/, built for real: Debian's mirror through the host's apt,
the real dpkg-deb, the real namespace sandbox and the real Docker engine.

One build of each image of the repository (busybox, cc) per session, in a
session cache folder; each test's own cache folder links to its images, so
a test pays for a build only when building is what it tests. The .deb
download cache is shared the same way, so a rebuild fetches nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hitz.executor.images import BuiltImage, build_image, ensure_in_docker
from hitz.executor.images_def import ImageError, ImageErrorReason, read_lock, write_lock
from tests.helpers import REPO, Project, task


@dataclass(frozen=True)
class Session:
    """The session's template project (images/ and the hitz.lock pinning them)
    and cache folder holding both images built."""

    project: Path
    cache: Path
    busybox: BuiltImage
    cc: BuiltImage

    def seed(self, root: Path, *, lock: bool = True) -> None:
        """Give project ``root`` the images, the pins, and (through the cache
        folder the test helpers give it) the session's built images."""
        shutil.copytree(self.project / "images", root / "images", dirs_exist_ok=True)
        if lock:
            shutil.copy(self.project / "hitz.lock", root / "hitz.lock")
        cache = root.parent / f"{root.name}.hitz-cache"
        cache.mkdir(exist_ok=True)
        if not (cache / "images").exists():
            (cache / "images").symlink_to(self.cache / "images")


# .debs fetched by earlier sessions (by sha256, so any of them is as good as
# a fresh download): the mirror is asked only for what is new.
_DEBS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hitz-tests" / "debs"


def _share(source: Path, dest: Path) -> None:
    """Give ``dest`` every file of ``source`` it lacks (hard links, else copies)."""
    if not source.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        target = dest / path.name
        if path.is_file() and not target.exists():
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)


def _share_downloads(session_cache: Path, cache: Path) -> None:
    """Seed ``cache`` with the session's .debs and apt lists: a build there
    fetches nothing."""
    _share(session_cache / "images" / "debs", cache / "images" / "debs")
    shutil.copytree(session_cache / "images" / "apt", cache / "images" / "apt",
                    copy_function=os.link, dirs_exist_ok=True)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Session:
    base = tmp_path_factory.mktemp("images")
    project, cache = base / "template", base / "cache"
    (project / "images").mkdir(parents=True)
    for name in ("busybox", "cc"):
        shutil.copy(REPO / "images" / f"{name}.toml", project / "images")
    _share(_DEBS, cache / "images" / "debs")
    busybox = build_image("busybox", project, cache)
    cc = build_image("cc", project, cache)
    _share(cache / "images" / "debs", _DEBS)
    return Session(project, cache, busybox, cc)


@pytest.fixture
def seeded(project: Project, images: Session) -> Iterator[Project]:
    images.seed(project.root)
    yield project


def _no_apt_path(tmp_path: Path) -> str:
    """A PATH with everything an image build uses except apt-get."""
    bin_dir = tmp_path / "no-apt-bin"
    bin_dir.mkdir()
    for tool in ("dpkg-deb", "dpkg", "tar", "sh"):
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed to build images"
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


# --- building -----------------------------------------------------------------------


def test_two_builds_in_different_cache_folders_give_the_same_bytes(
        images: Session, tmp_path: Path) -> None:
    project, cache = tmp_path / "proj", tmp_path / "cache"
    (project / "images").mkdir(parents=True)
    shutil.copy(images.project / "images" / "busybox.toml", project / "images")
    # The same downloads (hard links: the .debs are immutable), a fresh
    # resolution by apt, a fresh assembly, no lock.
    _share_downloads(images.cache, cache)
    again = build_image("busybox", project, cache)
    assert again.digest == images.busybox.digest
    assert again.tar != images.busybox.tar
    assert again.tar.read_bytes() == images.busybox.tar.read_bytes()


def test_the_lock_pins_every_package_and_the_digest(images: Session) -> None:
    pinned = read_lock(images.project / "hitz.lock")
    assert pinned["busybox"].digest == images.busybox.digest
    assert [p.name for p in pinned["busybox"].packages] == ["busybox-static"]
    cc = {p.name: p for p in pinned["cc"].packages}
    assert {"gcc-12", "make", "libc6-dev", "binutils", "dash"} <= set(cc)
    assert all(len(p.sha256) == 64 and p.version for p in cc.values())


def test_a_pinned_image_rebuilds_offline_from_the_lock(images: Session, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    project, cache = tmp_path / "proj", tmp_path / "cache"
    project.mkdir()
    images.seed(project)
    _share(images.cache / "images" / "debs", cache / "images" / "debs")
    # Without apt-get at all: the lock names every .deb by sha256 and the
    # download cache has them, so nothing is resolved or fetched.
    monkeypatch.setenv("PATH", _no_apt_path(tmp_path))
    again = build_image("busybox", project, cache)
    assert again.digest == images.busybox.digest


def test_a_damaged_deb_in_the_download_cache_is_fetched_again(
        images: Session, tmp_path: Path) -> None:
    # The cache never lies: a .deb is named by its sha256, and a file under
    # that name whose bytes are not those (a disk error, a half-copied
    # cache folder) is a miss, not an image built from the wrong bytes.
    project, cache = tmp_path / "proj", tmp_path / "cache"
    project.mkdir()
    images.seed(project)
    pinned = read_lock(project / "hitz.lock")["busybox"].packages[0]
    debs = cache / "images" / "debs"
    debs.mkdir(parents=True)
    damaged = debs / f"{pinned.sha256}.deb"
    # A copy, never a hard link: the session's own .deb must stay intact.
    shutil.copyfile(images.cache / "images" / "debs" / damaged.name, damaged)
    with open(damaged, "r+b") as f:
        f.seek(pinned.size // 2)
        f.write(b"\0" * 64)
    again = build_image("busybox", project, cache)
    assert again.digest == images.busybox.digest
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == pinned.sha256


def test_a_build_that_does_not_match_the_lock_is_an_error(seeded: Project) -> None:
    lock = seeded.root / "hitz.lock"
    pinned = read_lock(lock)["busybox"].digest
    wrong = "sha256:" + "0" * 64
    lock.write_text(lock.read_text().replace(pinned, wrong))
    seeded.write_manifest(task("t", "true"))
    done = seeded.hitz("image", "build", "busybox")
    assert done.returncode == 2, done
    assert f"built to {pinned[:19]}…, but `hitz.lock` pins {wrong[:19]}…" in done.stderr
    assert "hint: the same packages gave other bytes" in done.stderr
    assert "`hitz image build busybox --update` re-pins it" in done.stderr
    assert "Traceback" not in done.stderr
    updated = seeded.hitz("image", "build", "busybox", "--update")
    assert updated.returncode == 0, updated
    assert read_lock(lock)["busybox"].digest == pinned


def test_a_changed_definition_asks_for_update(seeded: Project) -> None:
    definition = seeded.root / "images" / "busybox.toml"
    definition.write_text(definition.read_text().replace('"/bin/cat"', '"/bin/kitten"'))
    seeded.write_manifest(task("t", "true"))
    done = seeded.hitz("image", "build", "busybox")
    assert done.returncode == 2, done
    assert ("error: `images/busybox.toml` changed since `hitz.lock` pinned image `busybox`"
            in done.stderr)
    assert "hint: `hitz image build busybox --update`" in done.stderr


def test_an_unknown_image_suggests_a_defined_one(seeded: Project) -> None:
    seeded.write_manifest(task("t", "true"))
    done = seeded.hitz("image", "build", "busybx")
    assert done.returncode == 2, done
    assert done.stderr == ("error: unknown image `busybx`: there is no `images/busybx.toml`\n"
                           "\nhint: did you mean `busybox`?\n")


def test_a_missing_package_names_the_definition_line(seeded: Project) -> None:
    seeded.write("images/broken.toml",
                 'suite = "bookworm"\npackages = [\n  "busybox-static",\n'
                 '  "hitz-no-such-package",\n]\n')
    seeded.write_manifest(task("t", "true"))
    done = seeded.hitz("image", "build", "broken")
    assert done.returncode == 2, done
    assert ("\nerror: images/broken.toml:4: package `hitz-no-such-package` is not in Debian"
            " `bookworm` (main)\n") in done.stderr, done
    assert "apt: E: Unable to locate package hitz-no-such-package" in done.stderr


def test_without_apt_an_unpinned_image_cannot_be_built(seeded: Project, tmp_path: Path) -> None:
    (seeded.root / "hitz.lock").unlink()
    seeded.write_manifest(task("t", "true"))
    done = seeded.hitz("image", "build", "busybox", env={"PATH": _no_apt_path(tmp_path)})
    assert done.returncode == 2, done
    assert done.stderr.startswith(
        "error: `apt-get` is not installed: hitz builds images with the host's apt\n"), done


def test_image_ls_and_rm(seeded: Project, images: Session) -> None:
    seeded.write_manifest(task("t", "true"))
    listed = seeded.hitz("image", "ls", "--json")
    assert listed.returncode == 0, listed
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["busybox"]["pinned"] == rows["busybox"]["built"] == images.busybox.digest
    assert rows["cc"]["packages"] == len(images.cc.packages)
    plain = seeded.hitz("image", "ls")
    assert plain.stdout.splitlines()[0].split() == ["NAME", "PINNED", "BUILT", "SIZE",
                                                    "PACKAGES"]
    # rm in a cache of its own, so the session's images stay, on an image
    # of its own name, so no other test's `hitz/busybox` Docker tag goes:
    # `rmme` is busybox under another name (same bytes, so the same pin).
    shutil.copy(seeded.root / "images" / "busybox.toml", seeded.root / "images" / "rmme.toml")
    pins = read_lock(seeded.root / "hitz.lock")
    write_lock(seeded.root / "hitz.lock", {**pins, "rmme": pins["busybox"]})
    own = seeded.root.parent / "own-cache"
    _share_downloads(images.cache, own)
    env = {"HITZ_CACHE_DIR": str(own)}
    built = seeded.hitz("image", "build", "rmme", env=env)
    assert built.returncode == 0, built
    assert built.stdout == f"rmme {images.busybox.digest}\n"
    ensure_in_docker(build_image("rmme", seeded.root, own))
    removed = seeded.hitz("image", "rm", "rmme", env=env)
    assert removed.returncode == 0, removed
    assert removed.stdout == (f"removed rmme {images.busybox.digest}\n"
                              f"removed rmme docker hitz/rmme:{images.busybox.digest[7:19]}\n")
    after = {r["name"]: r for r in json.loads(seeded.hitz("image", "ls", "--json",
                                                          env=env).stdout)}
    assert after["rmme"]["built"] is None
    assert after["rmme"]["pinned"] == images.busybox.digest  # the pin stays
    assert not (own / "images" / "built" / images.busybox.digest[7:]).exists()
    again = seeded.hitz("image", "rm", "rmme", env=env)
    assert again.returncode == 2
    assert "error: image `rmme` is not built: nothing to remove" in again.stderr


# --- running on an image ------------------------------------------------------------------


def test_a_namespace_task_on_busybox_sees_the_image_not_the_host(seeded: Project) -> None:
    seeded.write_manifest(task(
        "probe",
        "head -1 /etc/os-release > out/seen; ls /usr/bin | wc -l >> out/seen;"
        " if test -e /usr/bin/python3 || test -e /usr/lib/x86_64-linux-gnu/libc.so.6;"
        " then echo HOST-VISIBLE; exit 77; fi; grep -c . /etc/passwd >> out/seen",
        outputs=["out/seen"], extra={"rootfs": "image:busybox"}))
    done = seeded.run()
    assert done.returncode == 0, done
    seen = seeded.read("out/seen").split("\n")
    assert seen[0] == 'NAME="hitz busybox"'
    assert int(seen[1]) < 60  # the busybox applets of images/busybox.toml, not /usr/bin
    assert seen[2] == "2"  # hitz's own passwd: root and nobody


def test_a_namespace_task_on_cc_compiles_archives_and_makes(seeded: Project) -> None:
    seeded.write("src/lib.c", "int answer(void) { return 42; }\n")
    seeded.write("src/main.c", '#include <stdio.h>\nint answer(void);\n'
                 'int main(void) { printf("%d\\n", answer()); return 0; }\n')
    seeded.write("src/Makefile", "out/prog: out/main.o out/libanswer.a\n"
                 "\tcc -o $@ out/main.o out/libanswer.a\n"
                 "out/main.o: src/main.c\n\tcc -c -o $@ src/main.c\n")
    seeded.write_manifest(task(
        "build",
        "cc -O2 -c src/lib.c -o out/lib.o && ar rcs out/libanswer.a out/lib.o"
        " && make -f src/Makefile out/prog && ./out/prog > out/answer",
        inputs=["src/"], outputs=["out/"], extra={"rootfs": "image:cc"}))
    done = seeded.run()
    assert done.returncode == 0, done
    assert seeded.read("out/answer") == "42\n"
    entry = done.task("build")
    assert entry["outcome"] == "succeeded"


def test_the_example_project_builds_and_tests_on_the_cc_image(seeded: Project) -> None:
    shutil.copy(REPO / "hitz.toml.example", seeded.root / "hitz.toml")
    shutil.copytree(REPO / "example", seeded.root / "example")
    done = seeded.run("test_in_image")
    assert done.returncode == 0, done
    assert done.task("test_in_image")["outcome"] == "succeeded"
    assert ("ok: build/image/tiny-demo output matches"
            in seeded.log(done, "test_in_image", "stdout"))


def test_an_unpinned_image_is_built_and_pinned_by_the_first_run(
        project: Project, images: Session) -> None:
    images.seed(project.root, lock=False)
    project.write_manifest(task("hello", "echo hello > out/h", outputs=["out/h"],
                                extra={"rootfs": "image:busybox"}))
    done = project.run()
    assert done.returncode == 0, done
    assert done.stderr.count("hitz: building image `busybox` from Debian bookworm and pinning"
                             " it in `hitz.lock`") == 1
    assert read_lock(project.root / "hitz.lock")["busybox"].digest == images.busybox.digest
    assert project.read("out/h") == "hello\n"


def test_a_run_with_an_unknown_image_stops_before_any_task(seeded: Project) -> None:
    seeded.write_manifest(task("a", "true", extra={"rootfs": "image:busybx"}))
    done = seeded.run()
    assert done.returncode == 2, done
    assert "error: unknown image `busybx`" in done.stderr
    assert "did you mean `busybox`?" in done.stderr


# --- Docker --------------------------------------------------------------------------------


def test_an_image_imported_into_docker_runs_there(images: Session) -> None:
    if shutil.which("docker") is None:
        pytest.fail("the docker CLI is needed to check an imported image (apt-get install"
                    " docker.io)")
    ref = ensure_in_docker(images.busybox)
    assert ensure_in_docker(images.busybox) == ref  # imported once
    inspect = subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                             text=True, check=True)
    labels = json.loads(inspect.stdout)[0]["Config"]["Labels"]
    assert labels["org.hitz.image.digest"] == images.busybox.digest
    ran = subprocess.run(["docker", "run", "--rm", "--network", "none", ref, "/bin/sh", "-c",
                          "echo from-image; head -1 /etc/os-release"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == 'from-image\nNAME="hitz busybox"\n'


def test_a_task_on_an_image_has_the_same_key_and_output_in_both_backends(
        seeded: Project) -> None:
    seeded.write_manifest(*(
        task(backend, "head -1 /etc/os-release; ls /usr/bin | wc -l",
             extra={"rootfs": "image:busybox", "backend": backend})
        for backend in ("namespace", "docker")))
    done = seeded.run("--no-cache")
    assert done.returncode == 0, done
    namespace, docker = done.task("namespace"), done.task("docker")
    assert namespace["enforced"]["sandbox"] == "namespace"
    assert docker["enforced"]["sandbox"] == "docker"
    assert namespace["action_digest"] == docker["action_digest"]
    assert (seeded.log(done, "namespace", "stdout") == seeded.log(done, "docker", "stdout")
            != "")
    # And so a result of one backend serves the other.
    first = seeded.run("namespace")
    assert first.returncode == 0, first
    served = seeded.run("docker")
    assert served.task("docker")["cached"] is True, served


def test_a_task_on_an_image_sees_the_same_etc_in_both_backends(seeded: Project) -> None:
    # One key serves both backends, so what a task reads of /etc must not
    # depend on the backend: users and groups (`ls -l`), hosts, the host
    # name; and no resolver of the host's without network = "host". (The
    # task's own uid still differs: 0 in its user namespace, 65534 or the
    # invoking user's in a container; see docs/docker.md.)
    script = ("for f in passwd group hosts hostname nsswitch.conf; do echo \"== $f\";"
              " cat /etc/$f; done; echo \"== resolv\"; cat /etc/resolv.conf 2>/dev/null;"
              " true")
    seeded.write_manifest(*(
        task(backend, script, extra={"rootfs": "image:busybox", "backend": backend})
        for backend in ("namespace", "docker")))
    done = seeded.run("--no-cache")
    assert done.returncode == 0, done
    namespace = seeded.log(done, "namespace", "stdout")
    assert "== passwd\nroot:x:0:0:" in namespace, namespace
    assert namespace.endswith("== resolv\n"), namespace
    assert seeded.log(done, "docker", "stdout") == namespace


def test_a_missing_docker_image_by_digest_is_a_clear_error() -> None:
    from hitz.executor.images import resolve

    ref = "docker:hitz-test/absent@sha256:" + "5" * 64
    with pytest.raises(ImageError) as caught:
        resolve(ref, "docker", project_root=REPO, cache_root=REPO)
    assert caught.value.reason is ImageErrorReason.DOCKER
    assert caught.value.message == (
        "Docker image `hitz-test/absent@sha256:" + "5" * 64
        + "` is not in the local Docker engine")


def test_a_damaged_image_tar_is_never_imported_under_its_digest(
        images: Session, tmp_path: Path) -> None:
    # The Docker image is labelled with the digest, which is in the cache
    # key: bytes that are not the digest's must not get that label.
    from hitz.executor.images import DIGEST_LABEL, BuiltImage

    tar = tmp_path / "image.tar"
    shutil.copyfile(images.busybox.tar, tar)
    with open(tar, "r+b") as f:
        f.seek(tar.stat().st_size // 2)
        f.write(b"\xff" * 16)
    name = f"rdamaged{os.getpid()}"
    damaged = BuiltImage(name, images.busybox.digest, tar, images.busybox.root, ())
    with pytest.raises(ImageError) as caught:
        ensure_in_docker(damaged)
    assert caught.value.reason is ImageErrorReason.DIGEST_MISMATCH
    assert f"hitz image rm {name}" in (caught.value.hint or "")
    listed = subprocess.run(["docker", "images", "-q", "--filter",
                             f"label={DIGEST_LABEL}={images.busybox.digest}",
                             f"hitz/{name}"], capture_output=True, text=True, check=True)
    assert listed.stdout == "", "the damaged tar was imported"
