"""Policy decisions: may this envelope go out, or come in? Pure, and O(1) per decision.

:class:`CompiledRules` is built once from validated :class:`Rules` and never
changes (a reload builds a new one and swaps it in whole). Building it turns
the rules into indexes: user -> group, and per group the peers it may send to
and the peers and peer groups it may receive from, each as a dict whose
values are *prepared* allow decisions. A decision is then a handful of dict
lookups and integer comparisons, the same whatever the size of the rules, and
an allowed envelope allocates nothing. Denials are built when they happen,
with a human-readable detail for logs and ``gateway rules explain``.

The order of checks is fixed, so the reason of a denial is predictable:

* outbound: sender is ours -> sender has a group -> (recipient ours: recipient
  exists, a *local* decision) -> recipient's org is a peer -> the group may
  send to it -> the sender group's limits;
* inbound: origin is a peer -> sender belongs to the origin -> recipient is
  ours -> recipient exists -> the recipient's group may receive from the
  origin (whole, or the group it asserts) -> the recipient group's limits.

Limits are checked in the order size, TTL, burn-on-read.

Retention (docs/retention.md) is one more question, asked by the origin
gateway about an envelope the decision above allowed: if the sender's group is
under outbound retention, the envelope must carry a retention copy for the
org's current retention key or one of its previous keys
(:meth:`CompiledRules.decide_retention`).

What a peer is told is not always the reason: to a peer, one of our users
whose group does not receive from it (nor from any of its groups) is
indistinguishable from a user who does not exist. :func:`reason_for_peer`
turns an inbound ``peer_not_allowed`` into ``recipient_unknown`` for the
answer, and :meth:`CompiledRules.visible_to` says which users a peer may see
at all (the key directory). Logs, metrics, the audit log and ``gateway rules
explain`` keep the real reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.core.address import Address
from gateway.core.durations import format_duration, format_period
from gateway.core.envelope import RetentionWrap
from gateway.core.rules.model import (
    WILDCARD,
    BurnOnRead,
    Direction,
    Group,
    GroupRetention,
    Mark,
    Peer,
    Rules,
)
from gateway.core.yamlmarks import paused_gc
from gateway.errors import Reason


class IdPMembers(Protocol):
    """Who the IdP says a user is: the claim values of their last sign-in (gateway.oidc).

    A plain lookup (no I/O): the sign-in service keeps it up to date. Users
    named in ``members`` never reach it.
    """

    def claims_of(self, user: str) -> Mapping[str, frozenset[str]]: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one question, with the reason and the rule that gave it."""

    allowed: bool
    reason: Reason
    direction: Direction
    group: str | None  # the local group whose rules applied (the sender's, or the recipient's)
    peer: str | None  # the remote org, for outbound and inbound
    rule: Mark | None  # where the deciding rule is written; None when no rule applies
    detail: str  # one human-readable sentence, for logs and `explain`; never sent to a peer


