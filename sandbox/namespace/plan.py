"""Turn a ``SandboxSpec`` into the ordered operations that build its root.

Pure: no system calls beyond reading the top-level layout of the host (or
of the task's image) once (``HostLayout.probe``, ``HostLayout.probe_image``),
so the plan is unit-tested and printable. The order is the order
``mounts.apply`` runs them in; the comments say why a step sits where it does.

The root's system part comes from the host (``rootfs = "host"``: its /usr,
the merged-/usr links, a few toolchain files of /etc) or from an image's
unpacked, read-only tree (``rootfs = "image:NAME"``: every top-level entry
and all of its /etc, nothing of the host's). Either way /etc's users, groups
and host names are written fresh, and /dev, /proc and /tmp are the sandbox's own.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

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
)
from hitz.sandbox.spec import Network, SandboxSpec

HOSTNAME = "hitz"

# Top-level host entries that make up rootfs = "host". On a merged-/usr system
# /bin, /lib... are symlinks into /usr and are recreated as symlinks.
_ROOTFS_ENTRIES = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

# Host /etc entries a toolchain needs: the dynamic loader's cache, the
# Debian alternatives (cc -> gcc), static protocol tables. Nothing with
# secrets, users or host identity; passwd/group/hosts are written fresh.
_ETC_ENTRIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "protocols",
    "services",
)
# Only with network = "host": name resolution and TLS trust.
_ETC_NETWORK_ENTRIES = ("resolv.conf", "gai.conf", "ssl", "ca-certificates")

_ETC_FILES = {
    "passwd": (
        "root:x:0:0:root:/tmp:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hosts": f"127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "hostname": f"{HOSTNAME}\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}

# Top-level entries of an image that are not bound from it: the sandbox
# makes its own (and /etc is assembled entry by entry).
_IMAGE_OWN = frozenset({"dev", "proc", "sys", "tmp", "etc", "run"})

_DEVICES = ("null", "zero", "full", "random", "urandom")

# Host information /proc shows whatever the pid namespace: kernel symbols and
# configuration, the key and timer lists, the kernel log, hardware. Hidden
# as Docker and bubblewrap hide them (after /dev exists: /dev/null covers files).
_PROC_MASKED = (
    "/proc/kcore", "/proc/kallsyms", "/proc/config.gz", "/proc/keys", "/proc/key-users",
    "/proc/timer_list", "/proc/sched_debug", "/proc/kmsg", "/proc/sysrq-trigger",
    "/proc/latency_stats", "/proc/acpi", "/proc/scsi", "/proc/asound", "/proc/irq",
    "/proc/bus", "/proc/fs", "/proc/driver",
)


@dataclass(frozen=True, slots=True)
class HostEntry:
    name: str  # e.g. "usr", "ld.so.cache"
    symlink: str | None  # the link's target if the host entry is a symlink
    is_dir: bool
    # The host path bound at /NAME (or /etc/NAME); None: that same path on the
    # host. An image's entries come from its unpacked tree.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class HostLayout:
    """What of the host's / and /etc exists, read once per process."""

    rootfs: tuple[HostEntry, ...]
    etc: tuple[HostEntry, ...]
    etc_network: tuple[HostEntry, ...]

    @classmethod
    def probe(cls, root: str = "/") -> HostLayout:
        def entries(folder: str, names: tuple[str, ...]) -> tuple[HostEntry, ...]:
            found = []
            for name in names:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    found.append(HostEntry(name, os.readlink(path), False))
                elif os.path.exists(path):
                    found.append(HostEntry(name, None, os.path.isdir(path)))
            return tuple(found)

        return cls(
            rootfs=entries(root, _ROOTFS_ENTRIES),
            etc=entries(os.path.join(root, "etc"), _ETC_ENTRIES),
            etc_network=entries(os.path.join(root, "etc"), _ETC_NETWORK_ENTRIES),
        )

    @classmethod
    def probe_image(cls, image_root: str, host_root: str = "/") -> HostLayout:
        """The layout of an image's unpacked tree: every top-level entry but
        the sandbox's own folders, all of its /etc but the files written
        fresh. With network = "host" only the host's resolver files are
        added; certificates are the image's."""

        def entries(folder: str, skip: frozenset[str] | dict[str, str]) -> tuple[HostEntry, ...]:
            try:
                names = sorted(os.listdir(folder))
            except FileNotFoundError:
                return ()
            found = []
            for name in names:
                if name in skip:
                    continue
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    found.append(HostEntry(name, os.readlink(path), False, path))
                else:
                    found.append(HostEntry(name, None, os.path.isdir(path), path))
            return tuple(found)

        host_etc = os.path.join(host_root, "etc")
        resolver = tuple(
            HostEntry(name, None, False) for name in ("resolv.conf", "gai.conf")
            if os.path.isfile(os.path.join(host_etc, name))
        )
        return cls(
            rootfs=entries(image_root, _IMAGE_OWN),
            etc=entries(os.path.join(image_root, "etc"), _ETC_FILES),
            etc_network=resolver,
        )


def layout_for(spec: SandboxSpec) -> HostLayout:
    """The layout ``spec``'s root is built from: its image's, else the
    host's. Reads the filesystem: call it once per image and cache it."""
    if spec.image is None:
        return HostLayout.probe()
    if spec.image.root is None:
        raise ValueError(f"image {spec.image.name} has no unpacked root for this sandbox")
    return HostLayout.probe_image(spec.image.root)


