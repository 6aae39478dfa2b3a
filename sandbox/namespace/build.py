"""Build hitz's small C helpers once per machine.

Two static C programs: the sandbox launcher (``launcher.c``; see its header
comment for why it exists) and the docker backend's container init
(``../docker_init.c``). Each is compiled on first use with the host's C
compiler, next to its source when the installation is writable (so it
belongs to the installation and no cache clean-up rebuilds it), else in the
user's cache folder. Its name carries the digest of its source and of every
file that source includes with quotes (``../landlock.h``), so an upgrade of
hitz never runs a stale helper, and concurrent first runs do not race (each
compiles to a temporary name and renames it into place).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from hitz.sandbox.errors import SandboxUnavailable

SOURCE = Path(__file__).with_name("launcher.c")
_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
_QUOTE_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hitz"


def launcher_path() -> str:
    """The launcher's path, compiling it first if this machine lacks it.

    Raises SandboxUnavailable when no C compiler can build it.
    """
    # Static if it can be (dynamic where the static C library is missing):
    # exec of a static binary skips the dynamic loader, which is most of the
    # launcher's start-up cost.
    return helper_path(SOURCE, "hitz-launch", "the sandbox launcher", static_only=False)


def helper_path(source: Path, name: str, what: str, *, static_only: bool) -> str:
    """The path of ``source`` compiled as ``name-DIGEST``, compiling it first
    if this machine lacks it. ``what`` names it in errors ("the sandbox
    launcher"). ``static_only``: a program that must run where there is no
    C library (inside any container image); else it is built dynamic when
    the static C library is missing.

    Raises SandboxUnavailable when no folder is writable or no C compiler
    can build it.
    """
    try:
        digest = source_digest(source)
    except OSError as exc:  # an installation without its C sources (package-data)
        raise SandboxUnavailable(
            f"cannot read the source of {what}: {exc.filename}: {exc.strerror}",
            hint="reinstall hitz: its wheel carries the sources of its C helpers",
        ) from exc
    folders = (
        source.parent,
        cache_root() / "bin",
        Path(tempfile.gettempdir()) / f"hitz-{os.getuid()}",
    )
    for folder in folders:
        target = folder / f"{name}-{digest}"
        if os.access(target, os.X_OK):
            return str(target)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            _compile(source, target, what, static_only=static_only)
            return str(target)
    raise SandboxUnavailable(
        f"no writable folder to build {what} in",
        hint="set XDG_CACHE_HOME to a writable folder",
    )


def source_digest(source: Path) -> str:
    """16 hex digits of SHA-256 over ``source`` and, depth first, every file
    it includes with quotes (found, as gcc finds them, beside the file that
    includes them). A change to any of them names a new binary."""
    h = hashlib.sha256()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        text = path.read_bytes()
        h.update(f"{path.name}\0{len(text)}\0".encode())
        h.update(text)
        for included in _QUOTE_INCLUDE.findall(text):
            add(path.parent / included.decode())

    add(source)
    return h.hexdigest()[:16]


def _compile(source: Path, target: Path, what: str, *, static_only: bool) -> None:
    named = os.environ.get("CC")
    # shutil.which: a CC that names no program is reported, not run into an OSError.
    cc = shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SandboxUnavailable(
            f"cannot build {what}: " + (f"CC names `{named}`, which is not a program"
                                        if named else "no C compiler found"),
            hint=f"hitz compiles {what} once per machine; install a C compiler with "
            "`apt-get install gcc libc6-dev`" + (", or set CC to one" if named else ""),
        )
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    errors = ""
    attempts: tuple[tuple[str, ...], ...] = (("-static",),) if static_only else (("-static",), ())
    for extra in attempts:
        proc = subprocess.run(
            [cc, *_FLAGS, *extra, "-o", str(tmp), str(source)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode == 0:
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
            return
        errors = proc.stderr
    tmp.unlink(missing_ok=True)
    static = " with the static C library" if static_only else ""
    raise SandboxUnavailable(
        f"cannot build {what} with `{cc}`",
        detail=errors.strip()[-2000:],
        hint=f"install a working C toolchain{static}: `apt-get install gcc libc6-dev`",
    )
