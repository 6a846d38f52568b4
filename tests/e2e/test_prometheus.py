"""End to end with a real Prometheus: it scrapes two real gateways while envelopes flow.

Two ``gateway run`` processes (acme.example sends to globex.example) carry a
few hundred envelopes; a real ``prometheus`` on loopback scrapes both metrics
listeners every second, with the shipped alerting rules loaded. Through
Prometheus's HTTP query API the test asserts that both targets are ``up``,
that the envelope counters moved by exactly what was sent on both sides, and
that every shipped alert evaluates without error against the real series.

Locally the test skips when the binary is absent (``apt-get install
prometheus``); in CI (``CI=true``) that is a failure: ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from gateway.devnet import LOOPBACK, DevNet, free_port
from tests.e2e.traffic import GLOBEX, Flow, require_tool, run_flow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ENVELOPES = 300
#: From Prometheus's start to the counters it scraped matching the flow.
QUERY_DEADLINE = 60.0
STOP_TIMEOUT = 10.0
POLL = 0.5


@contextlib.contextmanager
def running_prometheus(binary: str, base: Path, targets: list[str]) -> Iterator[str]:
    """A prometheus process scraping ``targets`` every second; yields its base URL."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": targets}]}],
    }
    config_path = base / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    with open(base / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            yield f"http://{LOOPBACK}:{port}"
        finally:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def query(client: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
    """The instant vector of ``promql``, or [] while Prometheus is not answering yet."""
    try:
        answer = await client.get("/api/v1/query", params={"query": promql})
    except httpx.TransportError:
        return []
    if answer.status_code != 200:
        return []
    body = answer.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def by_instance(result: list[dict[str, Any]]) -> dict[str, float]:
    return {sample["metric"]["instance"]: float(sample["value"][1]) for sample in result}


async def wait_for(
    client: httpx.AsyncClient, promql: str, expected: dict[str, float], log: Path
) -> None:
    """Until ``promql`` gives ``expected`` (instance -> value), or fail with what it gave."""
    deadline = trio.current_time() + QUERY_DEADLINE
    got: dict[str, float] = {}
    while trio.current_time() < deadline:
        got = by_instance(await query(client, promql))
        if got == expected:
            return
        await trio.sleep(POLL)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise AssertionError(f"{promql}: wanted {expected}, Prometheus says {got}\n{tail}")


async def test_prometheus_scrapes_both_gateways_and_sees_the_envelopes(tmp_path: Path) -> None:
    binary = require_tool("prometheus")
    with DevNet(tmp_path / "net") as net:
        flow: Flow = await run_flow(net, envelopes=ENVELOPES)
        acme = f"{flow.acme.metrics.host}:{flow.acme.metrics.port}"
        globex = f"{flow.globex.metrics.host}:{flow.globex.metrics.port}"
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        with running_prometheus(binary, prom_dir, [acme, globex]) as url:
            log = prom_dir / "prometheus.log"
            async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
                await wait_for(client, 'up{job="gateway"}', {acme: 1.0, globex: 1.0}, log)
                # What acme sent and globex accepted, counted on each side.
                await wait_for(
                    client,
                    'gateway_federation_envelopes_total{direction="outbound",outcome="accepted"}',
                    {acme: float(ENVELOPES)},
                    log,
                )
                await wait_for(
                    client,
                    'gateway_federation_envelopes_total{direction="inbound",outcome="accepted"}',
                    {globex: float(ENVELOPES)},
                    log,
                )
                await wait_for(
                    client,
                    f'gateway_federation_envelopes_total{{peer="{GLOBEX}"}}',
                    {acme: float(ENVELOPES)},
                    log,
                )
                await wait_for(
                    client,
                    f'gateway_delivery_latency_seconds_count{{instance="{globex}"}}',
                    {globex: float(ENVELOPES)},
                    log,
                )
                await wait_for(
                    client,
                    'sum by (instance) (gateway_policy_denials_total{direction="outbound"})',
                    {acme: float(flow.denied)},
                    log,
                )
                await wait_for(
                    client,
                    "gateway_clientapi_local_deliveries_total",
                    {acme: float(flow.local), globex: 0.0},
                    log,
                )
                await wait_for(
                    client,
                    f'gateway_peer_up{{peer="{GLOBEX}"}}',
                    {acme: 1.0},
                    log,
                )
                # Each gateway shows its peer's CA (and only that peer) expiring in the future.
                await wait_for(
                    client,
                    "count by (instance) (gateway_certificate_not_after_timestamp_seconds"
                    '{certificate!~"federation|client_api|org_ca"} > time())',
                    {acme: 1.0, globex: 1.0},
                    log,
                )
                # The shipped alerts load and evaluate against the real series.
                rules = (await client.get("/api/v1/rules")).json()["data"]["groups"]
                loaded = [rule for group in rules for rule in group["rules"]]
                assert len(loaded) >= 6
                assert all(rule["health"] != "err" for rule in loaded), [
                    (rule["name"], rule.get("lastError")) for rule in loaded
                ]
        assert flow.proc_acme.stop() == 0
        assert flow.proc_globex.stop() == 0
