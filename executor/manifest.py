"""Load ``hitz.toml`` into a validated ``Manifest``.

``load`` reads the file, parses it with ``tomllib``, checks types and unknown
keys of the whole document in one pydantic pass, then checks what types cannot
say (task names, paths, durations, references between tasks, colliding
outputs) while it builds the ``TaskDef`` values, in document order.

Every problem becomes one ``ManifestError`` naming the file, the line and the
key, with the numbered source line and a caret as its ``detail``; the user
never sees a pydantic or tomllib message as such. ``tomllib`` gives no
positions, so ``toml_lines.scan`` finds them. Scanning costs about as much as
parsing, so it runs only when an error needs a position or when someone reads
``Manifest.locations``: a good manifest does not pay for it.

Cycles and globs that match nothing are not checked here: the planner and the
runner report those, using ``Manifest.locations`` for the line.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import posixpath
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hitz.executor.errors import ManifestError
from hitz.executor.errors import ManifestErrorReason as Reason
from hitz.executor.model import KeyPath, Manifest, TaskDef
from hitz.executor.remote_config import RemoteCacheSettings, parse_url
from hitz.executor.suggest import suggest
from hitz.executor.toml_lines import Pos, SourceMap, scan
from hitz.sandbox.policy import CAPABILITIES, Seccomp
from hitz.sandbox.spec import Network

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

__all__ = ["json_schema", "load", "parse_duration", "suggest"]

BACKENDS = ("namespace", "docker", "remote")
ROOTFS = ("host",)  # and "image:NAME" / "docker:NAME@sha256:HEX" (ROOTFS_PATTERN)
# An image built by `hitz image build` from images/NAME.toml, or an image the
# local Docker engine already has, named by its content digest.
IMAGE_NAME_PATTERN = r"[a-z0-9][a-z0-9_.-]*"
ROOTFS_PATTERN = (
    rf"host|image:{IMAGE_NAME_PATTERN}"
    r"|docker:[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}"
)
_ROOTFS = re.compile(ROOTFS_PATTERN)
NETWORKS = tuple(network.value for network in Network)
SECCOMP = tuple(profile.value for profile in Seccomp)
DEFAULT_TIMEOUT = "10m"
STATE_DIR = ".hitz"  # hitz's own state in the project: cache, logs; no task may touch it

TASK_NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_TASK_NAME = re.compile(TASK_NAME_PATTERN)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GLOB_CHARS = frozenset("*?[")

_NUMBER = r"\d+(?:\.\d+)?"
# Units largest first, each at most once: "1h30m", "90s", "500ms". `m(?!s)`
# keeps "500ms" from reading as 500 minutes and a stray "s"; `(?=\d)` refuses
# the empty string. Also used as the JSON Schema pattern (ECMA-262 syntax).
DURATION_PATTERN = (
    rf"(?=\d)(?:({_NUMBER})h)?(?:({_NUMBER})m(?!s))?(?:({_NUMBER})s)?(?:({_NUMBER})ms)?"
)
_DURATION = re.compile(DURATION_PATTERN)
# A size: a number and a binary or decimal unit ("10GiB", "500MB", "4096").
SIZE_PATTERN = r"([0-9]+(?:\.[0-9]+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?"
_SIZE = re.compile(SIZE_PATTERN)
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
_DURATION_EXPECTED = 'a duration such as "90s" or "5m"'

# A task header in its plain form, `[tasks.NAME]`, for the line of each task
# without a full scan (see _task_lines).
_TASK_HEADER = re.compile(r"^[ \t]*\[[ \t]*tasks[ \t]*\.[ \t]*([A-Za-z0-9_-]+)[ \t]*\]", re.M)
# tomllib ends every message with "(at line L, column C)" or "(at end of document)".
_TOML_AT = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", re.DOTALL)
_TOML_KEY = re.compile(r"\((?:'[^']*'|\"[^\"]*\")(?:, (?:'[^']*'|\"[^\"]*\"))*,?\)")


def load(path: str | os.PathLike[str], cache_dir: Path | None = None) -> Manifest:
    """Read, parse and validate the manifest at ``path``.

    Returns a ``Manifest`` with absolute ``path`` and ``root`` (the manifest's
    folder), ``display_path`` as given, tasks in document order with
    ``[defaults]`` applied, and lazily computed ``locations``.

    With ``cache_dir``, a manifest whose bytes (and path, and this loader's
    code) were validated before is rebuilt from ``cache_dir/manifest.json``
    without parsing or validating again; see ``_cached``.

    Raises ``ManifestError`` for every problem, reading errors included (reason
    NOT_FOUND); never another exception for bad input. Messages name
    ``display_path`` and the line.
    """
    display = os.fspath(path)
    absolute = Path(os.path.abspath(display))
    source = _Source(display, _read(absolute, display))
    key = _cache_key(absolute, source.text) if cache_dir is not None else ""
    if cache_dir is not None:
        cached = _cached(cache_dir / _CACHE_FILE, key, absolute, source)
        if cached is not None:
            return cached
    try:
        raw = tomllib.loads(source.text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, source) from exc
    except RecursionError as exc:
        raise source.error("values are nested too deeply", Reason.TOML_SYNTAX) from exc
    _validate_types(raw, source)
    manifest = _Builder(raw, source, absolute).manifest()
    if cache_dir is not None:
        _store(cache_dir / _CACHE_FILE, key, manifest)
    return manifest


# --- the validated-manifest cache ----------------------------------------------
#
# Parsing a 10,000-task manifest costs ~0.4 s in tomllib alone and importing
# pydantic ~0.1 s, so a no-op run keeps the validated result, keyed by the
# manifest's bytes, its absolute path and the code that validated it. The
# cache is JSON (never pickle: .hitz/ is inside a project that may not be
# trusted), written atomically; anything unreadable or stale is a miss.

_CACHE_FILE = "manifest.json"
_CACHE_VERSION = "hitz-manifest-cache/1"
_TASK_FIELDS = (
    "name", "argv", "inputs", "outputs", "deps", "env", "backend", "rootfs", "network",
    "timeout_s", "description", "line", "shell", "cache", "seccomp", "capabilities",
    "open_files", "file_size", "cpu_time", "landlock", "output_limit", "memory_limit",
    "pids_limit", "cpu_limit", "tmp_limit",
)
assert TaskDef.__match_args__ == _TASK_FIELDS, "rows of the cache are TaskDef's fields, in order"
# The `[remote]` row of the cache: these Manifest fields, in this order.
_REMOTE_FIELDS = ("remote_executor", "remote_instance", "remote_token_env", "remote_token_file",
                  "remote_ca_file")


def _cache_key(absolute: Path, text: str) -> str:
    import hashlib

    digest = hashlib.sha256(_CACHE_VERSION.encode())
    for module in (__file__, _model_file()):
        digest.update(Path(module).read_bytes())
    digest.update(str(absolute).encode() + b"\0" + text.encode())
    return digest.hexdigest()


def _model_file() -> str:
    from hitz.executor import model

    return model.__file__


def _cached(path: Path, key: str, absolute: Path, source: _Source) -> Manifest | None:
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        tasks = {}
        width = len(_TASK_FIELDS)
        at = _TASK_FIELDS.index("capabilities")
        for row in data["tasks"]:
            # Positionally, in TaskDef's field order (asserted below
            # _TASK_FIELDS): twice as fast as TaskDef(**dict(zip(...))),
            # 30 ms less for a 10,000-task manifest.
            if len(row) != width:
                return None
            name, argv, inputs, outputs, deps, *rest = row
            rest[at - 5] = tuple(rest[at - 5])
            tasks[name] = TaskDef(name, tuple(argv), tuple(inputs), tuple(outputs),
                                  tuple(deps), *rest)
        return Manifest(
            path=absolute,
            display_path=source.display,
            root=absolute.parent,
            project=data["project"],
            tasks=tasks,
            locations=_Locations(source),
            lines=source.lines,
            cache_dir=data["cache"][0],
            cache_max_bytes=data["cache"][1],
            cache_remote=RemoteCacheSettings.from_row(data["cache"][2]),
            **dict(zip(_REMOTE_FIELDS, data["remote"], strict=True)),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _store(path: Path, key: str, manifest: Manifest) -> None:
    rows = [[getattr(task, name) for name in _TASK_FIELDS] for task in manifest.tasks.values()]
    data = json.dumps({
        "key": key, "project": manifest.project, "tasks": rows,
        "cache": [manifest.cache_dir, manifest.cache_max_bytes,
                  manifest.cache_remote.as_row()],
        "remote": [getattr(manifest, name) for name in _REMOTE_FIELDS],
    })
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(data)
        os.replace(tmp, path)
    except OSError:  # a read-only checkout only loses the speed-up
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``hitz.toml``, for ``hitz schema``.

    It describes keys, types and allowed values; ``load`` checks more (paths,
    task references, colliding outputs) than a schema can express.
    """
    schema = _models().root.model_json_schema()
    _drop_null_defaults(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def parse_size(text: str) -> int:
    """Bytes in a size: "10GiB", "500MB", "4096". ValueError otherwise."""
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid size {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_duration(text: str) -> float:
    """Seconds in a duration: "90s", "5m", "1h30m", "500ms", "1.5h".

    Units are h, m, s and ms, largest first, each at most once, and every
    number needs one. Raises ValueError for anything else, including a
    non-string or a duration too long to represent.
    """
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: expected numbers with units h, m, s or ms,"
            ' such as "90s", "5m", "1h30m" or "500ms"'
        )
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds + millis / 1000
    if not math.isfinite(total):
        raise ValueError(f"invalid duration {text!r}: too long")
    return total


# --- reading and parsing -------------------------------------------------------


def _read(path: Path, display: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(
            "no such file",
            path=display,
            reason=Reason.NOT_FOUND,
            hint=f"create `{display}`, or name another manifest with `--config PATH`",
        ) from exc
    except IsADirectoryError as exc:
        raise ManifestError(
            "is a directory, not a manifest",
            path=display,
            reason=Reason.NOT_FOUND,
            hint=f"name the file itself, such as `--config {posixpath.join(display, 'hitz.toml')}`",
        ) from exc
    except OSError as exc:
        raise ManifestError(
            f"cannot read: {(exc.strerror or str(exc)).lower()}",
            path=display,
            reason=Reason.NOT_FOUND,
        ) from exc
    try:
        # utf-8-sig: a byte-order mark some editors add is not part of the TOML text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded",
            path=display,
            line=line,
            reason=Reason.TOML_SYNTAX,
            hint="TOML files are UTF-8; convert it, e.g. with `iconv -t UTF-8`",
        ) from exc


def _syntax_error(exc: tomllib.TOMLDecodeError, source: _Source) -> ManifestError:
    match = _TOML_AT.fullmatch(str(exc))
    message, pos = str(exc), None
    if match:
        message = match.group(1)
        line, column = match.group(2, 3)
        pos = (int(line), int(column)) if line else source.end()
    if declared := re.fullmatch(r"Cannot declare (.*) twice", message):
        message, pos = f"table [{_dotted(declared.group(1))}] is declared twice", source.start(pos)
    elif message == "Cannot overwrite a value":
        message, pos = "this key already has a value", source.start(pos)
    elif frozen := re.fullmatch(r"Cannot mutate immutable namespace (.*)", message):
        message = f'"{_dotted(frozen.group(1))}" was written inline and cannot be extended'
    else:
        message = _TOML_KEY.sub(lambda m: _dotted(m.group()), message)
        message = message[:1].lower() + message[1:]
    return source.error(f"TOML syntax error: {message}", Reason.TOML_SYNTAX, pos=pos)


def _dotted(key_repr: str) -> str:
    """("tasks", "a b") as tomllib prints it -> tasks."a b"."""
    try:
        parts = ast.literal_eval(key_repr)
    except (ValueError, SyntaxError):
        return key_repr
    if not isinstance(parts, tuple):
        return key_repr
    return ".".join(
        p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p) for p in map(str, parts)
    )


