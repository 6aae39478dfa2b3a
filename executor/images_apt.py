"""The one border between image builds and the host's apt.

hitz asks apt three things, always with a private configuration (its own
sources list, package lists, cache and an *empty* dpkg status, under the
hitz cache folder), so the host's installed packages, pins and sources
never leak into an image:

- ``update``: fetch the suite's package lists from the mirror;
- ``resolve``: the dependency closure of the definition's packages, by
  apt's own resolver (``apt-get install --print-uris`` against the empty
  status), with each .deb's version, size and SHA256 from the signed lists;
- ``download``: the exact ``name:arch=version`` pins into a folder.

apt's failures are translated here, once, into ``ImageError`` in the
user's terms; nothing else runs apt or parses its output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from hitz.executor.images_def import (
    DEFAULT_KEYRING,
    Definition,
    ImageError,
    ImageErrorReason,
    LockedPackage,
)

# 'URI' FILENAME SIZE SHA256:HEX, one line per .deb (apt-get --print-uris).
_URI_LINE = re.compile(r"^'([^']+)' (\S+) (\d+) SHA256:([0-9a-f]{64})$")
_NOT_FOUND = re.compile(
    r"E: (?:Unable to locate package (\S+)"
    r"|Version '([^']+)' for '([^']+)' was not found"
    r"|Package '([^']+)' has no installation candidate)"
)


def host_architecture() -> str:
    """dpkg's name of this host's architecture ("amd64")."""
    _require("dpkg")
    out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() or "amd64"


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise ImageError(
                f"`{tool}` is not installed: hitz builds images with the host's apt",
                hint="run image builds on a Debian or Ubuntu host (`apt-get install apt"
                " dpkg debian-archive-keyring`), or set the task's rootfs to \"host\"",
                reason=ImageErrorReason.NO_APT,
            )


@dataclass(frozen=True, slots=True)
class Fetched:
    """One .deb apt would fetch: the pin to lock and where it comes from."""

    package: LockedPackage
    uri: str


class Apt:
    """apt with a private state folder ``state`` for one suite, mirror and
    architecture (``state`` is created; several builds may share it, one at
    a time: the caller holds the image lock)."""

    def __init__(self, state: Path, definition: Definition, architecture: str) -> None:
        _require("apt-get", "dpkg-deb", "dpkg")
        if not os.path.exists(DEFAULT_KEYRING):
            raise ImageError(
                f"Debian's archive keyring `{DEFAULT_KEYRING}` is missing: hitz cannot"
                " check the packages' signatures",
                hint="`apt-get install debian-archive-keyring`",
                reason=ImageErrorReason.NO_APT,
            )
        self.definition = definition
        self.state = state
        for folder in ("lists/partial", "archives/partial", "cache", "parts"):
            (state / folder).mkdir(parents=True, exist_ok=True)
        (state / "status").touch()
        sources = state / "sources.list"
        line = (f"deb [signed-by={DEFAULT_KEYRING} arch={architecture}] {definition.mirror}"
                f" {definition.suite} {' '.join(definition.components)}\n")
        if not sources.exists() or sources.read_text() != line:
            sources.write_text(line)
            for old in (state / "lists").glob("*_Packages*"):
                old.unlink()
        self.options = [
            f"-oDir::Etc::SourceList={sources}",
            f"-oDir::Etc::SourceParts={state / 'parts'}",
            f"-oDir::Etc::Preferences={state / 'preferences'}",
            f"-oDir::Etc::PreferencesParts={state / 'parts'}",
            f"-oDir::State::Lists={state / 'lists'}",
            f"-oDir::State::status={state / 'status'}",
            f"-oDir::Cache={state / 'cache'}",
            f"-oDir::Cache::archives={state / 'archives'}",
            f"-oAPT::Architecture={architecture}",
            "-oAPT::Architectures=",
            f"-oAPT::Architectures::={architecture}",
            "-oAPT::Install-Recommends=false",
            "-oAPT::Install-Suggests=false",
            "-oAcquire::ForceHash=SHA256",
            "-oAcquire::Languages=none",
            # The private folders belong to the invoking user; apt's download
            # sandbox user (_apt) could not write them.
            "-oAPT::Sandbox::User=" + _user(),
            "-oDebug::NoLocking=true",
            "-oDPkg::Lock::Timeout=0",
        ]

    def _run(self, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APT_")}
        env["LC_ALL"] = "C"
        env["DEBIAN_FRONTEND"] = "noninteractive"
        try:
            return subprocess.run(["apt-get", *self.options, *args], capture_output=True,
                                  text=True, cwd=cwd, env=env, check=False)
        except OSError as exc:
            raise ImageError(f"cannot run `apt-get`: {exc.strerror}",
                             reason=ImageErrorReason.NO_APT) from exc

    def update(self) -> None:
        """Fetch the suite's package lists (signature-checked by apt)."""
        done = self._run(["update", "-q"])
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith(("E:", "W:"))]
        if done.returncode != 0 or any(ln.startswith("E:") for ln in errors):
            raise ImageError(
                f"cannot fetch the package lists of `{self.definition.suite}` from"
                f" `{self.definition.mirror}`",
                detail=_summary(errors or done.stderr.splitlines()),
                hint=f"check the mirror and suite in `{self.definition.display}`, and that"
                " the mirror is reachable",
                reason=ImageErrorReason.FETCH_FAILED,
                retryable=True,
            )

    def resolve(self, wanted: list[str]) -> list[Fetched]:
        """The dependency closure of ``wanted`` (names, or exact pins), as
        apt's resolver chooses it on an empty system, sorted by name."""
        done = self._run(["install", "--print-uris", "-qq", "-y", "--allow-unauthenticated=no",
                          *wanted])
        if done.returncode != 0:
            raise self._not_installable(done.stdout + done.stderr)
        found = []
        for line in done.stdout.splitlines():
            match = _URI_LINE.match(line)
            if match is None:
                continue
            uri, filename, size, sha256 = match.groups()
            name, version, arch = urllib.parse.unquote(filename).removesuffix(".deb").split("_")
            found.append(Fetched(LockedPackage(name, version, arch, sha256, int(size)), uri))
        if not found:
            raise ImageError(f"apt resolved no packages for `{self.definition.display}`",
                             detail=_summary((done.stdout + done.stderr).splitlines()),
                             reason=ImageErrorReason.MISSING_PACKAGE)
        return sorted(found, key=lambda f: (f.package.name, f.package.architecture))

    def download(self, packages: list[LockedPackage], into: Path) -> None:
        """Fetch exactly these versions into ``into`` (apt checks each .deb
        against the signed lists' SHA256)."""
        done = self._run(["download", "-q", *(p.pin for p in packages)], cwd=into)
        if done.returncode != 0:
            text = done.stdout + done.stderr
            if _NOT_FOUND.search(text):
                raise self._not_installable(text)
            raise ImageError(
                f"cannot download the packages of `{self.definition.display}` from"
                f" `{self.definition.mirror}`",
                detail=_summary(text.splitlines()),
                hint="check that the mirror is reachable; packages already fetched stay in"
                " the download cache",
                reason=ImageErrorReason.FETCH_FAILED,
                retryable=True,
            )

    def _not_installable(self, text: str) -> ImageError:
        """apt's complaint about a package, pinned to the definition's line."""
        definition = self.definition
        match = _NOT_FOUND.search(text)
        missing = None
        if match:
            missing = match.group(1) or match.group(3) or match.group(4)
            missing = missing.split(":")[0].split("=")[0] if missing else None
        line = definition.package_lines.get(missing or "", 0)
        where = f"{definition.display}:{line}: " if line else f"{definition.display}: "
        if match and match.group(2):
            return ImageError(
                f"{where}version {match.group(2)} of package `{missing}` is no longer on"
                f" the mirror",
                detail=_summary(text.splitlines()),
                hint=f"its .deb is not in the download cache either; `hitz image build"
                f" {definition.name} --update` pins the mirror's current versions (review"
                " the new hitz.lock)",
                reason=ImageErrorReason.MISSING_PACKAGE,
            )
        if missing:
            return ImageError(
                f"{where}package `{missing}` is not in Debian `{definition.suite}`"
                f" ({', '.join(definition.components)})",
                detail=_summary(text.splitlines()),
                hint=f"check the name with `apt-cache search {missing}` (on a"
                f" {definition.suite} host), or remove it from the definition",
                reason=ImageErrorReason.MISSING_PACKAGE,
            )
        return ImageError(
            f"{where}apt cannot install the packages of image `{definition.name}`",
            detail=_summary(text.splitlines()),
            hint="apt's resolver output is above; a package may conflict with another or"
            " depend on one the suite lacks",
            reason=ImageErrorReason.MISSING_PACKAGE,
        )


def _summary(lines: list[str], keep: int = 12) -> str:
    """apt's own words, trimmed: the error lines first, then the rest."""
    useful = [ln for ln in lines if ln.strip() and not ln.startswith(("Reading ", "Building "))]
    errors = [ln for ln in useful if ln.startswith("E:")]
    chosen = (errors or useful)[:keep]
    return "\n".join("  apt: " + ln for ln in chosen)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "root"
