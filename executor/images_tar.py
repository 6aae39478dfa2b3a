"""Assemble a root filesystem from .deb files, byte for byte reproducibly.

No maintainer script runs: an image is the union of its packages' data
archives (read with Python's tarfile from ``dpkg-deb --fsys-tarfile``),
laid out for a merged /usr, plus the definition's own files and symlinks.
What the scripts would have made (``/usr/bin/cc`` from update-alternatives,
``/etc/ld.so.cache``) a definition adds itself, or does without.

The same .debs and definition give the same tar, so the same digest:

- entries sorted by path (parents before children), one per path;
- every mtime ``EPOCH``, every owner uid/gid 0 with no names;
- modes normalised: folders 0755, files 0755 if any execute bit was set
  else 0644, symlinks 0777; setuid, setgid and sticky bits are dropped
  (``/tmp`` alone is 1777);
- hard links become copies, so no entry depends on another;
- GNU tar format, so long names are spelled the same way every time.

The unpacked tree is kept too, read-only on disk, as the root of the
namespace sandbox. Entries are written under ``root`` only: a path through
a symlink, ``..`` or a device node in a package is refused (``BAD_PACKAGE``),
so a hostile .deb cannot write outside the image while root unpacks it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from hitz.executor.images_def import FileSpec, ImageError, ImageErrorReason

EPOCH = 315532800  # 1980-01-01, as SOURCE_DATE_EPOCH in every task (sandbox.spec.BASE_ENV)
# Top-level folders a merged-/usr system keeps as symlinks into /usr.
MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_ALWAYS_MERGED = ("bin", "sbin", "lib")
# Mount points every image has, whatever its packages (Docker and the
# namespace sandbox mount over them).
_SKELETON = {"dev": 0o755, "etc": 0o755, "proc": 0o755, "sys": 0o755, "tmp": 0o1777}

DIR, FILE, LINK = "dir", "file", "link"


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # DIR, FILE or LINK
    mode: int  # normalised permission bits
    target: str = ""  # a LINK's target, as the package spells it
    origin: str = ""  # the package (or "definition") that put it there


def image_path(name: str) -> str | None:
    """A tar member name as a path inside the image, or None for the root.

    "./bin/sh" -> "usr/bin/sh" (merged /usr); "./etc/" -> "etc". Raises
    ValueError for a path that leaves the image ("../x", "/x" after "./").
    """
    path = posixpath.normpath("/" + name.removeprefix("./")).lstrip("/")
    if path in ("", "."):
        return None
    if name.startswith("/") or ".." in name.split("/"):
        raise ValueError(name)
    top, _, rest = path.partition("/")
    if top in MERGED:
        return f"usr/{top}/{rest}" if rest else f"usr/{top}"
    return path


def normal_mode(kind: str, mode: int) -> int:
    """The permission bits an entry of ``kind`` gets in every image."""
    if kind == DIR:
        return 0o755
    if kind == LINK:
        return 0o777
    return 0o755 if mode & 0o111 else 0o644


class Assembly:
    """One image being unpacked under ``root`` (an empty folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tree: dict[str, Entry] = {}

    # --- adding entries ---------------------------------------------------------
    def add_deb(self, data: Path, package: str) -> None:
        """Unpack ``data``, the data archive of ``package``'s .deb (see
        ``data_archives``)."""
        try:
            with tarfile.open(data, mode="r:") as archive:
                for member in archive:
                    self._add_member(archive, member, package)
        except tarfile.TarError as exc:
            raise self._bad(package, f"its data archive cannot be read: {exc}") from exc

    def _add_member(self, archive: tarfile.TarFile, member: tarfile.TarInfo,
                    package: str) -> None:
        try:
            path = image_path(member.name)
        except ValueError:
            raise self._bad(package, f"it holds a path outside the image: {member.name!r}"
                            ) from None
        if path is None:
            return
        if member.isdir():
            self.add_dir(path, package)
        elif member.isreg():
            data = archive.extractfile(member)
            assert data is not None
            self.add_file(path, data, member.mode, package)
        elif member.issym():
            self.add_link(path, member.linkname, package)
        elif member.islnk():
            try:
                source = image_path(member.linkname)
            except ValueError:
                source = None
            entry = self.tree.get(source or "")
            if source is None or entry is None or entry.kind != FILE:
                raise self._bad(package, f"hard link {member.name!r} points at"
                                f" {member.linkname!r}, which it does not hold")
            with open(self.root / source, "rb") as data_file:
                self.add_file(path, data_file, entry.mode, package)
        else:
            raise self._bad(package, f"{member.name!r} is a device, FIFO or other special"
                            " file; images hold files, folders and symlinks only")

    def add_dir(self, path: str, origin: str, mode: int = 0o755) -> None:
        old = self._prepare(path, DIR, origin)
        if old is None:
            os.mkdir(self.root / path, 0o755)
        self.tree[path] = Entry(DIR, mode if old is None else old.mode, origin=origin)

    def add_file(self, path: str, data: IO[bytes], mode: int, origin: str) -> None:
        self._prepare(path, FILE, origin)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(self.root / path, flags, 0o644), "wb") as out:
            shutil.copyfileobj(data, out, 1 << 20)
        self.tree[path] = Entry(FILE, normal_mode(FILE, mode), origin=origin)

    def add_link(self, path: str, target: str, origin: str) -> None:
        self._prepare(path, LINK, origin)
        os.symlink(target, self.root / path)
        self.tree[path] = Entry(LINK, 0o777, target, origin)

    def add_definition(self, symlinks: Mapping[str, str], files: Mapping[str, FileSpec]) -> None:
        """The merged-/usr links, the skeleton, then the definition's own
        files and symlinks (which win over a package's)."""
        for top in MERGED:
            if top in _ALWAYS_MERGED and f"usr/{top}" not in self.tree:
                self.add_dir(f"usr/{top}", "merged /usr")
            if f"usr/{top}" in self.tree and top not in self.tree:
                self.add_link(top, f"usr/{top}", "merged /usr")
        for folder, mode in _SKELETON.items():
            if folder not in self.tree:
                self.add_dir(folder, "image skeleton", mode)
        for name, spec in sorted(files.items()):
            import io

            path = self._definition_path(name)
            self.add_file(path, io.BytesIO(spec.content.encode()), spec.mode, "definition")
            self.tree[path] = Entry(FILE, spec.mode & 0o777, origin="definition")
        for name, target in sorted(symlinks.items()):
            self.add_link(self._definition_path(name), target, "definition")

    def _definition_path(self, name: str) -> str:
        path = image_path("." + name)
        assert path is not None, "definition paths are validated as absolute, not /"
        return path

    def _prepare(self, path: str, kind: str, origin: str) -> Entry | None:
        """Make room for ``path``: its parents must be folders of the image
        (made if missing); an older entry of another kind is replaced (a
        later package or the definition wins), except a folder with
        something in it. Returns the folder kept when ``kind`` is DIR."""
        parent = posixpath.dirname(path)
        if parent:
            entry = self.tree.get(parent)
            if entry is None:
                self.add_dir(parent, origin)
            elif entry.kind != DIR:
                raise self._bad(origin, f"it puts /{path} under /{parent}, which is a"
                                f" {'symlink' if entry.kind == LINK else 'file'}"
                                f" (from {entry.origin})")
        old = self.tree.get(path)
        if old is None:
            return None
        if old.kind == DIR and kind == DIR:
            return old
        if old.kind == DIR:
            if any(p.startswith(path + "/") for p in self.tree):
                raise self._bad(origin, f"it replaces the folder /{path} (from {old.origin})"
                                f" with a {kind}")
            os.rmdir(self.root / path)
        else:
            os.unlink(self.root / path)
        del self.tree[path]
        return None

    @staticmethod
    def _bad(origin: str, what: str) -> ImageError:
        return ImageError(f"package `{origin}` cannot go into an image: {what}",
                          reason=ImageErrorReason.BAD_PACKAGE)

    # --- the result -------------------------------------------------------------
    def write_tar(self, out: Path) -> str:
        """Write the image as a tar to ``out``; return its sha256 hex."""
        digest = hashlib.sha256()
        with open(out, "wb") as raw:
            sink = cast(IO[bytes], _Hashing(raw, digest))  # tarfile only writes and tells
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for path in sorted(self.tree):
                    entry = self.tree[path]
                    info = tarinfo(path, entry)
                    if entry.kind == FILE:
                        info.size = os.lstat(self.root / path).st_size
                        with open(self.root / path, "rb") as data:
                            tar.addfile(info, data)
                    else:
                        tar.addfile(info)
        return digest.hexdigest()

    def seal(self) -> None:
        """Give every entry on disk its image mode, minus write permission:
        the tree is the read-only root of the namespace sandbox."""
        for path in sorted(self.tree, reverse=True):
            entry = self.tree[path]
            if entry.kind != LINK:
                os.chmod(self.root / path, entry.mode & ~0o222 & ~0o7000)
        os.chmod(self.root, 0o555)


