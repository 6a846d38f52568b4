"""``gateway bench --profile``: ranking functions in py-spy's collapsed stacks (pure)."""

from __future__ import annotations

import pytest

from gateway.bench.profile import summarize

_BASE = "<module> (gateway/__main__.py:5);run (trio/_core/_run.py:2000)"
_HANDLE = _BASE + ";handle (gateway/http/server.py:300)"
STACKS = f"""\
{_HANDLE};deliver (gateway/storage/sqlite/store.py:560) 30
{_HANDLE};loads (json/__init__.py:346) 50
{_BASE};handle (gateway/http/server.py:301) 20
{_BASE};get_events (trio/_core/_io_epoll.py:225) 900
not a stack line
"""


def test_functions_are_ranked_by_own_and_total_busy_time() -> None:
    summary = summarize(STACKS.splitlines())
    assert (summary["busy_samples"], summary["idle_samples"]) == (100, 900)
    own = [(e["function"], e["samples"]) for e in summary["by_own_time"]]
    assert own == [
        ("loads (__init__.py)", 50),
        ("deliver (store.py)", 30),
        ("handle (server.py)", 20),
    ]
    total = {e["function"]: e["share"] for e in summary["by_total_time"]}
    # Two lines of one function count once per stack, whatever the line.
    assert total["handle (server.py)"] == pytest.approx(1.0)
    assert total["run (_run.py)"] == pytest.approx(1.0)
    assert total["deliver (store.py)"] == pytest.approx(0.3)


def test_an_empty_or_idle_profile_has_no_shares() -> None:
    summary = summarize(["x (a.py:1);get_events (trio/_core/_io_epoll.py:1) 5"])
    assert summary["busy_samples"] == 0
    assert summary["by_own_time"] == []
    assert summarize([])["busy_samples"] == 0


def test_top_bounds_each_ranking() -> None:
    lines = [f"f{n} (m.py:{n}) {n + 1}" for n in range(40)]
    summary = summarize(lines, top=5)
    assert len(summary["by_own_time"]) == 5
    assert summary["by_own_time"][0]["function"] == "f39 (m.py)"
