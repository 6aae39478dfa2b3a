"""Escape probes: each guarantee of the namespace sandbox, attacked for real.

Every test runs a task through the real CLI in the real sandbox. The task
makes a forbidden attempt and exits 77 (``SENTINEL``) if it ever succeeds;
otherwise it runs to its end, and the test checks the attempt failed for the
right reason ("No such file or directory" for what must not exist at all,
not "Permission denied"; "Read-only file system" for what must not be
written; "Connection refused" for a host listener). The guarantees are
listed in ``sandbox/namespace/__init__.py`` and docs/security-model.md.

Tasks run bash (for /dev/tcp), coreutils, util-linux and perl-base, all of
which a Debian host has in /usr.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Completed, Project, task
from tests.security.conftest import is_docker, sandbox_keys

pytestmark = pytest.mark.kernel

SENTINEL = 77  # a probe's exit status when a forbidden action succeeded

ENOENT = "No such file or directory"
EROFS = "Read-only file system"
EPERM = "Operation not permitted"


@dataclass
class Probe:
    result: Completed
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"{self.result}\n--- task stdout\n{self.stdout}\n--- task stderr\n{self.stderr}"


def probe(
    project: Project,
    script: str,
    *,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    hitz_env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    extra: dict[str, object] | None = None,
) -> Probe:
    """Run ``script`` with bash as the task ``probe``; return the run and its logs."""
    project.write_manifest(
        task("probe", ["/bin/bash", "-c", script], inputs=inputs, outputs=outputs,
             extra={**sandbox_keys(project), **(extra or {})})
    )
    result = project.run(env=hitz_env, pass_fds=pass_fds)
    assert result.returncode in (0, 1), f"hitz did not run the probe:\n{result}"
    return Probe(
        result,
        project.log(result, "probe", "stdout"),
        project.log(result, "probe", "stderr"),
    )


def assert_ran(p: Probe) -> None:
    """The probe ran to its end: no forbidden attempt succeeded."""
    entry = p.result.task("probe")
    assert entry["exit_code"] != SENTINEL, f"a forbidden action SUCCEEDED in the sandbox:\n{p}"
    assert entry["status"] == "succeeded", f"the probe did not run to its end:\n{p}"


def assert_refused(p: Probe, reason: str, times: int = 1) -> None:
    """Every forbidden attempt failed, ``times`` of them with ``reason``."""
    assert_ran(p)
    assert p.stderr.count(reason) >= times, f"expected {reason!r} x{times}:\n{p}"


# --- only declared inputs of the project are visible -------------------------------


def test_cannot_see_undeclared_file_next_to_a_declared_input(project: Project) -> None:
    project.write("src/main.c", "int main;\n")
    project.write("src/secret.c", "SECRET\n")
    p = probe(
        project,
        "cat src/main.c\nls -A src\nif cat src/secret.c; then exit 77; fi",
        inputs=("src/main.c",),
    )
    assert_refused(p, f"src/secret.c: {ENOENT}")
    assert p.stdout.split() == ["int", "main;", "main.c"]


def test_cannot_see_undeclared_sibling_folder_or_file(project: Project) -> None:
    project.write("src/main.c")
    project.write("docs/notes.txt", "SECRET\n")
    project.write("TODO", "SECRET\n")
    p = probe(
        project,
        "ls -A /work\nif ls docs; then exit 77; fi\nif cat TODO; then exit 77; fi",
        inputs=("src/main.c",),
    )
    assert_refused(p, ENOENT, times=2)
    assert p.stdout.split() == ["src"]


def test_cannot_see_hitz_state_folder_even_with_a_catch_all_input(project: Project) -> None:
    project.write("src/a.txt", "a\n")
    project.write(".hitz/logs/old.stdout", "SECRET\n")
    p = probe(project, "ls -A /work\nif ls -A .hitz; then exit 77; fi", inputs=("**",))
    assert_refused(p, f".hitz': {ENOENT}")
    assert ".hitz" not in p.stdout.split()


def test_cannot_see_git_folder_even_with_a_catch_all_input(project: Project) -> None:
    project.write("src/a.txt", "a\n")
    project.write(".git/config", "[remote]\n  token = SECRET\n")
    p = probe(project, "cat src/a.txt\nif cat .git/config; then exit 77; fi", inputs=("**",))
    assert_refused(p, f".git/config: {ENOENT}")
    assert "SECRET" not in p.stdout


@pytest.mark.parametrize("link", ["relative", "absolute"])
@pytest.mark.parametrize("pattern", ["escape/secret.txt", "escape/*"])
def test_cannot_read_host_file_through_a_symlinked_input_folder(
    project: Project, tmp_path: Path, link: str, pattern: str
) -> None:
    """A project symlink to a folder outside it must not carry a declared
    input out of the project: hitz refuses the input (it checks this for a
    symlinked input itself; the link here is one of its parent folders)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = uuid.uuid4().hex
    (outside / "secret.txt").write_text(secret + "\n")
    (project.root / "escape").symlink_to("../outside" if link == "relative" else outside)
    project.write_manifest(task("probe", ["/bin/bash", "-c", "cat escape/*"], inputs=(pattern,),
                                extra=sandbox_keys(project)))
    result = project.run()
    if result.returncode != 2:
        leaked = project.log(result, "probe", "stdout")
        assert secret not in leaked, f"the task read {outside}/secret.txt:\n{result}"
    assert result.returncode == 2, f"hitz ran a task with an input outside the project:\n{result}"
    assert "outside the project" in result.stderr