# --- the schema (pydantic: imported on first use) ------------------------------


class _Models(NamedTuple):
    root: type[BaseModel]
    project: type[BaseModel]
    defaults: type[BaseModel]
    task: type[BaseModel]


@cache
def _models() -> _Models:
    """The pydantic models of the manifest: types and known keys only.

    Defined here, not at module level, so that importing this module does not
    import pydantic. Values are checked by ``_Builder``; the ``enum`` and
    ``pattern`` entries only document them in the JSON Schema.
    """
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
    from pydantic.config import JsonDict
    from pydantic.json_schema import SkipJsonSchema

    strict = ConfigDict(extra="forbid", strict=True)
    duration: JsonDict = {"pattern": f"^{DURATION_PATTERN}$", "examples": ["90s", "5m", "1h30m"]}
    task_ref = Annotated[
        str, WithJsonSchema({"type": "string", "pattern": f"^:?{TASK_NAME_PATTERN}$"})
    ]
    # A `str | Unset = None` key may be left out; the schema shows only the string.
    Unset = SkipJsonSchema[None]

    class Project(BaseModel):
        model_config = strict
        name: str | Unset = Field(None, description="Project name; default: the folder name.")

    class Limits(BaseModel):
        model_config = strict
        open_files: int | Unset = Field(
            None, description="Most open files per process (RLIMIT_NOFILE); default 4096."
        )
        file_size: str | Unset = Field(
            None, description='Largest file a process may write (RLIMIT_FSIZE), such as "1GiB".'
        )
        cpu_time: str | Unset = Field(
            None,
            description="CPU time per process (RLIMIT_CPU), a duration.",
            json_schema_extra=duration,
        )
        output: str | Unset = Field(
            None,
            description='Most stdout + stderr kept, such as "64MiB" (the default); a task'
            " printing more is killed and fails.",
        )
        memory: str | Unset = Field(
            None, description='Memory of the whole task (a cgroup), such as "2GiB".'
        )
        pids: int | Unset = Field(
            None, description="Processes and threads the task may have at once (a cgroup)."
        )
        cpu: float | int | Unset = Field(
            None, description="CPUs' worth of time the task may use, such as 1.5 (a cgroup)."
        )
        tmp: str | Unset = Field(
            None, description='Size of each of /tmp and /dev/shm (in memory); default "1GiB".'
        )

    policy_fields: dict[str, Any] = {
        "seccomp": (
            str | Unset,
            Field(None, description='"default": deny what builds never need; "strict": allow'
                  ' only what builds use; "unconfined": no filter (an explicit opt-out); or'
                  " the path of a profile in Docker's seccomp JSON format.",
                  json_schema_extra={"examples": ["default", "strict", "unconfined",
                                                  "seccomp.json"]}),
        ),
        "capabilities": (
            list[str] | Unset,
            Field(None, description="Capabilities to keep (all others are dropped).",
                  json_schema_extra={"items": {"enum": list(CAPABILITIES)}}),
        ),
        "limits": (Limits | Unset, Field(None, description="Resource limits.")),
        "landlock": (
            bool | str | Unset,
            Field(None, description='true (default): Landlock filesystem rules, refused where'
                  ' the kernel has none; "best-effort": use them where the kernel has them;'
                  " false: none."),
        ),
    }

    class Defaults(BaseModel):
        model_config = strict
        backend: str = Field(
            "namespace", description="Sandbox backend.", json_schema_extra=_enum(BACKENDS)
        )
        rootfs: str = Field(
            "host",
            description='Root filesystem of the sandbox: "host" (the host\'s system folders,'
            ' read-only), "image:NAME" (images/NAME.toml, pinned in hitz.lock) or'
            ' "docker:NAME@sha256:DIGEST" (a local Docker image, docker backend only).',
            json_schema_extra={"pattern": f"^(?:{ROOTFS_PATTERN})$"},
        )
        network: str = Field(
            "none",
            description='"none": only a private loopback; "host": the host network.',
            json_schema_extra=_enum(NETWORKS),
        )
        timeout: str = Field(
            DEFAULT_TIMEOUT, description="Wall-clock limit per task.", json_schema_extra=duration
        )
        env: dict[str, str] = Field(
            default_factory=dict, description="Environment variables every task gets."
        )
        seccomp: str | Unset = policy_fields["seccomp"][1]
        capabilities: list[str] | Unset = policy_fields["capabilities"][1]
        limits: Limits | Unset = policy_fields["limits"][1]
        landlock: bool | str | Unset = policy_fields["landlock"][1]

    class Task(BaseModel):
        model_config = strict
        description: str | Unset = Field(None, description="What the task is for.")
        run: str | Annotated[list[str], Field(min_length=1)] = Field(
            description="A shell command (run with `/bin/sh -c`) or a program and its arguments."
        )
        inputs: list[str] = Field(
            default_factory=list,
            description="Files the task reads: globs relative to the manifest folder,"
            ' "dir/" for a whole folder, ":task" for the outputs of a task.',
        )
        outputs: list[str] = Field(
            default_factory=list,
            description="Files the task writes, relative to the manifest folder;"
            ' "dir/" for a folder.',
        )
        deps: list[task_ref] = Field(
            default_factory=list, description="Tasks that must finish first."
        )
        env: dict[str, str] = Field(
            default_factory=dict, description="Environment variables, over [defaults] env."
        )
        timeout: str | Unset = Field(
            None,
            description="Wall-clock limit; default: [defaults] timeout.",
            json_schema_extra=duration,
        )
        network: str | Unset = Field(
            None,
            description="Default: [defaults] network.",
            json_schema_extra=_enum(NETWORKS),
        )
        backend: str | Unset = Field(
            None,
            description="Default: [defaults] backend.",
            json_schema_extra=_enum(BACKENDS),
        )
        rootfs: str | Unset = Field(
            None,
            description="Default: [defaults] rootfs.",
            json_schema_extra={"pattern": f"^(?:{ROOTFS_PATTERN})$"},
        )
        cache: bool | Unset = Field(
            None,
            description="false: never cache this task's result; true: cache it even with"
            ' network = "host". Default: cache unless network = "host".',
        )
        seccomp: str | Unset = policy_fields["seccomp"][1]
        capabilities: list[str] | Unset = policy_fields["capabilities"][1]
        limits: Limits | Unset = policy_fields["limits"][1]
        landlock: bool | str | Unset = policy_fields["landlock"][1]

    class CacheSettings(BaseModel):
        model_config = strict
        dir: str | Unset = Field(
            None,
            description="The local cache folder, relative to the manifest folder. Default:"
            " $HITZ_CACHE_DIR, else $XDG_CACHE_HOME/hitz (~/.cache/hitz).",
        )
        max_size: str | Unset = Field(
            None,
            description='Evict least recently used entries above this size, such as "10GiB".',
            json_schema_extra={"pattern": f"^{SIZE_PATTERN}$", "examples": ["500MiB", "10GiB"]},
        )
        remote: str | Unset = Field(
            None,
            description='A REAPI v2 remote cache, such as "grpc://127.0.0.1:8980" or'
            ' "grpcs://cache.example.com:443", asked after the local cache.'
            " Overridden by `hitz run --remote`/`--no-remote` and $HITZ_REMOTE_CACHE.",
            json_schema_extra={"pattern": "^grpcs?://.+:[0-9]+/?$"},
        )
        instance: str | Unset = Field(
            None, description='The REAPI instance name on the remote cache. Default: "".')
        upload: bool | Unset = Field(
            None,
            description="false: only read the remote cache, never write it. Default: true.",
        )
        token_env: str | Unset = Field(
            None,
            description="The environment variable holding the remote cache's bearer token"
            " (never the token itself).",
        )
        token_file: str | Unset = Field(
            None,
            description="The file holding the remote cache's bearer token, relative to the"
            " manifest folder (never the token itself).",
        )
        ca_file: str | Unset = Field(
            None,
            description="PEM root certificates for a grpcs:// remote cache, relative to the"
            " manifest folder. Default: the system's.",
        )
        timeout: str | Unset = Field(
            None,
            description="The deadline of each call to the remote cache, a duration."
            ' Overridden by $HITZ_REMOTE_TIMEOUT (seconds). Default: "10s".',
            json_schema_extra=duration,
        )

    class RemoteSettings(BaseModel):
        model_config = strict
        executor: str | Unset = Field(
            None,
            description='A REAPI v2 execution server, "grpc://HOST:PORT" or "grpcs://HOST:PORT";'
            " overridden by --remote-executor and $HITZ_REMOTE_EXECUTOR.",
            json_schema_extra={"examples": ["grpc://127.0.0.1:8980"]},
        )
        instance: str | Unset = Field(
            None, description='The REAPI instance name on that server; default "".'
        )
        token_env: str | Unset = Field(
            None,
            description="The environment variable holding the remote executor's bearer token"
            " (never the token itself).",
        )
        token_file: str | Unset = Field(
            None,
            description="The file holding the remote executor's bearer token, relative to the"
            " manifest folder (never the token itself).",
        )
        ca_file: str | Unset = Field(
            None,
            description="PEM root certificates for a grpcs:// remote executor, relative to the"
            " manifest folder. Default: the system's.",
        )

    class Root(BaseModel):
        # "tasks" is required in the schema; load() says "no tasks defined" itself.
        model_config = ConfigDict(
            extra="forbid",
            strict=True,
            title="hitz.toml",
            json_schema_extra={"required": ["tasks"]},
        )
        project: Project | Unset = Field(None, description="About the project.")
        defaults: Defaults | Unset = Field(None, description="What every task inherits.")
        cache: CacheSettings | Unset = Field(None, description="The local cache.")
        remote: RemoteSettings | Unset = Field(
            None, description='Where tasks with backend = "remote" run (docs/remote-execution.md).'
        )
        tasks: dict[str, Task] = Field(
            default_factory=dict,
            description="The tasks, by name.",
            json_schema_extra={
                "minProperties": 1,
                "propertyNames": {"pattern": f"^{TASK_NAME_PATTERN}$"},
            },
        )

    return _Models(Root, Project, Defaults, Task)


