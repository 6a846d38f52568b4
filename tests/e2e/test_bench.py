"""End to end: `gateway bench` through the real console script, for correctness only.

Two real gateways, 2,000 envelopes, the floor: every envelope must arrive
exactly once, at the gateways and at the floor, a sample must open, and the
JSON must carry every figure the docs promise. The outage and spool scenarios
run small: exactly once across the receiver's restart, and the depth made.
No figure is asserted: a benchmark's numbers belong to docs/performance.md,
not to a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.bench.report import lookup, missing_fields, required_fields
from tests.postgres_for_tests import admin_url

pytestmark = pytest.mark.e2e

ENVELOPES = 2000
TIMEOUT = 600


def gateway_script() -> str:
    """The `gateway` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("gateway")
    assert script.exists(), f"no console script at {script}: is the package installed?"
    return str(script)


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """``gateway bench ARGS --json``: the report, once the exit code and fields are checked."""
    done = subprocess.run(
        [gateway_script(), "bench", *args, "--json", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    assert missing_fields(report) == []
    assert report["ok"] is True
    return report


def test_bench_smoke_delivers_every_envelope_exactly_once(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "--envelopes", str(ENVELOPES))

    assert report["scenario"] == "delivery"
    assert "floor.ratio" in required_fields(report)
    envelopes = report["envelopes"]
    assert envelopes["requested"] == ENVELOPES
    assert envelopes["submitted"] == ENVELOPES
    assert envelopes["delivered"] == ENVELOPES
    assert envelopes["lost"] == 0
    assert envelopes["duplicates"] == 0
    assert envelopes["complete"] is True
    assert envelopes["exactly_once"] is True
    assert report["sample"]["opened"] > 0
    assert report["sample"]["failed"] == 0
    assert report["floor"]["exactly_once"] is True
    assert report["floor"]["envelopes"] == ENVELOPES
    assert report["ok"] is True
    # Present, and measured (a number, not null): what each figure is, not how big.
    for path in (
        "envelopes_per_s",
        "latency_ms.p50",
        "latency_ms.max",
        "gateways.sender.cpu_seconds_per_1000",
        "gateways.receiver.peak_rss_mb",
        "floor.envelopes_per_s",
        "floor.ratio",
        "machine.cores",
    ):
        assert isinstance(lookup(report, path), int | float), path


def test_bench_outage_loses_nothing_and_delivers_nothing_twice_across_a_restart(
    tmp_path: Path,
) -> None:
    # The receiving gateway is stopped, the envelopes wait in the sender's spool,
    # then it starts again (and greets its peer, which sends at once). More than
    # one mailbox answer's worth (500), so the drain spans several receipts and
    # its rate is measured.
    count = 2000
    report = run_bench(tmp_path, "--outage", "1", "--envelopes", str(count), "--no-floor")
    assert report["scenario"] == "outage"
    assert report["envelopes"] == {
        "requested": count,
        "submitted": count,
        "delivered": count,
        "lost": 0,
        "duplicates": 0,
        "unknown": 0,
        "complete": True,
        "exactly_once": True,
    }
    assert lookup(report, "outage.accepted_while_down") == count
    for path in ("outage.seconds", "outage.resume_after_s", "outage.drain_envelopes_per_s"):
        assert isinstance(lookup(report, path), int | float), path


def test_bench_spool_reports_the_depth_it_made(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "--spool", "2000", "--no-floor")
    assert report["scenario"] == "spool"
    assert lookup(report, "spool.envelopes") == 2000
    assert lookup(report, "spool.peers_spool_depth") == 2000
    assert lookup(report, "spool.depth_matches") is True
    for path in ("spool.sender_rss_mb", "spool.peers_seconds", "spool.fill_seconds"):
        assert isinstance(lookup(report, path), int | float), path


def test_bench_refuses_a_bad_option() -> None:
    done = subprocess.run(
        [gateway_script(), "bench", "--window", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--window" in done.stderr


def test_bench_profile_samples_both_gateways_with_py_spy(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    report = run_bench(tmp_path, "--envelopes", "1000", "--no-floor", "--profile", str(profile))
    for role in ("sender", "receiver"):
        summary = report["profile"][role]
        stacks = profile / f"{role}.folded"
        assert summary["file"] == str(stacks)
        # Collapsed stacks, one `frame;...;frame count` per line, that tools can read.
        first = stacks.read_text().splitlines()[0]
        assert first.rpartition(" ")[2].isdigit(), first
        assert summary["busy_samples"] > 0
        assert summary["by_own_time"], summary
        assert all(0 < entry["share"] <= 1 for entry in summary["by_total_time"])


def test_bench_profile_is_refused_for_the_spool_scenario(tmp_path: Path) -> None:
    done = subprocess.run(
        [gateway_script(), "bench", "--spool", "10", "--profile", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--profile" in done.stderr


def test_bench_on_postgresql_with_two_nodes_per_org_delivers_exactly_once(tmp_path: Path) -> None:
    """--storage postgresql --nodes 2: databases made and dropped, submissions spread over
    the sending org's nodes, every envelope once."""
    report = run_bench(
        tmp_path,
        *("--envelopes", "400", "--storage", "postgresql", "--nodes", "2", "--no-floor"),
        *("--postgres", admin_url()),
    )
    assert report["options"]["storage"] == "postgresql"
    assert report["options"]["nodes"] == 2
    assert report["envelopes"]["exactly_once"] is True
    assert report["envelopes"]["delivered"] == 400
    logs = sorted(p.name for p in tmp_path.rglob("*.log"))
    assert "acme.example-2.log" in logs
    assert "globex.example-2.log" in logs
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        left = admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'gateway_bench_%'"
        ).fetchall()
    assert left == []  # dropped after the run


def test_bench_refuses_nodes_without_a_shared_database(tmp_path: Path) -> None:
    done = subprocess.run(
        [gateway_script(), "bench", "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--nodes above 1 needs --storage postgresql" in done.stderr
