"""The docker backend: each task in a fresh, hardened Docker container.

What a task can and cannot do (docs/docker.md and the docker section of
docs/security-model.md repeat this; tests/integration/test_docker.py and the
docker runs of tests/security probe it):

- It runs in a container of the image its manifest pins (``rootfs =
  "image:NAME"`` or ``"docker:NAME@sha256:..."``), as an unprivileged user:
  uid/gid 65534 when hitz runs as root, else the invoking user's ids, so
  its outputs belong to that user.
- The root filesystem is read-only; /sys is an empty read-only tmpfs.
- Only declared inputs are visible, read-only binds under /work at their
  project paths; only declared output locations (writable binds of the
  task's staging folders), /tmp and /dev/shm (private, sized by
  ``limits.tmp``) are writable; only declared outputs are kept.
- No network (``--network none``: only its own loopback) unless the task
  opts out with ``network = "host"``, which every report shows.
- Every capability is dropped (one the policy keeps stays in the bounding
  set only: Docker sets no ambient capabilities for a non-root user),
  no-new-privileges is set, the policy's seccomp profile applies (the same
  rules as the namespace backend, rendered as Docker JSON by
  ``docker_seccomp.py``), and so does Landlock: ``docker_init.c`` applies
  the namespace launcher's rules inside the container.
- Limits: the policy's rlimits (core 0, nofile, fsize, cpu) as ulimits,
  memory (no swap beyond it), pids and CPU through Docker's cgroups; an OOM
  kill is LIMIT_EXCEEDED, and so is printing past ``limits.output``.
- The environment is exactly the declared one; stdin is /dev/null; the task
  runs in a session of its own; pid 1 is Docker's init (tini), which reaps
  what the task leaves behind. /proc hides what the namespace sandbox hides.
- On timeout the task gets SIGTERM, then SIGKILL after the grace period.
  Every container carries the labels ``hitz.run``, ``hitz.task``,
  ``hitz.pid``, ``hitz.start`` and ``hitz.host``; it is removed when its
  task ends, is cancelled or times out, and when hitz closes the backend.
  Containers whose hitz died (kill -9) are reaped when a later backend
  starts on the same host.

How: every task has one worker thread that owns its container: create,
attach, start (the container waits in ``docker_init.c`` for a go byte on
its stdin), and, once released, stream its output and collect its result.
So the ~0.2 s the engine spends creating and starting a container is spent
while earlier tasks still run (``prestart``; ``lookahead`` asks the
scheduler for four at a time, which the engine starts faster together
than one by one); ``release`` only sends the byte. hitz's main thread
never waits for the engine: it hands work to the threads, enforces
deadlines (kills go through a small pool) and takes results from a queue
in ``wait``.

What a container is made of (binds, seccomp JSON, masked paths) is
computed by ``docker_config.py``; what a task used (CPU time, peak memory)
is read from its cgroup by ``docker_usage.py`` while it runs, since the
cgroup is gone as soon as the task exits.

Docker SDK and requests exceptions are translated here, once, by
``_engine_errors``; nothing above this module sees them. Every call into
the SDK that can raise (engine requests, and ``create_host_config``, which
refuses options the engine's API version lacks) runs inside it. An engine
older than API ``MIN_API`` is refused at connection: it would silently
ignore options hitz relies on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import re
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hitz.sandbox import landlock, report
from hitz.sandbox.docker_config import input_binds, masked_paths, seccomp_option, staging_folders
from hitz.sandbox.docker_usage import SAMPLE_S, CgroupUsage
from hitz.sandbox.errors import SandboxError, SandboxErrorReason, SandboxUnavailable
from hitz.sandbox.outputs import OutputRejected, collect
from hitz.sandbox.policy import Policy, Seccomp
from hitz.sandbox.spec import Network, SandboxResult, SandboxSpec, Status, Usage

if TYPE_CHECKING:
    import docker

# The uid/gid a task runs as when hitz runs as root (as in the namespace backend).
SANDBOX_HOST_ID = 65534
INIT_PATH = "/.hitz-init"  # where docker_init.c is bound in every container
INIT_SOURCE = Path(__file__).with_name("docker_init.c")
_INIT_FAILED = 125  # docker_init.c's exit status for a failed set-up step
_INIT_MARK = b"\0hitz-init: "
_POOL_WORKERS = 4  # kills and removals; each task's own thread does the rest
_REAP_GRACE_S = 10.0  # engine calls at start-up (ping, reap) may take this long
_API_TIMEOUT_S = 120  # one engine call; a hung engine fails the run, not hangs it
DEFAULT_HOST = "unix:///var/run/docker.sock"
MIN_API = "1.41"  # the oldest engine API with every option hitz sets (cgroupns)


class DockerUnavailable(SandboxUnavailable):
    """The Docker engine cannot be reached (exit status 2: nothing ran)."""

    exit_code = 2


class ImageMissing(SandboxError):
    """A task's image is not in the Docker engine (exit status 2 before a run)."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, reason=SandboxErrorReason.SETUP_FAILED)


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def _unreachable(detail: str) -> DockerUnavailable:
    return DockerUnavailable(
        f"cannot reach the Docker engine at `{engine_address()}`: {detail}",
        hint="start it (`sudo systemctl start docker`, or `sudo dockerd` by hand) and check "
        '`docker info`, or run the task with backend = "namespace"',
    )


