"""The benchmark's report: one JSON object (``--json``) or a table for people.

:func:`missing_fields` lists the fields a report of its scenario must carry;
the smoke test and ``gateway bench`` itself use it, so a figure cannot quietly
drop out of the JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

#: Fields every report carries, as dotted paths.
COMMON_FIELDS: Final = (
    "scenario",
    "ok",
    "options.envelopes",
    "options.size",
    "options.window",
    "options.duration",
    "machine.cores",
    "machine.cores_usable",
    "machine.cpu_model",
)
#: Fields of a delivery run (the default scenario, and the outage).
DELIVERY_FIELDS: Final = (
    "envelopes.requested",
    "envelopes.submitted",
    "envelopes.delivered",
    "envelopes.lost",
    "envelopes.duplicates",
    "envelopes.complete",
    "envelopes.exactly_once",
    "envelope_bytes",
    "ciphertext_bytes",
    "seconds",
    "envelopes_per_s",
    "ciphertext_mb_per_s",
    "latency_ms.p50",
    "latency_ms.p90",
    "latency_ms.p99",
    "latency_ms.max",
    "gateways.sender.cpu_seconds_per_1000",
    "gateways.sender.peak_rss_mb",
    "gateways.receiver.cpu_seconds_per_1000",
    "gateways.receiver.peak_rss_mb",
    "clients_cpu_seconds_per_1000",
    "federation_wire_bytes_per_envelope",
    "sample.opened",
    "sample.failed",
    "floor.envelopes_per_s",
    "floor.exactly_once",
    "floor.ratio",
)
OUTAGE_FIELDS: Final = (
    "outage.seconds",
    "outage.accepted_while_down",
    "outage.resume_after_s",
    "outage.drain_envelopes_per_s",
)
SPOOL_FIELDS: Final = (
    "spool.envelopes",
    "spool.fill_seconds",
    "spool.sender_rss_mb",
    "spool.sender_peak_rss_mb",
    "spool.peers_seconds",
    "spool.peers_spool_depth",
)
_ABSENT: Final = object()
PROFILE_ROWS: Final = 10  # functions of each gateway's profile in the table


def lookup(report: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path``, or a sentinel if any step is missing."""
    value: Any = report
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def required_fields(report: Mapping[str, Any]) -> tuple[str, ...]:
    scenario = report.get("scenario")
    if scenario == "spool":
        return COMMON_FIELDS + SPOOL_FIELDS
    fields: tuple[str, ...] = COMMON_FIELDS + DELIVERY_FIELDS
    if "floor" in report and report["floor"] is None:  # --no-floor
        fields = tuple(path for path in fields if not path.startswith("floor."))
    if scenario == "outage":
        fields += OUTAGE_FIELDS
    return fields


def missing_fields(report: Mapping[str, Any]) -> list[str]:
    """The required fields that are absent (``None`` counts as present: "not measured")."""
    return [path for path in required_fields(report) if lookup(report, path) is _ABSENT]


def _clean(value: Any) -> Any:
    """NaN and infinity have no JSON spelling: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _clean(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(inner) for inner in value]
    return value


def to_json(report: Mapping[str, Any]) -> str:
    return json.dumps(_clean(report), indent=2, sort_keys=False)


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def render_table(report: Mapping[str, Any]) -> str:
    """The report as aligned ``figure  value`` lines."""
    rows: list[tuple[str, str]] = []
    options = report["options"]
    machine = report["machine"]
    rows.append(("scenario", str(report["scenario"])))
    rows.append(
        (
            "machine",
            f"{machine['cores']} cores ({machine['cores_usable']} usable), {machine['cpu_model']}",
        )
    )
    if report["scenario"] == "spool":
        spool = report["spool"]
        rows += [
            ("envelopes spooled", _num(spool["envelopes"])),
            ("spool fill (direct to storage)", f"{_num(spool['fill_seconds'])} s"),
            (
                "sender RSS / peak",
                f"{_num(spool['sender_rss_mb'])} / {_num(spool['sender_peak_rss_mb'])} MB",
            ),
            ("`gateway peers` (slowest)", f"{_num(spool['peers_seconds'], 3)} s"),
            ("spool depth it reports", _num(spool["peers_spool_depth"])),
            ("result", "ok" if report["ok"] else "FAILED"),
        ]
        return _lines(rows)
    env = report["envelopes"]
    latency = report["latency_ms"]
    gateways = report["gateways"]
    rows += [
        (
            "options",
            f"{options['envelopes']:,} envelopes, payload {options['size']:,} B, "
            f"window {options['window']}, {options.get('storage', 'sqlite')}"
            + (f", {options['nodes']} nodes per org" if options.get("nodes", 1) > 1 else ""),
        ),
        (
            "envelope on the wire",
            f"{report['envelope_bytes']:,} B (ciphertext {report['ciphertext_bytes']:,} B)",
        ),
        (
            "delivered",
            f"{env['delivered']:,} of {env['submitted']:,} submitted "
            f"({env['lost']} lost, {env['duplicates']} twice)",
        ),
        ("exactly once", _num(env["exactly_once"])),
        ("envelopes/s (first submit to last receipt)", _num(report["envelopes_per_s"], 0)),
        ("ciphertext MB/s", _num(report["ciphertext_mb_per_s"])),
        (
            "latency p50 / p90 / p99 / max (ms)",
            " / ".join(_num(latency[k], 2) for k in ("p50", "p90", "p99", "max")),
        ),
    ]
    for role in ("sender", "receiver"):
        figures = gateways[role]
        rows.append(
            (
                f"{role} gateway: CPU s per 1,000 / peak RSS",
                f"{_num(figures['cpu_seconds_per_1000'], 3)} s / {_num(figures['peak_rss_mb'])} MB",
            )
        )
    rows.append(("both clients: CPU s per 1,000", _num(report["clients_cpu_seconds_per_1000"], 3)))
    rows.append(
        (
            "federation wire bytes per envelope",
            _num(report["federation_wire_bytes_per_envelope"], 0),
        )
    )
    rows.append(
        (
            "sample opened and verified",
            f"{report['sample']['opened']} ({report['sample']['failed']} failed)",
        )
    )
    for role, summary in (report.get("profile") or {}).items():
        busy, idle = summary["busy_samples"], summary["idle_samples"]
        rows.append(
            (
                f"{role} profile ({summary['file']})",
                f"{busy:,} busy samples, {idle:,} idle; busiest by own time:",
            )
        )
        for entry in summary["by_own_time"][:PROFILE_ROWS]:
            rows.append((f"  {entry['share'] * 100:5.1f}%", entry["function"]))
    outage = report.get("outage")
    if outage:
        rows += [
            ("outage (receiver down)", f"{_num(outage['seconds'])} s"),
            ("accepted while down", _num(outage["accepted_while_down"])),
            ("first receipt after restart", f"{_num(outage['resume_after_s'], 2)} s"),
            ("drain envelopes/s", _num(outage["drain_envelopes_per_s"], 0)),
        ]
    floor = report.get("floor")
    if floor:
        rows += [
            ("floor envelopes/s (raw mTLS relay)", _num(floor["envelopes_per_s"], 0)),
            ("floor exactly once", _num(floor["exactly_once"])),
            ("ratio gateway / floor", _num(floor["ratio"], 3)),
        ]
    rows.append(("result", "ok" if report["ok"] else "FAILED"))
    return _lines(rows)


def _lines(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
