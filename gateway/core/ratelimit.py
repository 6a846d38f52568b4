"""Token buckets, one per key, with injected time (pure: no clock, no I/O).

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second; an
action that costs ``n`` takes ``n`` tokens if they are there, and otherwise
is refused with the seconds until they would be. A cost above ``burst`` is
charged as ``burst`` (a full bucket always lets one action through), so a
limit can slow a caller down but never lock it out for good.

:class:`RateLimiter` keeps one bucket per key (a user, a peer) and at most
``max_keys`` of them: the least recently used bucket goes first. A forgotten
key comes back with a full bucket, which only ever errs on the side of the
caller; ``max_keys`` is sized far above the keys that are active at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

DEFAULT_MAX_KEYS: Final = 100_000
_EPSILON: Final = 1e-9


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens a second
    burst: float  # most tokens held
    tokens: float
    stamp: float  # the time of the last refill, in seconds

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens at ``now``: 0.0 if taken, else the seconds to wait."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        cost = min(cost, self.burst)
        if self.tokens + _EPSILON >= cost:  # float refills fall short by a rounding error
            self.tokens = max(0.0, self.tokens - cost)
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """One :class:`TokenBucket` per key; see the module docstring."""

    def __init__(self, *, rate: float, burst: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate!r} and {burst!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Charge ``key`` ``cost`` at ``now``: 0.0 if allowed, else the seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, cost)

    def __len__(self) -> int:
        return len(self._buckets)
