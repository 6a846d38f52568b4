"""End to end: `gateway bench` through the real console script, for correctness only.

Two real gateways, 2,000 envelopes, the floor: every envelope must arrive
exactly once, at the gateways and at the floor, a sample must open, and the
JSON must carry every figure the docs promise. No figure is asserted: a
benchmark's numbers belong to docs/performance.md, not to a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.bench.report import lookup, missing_fields, required_fields

pytestmark = pytest.mark.e2e

ENVELOPES = 2000
TIMEOUT = 600


def gateway_script() -> str:
    """The `gateway` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("gateway")
    assert script.exists(), f"no console script at {script}: is the package installed?"
    return str(script)


def test_bench_smoke_delivers_every_envelope_exactly_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            gateway_script(),
            "bench",
            "--envelopes",
            str(ENVELOPES),
            "--json",
            "--keep",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)

    assert report["scenario"] == "delivery"
    assert missing_fields(report) == []
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