def _enum(values: tuple[str, ...]) -> dict[str, Any]:
    return {"enum": list(values)}


def _drop_null_defaults(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("default", 0) is None:
            del node["default"]
        for value in node.values():
            _drop_null_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _drop_null_defaults(value)


def _validate_types(raw: dict[str, Any], source: _Source) -> None:
    from pydantic import ValidationError

    try:
        _models().root.model_validate(raw)
    except ValidationError as exc:
        raise _first_type_error(exc, raw, source) from exc


# --- translating pydantic's errors ---------------------------------------------

# What each key must hold, for "must be ..." messages.
_EXPECTED = {
    "project": "a table",
    "defaults": "a table",
    "tasks": "a table of tasks",
    "name": "a string",
    "description": "a string",
    "run": "a command string or a list of strings",
    "inputs": "a list of strings",
    "outputs": "a list of strings",
    "deps": "a list of task names",
    "env": "a table of strings",
    "timeout": _DURATION_EXPECTED,
    "backend": " or ".join(map(json.dumps, BACKENDS)),
    "rootfs": " or ".join(map(json.dumps, ROOTFS)),
    "network": " or ".join(map(json.dumps, NETWORKS)),
    "seccomp": '"default", "strict", "unconfined" or the path of a Docker seccomp profile',
    "capabilities": 'a list of capability names such as "CAP_CHOWN"',
    "limits": "a table",
    "open_files": "a whole number",
    "file_size": 'a size such as "1GiB"',
    "cpu_time": _DURATION_EXPECTED,
    "output": 'a size such as "64MiB"',
    "memory": 'a size such as "2GiB"',
    "pids": "a whole number",
    "cpu": "a number of CPUs such as 1.5",
    "tmp": 'a size such as "256MiB"',
    "landlock": 'true, false or "best-effort"',
    "upload": "true or false",  # [cache] upload
}


def _first_type_error(exc: ValidationError, raw: dict[str, Any], source: _Source) -> ManifestError:
    """The error the user meets first in the file, in the user's words."""
    found = [(error["type"], error["loc"], *_walk(raw, error["loc"])) for error in exc.errors()]
    # A union reports each member's failure: for `run = ["cc", 5]` both "not a
    # string" at "run" and "not a string" at item 1. The deeper one is the news.
    deeper = {path[:end] for _, _, path, _ in found for end in range(len(path))}
    errors = [
        _type_error(kind, loc, path, value, raw, source)
        for kind, loc, path, value in found
        if path not in deeper
    ]
    return min(errors, key=lambda e: (e.line or math.inf, e.column or 0))


def _type_error(
    kind: str, loc: tuple[str | int, ...], path: KeyPath, value: Any, raw: Any, source: _Source
) -> ManifestError:
    if kind == "extra_forbidden":
        return _unknown_key(path, source)
    if kind == "missing":
        key = str(loc[-1])
        return source.error(
            f"{_context(path)}missing key {_q(key)}",
            Reason.MISSING_KEY,
            path,
            key=True,
            hint='add the command to run, such as `run = "make"`' if key == "run" else None,
        )
    if path in {("project",), ("defaults",), ("tasks",)}:
        hint = None
        if path == ("tasks",) and isinstance(value, list):
            hint = "declare each task as `[tasks.NAME]`, not `[[tasks]]`"
        return source.error(
            f"{_q(path[0])} must be {_EXPECTED[str(path[0])]}, got {_show(value)}",
            Reason.WRONG_TYPE,
            path,
            hint=hint,
        )
    if len(path) == 2 and path[0] == "tasks":
        return source.error(
            f"task {_q(path[1])} must be a table, got {_show(value)}",
            Reason.WRONG_TYPE,
            path,
            hint=f"declare it as `[tasks.{path[1]}]` followed by `run = ...`",
        )
    return _bad_value(path, value, raw, source)


def _walk(raw: Any, loc: tuple[str | int, ...]) -> tuple[KeyPath, Any]:
    """Follow pydantic's ``loc`` through the parsed document.

    Parts that are not in the document are skipped: union member tags such as
    "str" or "list[str]", and the last part of a missing key.
    """
    node, path = raw, []
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            found = part in node
        else:
            found = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if found:
            node = node[part]
            path.append(part)
    return tuple(path), node


def _unknown_key(path: KeyPath, source: _Source) -> ManifestError:
    models = _models()
    section: dict[KeyPath, type[BaseModel]] = {
        (): models.root,
        ("project",): models.project,
        ("defaults",): models.defaults,
    }
    model = section.get(path[:-1]) or _table_model(models.root, path[:-1]) or models.task
    known = list(model.model_fields)
    key = str(path[-1])
    guess = suggest(key, known)
    hint = f"did you mean {_q(guess)}?" if guess else "the known keys are " + _list(known)
    return source.error(
        f"{_context(path)}unknown key {_q(key)}", Reason.UNKNOWN_KEY, path, key=True, hint=hint
    )


def _table_model(root: type[BaseModel], path: KeyPath) -> type[BaseModel] | None:
    """The model of a top-level table such as `[remote]`, from Root's fields."""
    from typing import get_args

    from pydantic import BaseModel

    field = root.model_fields.get(str(path[0])) if len(path) == 1 else None
    if field is None:
        return None
    for candidate in (field.annotation, *get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _bad_value(path: KeyPath, value: Any, raw: Any, source: _Source) -> ManifestError:
    at = 2 if path[:1] == ("tasks",) else 1
    if len(path) <= at:
        # Whole tables are handled by the caller; this keeps a message, not an
        # IndexError, should the schema grow a table the caller does not know.
        key = ".".join(map(str, path))
        return source.error(f"{_q(key)} has the wrong type", Reason.WRONG_TYPE, path)
    field, rest = str(path[at]), path[at + 1 :]
    whole = _get(raw, path[: at + 1])
    context = _context(path)
    hint = None
    if field == "timeout":
        if isinstance(value, int | float) and not isinstance(value, bool):
            hint = (
                f'write it as a string with a unit, such as `timeout = "{value}s"` or `"{value}m"`'
            )
        message = f'"timeout" must be {_DURATION_EXPECTED}, got {_show(value)}'
        return source.error(context + message, Reason.BAD_DURATION, path, hint=hint)
    if field == "run" and whole in ("", []):
        return _empty_run(path[: at + 1], source)
    if field == "env" and rest:
        if isinstance(value, int | float | bool):
            hint = f"quote it: `{rest[0]} = {json.dumps(_show(value))}`"
        message = f"env {_q(str(rest[0]))} must be a string, got {_show(value)}"
    elif rest:
        message = f"{_q(field)} items must be strings, got {_show(value)}"
    else:
        if isinstance(value, str) and field in ("inputs", "outputs", "deps"):
            hint = f"write it as a list: `{field} = [{json.dumps(value)}]`"
        elif isinstance(value, str) and field == "env":
            hint = 'write it as a table, such as `env = { NAME = "value" }`'
        message = f"{_q(field)} must be {_EXPECTED.get(field, 'a string')}, got {_show(value)}"
    return source.error(context + message, Reason.WRONG_TYPE, path, hint=hint)


def _get(raw: Any, path: KeyPath) -> Any:
    node = raw
    for part in path:
        node = node[part]
    return node


def _empty_run(path: KeyPath, source: _Source) -> ManifestError:
    return source.error(
        f'{_context(path)}"run" is empty',
        Reason.BAD_VALUE,
        path,
        hint='give a command, such as `run = "make"` or `run = ["make", "-j4"]`',
    )


# --- building the tasks --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    """What a task inherits from `[defaults]`."""

    backend: str
    rootfs: str
    network: str
    timeout_s: float
    env: dict[str, str]
    seccomp: str
    capabilities: tuple[str, ...]
    limits: dict[str, int | None]
    landlock: str


class _Builder:
    """Checks values the types allow but hitz does not, and builds TaskDefs."""

    def __init__(self, raw: dict[str, Any], source: _Source, path: Path) -> None:
        self.raw = raw
        self.source = source
        self.path = path
        self.tasks: dict[str, Any] = raw.get("tasks", {})
        self.durations: dict[str, float] = {}
        self.env_names: set[str] = set()
        self.outputs = _OutputIndex()

    def manifest(self) -> Manifest:
        root = self.path.parent
        project = self.raw.get("project", {}).get("name", root.name or "project")
        if project == "":
            raise self.source.error(
                '[project]: "name" is empty', Reason.BAD_VALUE, ("project", "name")
            )
        defaults = self.defaults(self.raw.get("defaults", {}))
        if not self.tasks:
            raise self.source.error(
                "no tasks defined",
                Reason.MISSING_KEY,
                hint='add a `[tasks.NAME]` table, such as `[tasks.build]` with `run = "make"`',
            )
        lines = _task_lines(self.source, self.tasks)
        tasks = {
            name: self.task(name, spec, defaults, lines[name]) for name, spec in self.tasks.items()
        }
        cache_dir, cache_max = self.cache_settings(self.raw.get("cache", {}))
        cache_remote = self.cache_remote_settings(self.raw.get("cache", {}))
        remote = self.remote_settings(self.raw.get("remote", {}))
        return Manifest(
            path=self.path,
            display_path=self.source.display,
            root=root,
            project=project,
            tasks=tasks,
            locations=_Locations(self.source),
            lines=self.source.lines,
            cache_dir=cache_dir,
            cache_max_bytes=cache_max,
            cache_remote=cache_remote,
            **remote,
        )

    def remote_settings(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`[remote]`: the executor's URL (checked for its form only: whether
        it answers is known when a remote task first needs it), instance, token
        and CA file."""
        executor = spec.get("executor")
        try:
            if executor is not None:
                executor = parse_url(executor).url
        except ValueError:
            raise self.fail(
                ("remote", "executor"),
                f'"executor" must be an address such as "grpc://127.0.0.1:8980" or'
                f' "grpcs://build.example.com:443", got {_show(executor)}',
                Reason.BAD_VALUE,
            ) from None
        token_env, token_file, ca_file = self.auth_settings(spec, "remote")
        return dict(zip(_REMOTE_FIELDS, (executor, spec.get("instance", ""), token_env,
                                         token_file, ca_file), strict=True))

    def cache_remote_settings(self, spec: dict[str, Any]) -> RemoteCacheSettings:
        """The `[cache]` keys about the remote cache (``hitz.executor.remote_config``).
        The address is checked for its form only: whether it answers is known
        when a task first asks it."""
        url = spec.get("remote")
        if url is not None:
            try:
                url = parse_url(url).url
            except ValueError:
                raise self.fail(
                    ("cache", "remote"),
                    f'"remote" must be an address such as "grpc://127.0.0.1:8980" or '
                    f'"grpcs://cache.example.com:443", got {_show(url)}',
                    Reason.BAD_VALUE,
                ) from None
        token_env, token_file, ca_file = self.auth_settings(spec, "cache")
        timeout = self.timeout(spec["timeout"], ("cache",)) if "timeout" in spec else None
        return RemoteCacheSettings(url, spec.get("instance", ""), spec.get("upload", True),
                                   token_env, token_file, ca_file, timeout)

    def auth_settings(self, spec: dict[str, Any], table: str
                      ) -> tuple[str | None, str | None, str | None]:
        """``token_env``, ``token_file`` and ``ca_file`` of `[cache]` or `[remote]`,
        checked the same way for both: the token is named, never written here."""
        if "token_env" in spec and "token_file" in spec:
            raise self.fail((table, "token_file"),
                            'set "token_env" or "token_file", not both', Reason.BAD_VALUE)
        token_env = spec.get("token_env")
        if token_env is not None and not _ENV_NAME.fullmatch(token_env):
            raise self.fail(
                (table, "token_env"),
                f'"token_env" must name an environment variable, got {_show(token_env)}',
                Reason.BAD_VALUE,
                hint="put the token in a variable (or in a file: `token_file`) and name it"
                " here; the token itself never goes in hitz.toml",
            )
        for key in ("token_file", "ca_file"):
            if key in spec and not spec[key].strip():
                raise self.fail((table, key), f'"{key}" must be a path, got ""',
                                Reason.BAD_VALUE)
        return token_env, spec.get("token_file"), spec.get("ca_file")

    def cache_settings(self, spec: dict[str, Any]) -> tuple[str | None, int | None]:
        max_bytes = None
        if "max_size" in spec:
            try:
                max_bytes = parse_size(spec["max_size"])
            except ValueError:
                max_bytes = 0
            if max_bytes <= 0:
                raise self.fail(
                    ("cache", "max_size"),
                    f'"max_size" must be a size such as "10GiB" or "500MB", got '
                    f'{_show(spec["max_size"])}',
                    Reason.BAD_VALUE,
                )
        return spec.get("dir"), max_bytes

    def defaults(self, spec: dict[str, Any]) -> _Settings:
        return _Settings(
            backend=self.choice(
                "backend", spec.get("backend", BACKENDS[0]), BACKENDS, ("defaults",)
            ),
            rootfs=self.rootfs(spec.get("rootfs", ROOTFS[0]), ("defaults",)),
            network=self.choice(
                "network", spec.get("network", NETWORKS[0]), NETWORKS, ("defaults",)
            ),
            timeout_s=self.timeout(spec.get("timeout", DEFAULT_TIMEOUT), ("defaults",)),
            env=self.env(spec.get("env", {}), ("defaults",)),
            seccomp=self.seccomp(spec.get("seccomp", SECCOMP[0]), ("defaults",)),
            capabilities=self.capabilities(spec.get("capabilities", []), ("defaults",)),
            limits=self.limits(spec.get("limits", {}), ("defaults",), {}),
            landlock=self.landlock(spec["landlock"], ("defaults",))
            if "landlock" in spec
            else "required",
        )

    def landlock(self, value: bool | str, at: KeyPath) -> str:
        if value is True:
            return "required"
        if value is False:
            return "off"
        if value == "best-effort":
            return value
        raise self.fail(
            (*at, "landlock"), f'"landlock" must be true, false or "best-effort", got '
            f"{_show(value)}", Reason.BAD_VALUE,
            hint='"best-effort" runs without Landlock on a kernel that has none',
        )

    def seccomp(self, value: str, at: KeyPath) -> str:
        """A profile name, or "profile:" and the absolute path of a profile in
        Docker's seccomp JSON format (relative paths: to the manifest's folder)."""
        if value in SECCOMP and value != "profile":
            return value
        if value.endswith(".json"):
            base = os.path.dirname(self.path)
            return "profile:" + os.path.normpath(os.path.join(base, value))
        guess = suggest(value, [s for s in SECCOMP if s != "profile"])
        raise self.fail(
            (*at, "seccomp"), f"unknown seccomp {_q(value)}", Reason.BAD_VALUE,
            hint=f"did you mean {_q(guess)}?" if guess else '"seccomp" can be "default", '
            '"strict", "unconfined" or the path of a profile in Docker\'s seccomp format '
            "(.json)",
        )

    def capabilities(self, names: list[str], at: KeyPath) -> tuple[str, ...]:
        for index, name in enumerate(names):
            if name not in CAPABILITIES:
                guess = suggest(name.upper() if name.upper().startswith("CAP_")
                                else "CAP_" + name.upper(), CAPABILITIES)
                raise self.fail(
                    (*at, "capabilities", index), f"unknown capability {_q(name)}",
                    Reason.BAD_VALUE,
                    hint=f"did you mean {_q(guess)}?" if guess
                    else "capability names are those of capabilities(7), such as CAP_CHOWN",
                )
        return tuple(dict.fromkeys(names))

    def limits(self, spec: dict[str, Any], at: KeyPath,
               inherited: dict[str, int | None]) -> dict[str, int | None]:
        limits = dict(inherited)
        path = (*at, "limits")
        if "open_files" in spec:
            if spec["open_files"] < 1:
                raise self.fail((*path, "open_files"), '"open_files" must be at least 1, got '
                                f"{spec['open_files']}", Reason.BAD_VALUE)
            limits["open_files"] = spec["open_files"]
        if "file_size" in spec:
            limits["file_size"] = self.size(spec["file_size"], (*path, "file_size"), '"1GiB"')
        if "tmp" in spec:
            limits["tmp"] = self.size(spec["tmp"], (*path, "tmp"), '"256MiB"')
        if "memory" in spec:
            limits["memory"] = self.size(spec["memory"], (*path, "memory"), '"2GiB"')
        for key in ("pids", "cpu"):
            if key in spec:
                if spec[key] <= 0:
                    raise self.fail((*path, key), f'"{key}" must be above zero, got '
                                    f"{spec[key]}", Reason.BAD_VALUE)
                limits[key] = spec[key]
        if "output" in spec:
            limits["output"] = self.size(spec["output"], (*path, "output"), '"64MiB"')
        if "cpu_time" in spec:
            limits["cpu_time"] = max(1, round(self.timeout_at(spec["cpu_time"], path, "cpu_time")))
        return limits

    def size(self, value: str, at: KeyPath, example: str) -> int:
        """Bytes in a size such as "2GiB"; a ManifestError at ``at`` otherwise."""
        try:
            return parse_size(value)
        except ValueError:
            raise self.fail(at, f"{_q(str(at[-1]))} must be a size such as {example}, got "
                            f"{_show(value)}", Reason.BAD_VALUE) from None

    def timeout_at(self, value: str, at: KeyPath, key: str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise self.fail((*at, key), f"{_q(key)} must be {_DURATION_EXPECTED}, got "
                            f"{_show(value)}", Reason.BAD_DURATION) from None
        return seconds

    def task(self, name: str, spec: dict[str, Any], defaults: _Settings, line: int) -> TaskDef:
        at: KeyPath = ("tasks", name)
        if not _TASK_NAME.fullmatch(name):
            raise self.source.error(
                f"invalid task name {_q(name)}",
                Reason.BAD_TASK_NAME,
                at,
                key=True,
                hint='task names use letters, digits, "_", "." and "-",'
                ' and start with a letter, digit or "_"',
            )
        argv = self.command(spec["run"], (*at, "run"))
        deps = [self.dep(ref, (*at, "deps", i)) for i, ref in enumerate(spec.get("deps", ()))]
        inputs = spec.get("inputs", [])
        literal_inputs = self.inputs(inputs, at, deps)
        outputs = self.outputs_of(spec.get("outputs", ()), at, literal_inputs)
        env = {**defaults.env, **self.env(spec["env"], at)} if "env" in spec else defaults.env

        limits = self.limits(spec.get("limits", {}), at, defaults.limits)

        def inherit(key: str, allowed: tuple[str, ...], default: str) -> str:
            return self.choice(key, spec[key], allowed, at) if key in spec else default

        backend = inherit("backend", BACKENDS, defaults.backend)
        rootfs = self.rootfs(spec["rootfs"], at) if "rootfs" in spec else defaults.rootfs
        self.backend_fits(backend, rootfs, at, spec)
        return TaskDef(
            name=name,
            argv=argv,
            inputs=tuple(inputs),
            outputs=outputs,
            deps=tuple(dict.fromkeys(deps)),
            env=dict(env),
            backend=backend,
            rootfs=rootfs,
            network=inherit("network", NETWORKS, defaults.network),
            timeout_s=self.timeout(spec["timeout"], at)
            if "timeout" in spec
            else defaults.timeout_s,
            description=spec.get("description"),
            line=line,
            shell=isinstance(spec["run"], str),
            cache=spec.get("cache"),
            seccomp=self.seccomp(spec["seccomp"], at) if "seccomp" in spec else defaults.seccomp,
            capabilities=self.capabilities(spec["capabilities"], at)
            if "capabilities" in spec
            else defaults.capabilities,
            landlock=self.landlock(spec["landlock"], at)
            if "landlock" in spec
            else defaults.landlock,
            open_files=limits.get("open_files"),
            file_size=limits.get("file_size"),
            cpu_time=limits.get("cpu_time"),
            output_limit=limits.get("output"),
            memory_limit=limits.get("memory"),
            pids_limit=limits.get("pids"),
            cpu_limit=limits.get("cpu"),
            tmp_limit=limits.get("tmp"),
        )

    def command(self, run: str | list[str], path: KeyPath) -> tuple[str, ...]:
        """The argv for ``run``: a string goes to ``/bin/sh -c``, a list is the argv."""
        if isinstance(run, str) and not run.strip():
            raise _empty_run(path, self.source)
        if isinstance(run, list) and not run[0]:
            raise self.fail((*path, 0), '"run" must start with a program, got ""', Reason.BAD_VALUE)
        for i, arg in enumerate([run] if isinstance(run, str) else run):
            if "\0" in arg:
                where = path if isinstance(run, str) else (*path, i)
                raise self.fail(where, '"run" contains a NUL character', Reason.BAD_VALUE)
        return ("/bin/sh", "-c", run) if isinstance(run, str) else tuple(run)

    def dep(self, ref: str, path: KeyPath) -> str:
        """The task ``ref`` (":name" or "name") names, from `deps` or `inputs`."""
        name = ref[1:] if ref.startswith(":") else ref
        owner, field = str(path[1]), str(path[2])
        if name == owner:
            raise self.source.error(
                f"task {_q(owner)} depends on itself",
                Reason.BAD_VALUE,
                path,
                hint=f'remove ":{name}" from `{field}`',
            )
        if name not in self.tasks:
            guess = suggest(name, (task for task in self.tasks if task != owner))
            hint = f'did you mean ":{guess}"?' if guess else None
            raise self.fail(path, f"unknown task {_q(':' + name)}", Reason.UNKNOWN_TASK, hint=hint)
        return name

    def inputs(self, inputs: list[str], at: KeyPath, deps: list[str]) -> set[str]:
        """Check ``inputs``, add ":task" ones to ``deps``; return the literal paths."""
        literal: set[str] = set()
        for i, item in enumerate(inputs):
            path = (*at, "inputs", i)
            if item.startswith(":"):
                deps.append(self.dep(item, path))
                continue
            normal = self.relative_path(item, "input", path)
            if _GLOB_CHARS.isdisjoint(item):
                literal.add(normal)
        return literal

    def outputs_of(
        self, outputs: list[str], at: KeyPath, literal_inputs: set[str]
    ) -> tuple[str, ...]:
        """Normalised outputs ("dir/" kept) after checking their paths and overlaps."""
        result = []
        for i, item in enumerate(outputs):
            path = (*at, "outputs", i)
            if item.startswith(":") or not _GLOB_CHARS.isdisjoint(item):
                what = "names a task" if item.startswith(":") else "is a glob"
                raise self.fail(
                    path,
                    f"output {_q(item)} {what}; outputs are exact paths",
                    Reason.BAD_VALUE,
                    hint='to keep every file of a folder, declare the folder: `"build/"`',
                )
            normal = self.relative_path(item, "output", path)
            self.check_not_input(normal, literal_inputs, path)
            self.outputs.add(normal, path, self.source)
            result.append(normal + "/" if item.endswith("/") else normal)
        return tuple(result)

    def relative_path(self, item: str, kind: str, path: KeyPath) -> str:
        """``item`` normalised, after checking that it stays inside the project."""
        normal = posixpath.normpath(item) if item else ""
        if normal[:1] not in ("", ".", "/"):
            return normal  # cannot be absolute, "..", ".hitz" or the whole project
        if not item:
            reason = Reason.PATH_ESCAPES if kind == "output" else Reason.BAD_VALUE
            raise self.fail(path, f"empty {kind} path", reason)
        if normal.startswith("/") or normal == ".." or normal.startswith("../"):
            raise self.fail(
                path,
                f"{kind} {_q(item)} is outside the project",
                Reason.PATH_ESCAPES,
                hint=f"paths are relative to the folder that holds `{self.source.display}`",
            )
        if normal == STATE_DIR or normal.startswith(STATE_DIR + "/"):
            raise self.fail(
                path,
                f'{kind} {_q(item)} is inside "{STATE_DIR}/", hitz\'s state folder',
                Reason.PATH_ESCAPES,
                hint=f'"{STATE_DIR}/" holds hitz\'s cache and logs; no task may read or write it',
            )
        if normal == ".":
            if kind == "input":
                reason, hint = Reason.BAD_VALUE, 'to depend on every file, use "**"'
            else:
                reason, hint = Reason.PATH_ESCAPES, 'name what the task writes, such as "build/"'
            raise self.fail(path, f"{kind} {_q(item)} is the whole project", reason, hint=hint)
        return normal

    def check_not_input(self, output: str, literal_inputs: set[str], path: KeyPath) -> None:
        """An output may not be, contain or lie inside a literal input of its task."""
        if not literal_inputs:
            return
        problem = None
        if output in literal_inputs:
            problem = f"{_q(output)} is both an input and an output"
        for parent in _parents(output):
            if problem is None and parent in literal_inputs:
                problem = f'input "{parent}/" contains output {_q(output)}'
        for item in literal_inputs:
            if problem is None and item.startswith(output + "/"):
                problem = f'output "{output}/" contains input {_q(item)}'
        if problem is not None:
            hint = "a task cannot change its own inputs; write to another path"
            raise self.fail(path, problem, Reason.BAD_VALUE, hint=hint)

    def fail(
        self,
        path: KeyPath,
        what: str,
        reason: Reason,
        *,
        hint: str | None = None,
        key: bool = False,
    ) -> ManifestError:
        """The error for ``what`` is wrong at ``path``, with 'task "x": ' before it."""
        return self.source.error(_context(path) + what, reason, path, hint=hint, key=key)

    def env(self, env: dict[str, str], at: KeyPath) -> dict[str, str]:
        for name, value in env.items():
            if name not in self.env_names:
                if not _ENV_NAME.fullmatch(name):
                    raise self.fail(
                        (*at, "env", name),
                        f"invalid env name {_q(name)}",
                        Reason.BAD_VALUE,
                        key=True,
                        hint='names use letters, digits and "_", and do not start with a digit',
                    )
                self.env_names.add(name)
            if "\0" in value:
                what = f"env {_q(name)} contains a NUL character"
                raise self.fail((*at, "env", name), what, Reason.BAD_VALUE)
        return env

    def choice(self, field: str, value: str, allowed: tuple[str, ...], at: KeyPath) -> str:
        if value in allowed:
            return value
        guess = suggest(value, allowed)
        hint = f"did you mean {_q(guess)}?" if guess else f"{_q(field)} can be {_EXPECTED[field]}"
        raise self.fail((*at, field), f"unknown {field} {_q(value)}", Reason.BAD_VALUE, hint=hint)

    def backend_fits(self, backend: str, rootfs: str, at: KeyPath, spec: dict[str, Any]) -> None:
        """A Docker container needs an image; a bare Docker image runs only in Docker."""
        key = "rootfs" if "rootfs" in spec else "backend" if "backend" in spec else None
        where: KeyPath = (*at, key) if key else at
        if backend == "docker" and rootfs == "host":
            raise self.fail(
                where,
                'backend = "docker" needs an image, but rootfs is "host"',
                Reason.BAD_VALUE,
                hint='set rootfs = "image:NAME" (an image of images/, built with'
                ' `hitz image build NAME`) or "docker:NAME@sha256:DIGEST"',
            )
        if rootfs.startswith("docker:") and backend != "docker":
            raise self.fail(
                where,
                f'rootfs {_q(rootfs)} is a Docker image, but backend is'
                f" {_q(backend)}",
                Reason.BAD_VALUE,
                hint='set backend = "docker", or use an image of images/ ("image:NAME"),'
                " which every backend can run",
            )
        if backend == "remote" and rootfs != "host":
            # A remote executor runs the command on its own root filesystem;
            # hitz has no way to hand it an image (docs/remote-execution.md).
            raise self.fail(
                where,
                f'backend = "remote" runs on the remote executor\'s own system, but rootfs'
                f" is {_q(rootfs)}",
                Reason.BAD_VALUE,
                hint='leave rootfs = "host" (it means the remote\'s system), or run the task'
                ' with backend = "namespace" or "docker"',
            )

    def rootfs(self, value: str, at: KeyPath) -> str:
        if _ROOTFS.fullmatch(value):
            return value
        if value.startswith("docker:"):
            hint = ('name a local image by its digest, such as "docker:debian@sha256:'
                    '<64 hex digits>" (`docker images --digests` lists them); a tag alone can'
                    " change under you")
        elif value.startswith("image:"):
            hint = ('an image name uses lowercase letters, digits, "_", "." and "-", and'
                    " names a file images/NAME.toml")
        else:
            hint = ('"rootfs" can be "host", "image:NAME" (images/NAME.toml) or'
                    ' "docker:NAME@sha256:DIGEST"')
        raise self.fail((*at, "rootfs"), f"unknown rootfs {_q(value)}", Reason.BAD_VALUE,
                        hint=hint)

    def timeout(self, value: str, at: KeyPath) -> float:
        seconds = self.durations.get(value)
        if seconds is not None:
            return seconds
        path = (*at, "timeout")
        try:
            seconds = parse_duration(value)
        except ValueError:
            hint = None
            if re.fullmatch(_NUMBER, value):
                hint = f'add a unit, such as "{value}s" or "{value}m"'
            what = f'"timeout" must be {_DURATION_EXPECTED}, got {_show(value)}'
            raise self.fail(path, what, Reason.BAD_DURATION, hint=hint) from None
        if seconds <= 0:
            what = f'"timeout" must be longer than zero, got {_show(value)}'
            raise self.fail(path, what, Reason.BAD_DURATION)
        self.durations[value] = seconds
        return seconds


class _OutputIndex:
    """Every output declared so far, to find two tasks writing the same place.

    Keys are normalised paths without a trailing "/": a file "build/gen" and a
    folder "build/gen/" collide like two files do.
    """

    def __init__(self) -> None:
        self.declared: dict[str, KeyPath] = {}
        # Each folder above a declared output -> the first output below it.
        self.below: dict[str, tuple[str, KeyPath]] = {}

    def add(self, output: str, path: KeyPath, source: _Source) -> None:
        earlier = self.declared.get(output)
        if earlier is not None:
            self.conflict(f"output {_q(output)} is also declared by", earlier, path, source)
        for parent in _parents(output):
            earlier = self.declared.get(parent)
            if earlier is not None:
                what = f'output {_q(output)} is inside output "{parent}/" of'
                self.conflict(what, earlier, path, source)
        if output in self.below:
            inner, earlier = self.below[output]
            what = f'output "{output}/" contains output {_q(inner)} of'
            self.conflict(what, earlier, path, source)
        self.declared[output] = path
        for parent in _parents(output):
            self.below.setdefault(parent, (output, path))

    @staticmethod
    def conflict(what: str, earlier: KeyPath, path: KeyPath, source: _Source) -> None:
        first, second = str(earlier[1]), str(path[1])
        line = source.map.line(earlier)
        raise source.error(
            f"{_context(path)}{what} task {_q(first)} at {source.display}:{line}",
            Reason.DUPLICATE_OUTPUT,
            path,
            hint="declare each path once"
            if first == second
            else f'one task writes each path; others read it with `inputs = [":{first}"]`',
        )


def _parents(path: str) -> Iterator[str]:
    """ "a/b/c" -> "a", "a/b"."""
    cut = path.find("/")
    while cut != -1:
        yield path[:cut]
        cut = path.find("/", cut + 1)


def _task_lines(source: _Source, tasks: Mapping[str, Any]) -> dict[str, int]:
    """The header line of each task.

    Most manifests declare every task as a plain `[tasks.NAME]` header; then
    one regular-expression pass finds them all. Outside multi-line strings a
    line that looks like a header is one. Otherwise (dotted keys, inline
    tables, quoted names, multi-line strings) the full scan answers.
    """
    text, lines = source.text, dict[str, int]()
    if '"""' not in text and "'''" not in text:
        line, last = 1, 0
        for match in _TASK_HEADER.finditer(text):
            line += text.count("\n", last, match.start())
            last = match.start()
            lines.setdefault(match.group(1), line)
    if any(name not in lines for name in tasks):
        scanned = source.map
        lines = {name: scanned.line(("tasks", name)) or 0 for name in tasks}
    return lines


# --- positions and messages ----------------------------------------------------


class _Source:
    """The manifest text, and where each key is in it (scanned on first use)."""

    def __init__(self, display: str, text: str) -> None:
        self.display = display
        self.text = text
        self.lines = tuple(line.removesuffix("\r") for line in text.split("\n"))
        self._map: SourceMap | None = None

    @property
    def map(self) -> SourceMap:
        if self._map is None:
            self._map = scan(self.text)
        return self._map

    def error(
        self,
        message: str,
        reason: Reason,
        path: KeyPath = (),
        *,
        hint: str | None = None,
        key: bool = False,
        pos: Pos | None = None,
    ) -> ManifestError:
        """A ManifestError at ``pos``, or at the key (``key=True``) or value of ``path``."""
        if pos is None and path:
            pos = self.map.key(path) if key else self.map.value(path)
        return ManifestError(
            message,
            path=self.display,
            line=pos[0] if pos else None,
            column=pos[1] if pos else None,
            detail=self.excerpt(pos) if pos else None,
            hint=hint,
            reason=reason,
        )

    def excerpt(self, pos: Pos) -> str | None:
        # Manifest owns the excerpt format; a blank one lends it to errors
        # raised before there is a Manifest.
        blank = Manifest(Path(), self.display, Path(), "", {}, lines=self.lines)
        return blank.excerpt(*pos) or None

    def start(self, pos: Pos | None) -> Pos | None:
        """``pos`` moved to the first non-blank character of its line."""
        if pos is None or not 1 <= pos[0] <= len(self.lines):
            return pos
        text = self.lines[pos[0] - 1]
        return pos[0], len(text) - len(text.lstrip()) + 1

    def end(self) -> Pos:
        """Just after the last non-blank character of the text."""
        for number in range(len(self.lines), 0, -1):
            text = self.lines[number - 1].rstrip()
            if text:
                return number, len(text) + 1
        return 1, 1


class _Locations(Mapping[KeyPath, int]):
    """``Manifest.locations``: scanned from the source on first use."""

    def __init__(self, source: _Source) -> None:
        self._source = source
        self._lines: dict[KeyPath, int] | None = None

    def _all(self) -> dict[KeyPath, int]:
        if self._lines is None:
            self._lines = self._source.map.lines()
        return self._lines

    def __getitem__(self, key: KeyPath) -> int:
        return self._all()[key]

    def __iter__(self) -> Iterator[KeyPath]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def _context(path: KeyPath) -> str:
    """The part of a message that says where: 'task "build": ', '[defaults]: '."""
    if len(path) >= 2 and path[0] == "tasks":
        return f"task {_q(str(path[1]))}: "
    if path and path[0] in ("project", "defaults"):
        return f"[{path[0]}]: "
    return ""


def _q(text: str | int) -> str:
    return json.dumps(str(text), ensure_ascii=False)


def _list(words: Iterable[str]) -> str:
    return ", ".join(map(_q, words))


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML, for "got ..." (long strings cut)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
        return shown if len(shown) <= 60 else shown[:55] + '..."'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, date | time):
        return value.isoformat()
    return str(value)
