"""The namespace sandbox's plan, without a kernel: ``writable_roots`` and
``build_ops`` on hand-made specs and a hand-made host layout.

The order of operations is part of the sandbox's security (a mount made
before its parent is bound over it would vanish; the root must go read-only
last), so these tests assert orders, not only contents.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import pytest

from hitz.sandbox.namespace.ops import (
    BindDevice,
    BindReadOnly,
    BindWritable,
    MakeDir,
    MakeFile,
    MakeStagingDir,
    Mask,
    MountProc,
    Op,
    ReadOnlySubtree,
    RemountReadOnly,
    Symlink,
    Tmpfs,
    WriteFile,
    decode,
    describe,
    encode,
)
from hitz.sandbox.namespace.plan import (
    HostEntry,
    HostLayout,
    base_ops,
    build_ops,
    work_ops,
    writable_roots,
)
from hitz.sandbox.policy import Limits, Policy
from hitz.sandbox.spec import InputMount, Network, SandboxSpec

HOST = HostLayout(
    rootfs=(
        HostEntry("usr", None, True),
        HostEntry("bin", "usr/bin", False),
        HostEntry("lib", "usr/lib", False),
        HostEntry("lib64", "usr/lib64", False),
    ),
    etc=(
        HostEntry("ld.so.cache", None, False),
        HostEntry("ld.so.conf.d", None, True),
        HostEntry("alternatives", None, True),
    ),
    etc_network=(
        HostEntry("resolv.conf", None, False),
        HostEntry("ssl", None, True),
        HostEntry("ca-certificates", None, True),
    ),
)
STAGING = "/p/.hitz/tmp/1/task"


def spec(
    outputs: tuple[str, ...] = (),
    inputs: tuple[InputMount, ...] = (),
    network: Network = Network.NONE,
    policy: Policy | None = None,
) -> SandboxSpec:
    return SandboxSpec(
        task="task",
        argv=("true",),
        env={},
        inputs=inputs,
        outputs=outputs,
        staging_dir=STAGING,
        stdout_path="/p/.hitz/logs/task.stdout",
        stderr_path="/p/.hitz/logs/task.stderr",
        network=network,
        policy=policy or Policy(),
    )


def file_input(rel: str) -> InputMount:
    return InputMount("/p/" + rel, rel)


def dir_input(rel: str) -> InputMount:
    return InputMount("/p/" + rel, rel, is_dir=True)


def index(ops: list[Op], op: Op) -> int:
    assert op in ops, f"{op} is not in the plan:\n" + "\n".join(map(describe, ops))
    return ops.index(op)


def work(ops: list[Op]) -> list[Op]:
    """The operations on /work, in order."""
    return [op for op in ops if getattr(op, "path", "").startswith("/work")]


# --- writable_roots ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("outputs", "roots"),
    [
        ((), []),
        (("build/obj/main.o",), ["build/obj"]),
        (("build/gen/",), ["build/gen"]),
        (("build/", "build/obj/a.o", "build/gen/"), ["build"]),
        (("build/obj/a.o", "build/obj/b.o"), ["build/obj"]),
        (("build/a.o", "build2/b.o"), ["build", "build2"]),
        (("result.txt", "build/x.o"), [""]),
        (("z/a", "a/b/", "m/n/o"), ["a/b", "m/n", "z"]),
    ],
    ids=["none", "file", "directory", "nested", "siblings", "common-prefix", "root", "sorted"],
)
def test_writable_roots(outputs: tuple[str, ...], roots: list[str]) -> None:
    assert writable_roots(outputs) == roots


# --- the order of build_ops ----------------------------------------------------------


def test_root_tmpfs_comes_first_and_the_read_only_remount_last() -> None:
    ops = build_ops(spec(outputs=("out/x",), inputs=(file_input("src/a.c"),)), HOST)
    assert ops[0] == Tmpfs("/", mode=0o755)
    assert ops[-1] == RemountReadOnly("/")
    assert ops.count(RemountReadOnly("/")) == 1


def test_rootfs_is_built_before_the_project() -> None:
    ops = build_ops(spec(outputs=("out/x",), inputs=(file_input("src/a.c"),)), HOST)
    first_work = ops.index(work(ops)[0])
    for op in (BindReadOnly("/usr", "/usr"), Symlink("usr/bin", "/bin"), MountProc("/proc"),
               Tmpfs("/tmp", size=1 << 30, mode=0o1777), RemountReadOnly("/dev")):
        assert index(ops, op) < first_work, op


def test_writable_output_folders_are_bound_before_inputs() -> None:
    ops = build_ops(spec(
        outputs=("out/a.o", "gen/"),
        inputs=(file_input("aaa/first.c"), dir_input("zzz/last"), file_input("src/b.c")),
    ), HOST)
    on_work = work(ops)
    writable = [i for i, op in enumerate(on_work) if isinstance(op, BindWritable)]
    read_only = [i for i, op in enumerate(on_work) if isinstance(op, BindReadOnly)]
    assert len(writable) == 2 and len(read_only) == 3
    assert max(writable) < min(read_only)


def test_input_inside_an_output_folder_is_made_and_bound_after_the_writable_bind() -> None:
    # As in the example: main.o is written next to a dependency's build/obj/lib/.
    ops = build_ops(spec(
        outputs=("build/obj/main.o",),
        inputs=(dir_input("build/obj/lib"), file_input("build/obj/gen.h")),
    ), HOST)
    writable = index(ops, BindWritable(STAGING + "/build/obj", "/work/build/obj"))
    assert writable < index(ops, MakeDir("/work/build/obj/lib"))
    assert index(ops, MakeDir("/work/build/obj/lib")) < index(
        ops, BindReadOnly("/p/build/obj/lib", "/work/build/obj/lib"))
    assert writable < index(ops, MakeFile("/work/build/obj/gen.h"))
    assert index(ops, MakeFile("/work/build/obj/gen.h")) < index(
        ops, BindReadOnly("/p/build/obj/gen.h", "/work/build/obj/gen.h"))


def test_inputs_covered_by_a_directory_input_are_not_bound_twice() -> None:
    ops = build_ops(spec(inputs=(
        file_input("gen/a.h"), dir_input("gen"), file_input("gen/sub/b.h"), file_input("gen2/c.h"),
    )), HOST)
    binds = [op for op in work(ops) if isinstance(op, BindReadOnly)]
    assert binds == [
        BindReadOnly("/p/gen", "/work/gen"),
        BindReadOnly("/p/gen2/c.h", "/work/gen2/c.h"),
    ]


def test_output_at_the_project_root_makes_work_writable() -> None:
    ops = build_ops(spec(outputs=("result.txt",), inputs=(file_input("src/a.c"),)), HOST)
    writable = [op for op in ops if isinstance(op, BindWritable)]
    assert len(writable) == 1
    assert writable[0].path == "/work"
    assert writable[0].source.rstrip("/") == STAGING
    assert index(ops, writable[0]) < index(ops, BindReadOnly("/p/src/a.c", "/work/src/a.c"))


def test_every_path_is_created_under_an_existing_folder_before_it_is_mounted_on() -> None:
    ops = build_ops(spec(
        outputs=("build/obj/main.o", "gen/", "deep/er/out.txt"),
        inputs=(dir_input("build/obj/lib"), file_input("src/x/y/z.c"), dir_input("inc"),
                file_input("inc/a.h"), file_input("top.txt")),
        network=Network.HOST,
    ), HOST)
    exists = {"/"}
    for op in ops:
        match op:
            case MakeDir(path) | MakeFile(path) | WriteFile(path) | Symlink(_, path):
                assert posixpath.dirname(path) in exists, f"{describe(op)}: no parent yet"
                exists.add(path)
            case MountProc(path):
                assert path in exists, f"{describe(op)}: mount point not made yet"
                exists.add(path + "/sys")  # the kernel's, made read-only next
            case (Tmpfs(path) | BindReadOnly(_, path) | BindWritable(_, path)
                  | BindDevice(_, path) | ReadOnlySubtree(path) | RemountReadOnly(path)):
                assert path in exists, f"{describe(op)}: mount point not made yet"


def test_no_folder_is_made_twice() -> None:
    ops = build_ops(spec(
        outputs=("build/bin/app",),
        inputs=(file_input("src/a.c"), file_input("src/b.c"), dir_input("build/lib")),
    ), HOST)
    made = [op.path for op in ops if isinstance(op, MakeDir)]
    twice = sorted({path for path in made if made.count(path) > 1})
    assert twice == [], f"made more than once: {twice}"


def test_explain_prints_exactly_what_the_backend_runs() -> None:
    # The backend sends base_ops (cached per network) + work_ops; `hitz
    # sandbox explain` prints build_ops.
    for network in Network:
        s = spec(outputs=("out/x",), inputs=(file_input("src/a.c"),), network=network)
        assert build_ops(s, HOST) == [*base_ops(HOST, network), *work_ops(s)]


# --- the root filesystem ----------------------------------------------------------------


def test_host_symlinks_are_recreated_and_folders_bound_read_only() -> None:
    ops = build_ops(spec(), HOST)
    assert index(ops, MakeDir("/usr")) < index(ops, BindReadOnly("/usr", "/usr"))
    assert Symlink("usr/lib64", "/lib64") in ops
    assert not any(isinstance(op, BindReadOnly) and op.path in ("/bin", "/lib") for op in ops)


def test_etc_is_written_fresh_with_no_host_users() -> None:
    ops = build_ops(spec(), HOST)
    files = {op.path: op.content for op in ops if isinstance(op, WriteFile)}
    assert {"/etc/passwd", "/etc/group", "/etc/hosts", "/etc/hostname"} <= set(files)
    users = [line.split(":")[0] for line in files["/etc/passwd"].splitlines()]
    assert users == ["root", "nobody"]
    assert files["/etc/hostname"] == "hitz\n"
    bound = {op.path for op in ops if isinstance(op, BindReadOnly) and op.path.startswith("/etc")}
    assert bound == {"/etc/ld.so.cache", "/etc/ld.so.conf.d", "/etc/alternatives"}


def test_network_none_has_no_resolver_or_certificates() -> None:
    ops = build_ops(spec(network=Network.NONE), HOST)
    paths = {getattr(op, "path", None) for op in ops}
    assert not paths & {"/etc/resolv.conf", "/etc/ssl", "/etc/ca-certificates"}


def test_network_host_adds_resolver_and_certificates() -> None:
    ops = build_ops(spec(network=Network.HOST), HOST)
    assert index(ops, MakeFile("/etc/resolv.conf")) < index(
        ops, BindReadOnly("/etc/resolv.conf", "/etc/resolv.conf"))
    assert index(ops, MakeDir("/etc/ssl")) < index(ops, BindReadOnly("/etc/ssl", "/etc/ssl"))
    assert BindReadOnly("/etc/ca-certificates", "/etc/ca-certificates") in ops


def test_dev_holds_only_harmless_devices_and_is_read_only_after_they_are_bound() -> None:
    ops = build_ops(spec(), HOST)
    devices = [op for op in ops if isinstance(op, BindDevice)]
    assert sorted(op.path for op in devices) == [
        "/dev/full", "/dev/null", "/dev/random", "/dev/urandom", "/dev/zero",
    ]
    sealed = index(ops, RemountReadOnly("/dev"))
    assert all(ops.index(op) < sealed for op in devices)
    # /dev/shm is the task's own scratch tmpfs, sized by its policy: mounted
    # on the folder made before /dev was sealed.
    assert index(ops, MakeDir("/dev/shm", 0o1777)) < sealed
    assert index(ops, Tmpfs("/dev/shm", size=1 << 30, mode=0o1777)) > sealed


def test_scratch_space_is_sized_by_the_policy() -> None:
    ops = build_ops(spec(policy=Policy(limits=Limits(tmp=4 << 20))), HOST)
    assert Tmpfs("/tmp", size=4 << 20, mode=0o1777) in ops
    assert Tmpfs("/dev/shm", size=4 << 20, mode=0o1777) in ops


def test_proc_sys_is_made_read_only_after_proc_is_mounted() -> None:
    ops = build_ops(spec(), HOST)
    assert index(ops, MountProc("/proc")) < index(ops, ReadOnlySubtree("/proc/sys"))


# --- operations as data -----------------------------------------------------------------


def test_ops_round_trip_through_encode_and_decode() -> None:
    ops = build_ops(spec(
        outputs=("out/x", "gen/"), inputs=(file_input("src/a.c"), dir_input("inc")),
        network=Network.HOST,
    ), HOST)
    assert {type(op) for op in ops} == {
        Tmpfs, MakeDir, MakeFile, WriteFile, Symlink, BindReadOnly, BindWritable, BindDevice,
        MountProc, ReadOnlySubtree, RemountReadOnly, Mask, MakeStagingDir,
    }
    assert decode(encode(ops)) == ops
    assert decode(json.loads(json.dumps(encode(ops)))) == ops


def test_every_op_describes_itself_in_one_line() -> None:
    ops = build_ops(spec(outputs=("out/x",), inputs=(file_input("src/a.c"),)), HOST)
    for op in ops:
        text = describe(op)
        assert text and "\n" not in text, op


def test_staging_folders_are_made_before_they_are_bound() -> None:
    ops = build_ops(spec(outputs=("out/x", "out/gen/y.h", "top.txt")), HOST)
    made = [op.source for op in ops if isinstance(op, MakeStagingDir)]
    assert made == [STAGING, f"{STAGING}/out", f"{STAGING}/out/gen"]
    first_bind = min(i for i, op in enumerate(ops) if isinstance(op, BindWritable))
    assert all(ops.index(op) < first_bind for op in ops if isinstance(op, MakeStagingDir))


# --- the namespace sandbox on an image root ---------------------------------------------


def _image_layout() -> HostLayout:
    return HostLayout(
        rootfs=(HostEntry("usr", None, True, "/cache/img/root/usr"),
                HostEntry("bin", "usr/bin", False, "/cache/img/root/bin")),
        etc=(HostEntry("os-release", None, False, "/cache/img/root/etc/os-release"),),
        etc_network=(HostEntry("resolv.conf", None, False),),
    )


def test_an_image_root_is_bound_from_the_image_not_the_host() -> None:
    ops = base_ops(_image_layout(), Network.NONE)
    binds = [op for op in ops if isinstance(op, BindReadOnly)]
    assert BindReadOnly("/cache/img/root/usr", "/usr") in binds
    assert BindReadOnly("/cache/img/root/etc/os-release", "/etc/os-release") in binds
    assert not any(op.source == "/usr" for op in binds)
    assert Symlink("usr/bin", "/bin") in ops
    assert ops.index(MakeDir("/usr")) < ops.index(BindReadOnly("/cache/img/root/usr", "/usr"))
    # passwd is written fresh, before the image's /etc entries are bound
    written = [op.path for op in ops if isinstance(op, WriteFile)]
    assert "/etc/passwd" in written


def test_probing_an_image_skips_the_sandbox_s_own_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for folder in ("usr/bin", "etc", "proc", "dev", "tmp"):
        (root / folder).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/passwd").write_text("evil\n")
    (root / "etc/os-release").write_text("x\n")
    layout = HostLayout.probe_image(str(root))
    assert [e.name for e in layout.rootfs] == ["bin", "usr"]
    assert layout.rootfs[0].symlink == "usr/bin"
    assert [e.name for e in layout.etc] == ["os-release"]  # passwd is hitz's own
    assert layout.rootfs[1].source == str(root / "usr")
