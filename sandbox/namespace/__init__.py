"""The namespace sandbox: each task in fresh Linux namespaces.

What a task can and cannot do (docs/security-model.md repeats this list as
its guarantees; tests/security has a probe for each):

- It runs in new user, mount, pid, network, ipc, uts and cgroup namespaces.
  Root inside is never root outside: as root, hitz maps the task to the
  unprivileged host uid/gid 65534; as a user, to that user.
- The root filesystem is read-only: a tmpfs holding read-only binds of the
  host's /usr (and the /bin, /lib... links into it) and a few /etc files
  (the loader cache, alternatives); passwd, group, hosts and hostname are
  written fresh. No /sys, no /home, no /root, no host /tmp, no /run.
- Only declared inputs are visible, read-only, under /work at their project
  paths; nothing else of the project exists.
- Only declared output locations, /tmp and /dev/shm (private tmpfs) are
  writable, and only declared outputs are kept.
- No network unless the task asks for it: a private network namespace
  whose only interface is its own loopback.
- /proc is the sandbox's own pid namespace, /proc/sys read-only; /dev has
  only null, zero, full, random and urandom.
- The environment is exactly the declared one plus PATH, HOME, TMPDIR and
  SOURCE_DATE_EPOCH; fds beyond 0-2 are closed; the task runs in a new
  session with no_new_privs set; its capabilities apply only to a user
  namespace that owns nothing.
- On timeout the whole process tree gets SIGTERM, then SIGKILL after the
  grace period; when the task exits, everything it left behind is killed
  (pid namespace); the sandbox dies with hitz (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from hitz.sandbox.errors import SandboxError, SandboxErrorReason, SandboxUnavailable
from hitz.sandbox.namespace.ops import encode
from hitz.sandbox.namespace.plan import HostLayout, base_ops, work_ops, writable_roots
from hitz.sandbox.namespace.userns import SANDBOX_HOST_ID
from hitz.sandbox.outputs import OutputRejected, collect
from hitz.sandbox.spec import SandboxResult, SandboxSpec, Status, Usage

_HEADER = struct.Struct(">I")

# errno of a failed mount step -> what it means in the user's terms.
_MOUNT_HINTS = {
    errno.ENOSPC: "the kernel's mount limit was reached (fs.mount-max), not the disk",
    errno.ENOENT: "a path that was there when the task was planned has gone",
    errno.EACCES: "the sandbox user cannot read it; make it world-readable",
    errno.EPERM: "the kernel refused the mount; see `hitz doctor`",
}


@dataclass
class _Running:
    spec: SandboxSpec


class NamespaceBackend:
    """Runs specs through the launcher helper (see ``zygote``)."""

    name = "namespace"

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._running: dict[int, _Running] = {}
        self._next_id = 0
        self._base: dict[str, list[list[Any]]] = {}  # encoded base ops by network
        self._host_root = os.geteuid() == 0

    # --- the helper -------------------------------------------------------
    def _ensure_helper(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hitz.sandbox.namespace.zygote",
                 str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C is hitz's to handle
            )
        except OSError as exc:
            ours.close()
            raise SandboxError(
                f"cannot start the sandbox launcher: {exc.strerror}",
                reason=SandboxErrorReason.HELPER_DIED,
            ) from exc
        finally:
            theirs.close()
        self._sock = ours
        ready = self._recv(timeout=30.0)
        if not ready or ready[0].get("ev") != "ready":
            raise SandboxError(
                "the sandbox launcher did not start", reason=SandboxErrorReason.HELPER_DIED
            )
        if not ready[0]["ok"]:
            self.close()
            raise SandboxUnavailable(
                f"this host cannot create the namespaces a sandbox needs: {ready[0]['text']}",
                hint=_unavailable_hint(),
            )
        return ours

    def _send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode()
        assert self._sock is not None
        self._sock.sendall(_HEADER.pack(len(data)) + data)

    def _recv(self, timeout: float | None) -> list[dict[str, Any]]:
        assert self._sock is not None
        msgs = self._parse()
        if msgs:
            return msgs
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return []
        chunk = self._sock.recv(1 << 20)
        if not chunk:
            raise SandboxError(
                "the sandbox launcher exited unexpectedly",
                reason=SandboxErrorReason.HELPER_DIED,
            )
        self._buf += chunk
        return self._parse()

    def _parse(self) -> list[dict[str, Any]]:
        msgs = []
        while len(self._buf) >= 4:
            (size,) = _HEADER.unpack_from(self._buf)
            if len(self._buf) < 4 + size:
                break
            msgs.append(json.loads(self._buf[4 : 4 + size]))
            self._buf = self._buf[4 + size :]
        return msgs

    # --- SandboxBackend -----------------------------------------------------
    def start(self, spec: SandboxSpec) -> None:
        self._ensure_helper()
        base = self._base.get(spec.network.value)
        if base is None:
            base = self._base[spec.network.value] = encode(
                base_ops(HostLayout.probe(), spec.network)
            )
        self._prepare_staging(spec)
        self._next_id += 1
        self._running[self._next_id] = _Running(spec)
        self._send({
            "op": "start", "id": self._next_id,
            "ops": base + encode(work_ops(spec)),
            "argv": list(spec.argv), "env": dict(spec.env), "cwd": spec.cwd,
            "stdout": spec.stdout_path, "stderr": spec.stderr_path,
            "network": spec.network.value, "timeout": spec.timeout, "grace": spec.kill_grace,
        })

    def wait(self, timeout: float | None = None) -> list[SandboxResult]:
        if not self._running:
            return []
        return [self._result(msg) for msg in self._recv(timeout) if msg.get("ev") == "exit"]

    def running(self) -> int:
        return len(self._running)

    def cancel_all(self) -> None:
        if self._sock is not None and self._running:
            self._send({"op": "cancel"})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the helper kills whatever still runs, then exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    # --- per task -------------------------------------------------------------
    def _prepare_staging(self, spec: SandboxSpec) -> None:
        """Create every writable folder the task's outputs need, owned by the
        uid the task runs as."""
        folders = {os.path.join(spec.staging_dir, root) for root in writable_roots(spec.outputs)}
        for out in spec.outputs:
            rel = out.rstrip("/") if out.endswith("/") else os.path.dirname(out)
            folders.add(os.path.join(spec.staging_dir, rel))
        for folder in sorted(folders):
            os.makedirs(folder, exist_ok=True)
            if self._host_root:
                os.chown(folder, SANDBOX_HOST_ID, SANDBOX_HOST_ID)

    def _result(self, msg: dict[str, Any]) -> SandboxResult:
        spec = self._running.pop(msg["id"]).spec
        reports = [(line[0], json.loads(line[2:])) for line in msg["reports"] if len(line) > 2]
        errors = [payload for kind, payload in reports if kind == "E"]
        exits = [payload for kind, payload in reports if kind == "X"]
        utime, stime, maxrss = msg["usage"]
        base = {"task": spec.task, "duration_s": msg["duration"],
                "usage": Usage(utime, stime, int(maxrss))}
        exit_code = os.waitstatus_to_exitcode(exits[0]) if exits else None

        if msg["cancelled"]:
            return SandboxResult(status=Status.CANCELLED, exit_code=exit_code,
                                 message="cancelled", **base)
        if msg["timed_out"]:
            return SandboxResult(status=Status.TIMED_OUT, exit_code=exit_code,
                                 message=f"timed out after {_seconds(spec.timeout)}", **base)
        for err in errors:
            if err.get("step") == "exec":
                return SandboxResult(
                    status=Status.FAILED, exit_code=127,
                    message=f"cannot run `{err['argv0']}`: {err['text']}", **base)
        if errors or exit_code is None:
            return SandboxResult(status=Status.SETUP_FAILED, exit_code=None,
                                 message=_explain_setup(spec, errors), **base)
        if exit_code != 0:
            return SandboxResult(status=Status.FAILED, exit_code=exit_code,
                                 message=_explain_exit(exit_code), **base)
        try:
            outputs = collect(spec, chown=self._host_root)
        except OutputRejected as exc:
            return SandboxResult(status=Status.OUTPUT_MISSING, exit_code=0,
                                 message=str(exc), **base)
        return SandboxResult(status=Status.SUCCEEDED, exit_code=0, outputs=outputs, **base)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _explain_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


def _explain_setup(spec: SandboxSpec, errors: list[dict[str, Any]]) -> str:
    if not errors:
        return f"the sandbox for task `:{spec.task}` ended before the task started"
    err = errors[0]
    code = err.get("errno")
    hint = _MOUNT_HINTS.get(code) if isinstance(code, int) else None
    what = f"can't set up the sandbox for task `:{spec.task}`: {err.get('text')}"
    return f"{what} ({hint})" if hint else what


def _unavailable_hint() -> str:
    if os.geteuid() != 0:
        return (
            "unprivileged user namespaces look disabled; enable them with "
            "`sysctl kernel.unprivileged_userns_clone=1` (Debian) or "
            "`sysctl user.max_user_namespaces=15000`, or run hitz as root"
        )
    return "run `hitz doctor` to see which kernel feature is missing"


def remove_tree(path: str) -> None:
    """Remove a staging folder, including read-only leftovers."""
    shutil.rmtree(path, ignore_errors=True)
