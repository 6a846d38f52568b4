"""Backoff: exponential windows, full jitter, the cap, the reset, and determinism."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.federation.backoff import (
    MAX_BACKOFF_CAP_SECONDS,
    MAX_FAILURES,
    BackoffPolicy,
    after_failure,
    after_success,
    remaining_seconds,
)
from gateway.storage.base import MAX_LAST_ERROR_LENGTH, PeerState

POLICY = BackoffPolicy(initial=1.0, cap=300.0)
NOW = 1_700_000_000_000


def top() -> float:
    return 1.0


def test_the_window_doubles_from_initial_up_to_the_cap() -> None:
    assert POLICY.ceiling(0) == 0
    assert [POLICY.ceiling(n) for n in range(1, 12)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        300,
        300,
    ]
    assert POLICY.ceiling(10_000) == 300
    assert POLICY.ceiling(MAX_FAILURES) == 300


@given(
    failures=st.integers(min_value=1, max_value=MAX_FAILURES),
    draw=st.floats(min_value=0.0, max_value=1.0),
)
def test_every_delay_lies_in_zero_to_the_window(failures: int, draw: float) -> None:
    delay = POLICY.delay(failures, lambda: draw)
    assert 0 <= delay <= POLICY.ceiling(failures) <= POLICY.cap


def test_full_jitter_spreads_over_the_whole_window() -> None:
    rng = random.Random(7)
    delays = [POLICY.delay(6, rng.random) for _ in range(2000)]  # window: 32 s
    assert min(delays) < 2
    assert max(delays) > 30
    assert 14 < sum(delays) / len(delays) < 18  # uniform: mean near 16


def test_a_seeded_random_gives_the_same_delays() -> None:
    first = [POLICY.delay(n, random.Random(42).random) for n in range(1, 20)]
    second = [POLICY.delay(n, random.Random(42).random) for n in range(1, 20)]
    assert first == second


@pytest.mark.parametrize("draw", [-0.1, 1.5, float("nan")])
def test_a_random_source_out_of_range_is_refused(draw: float) -> None:
    with pytest.raises(ValueError, match="random source"):
        POLICY.delay(1, lambda: draw)


@pytest.mark.parametrize(
    ("initial", "cap", "message"),
    [
        (0, 10, "initial"),
        (-1, 10, "initial"),
        (1, MAX_BACKOFF_CAP_SECONDS + 1, "cap"),
        (20, 10, "more than its cap"),
        (float("nan"), 10, "initial"),
    ],
)
def test_bad_bounds_are_refused(initial: float, cap: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackoffPolicy(initial=initial, cap=cap)


def test_negative_failures_are_refused() -> None:
    with pytest.raises(ValueError, match="failures"):
        POLICY.ceiling(-1)


def test_each_failure_counts_and_pushes_the_next_try_out() -> None:
    state = PeerState(peer="globex.example")
    untils = []
    for n in range(1, 11):
        state = after_failure(
            state, now_ms=NOW, policy=POLICY, random=top, error="connect: refused"
        )
        assert state.failures == n
        assert state.last_error == "connect: refused"
        untils.append(state.backoff_until_ms - NOW)
    assert untils == [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000, 300000]
    assert remaining_seconds(state, now_ms=NOW) == 300
    assert remaining_seconds(state, now_ms=NOW + 400_000) == 0


def test_success_resets_the_count_and_the_backoff() -> None:
    state = PeerState(peer="globex.example")
    for _ in range(5):
        state = after_failure(state, now_ms=NOW, policy=POLICY, random=top, error="timeout")
    state = after_success(state, now_ms=NOW + 5)
    assert state == PeerState(
        peer="globex.example", failures=0, backoff_until_ms=0, last_success_ms=NOW + 5
    )
    state = after_failure(state, now_ms=NOW + 10, policy=POLICY, random=top, error="timeout")
    assert state.backoff_until_ms == NOW + 10 + 1000  # the window starts small again
    assert state.last_success_ms == NOW + 5


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    state = PeerState(peer="globex.example")
    zero = after_failure(
        state, now_ms=NOW, policy=POLICY, random=lambda: 0.0, error="http_503", retry_after=30
    )
    assert zero.backoff_until_ms == NOW + 30_000
    huge = after_failure(
        state, now_ms=NOW, policy=POLICY, random=lambda: 0.0, error="http_503", retry_after=1e9
    )
    assert huge.backoff_until_ms == NOW + 300_000


def test_the_failure_count_stops_at_its_bound_and_errors_are_cut() -> None:
    state = PeerState(peer="globex.example", failures=MAX_FAILURES)
    state = after_failure(state, now_ms=NOW, policy=POLICY, random=top, error="x" * 10_000)
    assert state.failures == MAX_FAILURES
    assert state.backoff_until_ms == NOW + 300_000
    assert state.last_error is not None
    assert len(state.last_error) == MAX_LAST_ERROR_LENGTH
