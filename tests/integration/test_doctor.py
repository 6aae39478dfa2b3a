"""`hitz doctor` probes the real host: on this one the sandbox must be usable."""

from __future__ import annotations

import json
import subprocess
import sys

HITZ = [sys.executable, "-m", "hitz.executor"]


def test_doctor_reports_what_the_namespace_backend_needs() -> None:
    proc = subprocess.run([*HITZ, "doctor"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [line.split()[1] for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert names == ["namespaces", "seccomp", "launcher", "landlock", "cgroups", "docker"]
    required = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()
                if line.split()[1] in ("namespaces", "seccomp", "launcher")}
    assert required == {"namespaces": "ok", "seccomp": "ok", "launcher": "ok"}


def test_doctor_json_lists_every_check_with_its_verdict() -> None:
    proc = subprocess.run([*HITZ, "doctor", "--json"], capture_output=True, text=True,
                          timeout=60)
    checks = json.loads(proc.stdout)
    assert {c["name"] for c in checks} == {
        "namespaces", "seccomp", "launcher", "landlock", "cgroups", "docker"}
    assert all(set(c) == {"name", "ok", "detail", "hint", "required"} for c in checks)
    assert proc.returncode == (0 if all(c["ok"] for c in checks if c["required"]) else 1)
