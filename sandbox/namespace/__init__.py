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

How: ``plan.py`` turns a spec into a list of operations (pure, printable
with ``hitz sandbox explain``); ``launcher.c``, a small static program built
once per machine (``build.py``), is started per task with posix_spawn and
applies them. ``NamespaceBackend`` below runs many launchers at once from a
single-threaded event loop, enforces deadlines and collects outputs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from hitz.sandbox import landlock, report
from hitz.sandbox.errors import SandboxError, SandboxErrorReason, SandboxUnavailable
from hitz.sandbox.namespace.build import launcher_path
from hitz.sandbox.namespace.cgroups import Layout as CgroupLayout
from hitz.sandbox.namespace.cgroups import TaskCgroups
from hitz.sandbox.namespace.cgroups import create as create_cgroups
from hitz.sandbox.namespace.ops import BindReadOnly, Op, flatten
from hitz.sandbox.namespace.plan import base_ops, layout_for, work_ops
from hitz.sandbox.namespace.seccomp import (
    ProfileError,
    compile_default,
    compile_docker,
    compile_strict,
)
from hitz.sandbox.outputs import OutputRejected, collect
from hitz.sandbox.policy import Seccomp, profile_digest
from hitz.sandbox.spec import SandboxResult, SandboxSpec, Status, Usage

# The host uid/gid that a task's root maps to when hitz runs as root.
SANDBOX_HOST_ID = 65534

# errno of a failed mount step -> what it means in the user's terms.
_MOUNT_HINTS = {
    errno.ENOSPC: "the kernel's mount limit was reached (fs.mount-max), not a full disk",
    errno.ENOENT: "it was there when the run was planned and has gone since",
    errno.EACCES: "the sandbox's user cannot read it; make it world-readable",
    errno.EPERM: "the kernel refused the mount",
}
_LOW_FDS = 10  # our copies of the fds handed to a launcher live above 0-4
_REPORT_GRACE = 5.0  # seconds a reaped launcher's report pipe may stay open
_OUTPUT_CHECK_S = 0.25  # how often a running task's captured output is measured


@dataclass
class _Launch:
    spec: SandboxSpec
    ops: list[Op]
    pid: int
    pidfd: int
    report_r: int
    stdout: int  # memfds holding the task's streams until it ends
    stderr: int
    started: float
    deadline: float
    killed_at: float | None = None
    timed_out: bool = False
    cancelled: bool = False
    buf: bytes = b""
    reports: list[str] = field(default_factory=list)
    eof: bool = False
    exit: tuple[int, Any] | None = None  # (wait status, rusage) once reaped
    reaped_at: float = 0.0
    go_w: int | None = None  # a held launch waits for a byte on this pipe
    output_exceeded: bool = False  # killed for printing more than its cap
    cgroups: TaskCgroups | None = None  # its memory/pids/cpu limits, if any


