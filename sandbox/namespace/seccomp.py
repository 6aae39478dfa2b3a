"""The seccomp profiles, compiled to BPF with libseccomp (pyseccomp).

``default`` allows everything a build does and denies, with EPERM, what a
build never needs and what widens the kernel's attack surface or breaks out
of the sandbox (the list below, each entry with why). A filter is compiled
once per profile per process, not per task; the launcher installs it as the
task's last step before exec.

Syscalls of another ABI than the native one (i386 or x32 on x86-64) are not
in the filter's architecture list, so libseccomp kills the process that
tries them: they cannot be used to slip past a rule.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os

# Each denied with EPERM; the comment says why a build never needs it.
_DENIED = (
    # The kernel keyring: per-user secrets, not namespaced.
    "add_key", "request_key", "keyctl",
    # Kernel programs and tracing: large attack surface, host-wide effects.
    "bpf", "perf_event_open", "lookup_dcookie",
    # Page-fault handling from user space: the classic race primitive of exploits.
    "userfaultfd",
    # io_uring: bypasses seccomp for the operations it performs.
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # Reading or writing other processes.
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # Changing the filesystem view: the sandbox's mounts are final.
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # New namespaces and joining others: a task gets the ones it was given.
    "unshare", "setns",
    # Kernel modules and replacing the kernel.
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    # The machine: power, swap, clocks, accounting, quotas, the console.
    "reboot", "swapon", "swapoff", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", "iopl", "ioperm",
    # File handles bypass the path checks of the mount layout (CVE-2014-... "shocker").
    "open_by_handle_at", "name_to_handle_at",
    # Filesystem-wide event monitoring.
    "fanotify_init",
)

_CLONE_NEW = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
_TIOCSTI = 0x5412  # push bytes into a terminal's input (CVE-2017-5226)
_TIOCLINUX = 0x541C  # console control, can also inject input
_PER_LINUX = 0x0000


@functools.cache
def compile_default() -> bytes:
    """The BPF program (``struct sock_filter[]``) of the ``default`` profile."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in _DENIED:
        # A name this architecture or libseccomp version lacks cannot be called.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            f.add_rule(deny, name)
    # clone() may make threads and processes, not namespaces.
    for flag in _CLONE_NEW:
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, where a filter cannot look: say it
    # does not exist, and the C library falls back to clone (filtered above).
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # The kernel compares only the low 32 bits of an ioctl command, so must we:
    # a value with high bits set would otherwise slip past as TIOCSTI.
    for request in (_TIOCSTI, _TIOCLINUX):
        f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    # personality(): only the default execution domain (no READ_IMPLIES_EXEC,
    # no ADDR_NO_RANDOMIZE...). libseccomp takes one comparison per argument
    # and no ALLOW rule under a default ALLOW, so a query (0xffffffff) is
    # refused too; builds do not ask.
    f.add_rule(deny, "personality", sc.Arg(0, sc.GT, _PER_LINUX))
    return _export(f)


# Docker's names for the architectures hitz runs on, as profiles write them.
_DOCKER_ARCH = {"x86_64": ("amd64", "x86_64", "SCMP_ARCH_X86_64"),
                "aarch64": ("arm64", "aarch64", "SCMP_ARCH_AARCH64")}


class ProfileError(ValueError):
    """A seccomp profile file that is not in Docker's format; says where."""