def writable_roots(outputs: tuple[str, ...]) -> list[str]:
    """The fewest project-relative folders that make every output writable.

    A file output needs its parent folder, a directory output ("gen/") the
    folder itself; a folder inside another writable one is dropped. "" is the
    project root.
    """
    wanted = sorted(
        {out.rstrip("/") if out.endswith("/") else posixpath.dirname(out) for out in outputs}
    )
    roots: list[str] = []
    for folder in wanted:
        if not any(_within(folder, root) for root in roots):
            roots.append(folder)
    return roots


def _within(path: str, folder: str) -> bool:
    return folder == "" or path == folder or path.startswith(folder + "/")


def build_ops(spec: SandboxSpec, host: HostLayout) -> list[Op]:
    """The operations that build ``spec``'s root, in order."""
    return [*base_ops(host, spec.network), *work_ops(spec)]


def base_ops(host: HostLayout, network: Network) -> list[Op]:
    """The part of every root that does not depend on the task (the same
    for every task with this network setting, so it is built once)."""
    ops: list[Op] = [Tmpfs("/", mode=0o755)]
    ops += _rootfs(host, network)
    ops += _dev()
    ops += [MakeDir("/proc"), MountProc("/proc"), ReadOnlySubtree("/proc/sys")]
    ops += [Mask(path) for path in _PROC_MASKED]
    ops.append(MakeDir("/tmp", 0o1777))
    return ops


def work_ops(spec: SandboxSpec) -> list[Op]:
    """The task's own part: its project view, then the final read-only
    remount of the root (the writable places left are /tmp, /dev/shm and
    the outputs)."""
    # /tmp and /dev/shm are the task's scratch space, in memory: their size
    # is its policy's (limits.tmp), so a disk bomb fills only its own.
    size = spec.policy.limits.tmp
    scratch: list[Op] = [Tmpfs("/tmp", size, 0o1777), Tmpfs("/dev/shm", size, 0o1777)]
    return [*scratch, *_workdir(spec), RemountReadOnly("/")]


def _rootfs(host: HostLayout, network: Network) -> list[Op]:
    ops: list[Op] = []
    for entry in host.rootfs:
        path = "/" + entry.name
        if entry.symlink is not None:
            ops.append(Symlink(entry.symlink, path))
        elif entry.is_dir:
            ops += [MakeDir(path), BindReadOnly(entry.source or path, path)]
        else:
            ops += [MakeFile(path), BindReadOnly(entry.source or path, path)]
    ops.append(MakeDir("/etc"))
    ops += [WriteFile("/etc/" + name, content) for name, content in _ETC_FILES.items()]
    etc = host.etc + (host.etc_network if network is Network.HOST else ())
    for entry in etc:
        path = "/etc/" + entry.name
        if entry.symlink is not None:
            ops.append(Symlink(entry.symlink, path))
        else:
            ops += [MakeDir(path) if entry.is_dir else MakeFile(path),
                    BindReadOnly(entry.source or path, path)]
    return ops


def _dev() -> list[Op]:
    ops: list[Op] = [MakeDir("/dev"), Tmpfs("/dev", mode=0o755)]
    for name in _DEVICES:
        ops += [MakeFile("/dev/" + name), BindDevice("/dev/" + name, "/dev/" + name)]
    ops += [
        Symlink("/proc/self/fd", "/dev/fd"),
        Symlink("/proc/self/fd/0", "/dev/stdin"),
        Symlink("/proc/self/fd/1", "/dev/stdout"),
        Symlink("/proc/self/fd/2", "/dev/stderr"),
        MakeDir("/dev/shm", 0o1777),
        # Read-only after the nodes are bound: a task cannot add device files.
        RemountReadOnly("/dev"),
    ]
    return ops


def _workdir(spec: SandboxSpec) -> list[Op]:
    """The project under spec.cwd: writable output folders first, then the
    read-only inputs, so an input that lives inside an output folder (a
    dependency's header next to our object file) is bound over it."""
    work = spec.cwd
    made: set[str] = {"/"}
    ops: list[Op] = []

    def make_parents(path: str) -> None:
        missing = []
        parent = posixpath.dirname(path)
        while parent not in made:
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for folder in reversed(missing):
            ops.append(MakeDir(folder))
            made.add(folder)

    make_parents(work)
    ops.append(MakeDir(work))
    made.add(work)

    # The staging folders an output is written into, made on the host by
    # the launcher, before they are bound: every writable root, and each
    # folder a declared output needs inside one.
    staging = {posixpath.join(spec.staging_dir, root) if root else spec.staging_dir
               for root in writable_roots(spec.outputs)}
    for out in spec.outputs:
        rel = out.rstrip("/") if out.endswith("/") else posixpath.dirname(out)
        staging.add(posixpath.join(spec.staging_dir, rel) if rel else spec.staging_dir)
    ops += [MakeStagingDir(folder) for folder in sorted(staging)]

    for root in writable_roots(spec.outputs):
        target = posixpath.join(work, root) if root else work
        make_parents(target)
        if target not in made:
            ops.append(MakeDir(target))
        ops.append(BindWritable(posixpath.join(spec.staging_dir, root), target))
        made.add(target)

    dir_inputs: list[str] = []
    for mount in sorted(spec.inputs, key=lambda m: m.target):
        if any(_within(mount.target, d) for d in dir_inputs):
            continue  # already visible through a directory input
        target = posixpath.join(work, mount.target)
        make_parents(target)
        if mount.is_dir:
            dir_inputs.append(mount.target)
            ops.append(MakeDir(target))
            made.add(target)
        else:
            ops.append(MakeFile(target))
        ops.append(BindReadOnly(mount.source, target))
    return ops
