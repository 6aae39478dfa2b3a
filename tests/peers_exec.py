"""BuildGrid with execution capacity: the server, and ``hitz worker`` as its bot.

tests/peers.py's ``buildgrid_full`` accepts Execute requests that carry only
the platform keys OSFamily and ISA. hitz's Actions also carry ``hitz.rootfs``,
``hitz.sandbox``, ``hitz.network`` and ``hitz.policy`` (they are part of the
cache key), so the server here is tests/peers/bgd-full.yml with them listed
as *wildcard* keys: allowed in a request, not matched against a bot. OSFamily
and ISA are matched: the worker advertises this host's.

``buildgrid_exec`` is that server (PostgreSQL and the disk CAS from
tests/peers.py's helpers), ``hitz_worker`` a ``hitz worker`` process serving
its leases; both live for the session and are stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
    _stop,
    start_buildgrid_full,
)

# The keys of hitz.executor.actions.platform_properties besides OSFamily and ISA.
HITZ_KEYS = ("hitz.network", "hitz.policy", "hitz.rootfs", "hitz.sandbox")

@contextlib.contextmanager
def start_buildgrid_exec(folder: Path) -> Iterator[Peer]:
    """BuildGrid with Execution, Operations and Bots that accepts hitz's platform
    keys, on a free port; no bot yet (see ``start_worker``)."""
    with start_buildgrid_full(folder, wildcard_keys=HITZ_KEYS,
                              label="execution, hitz keys") as peer:
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
