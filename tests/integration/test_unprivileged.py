"""The namespace sandbox when hitz is an ordinary user, not root.

Then the launcher first enters a user namespace of its own (mapping the user
to 0) and the task's root maps to that user. The test drives
``NamespaceBackend`` directly with a ``SandboxSpec`` from a small script run
as uid 1000 (via setpriv, as root) with the system python3: the project's
venv lives under /root, which an ordinary user cannot enter, so the
``sandbox/`` folder is copied next to the script as the namespace package
``hitz.sandbox``. Run as a non-root user, the tests run the same script as
that user directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import COMMAND_GUARD_S, REPO, processes_with

pytestmark = pytest.mark.kernel

ORDINARY_UID = 1000

# Runs as the ordinary user: argv[1] the project, argv[2] a marker for the
# task's command line. Prints one JSON object.
DRIVER = r'''
import json, os, sys, time
from hitz.sandbox.namespace import NamespaceBackend
from hitz.sandbox.spec import BASE_ENV, InputMount, SandboxSpec

project, marker = sys.argv[1], sys.argv[2]
staging = os.path.join(project, ".hitz", "tmp", "probe")
logs = os.path.join(project, ".hitz", "logs")
os.makedirs(staging)
os.makedirs(logs)
script = f"""
: {marker}
cat src/in.txt > out/seen.txt
cat /proc/self/uid_map > out/uid_map.txt
id -u > out/id.txt
if echo evil > src/in.txt; then exit 77; fi
while [ ! -e out/go ]; do sleep 0.02; done
"""
spec = SandboxSpec(
    task="probe",
    argv=("/bin/sh", "-c", script),
    env=dict(BASE_ENV),
    inputs=(InputMount(os.path.join(project, "src/in.txt"), "src/in.txt"),),
    outputs=("out/",),
    staging_dir=staging,
    stdout_path=os.path.join(logs, "probe.stdout"),
    stderr_path=os.path.join(logs, "probe.stderr"),
    timeout=60.0,
)


def task_pid():
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read().startswith(b"/bin/sh\0-c\0\n: " + marker.encode()):
                    return name
        except OSError:
            pass
    return None


backend = NamespaceBackend()
deadline = time.monotonic() + 30
outside = None
try:
    backend.start(spec)
    # The task waits for out/go: look at its uid map from outside first.
    while outside is None and time.monotonic() < deadline:
        pid = task_pid()
        if pid is not None:
            with open(f"/proc/{pid}/uid_map") as f:
                outside = f.read()
        else:
            time.sleep(0.02)
    open(os.path.join(staging, "out", "go"), "w").close()
    results = []
    while not results and time.monotonic() < deadline:
        results = backend.wait(1.0)
finally:
    backend.close()
stderr = ""
if os.path.exists(spec.stderr_path):
    with open(spec.stderr_path) as f:
        stderr = f.read()
result = results[0] if results else None
print(json.dumps({
    "uid": os.getuid(),
    "status": result and result.status.value,
    "exit_code": result and result.exit_code,
    "message": result and result.message,
    "outputs": [[o.path, o.staged] for o in result.outputs] if result else [],
    "uid_map_outside": outside,
    "stderr": stderr,
}))
'''


@pytest.fixture
def shared(kernel_namespaces: None) -> Iterator[Path]:
    """A folder the ordinary user can reach (pytest's tmp_path is root's, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="hitz-unprivileged-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


def user_and_command(base: Path) -> tuple[int, list[str]]:
    """Who runs the driver and how: uid 1000 via setpriv when we are root,
    else ourselves."""
    env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={base / 'home'}",
           f"XDG_CACHE_HOME={base / 'home' / '.cache'}", f"PYTHONPATH={base / 'py'}",
           "PYTHONDONTWRITEBYTECODE=1"]
    if os.geteuid() != 0:
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        return os.getuid(), [*env, python]
    if not os.path.exists("/usr/bin/python3") or shutil.which("setpriv") is None:
        pytest.fail("running as root, this test needs /usr/bin/python3 and setpriv "
                    "(util-linux) to run the sandbox as an ordinary user")
    switch = ["setpriv", f"--reuid={ORDINARY_UID}", f"--regid={ORDINARY_UID}", "--clear-groups"]
    return ORDINARY_UID, [*switch, *env, "/usr/bin/python3"]


def test_sandbox_works_for_an_ordinary_user(shared: Path, marker: str) -> None:
    uid, command = user_and_command(shared)
    shutil.copytree(
        REPO / "sandbox", shared / "py" / "hitz" / "sandbox",
        ignore=shutil.ignore_patterns("__pycache__", "hitz-launch-*", ".hitz-launch-*"),
    )
    # The sandbox's one dependency outside the standard library: the seccomp
    # compiler, a single module over the host's libseccomp.
    import pyseccomp

    shutil.copy(pyseccomp.__file__, shared / "py" / "pyseccomp.py")
    for folder, dirs, files in os.walk(shared / "py"):
        for name in dirs + files:
            path = os.path.join(folder, name)
            os.chmod(path, os.stat(path).st_mode | 0o444 | (0o111 if name in dirs else 0))
    (shared / "drive.py").write_text(DRIVER)
    project = shared / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "in.txt").write_text("input\n")
    (shared / "home").mkdir()
    for path in (project, project / "src", project / "src" / "in.txt", shared / "home"):
        os.chown(path, uid, uid)  # writable by the user: only the sandbox keeps the input safe

    proc = subprocess.run(
        [*command, str(shared / "drive.py"), str(project), marker],
        capture_output=True, text=True, timeout=COMMAND_GUARD_S, check=False,
    )
    assert proc.returncode == 0, f"the driver failed:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    out = project / ".hitz" / "tmp" / "probe" / "out"

    assert report["uid"] == uid
    assert (report["status"], report["exit_code"]) == ("succeeded", 0), report
    assert (out / "seen.txt").read_text() == "input\n"
    assert (out / "seen.txt").stat().st_uid == uid
    assert (out / "id.txt").read_text() == "0\n"
    # Seen from the host, the task's root is the user; seen from inside, it
    # is the 0 of the launcher's own user namespace, which is the user.
    assert report["uid_map_outside"].split() == ["0", str(uid), "1"]
    assert (out / "uid_map.txt").read_text().split() == ["0", "0", "1"]
    assert "Read-only file system" in report["stderr"]
    assert (project / "src" / "in.txt").read_text() == "input\n"
    assert processes_with(marker) == []