class _GroupIndex:
    """One group's rules, as lookups. Built once by CompiledRules."""

    __slots__ = (
        "burn_forbidden",
        "burn_required",
        "group",
        "local_allowed",
        "max_bytes",
        "peers_heard",
        "receive",
        "receive_all",
        "receive_all_mark",
        "receive_groups",
        "send",
        "send_all",
        "send_all_mark",
        "ttl_max",
        "ttl_min",
    )

    def __init__(self, group: Group) -> None:
        self.group = group
        limits = group.limits
        self.max_bytes = limits.max_envelope_bytes
        self.ttl_min = limits.ttl.min
        self.ttl_max = limits.ttl.max
        self.burn_required = limits.burn_on_read is BurnOnRead.REQUIRED
        self.burn_forbidden = limits.burn_on_read is BurnOnRead.FORBIDDEN
        name = group.name
        self.send: dict[str, Decision] = {}
        self.send_all = False
        self.send_all_mark: Mark | None = None
        for ref in group.send_to:
            if ref.peer == WILDCARD:
                self.send_all, self.send_all_mark = True, ref.mark
            else:
                self.send[ref.peer] = Decision(
                    True,
                    Reason.ALLOWED,
                    Direction.OUTBOUND,
                    name,
                    ref.peer,
                    ref.mark,
                    f"group {name} may send to {ref.peer}",
                )
        self.receive: dict[str, Decision] = {}
        self.receive_groups: dict[tuple[str, str], Decision] = {}
        self.receive_all = False
        self.receive_all_mark: Mark | None = None
        # The peers this group hears from at all, whole or through one of their groups
        # ("*" is receive_all).
        self.peers_heard = frozenset(ref.peer for ref in group.receive_from if ref.peer != WILDCARD)
        for ref in group.receive_from:
            if ref.peer == WILDCARD:
                self.receive_all, self.receive_all_mark = True, ref.mark
            elif ref.group is None:
                self.receive[ref.peer] = Decision(
                    True,
                    Reason.ALLOWED,
                    Direction.INBOUND,
                    name,
                    ref.peer,
                    ref.mark,
                    f"group {name} may receive from {ref.peer}",
                )
            else:
                self.receive_groups[(ref.peer, ref.group)] = Decision(
                    True,
                    Reason.ALLOWED,
                    Direction.INBOUND,
                    name,
                    ref.peer,
                    ref.mark,
                    f"group {name} may receive from group {ref.group} of {ref.peer}",
                )
        self.local_allowed = Decision(
            True,
            Reason.ALLOWED,
            Direction.LOCAL,
            name,
            None,
            group.mark,
            "both users are in the rules: delivery inside the org is allowed",
        )

    def star_send(self, peer: str) -> Decision:
        # Built on first use and kept: bounded by the number of peers.
        decision = Decision(
            True,
            Reason.ALLOWED,
            Direction.OUTBOUND,
            self.group.name,
            peer,
            self.send_all_mark,
            f'group {self.group.name} may send to every peer ("*"), {peer} included',
        )
        self.send[peer] = decision
        return decision

    def star_receive(self, peer: str) -> Decision:
        decision = Decision(
            True,
            Reason.ALLOWED,
            Direction.INBOUND,
            self.group.name,
            peer,
            self.receive_all_mark,
            f'group {self.group.name} may receive from every peer ("*"), {peer} included',
        )
        self.receive[peer] = decision
        return decision


