"""``gateway nodes``: the gateway nodes sharing this gateway's database, and what each holds.

One row per node that has beaten in the database (gateway.cluster): live or
not, its version, the SHA-256 of the rules it has in force, how long ago it
beat, since when it runs, how many peers' lanes it drives and whether it runs
the org's sweepers, and (PostgreSQL) its clock's offset from the database
server's. Reads the storage; safe while the nodes run. docs/operations.md,
"Several nodes, one org", says what to look for.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.cli._storage import (
    MS_PER_SECOND,
    add_common_arguments,
    cell,
    format_age,
    load_admin_config,
    now_ms,
    render_table,
    run_on_storage,
)
from gateway.cli.common import Registrar, set_handler
from gateway.storage.base import Storage

if TYPE_CHECKING:
    from gateway.storage.leases import Lease, NodeRecord

HEADERS = ("NODE", "STATE", "VERSION", "RULES", "LAST BEAT", "UP FOR", "LANES", "SWEEPER", "CLOCK")
STATE_LIVE = "live"
STATE_GONE = "gone"  # no beat within a lease's validity: dead, or cut off from the database
RULES_SHOWN = 12  # hex digits of a rules hash in the table


@dataclass(frozen=True, kw_only=True)
class NodeView:
    """One node as the command shows it."""

    record: NodeRecord
    live: bool
    lanes: tuple[str, ...]  # peers whose lane it drives now
    sweeper: bool
    rules_match_file: bool | None  # None: this config's rules file could not be read

    def json(self, now: int) -> dict[str, object]:
        node = self.record
        return {
            "node": node.node,
            "state": STATE_LIVE if self.live else STATE_GONE,
            "version": node.version,
            "rules_sha256": node.rules_sha256,
            "rules_match_file": self.rules_match_file,
            "beat_ms": node.beat_ms,
            "beat_age_s": (now - node.beat_ms) / MS_PER_SECOND,
            "started_ms": node.started_ms,
            "lanes": list(self.lanes),
            "sweeper": self.sweeper,
            "clock_offset_ms": node.skew_ms,
        }

    def cells(self, now: int, *, majority: str | None) -> list[str]:
        node = self.record
        marks = []
        if self.rules_match_file is False:
            marks.append("not this file")
        if majority is not None and node.rules_sha256 != majority:
            marks.append("differs")
        return [
            cell(node.node),
            STATE_LIVE if self.live else STATE_GONE,
            cell(node.version),
            node.rules_sha256[:RULES_SHOWN] + (f" ({', '.join(marks)})" if marks else ""),
            format_age((now - node.beat_ms) / MS_PER_SECOND) + " ago",
            format_age((node.beat_ms - node.started_ms) / MS_PER_SECOND),
            str(len(self.lanes)),
            "yes" if self.sweeper else "-",
            "-" if node.skew_ms is None else f"{node.skew_ms:+d} ms",
        ]


def node_views(
    nodes: Iterable[NodeRecord],
    leases: Sequence[Lease],
    *,
    now: int,
    valid_ms: int,
    file_sha256: str | None,
) -> list[NodeView]:
    from gateway.storage.leases import SWEEPER_LEASE, lease_peer

    views = []
    for node in nodes:
        held = [
            lease for lease in leases if lease.owned_by(node.incarnation) and lease.held_at(now)
        ]
        views.append(
            NodeView(
                record=node,
                live=node.live_at(now, valid_ms),
                lanes=tuple(
                    sorted(p for lease in held if (p := lease_peer(lease.name)) is not None)
                ),
                sweeper=any(x.name == SWEEPER_LEASE for x in held),
                rules_match_file=None if file_sha256 is None else node.rules_sha256 == file_sha256,
            )
        )
    return views


def majority_rules(views: Iterable[NodeView]) -> str | None:
    """The rules hash most live nodes have, when the live nodes disagree; else None."""
    counts = collections.Counter(view.record.rules_sha256 for view in views if view.live)
    if len(counts) < 2:
        return None
    return counts.most_common(1)[0][0]


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "nodes",
        help="the gateway nodes sharing this database: live or not, rules, lanes",
        description="One row per gateway node that has beaten in this gateway's database: "
        "live or gone, version, SHA-256 of the rules in force (marked when it differs from "
        "the other nodes' or from this config's rules file), last beat, uptime, lanes it "
        "drives, whether it runs the sweepers, and its clock's offset from the database "
        "(PostgreSQL). Safe while the gateway runs.",
    )
    add_common_arguments(parser)
    set_handler(parser, run_nodes)


def run_nodes(args: argparse.Namespace) -> int:
    from gateway.cluster import Timing

    config = load_admin_config(args.config)
    valid_ms = Timing.of(config.limits.lease_time).valid_ms
    try:
        file_sha256: str | None = hashlib.sha256(config.rules.read_bytes()).hexdigest()
    except OSError:
        file_sha256 = None

    async def read(store: Storage) -> tuple[list[NodeRecord], list[Lease]]:
        return await store.nodes_list(), await store.leases_list()

    nodes, leases = run_on_storage(config, read)
    at = now_ms()
    views = node_views(nodes, leases, now=at, valid_ms=valid_ms, file_sha256=file_sha256)
    if args.json:
        print(json.dumps([view.json(at) for view in views], indent=2))
        return 0
    if not views:
        print("no nodes: no gateway has run on this database yet")
        return 0
    majority = majority_rules(views)
    for line in render_table(HEADERS, (view.cells(at, majority=majority) for view in views)):
        print(line)
    return 0
