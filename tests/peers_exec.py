"""BuildGrid with execution capacity: the server, and ``hitz worker`` as its bot.

tests/peers.py's ``buildgrid_full`` accepts Execute requests that carry only
the platform keys OSFamily and ISA. hitz's Actions also carry ``hitz.rootfs``,
``hitz.sandbox``, ``hitz.network`` and ``hitz.policy`` (they are part of the
cache key), so the server here lists them as *wildcard* keys: allowed in a
request, not matched against a bot. OSFamily and ISA are matched: the worker
advertises this host's.

``buildgrid_exec`` is that server (PostgreSQL and the disk CAS from
tests/peers.py's helpers), ``hitz_worker`` a ``hitz worker`` process serving
its leases; both live for the session and are stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import (
    Peer,
    PeerError,
    _as_fixture,
    _die_with_parent,
    _serving,
    _stop,
    _tool,
    installed,
    start_postgres,
)

# The keys of hitz.executor.actions.platform_properties besides OSFamily and ISA.
HITZ_KEYS = ("hitz.network", "hitz.policy", "hitz.rootfs", "hitz.sandbox")

CONFIG = string.Template("""\
# BuildGrid for hitz's remote-execution tests: tests/peers_exec.py.
description: hitz tests, BuildGrid with execution and hitz's platform keys
server:
  - !channel
    address: "127.0.0.1:${port}"
    insecure-mode: true  # plain gRPC; loopback only
authorization:
  method: none
connections:
  - !sql-connection &sql
    connection-string: postgresql://bgd:bgd@127.0.0.1:${pg_port}/bgd
    pool-size: 5
    max-overflow: 10
storages:
  - !disk-storage &cas
    path: ${cas_dir}
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
schedulers:
  - !sql-scheduler &sched
    sql: *sql
    storage: *cas
    action-cache: *ac
    property-set: !dynamic-property-set
      match-property-keys: []
      # hitz's own keys: part of the Action (and its cache key), matched by no bot.
      wildcard-property-keys: [${wildcard}]
    bot-session-keepalive-timeout: 60
    max-execution-timeout: 600
    poll-interval: 0.1
    bot-poll-interval: 0.1
    assigners:
      - !priority-age-assigner
        count: 1
        interval: 0.1
instances:
  - name: ""
    services:
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
      - !action-cache
        cache: *ac
      - !execution
        scheduler: *sched
        operation-stream-keepalive-timeout: 5
thread-pool-size: 20
""")


@contextlib.contextmanager
def start_buildgrid_exec(folder: Path) -> Iterator[Peer]:
    """BuildGrid with Execution, Operations and Bots that accepts hitz's platform
    keys, on a free port; no bot yet (see ``start_worker``)."""
    bgd = _tool("bgd/bin/bgd")
    folder.mkdir(parents=True, exist_ok=True)
    cas = folder / "bgd-cas"
    cas.mkdir(exist_ok=True)
    with start_postgres(folder) as pg_port:

        def argv(port: int) -> list[str]:
            config = folder / f"bgd-exec-{port}.yml"
            config.write_text(CONFIG.substitute(
                port=port, pg_port=pg_port, cas_dir=str(cas.resolve()),
                wildcard=", ".join(f'"{key}"' for key in HITZ_KEYS)))
            return [str(bgd), "server", "start", str(config)]

        name = f"BuildGrid {installed().get('BUILDGRID_VERSION', '?')} (execution, hitz keys)"
        with _serving(name, argv, folder / "bgd-exec.log") as peer:
            yield peer


@contextlib.contextmanager
def start_worker(server: Peer, folder: Path, *, jobs: int = 2) -> Iterator[subprocess.Popen[bytes]]:
    """``hitz worker --server`` for ``server``, logging to ``folder/worker.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    work = folder / "leases"
    log = folder / "worker.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hitz.executor", "worker", "--server", server.url,
             "-j", str(jobs), "--work-dir", str(work)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"}, preexec_fn=_die_with_parent)
    try:
        if proc.poll() is not None:
            raise PeerError(f"hitz worker exited at once:\n{log.read_text(errors='replace')}")
        yield proc
    finally:
        _stop(proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def buildgrid_exec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """BuildGrid with execution, accepting hitz's platform keys, for the session."""
    with _as_fixture(start_buildgrid_exec(tmp_path_factory.mktemp("buildgrid-exec"))) as peer:
        yield peer


@pytest.fixture(scope="session")
def hitz_worker(buildgrid_exec: Peer, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[subprocess.Popen[bytes]]:
    """A ``hitz worker`` taking ``buildgrid_exec``'s leases, for the session."""
    try:
        started = start_worker(buildgrid_exec, tmp_path_factory.mktemp("hitz-worker"))
        proc = started.__enter__()
    except PeerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield proc
    finally:
        started.__exit__(None, None, None)
