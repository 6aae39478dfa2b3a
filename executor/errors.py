"""hitz's errors: one small tree with machine-readable reasons.

::

    HitzError                      (hitz.sandbox.errors; exit status 1)
    ├── UsageError                 bad flags or arguments (exit status 2)
    ├── ManifestError              hitz.toml is wrong: file, line, key (exit status 2)
    ├── PlanError                  the task graph is wrong: cycle, unknown target (exit status 2)
    ├── SandboxError               (hitz.sandbox.errors) a sandbox could not be set up
    │   └── SandboxUnavailable     the host cannot enforce the policy (fail closed)
    ├── CacheError                 a cache could not give or keep what was asked
    │   ├── CacheUnavailable       the cache folder can't be used: unwritable, full,
    │   │                          not a folder, I/O error (the run goes on uncached)
    │   └── BlobMissing            a blob is not in the store
    │       └── BlobCorrupt        it was there but failed verification; removed
    ├── OutputError                a task's declared outputs could not be kept
    ├── ImageError                 (images_def) an image can't be built, found or pinned
    │                              (exit status 2; reasons in ImageErrorReason)
    └── Interrupted                Ctrl-C or SIGTERM (exit status 130)

Each error carries a message for people, an optional ``detail`` and ``hint``,
a ``reason`` enum member that tests assert on, and a ``retryable`` flag. Only
``hitz.executor.cli.main`` turns a ``HitzError`` into stderr text and an exit
status; anything else that escapes is a bug and is reported as one.
"""

from __future__ import annotations

from hitz.sandbox.errors import (
    HitzError,
    Reason,
    SandboxError,
    SandboxErrorReason,
    SandboxUnavailable,
)

__all__ = [
    "BlobCorrupt",
    "BlobMissing",
    "CacheError",
    "CacheErrorReason",
    "CacheUnavailable",
    "HitzError",
    "Interrupted",
    "ManifestError",
    "ManifestErrorReason",
    "OutputError",
    "PlanError",
    "PlanErrorReason",
    "Reason",
    "SandboxError",
    "SandboxErrorReason",
    "SandboxUnavailable",
    "UsageError",
]


class ManifestErrorReason(Reason):
    TOML_SYNTAX = "toml-syntax"
    UNKNOWN_KEY = "unknown-key"
    WRONG_TYPE = "wrong-type"
    BAD_DURATION = "bad-duration"
    MISSING_KEY = "missing-key"
    UNKNOWN_TASK = "unknown-task"
    BAD_TASK_NAME = "bad-task-name"
    DUPLICATE_OUTPUT = "duplicate-output"
    PATH_ESCAPES = "path-escapes"
    NO_MATCH = "no-match"
    BAD_VALUE = "bad-value"
    NOT_FOUND = "not-found"


class PlanErrorReason(Reason):
    CYCLE = "cycle"
    UNKNOWN_TARGET = "unknown-target"


class UsageError(HitzError):
    """The command line is wrong."""

    exit_code = 2


class ManifestError(HitzError):
    """The manifest is wrong. ``path`` and ``line`` say where (line is 1-based)."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
        detail: str | None = None,
        hint: str | None = None,
        reason: ManifestErrorReason | None = None,
    ) -> None:
        located = f"{path}:{line}: {message}" if path and line else (
            f"{path}: {message}" if path else message
        )
        super().__init__(located, detail=detail, hint=hint, reason=reason)
        self.path = path
        self.line = line
        self.column = column


class PlanError(HitzError):
    """The task graph cannot be run as asked (a cycle, an unknown target)."""

    exit_code = 2


class OutputError(HitzError):
    """A task's outputs could not be moved into the project."""


class Interrupted(HitzError):
    """The run was stopped by Ctrl-C or SIGTERM."""

    exit_code = 130


class CacheErrorReason(Reason):
    UNWRITABLE = "unwritable"  # EACCES, EPERM, EROFS on the cache folder
    NOT_A_FOLDER = "not-a-folder"  # the cache folder's path is a file
    DISK_FULL = "disk-full"  # ENOSPC, EDQUOT
    IO_ERROR = "io-error"  # any other OSError on the cache folder
    MISSING = "missing"  # the blob is not in the store
    CORRUPT = "corrupt"  # the blob failed verification and was removed


class CacheError(HitzError):
    """A cache could not give or keep what was asked."""


class CacheUnavailable(CacheError):
    """The cache cannot be used at all; the caller may run uncached."""


class BlobMissing(CacheError):
    """A blob the caller expected is not in the store."""


class BlobCorrupt(BlobMissing):
    """A blob failed verification against its digest; it was removed."""