def _too_old(engine_api: str | None, needed: str) -> DockerUnavailable:
    speaks = f"speaks API {engine_api}" if engine_api else "speaks an older API"
    return DockerUnavailable(
        f"the Docker engine at `{engine_address()}` {speaks}; hitz needs {needed} "
        f"(Docker 20.10 or newer)",
        hint='upgrade the engine (`docker version` shows its API version), or run the task '
        'with backend = "namespace"')


# The engine's words when the client asks for a newer API than it speaks.
_TOO_NEW = re.compile(r"client version (\d+\.\d+) is too new.*API version is (\d+\.\d+)",
                      re.IGNORECASE | re.DOTALL)


@contextlib.contextmanager
def _engine_errors(what: str, engine_api: str | None = None) -> Iterator[None]:
    """The border: Docker SDK and requests exceptions become hitz errors in
    the user's words. ``what`` completes "the Docker engine could not ...";
    ``engine_api`` is the API version the client negotiated, named when the
    engine turns out too old for an option hitz sets (InvalidVersion: the
    SDK refuses before it asks, e.g. ``cgroupns`` below API 1.41)."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise ImageMissing(f"the Docker engine has no image for {what}: "
                           f"{exc.explanation or exc}") from exc
    except docker.errors.InvalidVersion as exc:
        found = re.search(r"(\d+\.\d+)", str(exc))
        needed = max(found.group(1), MIN_API, key=_api_tuple) if found else MIN_API
        raise _too_old(engine_api, needed) from exc
    except docker.errors.APIError as exc:
        too_new = _TOO_NEW.search(str(exc.explanation or exc))
        if too_new:
            raise _too_old(too_new.group(2), max(too_new.group(1), MIN_API,
                                                 key=_api_tuple)) from exc
        raise SandboxError(
            f"the Docker engine could not {what}: {exc.explanation or exc}",
            reason=SandboxErrorReason.SETUP_FAILED,
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise _unreachable(_first_line(exc)) from exc
    except docker.errors.DockerException as exc:  # from_env: no engine, bad DOCKER_HOST
        raise _unreachable(_first_line(exc)) from exc
    except OSError as exc:  # the attach socket
        raise _unreachable(exc.strerror or str(exc)) from exc


def _api_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _first_line(exc: BaseException) -> str:
    """The system's words for why the engine could not be reached. requests
    and the SDK bury them in reprs ("... FileNotFoundError(2, 'No such file
    or directory') ...", "[Errno 111] Connection refused")."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(
        r"Error\(-?\d+, '([^']+)'\)", text)
    if found:
        return found.group(1).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect() -> docker.DockerClient:
    """A client of the engine ``DOCKER_HOST`` names (else the local socket),
    after one round trip that proves it answers. Raises DockerUnavailable."""
    import docker

    with _engine_errors("answer"):
        client = docker.DockerClient(base_url=engine_address(), version="auto",
                                     timeout=_API_TIMEOUT_S, max_pool_size=32)
        client.api.ping()
    _check_api(client.api.api_version)
    return client


def _check_api(engine_api: str) -> None:
    """Fail closed on an engine older than ``MIN_API``: it would ignore the
    options it does not know (``cgroupns`` below 1.41) and run the task
    with less isolation than asked. Raises DockerUnavailable."""
    try:
        too_old = _api_tuple(engine_api) < _api_tuple(MIN_API)
    except ValueError:
        too_old = False  # not a version: the engine's own answers will say more
    if too_old:
        raise _too_old(engine_api, MIN_API)