@functools.cache
def compile_docker(path: str, digest: str, capabilities: tuple[str, ...]) -> bytes:
    """The BPF program of a profile in Docker's seccomp JSON format.

    Understood: ``defaultAction`` (+ ``defaultErrnoRet``), and ``syscalls``
    entries with ``names``, ``action`` (+ ``errnoRet``), ``args`` (``index``,
    ``value``, ``valueTwo``, ``op``) and the ``includes``/``excludes``
    conditions on ``caps`` and ``arches`` (judged against the task's kept
    capabilities and this machine). ``digest`` keys the compiled program to
    the file's content. Raises ProfileError (or OSError) naming the problem.
    """
    import json
    import platform

    import pyseccomp as sc

    with open(path, "rb") as f:
        try:
            profile = json.loads(f.read())
        except ValueError as exc:
            raise ProfileError(f"not JSON: {exc}") from None
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ProfileError('not a Docker seccomp profile: no "defaultAction"')
    arches = _DOCKER_ARCH.get(platform.machine(), ())

    def action(name: str, errno_ret: object) -> object:
        code = errno_ret if isinstance(errno_ret, int) else errno.EPERM
        actions = {
            "SCMP_ACT_ALLOW": sc.ALLOW, "SCMP_ACT_ERRNO": sc.ERRNO(code),
            "SCMP_ACT_KILL": sc.KILL, "SCMP_ACT_KILL_THREAD": sc.KILL,
            "SCMP_ACT_KILL_PROCESS": sc.KILL_PROCESS, "SCMP_ACT_TRAP": sc.TRAP,
            "SCMP_ACT_LOG": sc.LOG, "SCMP_ACT_TRACE": sc.ERRNO(errno.ENOSYS),
        }
        if name not in actions:
            raise ProfileError(f"unknown action {name!r}")
        return actions[name]

    ops = {"SCMP_CMP_NE": sc.NE, "SCMP_CMP_LT": sc.LT, "SCMP_CMP_LE": sc.LE,
           "SCMP_CMP_EQ": sc.EQ, "SCMP_CMP_GE": sc.GE, "SCMP_CMP_GT": sc.GT,
           "SCMP_CMP_MASKED_EQ": sc.MASKED_EQ}

    def applies(rule: dict[str, object]) -> bool:
        includes = rule.get("includes") or {}
        excludes = rule.get("excludes") or {}
        assert isinstance(includes, dict) and isinstance(excludes, dict)
        if includes.get("caps") and not set(includes["caps"]) <= set(capabilities):
            return False
        if includes.get("arches") and not set(includes["arches"]) & set(arches):
            return False
        if excludes.get("caps") and set(excludes["caps"]) & set(capabilities):
            return False
        return not (excludes.get("arches") and set(excludes["arches"]) & set(arches))

    default = profile["defaultAction"]
    f = sc.SyscallFilter(defaction=action(default, profile.get("defaultErrnoRet")))
    for index, rule in enumerate(profile.get("syscalls") or []):
        if not isinstance(rule, dict) or not applies(rule):
            continue
        if rule.get("action") == default and not rule.get("errnoRet"):
            continue  # libseccomp refuses a rule that does what the default does
        act = action(str(rule.get("action")), rule.get("errnoRet"))
        names = rule.get("names") or ([rule["name"]] if "name" in rule else [])
        try:
            args = [sc.Arg(a["index"], ops[a["op"]], a["value"], a.get("valueTwo", 0))
                    if a["op"] == "SCMP_CMP_MASKED_EQ"
                    else sc.Arg(a["index"], ops[a["op"]], a["value"])
                    for a in rule.get("args") or []]
        except (KeyError, TypeError) as exc:
            raise ProfileError(f"syscalls[{index}]: bad args ({exc})") from None
        for name in names:
            # A name this architecture or libseccomp lacks cannot be called anyway.
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                f.add_rule(act, name, *args)
    return _export(f)


def _export(f: object) -> bytes:
    read, write = os.pipe()
    try:
        f.export_bpf(os.fdopen(write, "wb", closefd=False))  # type: ignore[attr-defined]
        os.close(write)
        write = -1
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    return b"".join(chunks)


