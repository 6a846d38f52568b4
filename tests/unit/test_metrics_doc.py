"""docs/metrics.md, the shipped alerts and the dashboard agree with the metrics the code defines.

The code's side is what ``prometheus_client.REGISTRY`` holds after every
``gateway`` module is imported: whatever file defines a ``gateway_*`` metric,
it is found. The doc's side is the table of docs/metrics.md: one row per
metric, name in backticks in the first column, type in the second, label
names in backticks in the third, alert names in backticks in the fifth.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import gateway

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"

PREFIX = "gateway_"
#: Series Prometheus itself adds to every target, which expressions may use.
PROMETHEUS_SERIES = frozenset({"up"})
#: What the dashboard must show at least (issue 6): every other metric is welcome.
DASHBOARD_MUST_SHOW = frozenset(
    {
        "gateway_federation_envelopes_total",
        "gateway_clientapi_submissions_total",
        "gateway_clientapi_local_deliveries_total",
        "gateway_policy_denials_total",
        "gateway_spool_envelopes",
        "gateway_spool_oldest_age_seconds",
        "gateway_peer_up",
        "gateway_peer_backoff_seconds",
        "gateway_federation_transaction_duration_seconds",
        "gateway_delivery_latency_seconds",
        "gateway_mailbox_envelopes",
        "gateway_certificate_not_after_timestamp_seconds",
        "gateway_rules_reloads_total",
        "gateway_tls_handshake_failures_total",
        "gateway_http_requests_total",
    }
)
_SERIES_RE = re.compile(r"\b(gateway_[a-z0-9_]+|up)\b")
_TICKED_RE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed: counters with _total
    kind: str
    labels: frozenset[str]


def _import_every_gateway_module() -> None:
    for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if module.name.rsplit(".", 1)[-1] != "__main__":  # __main__ runs the CLI
            importlib.import_module(module.name)


def _code_metrics() -> dict[str, Metric]:
    _import_every_gateway_module()
    kinds: dict[str, str] = {}
    for family in REGISTRY.collect():
        if family.name.startswith(PREFIX):
            exposed = family.name + "_total" if family.type == "counter" else family.name
            kinds[exposed] = family.type
    # Label names are not in an empty family; the metric objects know them.
    labels: dict[str, frozenset[str]] = {}
    for module_name in list(sys.modules):
        if module_name == "gateway" or module_name.startswith("gateway."):
            for value in vars(importlib.import_module(module_name)).values():
                if isinstance(value, MetricWrapperBase) and value._name.startswith(PREFIX):
                    exposed = value._name + ("_total" if value._type == "counter" else "")
                    labels[exposed] = frozenset(value._labelnames)
    missing_objects = set(kinds) - set(labels)
    assert not missing_objects, f"metrics not defined at module level: {missing_objects}"
    return {name: Metric(name, kind, labels[name]) for name, kind in kinds.items()}


@dataclass(frozen=True)
class DocRow:
    name: str
    kind: str
    labels: frozenset[str]
    alerts: frozenset[str]


def _doc_rows() -> dict[str, DocRow]:
    rows: dict[str, DocRow] = {}
    for number, line in enumerate(DOC.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0].startswith(f"`{PREFIX}"):
            assert len(cells) == 5, f"docs/metrics.md:{number}: a metric row needs 5 cells"
        elif len(cells) != 5:
            continue
        name = _TICKED_RE.fullmatch(cells[0])
        if name is None or not name.group(1).startswith(PREFIX):
            continue
        assert name.group(1) not in rows, f"docs/metrics.md:{number}: {name.group(1)} twice"
        rows[name.group(1)] = DocRow(
            name=name.group(1),
            kind=cells[1],
            labels=frozenset(_TICKED_RE.findall(cells[2])),
            alerts=frozenset(_TICKED_RE.findall(cells[4])),
        )
    return rows


def _series_names(metrics: dict[str, Metric]) -> dict[str, str]:
    """Every series name an expression may use -> the metric it belongs to."""
    names: dict[str, str] = {}
    for metric in metrics.values():
        if metric.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[metric.name + suffix] = metric.name
        else:
            names[metric.name] = metric.name
    return names


def _alerts() -> dict[str, str]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return {
        rule["alert"]: rule["expr"]
        for group in document["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):  # type: ignore[attr-defined]
                found.append((str(panel["title"]), target["expr"]))
            walk(panel.get("panels", []))  # type: ignore[arg-type]

    walk(dashboard["panels"])
    return found


@pytest.fixture(scope="module")
def code_metrics() -> dict[str, Metric]:
    return _code_metrics()


def test_the_doc_lists_exactly_the_metrics_the_code_defines(
    code_metrics: dict[str, Metric],
) -> None:
    documented = _doc_rows()
    undocumented = sorted(set(code_metrics) - set(documented))
    stale = sorted(set(documented) - set(code_metrics))
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"
    assert not stale, f"docs/metrics.md lists metrics the code does not define: {stale}"


def test_the_doc_gives_each_metric_its_type_and_labels(code_metrics: dict[str, Metric]) -> None:
    for name, row in _doc_rows().items():
        metric = code_metrics[name]
        assert row.kind == metric.kind, f"{name}: the doc says {row.kind}, the code {metric.kind}"
        assert row.labels == metric.labels, (
            f"{name}: the doc lists labels {sorted(row.labels)}, the code {sorted(metric.labels)}"
        )


def test_metric_names_follow_the_convention(code_metrics: dict[str, Metric]) -> None:
    for metric in code_metrics.values():
        assert re.fullmatch(r"gateway_[a-z]+_[a-z0-9_]+", metric.name), metric.name
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name


def test_the_doc_names_the_alerts_that_use_each_metric(code_metrics: dict[str, Metric]) -> None:
    alerts = _alerts()
    series = _series_names(code_metrics)
    uses: dict[str, set[str]] = {name: set() for name in code_metrics}
    for alert, expr in alerts.items():
        for token in _SERIES_RE.findall(expr):
            if token not in PROMETHEUS_SERIES:
                assert token in series, f"alert {alert} uses {token}, which no metric defines"
                uses[series[token]].add(alert)
    for name, row in _doc_rows().items():
        unknown = row.alerts - set(alerts)
        assert not unknown, f"{name}: the doc names alerts that alerts.yml lacks: {unknown}"
        assert row.alerts == uses[name], (
            f"{name}: the doc says alerts {sorted(row.alerts)}, alerts.yml uses it in "
            f"{sorted(uses[name])}"
        )


def test_every_shipped_alert_is_documented_with_a_runbook() -> None:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    doc = DOC.read_text(encoding="utf-8")
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", operations, flags=re.MULTILINE)
    }
    for group in document["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            assert f"| `{name}` |" in doc, f"alert {name} is missing from docs/metrics.md"
            annotations = rule["annotations"]
            assert annotations["summary"], name
            assert annotations["description"], name
            page, _, anchor = annotations["runbook"].partition("#")
            assert page == "docs/operations.md", f"alert {name}: runbook {page}"
            assert anchor in anchors, f"alert {name}: #{anchor} is not a section of {page}"


def test_the_dashboard_queries_only_metrics_that_exist(code_metrics: dict[str, Metric]) -> None:
    series = _series_names(code_metrics)
    exprs = _dashboard_exprs()
    assert exprs, "the dashboard has no queries"
    used: set[str] = set()
    for title, expr in exprs:
        tokens = _SERIES_RE.findall(expr)
        assert tokens, f"panel {title!r}: {expr} queries no gateway metric"
        for token in tokens:
            assert token in series or token in PROMETHEUS_SERIES, (
                f"panel {title!r} queries {token}, which no metric defines"
            )
            if token in series:
                used.add(series[token])
    missing = DASHBOARD_MUST_SHOW - used
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"


def test_the_dashboard_has_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dashboard["schemaVersion"] >= 36
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_node_info_is_one_series_that_follows_the_rules_in_force() -> None:
    from prometheus_client import REGISTRY

    from gateway.observability.metrics import NodeInfo

    def value(sha256: str) -> float | None:
        labels = {"node": "gw9", "version": "1.2.3", "rules_sha256": sha256}
        return REGISTRY.get_sample_value("gateway_node_info", labels)

    info = NodeInfo("gw9", "1.2.3")
    info.show("a" * 64)
    assert value("a" * 64) == 1
    info.show("b" * 64)
    assert (value("a" * 64), value("b" * 64)) == (None, 1)