# --- nothing of the host outside the read-only rootfs --------------------------------


def test_cannot_read_host_shadow(project: Project) -> None:
    p = probe(project, "if cat /etc/shadow; then exit 77; fi")
    assert_refused(p, f"/etc/shadow: {ENOENT}")


def test_cannot_see_host_home_folders(project: Project) -> None:
    p = probe(project, "for d in /root /home; do if ls -A $d; then exit 77; fi; done")
    assert_refused(p, ENOENT, times=2)


def test_cannot_see_host_var_and_run(project: Project) -> None:
    p = probe(project, "for d in /var /run; do if ls -A $d; then exit 77; fi; done")
    assert_refused(p, ENOENT, times=2)


def test_sys_is_absent(project: Project) -> None:
    if is_docker(project):  # Docker always mounts something at /sys: an empty tmpfs here
        p = probe(project, "if [ -n \"$(ls -A /sys)\" ]; then exit 77; fi\n"
                           "if ls /sys/fs/cgroup; then exit 77; fi")
        assert_refused(p, ENOENT)
        return
    p = probe(project, "if ls /sys; then exit 77; fi\nif ls /sys/fs/cgroup; then exit 77; fi")
    assert_refused(p, ENOENT, times=2)


def test_cannot_read_marker_file_in_host_tmp(project: Project) -> None:
    with tempfile.NamedTemporaryFile("w", dir="/tmp", prefix="hitz-probe-") as marker:
        marker.write("SECRET\n")
        marker.flush()
        os.chmod(marker.name, 0o644)
        p = probe(project, f"ls -A /tmp\nif cat {marker.name}; then exit 77; fi")
    assert_refused(p, f"{marker.name}: {ENOENT}")
    assert p.stdout == "", "the task's /tmp is not empty"


def test_cannot_see_the_project_through_its_host_path(project: Project) -> None:
    project.write("src/a.txt")
    project.write("secret.txt", "SECRET\n")
    p = probe(project, f"if cat {project.root}/secret.txt; then exit 77; fi",
              inputs=("src/a.txt",))
    assert_refused(p, ENOENT)


def test_host_users_and_hostname_are_not_visible(project: Project) -> None:
    p = probe(project, "cut -d: -f1 /etc/passwd\necho ---\ncat /etc/hostname\nhostname")
    assert_ran(p)
    users, host = p.stdout.split("---\n")
    assert users.split() == ["root", "nobody"]
    assert host.split() == ["hitz", "hitz"]


