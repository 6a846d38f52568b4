"""The federation rules as values: what the loader returns and the evaluator compiles.

Every class is a frozen dataclass. Positions in the YAML (:class:`Mark`) are
carried for explanations but never take part in equality, so two rules files
that differ only in layout or comments compare equal: ``diff`` and the reload
history rely on that.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

RULES_VERSION = 1
WILDCARD = "*"  # in send_to / receive_from: every peer in `peers`
GROUP_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

MAX_PEER_ENDPOINTS = 8  # federation listeners one peer entry may list
PROTOCOL_MAX_ENVELOPE_BYTES = 1_048_576  # the protocol's hard cap; no group may exceed it
MIN_ENVELOPE_BYTES = 1
DEFAULT_MAX_ENVELOPE_BYTES = 65_536
MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 365 * 86_400
DEFAULT_TTL_MIN_SECONDS = 60
DEFAULT_TTL_DEFAULT_SECONDS = 86_400
DEFAULT_TTL_MAX_SECONDS = 7 * 86_400
MIN_KEEP_SECONDS = 86_400  # a group under retention keeps its archive one day at least
MAX_KEEP_SECONDS = 100 * 365 * 86_400
MAX_PREVIOUS_RETENTION_KEYS = 16


class BurnOnRead(enum.StrEnum):
    OPTIONAL = "optional"  # the sender chooses
    REQUIRED = "required"  # every envelope must be burn-on-read
    FORBIDDEN = "forbidden"  # no envelope may be burn-on-read


class Direction(enum.StrEnum):
    OUTBOUND = "outbound"  # a local sender, a recipient at a peer
    INBOUND = "inbound"  # a sender at a peer, a local recipient
    LOCAL = "local"  # both ends in this org


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a rule is written: the file, its 1-based line, and the key path."""

    file: str
    line: int
    path: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class TtlBounds:
    min: int  # seconds
    default: int
    max: int

    def contains(self, seconds: int) -> bool:
        return self.min <= seconds <= self.max


DEFAULT_TTL = TtlBounds(
    DEFAULT_TTL_MIN_SECONDS, DEFAULT_TTL_DEFAULT_SECONDS, DEFAULT_TTL_MAX_SECONDS
)


@dataclass(frozen=True, slots=True)
class Limits:
    """A group's limits. A mark is ``None`` where the value is the default."""

    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    ttl: TtlBounds = DEFAULT_TTL
    burn_on_read: BurnOnRead = BurnOnRead.OPTIONAL
    max_envelope_bytes_mark: Mark | None = field(default=None, compare=False)
    ttl_mark: Mark | None = field(default=None, compare=False)
    burn_on_read_mark: Mark | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class RetentionKey:
    """One of the org's retention public keys (X25519); its secret half is offline."""

    id: str
    public_key: bytes
    mark: Mark | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class OrgRetention:
    """The org-level ``retention:`` section: the key to wrap for, and older ones.

    Envelopes must carry a retention copy for ``key`` or, during a rotation,
    for one of ``previous`` (clients that have not yet fetched the new key).
    The archive keeps the key id with each envelope, so archives made under an
    old key stay openable with that key's secret.
    """

    key: RetentionKey
    previous: tuple[RetentionKey, ...] = ()
    mark: Mark | None = field(default=None, compare=False)

    @property
    def accepted(self) -> tuple[RetentionKey, ...]:
        return (self.key, *self.previous)

    def key_named(self, key_id: str) -> RetentionKey | None:
        """The accepted key (current or previous) with this id, if any."""
        return next((key for key in self.accepted if key.id == key_id), None)

    def accepts(self, key_id: str, public_key: bytes) -> bool:
        """Whether a retention copy for this (id, key) pair may enter the archive."""
        return any(k.id == key_id and k.public_key == public_key for k in self.accepted)


@dataclass(frozen=True, slots=True)
class GroupRetention:
    """A group's ``retention:``: which directions are archived, and for how long."""

    outbound: bool = False  # envelopes its members send carry a retention copy
    inbound: bool = False  # its members acknowledge with a retention copy
    keep: int = 0  # seconds the archive copy is kept
    mark: Mark | None = field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return self.outbound or self.inbound


