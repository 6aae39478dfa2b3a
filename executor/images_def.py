"""Image definitions (``images/NAME.toml``) and the lock file (``hitz.lock``).

A definition names what goes into an image; the lock says exactly what went
in the last time, so that a later build, on this machine or another, fetches
the same package versions and must produce the same digest. Both are TOML;
the format is documented in docs/images.md.

Every problem with a definition is a ``ManifestError`` naming the file and
the line (found with ``toml_lines.scan``, like the manifest's errors); every
other problem of an image build is an ``ImageError`` with a reason tests
assert on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hitz.executor.errors import HitzError, ManifestError, ManifestErrorReason, Reason
from hitz.executor.suggest import suggest
from hitz.executor.toml_lines import KeyPath, Pos, scan

IMAGES_DIR = "images"
LOCK_FILE = "hitz.lock"
LOCK_VERSION = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]*")
# Debian policy 5.6.1: lowercase letters, digits, "+", "-", "."; two characters at least.
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_SUITE = re.compile(r"[a-z0-9][a-z0-9.-]*")
_COMPONENT = re.compile(r"[a-z0-9][a-z0-9/-]*")
_MODE = re.compile(r"0?[0-7]{3}")
_KEYS = {
    "description": "a string",
    "suite": 'a Debian suite, such as "bookworm"',
    "mirror": 'a Debian mirror URL, such as "http://deb.debian.org/debian"',
    "components": 'a list of archive components, such as ["main"]',
    "packages": 'a list of Debian package names, such as ["busybox-static"]',
    "symlinks": 'a table of absolute paths to link targets, such as "/bin/sh" = "busybox"',
    "files": 'a table of absolute paths to {content = "...", mode = "0644"}',
}


class ImageErrorReason(Reason):
    UNKNOWN_IMAGE = "unknown-image"  # no images/NAME.toml
    NO_APT = "no-apt"  # apt-get, apt-cache or dpkg-deb missing on the host
    MISSING_PACKAGE = "missing-package"  # apt knows no such package (or version)
    FETCH_FAILED = "fetch-failed"  # the mirror could not be reached or gave bad bytes
    DIGEST_MISMATCH = "digest-mismatch"  # the build does not give hitz.lock's digest
    LOCK_STALE = "lock-stale"  # the definition changed since hitz.lock pinned it
    BAD_LOCK = "bad-lock"  # hitz.lock cannot be read
    BAD_PACKAGE = "bad-package"  # a .deb holds something an image cannot
    NOT_BUILT = "not-built"  # asked for a built image that is not in the cache
    DOCKER = "docker"  # the Docker engine could not import or find an image
    IO_ERROR = "io-error"  # the cache folder could not be written


class ImageError(HitzError):
    """An image could not be built, found or pinned. Exit status 2: each
    reason is something the user fixes (a name, the lock, the host's apt),
    not a failed task."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class FileSpec:
    content: str
    mode: int


@dataclass(frozen=True, slots=True)
class Definition:
    """One ``images/NAME.toml``. ``lines`` maps each package name to the line
    that lists it (for apt's errors); ``digest`` is the sha256 of the file's
    bytes, which the lock records to notice a changed definition."""

    name: str
    path: Path
    display: str
    suite: str
    mirror: str
    components: tuple[str, ...]
    packages: tuple[str, ...]
    symlinks: Mapping[str, str]
    files: Mapping[str, FileSpec]
    description: str
    digest: str
    package_lines: Mapping[str, int]


def definition_names(project_root: Path) -> list[str]:
    """The names of every image defined in ``project_root/images``, sorted."""
    folder = project_root / IMAGES_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".toml") and NAME_PATTERN.fullmatch(n[:-5]))


