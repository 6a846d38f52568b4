"""What changes in effect between two rules: reach, peers, members, limits.

Reach is compared *in effect*: ``"*"`` stands for the peers of its own file,
and a ``peer/group`` entry beside a whole ``peer`` adds nothing. So replacing
``send_to: ["*"]`` with the full list of peers is no change, and adding a
peer to a file where a group has ``"*"`` is a gain of reach for that group.
Layout, comments and the order of entries are never a change.

``format_diff`` renders one line per change, in a fixed order (org, peers,
groups, reach, members, limits, retention), each starting with ``+`` (gained or added),
``-`` (lost or removed) or ``~`` (changed). docs/rules.md shows how to read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.durations import format_duration, format_period
from gateway.core.rules.model import (
    Direction,
    Group,
    GroupRetention,
    Limits,
    OrgRetention,
    Peer,
    Rules,
)


@dataclass(frozen=True, slots=True, order=True)
class ReachChange:
    group: str
    direction: Direction  # outbound: the group may send to; inbound: may receive from
    peer: str  # a peer org, or `peer/group` for inbound
    gained: bool


@dataclass(frozen=True, slots=True, order=True)
class Change:
    """A field that changed: of a peer (``subject`` = org) or of a group's limits."""

    subject: str
    field: str
    old: str
    new: str


@dataclass(frozen=True, slots=True, order=True)
class MemberMove:
    user: str
    old_group: str | None  # None: the user is new
    new_group: str | None  # None: the user is gone


