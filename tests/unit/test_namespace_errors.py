"""How the namespace backend words what its launcher reports (no kernel).

The launcher reports a failed step as `E <step> <errno> <op index> <text>`;
these tests feed such lines to the translation the backend uses."""

from __future__ import annotations

import errno

import pytest

from hitz.sandbox.errors import SandboxErrorReason, SandboxUnavailable
from hitz.sandbox.namespace import _refuse_if_unavailable


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (f"launcher {errno.EPERM} -1 unshare user namespace: Operation not permitted",
         "not permitted"),
        (f"launcher {errno.ENOSPC} -1 unshare user namespace: No space left on device",
         "the namespace limit is 0 or reached"),
        (f"init {errno.EINVAL} -1 unshare: Invalid argument", "not supported by this kernel"),
    ],
)
def test_a_refused_unshare_stops_the_whole_run(line: str, why: str) -> None:
    with pytest.raises(SandboxUnavailable) as caught:
        _refuse_if_unavailable(line)
    what = line.split(" ", 3)[3].split(":")[0]
    assert caught.value.message == (
        f"this host cannot create the namespaces a sandbox needs: {what} failed ({why})"
    )
    assert caught.value.reason is SandboxErrorReason.UNAVAILABLE
    assert caught.value.hint


@pytest.mark.parametrize(
    "line",
    [
        f"mount {errno.ENOENT} 42 bind: No such file or directory",  # one task's input
        f"exec {errno.ENOENT} -1 cc: No such file or directory",  # one task's command
        f"init {errno.EPERM} -1 sethostname: Operation not permitted",  # not an unshare
    ],
)
def test_other_failures_concern_one_task_only(line: str) -> None:
    # No exception: that task fails with its own message, the run goes on.
    assert _refuse_if_unavailable(line) is None
