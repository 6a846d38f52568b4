"""promtool accepts what we ship: the alerting rules, their unit tests, the example
config, and the ``/metrics`` output of real gateways after real traffic.

Locally these skip when promtool is absent (``apt-get install prometheus``); in
CI (``CI=true``) that is a failure: ``.ci/run`` installs it.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest
import trio

from gateway.devnet import DevNet
from tests.e2e.traffic import metric_value, require_tool, run_flow, wait_for_metric

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMTOOL_TIMEOUT = 60
ENVELOPES = 50


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [require_tool("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=PROMTOOL_TIMEOUT,
        cwd=ROOT,
    )
    return done


def test_check_rules_accepts_the_shipped_alerts() -> None:
    done = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_alert_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_check_config_accepts_the_example_config() -> None:
    done = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.example.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_rules_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check is real: a rule with a bad expression is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n  - name: g\n    rules:\n      - alert: Broken\n"
        "        expr: sum by (peer) (gateway_peer_up\n",
        encoding="utf-8",
    )
    done = promtool("check", "rules", str(broken))
    assert done.returncode != 0


async def test_check_metrics_accepts_real_metrics_output(tmp_path: Path) -> None:
    require_tool("promtool")
    with DevNet(tmp_path) as net:
        flow = await run_flow(net, envelopes=ENVELOPES)
        for proc in (flow.proc_acme, flow.proc_globex):
            # The output checked really carries the traffic (not an empty registry). The
            # sender counts its envelopes when it has read globex's answer, a moment after
            # globex counted them: wait for both.
            await wait_for_metric(
                proc, "gateway_federation_envelopes_total", ENVELOPES, 30.0, outcome="accepted"
            )
            text = await trio.to_thread.run_sync(proc.metrics)
            accepted = metric_value(text, "gateway_federation_envelopes_total", outcome="accepted")
            assert accepted == ENVELOPES
            done = await trio.to_thread.run_sync(
                functools.partial(promtool, "check", "metrics", stdin=text)
            )
            assert done.returncode == 0, f"{proc.org.org}: {done.stdout}{done.stderr}"
        assert flow.proc_acme.stop() == 0
        assert flow.proc_globex.stop() == 0
