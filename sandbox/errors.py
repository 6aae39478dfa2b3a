"""The root of hitz's error tree, and the sandbox's branch of it.

The base class lives here, not in ``hitz.executor``, because ``hitz.sandbox``
must never import ``hitz.executor``; ``hitz.executor.errors`` re-exports it and
adds the executor's branches. The full tree is drawn there.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    """Base for the machine-readable reason enums that tests assert on."""


class SandboxErrorReason(Reason):
    UNAVAILABLE = "unavailable"  # the host cannot provide the isolation asked for
    INPUT_MISSING = "input-missing"  # a declared input does not exist at launch time
    SETUP_FAILED = "setup-failed"  # a namespace, mount or exec step failed
    HELPER_DIED = "helper-died"  # the launcher process went away


class HitzError(Exception):
    """An error hitz explains to the user: a message, optional detail and hint.

    ``message`` is one sentence without a trailing period. ``detail`` is extra
    text printed under it (a source excerpt, a log tail). ``hint`` tells the
    user what to do. ``reason`` is a member of a ``Reason`` enum for tests and
    ``--json``; ``retryable`` says whether trying again may succeed.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        reason: Reason | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        self.reason = reason
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class SandboxError(HitzError):
    """A sandbox could not be set up or run (not: the task inside it failed)."""


class SandboxUnavailable(SandboxError):
    """The host cannot enforce what the task's policy asks for."""

    def __init__(self, message: str, *, hint: str | None = None, detail: str | None = None):
        super().__init__(
            message, hint=hint, detail=detail, reason=SandboxErrorReason.UNAVAILABLE
        )