def test_only_harmless_devices_exist(project: Project) -> None:
    # Docker's /dev also has tty, ptmx, pts and mqueue (docs/security-model.md, D5).
    docker_extra = {"tty", "ptmx", "pts", "mqueue", "core"} if is_docker(project) else set()
    absent = "/dev/mem /dev/kmsg /dev/vda /dev/sda" + ("" if docker_extra else " /dev/tty")
    p = probe(project, f"ls -A /dev\nfor d in {absent}; do "
                       "if [ -e $d ]; then echo $d exists >&2; exit 77; fi; done")
    assert_ran(p)
    assert set(p.stdout.split()) <= {
        "null", "zero", "full", "random", "urandom", "fd", "stdin", "stdout", "stderr", "shm",
    } | docker_extra


def test_cannot_create_device_nodes(project: Project) -> None:
    p = probe(project, "if mknod /tmp/mem c 1 1; then exit 77; fi\n"
                       "if mknod /dev/shm/vda b 254 0; then exit 77; fi")
    assert_refused(p, EPERM, times=2)


# --- no network --------------------------------------------------------------------


def test_cannot_connect_to_loopback_listener_on_host(project: Project) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        p = probe(project, f"if : 3<>/dev/tcp/127.0.0.1/{port}; then exit 77; fi")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's listener
    assert_refused(p, "Connection refused")


def test_cannot_reach_addresses_beyond_loopback(project: Project) -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): no route exists in the sandbox at all.
    p = probe(project, "if : 3<>/dev/tcp/192.0.2.1/80; then exit 77; fi")
    assert_refused(p, "Network is unreachable")


def test_cannot_connect_to_host_abstract_unix_socket(project: Project) -> None:
    # Abstract unix sockets belong to a network namespace, not to a filesystem.
    name = f"hitz-probe-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("\0" + name)
        listener.listen()
        script = (
            "perl -MSocket -e 'socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die \"socket: $!\\n\";"
            f" connect($s, pack_sockaddr_un(\"\\0{name}\")) and exit 77;"
            " print STDERR \"connect: $!\\n\"'"
        )
        p = probe(project, script)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert_refused(p, "connect: Connection refused")


def test_only_loopback_interface_exists(project: Project) -> None:
    p = probe(project, "cat /proc/net/dev")
    assert_ran(p)
    interfaces = {line.split(":")[0].strip() for line in p.stdout.splitlines()[2:]}
    assert interfaces == {"lo"}


def test_loopback_inside_the_sandbox_works(project: Project) -> None:
    script = (
        "perl -MIO::Socket::INET -e '"
        '$l = IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0)'
        ' or die "listen: $!\\n";'
        ' $c = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $l->sockport)'
        ' or die "connect: $!\\n";'
        ' $s = $l->accept; print $c "ping\\n"; print "got " . <$s>;\''
    )
    p = probe(project, script)
    assert_ran(p)
    assert p.stdout == "got ping\n"


def test_cannot_reconfigure_the_network(project: Project) -> None:
    p = probe(project, "if ip link set lo down; then exit 77; fi\n"
                       "if ip link add hitz0 type dummy; then exit 77; fi")
    assert_refused(p, EPERM, times=2)


# --- no host processes -------------------------------------------------------------


def test_cannot_see_host_processes(project: Project, marker: str) -> None:
    host = subprocess.Popen(["sleep", marker])
    try:
        p = probe(project, "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done\n"
                           "echo =$((6 * 7))=\nls -d /proc/[0-9]*")
    finally:
        host.kill()
        host.wait()
    assert_ran(p)
    cmdlines, pids = p.stdout.split("=42=\n")  # the script's own text holds "6 * 7"
    assert marker not in cmdlines
    visible = sorted(int(path.rsplit("/", 1)[1]) for path in pids.split())
    assert visible[0] == 1, "the sandbox's init is not pid 1"
    assert len(visible) < 10, f"more processes than the sandbox's own: {visible}"


