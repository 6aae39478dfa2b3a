"""Retries with backoff, and the circuit breaker, of the remote cache client.

A call that fails with a retryable status (``RemoteUnavailable``: UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) is tried again after an
exponential backoff with full jitter (``delay = uniform(0, min(cap, base * 2**n))``,
the "full jitter" of the AWS architecture blog's *Exponential Backoff and
Jitter*), so that many clients hit by one outage do not come back in step.

A call that ran out of time (DEADLINE_EXCEEDED) is tried again at most
``timeout_retries`` times (once by default), whatever ``retries`` says: a
remote that does not answer costs a whole deadline per try, so five tries
would make a run wait five deadlines for nothing.

When a call has failed all its tries, the remote "keeps failing": the breaker
opens, and every call fails at once, without touching the network, for
``cooldown_s``. Then one call is let through; if it works the breaker closes,
else it opens again. A run whose remote died therefore pays the retries once,
not once per task, and its tasks go on with the local cache.

The sleep, the clock and the random source are parameters, so unit tests
drive all of this without sleeping.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from hitz.executor.remote_errors import RemoteError, RemoteErrorReason, RemoteUnavailable

__all__ = ["Breaker", "RetryPolicy"]

T = TypeVar("T")


@dataclass
class RetryPolicy:
    """How often and how patiently a call is tried again."""

    retries: int = 4  # tries after the first one
    timeout_retries: int = 1  # of which at most this many after a DEADLINE_EXCEEDED
    base_s: float = 0.1  # the first backoff's upper bound
    cap_s: float = 5.0  # no backoff is longer than this
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int) -> float:
        """The pause before try ``attempt + 1`` (``attempt`` counts from 0)."""
        return self.rng.uniform(0.0, min(self.cap_s, self.base_s * (2 ** attempt)))


class Breaker:
    """Opens after ``threshold`` calls in a row failed all their tries; see the module
    docstring. Thread-safe: one breaker guards every call of one client."""

    def __init__(self, url: str, *, threshold: int = 1, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0  # calls in a row that failed all their tries
        self._opened_at: float | None = None  # None: closed
        self._trial = False  # a half-open trial call is in flight
        self.last_error: RemoteUnavailable | None = None
        self.opened = 0  # times it opened, for tests and stats

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None

    def before_call(self) -> None:
        """Raise ``RemoteUnavailable`` at once if the breaker is open (and this is
        not the one trial call let through after the cooldown)."""
        with self._lock:
            if self._opened_at is None:
                return
            if not self._trial and self._clock() - self._opened_at >= self.cooldown_s:
                self._trial = True
                return
            last = self.last_error
        raise RemoteUnavailable(
            f"remote cache {self.url} is unreachable: it kept failing, so hitz stopped "
            "asking it for a while",
            detail=last.message if last else None,
            reason=last.reason if last else RemoteErrorReason.UNREACHABLE,
            retryable=True,
        )

    def succeeded(self) -> None:
        """The remote answered (even with a non-retryable error: it is there)."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def failed(self, exc: RemoteUnavailable) -> None:
        """A call failed all its tries with ``exc``."""
        with self._lock:
            self.last_error = exc
            self._failures += 1
            if self._trial or self._failures >= self.threshold:
                if self._opened_at is None or self._trial:
                    self.opened += 1
                self._opened_at = self._clock()
                self._trial = False

    def call(self, policy: RetryPolicy, attempt: Callable[[int], T],
             progress: Callable[[], int] | None = None,
             timeout_retries: int | None = None) -> T:
        """``attempt(n)`` for n = 0, 1, ... until it returns, raises a non-retryable
        error, or has failed ``policy.retries + 1`` times in a row with
        ``RemoteUnavailable`` (or ``timeout_retries + 1`` times by running out
        of time; ``policy.timeout_retries`` unless given).

        ``progress``, if given, counts what a streaming call has moved so far
        (bytes sent or received): a try that broke after moving forward starts
        the count of failures again, since resuming it loses nothing.
        """
        self.before_call()
        if timeout_retries is None:
            timeout_retries = policy.timeout_retries
        failures = timeouts = 0
        seen = progress() if progress else 0
        n = 0
        while True:
            try:
                result = attempt(n)
            except RemoteUnavailable as exc:
                now = progress() if progress else 0
                moved = now > seen
                failures = 1 if moved else failures + 1
                if exc.reason is RemoteErrorReason.TIMEOUT:
                    timeouts = 1 if moved else timeouts + 1
                seen = now
                if failures > policy.retries or timeouts > timeout_retries:
                    self.failed(exc)
                    raise
                policy.sleep(policy.backoff(failures - 1))
                n += 1
                continue
            except RemoteError:
                self.succeeded()  # it answered: it is there
                raise
            except BaseException:
                self._end_trial()
                raise
            self.succeeded()
            return result

    def _end_trial(self) -> None:
        with self._lock:
            self._trial = False