class _Probe:
    """Two questions to a local engine over plain HTTP on its unix socket,
    without the Docker SDK (importing it costs ~0.1 s, which a run whose
    tasks all come from the cache must not pay just to learn the engine
    is there). Other addresses (tcp://, ssh://) go through the SDK."""

    def __init__(self, path: str) -> None:
        self.path = path

    def get(self, url: str) -> tuple[int, bytes]:
        import http.client

        path = self.path

        class Connection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(self.timeout)
                self.sock.connect(path)

        conn = Connection("docker", timeout=10)
        try:
            conn.request("GET", url)
            reply = conn.getresponse()
            return reply.status, reply.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _unreachable(getattr(exc, "strerror", None) or str(exc)) from exc
        finally:
            conn.close()


def check_engine(docker_refs: dict[str, str]) -> None:
    """For `hitz run`, before any task runs: the engine answers, and has the
    image of every ``{ref: task}`` given (``NAME@sha256:D``, see
    ``resolve_image``). Raises DockerUnavailable or ImageMissing."""
    address = engine_address()
    if not address.startswith("unix://"):
        client = connect()
        try:
            for ref, task in docker_refs.items():
                resolve_image(client, ref, f"docker:{ref}", task)
        finally:
            client.close()
        return
    from urllib.parse import quote

    probe = _Probe(address.removeprefix("unix://"))
    status, _ = probe.get("/_ping")
    if status != 200:
        raise _unreachable(f"it answered {status} to a ping")
    status, body = probe.get("/version")
    if status == 200:
        with contextlib.suppress(ValueError, AttributeError):
            _check_api(str(json.loads(body).get("ApiVersion", "")))
    for ref, task in docker_refs.items():
        name, _, digest = ref.partition("@")
        if probe.get(f"/images/{quote(ref, safe='')}/json")[0] == 200:
            continue
        if digest:
            status, body = probe.get(f"/images/{quote(digest, safe='')}/json")
            tags = json.loads(body).get("RepoTags") or [] if status == 200 else []
            if any(tag.rsplit(":", 1)[0] == name for tag in tags):
                continue
        raise _image_missing(f"docker:{ref}", task)


def engine_version() -> str:
    """The engine's version, for `hitz doctor`. Raises DockerUnavailable."""
    client = connect()
    try:
        with _engine_errors("say its version"):
            return str(client.api.version().get("Version", "?"))
    finally:
        client.close()


def image_ref(spec: SandboxSpec) -> tuple[str, str]:
    """(what the engine should run, what the user called it) for ``spec``.

    Raises ImageMissing when the image was never imported (an
    ``image:NAME`` whose build left no Docker reference)."""
    if spec.image is not None and spec.image.docker_ref:
        return spec.image.docker_ref, spec.rootfs
    if spec.rootfs.startswith("docker:"):
        return spec.rootfs.removeprefix("docker:"), spec.rootfs
    name = spec.rootfs.removeprefix("image:")
    raise ImageMissing(
        f"task `:{spec.task}` runs on `{spec.rootfs}`, which is not in the Docker engine",
        hint=f"build and import it with `hitz image build {name}`",
    )


def resolve_image(client: docker.DockerClient, ref: str, rootfs: str, task: str) -> str:
    """The engine's image ID for ``ref``. A ``NAME@sha256:D`` reference
    matches an image pulled with that manifest digest, or a local image
    (``docker import`` records none) whose ID is ``sha256:D`` and which
    carries the name NAME. Raises ImageMissing with a hint."""
    import docker.errors

    name, _, digest = ref.partition("@")
    api: Any = client.api  # inspect_image has no type information
    with _engine_errors(f"`{rootfs}`"):
        try:
            return str(api.inspect_image(ref)["Id"])
        except docker.errors.NotFound:
            pass
        if digest:
            try:
                attrs = api.inspect_image(digest)
            except docker.errors.NotFound:
                attrs = None
            if attrs is not None and any(tag.rsplit(":", 1)[0] == name
                                         for tag in attrs.get("RepoTags") or []):
                return str(attrs["Id"])
    raise _image_missing(rootfs, task)


def _image_missing(rootfs: str, task: str) -> ImageMissing:
    if rootfs.startswith("image:"):
        hint = f"build and import it with `hitz image build {rootfs.removeprefix('image:')}`"
    else:
        hint = ("`docker images --digests` lists the local images; name one by its digest, "
                'or build one of images/ with `hitz image build NAME` and use rootfs = '
                '"image:NAME"')
    return ImageMissing(f"task `:{task}` runs on `{rootfs}`, which the Docker engine does not "
                        "have", hint=hint)


# --- the init helper ---------------------------------------------------------------


def init_path() -> str:
    """docker_init.c, compiled static once per machine (see
    namespace/build.py: static, since it runs in images without a C library,
    busybox or distroless). Raises SandboxUnavailable without a C toolchain."""
    from hitz.sandbox.namespace.build import helper_path

    return helper_path(INIT_SOURCE, "hitz-docker-init", "hitz's container init",
                       static_only=True)