class CompiledRules:
    """Validated rules turned into indexes; answers policy questions in O(1)."""

    __slots__ = (
        "_by_user",
        "_claim_groups",
        "_default_mark",
        "_groups",
        "_idp_members",
        "org",
        "rules",
    )

    def __init__(self, rules: Rules, *, idp_members: IdPMembers | None = None) -> None:
        """``idp_members`` answers for users not named in ``members``: their group is
        the one whose ``members_from`` their claims match (exactly one; two is
        no group, a conflict the sign-in already refused)."""
        self.rules = rules
        self._idp_members = idp_members
        self.org = rules.org
        self._default_mark = rules.default_mark
        self._by_user: dict[str, _GroupIndex] = {}
        with paused_gc():  # hundreds of thousands of objects that all stay: no use collecting
            self._groups = {name: _GroupIndex(group) for name, group in rules.groups.items()}
            for index in self._groups.values():
                for user in index.group.members:
                    self._by_user[user] = index
        self._claim_groups = tuple(g for g in rules.groups.values() if g.members_from)

    # -- lookups ---------------------------------------------------------------------
    @property
    def peers(self) -> Mapping[str, Peer]:
        return self.rules.peers

    def peer(self, org: str) -> Peer | None:
        return self.rules.peers.get(org)

    def _index(self, user: str) -> _GroupIndex | None:
        index = self._by_user.get(user)
        if index is not None or self._idp_members is None or not self._claim_groups:
            return index
        claims = self._idp_members.claims_of(user)
        if not claims:
            return None
        found = [group for group in self._claim_groups if group.has_claim_member(claims)]
        return self._groups[found[0].name] if len(found) == 1 else None

    def group_of(self, user: str) -> Group | None:
        index = self._index(user)
        return None if index is None else index.group

    def group(self, name: str) -> Group | None:
        return self.rules.groups.get(name)

    def groups_for(self, user: str, claims: Mapping[str, frozenset[str]]) -> tuple[Group, ...]:
        """Every group ``user`` is in: named in ``members``, or by an IdP claim (``members_from``).

        ``claims`` maps a claim name to the values the user's sign-in showed.
        More than one group is a conflict, which the caller reports (a user is
        in one group at most); the static group, if any, comes first.
        """
        static = self.group_of(user)
        found = [static] if static is not None else []
        for group in self._claim_groups:
            if group is not static and group.has_claim_member(claims):
                found.append(group)
        return tuple(found)

    def visible_to(self, user: str, peer: str) -> bool:
        """May ``peer`` learn that local ``user`` exists (see the module docstring)?

        Yes when the user's group receives from that peer: whole, from one of
        its groups, or from every peer (``*``). The question carries no group
        of the peer's, so a ``receive_from`` entry for any of its groups shows
        the user to the whole peer gateway (which asks for all its users).
        """
        index = self._index(user)
        if index is None or peer not in self.rules.peers:
            return False
        return index.receive_all or peer in index.peers_heard

    def default_ttl(self, group: str) -> int:
        """The default TTL in seconds of the group named ``group``; ``KeyError`` if none."""
        return self.rules.groups[group].limits.ttl.default

    def retention_of(self, group: str | None) -> GroupRetention:
        """The retention of the group named ``group`` (none for an unknown group)."""
        found = self.rules.groups.get(group) if group is not None else None
        return found.retention if found is not None else GroupRetention()

    def retention_note(self, decision: Decision) -> str | None:
        """What retention does to an envelope ``decision`` concerns, for ``explain``."""
        retention = self.retention_of(decision.group)
        org = self.rules.retention
        applies = (
            retention.inbound if decision.direction is Direction.INBOUND else retention.outbound
        )
        if decision.group is None or not applies or org is None:
            return None
        inbound = decision.direction is Direction.INBOUND
        side, which = ("acknowledged", "inbound") if inbound else ("sent", "outbound")
        return (
            f"group {decision.group} is under {which} "
            f"retention: each envelope {side} carries its content key wrapped for retention key "
            f"{org.key.id}; the archive copy is kept {format_period(retention.keep)}, whatever "
            "burn-on-read and the TTL say (they apply to the mailbox copy only)"
        )

    # -- decisions ---------------------------------------------------------------------
    def decide_retention(self, allowed: Decision, retention: RetentionWrap | None) -> Decision:
        """``allowed`` (outbound or local), or its refusal for the sender group's retention.

        A group under outbound retention sends only envelopes with a retention
        copy for the org's current retention key or one of its previous keys,
        named by id and key both. Other decisions are returned as they are.
        """
        if not allowed.allowed or allowed.direction is Direction.INBOUND:
            return allowed
        group = self.rules.groups.get(allowed.group) if allowed.group is not None else None
        if group is None or not group.retention.outbound:
            return allowed
        org = self.rules.retention
        if retention is None:
            current = f" for key {org.key.id}" if org is not None else ""
            return _deny(
                Reason.RETENTION_REQUIRED,
                allowed.direction,
                group.name,
                allowed.peer,
                group.retention.mark,
                f"group {group.name} is under outbound retention: an envelope needs "
                f"version 2 and a retention copy{current}",
            )
        if org is None or not org.accepts(retention.key_id, retention.public_key):
            known = ", ".join(key.id for key in org.accepted) if org is not None else "none"
            return _deny(
                Reason.RETENTION_KEY_UNKNOWN,
                allowed.direction,
                group.name,
                allowed.peer,
                org.mark if org is not None else group.retention.mark,
                f"retention key {retention.key_id!r} (with that public key) is not a retention "
                f"key of the rules (current and previous: {known})",
            )
        return allowed

    def decide_recipient_retention(
        self, allowed: Decision, recipient: Address, *, version: int
    ) -> Decision:
        """``allowed``, or its refusal because a local recipient's group is under inbound retention.

        Such a group acknowledges each envelope with a retention copy of its
        content key, which only a version 2 envelope has: a version 1 envelope
        cannot be retained, so it is refused (``retention_required``).
        """
        if not allowed.allowed or recipient.org != self.org or version != 1:
            return allowed
        index = self._by_user.get(recipient.user)
        if index is None or not index.group.retention.inbound:
            return allowed
        group = index.group
        return _deny(
            Reason.RETENTION_REQUIRED,
            allowed.direction,
            group.name,
            allowed.peer,
            group.retention.mark,
            f"group {group.name} is under inbound retention: it receives version 2 "
            "envelopes only (it acknowledges each with a retention copy of its content key)",
        )

    def decide_outbound(
        self,
        sender: Address,
        recipient: Address,
        *,
        size: int,
        ttl_seconds: int,
        burn_on_read: bool,
    ) -> Decision:
        """May local ``sender`` send to ``recipient`` (at a peer, or local)?"""
        if sender.org != self.org:
            return _deny(
                Reason.SENDER_NOT_ORIGIN,
                Direction.OUTBOUND,
                None,
                None,
                None,
                f"{sender} is not a user of {self.org}",
            )
        index = self._index(sender.user)
        if index is None:
            return _deny(
                Reason.NO_GROUP,
                Direction.OUTBOUND,
                None,
                None,
                self._default_mark,
                f"{sender.user} is in no group: nothing is allowed for them (default: deny)",
            )
        if recipient.org == self.org:
            if self._index(recipient.user) is None:
                return _deny(
                    Reason.RECIPIENT_UNKNOWN,
                    Direction.LOCAL,
                    index.group.name,
                    None,
                    self._default_mark,
                    f"{recipient.user} is in no group of {self.org}",
                )
            allowed = index.local_allowed
        else:
            peer = recipient.org
            found = index.send.get(peer)
            if found is None:
                if peer not in self.rules.peers:
                    return _deny(
                        Reason.UNKNOWN_PEER,
                        Direction.OUTBOUND,
                        index.group.name,
                        peer,
                        self._default_mark,
                        f"{peer} is not a peer in the rules (default: deny)",
                    )
                if not index.send_all:
                    group = index.group
                    return _deny(
                        Reason.PEER_NOT_ALLOWED,
                        Direction.OUTBOUND,
                        group.name,
                        peer,
                        group.send_to_mark or group.mark,
                        f"group {group.name} has no send_to entry for {peer}",
                    )
                found = index.star_send(peer)
            allowed = found
        if (
            size > index.max_bytes
            or not index.ttl_min <= ttl_seconds <= index.ttl_max
            or (index.burn_required and not burn_on_read)
            or (index.burn_forbidden and burn_on_read)
        ):
            return _limit_denial(index, allowed, size, ttl_seconds, burn_on_read)
        return allowed

    def decide_inbound(
        self,
        origin: str,
        sender: Address,
        recipient: Address,
        *,
        asserted_group: str | None,
        size: int,
        ttl_seconds: int,
        burn_on_read: bool,
    ) -> Decision:
        """May an envelope from peer ``origin`` (its ``sender``) reach local ``recipient``?"""
        if origin not in self.rules.peers:
            return _deny(
                Reason.UNKNOWN_PEER,
                Direction.INBOUND,
                None,
                origin,
                self._default_mark,
                f"{origin} is not a peer in the rules (default: deny)",
            )
        if sender.org != origin:
            return _deny(
                Reason.SENDER_NOT_ORIGIN,
                Direction.INBOUND,
                None,
                origin,
                None,
                f"{sender} is not a user of {origin}, which sent the envelope",
            )
        if recipient.org != self.org:
            return _deny(
                Reason.RECIPIENT_NOT_LOCAL,
                Direction.INBOUND,
                None,
                origin,
                None,
                f"{recipient} is not a user of {self.org}",
            )
        index = self._index(recipient.user)
        if index is None:
            return _deny(
                Reason.RECIPIENT_UNKNOWN,
                Direction.INBOUND,
                None,
                origin,
                self._default_mark,
                f"{recipient.user} is in no group of {self.org}",
            )
        allowed = index.receive.get(origin)
        if allowed is None and asserted_group is not None:
            allowed = index.receive_groups.get((origin, asserted_group))
        if allowed is None:
            if not index.receive_all:
                group = index.group
                asserted = f" (group {asserted_group})" if asserted_group is not None else ""
                return _deny(
                    Reason.PEER_NOT_ALLOWED,
                    Direction.INBOUND,
                    group.name,
                    origin,
                    group.receive_from_mark or group.mark,
                    f"group {group.name} has no receive_from entry for {origin}{asserted}",
                )
            allowed = index.star_receive(origin)
        if (
            size > index.max_bytes
            or not index.ttl_min <= ttl_seconds <= index.ttl_max
            or (index.burn_required and not burn_on_read)
            or (index.burn_forbidden and burn_on_read)
        ):
            return _limit_denial(index, allowed, size, ttl_seconds, burn_on_read)
        return allowed


