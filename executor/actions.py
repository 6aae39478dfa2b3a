"""A task's cache key: the digest of its REAPI ``Action``.

The Action names a ``Command`` (argv, environment, output paths, working
directory, platform properties) and the Merkle tree of the input root; the
digest of its serialized bytes is the key everywhere: the local store, a
remote cache, remote execution. The sandbox backend is not in the key: every
backend keeps the same contract. The checkout path, the host's hostname and
file mtimes are not in it either, so the same task on another machine or in
another folder gets the same key.

Every message is serialized deterministically, and every repeated field
that REAPI orders is sorted here, with the spec's rule named where it is.

The protobuf modules (and, through them, grpc: ~90 ms) and the store are
imported by the functions that build messages, not with this module: a run
whose tasks are all up to date (``hitz.executor.uptodate``) builds no Action
and must not pay for them.
"""

from __future__ import annotations

import os
import platform as _platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from hitz.executor.model import TaskDef
from hitz.sandbox.policy import Landlock, Limits, Policy, Seccomp

if TYPE_CHECKING:
    from hitz.executor.store import Digest
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

# Bump when the meaning of a task changes without its Action changing (the
# sandbox's contract, how inputs are laid out): every key moves with it.
SANDBOX_CONTRACT = "namespace-1"


@dataclass(frozen=True, slots=True)
class InputFile:
    path: str  # project-relative, POSIX
    digest: Digest
    executable: bool


@dataclass(frozen=True)
class ActionKey:
    """The key and everything needed to explain it or send it elsewhere.

    ``blobs`` maps digests to the serialized Action, Command and every
    Directory of the input root (what a remote needs besides the files).
    """

    digest: Digest
    command: pb.Command
    platform: Mapping[str, str]
    inputs: Mapping[str, str]  # path -> file hash, "+x" after it if executable: for explanations
    blobs: Mapping[Digest, bytes] = field(repr=False)


def digest_of(message: pb.Action | pb.Command | pb.Directory | pb.Tree) -> tuple[Digest, bytes]:
    from hitz.executor.store import Digest

    data = message.SerializeToString(deterministic=True)
    return Digest.of(data), data


def host_properties(rootfs_identity: str) -> dict[str, str]:
    """The platform properties every task on this host shares."""
    return {
        "OSFamily": "linux",
        "ISA": _platform.machine().replace("_", "-"),
        "hitz.rootfs": rootfs_identity,
        "hitz.sandbox": SANDBOX_CONTRACT,
    }


def platform_properties(task: TaskDef, rootfs_identity: str) -> dict[str, str]:
    """What the task's result depends on besides its command and inputs."""
    return {
        **host_properties(rootfs_identity),
        "hitz.network": task.network,
        "hitz.policy": policy_of(task).describe(),
    }


# Thousands of tasks share a few policies: each is built once per process.
_POLICIES: dict[tuple[object, ...], Policy] = {}


def policy_of(task: TaskDef) -> Policy:
    """The sandbox policy ``task`` runs under: what its manifest entry asks."""
    # Every TaskDef field _policy_of reads, and no other.
    key = (task.seccomp, task.capabilities, task.landlock, task.open_files, task.file_size,
           task.cpu_time, task.output_limit, task.memory_limit, task.pids_limit,
           task.cpu_limit, task.tmp_limit)
    policy = _POLICIES.get(key)
    if policy is None:
        policy = _POLICIES[key] = _policy_of(task)
    return policy


def _policy_of(task: TaskDef) -> Policy:
    default = Limits()
    limits = Limits(
        default.open_files if task.open_files is None else task.open_files,
        task.file_size,
        task.cpu_time,
        default.output if task.output_limit is None else task.output_limit,
        task.memory_limit,
        task.pids_limit,
        task.cpu_limit,
        default.tmp if task.tmp_limit is None else task.tmp_limit,
    )
    if task.seccomp.startswith("profile:"):
        seccomp, profile = Seccomp.PROFILE, task.seccomp.removeprefix("profile:")
    else:
        seccomp, profile = Seccomp(task.seccomp), None
    return Policy(seccomp, tuple(task.capabilities), limits, Landlock(task.landlock),
                  profile)