def tarinfo(path: str, entry: Entry) -> tarfile.TarInfo:
    """The normalised tar header of one entry (size 0: set it for a file)."""
    info = tarfile.TarInfo(path)
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = entry.mode
    if entry.kind == DIR:
        info.type = tarfile.DIRTYPE
    elif entry.kind == LINK:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
    else:
        info.type = tarfile.REGTYPE
    return info


class _Hashing:
    """A write-only file that hashes what passes through it."""

    def __init__(self, raw: IO[bytes], digest: hashlib._Hash) -> None:
        self.raw, self.digest = raw, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


def unseal(folder: Path) -> None:
    """Make a sealed tree removable again (``shutil.rmtree`` needs write
    permission on every folder)."""
    if not folder.exists():
        return
    os.chmod(folder, 0o755)
    for parent, dirs, _ in os.walk(folder):
        for name in dirs:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, stat.S_IRWXU | 0o055)


def remove_tree(folder: Path) -> None:
    unseal(folder)
    shutil.rmtree(folder, ignore_errors=True)


def data_archives(debs: list[tuple[str, Path]], scratch: Path) -> Iterator[tuple[str, Path]]:
    """Each .deb's data archive as a plain tar in ``scratch``, in the order
    given, removed once the caller moves on. ``dpkg-deb`` decompresses
    (xz, mostly: ~80% of an image build) one process per CPU, ahead of the
    caller."""
    def extract(item: tuple[int, tuple[str, Path]]) -> Path:
        index, (package, deb) = item
        out = scratch / f"{index}.tar"
        try:
            with open(out, "wb") as sink:
                done = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=sink,
                                      stderr=subprocess.PIPE, check=False)
        except OSError as exc:
            raise ImageError(f"cannot run `dpkg-deb`: {exc.strerror}",
                             reason=ImageErrorReason.NO_APT) from exc
        if done.returncode != 0:
            raise Assembly._bad(package, "`dpkg-deb --fsys-tarfile` failed: "
                                + done.stderr.decode(errors="replace").strip())
        return out

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = [pool.submit(extract, item) for item in enumerate(debs)]
        try:
            for (package, _), future in zip(debs, futures, strict=True):
                path = future.result()
                try:
                    yield package, path
                finally:
                    path.unlink(missing_ok=True)
        finally:
            for future in futures:
                future.cancel()
            for leftover in scratch.glob("*.tar"):  # finished after an error
                leftover.unlink(missing_ok=True)


def assemble(debs: Iterable[tuple[str, Path]], symlinks: Mapping[str, str],
             files: Mapping[str, FileSpec], root: Path, tar: Path) -> str:
    """Unpack ``debs`` ((package, path), in the order given: a later one wins
    a shared path) into the empty folder ``root``, add the definition's
    entries, write the tar to ``tar`` and seal ``root``. Returns the tar's
    sha256 hex, the image's digest. ``tar``'s folder holds scratch files
    while it works."""
    assembly = Assembly(root)
    scratch = tar.parent / "debs.scratch"
    scratch.mkdir(exist_ok=True)
    try:
        for package, data in data_archives(list(debs), scratch):
            assembly.add_deb(data, package)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assembly.add_definition(symlinks, files)
    hexdigest = assembly.write_tar(tar)
    assembly.seal()
    return hexdigest