@dataclass(frozen=True, slots=True)
class RulesDiff:
    org: tuple[str, str] | None
    peers_added: tuple[str, ...]
    peers_removed: tuple[str, ...]
    peers_changed: tuple[Change, ...]
    groups_added: tuple[str, ...]
    groups_removed: tuple[str, ...]
    reach: tuple[ReachChange, ...]
    members: tuple[MemberMove, ...]
    limits: tuple[Change, ...]
    # Of the org's retention keys (subject "org") and of each group's retention.
    retention: tuple[Change, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(
            self.org
            or self.peers_added
            or self.peers_removed
            or self.peers_changed
            or self.groups_added
            or self.groups_removed
            or self.reach
            or self.members
            or self.limits
            or self.retention
        )


def outbound_reach(group: Group, peers: frozenset[str]) -> frozenset[str]:
    """The peers ``group`` may send to, ``"*"`` expanded over ``peers``."""
    if group.sends_to_every_peer:
        return peers
    return frozenset(ref.peer for ref in group.send_to)


def inbound_reach(group: Group, peers: frozenset[str]) -> frozenset[str]:
    """What ``group`` may receive from: peer orgs, and ``peer/group`` where not the whole peer."""
    if group.receives_from_every_peer:
        return peers
    whole = frozenset(ref.peer for ref in group.receive_from if ref.group is None)
    partial = frozenset(
        str(ref) for ref in group.receive_from if ref.group is not None and ref.peer not in whole
    )
    return whole | partial


def diff_rules(old: Rules, new: Rules) -> RulesDiff:
    old_peers = frozenset(old.peers)
    new_peers = frozenset(new.peers)
    peers_changed = [
        change
        for org in sorted(old_peers & new_peers)
        for change in _peer_changes(old.peers[org], new.peers[org])
    ]

    reach: list[ReachChange] = []
    for name in sorted(set(old.groups) | set(new.groups)):
        before, after = old.groups.get(name), new.groups.get(name)
        for direction, reach_of in (
            (Direction.OUTBOUND, outbound_reach),
            (Direction.INBOUND, inbound_reach),
        ):
            was = reach_of(before, old_peers) if before is not None else frozenset()
            now = reach_of(after, new_peers) if after is not None else frozenset()
            # Losses before gains, as diff(1) shows the old line before the new one.
            reach.extend(ReachChange(name, direction, peer, False) for peer in sorted(was - now))
            reach.extend(ReachChange(name, direction, peer, True) for peer in sorted(now - was))

    old_members = {user: group.name for group in old.groups.values() for user in group.members}
    new_members = {user: group.name for group in new.groups.values() for user in group.members}
    members = [
        MemberMove(user, old_members.get(user), new_members.get(user))
        for user in sorted(set(old_members) | set(new_members))
        if old_members.get(user) != new_members.get(user)
    ]

    limits = [
        change
        for name in sorted(set(old.groups) & set(new.groups))
        for change in _limit_changes(name, old.groups[name].limits, new.groups[name].limits)
    ]
    retention = _org_retention_changes(old.retention, new.retention) + [
        change
        for name in sorted(set(old.groups) & set(new.groups))
        for change in _group_retention_changes(
            name, old.groups[name].retention, new.groups[name].retention
        )
    ]
    return RulesDiff(
        retention=tuple(retention),
        org=(old.org, new.org) if old.org != new.org else None,
        peers_added=tuple(sorted(new_peers - old_peers)),
        peers_removed=tuple(sorted(old_peers - new_peers)),
        peers_changed=tuple(peers_changed),
        groups_added=tuple(sorted(set(new.groups) - set(old.groups))),
        groups_removed=tuple(sorted(set(old.groups) - set(new.groups))),
        reach=tuple(reach),
        members=tuple(members),
        limits=tuple(limits),
    )


def _peer_changes(old: Peer, new: Peer) -> list[Change]:
    changes = []
    if old.endpoints != new.endpoints:
        changes.append(
            Change(old.org, "endpoint", ", ".join(old.endpoints), ", ".join(new.endpoints))
        )
    if old.ca_sha256 != new.ca_sha256:
        changes.append(
            Change(old.org, "ca", f"sha256:{old.ca_sha256[:16]}", f"sha256:{new.ca_sha256[:16]}")
        )
    if old.pins != new.pins:
        changes.append(
            Change(
                old.org, "pins", "[" + ", ".join(old.pins) + "]", "[" + ", ".join(new.pins) + "]"
            )
        )
    if old.signing_key != new.signing_key:
        changes.append(Change(old.org, "signing_key", "(old key)", "(new key)"))
    return changes


def _limit_changes(group: str, old: Limits, new: Limits) -> list[Change]:
    changes = []
    if old.max_envelope_bytes != new.max_envelope_bytes:
        changes.append(
            Change(
                group,
                "max_envelope_bytes",
                str(old.max_envelope_bytes),
                str(new.max_envelope_bytes),
            )
        )
    for key in ("min", "default", "max"):
        before, after = getattr(old.ttl, key), getattr(new.ttl, key)
        if before != after:
            changes.append(
                Change(group, f"ttl.{key}", format_duration(before), format_duration(after))
            )
    if old.burn_on_read != new.burn_on_read:
        changes.append(
            Change(group, "burn_on_read", old.burn_on_read.value, new.burn_on_read.value)
        )
    return changes


def _org_retention_changes(old: OrgRetention | None, new: OrgRetention | None) -> list[Change]:
    def key_text(retention: OrgRetention | None) -> str:
        return "(none)" if retention is None else retention.key.id

    def previous_text(retention: OrgRetention | None) -> str:
        return "[" + ", ".join(k.id for k in retention.previous) + "]" if retention else "[]"

    changes = []
    old_key = old.key if old is not None else None
    new_key = new.key if new is not None else None
    if old_key != new_key:
        same_id = key_text(old) == key_text(new)
        shown = f"{key_text(new)} (another public key)" if same_id else key_text(new)
        changes.append(Change("org", "key", key_text(old), shown))
    if previous_text(old) != previous_text(new):
        changes.append(Change("org", "previous", previous_text(old), previous_text(new)))
    return changes


def _group_retention_changes(group: str, old: GroupRetention, new: GroupRetention) -> list[Change]:
    changes = []
    for key in ("outbound", "inbound"):
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            changes.append(
                Change(group, key, "required" if before else "off", "required" if after else "off")
            )
    if old.keep != new.keep:
        changes.append(
            Change(
                group,
                "keep",
                format_period(old.keep) if old.keep else "(none)",
                format_period(new.keep) if new.keep else "(none)",
            )
        )
    return changes


def format_diff(diff: RulesDiff) -> list[str]:
    """One line per change; an empty list when nothing differs in effect."""
    lines: list[str] = []
    if diff.org is not None:
        lines.append(f"~ org {diff.org[0]} -> {diff.org[1]}")
    lines.extend(f"+ peer {org}" for org in diff.peers_added)
    lines.extend(f"- peer {org}" for org in diff.peers_removed)
    lines.extend(f"~ peer {c.subject}: {c.field} {c.old} -> {c.new}" for c in diff.peers_changed)
    lines.extend(f"+ group {name}" for name in diff.groups_added)
    lines.extend(f"- group {name}" for name in diff.groups_removed)
    for change in diff.reach:
        sign = "+" if change.gained else "-"
        arrow = "->" if change.direction is Direction.OUTBOUND else "<-"
        lines.append(f"{sign} {change.direction.value} {change.group} {arrow} {change.peer}")
    for move in diff.members:
        if move.old_group is None:
            lines.append(f"+ member {move.user}: {move.new_group}")
        elif move.new_group is None:
            lines.append(f"- member {move.user}: {move.old_group}")
        else:
            lines.append(f"~ member {move.user}: {move.old_group} -> {move.new_group}")
    lines.extend(f"~ limits {c.subject}: {c.field} {c.old} -> {c.new}" for c in diff.limits)
    lines.extend(f"~ retention {c.subject}: {c.field} {c.old} -> {c.new}" for c in diff.retention)
    return lines
