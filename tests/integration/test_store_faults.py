"""The local store on a cache folder that really fails: read-only, full, immutable.

Tests run as root, for whom ``chmod 0500`` stops nothing. So each scenario
runs a small script in a private mount namespace (``unshare --mount``) that
mounts a tmpfs over a folder of the test and makes it fail the way asked:
remounted read-only (EROFS), or too small for what is stored (ENOSPC). The
host's mount table never changes. Where the kernel refuses the namespace the
tests skip and say why. An ``chattr +i`` folder (EPERM even for root) is
tried directly on the test's own filesystem when it supports the flag.

Each script prints one JSON line per step: the error class, reason and
message it got, or what it read back; the test asserts on those.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hitz.executor.store import CacheErrorReason, CacheUnavailable, Store

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
GUARD_S = 120  # a scenario takes well under a second; this only stops a hang

_PRELUDE = """
import json, os, subprocess, sys
from pathlib import Path
from hitz.executor.errors import HitzError
from hitz.executor.store import Digest, Store

mnt = Path(sys.argv[1])

def mount(*options):
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mnt)],
                   check=True)

def read_only():
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

def step(name, fn):
    try:
        value = fn()
    except HitzError as exc:
        line = {"step": name, "error": type(exc).__name__,
                "reason": exc.reason.value if exc.reason else None, "message": str(exc)}
    else:
        plain = isinstance(value, (str, int, bool))
        line = {"step": name, "value": value if plain else repr(value)}
    line["temps"] = sorted(os.listdir(mnt / "cache" / "store-v1" / "tmp")) if (
        mnt / "cache" / "store-v1" / "tmp").is_dir() else []
    print(json.dumps(line), flush=True)
"""


def _unshare_prefix() -> list[str] | None:
    """The `unshare` command that gives this process a private mount namespace."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (
        ["unshare", "--mount", "--propagation", "private"],
        ["unshare", "--mount", "--map-root-user", "--propagation", "private"],
    ):
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def unshare() -> list[str]:
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("can't mount a tmpfs in a private mount namespace here "
                    "(`unshare --mount` refused, or util-linux is missing)")
    return prefix


def run_scenario(unshare: list[str], mnt: Path, body: str) -> list[dict[str, Any]]:
    mnt.mkdir(exist_ok=True)
    script = _PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [*unshare, sys.executable, "-c", script, str(mnt)],
        cwd=REPO, capture_output=True, text=True, timeout=GUARD_S, check=False,
    )
    assert proc.returncode == 0, f"scenario failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def by_step(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["step"]: line for line in lines}


def test_a_read_only_cache_folder_is_unavailable_with_a_clear_message(
    unshare: list[str], tmp_path: Path
) -> None:
    steps = by_step(run_scenario(unshare, tmp_path / "mnt", """
        mount("size=4m")
        read_only()
        step("open", lambda: Store(mnt / "cache"))
    """))
    assert steps["open"] == {
        "step": "open",
        "error": "CacheUnavailable",
        "reason": "unwritable",
        "message": f"cache folder `{tmp_path / 'mnt' / 'cache'}` is not writable: "
                   "Read-only file system",
        "temps": [],
    }


def test_a_store_that_becomes_read_only_refuses_writes_and_still_serves_verified_hits(
    unshare: list[str], tmp_path: Path
) -> None:
    steps = by_step(run_scenario(unshare, tmp_path / "mnt", """
        mount("size=4m")
        store = Store(mnt / "cache")
        blob = store.put_bytes(b"an output" * 1000)
        store.put_action_result(Digest.of(b"action"), blob.hash.encode())
        read_only()
        step("put", lambda: store.put_bytes(b"another output"))
        step("put action result", lambda: store.put_action_result(Digest.of(b"x"), b""))
        step("hit", lambda: store.get_action_result(Digest.of(b"action")) == blob.hash.encode())
        step("read", lambda: store.read_bytes(blob) == b"an output" * 1000)
        step("reopen", lambda: Store(mnt / "cache"))
        step("close", lambda: store.close())  # can't save its counters; must not raise
    """))
    for name in ("put", "put action result", "reopen"):
        assert (steps[name]["error"], steps[name]["reason"]) == ("CacheUnavailable", "unwritable")
        assert steps[name]["message"].endswith("is not writable: Read-only file system")
    assert steps["hit"]["value"] is True
    assert steps["read"]["value"] is True
    assert "error" not in steps["close"]


def test_a_full_cache_folder_fails_the_write_cleanly_and_the_store_stays_usable(
    unshare: list[str], tmp_path: Path
) -> None:
    steps = by_step(run_scenario(unshare, tmp_path / "mnt", """
        import hitz.executor.store as store_module
        mount("size=256k")
        store = Store(mnt / "cache")
        big = os.urandom(512 * 1024)  # incompressible: stored raw, twice the room
        step("put_bytes", lambda: store.put_bytes(big))
        source = mnt.parent / "big"  # on the test's own filesystem, not the full one
        source.write_bytes(big * 4)
        store_module.SMALL_FILE = 0  # the streaming path
        step("put_file", lambda: store.put_file(source))
        step("entries", lambda: sum(len(files) for _, _, files in
                                    os.walk(mnt / "cache" / "store-v1" / "cas")))
        small = store.put_bytes(b"a small output")
        step("small", lambda: store.read_bytes(small) == b"a small output")
        step("close", lambda: store.close())
    """))
    for name in ("put_bytes", "put_file"):
        assert (steps[name]["error"], steps[name]["reason"]) == ("CacheUnavailable", "disk-full")
        assert steps[name]["message"] == (
            f"cache folder `{tmp_path / 'mnt' / 'cache'}` is full: No space left on device")
        assert steps[name]["temps"] == []  # the partial temp file was removed
    assert steps["entries"]["value"] == 0
    assert steps["small"]["value"] is True
    assert "error" not in steps["close"]


@pytest.fixture
def immutable_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "immutable"
    folder.mkdir()
    if shutil.which("chattr") is None or subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True, check=False
    ).returncode != 0:
        pytest.skip("this filesystem has no immutable flag (`chattr +i` failed)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_immutable_cache_folder_is_unwritable_even_for_root(immutable_folder: Path) -> None:
    with pytest.raises(CacheUnavailable) as info:
        Store(immutable_folder)
    assert info.value.reason is CacheErrorReason.UNWRITABLE
    assert str(info.value) == (
        f"cache folder `{immutable_folder}` is not writable: Operation not permitted")
    assert info.value.hint is not None


def test_a_store_made_immutable_after_opening_refuses_writes(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    with Store(folder) as store:
        blob = store.put_bytes(b"an output")
        tmp = folder / "store-v1" / "tmp"
        if subprocess.run(["chattr", "+i", str(tmp)], capture_output=True,
                          check=False).returncode != 0:
            pytest.skip("this filesystem has no immutable flag (`chattr +i` failed)")
        try:
            with pytest.raises(CacheUnavailable) as info:
                store.put_bytes(b"another output")
            assert info.value.reason is CacheErrorReason.UNWRITABLE
            assert store.read_bytes(blob) == b"an output"
        finally:
            subprocess.run(["chattr", "-i", str(tmp)], check=True)
    assert os.listdir(tmp) == []
