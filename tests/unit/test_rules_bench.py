"""benchmarks/rules_bench.py runs (at a tiny size: this proves it works, it times nothing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from gateway.core.rules import load_rules

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "rules_bench.py"


def test_benchmark_runs_at_a_tiny_size() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--groups",
            "20",
            "--peers",
            "5",
            "--members",
            "100",
            "--decisions",
            "400",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rules: 20 groups, 5 peers, 100 members" in out
    for label in (
        "load+validate:",
        "compile:",
        "outbound decision, median:",
        "inbound decision, median:",
    ):
        assert re.search(rf"^{re.escape(label)}\s+[0-9.]+ (s|us)", out, re.MULTILINE), out


def test_the_generated_file_is_valid_and_of_the_asked_size() -> None:
    sys.path.insert(0, str(BENCH.parent))
    try:
        import rules_bench  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(BENCH.parent))
    text = rules_bench.generate_rules(groups=7, peers=3, members=30)
    rules = load_rules(text, filename="bench.yaml")
    assert (len(rules.groups), len(rules.peers), rules.member_count) == (7, 3, 30)
    assert yaml.safe_load(text)["org"] == rules.org
