"""The remote cache's errors, and the one border where ``grpc.RpcError`` becomes them.

::

    HitzError
    └── CacheError
        └── RemoteError            a remote cache could not do what was asked
            │                      (refused, misconfigured, speaks no common protocol)
            ├── RemoteUnavailable  unreachable, too slow, overloaded: retryable; the
            │                      run goes on with the local cache
            └── RemoteBlobMissing  the remote does not hold a blob (also a BlobMissing)
                └── RemoteBlobCorrupt  the remote sent bytes that do not match the
                                   digest (also a BlobCorrupt); nothing was written

The classes belong in ``hitz.executor.errors`` beside the rest of the tree;
they live here until they move (like ``store_errors``). ``rpc_errors`` is the
only place in hitz's client that catches ``grpc.RpcError``: it picks the most
specific class for the status code and names the remote in the user's words
(``remote cache grpc://127.0.0.1:5000 is unreachable: ...``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from hitz.executor.errors import BlobCorrupt, BlobMissing, CacheError, Reason

__all__ = [
    "RETRYABLE_CODES",
    "RemoteBlobCorrupt",
    "RemoteBlobMissing",
    "RemoteError",
    "RemoteErrorReason",
    "RemoteUnavailable",
    "rpc_errors",
    "status_error",
    "translate",
]


class RemoteErrorReason(Reason):
    UNREACHABLE = "unreachable"  # UNAVAILABLE: no connection, server gone, circuit open
    TIMEOUT = "timeout"  # DEADLINE_EXCEEDED: the call did not end within its deadline
    OVERLOADED = "overloaded"  # RESOURCE_EXHAUSTED or ABORTED
    UNAUTHENTICATED = "unauthenticated"  # UNAUTHENTICATED, PERMISSION_DENIED
    REFUSED = "refused"  # INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE...
    UNSUPPORTED = "unsupported"  # UNIMPLEMENTED, or capabilities hitz can't work with
    BAD_URL = "bad-url"  # not grpc://host:port or grpcs://host:port
    MISSING = "missing"  # NOT_FOUND for a blob
    CORRUPT = "corrupt"  # a downloaded blob failed verification
    SERVER_ERROR = "server-error"  # INTERNAL, UNKNOWN, DATA_LOSS...
    CANCELLED = "cancelled"  # CANCELLED: hitz itself cancelled the call (an interrupted run)


class RemoteError(CacheError):
    """A remote cache could not do what was asked."""


class RemoteUnavailable(RemoteError):
    """The remote cache can't be reached or doesn't answer in time (retryable)."""


class RemoteBlobMissing(RemoteError, BlobMissing):
    """The remote cache does not hold a blob it was asked for."""


class RemoteBlobCorrupt(RemoteBlobMissing, BlobCorrupt):
    """The remote cache sent bytes that do not match the blob's digest; none were kept."""


# Codes a call is retried on, with backoff (REAPI's own advice for these).
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
})

_UNAVAILABLE: dict[grpc.StatusCode, tuple[str, RemoteErrorReason]] = {
    grpc.StatusCode.UNAVAILABLE: ("is unreachable", RemoteErrorReason.UNREACHABLE),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("is overloaded", RemoteErrorReason.OVERLOADED),
    grpc.StatusCode.ABORTED: ("aborted the call", RemoteErrorReason.OVERLOADED),
}
_AUTH_HINT = ("give the remote cache a token with `token_env` or `token_file` in `[cache]`; "
              "the token itself never goes in hitz.toml")


@contextlib.contextmanager
def rpc_errors(url: str, what: str) -> Iterator[None]:
    """``with rpc_errors(url, "GetActionResult"):`` turns a ``grpc.RpcError`` into a
    ``RemoteError`` naming the remote ``url``; ``what`` (the call) goes in the detail."""
    try:
        yield
    except grpc.RpcError as exc:
        raise translate(url, what, exc) from exc


def translate(url: str, what: str, exc: grpc.RpcError) -> RemoteError:
    """The ``RemoteError`` for the failed call ``what`` to the remote at ``url``."""
    if isinstance(exc, grpc.Call):
        return status_error(url, what, exc.code(), exc.details() or "")
    return status_error(url, what, grpc.StatusCode.UNKNOWN, str(exc))


def status_error(url: str, what: str, code: grpc.StatusCode | None, text: str) -> RemoteError:
    """The ``RemoteError`` for status ``code`` with message ``text``, answered by the
    remote at ``url`` to the call ``what`` (a whole call, or one blob of a batch)."""
    code = code or grpc.StatusCode.UNKNOWN
    text = text.strip() or code.name
    detail = f"{what}: {code.name}: {text}"
    where = f"remote cache {url}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # gRPC's own text says no more than this
        return RemoteUnavailable(
            f"{where} did not answer in time", detail=detail,
            hint='a slow remote can be given more time: `timeout = "30s"` in `[cache]`, or '
                 "$HITZ_REMOTE_TIMEOUT=30 (seconds)",
            reason=RemoteErrorReason.TIMEOUT, retryable=True)
    if code in _UNAVAILABLE:
        words, reason = _UNAVAILABLE[code]
        return RemoteUnavailable(f"{where} {words}: {text}", detail=detail, reason=reason,
                                 retryable=True)
    if code == grpc.StatusCode.CANCELLED:
        return RemoteError(f"{where}: {what} cancelled", detail=detail,
                           reason=RemoteErrorReason.CANCELLED)
    if code == grpc.StatusCode.NOT_FOUND:
        return RemoteBlobMissing(f"{where} does not have it: {text}", detail=detail,
                                 reason=RemoteErrorReason.MISSING)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return RemoteError(f"{where} refused hitz's credentials: {text}", detail=detail,
                           hint=_AUTH_HINT, reason=RemoteErrorReason.UNAUTHENTICATED)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RemoteError(f"{where} does not implement {what}: {text}", detail=detail,
                           reason=RemoteErrorReason.UNSUPPORTED)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS):
        return RemoteError(f"{where} refused {what}: {text}", detail=detail,
                           reason=RemoteErrorReason.REFUSED)
    return RemoteError(f"{where} failed {what}: {text}", detail=detail,
                       reason=RemoteErrorReason.SERVER_ERROR)