class NamespaceBackend:
    """Runs specs as launcher processes; see the module docstring."""

    name = "namespace"

    def __init__(self) -> None:
        self._launcher: str | None = None
        self._host_root = os.geteuid() == 0
        self._sel = selectors.DefaultSelector()
        self._running: dict[int, _Launch] = {}  # by launcher pid
        # By network and image root ("" for the host's).
        self._base: dict[tuple[str, str], tuple[list[Op], bytes]] = {}
        self._devnull = -1
        self._done: list[_Launch] = []  # given up waiting for their report pipe
        self._held: dict[str, _Launch] = {}  # prestarted, waiting for release
        self._bpf: bytes | None = None  # the default seccomp profile, compiled once
        self._cgroup_layout: CgroupLayout | None = None
        self._cgroup_count = 0
        self._busy_cgroups: list[TaskCgroups] = []  # to remove once their tasks are gone

    # --- SandboxBackend ---------------------------------------------------
    def start(self, spec: SandboxSpec) -> None:
        self._launch(spec, hold=False)

    def prestart(self, spec: SandboxSpec) -> None:
        """Build ``spec``'s sandbox now but start its task only on ``release``
        (its timeout counts from then), or never, on ``cancel``."""
        self._launch(spec, hold=True)

    def release(self, task: str) -> None:
        launch = self._held.pop(task)
        assert launch.go_w is not None
        with contextlib.suppress(BrokenPipeError):  # it died while held: its result says how
            os.write(launch.go_w, b"G")
        os.close(launch.go_w)
        launch.go_w = None
        launch.started = time.monotonic()
        launch.deadline = launch.started + launch.spec.timeout

    def cancel(self, task: str) -> None:
        """Drop a held launch: it ends without running its task."""
        launch = self._held.pop(task)
        launch.cancelled = True
        if launch.go_w is not None:
            os.close(launch.go_w)  # end of file: the launcher exits
            launch.go_w = None
        launch.deadline = time.monotonic()  # and if it does not, it is killed

    def _launch(self, spec: SandboxSpec, *, hold: bool) -> None:
        if self._launcher is None:
            self._launcher = launcher_path()
            self._devnull = _high(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        base, base_bytes = self._base_for(spec)
        ops = work_ops(spec)
        plan = _high(os.memfd_create("hitz-plan", os.MFD_CLOEXEC))
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        report_w = _high(report_w)
        go_r, go_w = os.pipe2(os.O_CLOEXEC) if hold else (-1, None)
        if hold:
            go_r = _high(go_r)
        # The task's streams go to memory first and reach the log files only
        # if they are not empty: creating two files per task costs ~0.4 ms
        # on this disk, and most tasks print nothing.
        out = _high(os.memfd_create(f"hitz-{spec.task}-stdout", os.MFD_CLOEXEC))
        err = _high(os.memfd_create(f"hitz-{spec.task}-stderr", os.MFD_CLOEXEC))
        bpf = self._filter_for(spec)
        task_cgroups = self._cgroups_for(spec)
        actions = [
            (os.POSIX_SPAWN_DUP2, self._devnull, 0),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, err, 2),
            (os.POSIX_SPAWN_DUP2, plan, 3),
            (os.POSIX_SPAWN_DUP2, report_w, 4),
        ]
        if hold:
            actions.append((os.POSIX_SPAWN_DUP2, go_r, 5))
        if bpf is not None:
            actions.append((os.POSIX_SPAWN_DUP2, bpf, 6))
        try:
            os.write(plan, self._header(spec, len(base) + len(ops), hold, task_cgroups)
                     + base_bytes + _join(flatten(ops)))
            pid = os.posix_spawn(
                self._launcher, ["hitz-launch", str(os.getpid())], {},
                file_actions=actions,
                # Its own session: the terminal's Ctrl-C is hitz's to handle.
                setsid=True,
            )
        except OSError as exc:
            for fd in (report_r, out, err, *([go_w] if go_w is not None else [])):
                os.close(fd)
            if task_cgroups is not None:
                task_cgroups.remove()
            raise SandboxError(
                f"cannot start the sandbox launcher `{self._launcher}`: {exc.strerror}",
                reason=SandboxErrorReason.HELPER_DIED,
            ) from exc
        finally:
            os.close(plan)
            os.close(report_w)
            if hold:
                os.close(go_r)
            if bpf is not None:
                os.close(bpf)
        now = time.monotonic()
        launch = _Launch(spec, [*base, *ops], pid, os.pidfd_open(pid), report_r, out, err,
                         now, math.inf if hold else now + spec.timeout, go_w=go_w,
                         cgroups=task_cgroups)
        if hold:
            self._held[spec.task] = launch
        os.set_blocking(report_r, False)
        self._running[pid] = launch
        self._sel.register(report_r, selectors.EVENT_READ, (launch, "report"))
        self._sel.register(launch.pidfd, selectors.EVENT_READ, (launch, "exit"))

    def wait(self, timeout: float | None = None) -> list[SandboxResult]:
        results: list[SandboxResult] = []
        end = None if timeout is None else time.monotonic() + timeout
        while self._running and not results:
            pause = self._enforce_deadlines()
            for launch in self._done:
                self._running.pop(launch.pid, None)
                results.append(self._complete(launch))
            self._done.clear()
            if results:
                break
            if end is not None:
                left = max(0.0, end - time.monotonic())
                pause = left if pause is None else min(pause, left)
            for key, _ in self._sel.select(pause):
                launch, what = key.data
                if what == "report":
                    self._read_reports(launch)
                else:
                    self._reap(launch)
                if launch.eof and launch.exit is not None and launch.pid in self._running:
                    del self._running[launch.pid]
                    results.append(self._complete(launch))
            if end is not None and time.monotonic() >= end:
                break
        return results

    def running(self) -> int:
        return len(self._running)

    def cancel_all(self) -> None:
        for task in list(self._held):
            self.cancel(task)
        for launch in self._running.values():
            launch.cancelled = True
            self._kill(launch, signal.SIGKILL)

    def close(self) -> None:
        """Kill whatever still runs and wait for it: nothing outlives us."""
        self.cancel_all()
        while self._running:
            self.wait(1.0)
        for cgroups in self._busy_cgroups:  # their last processes have exited by now
            cgroups.remove()
        self._busy_cgroups.clear()
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1
        self._sel.close()

    # --- launches ----------------------------------------------------------
    def _complete(self, launch: _Launch) -> SandboxResult:
        if launch.go_w is not None:  # it ended while held: its set-up failed
            self._held.pop(launch.spec.task, None)
            os.close(launch.go_w)
            launch.go_w = None
        result = self._result(launch)
        if launch.cgroups is not None and not launch.cgroups.remove():
            self._busy_cgroups.append(launch.cgroups)
        cap = launch.spec.policy.limits.output
        _keep_log(launch.stdout, launch.spec.stdout_path, cap)
        _keep_log(launch.stderr, launch.spec.stderr_path, cap)
        return result

    def _base_for(self, spec: SandboxSpec) -> tuple[list[Op], bytes]:
        key = (spec.network.value, spec.image.root or "" if spec.image else "")
        cached = self._base.get(key)
        if cached is None:
            ops = base_ops(layout_for(spec), spec.network)
            cached = self._base[key] = (ops, _join(flatten(ops)))
        return cached

    def _header(self, spec: SandboxSpec, op_count: int, hold: bool,
                launch_cgroups: TaskCgroups | None) -> bytes:
        env = [f"{key}={value}" for key, value in spec.env.items()]
        limits = spec.policy.limits.rlimits()
        cgroups = launch_cgroups.paths if launch_cgroups else []
        landlock.check(spec.task, spec.policy)  # fail closed: not every caller checked first
        return _join([
            "hitz-launch/1",
            str(len(cgroups)), *cgroups,
            "1" if self._host_root else "0",
            str(SANDBOX_HOST_ID if self._host_root else 0),
            spec.network.value,
            "1" if hold else "0",
            spec.cwd,
            str(len(spec.argv)), *spec.argv,
            str(len(env)), *env,
            str(spec.policy.capability_mask()),
            "0" if spec.policy.seccomp is Seccomp.UNCONFINED else "1",
            str(len(limits)), *(str(n) for pair in limits for n in pair),
            *landlock.arguments(spec),
            str(op_count),
        ])

    def _enforced(self, spec: SandboxSpec) -> tuple[dict[str, str], tuple[str, ...]]:
        """What this task ran under, and what of the default it went without
        (report.py; the seccomp digest is of the BPF program installed)."""
        policy = spec.policy
        program = (compile_strict() if policy.seccomp is Seccomp.STRICT
                   else self._bpf if policy.seccomp is Seccomp.DEFAULT else None)
        return report.enforcement("namespace", policy, spec.network, program)

    def _cgroups_for(self, spec: SandboxSpec) -> TaskCgroups | None:
        limits = spec.policy.limits
        if limits.memory is None and limits.pids is None and limits.cpu is None:
            return None
        if self._cgroup_layout is None:
            self._cgroup_layout = CgroupLayout.probe()
        self._cgroup_count += 1
        name = f"{os.getpid()}-{self._cgroup_count}-{spec.task}"
        return create_cgroups(self._cgroup_layout, name, limits.memory, limits.pids,
                              limits.cpu)

    def _profile_program(self, spec: SandboxSpec) -> bytes:
        path = spec.policy.seccomp_profile or ""
        try:
            return compile_docker(path, profile_digest(path), spec.policy.capabilities)
        except (OSError, ProfileError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SandboxError(
                f"task `:{spec.task}`: seccomp profile `{path}`: {text}",
                hint="seccomp takes a profile in Docker's seccomp JSON format",
                reason=SandboxErrorReason.SETUP_FAILED,
            ) from exc

    def _filter_for(self, spec: SandboxSpec) -> int | None:
        """A memfd holding the BPF program of ``spec``'s seccomp profile
        (compiled once per profile), or None for an unconfined task."""
        if spec.policy.seccomp is Seccomp.UNCONFINED:
            return None
        if spec.policy.seccomp in (Seccomp.PROFILE, Seccomp.STRICT):
            program = (self._profile_program(spec) if spec.policy.seccomp is Seccomp.PROFILE
                       else compile_strict())
            fd = _high(os.memfd_create("hitz-seccomp", os.MFD_CLOEXEC))
            os.write(fd, program)
            return fd
        if self._bpf is None:
            try:
                self._bpf = compile_default()
            except (ImportError, OSError) as exc:  # pyseccomp, or libseccomp.so.2, missing
                raise SandboxUnavailable(
                    f"cannot build the seccomp filter of task `:{spec.task}`: {exc}",
                    hint='install libseccomp (`apt-get install libseccomp2`), or set '
                    'seccomp = "unconfined" on the task to run it without a filter',
                ) from exc
        fd = _high(os.memfd_create("hitz-seccomp", os.MFD_CLOEXEC))
        os.write(fd, self._bpf)
        return fd

    def _read_reports(self, launch: _Launch) -> None:
        try:
            chunk = os.read(launch.report_r, 65536)
        except BlockingIOError:
            return
        if chunk:
            launch.buf += chunk
            *lines, launch.buf = launch.buf.split(b"\n")
            launch.reports += [line.decode(errors="replace") for line in lines]
            return
        launch.eof = True
        self._sel.unregister(launch.report_r)
        os.close(launch.report_r)

    def _reap(self, launch: _Launch) -> None:
        _, status, usage = os.wait4(launch.pid, 0)
        launch.exit = (status, usage)
        launch.reaped_at = time.monotonic()
        self._sel.unregister(launch.pidfd)
        os.close(launch.pidfd)

    def _kill(self, launch: _Launch, sig: int) -> None:
        if launch.exit is None:
            signal.pidfd_send_signal(launch.pidfd, sig)

    def _enforce_deadlines(self) -> float | None:
        """SIGTERM launches past their deadline (the launcher and init forward
        it to every process of the sandbox), SIGKILL them after the grace
        period (init dies with its launcher, and the pid namespace with
        init). Returns seconds until the next deadline."""
        now = time.monotonic()
        nxt: float | None = None
        for launch in self._running.values():
            if launch.exit is not None:
                # Reaped, but the report pipe is still open: something of the
                # sandbox outlived its launcher. Its init has the launcher as
                # parent-death signal source, so this is brief; never wait on
                # it for long, and say what is known.
                if launch.eof:
                    continue
                due = launch.reaped_at + _REPORT_GRACE
                if now >= due:
                    self._sel.unregister(launch.report_r)
                    os.close(launch.report_r)
                    launch.eof = True
                    self._done.append(launch)
                    due = now
                nxt = due if nxt is None else min(nxt, due)
                continue
            if launch.go_w is not None:
                continue  # held: its time starts when it is released
            if launch.killed_at is None and self._over_output_cap(launch):
                launch.output_exceeded = True
                launch.killed_at = now
                self._kill(launch, signal.SIGKILL)
            if launch.killed_at is None and now >= launch.deadline:
                launch.timed_out = True
                launch.killed_at = now
                self._kill(launch, signal.SIGTERM)
            if launch.killed_at is not None:
                due = launch.killed_at + launch.spec.kill_grace
                if now >= due:
                    self._kill(launch, signal.SIGKILL)
                    due = now + 1.0  # keep prodding until it is reaped
            else:
                # Captured output is checked at least this often.
                due = min(launch.deadline, now + _OUTPUT_CHECK_S)
            nxt = due if nxt is None else min(nxt, due)
        return None if nxt is None else max(0.0, nxt - now)

    def _over_output_cap(self, launch: _Launch) -> bool:
        """Has the task printed more than its policy's cap (stdout + stderr)?
        The streams are memfds: a task must not fill the host's memory."""
        cap = launch.spec.policy.limits.output
        return os.fstat(launch.stdout).st_size + os.fstat(launch.stderr).st_size > cap

    def _result(self, launch: _Launch) -> SandboxResult:
        spec = launch.spec
        assert launch.exit is not None
        status, usage = launch.exit
        errors = [line[2:] for line in launch.reports if line.startswith("E ")]
        exits = [int(line[2:]) for line in launch.reports if line.startswith("X ")]
        enforced, weakened = self._enforced(spec)
        base: dict[str, Any] = {
            "task": spec.task,
            "duration_s": time.monotonic() - launch.started,
            "usage": Usage(usage.ru_utime, usage.ru_stime, int(usage.ru_maxrss)),
            "enforced": enforced,
            "weakened": weakened,
        }
        exit_code = os.waitstatus_to_exitcode(exits[0]) if exits else None

        if launch.cancelled:
            return SandboxResult(status=Status.CANCELLED, exit_code=exit_code,
                                 message="cancelled", **base)
        if launch.timed_out:
            return SandboxResult(status=Status.TIMED_OUT, exit_code=exit_code,
                                 message=f"timed out after {spec.timeout:g}s", **base)
        limits = spec.policy.limits
        if exit_code != 0 and launch.cgroups is not None and launch.cgroups.oom_killed():
            return SandboxResult(
                status=Status.LIMIT_EXCEEDED, exit_code=exit_code,
                message=f"killed: out of memory (limits.memory = {limits.memory} bytes)",
                **base)
        if exit_code != 0 and launch.cgroups is not None and launch.cgroups.hit_pids_limit():
            return SandboxResult(
                status=Status.LIMIT_EXCEEDED, exit_code=exit_code,
                message=f"reached its process limit (limits.pids = {limits.pids})", **base)
        if launch.output_exceeded or (exit_code is not None and self._over_output_cap(launch)):
            cap = spec.policy.limits.output
            return SandboxResult(
                status=Status.LIMIT_EXCEEDED, exit_code=exit_code,
                message=f"printed more than {cap >> 20} MiB to stdout and stderr "
                "(limits.output)", **base)
        if errors and errors[0].startswith("exec "):
            _, err, _, _text = errors[0].split(" ", 3)
            return SandboxResult(status=Status.FAILED, exit_code=127,
                                 message=f"cannot run `{spec.argv[0]}`: "
                                 f"{os.strerror(int(err))}", **base)
        if errors:
            _refuse_if_unavailable(errors[0])
        if errors or exit_code is None:
            return SandboxResult(status=Status.SETUP_FAILED, exit_code=None,
                                 message=_explain_setup(launch, errors, status), **base)
        if exit_code != 0:
            return SandboxResult(status=Status.FAILED, exit_code=exit_code,
                                 message=_explain_exit(exit_code), **base)
        try:
            outputs = collect(spec, chown=self._host_root)
        except OutputRejected as exc:
            return SandboxResult(status=Status.OUTPUT_MISSING, exit_code=0,
                                 message=str(exc), **base)
        return SandboxResult(status=Status.SUCCEEDED, exit_code=0, outputs=outputs, **base)


def _high(fd: int) -> int:
    """Move ``fd`` above the launcher's fds 0-4, so the dup2 file actions
    can never overwrite a source before it is used."""
    if fd >= _LOW_FDS:
        return fd
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _LOW_FDS)
    os.close(fd)
    return moved


