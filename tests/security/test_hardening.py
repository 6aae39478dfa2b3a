"""Probes of the hardened sandbox: seccomp, capabilities, resource limits.

Each probe calls the syscall with harmless bad arguments, so that "allowed"
shows up as EBADF/EFAULT/EINVAL/ENOTTY and "blocked" as EPERM (ENOSYS for
clone3); it exits 77 if a forbidden call is ever let through. The calls are
made with perl's syscall(), which every Debian host has (perl-base is
essential), by their x86-64 numbers.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import uuid

import pytest

from hitz.sandbox.probe import landlock_abi
from tests.helpers import Project
from tests.security.conftest import is_docker
from tests.security.test_isolation import Probe, assert_ran, probe

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(platform.machine() != "x86_64",
                       reason="the probes use x86-64 syscall numbers"),
]

# name: (x86-64 number, arguments that are harmless if the call were allowed)
DENIED = {
    "ptrace": (101, "31, 0, 0, 0"),  # PTRACE_...: a bad request on pid 0
    "keyctl": (250, "0, 0, 0, 0"),
    "add_key": (248, "0, 0, 0, 0"),
    "request_key": (249, "0, 0, 0, 0"),
    "bpf": (321, "-1, 0, 0"),
    "perf_event_open": (298, "0, 0, -1, -1, 0"),
    "userfaultfd": (323, "-1"),
    "io_uring_setup": (425, "0, 0"),
    "process_vm_readv": (310, "0, 0, 0, 0, 0, 0"),
    "mount": (165, "0, 0, 0, 0, 0"),
    "umount2": (166, "0, 0"),
    "pivot_root": (155, "0, 0"),
    "unshare": (272, "0x10000000"),
    "setns": (308, "-1, 0"),
    "init_module": (175, "0, 0, 0"),
    "finit_module": (313, "-1, 0, 0"),
    "kexec_load": (246, "0, 0, 0, 0"),
    "reboot": (169, "0, 0, 0, 0"),
    "swapon": (167, "0, 0"),
    "settimeofday": (164, "0, 0"),
    "clock_settime": (227, "0, 0"),
    "acct": (163, "0"),
    "quotactl": (179, "0, 0, 0, 0"),
    "open_by_handle_at": (304, "-1, 0, 0"),
    "personality": (135, "0x0400000"),  # READ_IMPLIES_EXEC
}


def perl_call(number: int, args: str) -> str:
    return f"perl -e '$r = syscall({number}, {args}); print(($r < 0 ? $!+0 : 0), \"\\n\")'"


@pytest.mark.parametrize("name", sorted(DENIED))
def test_syscall_is_denied(project: Project, name: str) -> None:
    number, args = DENIED[name]
    p = probe(project, f"e=$({perl_call(number, args)})\necho $e\n[ \"$e\" = 1 ] || exit 77")
    assert_ran(p)
    assert p.stdout == "1\n", f"{name} was not refused with EPERM:\n{p}"


def test_clone_with_new_namespace_flags_is_denied(project: Project) -> None:
    # clone(CLONE_NEWUSER|SIGCHLD): if it were allowed, the child exits at once.
    script = (
        "perl -e '$r = syscall(56, 0x10000000 | 17, 0, 0, 0, 0);"
        " exit 0 if $r == 0; print(($r < 0 ? $!+0 : 0), \"\\n\")'"
    )
    p = probe(project, f"e=$({script})\necho $e\n[ \"$e\" = 1 ] || exit 77")
    assert_ran(p)
    assert p.stdout == "1\n"


def test_clone3_reports_enosys_so_the_c_library_falls_back_to_clone(project: Project) -> None:
    p = probe(project, f"{perl_call(435, '0, 0')}\nsh -c true && echo forked")
    assert_ran(p)
    assert p.stdout == "38\nforked\n"  # ENOSYS, and ordinary processes still start


@pytest.mark.parametrize("request_", ["0x5412", "0x100005412"], ids=["TIOCSTI", "high-bits"])
def test_tiocsti_is_denied_cve_2017_5226(project: Project, request_: str) -> None:
    # ioctl(0, TIOCSTI): stdin is /dev/null, so an allowed call says ENOTTY (25).
    p = probe(project, f"e=$({perl_call(16, f'0, {request_}, 0')})\necho $e\n"
                       "[ \"$e\" = 1 ] || exit 77")
    assert_ran(p)
    assert p.stdout == "1\n"


def test_ordinary_ioctls_still_work(project: Project) -> None:
    p = probe(project, perl_call(16, "0, 0x5401, 0"))  # TCGETS on /dev/null: ENOTTY
    assert_ran(p)
    assert p.stdout == "25\n"


def test_no_capability_is_left_and_none_can_come_back(project: Project) -> None:
    p = probe(project, "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' "
                       "/proc/self/status")
    assert_ran(p)
    assert p.stdout.split() == [
        "CapInh:", "0000000000000000", "CapPrm:", "0000000000000000",
        "CapEff:", "0000000000000000", "CapBnd:", "0000000000000000",
        "CapAmb:", "0000000000000000", "NoNewPrivs:", "1", "Seccomp:", "2",
    ]


def test_a_named_capability_is_kept_and_only_it(project: Project) -> None:
    p = probe(project, "grep -E '^Cap(Eff|Bnd|Amb):' /proc/self/status",
              extra={"capabilities": ["CAP_CHOWN"]})
    assert_ran(p)
    # Docker (20.10) sets no ambient capabilities, and a task never runs as
    # uid 0 there: a kept capability stays in the bounding set only, usable
    # through a file capability (docs/docker.md).
    usable = "0000000000000000" if is_docker(project) else "0000000000000001"
    assert p.stdout.split() == [
        "CapEff:", usable, "CapBnd:", "0000000000000001", "CapAmb:", usable,
    ]


def test_unconfined_is_an_explicit_opt_out(project: Project) -> None:
    p = probe(project, "grep '^Seccomp:' /proc/self/status", extra={"seccomp": "unconfined"})
    assert_ran(p)
    assert p.stdout.split() == ["Seccomp:", "0"]


def test_core_dumps_are_off_and_open_files_limited(project: Project) -> None:
    p = probe(project, "ulimit -c; ulimit -n")
    assert_ran(p)
    assert p.stdout.split() == ["0", "4096"]


def test_limits_from_the_manifest_apply(project: Project) -> None:
    p = probe(project, "ulimit -n; ulimit -f; ulimit -t",
              extra={"limits": {"open_files": 64, "file_size": "1MiB", "cpu_time": "30s"}})
    assert_ran(p)
    assert p.stdout.split() == ["64", "1024", "30"]  # ulimit -f counts KiB


def test_a_write_past_the_file_size_limit_fails_the_task(project: Project) -> None:
    p = probe(project, "head -c 2097152 /dev/zero > /tmp/big",
              extra={"limits": {"file_size": "1MiB"}})
    entry = p.result.task("probe")
    assert entry["outcome"] == "failed", str(p)
    assert entry["exit_code"] == 128 + 25, str(p)  # the shell's report of SIGXFSZ
    assert "File size limit exceeded" in p.stderr, str(p)


def test_a_cpu_time_limit_kills_a_busy_loop(project: Project) -> None:
    p = probe(project, "exec perl -e '1 while 1'", extra={"limits": {"cpu_time": "1s"}})
    entry = p.result.task("probe")
    assert entry["outcome"] == "failed", str(p)
    # SIGXCPU, or SIGKILL at the hard limit; Docker reports them as 128 + n.
    killed = (128 + 24, 128 + 9) if is_docker(project) else (-24, -9)
    assert entry["exit_code"] in killed, str(p)


@pytest.mark.namespace_only("the cache key is computed before any backend runs")
def test_the_policy_is_part_of_the_cache_key(project: Project) -> None:
    project.write_manifest(
        "[tasks.probe]\nrun = \"true\"\n",
    )
    first = project.run().task("probe")["action_digest"]
    project.write_manifest(
        "[tasks.probe]\nrun = \"true\"\nlimits = { open_files = 128 }\n",
    )
    second = project.run().task("probe")["action_digest"]
    assert first and second and first != second


__all__ = ["Probe"]


def _abstract_listener() -> tuple[socket.socket, str]:
    name = f"hitz-probe-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + name)
    sock.listen(1)
    return sock, name


def _connect_abstract(name: str) -> str:
    return (
        "perl -MSocket -e 'socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die;"
        f" my $a = pack_sockaddr_un(\"\\0{name}\");"
        " if (connect($s, $a)) {{ print \"connected\\n\"; exit 77 }}"
        " print(($!+0), \"\\n\")'"
    )


@pytest.mark.skipif(landlock_abi() < 6, reason="Landlock ABI 6 (scopes) not in this kernel")
def test_cannot_reach_a_host_abstract_socket_even_with_the_host_network(
    project: Project,
) -> None:
    # network = "host" shares the host's abstract unix sockets (D-Bus, X11);
    # Landlock's scope keeps the task from connecting to one.
    listener, name = _abstract_listener()
    with listener:
        p = probe(project, _connect_abstract(name),
                  extra={"network": "host", "cache": False})
    assert_ran(p)
    assert p.stdout == "1\n", str(p)  # EPERM


def test_landlock_false_is_an_explicit_opt_out(project: Project) -> None:
    listener, name = _abstract_listener()
    with listener:
        p = probe(project, _connect_abstract(name).replace("exit 77", "exit 0"),
                  extra={"network": "host", "cache": False, "landlock": False,
                         "seccomp": "default"})
    assert p.result.task("probe")["outcome"] == "succeeded", str(p)
    assert p.stdout == "connected\n", str(p)


def test_printing_past_the_output_cap_fails_the_task(project: Project) -> None:
    p = probe(project, "head -c 3000000 /dev/zero | tr '\\0' x",
              extra={"limits": {"output": "1MiB"}})
    entry = p.result.task("probe")
    assert (entry["outcome"], entry["status"]) == ("failed", "limit-exceeded"), str(p)
    assert entry["message"] == "printed more than 1 MiB to stdout and stderr (limits.output)"
    assert len(p.stdout) <= 1 << 20  # the log keeps the cap, no more


def test_a_memory_bomb_is_killed_by_the_memory_limit(project: Project) -> None:
    p = probe(project, "perl -e '$x = \"a\" x (512 * 1024 * 1024); print length($x)'",
              extra={"limits": {"memory": "64MiB"}, "cache": False})
    entry = p.result.task("probe")
    assert (entry["outcome"], entry["status"]) == ("failed", "limit-exceeded"), str(p)
    assert entry["message"] == "killed: out of memory (limits.memory = 67108864 bytes)"


def test_a_fork_bomb_stops_at_the_process_limit(project: Project) -> None:
    # Bounded: at most 200 sleeps are attempted; the limit lets 16 exist.
    # dash, not the probe's bash: bash retries a failed fork for a long while.
    p = probe(project, "exec sh -c 'for i in $(seq 200); do sleep 3 & done; wait'",
              extra={"limits": {"pids": 16}, "cache": False})
    entry = p.result.task("probe")
    if is_docker(project):
        # Docker does not say its pids limit stopped a fork: the task fails
        # in its own words (docs/docker.md).
        assert entry["outcome"] == "failed", str(p)
        assert "Cannot fork" in p.stderr, str(p)  # dash's words
        return
    assert (entry["outcome"], entry["status"]) == ("failed", "limit-exceeded"), str(p)
    assert entry["message"] == "reached its process limit (limits.pids = 16)"


def test_cgroup_limits_leave_no_cgroup_behind(project: Project) -> None:
    import glob

    before = set(glob.glob("/sys/fs/cgroup/**/hitz/*-*-probe", recursive=True))
    p = probe(project, "echo ran", extra={"limits": {"memory": "256MiB", "pids": 64,
                                                      "cpu": 0.5}, "cache": False})
    assert_ran(p)
    assert p.stdout == "ran\n"
    after = set(glob.glob("/sys/fs/cgroup/**/hitz/*-*-probe", recursive=True))
    assert after <= before, f"left behind: {sorted(after - before)}"


def test_every_result_records_what_was_enforced(project: Project) -> None:
    p = probe(project, "true", extra={"cache": False})
    entry = p.result.task("probe")
    enforced = entry["enforced"]
    assert set(enforced) == {"sandbox", "seccomp", "landlock", "capabilities", "limits"}
    assert enforced["seccomp"].startswith("default sha256:")
    assert enforced["landlock"] == f"ABI {landlock_abi()}"
    assert (enforced["capabilities"], enforced["limits"]) == ("none", "4=0,7=4096")
    assert entry["weakened"] == []


def test_a_weakened_policy_is_shown_in_every_report(project: Project) -> None:
    p = probe(project, "true", extra={"cache": False, "network": "host",
                                      "seccomp": "unconfined", "landlock": False})
    entry = p.result.task("probe")
    assert entry["weakened"] == ["network host", "seccomp unconfined", "landlock off"]
    assert entry["enforced"]["seccomp"] == "unconfined"
    assert "[weakened: network host, seccomp unconfined, landlock off]" in p.result.stderr


def test_a_docker_format_profile_is_enforced(project: Project) -> None:
    import json

    project.write("seccomp.json", json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO",
             "includes": {"caps": ["CAP_SYS_ADMIN"]}},  # not kept: does not apply
        ],
    }))
    p = probe(project, "if mkdir /tmp/x; then exit 77; fi\ntouch /tmp/f; chmod 600 /tmp/f "
                       "&& echo chmod-ok", extra={"seccomp": "seccomp.json", "cache": False})
    assert_ran(p)
    assert "Permission denied" in p.stderr  # EACCES (13), the profile's errnoRet
    assert p.stdout == "chmod-ok\n"
    assert p.result.task("probe")["enforced"]["seccomp"].startswith("profile ")


def test_a_broken_profile_fails_the_task_and_says_why(project: Project) -> None:
    project.write("seccomp.json", "{not json")
    p = probe(project, "true", extra={"seccomp": "seccomp.json", "cache": False})
    entry = p.result.task("probe")
    assert (entry["outcome"], entry["status"]) == ("failed", "setup-failed"), str(p)
    assert entry["message"].startswith("task `:probe`: seccomp profile `")
    assert "not JSON" in entry["message"]


def test_the_sandbox_init_cannot_be_inspected_or_overwritten(project: Project) -> None:
    # pid 1 is hitz's launcher: its executable is a host file; its memory,
    # environment and maps must not be reachable from the task (it is not
    # dumpable after changing credentials, and the task holds no capability).
    script = (
        "for f in exe environ maps mem; do head -c 1 /proc/1/$f >/dev/null 2>&1 "
        "&& { echo read-$f; exit 77; }; done\n"
        "if echo x >> /proc/1/exe; then exit 77; fi\n"
        "if echo x > /proc/1/mem; then exit 77; fi\n"
        "echo sealed"
    )
    p = probe(project, script, extra={"cache": False})
    assert_ran(p)
    assert p.stdout == "sealed\n"
    assert p.stderr.count("Permission denied") == 2, str(p)


def test_a_disk_bomb_fills_only_its_own_scratch_space(project: Project) -> None:
    # Bounded: /tmp is 4 MiB here; the task tries to write 16 MiB into it.
    p = probe(project, "head -c 16777216 /dev/zero > /tmp/bomb; echo $?; du -k /tmp/bomb",
              extra={"limits": {"tmp": "4MiB"}, "cache": False})
    assert_ran(p)
    assert "No space left on device" in p.stderr, str(p)
    status, size = p.stdout.split()[0], int(p.stdout.split()[1])
    assert status != "0" and size <= 4096, str(p)


def test_the_task_has_a_keyring_of_its_own(project: Project) -> None:
    # keyctl is denied by the default profile; with it unconfined, the
    # session keyring the task sees is a fresh, empty one, not hitz's.
    script = (
        "perl -e '$r = syscall(250, 0, -3, 0, 0, 0); print(($r < 0 ? \"err\" : \"key\"), \"\\n\")'"
    )  # KEYCTL_GET_KEYRING_ID of KEY_SPEC_SESSION_KEYRING
    default = probe(project, script)
    assert_ran(default)
    assert default.stdout == "err\n"
    own_id = int(subprocess.run(
        ["perl", "-e", "print syscall(250, 0, -3, 0, 0, 0)"],
        capture_output=True, text=True, check=True).stdout)
    inside = probe(project, "perl -e 'print syscall(250, 0, -3, 0, 0, 0)'",
                   extra={"seccomp": "unconfined", "cache": False})
    assert_ran(inside)
    assert int(inside.stdout) not in (own_id, -1), str(inside)


@pytest.mark.namespace_only("builds with the host's C toolchain, which the probe image lacks; "
                            "the docker backend's strict profile is the same program "
                            "(tests/unit/test_docker_seccomp.py)")
def test_the_strict_profile_runs_a_build_and_denies_the_rest(project: Project) -> None:
    project.write("src/m.c", '#include <stdio.h>\nint main(void){puts("hi");return 0;}\n')
    script = (
        "cc -O2 -o /tmp/m src/m.c && /tmp/m && make --version >/dev/null && tar cf /tmp/x.tar src"
        f"\ne=$({perl_call(101, '31, 0, 0, 0')})\necho $e\n[ \"$e\" = 1 ] || exit 77\n"
        f"e=$({perl_call(321, '-1, 0, 0')})\necho $e\n[ \"$e\" = 1 ] || exit 77"
    )
    p = probe(project, script, inputs=("src/m.c",), extra={"seccomp": "strict", "cache": False})
    assert_ran(p)
    assert p.stdout == "hi\n1\n1\n", str(p)  # built and ran; ptrace and bpf: EPERM
    assert p.result.task("probe")["enforced"]["seccomp"].startswith("strict sha256:")