@dataclass(frozen=True, slots=True)
class Peer:
    """Another org's gateway, as this org's rules describe it."""

    org: str
    # Its federation listeners: one URL, or several nodes of one gateway (tried in
    # turn; the sender keeps using one that works). At least one, at most
    # MAX_PEER_ENDPOINTS.
    endpoints: tuple[str, ...]
    ca_pem: str  # one or more CA certificates (a rollover: old and new), PEM, re-encoded
    ca_sha256: str  # hex SHA-256 of the CA certificates' DER, concatenated: one CA's fingerprint
    pins: tuple[str, ...]  # `sha256/...` SPKI pins; empty: no pinning
    signing_key: bytes  # raw Ed25519 public key of the org's key records
    ca_file: str | None = field(default=None, compare=False)  # the path read, None if inline
    mark: Mark | None = field(default=None, compare=False)

    @property
    def endpoint(self) -> str:
        """The first endpoint: where a peer with one gateway node is reached."""
        return self.endpoints[0]

    @property
    def trust(self) -> tuple[str, tuple[str, ...]]:
        """What a federation connection from this peer was authenticated against."""
        return (self.ca_sha256, self.pins)


@dataclass(frozen=True, slots=True)
class PeerRef:
    """One entry of ``send_to`` or ``receive_from``: ``*``, ``peer`` or ``peer/group``."""

    peer: str  # WILDCARD for every peer
    group: str | None = None  # only in receive_from
    mark: Mark | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return self.peer if self.group is None else f"{self.peer}/{self.group}"


DEFAULT_MEMBER_CLAIM = "groups"
MAX_CLAIM_VALUE_LENGTH = 256


@dataclass(frozen=True, slots=True)
class ClaimMatch:
    """``members_from: {claim: groups, value: legal}``: users whose IdP claim holds ``value``."""

    claim: str
    value: str

    def __str__(self) -> str:
        return f"{self.claim}={self.value}"


@dataclass(frozen=True, slots=True)
class SignInRequirement:
    """``requires: {acr: [...], amr: [...]}``: a session must show one of these.

    Met by a sign-in whose ``acr`` is one of ``acr``, or whose ``amr`` holds one
    of ``amr`` (OpenID Connect Core 2; RFC 8176 names the ``amr`` values).
    """

    acr: tuple[str, ...] = ()
    amr: tuple[str, ...] = ()

    def met_by(self, acr: str | None, amr: tuple[str, ...]) -> bool:
        return (acr is not None and acr in self.acr) or bool(set(amr) & set(self.amr))

    def __str__(self) -> str:
        parts = []
        if self.acr:
            parts.append("acr " + " or ".join(self.acr))
        if self.amr:
            parts.append("amr containing " + " or ".join(self.amr))
        return ", or ".join(parts)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    members: tuple[str, ...]  # normalized user names, in file order
    send_to: tuple[PeerRef, ...] = ()
    receive_from: tuple[PeerRef, ...] = ()
    limits: Limits = field(default_factory=Limits)
    retention: GroupRetention = field(default_factory=GroupRetention)
    mark: Mark | None = field(default=None, compare=False)
    send_to_mark: Mark | None = field(default=None, compare=False)
    receive_from_mark: Mark | None = field(default=None, compare=False)
    # Members from the IdP (gateway.oidc): users signed in with one of these claims.
    members_from: tuple[ClaimMatch, ...] = ()
    # A sign-in strength the group's sessions must show (admin tokens are not sessions).
    requires: SignInRequirement | None = None

    def has_claim_member(self, claims: Mapping[str, frozenset[str]]) -> bool:
        return any(match.value in claims.get(match.claim, ()) for match in self.members_from)

    @property
    def sends_to_every_peer(self) -> bool:
        return any(ref.peer == WILDCARD for ref in self.send_to)

    @property
    def receives_from_every_peer(self) -> bool:
        return any(ref.peer == WILDCARD for ref in self.receive_from)


@dataclass(frozen=True, slots=True)
class Rules:
    """One org's whole federation rules, validated."""

    org: str
    peers: Mapping[str, Peer]
    groups: Mapping[str, Group]
    source: str = field(default="", compare=False)  # the file name marks refer to
    default_mark: Mark | None = field(default=None, compare=False)  # `default: deny`
    ca_files: tuple[str, ...] = field(default=(), compare=False)  # CA files read, for watching
    version: int = RULES_VERSION
    retention: OrgRetention | None = None

    @property
    def member_count(self) -> int:
        return sum(len(group.members) for group in self.groups.values())

    def summary(self) -> str:
        from_idp = sum(1 for group in self.groups.values() if group.members_from)
        idp = f" ({from_idp} with members from IdP claims)" if from_idp else ""
        return (
            f"{_plural(len(self.groups), 'group')}{idp}, {_plural(self.member_count, 'member')}, "
            f"{_plural(len(self.peers), 'peer')}"
        )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