def test_cannot_signal_host_processes(project: Project, marker: str) -> None:
    host = subprocess.Popen(["sleep", marker])
    try:
        p = probe(project, f"if kill -KILL {host.pid}; then exit 77; fi")
        assert host.poll() is None, "the host process was killed from inside the sandbox"
    finally:
        host.kill()
        host.wait()
    assert_refused(p, "No such process")


# --- the environment is the declared one ---------------------------------------------


def test_host_environment_is_not_visible(project: Project) -> None:
    secret = uuid.uuid4().hex
    project.write_manifest(task("probe", "env", env={"DECLARED": "yes"},
                                extra=sandbox_keys(project)))
    result = project.run(env={"HITZ_PROBE_SECRET": secret})
    assert result.returncode == 0, str(result)
    lines = project.log(result, "probe", "stdout").splitlines()
    # PWD is set by the shell (dash) itself.
    assert {line.split("=", 1)[0] for line in lines} == {
        "PATH", "HOME", "TMPDIR", "SOURCE_DATE_EPOCH", "PWD", "DECLARED",
    }
    assert "DECLARED=yes" in lines
    assert secret not in "\n".join(lines)


def test_host_environment_is_not_visible_through_proc(project: Project) -> None:
    secret = uuid.uuid4().hex
    p = probe(project, "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done; true",
              hitz_env={"HITZ_PROBE_SECRET": secret})
    assert_ran(p)
    assert secret not in p.stdout


# --- fresh namespaces, and no reach into the kernel ------------------------------------


def test_task_runs_in_new_namespaces_of_every_kind(project: Project) -> None:
    kinds = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
    if is_docker(project):  # no user namespace in Docker: the task is never uid 0 (D6)
        kinds = kinds[1:]
    p = probe(project, "".join(f"readlink /proc/self/ns/{kind}\n" for kind in kinds))
    assert_ran(p)
    inside = dict(zip(kinds, p.stdout.split(), strict=True))
    for kind in kinds:
        assert inside[kind] != os.readlink(f"/proc/self/ns/{kind}"), f"shares the host's {kind}"


def test_host_information_in_proc_is_masked(project: Project) -> None:
    # Kernel symbols, configuration, keys, timers and the kernel log read as
    # empty (/dev/null bound over them), hardware folders as empty folders; a
    # write to sysrq-trigger goes nowhere.
    files = ["/proc/kallsyms", "/proc/config.gz", "/proc/keys", "/proc/timer_list",
             "/proc/kmsg", "/proc/kcore", "/proc/sysrq-trigger"]
    folders = ["/proc/acpi", "/proc/irq", "/proc/bus", "/proc/driver"]
    present = [f for f in files if os.path.exists(f)]
    present_dirs = [d for d in folders if os.path.isdir(d)]
    if not present and not present_dirs:
        pytest.skip("this kernel's /proc has none of the masked entries")
    script = "".join(f"printf '%s ' $(wc -c < {f})\n" for f in present)
    script += "".join(f"printf '%s ' $(ls -A {d} | wc -l)\n" for d in present_dirs)
    p = probe(project, script + "echo")
    assert_ran(p)
    assert p.stdout.split() == ["0"] * (len(present) + len(present_dirs)), str(p)


# --- root inside is nobody outside; no privilege over anything it did not create -------


@pytest.mark.namespace_only("Docker has no user namespace; its tasks run as an unprivileged "
                            "uid instead (tests/integration/test_docker.py)")
def test_root_inside_maps_to_an_unprivileged_uid_outside(project: Project) -> None:
    p = probe(project, "cat /proc/self/uid_map /proc/self/gid_map")
    assert_ran(p)
    # As root, hitz maps the task's 0 to nobody (65534). As a user, to that
    # user, through a user namespace of its own: seen from inside, "0 0 1".
    outer = "65534" if os.geteuid() == 0 else "0"
    assert [line.split() for line in p.stdout.splitlines()] == [["0", outer, "1"]] * 2


