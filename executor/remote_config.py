"""Where the remote cache is and how to reach it: settings, URL, token.

Kept apart from ``hitz.executor.remote`` so that loading a manifest (which
checks ``[cache] remote``) does not import gRPC.

Precedence of the remote's address, first wins: ``hitz run --no-remote`` (no
remote), ``--remote URL``, ``$HITZ_REMOTE_CACHE``, ``[cache] remote``. The
other settings (``instance``, ``upload``, ``token_env``/``token_file``,
``ca_file``, ``timeout``) come from ``[cache]`` whichever way the address was given.
``load_token`` also reads `[remote]`'s token, the remote executor's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_REMOTE",
    "ENV_TIMEOUT",
    "RemoteCacheSettings",
    "RemoteURL",
    "load_token",
    "parse_url",
    "resolve",
]

ENV_REMOTE = "HITZ_REMOTE_CACHE"  # the remote's address, over [cache] remote
ENV_TIMEOUT = "HITZ_REMOTE_TIMEOUT"  # seconds: the deadline of each call
DEFAULT_TIMEOUT_S = 10.0  # per call (a stream gets more with its size); then retried


@dataclass(frozen=True, slots=True)
class RemoteCacheSettings:
    """The `[cache]` keys about the remote, as written (paths relative to the project)."""

    url: str | None = None  # None: no remote
    instance: str = ""
    upload: bool = True  # False: read-only consumer (e.g. untrusted CI jobs)
    token_env: str | None = None  # the variable holding the bearer token
    token_file: str | None = None  # the file holding it
    ca_file: str | None = None  # PEM roots for grpcs://, instead of the system's
    timeout_s: float | None = None  # [cache] timeout: each call's deadline; None: the default

    def as_row(self) -> list[object]:
        return [self.url, self.instance, self.upload, self.token_env, self.token_file,
                self.ca_file, self.timeout_s]

    @classmethod
    def from_row(cls, row: list[object]) -> RemoteCacheSettings:
        url, instance, upload, token_env, token_file, ca_file, timeout = row
        return cls(_opt(url), str(instance), bool(upload), _opt(token_env), _opt(token_file),
                   _opt(ca_file), None if timeout is None else float(str(timeout)))


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class RemoteURL:
    """``grpc://host:port`` (plain) or ``grpcs://host:port`` (TLS)."""

    url: str
    target: str  # host:port, as gRPC wants it
    tls: bool


_URL = re.compile(r"(grpcs?)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})/?")


def parse_url(url: str) -> RemoteURL:
    """Parse a remote cache address; raise ``ValueError`` saying the expected form."""
    match = _URL.fullmatch(url.strip())
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise ValueError(f"{url!r} is not a remote cache address such as "
                         '"grpc://127.0.0.1:8980" or "grpcs://cache.example.com:443"')
    scheme, host, port = match.groups()
    return RemoteURL(url.strip().rstrip("/"), f"{host}:{int(port)}", scheme == "grpcs")


def resolve(settings: RemoteCacheSettings, *, flag: str | None, no_remote: bool,
            environ: Mapping[str, str] | None = None) -> RemoteCacheSettings:
    """``settings`` with the address the command line or environment chose
    (see the module docstring); ``url`` None means no remote this run."""
    environ = os.environ if environ is None else environ
    url = None if no_remote else flag or environ.get(ENV_REMOTE) or settings.url
    return replace(settings, url=url or None)


def timeout_s(configured: float | None = None,
              environ: Mapping[str, str] | None = None) -> float:
    """The per-call deadline: ``$HITZ_REMOTE_TIMEOUT`` seconds (a machine's
    own setting, over the shared manifest's), else ``[cache] timeout``
    (``configured``), else the default. A variable that is not a positive
    number is ignored."""
    environ = os.environ if environ is None else environ
    fallback = configured if configured is not None and configured > 0 else DEFAULT_TIMEOUT_S
    try:
        value = float(environ.get(ENV_TIMEOUT, ""))
    except ValueError:
        return fallback
    return value if 0 < value < float("inf") else fallback


def load_token(*, env: str | None = None, file: str | os.PathLike[str] | None = None,
               environ: Mapping[str, str] | None = None, table: str = "cache",
               what: str = "remote cache") -> str | None:
    """The bearer token from the environment variable ``env`` or the file ``file``;
    messages call it ``what``'s token, set in the manifest table ``table``.

    Never from hitz.toml itself: a manifest is committed and shared, a token
    is a secret. Raises ``RemoteError`` if the variable is unset or empty, or
    the file can't be read or is empty (failing closed: no remote, rather than
    one that answers PERMISSION_DENIED later, less clearly).
    """
    from hitz.executor.remote_errors import RemoteError, RemoteErrorReason

    environ = os.environ if environ is None else environ
    if env:
        token = environ.get(env, "").strip()
        if not token:
            raise RemoteError(
                f"the {what} token variable `{env}` is not set",
                hint=f"export {env}=..., or drop `token_env` from `[{table}]`",
                reason=RemoteErrorReason.UNAUTHENTICATED)
        _check_token(token, f"{what} token variable `{env}`")
        return token
    if file:
        try:
            token = Path(file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise RemoteError(
                f"can't read the {what} token file `{os.fspath(file)}`: "
                f"{getattr(exc, 'strerror', None) or exc}",
                reason=RemoteErrorReason.UNAUTHENTICATED) from None
        if not token:
            raise RemoteError(f"the {what} token file `{os.fspath(file)}` is empty",
                              reason=RemoteErrorReason.UNAUTHENTICATED)
        _check_token(token, f"{what} token file `{os.fspath(file)}`")
        return token
    return None


def _check_token(token: str, where: str) -> None:
    """Refuse a token gRPC would refuse on every call ("Invalid metadata", and a
    log line of its own), saying where it came from (never the token)."""
    from hitz.executor.remote_errors import RemoteError, RemoteErrorReason

    if not all("\x20" <= c <= "\x7e" for c in token):
        raise RemoteError(
            f"the {where} holds characters an `authorization` header "
            "can't carry (only printable ASCII)",
            reason=RemoteErrorReason.UNAUTHENTICATED)
