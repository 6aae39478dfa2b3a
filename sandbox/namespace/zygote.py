"""The launcher helper: a small single-threaded process that forks sandboxes.

Forking the scheduler itself is slow once it holds a large heap and unsafe
once it has threads, and starting an interpreter per task costs more than
the sandbox's own kernel work. So hitz starts this helper once per run
(``python -m hitz.sandbox.namespace.zygote FD PID``): it imports only the
standard library and the sandbox's setup code, and forks each sandbox's
init process straight into a new pid namespace (see ``contain``).

Protocol on the inherited stream socket FD: each message is a 4-byte
big-endian length and a JSON object.

  hitz -> zygote  {"op": "start", "id", "ops", "argv", "env", "cwd", "stdout",
                    "stderr", "network", "timeout", "grace"}
                  {"op": "cancel"}                  kill every running sandbox
  zygote -> hitz  {"ev": "ready", "ok", "errno", "text"}    once, after a probe
                  {"ev": "exit", "id", "status", "reports", "timed_out",
                   "cancelled", "duration", "usage": [user_s, sys_s, maxrss_kib]}

When the socket closes (hitz exited or died) every sandbox is killed and the
helper exits; PR_SET_PDEATHSIG covers a hitz killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from hitz.sandbox.namespace import contain, userns
from hitz.sandbox.namespace import syscalls as sc

_HEADER = struct.Struct(">I")


@dataclass
class _Sandbox:
    id: int
    pid: int
    report_r: int
    reply_w: int
    started: float
    deadline: float
    grace: float
    killed_at: float | None = None
    timed_out: bool = False
    cancelled: bool = False
    buf: bytes = b""
    reports: list[str] = field(default_factory=list)
    eof: bool = False
    exit: tuple[int, Any] | None = None  # (wait status, rusage) once reaped


class Zygote:
    def __init__(self, sock: socket.socket, host_root: bool) -> None:
        self.sock = sock
        self.host_root = host_root
        self.inbuf = b""
        self.boxes: dict[int, _Sandbox] = {}  # by init pid
        self.sel = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(sock, selectors.EVENT_READ, "ctl")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        # Restoring pid_ns_for_children after each sandbox's unshare(CLONE_NEWPID).
        self.pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    # --- messages ----------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode()
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def read_messages(self) -> list[dict[str, Any]] | None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return None
        self.inbuf += chunk
        msgs = []
        while len(self.inbuf) >= 4:
            (size,) = _HEADER.unpack_from(self.inbuf)
            if len(self.inbuf) < 4 + size:
                break
            msgs.append(json.loads(self.inbuf[4 : 4 + size]))
            self.inbuf = self.inbuf[4 + size :]
        return msgs

    # --- sandboxes -----------------------------------------------------------
    def start(self, req: dict[str, Any]) -> None:
        req["host_root"] = self.host_root
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        started = time.monotonic()
        # The next child becomes pid 1 of a new pid namespace; set ours back
        # right after, so the zygote's own next children are unaffected.
        sc.unshare(sc.CLONE_NEWPID)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                sc.setns(self.pidns, sc.CLONE_NEWPID)
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                # Only the two pipes cross into the sandbox.
                low, high = sorted((report_w, reply_r))
                os.closerange(3, low)
                os.closerange(low + 1, high)
                os.closerange(high + 1, 1 << 20)
            finally:
                contain.init(req, report_w, reply_r)
        os.close(report_w)
        os.close(reply_r)
        os.set_blocking(report_r, False)
        box = _Sandbox(req["id"], pid, report_r, reply_w, started,
                       started + req["timeout"], req["grace"])
        self.boxes[pid] = box
        self.sel.register(report_r, selectors.EVENT_READ, box)

    def on_report(self, box: _Sandbox) -> None:
        try:
            chunk = os.read(box.report_r, 65536)
        except BlockingIOError:
            return
        if not chunk:
            box.eof = True
            self.sel.unregister(box.report_r)
            os.close(box.report_r)
            self.finish(box)
            return
        box.buf += chunk
        *lines, box.buf = box.buf.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text == "U":
                try:
                    userns.map_task(box.pid, self.host_root)
                    os.write(box.reply_w, b"M")
                except OSError as exc:
                    box.reports.append("E " + json.dumps(
                        {"step": "userns", "errno": exc.errno, "text": str(exc)}))
                    self._kill(box, signal.SIGKILL)
            else:
                box.reports.append(text)

    def signal_all(self, sig: int) -> None:
        for box in self.boxes.values():
            self._kill(box, sig)

    def _kill(self, box: _Sandbox, sig: int) -> None:
        if box.exit is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(box.pid, sig)

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            box = self.boxes.get(pid)
            if box is not None:
                box.exit = (status, usage)
                os.close(box.reply_w)
                self.finish(box)

    def finish(self, box: _Sandbox) -> None:
        """Report once init is reaped and its report pipe is drained."""
        if box.exit is None or not box.eof:
            return
        del self.boxes[box.pid]
        status, usage = box.exit
        self.send({
            "ev": "exit", "id": box.id, "status": status, "reports": box.reports,
            "timed_out": box.timed_out, "cancelled": box.cancelled,
            "duration": time.monotonic() - box.started,
            "usage": [usage.ru_utime, usage.ru_stime, usage.ru_maxrss],
        })

    def enforce_deadlines(self) -> float | None:
        """Terminate sandboxes past their deadline, kill those past the grace
        period; return seconds until the next deadline (None: none)."""
        now = time.monotonic()
        nxt: float | None = None
        for box in self.boxes.values():
            if box.exit is not None:
                continue
            if box.killed_at is None and now >= box.deadline:
                box.timed_out = True
                box.killed_at = now
                self._kill(box, signal.SIGTERM)
            if box.killed_at is not None:
                due = box.killed_at + box.grace
                if now >= due:
                    self._kill(box, signal.SIGKILL)
                    due = now + 1.0  # keep prodding until it is reaped
            else:
                due = box.deadline
            nxt = due if nxt is None else min(nxt, due)
        return None if nxt is None else max(0.0, nxt - now)

    def serve(self) -> None:
        while True:
            for key, _ in self.sel.select(self.enforce_deadlines()):
                if key.data == "wake":
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                elif key.data == "ctl":
                    msgs = self.read_messages()
                    if msgs is None:  # hitz is gone: nothing may outlive it
                        return
                    for msg in msgs:
                        if msg["op"] == "start":
                            self.start(msg)
                        elif msg["op"] == "cancel":
                            for box in self.boxes.values():
                                box.cancelled = True
                            self.signal_all(signal.SIGKILL)
                else:
                    self.on_report(key.data)


def probe(host_root: bool) -> tuple[int | None, str]:
    """Can this host create a sandbox's namespaces? (errno, text)"""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sc.unshare(contain.NAMESPACES | sc.CLONE_NEWNET | sc.CLONE_NEWPID)
            sc.unshare(sc.CLONE_NEWUSER)
            code = 0
        except OSError as exc:
            code = exc.errno or 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return (None, "") if code == 0 else (code, os.strerror(code) if code > 0 else "killed")


