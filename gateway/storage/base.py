"""The storage interface: one ``typing.Protocol`` and the frozen values it trades in.

Services (sender, receiver, client API, sweeper, admin commands) depend on
:class:`Storage` only; engines implement it. Every engine must keep these
promises, and the shared tests check them:

Durability
    A write method returns only after its effect is durable (committed and
    synced). A crash after it returns loses nothing; a crash before it returns
    either applied all of that call or none of it.

Spool (outbound, one lane per peer)
    Lane order is insertion order. :meth:`Storage.spool_take` does *not* remove:
    entries leave the spool on the peer's answer (:meth:`Storage.spool_complete`),
    on expiry, or by an admin purge. A crash between sending and the answer
    therefore re-sends, and the receiver's dedup makes that harmless. An envelope
    id that was already spooled or already has a delivery status is not spooled
    again.

Mailboxes (inbound, one per local user)
    :meth:`Storage.deliver` is the receiver's one atomic commit: the accepted
    envelopes go in, and the transaction's answer is recorded, together. An
    envelope id accepted before (by any transaction, or locally, across
    restarts, until its expiry plus a grace) is not stored again. Mailbox
    sequence numbers only grow, so ``after=`` cursors never skip an arrival.

Delivery statuses
    ``queued`` (spooled), ``forwarded`` (the peer accepted it), ``delivered``
    (it is in a local mailbox), ``rejected:<reason>``, ``expired``. They are
    written in the same commit as the change they describe. An engine may
    answer ``queued`` from the spool entry itself (with its spool time) rather
    than keep a status row for it: what :meth:`Storage.status_get` answers is
    the same.

Sign-in sessions (gateway.oidc)
    A session is one row keyed by its id, found by the hash of the session
    token in force or of the refresh token in force (never the tokens
    themselves). A refresh replaces both hashes in one write, so the old pair
    stops working when the new one is returned. The row keeps the IdP's refresh
    token, which the gateway needs to re-check the user at the IdP: the store
    is a credential store, kept mode 0600 like the token hashes.

Time
    Nothing here reads a clock: every time is passed in as Unix milliseconds
    (``*_ms``), so expiry and retention are testable without waiting.

Values
    Envelopes are opaque encoded bytes (``data``) plus the few columns the
    store indexes. ``size`` is always ``len(data)``: the bytes a lane or
    mailbox holds and the bytes a batch will carry.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Self, TypeVar

from gateway.core.address import MAX_ADDRESS_LENGTH, MAX_DOMAIN_LENGTH

if TYPE_CHECKING:  # only read: the store never parses an envelope
    from gateway.core.envelope import Envelope
    from gateway.storage.archive import Archive
    from gateway.storage.leases import Lease, NodeRecord

_T = TypeVar("_T")

# -- bounds ----------------------------------------------------------------------
MAX_ENVELOPE_ID_LENGTH = 128  # generous: the envelope format's ids are far shorter
MAX_TXN_ID_LENGTH = 128
MAX_USER_LENGTH = MAX_ADDRESS_LENGTH  # users are stored as their full address
MAX_STATUS_LENGTH = 128
MAX_TOKEN_HASH_BYTES = 64
MAX_BODY_HASH_BYTES = 64
MAX_LAST_ERROR_LENGTH = 500  # longer peer errors are cut, with a marker, when stored
MAX_ITEMS_PER_CALL = 10_000  # one call is one commit; bigger batches are a caller bug
EXPIRE_BATCH = 1_000  # default rows removed per expire call; call again while full
LIST_LIMIT = 1_000  # default and ceiling for admin listings and fetches
MAX_TIME_MS = 2**62  # far beyond any real clock, inside SQLite's 64-bit integers

# -- delivery statuses -----------------------------------------------------------
STATUS_QUEUED = "queued"
STATUS_FORWARDED = "forwarded"
STATUS_DELIVERED = "delivered"
STATUS_EXPIRED = "expired"
STATUS_REJECTED_PREFIX = "rejected:"
STATUS_PURGED = STATUS_REJECTED_PREFIX + "purged"  # an admin removed it from the spool
PLAIN_STATUSES = frozenset({STATUS_QUEUED, STATUS_FORWARDED, STATUS_DELIVERED, STATUS_EXPIRED})

# The word a receiver answers for an envelope it took (stored now or before).
RESULT_ACCEPTED = "accepted"


def rejected_status(reason: str) -> str:
    """``rejected:<reason>`` for a reason code."""
    return check_status(STATUS_REJECTED_PREFIX + reason)


def check_status(status: str) -> str:
    """Return ``status`` if it is a delivery status word; else ``ValueError``."""
    if not isinstance(status, str):
        raise ValueError(f"status must be a string, got {type(status).__name__}")
    if status in PLAIN_STATUSES:
        return status
    reason = status.removeprefix(STATUS_REJECTED_PREFIX)
    if (
        status.startswith(STATUS_REJECTED_PREFIX)
        and reason
        and len(status) <= MAX_STATUS_LENGTH
        and reason.isascii()
        and reason.isprintable()
        and " " not in reason
    ):
        return status
    raise ValueError(
        f"status {status!r} is not one of {sorted(PLAIN_STATUSES)} or rejected:<reason code>"
    )


def check_text(what: str, value: object, max_length: int) -> str:
    """``value`` if it is a non-empty str of at most ``max_length``; else ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > max_length:
        raise ValueError(f"{what} must be 1-{max_length} characters, got {len(value)}")
    return value


