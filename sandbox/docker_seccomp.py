"""hitz's seccomp profiles rendered in Docker's seccomp JSON format.

The docker backend hands the engine a profile as JSON (``--security-opt
seccomp=...``); the namespace backend compiles the same rules to BPF with
libseccomp (``namespace/seccomp.py``). Both read one set of rule tables, the
ones in ``namespace/seccomp.py``, and add them in the same order, so
``default`` and ``strict`` deny the same system calls, with the same errno,
in both backends. tests/unit/test_docker_seccomp.py compiles the rendered
JSON back to BPF and compares it with the namespace backend's program.

Docker's format, as runc reads it: ``value``/``valueTwo`` of a
``SCMP_CMP_MASKED_EQ`` comparison are the mask and the expected value, in
that order (libseccomp's ``SCMP_CMP(arg, SCMP_CMP_MASKED_EQ, mask, datum)``).
"""

from __future__ import annotations

import errno
import functools
import json
import platform
from typing import Any

from hitz.sandbox.namespace.seccomp import (
    _CLONE_NEW,
    _DENIED,
    _PER_LINUX,
    _STRICT_ALLOWED,
    _STRICT_IOCTLS,
    _TIOCLINUX,
    _TIOCSTI,
)

# The native architecture only, as libseccomp's filter has it: a system call
# of another ABI (i386, x32) matches no architecture of the profile and is
# refused by runc's bad-architecture action.
_ARCHES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}
_LOW_32_BITS = 0xFFFFFFFF
LANDLOCK_SYSCALLS = ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self")

Rule = dict[str, Any]


def _arch() -> list[str]:
    arch = _ARCHES.get(platform.machine())
    return [arch] if arch else []


def _errno(names: list[str], code: int, *args: Rule) -> Rule:
    rule: Rule = {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": code}
    if args:
        rule["args"] = list(args)
    return rule


def _allow(names: list[str], *args: Rule) -> Rule:
    rule: Rule = {"names": names, "action": "SCMP_ACT_ALLOW"}
    if args:
        rule["args"] = list(args)
    return rule


def _arg(index: int, op: str, value: int, value_two: int = 0) -> Rule:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


@functools.cache
def render_default() -> str:
    """The ``default`` profile (a deny-list over ALLOW), as Docker JSON."""
    rules: list[Rule] = [_errno([name], errno.EPERM) for name in _DENIED]
    # clone(): threads and processes, not namespaces (one rule per flag, as
    # in compile_default: a masked comparison tests one flag at a time).
    rules += [_errno(["clone"], errno.EPERM, _arg(0, "SCMP_CMP_MASKED_EQ", flag, flag))
              for flag in _CLONE_NEW]
    rules.append(_errno(["clone3"], errno.ENOSYS))
    rules += [_errno(["ioctl"], errno.EPERM,
                     _arg(1, "SCMP_CMP_MASKED_EQ", _LOW_32_BITS, request))
              for request in (_TIOCSTI, _TIOCLINUX)]
    rules.append(_errno(["personality"], errno.EPERM, _arg(0, "SCMP_CMP_GT", _PER_LINUX)))
    return _dump({"defaultAction": "SCMP_ACT_ALLOW", "architectures": _arch(),
                  "syscalls": rules})


@functools.cache
def render_strict() -> str:
    """The ``strict`` profile (an allow-list over EPERM), as Docker JSON."""
    clone_ns = 0
    for flag in _CLONE_NEW:
        clone_ns |= flag
    with_args = ("clone", "clone3", "ioctl", "personality")
    rules: list[Rule] = [_allow([name]) for name in _STRICT_ALLOWED if name not in with_args]
    rules.append(_allow(["clone"], _arg(0, "SCMP_CMP_MASKED_EQ", clone_ns, 0)))
    rules.append(_errno(["clone3"], errno.ENOSYS))
    rules += [_allow(["ioctl"], _arg(1, "SCMP_CMP_MASKED_EQ", _LOW_32_BITS, request))
              for request in _STRICT_IOCTLS]
    rules.append(_allow(["personality"], _arg(0, "SCMP_CMP_EQ", _PER_LINUX)))
    # Docker installs the filter before its init runs, so hitz's container
    # init (docker_init.c) must be allowed to apply Landlock: these only ever
    # take rights away. The one difference from the namespace backend's
    # strict profile, where the launcher applies Landlock before seccomp.
    rules.append(_allow(list(LANDLOCK_SYSCALLS)))
    return _dump({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.EPERM,
                  "architectures": _arch(), "syscalls": rules})


def _dump(profile: dict[str, Any]) -> str:
    # Compact and key-sorted: the text is sent with every container's
    # configuration, and the same rules must always give the same bytes.
    return json.dumps(profile, sort_keys=True, separators=(",", ":"))