def _enter_own_userns() -> None:
    """As an ordinary user: become 0 in a user namespace of our own, where
    creating the sandboxes' namespaces (and setns back to our pid namespace)
    is allowed. The forked child continues as the zygote, pid 1 of a pid
    namespace of its own, with a /proc of that namespace (the sandboxes' id
    maps are written through it); this process only waits for it."""
    uid, gid = os.getuid(), os.getgid()
    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWPID | sc.CLONE_NEWNS)
    userns.map_self_outer(uid, gid)
    pid = os.fork()
    if pid != 0:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)


def main() -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if len(sys.argv) > 2 and os.getppid() != int(sys.argv[2]):
        return  # hitz died before PDEATHSIG was armed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # hitz decides what Ctrl-C means
    sock = socket.socket(fileno=int(sys.argv[1]))
    host_root = os.geteuid() == 0
    try:
        if not host_root:
            _enter_own_userns()
        err, text = probe(host_root)
    except OSError as exc:
        err, text = exc.errno, exc.strerror or str(exc)
    zygote = Zygote(sock, host_root)
    zygote.send({"ev": "ready", "ok": err is None, "errno": err, "text": text})
    gc.freeze()  # forked inits then share these pages instead of copying them
    try:
        zygote.serve()
    finally:
        zygote.signal_all(signal.SIGKILL)


if __name__ == "__main__":
    main()
