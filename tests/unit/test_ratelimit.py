"""Token buckets on injected time: the bound, the refill, the wait, the key bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.ratelimit import RateLimiter, TokenBucket


def test_a_full_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    limiter = RateLimiter(rate=10.0, burst=5)
    assert [limiter.take("alice", 100.0) for _ in range(5)] == [0.0] * 5
    assert limiter.take("alice", 100.0) == pytest.approx(0.1)  # one token at 10/s
    assert limiter.take("bob", 100.0) == 0.0  # another key has its own bucket
    assert limiter.take("alice", 100.1) == 0.0  # refilled by exactly one token
    assert limiter.take("alice", 100.1) == pytest.approx(0.1)


def test_a_cost_above_the_burst_is_charged_as_the_burst() -> None:
    limiter = RateLimiter(rate=1.0, burst=4)
    assert limiter.take("alice", 0.0, cost=256) == 0.0  # never locked out for good
    assert limiter.take("alice", 0.0, cost=256) == pytest.approx(4.0)
    assert limiter.take("alice", 2.0, cost=2) == 0.0


def test_time_going_back_never_adds_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, tokens=0.0, stamp=10.0)
    assert bucket.take(5.0) == pytest.approx(1.0)
    assert bucket.take(11.0) == 0.0


def test_the_number_of_buckets_is_bounded_least_recently_used_first() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2)
    limiter.take("a", 0.0)
    limiter.take("b", 0.0)
    limiter.take("a", 0.0)  # a is used again: b is the oldest
    limiter.take("c", 0.0)
    assert len(limiter) == 2
    assert limiter.take("a", 0.0) > 0  # a was kept, still empty
    assert limiter.take("b", 0.0) == 0.0  # b was forgotten: back with a full bucket


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0.5)])
def test_bad_settings_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        RateLimiter(rate=rate, burst=burst)


@given(
    rate=st.floats(min_value=0.1, max_value=1000),
    burst=st.integers(min_value=1, max_value=1000),
    steps=st.lists(st.floats(min_value=0, max_value=10), max_size=50),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[float]
) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    now, allowed = 0.0, 0
    for step in steps:
        now += step
        while limiter.take("k", now) == 0.0:
            allowed += 1
    assert allowed <= burst + rate * now + 1e-6