def build_key(
    task: TaskDef,
    env: Mapping[str, str],
    files: Iterable[InputFile],
    properties: Mapping[str, str],
) -> ActionKey:
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

    blobs: dict[Digest, bytes] = {}
    platform = pb.Platform(properties=[
        # REAPI Platform: "properties ... MUST be sorted by name, then value".
        pb.Platform.Property(name=name, value=properties[name]) for name in sorted(properties)
    ])
    outputs = sorted(out.rstrip("/") for out in task.outputs)
    command = pb.Command(
        arguments=list(task.argv),
        # REAPI Command.environment_variables: "MUST be sorted by name".
        environment_variables=[
            pb.Command.EnvironmentVariable(name=name, value=env[name]) for name in sorted(env)
        ],
        # REAPI Command.output_paths / output_files / output_directories:
        # "MUST be sorted lexicographically by code point".
        output_paths=outputs,
        output_files=sorted(o for o in task.outputs if not o.endswith("/")),
        output_directories=sorted(o.rstrip("/") for o in task.outputs if o.endswith("/")),
        working_directory="",
        platform=platform,
    )
    command_digest, command_bytes = digest_of(command)
    blobs[command_digest] = command_bytes
    files = sorted(files, key=lambda f: f.path)
    root_digest = _input_root(files, blobs)
    action = pb.Action(
        command_digest=_pb_digest(command_digest),
        input_root_digest=_pb_digest(root_digest),
        do_not_cache=False,
        platform=platform,
    )
    action.timeout.FromNanoseconds(int(task.timeout_s * 1e9))
    action_digest, action_bytes = digest_of(action)
    blobs[action_digest] = action_bytes
    return ActionKey(
        digest=action_digest,
        command=command,
        platform=dict(properties),
        inputs={f.path: f.digest.hash + ("+x" if f.executable else "") for f in files},
        blobs=blobs,
    )


def _pb_digest(digest: Digest) -> pb.Digest:
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

    return pb.Digest(hash=digest.hash, size_bytes=digest.size)


def _input_root(files: list[InputFile], blobs: dict[Digest, bytes]) -> Digest:
    """The Merkle tree of ``files``; every Directory goes into ``blobs``."""
    tree: dict[str, object] = {}
    for f in files:
        node = tree
        *folders, name = f.path.split("/")
        for folder in folders:
            child = node.setdefault(folder, {})
            assert isinstance(child, dict), f"{f.path}: a file and a folder share a name"
            node = child
        node[name] = f
    return _directory(tree, blobs)


def _directory(node: Mapping[str, object], blobs: dict[Digest, bytes]) -> Digest:
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

    files, dirs = [], []
    # REAPI Directory: "files, directories and symlinks MUST be sorted in
    # lexicographical order by name" (code point order, as sorted() gives).
    for name in sorted(node):
        child = node[name]
        if isinstance(child, InputFile):
            files.append(pb.FileNode(name=name, digest=_pb_digest(child.digest),
                                     is_executable=child.executable))
        else:
            assert isinstance(child, Mapping)
            dirs.append(pb.DirectoryNode(name=name, digest=_pb_digest(_directory(child, blobs))))
    digest, data = digest_of(pb.Directory(files=files, directories=dirs))
    blobs[digest] = data
    return digest


class _Hashed(Protocol):
    @property
    def hash(self) -> str: ...


def host_rootfs_identity(digest_file: Callable[[str], tuple[_Hashed, bool]]) -> str:
    """What ``rootfs = "host"`` stands for: the distribution and its installed
    package set, so a toolchain upgrade on the host changes every key.
    ``digest_file(path) -> (Digest, executable)`` hashes through the stat cache
    (anything with the ``hash`` of a ``Digest`` will do).
    """
    parts = []
    for path in ("/etc/os-release", "/var/lib/dpkg/status", "/var/lib/rpm/rpmdb.sqlite",
                 "/lib/apk/db/installed"):
        if os.path.exists(path):
            digest, _ = digest_file(path)
            parts.append(digest.hash[:16])
    return "host:" + "-".join(parts)