def reason_for_peer(decision: Decision) -> Reason:
    """The reason code a peer is answered for an inbound ``decision``.

    A recipient whose group does not receive from the peer is answered as if
    it did not exist: ``recipient_unknown``, never ``peer_not_allowed``.
    """
    if decision.reason is Reason.PEER_NOT_ALLOWED and decision.direction is Direction.INBOUND:
        return Reason.RECIPIENT_UNKNOWN
    return decision.reason


def _deny(
    reason: Reason,
    direction: Direction,
    group: str | None,
    peer: str | None,
    rule: Mark | None,
    detail: str,
) -> Decision:
    return Decision(False, reason, direction, group, peer, rule, detail)


def _limit_denial(
    index: _GroupIndex, allowed: Decision, size: int, ttl_seconds: int, burn_on_read: bool
) -> Decision:
    group = index.group
    limits = group.limits
    fallback = (
        Mark(group.mark.file, group.mark.line, f"{group.mark.path} (default limits)")
        if group.mark is not None
        else None
    )
    if size > index.max_bytes:
        reason = Reason.TOO_LARGE
        rule = limits.max_envelope_bytes_mark or fallback
        detail = f"{size} bytes is over max_envelope_bytes {index.max_bytes} of group {group.name}"
    elif not index.ttl_min <= ttl_seconds <= index.ttl_max:
        reason = Reason.TTL_OUT_OF_BOUNDS
        rule = limits.ttl_mark or fallback
        shown = format_duration(ttl_seconds) if ttl_seconds >= 0 else f"{ttl_seconds}s"
        detail = (
            f"ttl {shown} is outside [{format_duration(index.ttl_min)}, "
            f"{format_duration(index.ttl_max)}] of group {group.name}"
        )
    elif index.burn_required:
        reason = Reason.BURN_ON_READ_REQUIRED
        rule = limits.burn_on_read_mark or fallback
        detail = f"group {group.name} requires burn-on-read"
    else:
        reason = Reason.BURN_ON_READ_FORBIDDEN
        rule = limits.burn_on_read_mark or fallback
        detail = f"group {group.name} forbids burn-on-read"
    return Decision(False, reason, allowed.direction, group.name, allowed.peer, rule, detail)