def test_cannot_change_hostname(project: Project) -> None:
    p = probe(project, "if hostname evil; then exit 77; fi\nhostname")
    assert_refused(p, "must be root")  # hostname(1)'s words for EPERM
    assert p.stdout == "hitz\n"


def test_no_new_privileges_is_set(project: Project) -> None:
    p = probe(project, "grep NoNewPrivs /proc/self/status")
    assert_ran(p)
    assert p.stdout.split() == ["NoNewPrivs:", "1"]


def test_output_cannot_become_a_setuid_or_setgid_binary(project: Project) -> None:
    project.write_manifest(task(
        "probe", "cp /bin/sh out/sush && chmod 6755 out/sush", outputs=("out/sush",),
        extra=sandbox_keys(project),
    ))
    result = project.run()
    assert result.returncode == 0, str(result)
    st = (project.root / "out/sush").stat()
    assert st.st_uid == os.getuid()
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(st.st_mode)


# --- writable: only outputs, /tmp and /dev/shm ------------------------------------------


def test_cannot_write_declared_input(project: Project) -> None:
    project.write("src/a.txt", "original\n")
    p = probe(project, "if echo evil > src/a.txt; then exit 77; fi\n"
                       "if rm -f src/a.txt; then exit 77; fi", inputs=("src/a.txt",))
    assert_refused(p, EROFS, times=2)
    assert project.read("src/a.txt") == "original\n"


def test_cannot_write_outside_outputs_tmp_and_shm(project: Project) -> None:
    project.write("src/a.txt")
    targets = ["/work/new.txt", "/work/src/new.txt", "/work/out/../new.txt", "/usr/new",
               "/usr/bin/new", "/etc/new", "/etc/passwd", "/dev/new", "/new"]
    script = "".join(f"if echo x > {t}; then echo wrote {t} >&2; exit 77; fi\n" for t in targets)
    script += "echo x > out/x"  # the one place it may write (with /tmp and /dev/shm)
    p = probe(project, script, inputs=("src/a.txt",), outputs=("out/x",))
    if is_docker(project):  # Docker's /dev is a root-owned writable tmpfs: EACCES there
        assert_refused(p, EROFS, times=len(targets) - 1)
        assert "/dev/new: Permission denied" in p.stderr, str(p)
        return
    assert_refused(p, EROFS, times=len(targets))


def test_can_write_outputs_tmp_and_dev_shm(project: Project) -> None:
    p = probe(project, "echo o > out/x && echo t > /tmp/x && echo s > /dev/shm/x",
              outputs=("out/x",))
    assert_ran(p)
    assert project.read("out/x") == "o\n"


def test_cannot_remount_inputs_read_write(project: Project) -> None:
    project.write("src/a.txt", "original\n")
    project.write_manifest(
        task("gen", "echo generated > gen/h.txt", outputs=("gen/",),
             extra=sandbox_keys(project)),
        task("probe", ["/bin/bash", "-c",
                       "mount -o remount,rw,bind /work/gen\n"
                       "mount -o remount,rw,bind /work/src/a.txt\n"
                       "mount -o remount,rw /work\n"
                       "if echo evil > gen/h.txt; then exit 77; fi\n"
                       "if echo evil > src/a.txt; then exit 77; fi\n"],
             inputs=(":gen", "src/a.txt"), extra=sandbox_keys(project)),
    )
    result = project.run()
    p = Probe(result, project.log(result, "probe", "stdout"),
              project.log(result, "probe", "stderr"))
    assert_refused(p, EROFS, times=2)
    assert project.read("src/a.txt") == "original\n"
    assert project.read("gen/h.txt") == "generated\n"