def check_ms(what: str, value: object) -> int:
    """``value`` if it is an int time or duration in ms within range; else ``ValueError``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer of milliseconds, got {value!r}")
    if not 0 <= value <= MAX_TIME_MS:
        raise ValueError(f"{what} must be within 0..{MAX_TIME_MS}, got {value}")
    return value


def check_count(what: str, value: object, *, minimum: int = 1, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{what} must be within {minimum}..{maximum}, got {value}")
    return value


def check_bytes(what: str, value: object, max_length: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError(f"{what} must be bytes, got {type(value).__name__}")
    if max_length is not None and not 0 < len(value) <= max_length:
        raise ValueError(f"{what} must be 1-{max_length} bytes, got {len(value)}")
    return value


def check_batch(what: str, items: Sequence[object]) -> None:
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise ValueError(f"{what} must be a sequence, got {type(items).__name__}")
    if len(items) > MAX_ITEMS_PER_CALL:
        raise ValueError(f"{what}: {len(items)} items in one call, at most {MAX_ITEMS_PER_CALL}")


# -- values ----------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EnvelopeRecord:
    """One envelope as the store keeps it: the indexed columns and the opaque bytes."""

    envelope_id: str
    sender: str  # address of the sending user
    recipient: str  # address of the receiving user
    created_ms: int
    expires_ms: int
    burn_on_read: bool
    # The encoded envelope; never parsed by the store, never in a repr (logs).
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_text("envelope_id", self.envelope_id, MAX_ENVELOPE_ID_LENGTH)
        check_text(f"sender of {self.envelope_id}", self.sender, MAX_ADDRESS_LENGTH)
        check_text(f"recipient of {self.envelope_id}", self.recipient, MAX_ADDRESS_LENGTH)
        check_ms(f"created_ms of {self.envelope_id}", self.created_ms)
        check_ms(f"expires_ms of {self.envelope_id}", self.expires_ms)
        if not isinstance(self.burn_on_read, bool):
            raise ValueError(f"burn_on_read of {self.envelope_id} must be a bool")
        check_bytes(f"data of {self.envelope_id}", self.data)

    @classmethod
    def _from_trusted(cls, **values: object) -> Self:
        """A record of ``values`` *without* the checks of ``__post_init__``.

        For hot paths whose values are already known valid, and only those:
        rows read back from our own database (written only from checked
        records) and records built from an envelope that passed the envelope
        checks (:func:`envelope_record`, :func:`spool_item`). Never for
        anything a client, a peer or a config file supplied directly: that
        goes through the public constructor. ``values`` must name every field
        of ``cls`` exactly once, with its declared type (the tests hold each
        caller to this); the result is then indistinguishable from the
        checked construction (``==``, ``hash``, ``repr``). It costs about a
        third of the checked one, which calls a checker and formats its
        message for every field of every record.
        """
        return _trusted(cls, values)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, kw_only=True)
class SpoolItem(EnvelopeRecord):
    """An envelope to put in the lane of ``peer`` (the recipient's org)."""

    peer: str

    def __post_init__(self) -> None:
        EnvelopeRecord.__post_init__(self)
        check_text(f"peer of {self.envelope_id}", self.peer, MAX_DOMAIN_LENGTH)


# Record values taken from a checked envelope need no second check: the envelope
# checks (Envelope.from_json, check_envelope) are stricter than the record's. Its
# id is 22 characters of base64url (at most MAX_ENVELOPE_ID_LENGTH here), its
# addresses are normalized ``user@org`` of at most MAX_ADDRESS_LENGTH, its times
# lie within 0..2**53-1 (MAX_TIME_MS here is 2**62) and burn_on_read is a bool.
# `data` and `peer` are not part of the envelope, so they keep their checks
# (inline for the common case, the checker itself for its message otherwise).
def envelope_record(envelope: Envelope, data: bytes) -> EnvelopeRecord:
    """The store's record of ``envelope``, whose canonical encoding is ``data``.

    ``envelope`` must have passed the envelope checks (it came from
    :meth:`~gateway.core.envelope.Envelope.from_json` or
    :func:`~gateway.core.envelope.decode_envelope`, or passed
    :func:`~gateway.core.envelope.check_envelope`): its fields are not checked
    again. ``Envelope(...)`` built in code checks nothing; use the
    :class:`EnvelopeRecord` constructor for that.
    """
    return EnvelopeRecord._from_trusted(**_envelope_fields(envelope, data))


def spool_item(envelope: Envelope, data: bytes, peer: str) -> SpoolItem:
    """``envelope`` (encoded as ``data``) for the lane of ``peer``.

    ``envelope`` must have passed the envelope checks, as for
    :func:`envelope_record`; ``data`` and ``peer`` are checked.
    """
    if type(peer) is not str or not 0 < len(peer) <= MAX_DOMAIN_LENGTH:
        check_text(f"peer of {envelope.id}", peer, MAX_DOMAIN_LENGTH)
    return SpoolItem._from_trusted(**_envelope_fields(envelope, data), peer=peer)


def _envelope_fields(envelope: Envelope, data: bytes) -> dict[str, object]:
    """An :class:`EnvelopeRecord`'s fields from a checked envelope; only ``data`` is checked."""
    return {
        "envelope_id": envelope.id,
        "sender": str(envelope.sender),
        "recipient": str(envelope.recipient),
        "created_ms": envelope.created,
        "expires_ms": envelope.expires,
        "burn_on_read": envelope.burn_on_read,
        "data": _checked_data(envelope.id, data),
    }


def _checked_data(envelope_id: str, data: bytes) -> bytes:
    if type(data) is not bytes:
        check_bytes(f"data of {envelope_id}", data)  # a bytes subclass passes, as before
    return data


# How _from_trusted fills a record. A dataclass without slots keeps its fields
# in the instance __dict__, so the whole dict is installed at once (the keyword
# arguments' dict is always a fresh one); with slots anywhere in the class's
# bases each field is set on its own. Both bypass the frozen __setattr__, as the
# dataclass's own __init__ does.
_new_object = object.__new__
_set_attribute = object.__setattr__
_FIELDS_IN_DICT: dict[type, bool] = {}  # per record class, filled on first use


def _trusted(cls: type[_T], values: dict[str, object]) -> _T:
    record = _new_object(cls)
    in_dict = _FIELDS_IN_DICT.get(cls)
    if in_dict is None:
        in_dict = _FIELDS_IN_DICT[cls] = not any("__slots__" in vars(k) for k in cls.__mro__)
    if in_dict:
        _set_attribute(record, "__dict__", values)
    else:
        for name, value in values.items():
            _set_attribute(record, name, value)
    return record


@dataclass(frozen=True, kw_only=True)
class SpoolEntry(SpoolItem):
    """A spooled envelope: its place in the lane and when it was spooled."""

    seq: int
    spooled_ms: int


@dataclass(frozen=True, kw_only=True)
class SpoolSummary:
    """A spooled envelope without its bytes, for admin listings."""

    seq: int
    envelope_id: str
    peer: str
    sender: str
    recipient: str
    created_ms: int
    expires_ms: int
    spooled_ms: int
    size: int


@dataclass(frozen=True, kw_only=True)
class MailboxEntry(EnvelopeRecord):
    """A stored inbound envelope. ``seq`` only grows: use it as the ``after`` cursor."""

    seq: int
    stored_ms: int


@dataclass(frozen=True, kw_only=True)
class ExpiredEnvelope:
    """An envelope an expiry sweep removed. ``peer`` is None for a mailbox entry."""

    envelope_id: str
    sender: str
    recipient: str
    peer: str | None


@dataclass(frozen=True, kw_only=True)
class LaneStats:
    """One non-empty spool lane."""

    peer: str
    depth: int
    bytes: int
    oldest_created_ms: int  # created_ms of the envelope at the head of the lane
    oldest_spooled_ms: int  # when that envelope was spooled (our clock, not the client's)


@dataclass(frozen=True, kw_only=True)
class MailboxDepth:
    envelopes: int
    bytes: int


@dataclass(frozen=True, kw_only=True)
class TxnRecord:
    """The recorded answer to one received transaction."""

    origin: str
    txn_id: str
    body_hash: bytes
    results: Mapping[str, str]  # envelope id -> "accepted" or a reason code, in body order
    at_ms: int


@dataclass(frozen=True, kw_only=True)
class DeliverOutcome:
    """What a mailbox write did.

    ``stored``: envelope ids stored now, in the order given. ``recipients``: the
    users who got at least one new envelope (wake their long-polls).
    ``replayed``: for :meth:`Storage.deliver`, the record already held for this
    ``(origin, txn_id)``; when set, nothing was stored and the caller answers
    from it (or refuses, if its ``body_hash`` differs). ``mailbox_full``: for
    :meth:`Storage.deliver` with a bound, the ids left out because their
    recipient's mailbox was full (recorded and answered ``mailbox_full``).
    """

    stored: tuple[str, ...]
    recipients: frozenset[str]
    replayed: TxnRecord | None = None
    mailbox_full: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class DeliveryStatus:
    envelope_id: str
    sender: str
    status: str
    at_ms: int


@dataclass(frozen=True, kw_only=True)
class PeerState:
    """What the sender remembers about a peer across restarts."""

    peer: str
    failures: int = 0  # consecutive failures since the last success
    backoff_until_ms: int = 0  # do not try before this time; 0: try now
    last_success_ms: int | None = None
    last_error: str | None = None  # our own short description, never the peer's text

    def __post_init__(self) -> None:
        check_text("peer", self.peer, MAX_DOMAIN_LENGTH)
        check_count(f"failures of {self.peer}", self.failures, minimum=0, maximum=2**31)
        check_ms(f"backoff_until_ms of {self.peer}", self.backoff_until_ms)
        if self.last_success_ms is not None:
            check_ms(f"last_success_ms of {self.peer}", self.last_success_ms)
        if self.last_error is not None and not isinstance(self.last_error, str):
            raise ValueError(f"last_error of {self.peer} must be a string or None")


@dataclass(frozen=True, kw_only=True)
class PruneCounts:
    seen: int
    statuses: int
    txns: int


@dataclass(frozen=True, slots=True)
class Bound:
    """How much one lane (per peer) or one mailbox (per user) may hold at most.

    Checked inside the write that would pass it, against the counters the
    same transaction reads, so concurrent writers cannot overshoot together.
    """

    max_envelopes: int
    max_bytes: int

    def __post_init__(self) -> None:
        check_count("max_envelopes", self.max_envelopes, maximum=2**62)
        check_count("max_bytes", self.max_bytes, maximum=2**62)

    def room_for(self, depth: int, size: int, more: int, more_bytes: int) -> bool:
        """Would ``more`` envelopes of ``more_bytes`` fit beside ``depth`` / ``size``?"""
        return depth + more <= self.max_envelopes and size + more_bytes <= self.max_bytes


MAX_SESSION_ID_LENGTH = 64
MAX_PROVIDER_LENGTH = 32
MAX_IDP_REFRESH_TOKEN_LENGTH = 8192
MAX_SESSION_CLAIM_VALUES = 256  # groups or amr values kept from an ID token
MAX_CLAIM_VALUE_LENGTH = 256


@dataclass(frozen=True)
class SessionRecord:
    """A signed-in session (gateway.oidc.sessions): what the gateway knows of it."""

    session_id: str
    user: str  # the full address
    provider: str  # the provider's name in gateway.yaml
    access_hash: bytes  # SHA-256 of the session token in force
    access_expires_ms: int
    refresh_hash: bytes  # SHA-256 of the refresh token in force
    refresh_expires_ms: int  # the session's end: no refresh after it
    created_ms: int
    idp_refresh_token: str | None = field(default=None, repr=False)  # a credential
    idp_groups: tuple[str, ...] = ()  # the groups claim at the last check at the IdP
    acr: str | None = None
    amr: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_text("session_id", self.session_id, MAX_SESSION_ID_LENGTH)
        check_text("user", self.user, MAX_USER_LENGTH)
        check_text("provider", self.provider, MAX_PROVIDER_LENGTH)
        check_bytes("access_hash", self.access_hash, MAX_TOKEN_HASH_BYTES)
        check_bytes("refresh_hash", self.refresh_hash, MAX_TOKEN_HASH_BYTES)
        for name in ("access_expires_ms", "refresh_expires_ms", "created_ms"):
            check_ms(name, getattr(self, name))
        if self.idp_refresh_token is not None:
            check_text("idp_refresh_token", self.idp_refresh_token, MAX_IDP_REFRESH_TOKEN_LENGTH)
        if self.acr is not None:
            check_text("acr", self.acr, MAX_CLAIM_VALUE_LENGTH)
        for name in ("idp_groups", "amr"):
            values = getattr(self, name)
            if len(values) > MAX_SESSION_CLAIM_VALUES:
                raise ValueError(f"{name}: more than {MAX_SESSION_CLAIM_VALUES} values")
            for value in values:
                check_text(name, value, MAX_CLAIM_VALUE_LENGTH)


# -- the interface ---------------------------------------------------------------
class Storage(Protocol):
    """The gateway's durable state. See the module docstring for the promises."""

    @property
    def archive(self) -> Archive:
        """The retention archive (:mod:`gateway.storage.archive`)."""
        ...

    # -- spool ---------------------------------------------------------------
    async def spool_put(
        self, items: Sequence[SpoolItem], *, at_ms: int, bound: Bound | None = None
    ) -> list[str]:
        """Spool ``items`` in order, all or none; status ``queued``.

        Returns the ids spooled now; an id already spooled or with a status is
        skipped (so a client's retry is harmless). With ``bound``, a lane that
        the new items would take past it makes the whole call store nothing
        and raise :class:`~gateway.errors.CapacityError` (``lane_full``) naming
        every such peer.
        """
        ...

    async def spool_take(
        self,
        peer: str,
        *,
        max_items: int,
        max_bytes: int,
        after_seq: int = 0,
        now_ms: int | None = None,
    ) -> list[SpoolEntry]:
        """The head of ``peer``'s lane, oldest first, without removing it.

        At most ``max_items`` entries and ``max_bytes`` of data, except that the
        first entry is always returned, however large, so no lane can stall.
        Only entries whose ``seq`` is greater than ``after_seq``: a sender with
        transactions in flight takes what follows them. With ``now_ms``, entries
        deferred past it (:meth:`spool_defer`) are left out.
        """
        ...

    async def spool_defer(
        self,
        peer: str,
        envelope_ids: Collection[str],
        *,
        at_ms: int,
        delay_ms: int,
        max_delay_ms: int,
        fence: Lease | None = None,
    ) -> int:
        """Keep envelopes the peer answered with a temporary result, and send them later.

        Each stays in ``peer``'s lane (status unchanged) but is not taken with a
        ``now_ms`` before ``at_ms + delay_ms`` the first time, twice that delay the
        second, and so on up to ``max_delay_ms``. Leaving the lane (an answer,
        expiry, a purge) forgets it; :meth:`spool_retry` ends every wait of
        the peer's lane. Ids no longer in the lane are ignored; returns how many
        were deferred.
        """
        ...

    async def spool_complete(
        self, peer: str, results: Mapping[str, str], *, at_ms: int, fence: Lease | None = None
    ) -> int:
        """Remove answered envelopes and record their statuses, in one commit.

        ``results`` maps envelope id to its new status (``forwarded`` or
        ``rejected:<reason>``). Ids no longer in ``peer``'s lane (purged,
        expired meanwhile) are ignored. Returns how many were removed.

        With ``fence`` (a lane's lease; also for :meth:`spool_defer` and
        :meth:`peer_state_put`), the write happens only if that lease has not
        been granted to anyone since, checked in the same transaction; else
        :class:`~gateway.storage.leases.LeaseLostError` and nothing changes.
        """
        ...

    async def spool_expire(
        self, now_ms: int, *, limit: int = EXPIRE_BATCH
    ) -> list[ExpiredEnvelope]:
        """Remove up to ``limit`` entries with ``expires_ms <= now_ms``; status ``expired``."""
        ...

    async def spool_stats(self) -> dict[str, LaneStats]:
        """Every non-empty lane, by peer. Cheap: counters and one index probe per lane."""
        ...

    async def spool_peers(self) -> list[str]:
        """Peers with a non-empty lane, sorted."""
        ...

    async def spool_list(
        self, *, peer: str | None = None, limit: int = LIST_LIMIT, after_seq: int | None = None
    ) -> list[SpoolSummary]:
        """Spooled envelopes without their bytes, in lane order (by ``seq``)."""
        ...

    async def spool_retry(self, peer: str | None = None) -> int:
        """Clear the backoff of ``peer`` (or every peer), and its envelopes' deferrals.

        Returns the number of peer states changed.
        """
        ...

    async def spool_purge(
        self, *, peer: str | None = None, created_before_ms: int | None = None, at_ms: int
    ) -> int:
        """Remove spooled envelopes (of ``peer``, created before a time).

        Each gets status ``rejected:purged``. Returns how many were removed.
        """
        ...

    # -- mailboxes and transactions ------------------------------------------
    async def deliver(
        self,
        origin: str,
        txn_id: str,
        body_hash: bytes,
        results: Mapping[str, str],
        entries: Sequence[EnvelopeRecord],
        *,
        at_ms: int,
        bound: Bound | None = None,
    ) -> DeliverOutcome:
        """The receiver's atomic commit of one transaction.

        Stores ``entries`` (each must be answered ``accepted`` in ``results``)
        in their recipients' mailboxes, skipping ids seen before, and records
        ``results`` for ``(origin, txn_id)``. If that transaction is already
        recorded, stores nothing and returns the record as ``replayed``.

        With ``bound``, an entry that its recipient's mailbox has no room for
        (after the entries before it) is neither stored nor marked seen: its
        result is recorded as ``mailbox_full`` instead, and its id is in the
        outcome's ``mailbox_full``. The others are stored as usual.
        """
        ...

    async def txn_lookup(self, origin: str, txn_id: str) -> TxnRecord | None: ...

    async def mailbox_put_local(
        self, entries: Sequence[EnvelopeRecord], *, at_ms: int, bound: Bound | None = None
    ) -> DeliverOutcome:
        """Intra-org delivery: store, dedup by id, status ``delivered``; one commit.

        With ``bound``, a mailbox that the new entries would take past it makes
        the whole call store nothing and raise
        :class:`~gateway.errors.CapacityError` (``mailbox_full``) naming every
        such user.
        """
        ...

    async def mailbox_fetch(
        self, user: str, *, limit: int, after: int | None = None, now_ms: int | None = None
    ) -> list[MailboxEntry]:
        """``user``'s envelopes, oldest first, with ``seq > after``; not removed.

        With ``now_ms``, envelopes already expired are left out even before the
        sweeper removes them.
        """
        ...

    async def mailbox_ack(self, user: str, envelope_ids: Collection[str]) -> int:
        """Delete ``user``'s envelopes with these ids. Returns how many were deleted."""
        ...

    async def mailbox_expire(
        self, now_ms: int, *, limit: int = EXPIRE_BATCH
    ) -> list[ExpiredEnvelope]:
        """Remove up to ``limit`` mailbox entries with ``expires_ms <= now_ms``."""
        ...

    async def mailbox_depth(self, user: str) -> MailboxDepth: ...

    async def mailbox_stats(self) -> dict[str, MailboxDepth]:
        """Depth of every non-empty mailbox, by recipient address (for the metrics)."""
        ...

    # -- delivery statuses ---------------------------------------------------
    async def status_set(
        self, envelope_id: str, sender: str, status: str, *, at_ms: int
    ) -> None: ...

    async def status_get(self, envelope_id: str) -> DeliveryStatus | None: ...

    # -- peers -------------------------------------------------------------------
    async def peer_state_get(self, peer: str) -> PeerState | None: ...

    async def peer_state_put(self, state: PeerState, *, fence: Lease | None = None) -> None:
        """Write ``state``; with ``fence``, only while that lease is still the holder's."""
        ...

    async def peer_states(self) -> list[PeerState]:
        """Every peer with recorded state, sorted by name."""
        ...

    # -- client tokens and user keys -----------------------------------------
    async def token_put(self, user: str, token_hash: bytes, *, at_ms: int) -> None:
        """Add a token (by its hash) for ``user``; a user may hold several."""
        ...

    async def token_lookup(self, token_hash: bytes) -> str | None: ...

    async def token_revoke(self, user: str) -> int:
        """Remove every token of ``user``. Returns how many."""
        ...

    async def user_keys_put(self, user: str, record: bytes, *, at_ms: int) -> None:
        """Publish (replace) ``user``'s key record, stored as given."""
        ...

    # -- sign-in sessions (six methods; see "Sign-in sessions" above) --------------
    async def session_put(self, record: SessionRecord) -> None:
        """Store ``record``, replacing the row with its ``session_id`` (a refresh)."""
        ...

    async def session_by_access(self, access_hash: bytes) -> SessionRecord | None:
        """The session whose session token in force hashes to ``access_hash``."""
        ...

    async def session_by_refresh(self, refresh_hash: bytes) -> SessionRecord | None:
        """The session whose refresh token in force hashes to ``refresh_hash``."""
        ...

    async def session_delete(self, session_id: str) -> bool:
        """End one session (sign-out, or refused at a refresh); whether it existed."""
        ...

    async def session_delete_ended(self, *, before_ms: int) -> int:
        """Forget sessions whose refresh lifetime ended before ``before_ms``; how many."""
        ...

    async def session_groups(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(user, provider, idp_groups)`` of every session, least recently refreshed first.

        Read once at start-up, to know again which group the IdP puts each
        signed-in user in (gateway.oidc.members).
        """
        ...

    async def user_keys_get(self, user: str) -> bytes | None: ...

    # -- nodes and leases (gateway.storage.leases, gateway.cluster) -------------
    async def node_beat(self, record: NodeRecord) -> str | None:
        """Write ``record`` as its node's row; return the incarnation it replaced (None: new)."""
        ...

    async def node_leave(self, node: str, incarnation: str, *, at_ms: int) -> None:
        """Remove that incarnation's row and release every lease it holds (a clean stop)."""
        ...

    async def nodes_list(self) -> list[NodeRecord]:
        """Every node row, by name."""
        ...

    async def nodes_forget(self, *, beat_before_ms: int) -> int:
        """Remove the rows of nodes whose last beat is older than ``beat_before_ms``."""
        ...

    async def lease_claim(
        self,
        name: str,
        *,
        node: str,
        incarnation: str,
        at_ms: int,
        until_ms: int,
        take_from: str | None = None,
    ) -> Lease | None:
        """Take or extend a lease (:func:`~gateway.storage.leases.decide_claim`), atomically."""
        ...

    async def leases_renew(
        self, names: Collection[str], *, node: str, incarnation: str, at_ms: int, until_ms: int
    ) -> list[Lease]:
        """Extend those of ``names`` that ``incarnation`` still holds; return them, renewed."""
        ...

    async def lease_release(self, lease: Lease, *, at_ms: int) -> bool:
        """Give ``lease`` up at ``at_ms`` (if still this grant); whether it was."""
        ...

    async def leases_list(self) -> list[Lease]:
        """Every lease row, by name."""
        ...

    # -- housekeeping ------------------------------------------------------------
    async def reusable_bytes(self) -> int:
        """Bytes the store holds free for its own reuse (SQLite: its free pages).

        Deleted envelopes leave such room inside the database, which the
        filesystem does not see as free (:mod:`gateway.reserve` adds the two).
        """
        ...

    async def check_writable(self) -> None:
        """Prove the store accepts durable writes now, or raise ``StorageError``.

        A cheap write transaction through the same path as every write (so it
        waits behind them: a stuck writer shows as a slow answer), changing
        nothing. For readiness checks: a caller may cancel it (e.g. with
        ``trio.move_on_after``) and the store is none the worse.
        """
        ...

    async def prune(
        self, *, seen_before_ms: int, statuses_before_ms: int, txns_before_ms: int
    ) -> PruneCounts:
        """Forget dedup ids that expired before ``seen_before_ms``, statuses set
        before ``statuses_before_ms``, transaction records before ``txns_before_ms``.
        """
        ...

    async def scrub(self) -> bool:
        """Make deleted envelopes unrecoverable from the engine's files now.

        Deletes overwrite their bytes as they happen, but older copies can
        linger in a journal until it is recycled; the sweeper calls this after
        acknowledgements and expiry. Returns False if it could not finish
        (readers held it back); calling again later completes it.
        """
        ...