def find_definition(project_root: Path, name: str) -> Path:
    """``images/NAME.toml`` of the project; ImageError (UNKNOWN_IMAGE) with a
    nearest match when there is none."""
    path = project_root / IMAGES_DIR / f"{name}.toml"
    if NAME_PATTERN.fullmatch(name) and path.is_file():
        return path
    known = definition_names(project_root)
    near = suggest(name, known)
    if near:
        hint = f"did you mean `{near}`?"
    elif known:
        hint = "images of this project: " + ", ".join(f"`{n}`" for n in known)
    else:
        hint = f"define one in `{IMAGES_DIR}/{name}.toml` (see docs/images.md)"
    raise ImageError(f"unknown image `{name}`: there is no `{IMAGES_DIR}/{name}.toml`",
                     hint=hint, reason=ImageErrorReason.UNKNOWN_IMAGE)


def load_definition(path: Path, display: str | None = None) -> Definition:
    """Read and validate one definition; ManifestError naming file:line for
    anything wrong with it."""
    shown = display or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the image definition: {exc.strerror}", path=shown,
                            reason=ManifestErrorReason.NOT_FOUND) from exc
    text = data.decode("utf-8", errors="replace")
    source = _DefSource(shown, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        pos = (int(match.group(1)), int(match.group(2))) if match else None
        message = str(exc).split(" (at ")[0]
        raise source.error(f"invalid TOML: {message}", ManifestErrorReason.TOML_SYNTAX,
                           pos=pos) from exc
    return _Validator(raw, source, path.stem, path, hashlib.sha256(data).hexdigest()).run()


class _DefSource:
    def __init__(self, display: str, text: str) -> None:
        self.display = display
        self.lines = text.split("\n")
        self.text = text
        self._positions: tuple[dict[KeyPath, Pos], dict[KeyPath, Pos]] | None = None

    def pos(self, path: KeyPath, key: bool = False) -> Pos | None:
        if self._positions is None:
            found = scan(self.text)
            self._positions = (found.keys, found.values)
        keys, values = self._positions
        for end in range(len(path), 0, -1):
            where = (keys if key else values).get(path[:end]) or keys.get(path[:end])
            if where is not None:
                return where
        return None

    def error(self, message: str, reason: ManifestErrorReason, path: KeyPath = (), *,
              hint: str | None = None, key: bool = False,
              pos: Pos | None = None) -> ManifestError:
        if pos is None and path:
            pos = self.pos(path, key)
        detail = None
        if pos is not None and 1 <= pos[0] <= len(self.lines):
            gutter = f"{pos[0]:>4} | "
            detail = (gutter + self.lines[pos[0] - 1].rstrip("\r") + "\n"
                      + " " * (len(gutter) - 2) + "| " + " " * (pos[1] - 1) + "^")
        return ManifestError(message, path=self.display, line=pos[0] if pos else None,
                             column=pos[1] if pos else None, detail=detail, hint=hint,
                             reason=reason)


class _Validator:
    def __init__(self, raw: dict[str, Any], source: _DefSource, name: str, path: Path,
                 digest: str) -> None:
        self.raw, self.source, self.name, self.path, self.digest = raw, source, name, path, digest

    def fail(self, path: KeyPath, message: str, *, hint: str | None = None,
             key: bool = False, reason: ManifestErrorReason = ManifestErrorReason.BAD_VALUE,
             ) -> ManifestError:
        return self.source.error(message, reason, path, hint=hint, key=key)

    def run(self) -> Definition:
        raw = self.raw
        for key in raw:
            if key not in _KEYS:
                near = suggest(key, _KEYS)
                raise self.fail((key,), f'unknown key "{key}"', key=True,
                                reason=ManifestErrorReason.UNKNOWN_KEY,
                                hint=f'did you mean "{near}"?' if near else
                                "an image definition has " + ", ".join(f'"{k}"' for k in _KEYS))
        for required in ("suite", "packages"):
            if required not in raw:
                raise self.source.error(
                    f'missing "{required}": {_KEYS[required]}',
                    ManifestErrorReason.MISSING_KEY, pos=(1, 1))
        suite = self.string("suite", _SUITE)
        mirror = self.string("mirror", re.compile(r"https?://[^\s\"'\]]+"), DEFAULT_MIRROR)
        description = self.string("description", re.compile(r".*", re.S), "")
        components = tuple(self.strings("components", _COMPONENT, ["main"]))
        packages = self.strings("packages", _PACKAGE, None)
        if not packages:
            raise self.fail(("packages",), '"packages" is empty',
                            hint='name at least one package, such as "busybox-static"')
        lines = {}
        for i, package in enumerate(packages):
            if package in lines:
                raise self.fail(("packages", i), f'package "{package}" is listed twice')
            pos = self.source.pos(("packages", i))
            lines[package] = pos[0] if pos else 0
        return Definition(
            name=self.name, path=self.path, display=self.source.display, suite=suite,
            mirror=mirror.rstrip("/"), components=components, packages=tuple(packages),
            symlinks=self.symlinks(), files=self.files(), description=description,
            digest=self.digest, package_lines=lines,
        )

    def string(self, key: str, pattern: re.Pattern[str], default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str):
            raise self.fail((key,), f'"{key}" must be {_KEYS[key]}, got {_show(value)}',
                            reason=ManifestErrorReason.WRONG_TYPE)
        if not pattern.fullmatch(value):
            raise self.fail((key,), f'"{key}" must be {_KEYS[key]}, got {_show(value)}')
        return value

    def strings(self, key: str, pattern: re.Pattern[str], default: list[str] | None,
                ) -> list[str]:
        value = self.raw.get(key, default)
        if not isinstance(value, list):
            raise self.fail((key,), f'"{key}" must be {_KEYS[key]}, got {_show(value)}',
                            reason=ManifestErrorReason.WRONG_TYPE)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not pattern.fullmatch(item):
                raise self.fail((key, i), f'"{key}" must be {_KEYS[key]}, got {_show(item)}',
                                reason=ManifestErrorReason.WRONG_TYPE
                                if not isinstance(item, str) else ManifestErrorReason.BAD_VALUE)
        return value

    def table(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key, {})
        if not isinstance(value, dict):
            raise self.fail((key,), f'"{key}" must be {_KEYS[key]}, got {_show(value)}',
                            reason=ManifestErrorReason.WRONG_TYPE)
        for path in value:
            self.image_path(key, path)
        return value

    def image_path(self, key: str, path: str) -> None:
        parts = path.split("/")
        if (not path.startswith("/") or path == "/" or "\0" in path
                or any(p in ("", ".", "..") for p in parts[1:])):
            raise self.fail((key, path), f'{key[:-1]} path "{path}" must be absolute and'
                            ' normalised, such as "/usr/bin/cc"', key=True)

    def symlinks(self) -> dict[str, str]:
        links = self.table("symlinks")
        for path, target in links.items():
            if not isinstance(target, str) or not target or "\0" in target:
                raise self.fail(("symlinks", path), f'symlink "{path}" needs a target path,'
                                f" got {_show(target)}", reason=ManifestErrorReason.WRONG_TYPE)
        return links

    def files(self) -> dict[str, FileSpec]:
        found = {}
        for path, spec in self.table("files").items():
            if isinstance(spec, str):
                spec = {"content": spec}
            if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
                raise self.fail(("files", path), f'file "{path}" needs a "content" string',
                                reason=ManifestErrorReason.WRONG_TYPE)
            extra = set(spec) - {"content", "mode"}
            if extra:
                raise self.fail(("files", path, sorted(extra)[0]),
                                f'file "{path}": unknown key "{sorted(extra)[0]}"', key=True,
                                hint='a file has "content" and "mode"',
                                reason=ManifestErrorReason.UNKNOWN_KEY)
            mode = spec.get("mode", "0644")
            if not isinstance(mode, str) or not _MODE.fullmatch(mode):
                raise self.fail(("files", path, "mode"), f'file "{path}": "mode" must be an'
                                f' octal string such as "0644" or "0755", got {_show(mode)}')
            found[path] = FileSpec(spec["content"], int(mode, 8) & 0o777)
        return found


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return str(value)


# --- hitz.lock -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockedPackage:
    name: str
    version: str
    architecture: str
    sha256: str  # of the .deb file
    size: int

    @property
    def pin(self) -> str:
        """What ``apt-get download`` takes to fetch exactly this version."""
        return f"{self.name}:{self.architecture}={self.version}"


@dataclass(frozen=True, slots=True)
class LockedImage:
    """What hitz.lock says about one image: its digest ("sha256:HEX"), the
    sha256 of the definition it was built from, and every package."""

    digest: str
    definition: str
    suite: str
    architecture: str
    packages: tuple[LockedPackage, ...]


def read_lock(path: Path) -> dict[str, LockedImage]:
    """The images pinned in ``path`` (none if it does not exist); ImageError
    (BAD_LOCK) when it cannot be read or is not a lock file hitz wrote."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ImageError(f"cannot read `{path}`: {exc.strerror}",
                         reason=ImageErrorReason.BAD_LOCK) from exc
    try:
        raw = tomllib.loads(text)
        if raw.get("version") != LOCK_VERSION:
            raise ValueError(f"unknown lock version {raw.get('version')!r}")
        images = {}
        for name, entry in raw.get("images", {}).items():
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"image name {name!r} is not well formed")
            packages = tuple(
                LockedPackage(_locked(p, "name"), _locked(p, "version"),
                              _locked(p, "architecture"), _locked(p, "sha256"), int(p["size"]))
                for p in entry["packages"]
            )
            images[name] = LockedImage(_locked(entry, "digest"), _locked(entry, "definition"),
                                       _locked(entry, "suite"), _locked(entry, "architecture"),
                                       packages)
        return images
    except (tomllib.TOMLDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageError(
            f"`{path}` is not a lock file hitz can read: {exc}",
            hint="it is written by `hitz image build`; restore it from version control,"
            " or delete it and rebuild the images to pin them again",
            reason=ImageErrorReason.BAD_LOCK,
        ) from exc


# What each field of hitz.lock may hold. Every one ends up in a path of the
# image cache (debs/SHA256.deb, built/HEX/, apt/SUITE-ARCH-MIRROR/) or in an
# argument of apt-get (NAME:ARCH=VERSION): a lock file from a pull request
# must not name a file outside the cache or smuggle in an option.
_LOCK_FIELDS = {
    "digest": re.compile(r"sha256:[0-9a-f]{64}"),
    "definition": re.compile(r"[0-9a-f]{64}"),
    "sha256": re.compile(r"[0-9a-f]{64}"),
    "suite": _SUITE,
    "architecture": re.compile(r"[a-z0-9][a-z0-9-]*"),
    "name": _PACKAGE,
    # Debian policy 5.6.12: [epoch:]upstream[-revision], alphanumerics and . + ~ - :
    "version": re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~:-]*"),
}


def _locked(entry: Mapping[str, Any], key: str) -> str:
    """``entry[key]`` of a lock file, checked against ``_LOCK_FIELDS``;
    ValueError (a BAD_LOCK for the caller) names the field otherwise."""
    value = entry[key]
    if not isinstance(value, str) or not _LOCK_FIELDS[key].fullmatch(value):
        raise ValueError(f"{key} {value!r} is not well formed")
    return value


def write_lock(path: Path, images: Mapping[str, LockedImage]) -> None:
    """Write ``images`` to ``path`` atomically, sorted, one package a line,
    so a change reads well in a diff."""
    out = [
        "# Written by `hitz image build`: the exact contents of each image of images/.",
        "# Review changes like code; `hitz image build NAME --update` re-pins an image.",
        f"version = {LOCK_VERSION}",
    ]
    for name in sorted(images):
        image = images[name]
        out += [
            "",
            f"[images.{_toml_key(name)}]",
            f"digest = {json.dumps(image.digest)}",
            f"definition = {json.dumps(image.definition)}",
            f"suite = {json.dumps(image.suite)}",
            f"architecture = {json.dumps(image.architecture)}",
            "packages = [",
        ]
        for p in sorted(image.packages, key=lambda p: (p.name, p.architecture)):
            out.append(
                f"  {{ name = {json.dumps(p.name)}, version = {json.dumps(p.version)},"
                f" architecture = {json.dumps(p.architecture)}, size = {p.size},"
                f" sha256 = {json.dumps(p.sha256)} }},"
            )
        out.append("]")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("\n".join(out) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot write `{path}`: {exc.strerror}",
                         reason=ImageErrorReason.IO_ERROR) from exc


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