# ``strict``: only these, everything else EPERM (ENOSYS for the newer
# variants that C libraries probe and fall back from). What compilers,
# linkers, shells, make, coreutils and language runtimes use; no sockets
# but local ones, no namespaces, mounts, tracing, keyrings or kernel
# interfaces. The `default` profile's argument rules (clone flags, ioctls,
# personality) apply on top.
_STRICT_ALLOWED = (
    # files and folders
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "open", "openat", "openat2", "close", "close_range", "creat",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs", "access",
    "faccessat", "faccessat2", "lseek", "getdents", "getdents64", "mkdir", "mkdirat",
    "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "readlink", "readlinkat", "chmod", "fchmod", "fchmodat",
    "fchmodat2", "chown", "fchown", "lchown", "fchownat", "truncate", "ftruncate",
    "fallocate", "fsync", "fdatasync", "sync", "syncfs", "sync_file_range", "utime",
    "utimes", "utimensat", "futimesat", "chdir", "fchdir", "getcwd", "umask", "dup",
    "dup2", "dup3", "fcntl", "flock", "pipe", "pipe2", "mknod", "mknodat", "copy_file_range",
    "sendfile", "splice", "tee", "readahead", "fadvise64", "getxattr", "lgetxattr",
    "fgetxattr", "listxattr", "llistxattr", "flistxattr", "setxattr", "lsetxattr",
    "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "inotify_init",
    "inotify_init1", "inotify_add_watch", "inotify_rm_watch", "memfd_create", "ioctl",
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore", "mlock",
    "munlock", "membarrier", "shmget", "shmat", "shmdt", "shmctl",
    # processes, threads, signals, time
    "clone", "clone3", "fork", "vfork", "execve", "execveat", "exit", "exit_group",
    "wait4", "waitid", "kill", "tkill", "tgkill", "getpid", "getppid", "gettid",
    "getpgid", "setpgid", "getpgrp", "getsid", "setsid", "getuid", "geteuid", "getgid",
    "getegid", "getresuid", "getresgid", "getgroups", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigpending", "rt_sigtimedwait",
    "rt_sigqueueinfo", "sigaltstack", "pause", "nanosleep", "clock_nanosleep",
    "clock_gettime", "clock_getres", "gettimeofday", "time", "times", "getrusage",
    "getrlimit", "setrlimit", "prlimit64", "getpriority", "setpriority", "sched_yield",
    "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler",
    "set_tid_address", "set_robust_list", "get_robust_list", "futex", "futex_waitv",
    "rseq", "arch_prctl", "prctl", "uname", "sysinfo", "getrandom", "getcpu",
    "personality", "alarm", "setitimer", "getitimer", "timer_create", "timer_settime",
    "timer_gettime", "timer_delete", "timer_getoverrun", "timerfd_create",
    "timerfd_settime", "timerfd_gettime", "signalfd", "signalfd4", "eventfd", "eventfd2",
    "pidfd_open", "pidfd_send_signal", "capget",
    # waiting on descriptors
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2",
    # local sockets (and the loopback a network = "none" task has)
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect",
    "getsockname", "getpeername", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg",
    "recvmmsg", "shutdown", "setsockopt", "getsockopt",
)


_STRICT_IOCTLS = (
    0x5401, 0x5402, 0x5403, 0x5404,  # TCGETS, TCSETS, TCSETSW, TCSETSF
    0x540F, 0x5410, 0x5413, 0x5414,  # TIOCGPGRP, TIOCSPGRP, TIOCGWINSZ, TIOCSWINSZ
    0x541B, 0x5421, 0x5450, 0x5451, 0x5452,  # FIONREAD, FIONBIO, FIONCLEX, FIOCLEX, FIOASYNC
    0x40049409, 0x80086601,  # FICLONE (cp --reflink), FS_IOC_GETFLAGS
)


@functools.cache
def compile_strict() -> bytes:
    """The BPF program of the ``strict`` profile: an allow-list."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
    clone_ns = 0
    for flag in _CLONE_NEW:
        clone_ns |= flag
    for name in _STRICT_ALLOWED:
        if name in ("clone", "clone3", "ioctl", "personality"):
            continue  # with the argument rules below
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            f.add_rule(sc.ALLOW, name)
    # clone: threads and processes only (no namespace flag set).
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, clone_ns, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # ioctl: the requests tools make of terminals and files, nothing else
    # (compared on the 32 bits the kernel reads).
    for request in _STRICT_IOCTLS:
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    f.add_rule(sc.ALLOW, "personality", sc.Arg(0, sc.EQ, _PER_LINUX))
    return _export(f)