def _keep_log(memfd: int, path: str, cap: int) -> None:
    """Write a task's captured stream (at most ``cap`` bytes of it) to
    ``path`` if it is not empty, else remove what an earlier run left there;
    close the memfd."""
    try:
        size = min(os.fstat(memfd).st_size, cap)
        if size == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            offset = 0
            while offset < size:
                sent = os.sendfile(fd, memfd, offset, size - offset)
                if sent == 0:
                    break
                offset += sent
        finally:
            os.close(fd)
    finally:
        os.close(memfd)


def _join(fields: list[str]) -> bytes:
    return "\0".join(fields).encode() + b"\0"


def _explain_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


# errno of a failed unshare(2): the host cannot give any task a sandbox.
_UNSHARE_REFUSED = {
    errno.EPERM: "not permitted",
    errno.EACCES: "not permitted",
    errno.ENOSPC: "the namespace limit is 0 or reached",
    errno.EINVAL: "not supported by this kernel",
    errno.ENOSYS: "not supported by this kernel",
    errno.EUSERS: "user namespaces are nested too deeply",
}


def _refuse_if_unavailable(error: str) -> None:
    """Fail closed, once for the whole run, when the kernel refuses to
    create a namespace: no task may run without its sandbox."""
    step, err_text, _, text = [*error.split(" ", 3), "", "", ""][:4]
    err = int(err_text) if err_text.lstrip("-").isdigit() else 0
    if step not in ("launcher", "init") or "unshare" not in text or err not in _UNSHARE_REFUSED:
        return
    what = text.split(":", 1)[0]
    if os.geteuid() != 0:
        hint = ("unprivileged user namespaces look disabled: enable them with "
                "`sysctl kernel.unprivileged_userns_clone=1` (Debian) and "
                "`sysctl user.max_user_namespaces=15000`, or run hitz as root")
    else:
        hint = ("check `sysctl user.max_user_namespaces` (must be above 0), and that no "
                "seccomp policy of a container around hitz blocks unshare(2)")
    raise SandboxUnavailable(
        f"this host cannot create the namespaces a sandbox needs: {what} failed "
        f"({_UNSHARE_REFUSED[err]})",
        hint=hint,
    )


def _explain_setup(launch: _Launch, errors: list[str], status: int) -> str:
    """Restate a failed setup step in the user's terms (STYLE 6)."""
    task = f"`:{launch.spec.task}`"
    if not errors:
        return (f"the sandbox of task {task} ended before the task started "
                f"(launcher {_explain_exit(os.waitstatus_to_exitcode(status))})")
    step, err_text, index_text, text = ([*errors[0].split(" ", 3), "", "", ""])[:4]
    err = int(err_text) if err_text.lstrip("-").isdigit() else 0
    index = int(index_text) if index_text.lstrip("-").isdigit() else -1
    hint = _MOUNT_HINTS.get(err)
    op = launch.ops[index] if 0 <= index < len(launch.ops) else None
    if isinstance(op, BindReadOnly) and op.path.startswith(launch.spec.cwd + "/"):
        rel = op.path[len(launch.spec.cwd) + 1:]
        what = f'can\'t expose input "{rel}" to task {task}: {os.strerror(err)}'
    else:
        what = f"can't set up the sandbox of task {task}: {step}: {text}"
    return f"{what} ({hint})" if hint else what