# --- labels and reaping ------------------------------------------------------------


def process_start(pid: int) -> str:
    """A process's start time in clock ticks since boot ("" if it is gone):
    with the pid, it names a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return ""
    return fields[19].decode()  # field 22 of proc(5), the 20th after "(comm)"


def reap_orphans(client: docker.DockerClient) -> list[str]:
    """Remove the containers of hitz runs on this host whose hitz process is
    gone (killed with -9, or the machine's power cut): their task can never
    be collected. Returns the IDs removed."""
    host = socket.gethostname()
    removed = []
    with _engine_errors("list hitz's containers"):
        found = client.api.containers(
            all=True, filters={"label": ["hitz.pid", f"hitz.host={host}"]})
    for entry in found:
        labels = entry.get("Labels") or {}
        pid = labels.get("hitz.pid", "")
        if pid.isdigit() and process_start(int(pid)) == labels.get("hitz.start"):
            continue  # its hitz still runs
        with contextlib.suppress(SandboxError), _engine_errors("remove a stale container"):
            client.api.remove_container(entry["Id"], force=True, v=True)
            removed.append(str(entry["Id"]))
    return removed


# --- the backend -----------------------------------------------------------------


@dataclass
class _Task:
    spec: SandboxSpec
    created: float  # monotonic, when prestart/start was called
    go: threading.Event = field(default_factory=threading.Event)
    released_at: float | None = None
    deadline: float = math.inf
    container: str | None = None  # its ID once created
    cancelled: bool = False
    timed_out: bool = False
    term_sent_at: float | None = None
    killed: bool = False
    output_exceeded: bool = False
    usage: Usage = field(default_factory=Usage)  # the last cgroup sample, once it ended
    thread: threading.Thread | None = None


class DockerBackend:
    """Runs specs as Docker containers; see the module docstring.

    ``client`` is for tests that point at a given engine; by default the
    engine of ``DOCKER_HOST`` (else /var/run/docker.sock) is used.
    """

    name = "docker"
    # How many containers the scheduler should have created and started
    # ahead of their release. The engine finishes containers faster several
    # at a time (on the reference machine: 237 ms each one at a time, 146
    # two at a time, 124 four at a time, no better at eight), and a held
    # container costs only its waiting init; see docs/docker.md.
    lookahead = 4

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        self.run_id = os.urandom(6).hex()
        self._pid = os.getpid()
        self._labels = {"hitz.run": self.run_id, "hitz.pid": str(self._pid),
                        "hitz.start": process_start(self._pid),
                        "hitz.host": socket.gethostname()}
        self._host_root = os.geteuid() == 0
        self._pool = ThreadPoolExecutor(_POOL_WORKERS, thread_name_prefix="hitz-docker")
        # Connecting and reaping happen off the main thread, while the
        # scheduler prepares the first task.
        self._ready: Future[docker.DockerClient] = self._pool.submit(self._start_up, client)
        self._tasks: dict[str, _Task] = {}  # until wait() returned their result
        self._threads: list[threading.Thread] = []  # until they ended
        # (task, its result or the error that ended the run), from its thread
        self._results: queue.SimpleQueue[tuple[str, SandboxResult | BaseException]] = (
            queue.SimpleQueue())
        self._images: dict[str, str] = {}
        self._images_lock = threading.Lock()
        self._init: str | None = None
        self._init_lock = threading.Lock()
        self._etc: str | None = None  # see _etc_files; removed by close()
        self._closed = False

    def _start_up(self, client: docker.DockerClient | None) -> docker.DockerClient:
        client = client or connect()
        reap_orphans(client)
        return client

    # --- SandboxBackend ---------------------------------------------------
    def start(self, spec: SandboxSpec) -> None:
        self.prestart(spec)
        self.release(spec.task)

    def prestart(self, spec: SandboxSpec) -> None:
        """Create and start ``spec``'s container now; its task waits in the
        container's init for ``release``."""
        task = _Task(spec, time.monotonic())
        self._tasks[spec.task] = task
        task.thread = threading.Thread(target=self._lifecycle, args=(task,),
                                       name=f"hitz-docker-{spec.task}", daemon=True)
        task.thread.start()
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(task.thread)

    def release(self, task: str) -> None:
        t = self._tasks[task]
        t.released_at = time.monotonic()
        t.deadline = t.released_at + t.spec.timeout
        t.go.set()

    def cancel(self, task: str) -> None:
        """Drop a prestarted container: its task never runs."""
        t = self._tasks[task]
        t.cancelled = True
        t.go.set()

    def wait(self, timeout: float | None = None) -> list[SandboxResult]:
        end = None if timeout is None else time.monotonic() + timeout
        results: list[SandboxResult] = []
        while self._tasks and not results:
            pause = self._enforce_deadlines()
            if end is not None:
                left = max(0.0, end - time.monotonic())
                pause = left if pause is None else min(pause, left)
            try:
                item = self._results.get(timeout=pause)
            except queue.Empty:
                if end is not None and time.monotonic() >= end:
                    break
                continue
            results += self._take(item)
            while True:  # and whatever else ended meanwhile
                try:
                    results += self._take(self._results.get_nowait())
                except queue.Empty:
                    break
        return results

    def running(self) -> int:
        return len(self._tasks)

    def cancel_all(self) -> None:
        for t in self._tasks.values():
            t.cancelled = True
            if t.released_at is not None and t.container is not None and not t.killed:
                t.killed = True
                self._pool.submit(self._signal, t, "SIGKILL")
            t.go.set()

    def close(self) -> None:
        """Stop whatever still runs and remove every container this backend
        made; nothing it started outlives it."""
        if self._closed:
            return
        self._closed = True
        self.cancel_all()
        with contextlib.suppress(SandboxError):
            while self._tasks:
                self.wait(1.0)
        for thread in self._threads:  # each removes its container last
            thread.join()
        self._threads.clear()
        self._pool.shutdown(wait=True)
        if self._etc is not None:
            import shutil

            shutil.rmtree(self._etc, ignore_errors=True)
        if self._ready.done() and self._ready.exception() is None:
            self._ready.result().close()

    # --- main thread helpers ---------------------------------------------------
    def _take(self, entry: tuple[str, SandboxResult | BaseException]) -> list[SandboxResult]:
        task, item = entry
        # Its thread still removes the container, after queueing the
        # result (off the critical path); close() waits for every thread.
        # Forgotten before an error is raised too: no result will ever come
        # for that task, and close() waits only for tasks that may yet end.
        self._tasks.pop(task, None)
        if isinstance(item, BaseException):
            raise item  # the engine went away: the whole run fails, closed
        return [item]

    def _enforce_deadlines(self) -> float | None:
        """SIGTERM tasks past their deadline, SIGKILL them after the grace
        period (through the pool: the engine may be slow to answer).
        Returns seconds until the next deadline."""
        now = time.monotonic()
        nxt: float | None = None
        for t in self._tasks.values():
            if t.killed or t.cancelled or t.released_at is None:
                continue
            if t.term_sent_at is None and now >= t.deadline:
                t.timed_out = True
                t.term_sent_at = now
                self._pool.submit(self._signal, t, "SIGTERM")
            if t.term_sent_at is not None:
                due = t.term_sent_at + t.spec.kill_grace
                if now >= due:
                    t.killed = True
                    self._pool.submit(self._signal, t, "SIGKILL")
                    continue
            else:
                due = t.deadline
            nxt = due if nxt is None else min(nxt, due)
        return None if nxt is None else max(0.0, nxt - now)

    # --- worker side -------------------------------------------------------------
    def _client(self) -> docker.DockerClient:
        return self._ready.result(timeout=_API_TIMEOUT_S + _REAP_GRACE_S)

    def _signal(self, t: _Task, sig: str) -> None:
        if t.container is None:
            return  # not created yet: its thread sees the flag and never starts it
        # A container that already stopped answers 409: nothing to do.
        with contextlib.suppress(SandboxError), _engine_errors("signal a container"):
            self._client().api.kill(t.container, signal=sig)

    def _lifecycle(self, t: _Task) -> None:
        """Everything of one task, in its own thread; exactly one result (or
        a fatal error) goes to the queue, then the container is removed."""
        try:
            result = self._run(t)
        except DockerUnavailable as exc:
            self._results.put((t.spec.task, exc))
            result = None
        except SandboxError as exc:
            result = self._setup_failed(t, exc)
        except BaseException as exc:  # a bug: surface it on the main thread
            self._results.put((t.spec.task, exc))
            result = None
        if result is not None:
            self._results.put((t.spec.task, result))
        if t.container is not None:
            with contextlib.suppress(SandboxError), _engine_errors("remove a container"):
                self._client().api.remove_container(t.container, force=True, v=True)

    def _setup_failed(self, t: _Task, exc: SandboxError) -> SandboxResult:
        if t.cancelled:
            return self._ended(t, Status.CANCELLED, None, "cancelled")
        message = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return self._ended(t, Status.SETUP_FAILED, None, message)

    def _run(self, t: _Task) -> SandboxResult:
        import docker.errors

        spec = t.spec
        client = self._client()
        api = client.api
        image = self._image(client, spec)
        config = self._container_config(spec, image)
        if t.cancelled:
            return self._ended(t, Status.CANCELLED, None, "cancelled")
        with _engine_errors(f"create the container of task `:{spec.task}`", api.api_version):
            try:
                t.container = str(api.create_container(**config)["Id"])
            except docker.errors.APIError as exc:
                better = _explain_create(spec, exc)
                if better is not None:
                    raise better from exc
                raise
        with _engine_errors(f"attach to the container of task `:{spec.task}`"):
            attached = api.attach_socket(t.container, params={
                "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            sock: socket.socket = attached._sock  # the hijacked connection's socket
        try:
            if not t.cancelled:
                with _engine_errors(f"start the container of task `:{spec.task}`"):
                    api.start(t.container)
            t.go.wait()
            if t.cancelled:
                return self._ended(t, Status.CANCELLED, None, "cancelled")
            # Found and read before the go byte: the cgroup exists from
            # `start` on, and is gone as soon as the task's last process
            # exits, maybe before a task that quick is ever sampled again.
            usage = CgroupUsage(t.container)
            usage.sample()
            if t.timed_out:  # its deadline passed while the engine was still starting it
                self._signal(t, "SIGKILL")
            else:
                sock.sendall(b"G")
            streams = self._stream(t, sock, usage)
        finally:
            sock.close()
            attached.close()
        with _engine_errors(f"wait for the container of task `:{spec.task}`"):
            code = int(api.wait(t.container)["StatusCode"])
            oom = False
            if code != 0 and spec.policy.limits.memory is not None:
                oom = self._oom_killed(api, t, code)
        t.usage = usage.usage()
        return self._result(t, code, oom, streams)

    def _oom_killed(self, api: Any, t: _Task, code: int) -> bool:
        """Did the kernel's OOM killer end the task? The engine learns it
        from a cgroup event that may arrive just after the exit: a SIGKILL
        that hitz did not send (status 137) is asked about a few more times,
        for at most half a second, in this task's own thread."""
        for attempt in range(10):
            if api.inspect_container(t.container)["State"].get("OOMKilled"):
                return True
            if code != 128 + 9 or t.killed or t.timed_out or t.cancelled:
                return False
            time.sleep(0.05 * (attempt + 1) / 5)
        return False

    def _image(self, client: docker.DockerClient, spec: SandboxSpec) -> str:
        ref, rootfs = image_ref(spec)
        with self._images_lock:
            known = self._images.get(ref)
            if known is None:
                known = self._images[ref] = resolve_image(client, ref, rootfs, spec.task)
        return known

    def _init_binary(self) -> str:
        with self._init_lock:
            if self._init is None:
                self._init = init_path()
            return self._init

    def _etc_files(self, spec: SandboxSpec) -> list[tuple[str, str]]:
        """(host file, container path) of the /etc files the namespace
        sandbox writes fresh (users, groups, hosts, host name), so that a
        task reads the same /etc in both backends: one cache key serves
        both. Without network = "host" the resolver is the image's own (or
        none), not the copy of the host's that Docker puts in every
        container. The files are written once per backend, read-only."""
        from hitz.sandbox.namespace.plan import _ETC_FILES

        with self._init_lock:
            if self._etc is None:
                folder = tempfile.mkdtemp(prefix="hitz-docker-etc-")
                os.chmod(folder, 0o755)
                for name, content in {**_ETC_FILES, "resolv.conf": ""}.items():
                    with open(os.path.join(folder, name), "w") as f:
                        f.write(content)
                    os.chmod(os.path.join(folder, name), 0o444)
                self._etc = folder
            folder = self._etc
        files = [(os.path.join(folder, name), f"/etc/{name}") for name in _ETC_FILES]
        if spec.network is not Network.HOST:
            own = (os.path.join(spec.image.root, "etc", "resolv.conf")
                   if spec.image is not None and spec.image.root else None)
            source = own if own and os.path.isfile(own) and not os.path.islink(own) else (
                os.path.join(folder, "resolv.conf"))
            files.append((source, "/etc/resolv.conf"))
        return files

    def _container_config(self, spec: SandboxSpec, image: str) -> dict[str, Any]:
        from docker.types import Mount, Ulimit

        policy = spec.policy
        limits = policy.limits
        mounts = [Mount(INIT_PATH, self._init_binary(), type="bind", read_only=True)]
        uid, gid = ((SANDBOX_HOST_ID, SANDBOX_HOST_ID) if self._host_root
                    else (os.getuid(), os.getgid()))
        for root, staged in staging_folders(spec, uid, gid):
            target = f"{spec.cwd}/{root}" if root else spec.cwd
            mounts.append(Mount(target, staged, type="bind"))
        for source, target in input_binds(spec):
            mounts.append(Mount(target, source, type="bind", read_only=True))
        for source, target in self._etc_files(spec):
            mounts.append(Mount(target, source, type="bind", read_only=True))
        ulimits = [Ulimit(name={0: "cpu", 1: "fsize", 4: "core", 7: "nofile"}[res],
                          soft=value, hard=value) for res, value in limits.rlimits()]
        security = ["no-new-privileges:true", f"seccomp={seccomp_option(policy, spec.task)}"]
        host_config: dict[str, Any] = {
            "mounts": mounts,
            "read_only": True,
            "network_mode": "host" if spec.network is Network.HOST else "none",
            "cap_drop": ["ALL"],
            "cap_add": list(policy.capabilities) or None,
            "security_opt": security,
            # /sys would show the host's devices and kernel: an empty,
            # read-only tmpfs replaces Docker's sysfs mount.
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={limits.tmp},mode=1777",
                      "/sys": "ro,nosuid,nodev,noexec,size=4k"},
            "shm_size": limits.tmp,
            "ulimits": ulimits,
            "init": True,
            "ipc_mode": "private",
            "cgroupns": "private",
            "log_config": {"type": "none"},  # hitz reads the streams itself
            "mem_limit": limits.memory,
            "memswap_limit": limits.memory,  # no swap beyond the memory limit
            "pids_limit": limits.pids,
            "nano_cpus": int(limits.cpu * 1e9) if limits.cpu is not None else None,
        }
        keys = list(spec.env)
        entrypoint = [INIT_PATH, *landlock.arguments(spec), str(len(keys)), *keys, "--",
                      *spec.argv]
        api = self._client().api
        with _engine_errors(f"make the container of task `:{spec.task}`", api.api_version):
            made = api.create_host_config(
                **{k: v for k, v in host_config.items() if v is not None})
        # What /proc shows of the host, hidden as the namespace sandbox hides
        # it (Docker's own list is shorter: it leaves kallsyms, kmsg, the
        # hardware folders). Setting these replaces Docker's defaults, which
        # the list includes.
        made["MaskedPaths"] = masked_paths()
        made["ReadonlyPaths"] = ["/proc/sys"]
        return {
            "image": image,
            "entrypoint": entrypoint,
            "command": [],
            "user": f"{uid}:{gid}",
            "working_dir": spec.cwd,
            "environment": [f"{key}={value}" for key, value in spec.env.items()],
            "hostname": "hitz",
            "labels": {**self._labels, "hitz.task": spec.task},
            "stdin_open": True,
            "use_config_proxy": False,  # never add the host's proxy settings
            "host_config": made,
        }

    def _stream(self, t: _Task, sock: socket.socket, usage: CgroupUsage) -> tuple[int, bytes]:
        """Copy the task's multiplexed stdout/stderr into its log files, up to
        the policy's cap (more kills it), and sample its cgroup meanwhile
        (docker_usage.py says why). Returns (bytes seen, the first bytes of
        stderr: a failed init step is reported there)."""
        spec = t.spec
        cap = spec.policy.limits.output
        files: dict[int, Any] = {}
        written = 0
        seen = 0
        head = b""
        buf = b""
        sampled = time.monotonic()
        if usage.found:
            sock.settimeout(SAMPLE_S)
        try:
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:  # quiet for SAMPLE_S: only the sample is due
                    chunk = None
                # Also at the end of the stream: the task may have just
                # exited, and its cgroup may still be there.
                if usage.found and (not chunk or time.monotonic() - sampled >= SAMPLE_S):
                    usage.sample()
                    sampled = time.monotonic()
                if chunk is None:
                    continue
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 8:
                    kind, size = struct.unpack(">BxxxL", buf[:8])
                    if len(buf) < 8 + size:
                        break
                    payload, buf = buf[8:8 + size], buf[8 + size:]
                    seen += size
                    if kind == 2 and len(head) < 256:
                        head += payload[:256 - len(head)]
                    keep = payload[:max(0, cap - written)]
                    if keep:
                        f = files.get(kind)
                        if f is None:
                            path = spec.stderr_path if kind == 2 else spec.stdout_path
                            f = files[kind] = open(path, "wb")  # noqa: SIM115
                        f.write(keep)
                        written += len(keep)
                    if seen > cap and not t.output_exceeded:
                        t.output_exceeded = True
                        t.killed = True
                        self._pool.submit(self._signal, t, "SIGKILL")
        except OSError as exc:
            raise _unreachable(exc.strerror or str(exc)) from exc
        finally:
            for f in files.values():
                f.close()
        for kind, path in ((1, spec.stdout_path), (2, spec.stderr_path)):
            if kind not in files:  # an empty stream leaves no file
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return seen, head

    # --- results -----------------------------------------------------------------
    def _ended(self, t: _Task, status: Status, code: int | None, message: str | None,
               outputs: tuple[Any, ...] = ()) -> SandboxResult:
        enforced, weakened = enforcement(t.spec)
        start = t.released_at if t.released_at is not None else t.created
        return SandboxResult(task=t.spec.task, status=status, exit_code=code,
                             duration_s=time.monotonic() - start, usage=t.usage,
                             outputs=outputs,
                             message=message, enforced=enforced, weakened=weakened)

    def _result(self, t: _Task, code: int, oom: bool,
                streams: tuple[int, bytes]) -> SandboxResult:
        spec = t.spec
        limits = spec.policy.limits
        _, head = streams
        if t.cancelled:
            return self._ended(t, Status.CANCELLED, code, "cancelled")
        if t.timed_out:
            return self._ended(t, Status.TIMED_OUT, code, f"timed out after {spec.timeout:g}s")
        if oom:
            return self._ended(t, Status.LIMIT_EXCEEDED, code,
                               f"killed: out of memory (limits.memory = {limits.memory} bytes)")
        if t.output_exceeded:
            return self._ended(t, Status.LIMIT_EXCEEDED, code,
                               f"printed more than {limits.output >> 20} MiB to stdout and "
                               "stderr (limits.output)")
        if code == _INIT_FAILED and head.startswith(_INIT_MARK):
            return self._init_failed(t, head)
        if code != 0:
            return self._ended(t, Status.FAILED, code, f"exited with status {code}")
        try:
            outputs = collect(spec, chown=self._host_root)
        except OutputRejected as exc:
            return self._ended(t, Status.OUTPUT_MISSING, 0, str(exc))
        return self._ended(t, Status.SUCCEEDED, 0, None, outputs)

    def _init_failed(self, t: _Task, head: bytes) -> SandboxResult:
        line = head[len(_INIT_MARK):].split(b"\n", 1)[0].decode(errors="replace")
        step, err_text, text = [*line.split(" ", 2), "", ""][:3]
        err = int(err_text) if err_text.lstrip("-").isdigit() else 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(t.spec.stderr_path)  # hitz's report, not the task's output
        if step == "exec":
            return self._ended(t, Status.FAILED, 127,
                               f"cannot run `{t.spec.argv[0]}`: {os.strerror(err)}")
        if step == "landlock" and text == "Landlock is not available":
            message = (f"task `:{t.spec.task}` needs Landlock; this kernel has none "
                       '(set landlock = "best-effort" to run it without)')
        else:
            detail = f"{os.strerror(err)}: {text}" if err else text
            message = f"can't set up the container of task `:{t.spec.task}`: {step}: {detail}"
        return self._ended(t, Status.SETUP_FAILED, None, message)


def enforcement(spec: SandboxSpec) -> tuple[dict[str, str], tuple[str, ...]]:
    """What a docker task ran under, and what of the default it went without
    (report.py; the seccomp digest is of the JSON profile the engine got)."""
    from hitz.sandbox.docker_seccomp import render_default, render_strict

    rendered = {Seccomp.DEFAULT: render_default, Seccomp.STRICT: render_strict}.get(
        spec.policy.seccomp)
    program = rendered().encode() if rendered is not None else None
    return report.enforcement("docker", spec.policy, spec.network, program)


def check_policy(task: str, policy: Policy) -> None:
    """Refuse, before anything runs, a docker task whose policy this host
    cannot enforce (fail closed; the hint names the manifest key). Raises
    SandboxUnavailable."""
    landlock.check(task, policy)


def _explain_create(spec: SandboxSpec, exc: BaseException) -> SandboxError | None:
    """A refused container creation in the manifest's words, where it can
    be: a declared input that vanished since the run was planned."""
    text = str(getattr(exc, "explanation", "") or exc)
    if "bind source path does not exist" not in text:
        return None
    path = text.rsplit(":", 1)[1].strip()
    for mount in spec.inputs:
        if mount.source == path:
            return SandboxError(
                f'can\'t expose input "{mount.target}" to task `:{spec.task}`: '
                f"{os.strerror(errno.ENOENT)} (it was there when the run was planned "
                "and has gone since)", reason=SandboxErrorReason.INPUT_MISSING)
    return None
