"""Every Prometheus metric the gateway exports, defined once, at module level.

Names follow ``gateway_<subsystem>_<what>_<unit>``. Label values come only
from bounded sets: reason codes (:class:`gateway.errors.Reason`), listener
names, result words, and peer or group names *from the loaded rules* (anything
else is reported as ``other``, see :func:`bounded`). docs/metrics.md lists
each one; a test keeps the two equal.

Hot paths keep labelled children (``.labels(...)`` once, then ``.inc()``).
"""

from __future__ import annotations

from collections.abc import Container

from prometheus_client import Counter, Gauge, disable_created_metrics

disable_created_metrics()  # type: ignore[no-untyped-call]

OTHER = "other"


def bounded(value: str, allowed: Container[str]) -> str:
    """``value`` if it is one of ``allowed`` (names from the rules), else ``other``."""
    return value if value in allowed else OTHER


# -- rules ---------------------------------------------------------------------
RULES_RELOADS = Counter(
    "gateway_rules_reloads_total",
    "Rules loads and reloads, by result (success or failure).",
    ["result"],
)
RULES_LOADED_TIMESTAMP = Gauge(
    "gateway_rules_loaded_timestamp_seconds",
    "Unix time at which the rules in force were loaded.",
)
POLICY_DENIALS = Counter(
    "gateway_policy_denials_total",
    "Policy decisions that denied an envelope, by direction and reason code.",
    ["direction", "reason"],
)

# -- http and tls --------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "gateway_http_requests_total",
    "HTTP requests answered, by listener and status code.",
    ["listener", "status"],
)
HTTP_CONNECTIONS_REFUSED = Counter(
    "gateway_http_connections_refused_total",
    "Connections closed by a limit of the HTTP layer, by listener and reason.",
    ["listener", "reason"],
)
TLS_HANDSHAKE_FAILURES = Counter(
    "gateway_tls_handshake_failures_total",
    "TLS handshakes that failed or whose peer identity was refused, by listener and reason.",
    ["listener", "reason"],
)
