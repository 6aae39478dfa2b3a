"""What a task ran under, as every report shows it (STYLE 10).

Each backend's result carries ``enforced`` (what confined the task, one
line per mechanism) and ``weakened`` (what of the default it went without,
flagged in every report). Both backends word them alike from here; the
strings are asserted by tests/security and tests/integration/test_docker.py,
and docs/security-model.md shows the ``[weakened: …]`` line they make.
"""

from __future__ import annotations

import hashlib

from hitz.sandbox.policy import Landlock, Policy, Seccomp, profile_digest
from hitz.sandbox.probe import landlock_abi
from hitz.sandbox.spec import Network


def enforcement(backend: str, policy: Policy, network: Network,
                seccomp_program: bytes | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """(enforced, weakened) of a task that ``backend`` ran under ``policy``.

    ``seccomp_program`` is the filter the backend installed for a
    ``default`` or ``strict`` policy, in its own form (a BPF program, a
    Docker JSON profile), None if it installed none; the report names its
    digest, so two runs can be seen to share a filter. A profile file is
    named by its path and the digest of its content instead.
    """
    weakened = []
    if network is Network.HOST:
        weakened.append("network host")
    if policy.seccomp is Seccomp.PROFILE and policy.seccomp_profile:
        seccomp = (f"profile {policy.seccomp_profile} sha256:"
                   + profile_digest(policy.seccomp_profile)[:16])
    elif policy.seccomp is Seccomp.UNCONFINED or seccomp_program is None:
        seccomp = "unconfined"
        weakened.append("seccomp unconfined")
    else:
        digest = hashlib.sha256(seccomp_program).hexdigest()[:16]
        seccomp = f"{policy.seccomp.value} sha256:{digest}"
    abi = landlock_abi()
    if policy.landlock is Landlock.OFF:
        landlock = "off"
        weakened.append("landlock off")
    elif abi < 1:
        landlock = "none in this kernel (best-effort)"
        weakened.append("landlock unavailable")
    else:
        landlock = f"ABI {abi}"
    if policy.capabilities:
        weakened.append("capabilities " + ",".join(policy.capabilities))
    enforced = {
        "sandbox": backend,
        "seccomp": seccomp,
        "landlock": landlock,
        "capabilities": ",".join(policy.capabilities) or "none",
        "limits": policy.describe().split("rlimits=", 1)[1].split(";", 1)[0],
    }
    return enforced, tuple(weakened)
