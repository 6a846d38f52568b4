"""When to try a failing peer again: exponential backoff with full jitter (pure; no I/O).

After the ``n``-th consecutive failure (``n >= 1``) the sender waits a time
drawn uniformly from ``[0, min(cap, initial * 2**(n-1))]``: the first retry
comes within ``initial``, each further failure doubles the window, and the
window never grows past ``cap``. Drawing the whole wait at random ("full
jitter") spreads the retries of many gateways that lost the same peer at the
same moment, instead of having them all knock again in lockstep. A success
resets the count to zero.

A peer that answers ``429``/``503`` with ``Retry-After`` is not asked again
before that time either (still at most ``cap`` away): it told us when it can
take more.

The state that outlives a restart is a :class:`~gateway.storage.base.PeerState`;
:func:`after_failure` and :func:`after_success` are its transitions. The
random source is passed in, so a test with a seeded ``random.Random`` (or a
constant) knows every delay in advance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from gateway.storage.base import MAX_LAST_ERROR_LENGTH, MAX_TIME_MS, PeerState

MAX_BACKOFF_CAP_SECONDS = 7 * 86_400.0  # a cap beyond a week would outlive any envelope
MAX_FAILURES = 2**31  # PeerState's bound; the count stops there, the delay is long capped
MS_PER_SECOND = 1000

# The window doubles with each failure; past this exponent it is over any
# allowed cap anyway, and 2**n stays a small float.
_MAX_EXPONENT = 62

RandomSource = Callable[[], float]  # a float in [0, 1], like random.random


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Backoff bounds in seconds: the first retry window and the largest one."""

    initial: float
    cap: float

    def __post_init__(self) -> None:
        for name, value in (("initial", self.initial), ("cap", self.cap)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"backoff {name} must be a number of seconds, got {value!r}")
            if not 0 < value <= MAX_BACKOFF_CAP_SECONDS:
                raise ValueError(
                    f"backoff {name} must be within (0, {MAX_BACKOFF_CAP_SECONDS}] seconds, "
                    f"got {value!r}"
                )
        if self.initial > self.cap:
            raise ValueError(
                f"backoff initial ({self.initial}s) is more than its cap ({self.cap}s)"
            )

    def ceiling(self, failures: int) -> float:
        """The largest wait after ``failures`` consecutive failures (0 for none)."""
        if failures < 0:
            raise ValueError(f"failures must be 0 or more, got {failures}")
        if failures == 0:
            return 0.0
        exponent = failures - 1
        if exponent >= _MAX_EXPONENT:
            return self.cap
        return min(self.cap, self.initial * 2.0**exponent)

    def delay(self, failures: int, random: RandomSource) -> float:
        """A wait drawn uniformly from ``[0, ceiling(failures)]``."""
        draw = random()
        if not 0.0 <= draw <= 1.0:  # also refuses NaN
            raise ValueError(f"the random source must give a float in [0, 1], got {draw!r}")
        return draw * self.ceiling(failures)


def after_failure(
    state: PeerState,
    *,
    now_ms: int,
    policy: BackoffPolicy,
    random: RandomSource,
    error: str,
    retry_after: float | None = None,
) -> PeerState:
    """The state after one more failed attempt at ``now_ms``: count it, set the next try.

    ``error`` is our own short description (never the peer's text); it is cut
    to what storage keeps. ``retry_after`` (seconds, from the peer) is honoured
    up to ``policy.cap``.
    """
    failures = min(state.failures + 1, MAX_FAILURES)
    wait = policy.delay(failures, random)
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        wait = max(wait, min(retry_after, policy.cap))
    until = min(now_ms + math.ceil(wait * MS_PER_SECOND), MAX_TIME_MS)
    return dataclasses.replace(
        state,
        failures=failures,
        backoff_until_ms=until,
        last_error=error[:MAX_LAST_ERROR_LENGTH],
    )


def after_success(state: PeerState, *, now_ms: int) -> PeerState:
    """The state after an answered transaction at ``now_ms``: no failures, no backoff."""
    return dataclasses.replace(
        state, failures=0, backoff_until_ms=0, last_success_ms=now_ms, last_error=None
    )


def remaining_seconds(state: PeerState, *, now_ms: int) -> float:
    """How long until ``state`` allows another try (0 when it allows one now)."""
    return max(0, state.backoff_until_ms - now_ms) / MS_PER_SECOND
