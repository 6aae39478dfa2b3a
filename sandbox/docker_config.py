"""What a docker task's container is made of, from its spec: the staging
folders its outputs are written to, the binds of its inputs, its seccomp
profile as the engine takes it and the /proc paths it must not see. Pure
functions of the spec and the host's files (no engine call), kept apart
from the backend's engine work in docker.py.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hitz.sandbox.errors import SandboxError, SandboxErrorReason
from hitz.sandbox.policy import Landlock, Policy, Seccomp
from hitz.sandbox.spec import SandboxSpec


def staging_folders(spec: SandboxSpec, uid: int, gid: int) -> list[tuple[str, str]]:
    """Make the staging folders a task writes its outputs into (every
    writable root, and each folder a declared output needs inside one),
    owned by the container's user. Returns (project-relative root, host
    folder) of each writable root, parents first, as plan.py binds them."""
    from hitz.sandbox.namespace.plan import writable_roots

    roots = writable_roots(spec.outputs)
    folders = {os.path.join(spec.staging_dir, root) if root else spec.staging_dir
               for root in roots}
    for out in spec.outputs:
        rel = out.rstrip("/") if out.endswith("/") else os.path.dirname(out)
        folders.add(os.path.join(spec.staging_dir, rel) if rel else spec.staging_dir)
    for folder in sorted(folders):
        os.makedirs(folder, exist_ok=True)
        if (os.stat(folder).st_uid, os.stat(folder).st_gid) != (uid, gid):
            os.chown(folder, uid, gid)
    return [(root, os.path.join(spec.staging_dir, root) if root else spec.staging_dir)
            for root in roots]


def input_binds(spec: SandboxSpec) -> list[tuple[str, str]]:
    """(host source, container target) of each declared input; an input
    inside a directory input is visible through it and not bound again."""
    binds: list[tuple[str, str]] = []
    dirs: list[str] = []
    for mount in sorted(spec.inputs, key=lambda m: m.target):
        if any(mount.target == d or mount.target.startswith(d + "/") for d in dirs):
            continue
        if mount.is_dir:
            dirs.append(mount.target)
        binds.append((mount.source, f"{spec.cwd}/{mount.target}"))
    return binds


def seccomp_option(policy: Policy, task: str) -> str:
    """The value of Docker's ``seccomp=`` security option for ``policy``:
    the profile's JSON text (the engine takes content, not a path), or
    "unconfined". Raises SandboxError for an unreadable or non-JSON file."""
    from hitz.sandbox.docker_seccomp import render_default, render_strict

    if policy.seccomp is Seccomp.UNCONFINED:
        return "unconfined"
    if policy.seccomp is Seccomp.STRICT:
        return render_strict()
    if policy.seccomp is Seccomp.PROFILE:
        path = policy.seccomp_profile or ""
        where = f"task `:{task}`: seccomp profile `{path}`"
        try:
            with open(path, "rb") as f:
                text = f.read().decode()
            profile = json.loads(text)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"not JSON: {exc}"
            raise SandboxError(f"{where}: {why}",
                               hint="seccomp takes a profile in Docker's seccomp JSON format",
                               reason=SandboxErrorReason.SETUP_FAILED) from exc
        if not isinstance(profile, dict) or "defaultAction" not in profile:
            raise SandboxError(f'{where}: not a Docker seccomp profile: no "defaultAction"',
                               reason=SandboxErrorReason.SETUP_FAILED)
        if policy.landlock is not Landlock.OFF:
            _allow_landlock(profile)
        return json.dumps(profile, separators=(",", ":"))
    return render_default()


def _allow_landlock(profile: dict[str, Any]) -> None:
    """Let hitz's init apply Landlock under a profile file that does not
    mention it. The namespace launcher applies Landlock before it installs
    the profile; Docker installs the profile before the init runs, so an
    allow-list that does not name these calls (Docker's own default of
    20.10 does not) would make a kernel with Landlock look like one
    without. These calls only ever take rights away; a profile that names
    any of them is left as its author wrote it."""
    from hitz.sandbox.docker_seccomp import LANDLOCK_SYSCALLS

    if profile.get("defaultAction") == "SCMP_ACT_ALLOW":
        return  # allowed already; runc refuses a rule repeating the default
    rules = profile.get("syscalls")
    if rules is None:
        rules = profile["syscalls"] = []
    if not isinstance(rules, list):
        return  # the engine will say what is wrong with it
    named = {name for rule in rules if isinstance(rule, dict)
             for name in [*(rule.get("names") or []), rule.get("name")]
             if isinstance(name, str)}
    if named.isdisjoint(LANDLOCK_SYSCALLS):
        rules.append({"names": list(LANDLOCK_SYSCALLS), "action": "SCMP_ACT_ALLOW"})


# Docker's default masked paths (moby oci/defaults.go), then the namespace
# sandbox's list (namespace/plan.py).
_DOCKER_MASKED = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                  "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                  "/proc/sched_debug", "/proc/scsi", "/sys/firmware")


def masked_paths() -> list[str]:
    from hitz.sandbox.namespace.plan import _PROC_MASKED

    return list(dict.fromkeys((*_DOCKER_MASKED, *_PROC_MASKED)))
