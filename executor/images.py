"""Images: build, pin, find and remove the root filesystems of ``images/``.

``build_image`` turns ``images/NAME.toml`` into an image in the hitz cache
folder (``CACHE/images/``)::

    debs/SHA256.deb          every .deb fetched, by content: rebuilds are offline
    apt/SUITE-ARCH-MIRROR/   apt's private lists and an empty dpkg status
    built/HEX/image.tar      the image (its sha256 is HEX, the image digest)
    built/HEX/root/          the same tree unpacked, read-only: the namespace
                             sandbox's root
    built/HEX/image.json     name, digest and packages, for `hitz image ls`
    lock                     held while building (one build at a time)

and pins it in ``hitz.lock`` next to the manifest: the digest and every
package version with its .deb's sha256. A pinned image is rebuilt from
exactly those versions and must give exactly that digest; anything else is
an error, never a silent re-pin (``--update`` re-pins, for review).

``resolve`` gives the sandbox the ``Image`` a task's rootfs names, building
it the first time; ``ensure_in_docker`` imports a built image into the
Docker engine only when a docker task needs it, so namespace-only runs
never talk to dockerd. Docker SDK errors are translated here, at this
module's one Docker border (``_docker``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hitz.executor.images_def import (
    LOCK_FILE,
    Definition,
    ImageError,
    ImageErrorReason,
    LockedImage,
    LockedPackage,
    find_definition,
    load_definition,
    read_lock,
    write_lock,
)
from hitz.sandbox.spec import Image

if TYPE_CHECKING:
    from hitz.executor.images_apt import Apt

__all__ = [
    "BuiltImage",
    "ImageError",
    "ImageErrorReason",
    "build_image",
    "ensure_in_docker",
    "image_identity",
    "list_images",
    "remove_image",
    "resolve",
]

Progress = Callable[[str], None]
DOCKER_REPOSITORY = "hitz"  # images are imported as hitz/NAME:HEX12
DIGEST_LABEL = "org.hitz.image.digest"


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """A built image in the cache. ``digest`` is "sha256:HEX" of ``tar``;
    ``root`` is the same tree unpacked (read-only)."""

    name: str
    digest: str
    tar: Path
    root: Path
    packages: tuple[LockedPackage, ...]

    @property
    def docker_tag(self) -> str:
        return f"{DOCKER_REPOSITORY}/{self.name}:{self.digest.removeprefix('sha256:')[:12]}"

    def spec_image(self, docker_ref: str | None = None) -> Image:
        return Image(self.name, self.digest, str(self.root), docker_ref)


def images_folder(cache_root: Path) -> Path:
    return cache_root / "images"


def build_image(
    name: str,
    project_root: Path,
    cache_root: Path,
    *,
    lock_path: Path | None = None,
    update: bool = False,
    progress: Progress | None = None,
) -> BuiltImage:
    """Build ``images/NAME.toml`` of ``project_root`` (or find it built).

    Pinned in ``lock_path`` (default: ``project_root/hitz.lock``) and not
    ``update``: the locked package versions are used (from the download
    cache when there, else from the mirror) and the result must have the
    locked digest. Otherwise apt resolves the packages afresh and the image
    is pinned (the lock file is written). Raises ``ImageError`` (exit 2) for
    an unknown image, a stale or mismatched pin, a missing package, no apt;
    ``ManifestError`` for a bad definition.
    """
    lock_path = lock_path or project_root / LOCK_FILE
    definition = load_definition(find_definition(project_root, name), f"images/{name}.toml")
    say = progress or (lambda _: None)
    # Resolved: the sandbox binds the image's root by a path without symlinks.
    folder = images_folder(cache_root).resolve()
    with _build_lock(folder):
        pinned = read_lock(lock_path).get(name)
        if pinned is not None and not update:
            _check_fresh(definition, pinned, lock_path)
            built = _find_built(folder, name, pinned.digest)
            if built is not None:
                return built
            say(f"building image `{name}` from its {_packages(len(pinned.packages))} pinned in"
                f" `{lock_path.name}`")
            built = _build(definition, folder, list(pinned.packages), pinned.architecture,
                           expected=pinned.digest, lock_path=lock_path)
            return built
        from hitz.executor.images_apt import host_architecture

        architecture = pinned.architecture if pinned else host_architecture()
        apt = _apt(folder, definition, architecture)
        say(f"building image `{name}` from Debian {definition.suite} and pinning it in"
            f" `{lock_path.name}` (resolving its packages afresh)")
        apt.update()
        packages = [f.package for f in apt.resolve(list(definition.packages))]
        built = _build(definition, folder, packages, architecture, expected=None,
                       lock_path=lock_path, apt=apt)
        # Read again: another image may have been pinned since (one lock per
        # cache folder, but hitz.lock may be shared by several cache folders).
        images = read_lock(lock_path)
        images[name] = LockedImage(built.digest, definition.digest, definition.suite,
                                   architecture, built.packages)
        write_lock(lock_path, images)
        return built


def _packages(count: int) -> str:
    return f"{count} package" + ("" if count == 1 else "s")


def image_identity(name: str, project_root: Path, lock_path: Path | None = None) -> str | None:
    """The pinned digest of image NAME ("sha256:HEX"), without building:
    what the cache key holds. None when it is not pinned yet. Raises
    ImageError when the definition changed since it was pinned."""
    lock_path = lock_path or project_root / LOCK_FILE
    pinned = read_lock(lock_path).get(name)
    if pinned is None:
        find_definition(project_root, name)  # an unknown image fails here, with a hint
        return None
    definition = load_definition(find_definition(project_root, name), f"images/{name}.toml")
    _check_fresh(definition, pinned, lock_path)
    return pinned.digest


def resolve(
    rootfs: str,
    backend: str,
    *,
    project_root: Path,
    cache_root: Path,
    lock_path: Path | None = None,
    progress: Progress | None = None,
) -> Image:
    """The ``Image`` a task's ``rootfs`` names, ready for ``backend``.

    "image:NAME": built (once) and, for the docker backend, imported.
    "docker:NAME@sha256:HEX": must already be in the local Docker engine.
    """
    if rootfs.startswith("image:"):
        built = build_image(rootfs.removeprefix("image:"), project_root, cache_root,
                            lock_path=lock_path, progress=progress)
        ref = ensure_in_docker(built) if backend == "docker" else None
        return built.spec_image(ref)
    if rootfs.startswith("docker:"):
        return _docker_image(rootfs.removeprefix("docker:"))
    raise ValueError(f"rootfs {rootfs!r} names no image")


def _check_fresh(definition: Definition, pinned: LockedImage, lock_path: Path) -> None:
    if pinned.definition != definition.digest:
        raise ImageError(
            f"`{definition.display}` changed since `{lock_path.name}` pinned image"
            f" `{definition.name}`",
            hint=f"`hitz image build {definition.name} --update` resolves the packages again"
            f" and re-pins it; review the change to `{lock_path.name}`",
            reason=ImageErrorReason.LOCK_STALE,
        )


def _apt(folder: Path, definition: Definition, architecture: str) -> Apt:
    import hashlib

    from hitz.executor.images_apt import Apt

    mirror = hashlib.sha256(definition.mirror.encode()).hexdigest()[:8]
    return Apt(folder / "apt" / f"{definition.suite}-{architecture}-{mirror}", definition,
               architecture)


def _build(
    definition: Definition,
    folder: Path,
    packages: list[LockedPackage],
    architecture: str,
    *,
    expected: str | None,
    lock_path: Path,
    apt: Apt | None = None,
) -> BuiltImage:
    from hitz.executor.images_tar import assemble, remove_tree

    debs = _fetch(definition, folder, packages, architecture, apt)
    work = folder / "built" / f".tmp-{os.getpid()}"
    remove_tree(work)
    try:
        (work / "root").mkdir(parents=True)
        order = sorted(packages, key=lambda p: (p.name, p.architecture))
        hexdigest = assemble([(p.name, debs[p.sha256]) for p in order], definition.symlinks,
                             definition.files, work / "root", work / "image.tar")
        digest = "sha256:" + hexdigest
        if expected is not None and digest != expected:
            raise ImageError(
                f"image `{definition.name}` built to {digest[:19]}…, but `{lock_path.name}`"
                f" pins {expected[:19]}…",
                detail=f"  built:  {digest}\n  pinned: {expected}",
                hint=f"the same packages gave other bytes: hitz or its tar format changed."
                f" After reviewing, `hitz image build {definition.name} --update` re-pins it",
                reason=ImageErrorReason.DIGEST_MISMATCH,
            )
        meta = {"name": definition.name, "digest": digest, "built": int(time.time()),
                "packages": [p.pin for p in order],
                "size": os.path.getsize(work / "image.tar")}
        (work / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
        final = folder / "built" / hexdigest
        if final.exists():
            remove_tree(work)  # an identical image is already there
        else:
            os.rename(work, final)
    except OSError as exc:
        raise ImageError(f"cannot write image `{definition.name}` into the cache:"
                         f" {exc.strerror} ({exc.filename})",
                         hint=f"hitz keeps images in `{folder}`; make it writable, or"
                         " free some space", reason=ImageErrorReason.IO_ERROR) from exc
    finally:
        remove_tree(work)
    _name_link(folder, definition.name, hexdigest)
    return BuiltImage(definition.name, digest, final / "image.tar", final / "root",
                      tuple(order))


def _fetch(definition: Definition, folder: Path, packages: list[LockedPackage],
           architecture: str, apt: Apt | None) -> dict[str, Path]:
    """Every package's .deb from the download cache, fetching the missing
    ones (exact versions) and checking each against its sha256. A cached
    .deb is checked too: one whose bytes are not its name's (a disk error,
    a half-copied cache) is removed and fetched again, never unpacked."""
    debs = folder / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = {p.sha256: debs / f"{p.sha256}.deb" for p in packages}
    missing = []
    for p in packages:
        path = found[p.sha256]
        if path.exists() and _sha256_of(path) == p.sha256:
            continue
        path.unlink(missing_ok=True)
        missing.append(p)
    if not missing:
        return found
    if apt is None:
        apt = _apt(folder, definition, architecture)
        apt.update()
    incoming = folder / "tmp" / str(os.getpid())
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    try:
        apt.download(missing, incoming)
        got = {_sha256_of(path): path for path in incoming.iterdir()}
        for p in missing:
            if p.sha256 not in got:
                raise ImageError(
                    f"the mirror's .deb of `{p.name}` {p.version} is not the one pinned"
                    f" (sha256 {p.sha256[:12]}…)",
                    hint=f"the archive may have been rebuilt; after reviewing, `hitz image"
                    f" build {definition.name} --update` re-pins the image",
                    reason=ImageErrorReason.FETCH_FAILED,
                )
            os.replace(got[p.sha256], found[p.sha256])
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return found


def _sha256_of(path: Path) -> str:
    import hashlib

    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _name_link(folder: Path, name: str, hexdigest: str) -> None:
    """``names/NAME`` -> the last build of NAME, for `hitz image ls` and `rm`."""
    names = folder / "names"
    names.mkdir(exist_ok=True)
    tmp = names / f".{name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(f"../built/{hexdigest}", tmp)
    os.replace(tmp, names / name)


def _find_built(folder: Path, name: str, digest: str) -> BuiltImage | None:
    final = folder / "built" / digest.removeprefix("sha256:")
    try:
        meta = json.loads((final / "image.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("digest") != digest or not (final / "root").is_dir():
        return None
    if not (folder / "names" / name).exists():
        _name_link(folder, name, final.name)
    packages = tuple(_pin(p) for p in meta.get("packages", []))
    return BuiltImage(name, digest, final / "image.tar", final / "root", packages)


def _pin(text: str) -> LockedPackage:
    name_arch, _, version = text.partition("=")
    name, _, arch = name_arch.partition(":")
    return LockedPackage(name, version, arch, "", 0)


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageError(f"cannot use the image cache `{folder}`: {exc.strerror}",
                         hint="set `[cache] dir` or $HITZ_CACHE_DIR to a writable folder",
                         reason=ImageErrorReason.IO_ERROR) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another build of the same cache: wait for it
        yield
    finally:
        os.close(fd)


# --- listing and removing ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRow:
    """One line of `hitz image ls`: an image of images/ (or one built from a
    definition that is gone), its pin and what the cache holds."""

    name: str
    pinned: str | None  # the digest in hitz.lock
    built: str | None  # the digest of the last build in the cache
    size: int | None  # bytes of the built tar
    packages: int | None  # in the pin, else in the build
    defined: bool  # images/NAME.toml exists

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "pinned": self.pinned, "built": self.built,
                "size": self.size, "packages": self.packages, "defined": self.defined}


def list_images(project_root: Path, cache_root: Path,
                lock_path: Path | None = None) -> list[ImageRow]:
    from hitz.executor.images_def import definition_names

    lock = read_lock(lock_path or project_root / LOCK_FILE)
    defined = set(definition_names(project_root))
    names_dir = images_folder(cache_root) / "names"
    rows = []
    for name in sorted(defined | set(lock)):
        pinned = lock.get(name)
        built = size = None
        meta_file = names_dir / name / "image.json"
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(meta_file.read_text())
            built, size = meta["digest"], int(meta["size"])
        count = len(pinned.packages) if pinned else None
        rows.append(ImageRow(name, pinned.digest if pinned else None, built, size, count,
                             name in defined))
    return rows


def remove_image(name: str, project_root: Path, cache_root: Path) -> list[str]:
    """Remove image NAME's builds from the cache (and its Docker tags when
    the engine is reachable); the pin in hitz.lock stays, so the next build
    gives the same image. Returns what was removed, for the user."""
    from hitz.executor.images_def import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        # names/NAME is unlinked below: a NAME with "/" or ".." would name
        # a file outside the cache. find_definition refuses it in words.
        find_definition(project_root, name)
    folder = images_folder(cache_root)
    link = folder / "names" / name
    removed: list[str] = []
    if not link.is_symlink() and not link.exists():
        find_definition(project_root, name)  # unknown: the error names the near ones
        raise ImageError(f"image `{name}` is not built: nothing to remove",
                         hint="`hitz image ls` shows what is built",
                         reason=ImageErrorReason.NOT_BUILT)
    from hitz.executor.images_tar import remove_tree

    with _build_lock(folder):
        target = (link.parent / os.readlink(link)).resolve() if link.is_symlink() else None
        others = {
            (p.parent / os.readlink(p)).resolve()
            for p in (folder / "names").iterdir() if p.is_symlink() and p.name != name
        }
        link.unlink(missing_ok=True)
        # Only a build of this cache: a link pointing anywhere else (edited
        # by hand, a damaged cache) is dropped, never followed into rmtree.
        built = (folder / "built").resolve()
        if (target is not None and target.parent == built and target.exists()
                and target not in others):
            remove_tree(target)
            removed.append(f"sha256:{target.name}")
    removed += _docker_untag(name)
    return removed


# --- Docker ----------------------------------------------------------------------


@contextlib.contextmanager
def _docker() -> Iterator[Any]:
    """A Docker client, with every Docker SDK error translated once, here."""
    try:
        import docker
        import docker.errors
    except ImportError as exc:
        raise ImageError("the docker SDK is not installed",
                         hint="`pip install docker` in hitz's environment",
                         reason=ImageErrorReason.DOCKER) from exc
    try:
        client = docker.from_env()
    except docker.errors.DockerException as exc:
        raise _unreachable(exc) from exc
    try:
        yield client
    except docker.errors.ImageNotFound:
        raise
    except docker.errors.APIError as exc:
        raise ImageError(f"the Docker engine refused: {exc.explanation or exc}",
                         reason=ImageErrorReason.DOCKER) from exc
    except docker.errors.DockerException as exc:
        raise _unreachable(exc) from exc
    except OSError as exc:  # the SDK lets connection errors through as requests' OSErrors
        raise _unreachable(exc) from exc
    finally:
        client.close()


def _unreachable(exc: Exception) -> ImageError:
    return ImageError(
        "the Docker engine is not reachable",
        detail=f"  {exc}",
        hint="start dockerd (`systemctl start docker`), or run the task in the namespace"
        ' sandbox (backend = "namespace") with rootfs = "image:NAME"',
        reason=ImageErrorReason.DOCKER,
    )


def ensure_in_docker(built: BuiltImage) -> str:
    """The ID of ``built`` in the local Docker engine, importing its tar
    (``docker import``, tagged ``hitz/NAME:HEX12`` and labelled with the
    digest) the first time."""
    import docker.errors

    with _docker() as client:
        try:
            found = client.images.get(built.docker_tag)
            if (found.labels or {}).get(DIGEST_LABEL) == built.digest:
                return str(found.id)
        except docker.errors.ImageNotFound:
            pass
        _check_tar(built)
        repository, tag = built.docker_tag.split(":")
        client.api.import_image_from_file(
            str(built.tar), repository=repository, tag=tag,
            changes=[f"LABEL {DIGEST_LABEL}={built.digest}", "CMD [\"/bin/sh\"]"],
        )
        return str(client.images.get(built.docker_tag).id)


def _check_tar(built: BuiltImage) -> None:
    """The tar's bytes are the digest's: the import labels the engine's
    image with the digest, which stands for the image in every cache key.
    Raises ImageError (DIGEST_MISMATCH) otherwise."""
    try:
        actual = "sha256:" + _sha256_of(built.tar)
    except OSError as exc:
        raise ImageError(f"cannot read image `{built.name}` in the cache: {exc.strerror}",
                         hint=f"`hitz image rm {built.name}`, then build it again",
                         reason=ImageErrorReason.IO_ERROR) from exc
    if actual != built.digest:
        raise ImageError(
            f"the cached tar of image `{built.name}` is damaged: its bytes are not"
            f" {built.digest[:19]}…",
            detail=f"  file:   {built.tar}\n  sha256: {actual}",
            hint=f"`hitz image rm {built.name}`, then build it again",
            reason=ImageErrorReason.DIGEST_MISMATCH,
        )


def _docker_image(reference: str) -> Image:
    """``NAME@sha256:HEX``, which the local engine must hold."""
    import docker.errors

    name, _, digest = reference.partition("@")
    with _docker() as client:
        try:
            found = client.images.get(reference)
        except docker.errors.ImageNotFound:
            found = None
        if found is None:
            # A local image (`docker import`, `docker build`) has no registry
            # digest; its ID, a content digest too, names it with its NAME.
            try:
                by_id = client.images.get(digest)
            except docker.errors.ImageNotFound:
                by_id = None
            if by_id is not None and any(tag.rsplit(":", 1)[0] == name for tag in by_id.tags):
                return Image(name, digest, None, str(by_id.id))
            raise ImageError(
                f"Docker image `{reference}` is not in the local Docker engine",
                hint=f"`docker pull {reference}` (or `docker load` it) first; hitz never"
                " pulls, and `docker images --digests` lists what is there",
                reason=ImageErrorReason.DOCKER,
            ) from None
        return Image(name, digest, None, str(found.id))


def _docker_untag(name: str) -> list[str]:
    """Remove the hitz/NAME:* tags, if dockerd is reachable at all (`rm`
    must work on hosts without Docker)."""
    removed: list[str] = []
    with contextlib.suppress(ImageError), _docker() as client:
        for image in client.images.list(name=f"{DOCKER_REPOSITORY}/{name}"):
            for tag in image.tags:
                if tag.startswith(f"{DOCKER_REPOSITORY}/{name}:"):
                    client.images.remove(tag)
                    removed.append(f"docker {tag}")
    return removed