def test_cannot_remount_inputs_read_write_from_a_nested_user_namespace(project: Project) -> None:
    # With seccomp = "unconfined", CAP_SETFCAP (needed to map root since
    # Linux 5.12) and no Landlock (which forbids writing the id maps) a task
    # may create user namespaces of its own, where it holds every capability;
    # the mounts it inherits stay locked read-only there. The default policy
    # forbids all of that (see tests/security/test_hardening.py).
    project.write("src/a.txt", "original\n")
    script = (
        "unshare --user --map-root-user --mount sh -c '"
        "id -u; mount -o remount,rw,bind /work/src/a.txt; umount /work/src/a.txt;"
        " if echo evil > /work/src/a.txt; then exit 77; fi'"
    )
    p = probe(project, script, inputs=("src/a.txt",),
              extra={"seccomp": "unconfined", "capabilities": ["CAP_SETFCAP"],
                     "landlock": False})
    assert_refused(p, EROFS)
    assert p.stdout == "0\n", "the nested user namespace was not created"
    assert project.read("src/a.txt") == "original\n"


def test_cannot_unmount_an_input(project: Project) -> None:
    project.write("src/a.txt", "original\n")
    p = probe(project, "if umount /work/src/a.txt; then exit 77; fi\ncat src/a.txt",
              inputs=("src/a.txt",))
    # umount(8)'s words for EPERM; as a non-root user outside any user
    # namespace (docker), it gives up earlier, finding no fstab entry.
    assert_refused(p, "umount failed" if is_docker(project) else "must be superuser")
    assert p.stdout == "original\n"


def test_proc_sys_is_read_only(project: Project) -> None:
    p = probe(project, "if echo evil > /proc/sys/kernel/hostname; then exit 77; fi\n"
                       "if echo 3 > /proc/sys/vm/drop_caches; then exit 77; fi")
    assert_refused(p, EROFS, times=2)


@pytest.mark.parametrize("link", ["relative", "absolute"])
def test_cannot_write_outside_the_project_through_a_symlinked_output_folder(
    project: Project, tmp_path: Path, link: str
) -> None:
    """A symlink in the project must not carry a task's output out of it:
    hitz, not the task, moves outputs into place, with its own privileges."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (project.root / "build").symlink_to("../outside" if link == "relative" else outside)
    project.write_manifest(task("probe", "echo evil > build/evil.txt",
                                outputs=("build/evil.txt",), extra=sandbox_keys(project)))
    result = project.run()
    assert not (outside / "evil.txt").exists(), (
        f"hitz wrote a task's output to {outside}, outside the project:\n{result}"
    )
    assert result.returncode != 0, str(result)


# --- file descriptors, session, signals ------------------------------------------------


def test_file_descriptors_beyond_stdio_are_closed(project: Project, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET\n")
    fd = os.open(secret, os.O_RDONLY)  # inherited by hitz: must not reach the task
    try:
        p = probe(project, f"ls /proc/$$/fd\nif cat <&{fd}; then exit 77; fi", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert_refused(p, "Bad file descriptor")
    assert p.stdout.split() == ["0", "1", "2"]


def test_task_runs_in_a_new_session_without_a_terminal(project: Project) -> None:
    p = probe(project, "echo $$\ncat /proc/$$/stat")
    assert_ran(p)
    pid, stat_line = p.stdout.splitlines()
    fields = stat_line.rsplit(")", 1)[1].split()  # after "pid (comm)"
    session, tty = fields[3], fields[4]
    assert session == pid, "the task is not the leader of its own session"
    assert tty == "0", "the task has a controlling terminal"


def test_task_starts_with_default_signal_dispositions(project: Project) -> None:
    # hitz is Python, which ignores SIGPIPE and SIGXFSZ: the task must not
    # inherit that. (Signals 32 and 33 are glibc's own and cannot be set.)
    p = probe(project, "grep -E '^(SigIgn|SigBlk):' /proc/self/status")
    assert_ran(p)
    masks = dict(line.split(":\t") for line in p.stdout.splitlines())
    standard = (1 << 31) - 1
    assert int(masks["SigIgn"], 16) & standard == 0, f"ignored: {masks['SigIgn']}"
    assert int(masks["SigBlk"], 16) == 0, f"blocked: {masks['SigBlk']}"

