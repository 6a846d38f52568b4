"""``gateway peers``: every peer's state and spool lane, from the gateway's storage.

One row per peer named in the rules, plus any peer that only storage knows
(a lane or a backoff record left from a peer since removed from the rules).
The figures come from the lane counters the storage keeps (one row per lane)
and the peer-state table, never from counting the spool, so the command
answers at once with a million envelopes waiting. docs/operations.md says
what each column means and what to do about it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.cli._storage import (
    MS_PER_SECOND,
    RulePeers,
    add_common_arguments,
    cell,
    format_age,
    load_admin_config,
    load_rule_peers,
    now_ms,
    render_table,
    run_on_storage,
    warn_rules,
)
from gateway.cli.common import Registrar, set_handler
from gateway.storage.base import LaneStats, PeerState, Storage

if TYPE_CHECKING:
    from gateway.storage.leases import Lease

# The states, in the words the table and --json print.
STATE_UP = "up"  # the last attempt succeeded
STATE_BACKOFF = "backoff"  # the last attempt failed; the sender waits before the next
STATE_NEVER_TRIED = "never-tried"  # no success and no failure recorded yet
STATE_NOT_IN_RULES = "not-in-rules"  # storage knows it, the rules do not: nothing is sent

HEADERS = (
    "PEER",
    "STATE",
    "DRIVEN BY",
    "LAST SUCCESS",
    "BACKOFF UNTIL",
    "FAILURES",
    "SPOOL",
    "OLDEST",
    "LAST ERROR",
)
NONE_SHOWN = "-"


@dataclass(frozen=True, kw_only=True)
class PeerRow:
    """What the command knows about one peer."""

    peer: str
    in_rules: bool | None  # None: the rules could not be read
    state: PeerState | None
    lane: LaneStats | None
    lease: Lease | None = None  # its lane lease: which node drives it, since when

    def driver(self, now_ms: int) -> str | None:
        """The node driving the lane now (its lease is in force), else None."""
        lease = self.lease
        return lease.node if lease is not None and lease.held_at(now_ms) else None

    def status(self, now_ms: int) -> str:
        if self.in_rules is False:
            return STATE_NOT_IN_RULES
        state = self.state
        if state is None:
            return STATE_NEVER_TRIED
        if state.failures > 0 or state.backoff_until_ms > now_ms:
            return STATE_BACKOFF
        if state.last_success_ms is None:
            return STATE_NEVER_TRIED
        return STATE_UP


def peer_rows(
    *,
    rule_peers: RulePeers,
    states: Iterable[PeerState],
    lanes: Mapping[str, LaneStats],
    leases: Iterable[Lease] = (),
) -> list[PeerRow]:
    """One row per peer of the rules, of a lane or of a state, sorted by name."""
    from gateway.storage.leases import lease_peer

    by_peer = {state.peer: state for state in states}
    lane_leases = {peer: lease for lease in leases if (peer := lease_peer(lease.name)) is not None}
    names = set(rule_peers.peers or ()) | set(by_peer) | set(lanes)
    return [
        PeerRow(
            peer=name,
            in_rules=rule_peers.contains(name),
            state=by_peer.get(name),
            lane=lanes.get(name),
            lease=lane_leases.get(name),
        )
        for name in sorted(names)
    ]


def _seconds(ms: int) -> float:
    return ms / MS_PER_SECOND


def row_json(row: PeerRow, now_ms: int) -> dict[str, object]:
    """A row for --json: raw Unix-ms times, plus the ages the table shows, in seconds."""
    state, lane = row.state, row.lane
    last_success = state.last_success_ms if state else None
    backoff_until = state.backoff_until_ms if state else 0
    return {
        "peer": row.peer,
        "state": row.status(now_ms),
        "in_rules": row.in_rules,
        "failures": state.failures if state else 0,
        "last_success_ms": last_success,
        "last_success_age_s": None if last_success is None else _seconds(now_ms - last_success),
        "backoff_until_ms": backoff_until,
        "backoff_remaining_s": max(0.0, _seconds(backoff_until - now_ms)),
        "last_error": state.last_error if state else None,
        "driven_by": row.driver(now_ms),
        "driven_since_ms": row.lease.since_ms if row.driver(now_ms) and row.lease else None,
        "lease_until_ms": row.lease.until_ms if row.lease else None,
        "spool_depth": lane.depth if lane else 0,
        "spool_bytes": lane.bytes if lane else 0,
        "oldest_spooled_ms": lane.oldest_spooled_ms if lane else None,
        "oldest_created_ms": lane.oldest_created_ms if lane else None,
        "oldest_age_s": None if lane is None else _seconds(now_ms - lane.oldest_spooled_ms),
    }


def row_cells(row: PeerRow, now_ms: int) -> list[str]:
    state, lane = row.state, row.lane
    failures = state.failures if state else 0
    if state is None or state.last_success_ms is None:
        last_success = "never"
    else:
        last_success = format_age(_seconds(now_ms - state.last_success_ms)) + " ago"
    if state is not None and state.backoff_until_ms > now_ms:
        backoff = "in " + format_age(_seconds(state.backoff_until_ms - now_ms))
    elif failures > 0:
        backoff = "due"  # the backoff has run out: the sender tries at its next poll
    else:
        backoff = NONE_SHOWN
    # An error from before the last success would only mislead: shown while failing.
    error = state.last_error if state is not None and failures > 0 else None
    driver = row.driver(now_ms)
    if driver is not None and row.lease is not None:
        driven = f"{cell(driver)} ({format_age(_seconds(now_ms - row.lease.since_ms))})"
    else:
        driven = "nobody" if row.in_rules else NONE_SHOWN
    return [
        cell(row.peer),
        row.status(now_ms),
        driven,
        last_success,
        backoff,
        str(failures),
        str(lane.depth) if lane else "0",
        format_age(_seconds(now_ms - lane.oldest_spooled_ms)) if lane else NONE_SHOWN,
        cell(error) if error else NONE_SHOWN,
    ]


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "peers",
        help="each peer's state, backoff and spool lane",
        description="One row per peer of the rules, and per peer that only storage knows: "
        "its state (up, backoff, never-tried, not-in-rules), the gateway node driving its "
        "lane and since when, last success, backoff, "
        "consecutive failures, spool depth, age of its oldest spooled envelope and last "
        "error. Reads the gateway's storage; safe while the gateway runs.",
    )
    add_common_arguments(parser)
    set_handler(parser, run_peers)


def run_peers(args: argparse.Namespace) -> int:
    config = load_admin_config(args.config)
    rule_peers = load_rule_peers(config)
    warn_rules(rule_peers)

    async def read(
        store: Storage,
    ) -> tuple[list[PeerState], dict[str, LaneStats], list[Lease]]:
        return await store.peer_states(), await store.spool_stats(), await store.leases_list()

    states, lanes, leases = run_on_storage(config, read)
    at = now_ms()
    rows = peer_rows(rule_peers=rule_peers, states=states, lanes=lanes, leases=leases)
    if args.json:
        print(json.dumps([row_json(row, at) for row in rows], indent=2))
        return 0
    if not rows:
        print(f"no peers: the rules name none and storage holds no lane ({config.rules})")
        return 0
    for line in render_table(HEADERS, (row_cells(row, at) for row in rows)):
        print(line)
    return 0
