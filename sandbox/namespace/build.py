"""Build the sandbox launcher (``launcher.c``) once per machine.

The launcher is a small static C program (see its header comment for why it
exists). It is compiled on first use with the host's C compiler, next to its
source when the installation is writable (so it belongs to the installation
and no cache clean-up rebuilds it), else in the user's cache folder. Its name
carries the source's digest, so an upgrade of hitz never runs a stale
launcher, and concurrent first runs do not race (each compiles to a
temporary name and renames it into place).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hitz.sandbox.errors import SandboxUnavailable

SOURCE = Path(__file__).with_name("launcher.c")
_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hitz"


def launcher_path() -> str:
    """The launcher's path, compiling it first if this machine lacks it.

    Raises SandboxUnavailable when no C compiler can build it.
    """
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    folders = (
        SOURCE.parent,
        cache_root() / "bin",
        Path(tempfile.gettempdir()) / f"hitz-{os.getuid()}",
    )
    for folder in folders:
        target = folder / f"hitz-launch-{digest}"
        if os.access(target, os.X_OK):
            return str(target)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            _compile(target)
            return str(target)
    raise SandboxUnavailable(
        "no writable folder to build the sandbox launcher in",
        hint="set XDG_CACHE_HOME to a writable folder",
    )


def _compile(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SandboxUnavailable(
            "cannot build the sandbox launcher: no C compiler found",
            hint="hitz compiles its small sandbox launcher once per machine; install one "
            "with `apt-get install gcc libc6-dev`",
        )
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    errors = ""
    # Static first: exec of a static binary skips the dynamic loader, which
    # is most of the launcher's start-up cost. Dynamic if libc.a is missing.
    for extra in (("-static",), ()):
        proc = subprocess.run(
            [cc, *_FLAGS, *extra, "-o", str(tmp), str(SOURCE)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode == 0:
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
            return
        errors = proc.stderr
    tmp.unlink(missing_ok=True)
    raise SandboxUnavailable(
        f"cannot build the sandbox launcher with `{cc}`",
        detail=errors.strip()[-2000:],
        hint="install a working C toolchain: `apt-get install gcc libc6-dev`",
    )
