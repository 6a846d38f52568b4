"""The reference client: end-to-end encrypted messaging over a gateway's client API.

What ``gateway client``, ``gateway demo`` and the tests run. It holds the
user's secret keys (:class:`~gateway.crypto.keys.UserKeys`); the gateway sees
only sealed envelopes and public key records.

Whom to trust for a key. A contact's public keys come as a key record signed
by the contact's org. The client checks that signature against the org's key
as the **admins of its own org pinned it** (``signing_key`` of the peer in the
rules, read from ``GET /v1/orgs/{org}``), or against a key the user pins
themselves (``--org-key ORG=ed25519:...``), which then wins. Then the keys
are checked against the ones remembered for that contact
(:mod:`gateway.client.contacts`): a change is refused until the user accepts
it. So a key is used only if the contact's org vouches for it *and* it is the
one seen before.

Sending: look up and check the recipient's keys, read the sender group's
limits (``GET /v1/me``) for the default TTL and whether burn-on-read is
required, seal, submit; the answer is the envelope id and its first status.
A sender whose group is under outbound retention (``GET /v1/me`` names the
retention key) seals envelope version 2 with a retention copy for that key;
others seal version 1, which every peer speaks.

Receiving: fetch (long-polling up to ``wait`` s; the session asks for the
binary answer and reads JSON from a gateway that predates it), and for each
envelope find the sender's verify key (remembered, else looked up and checked
as above), verify and open it, then acknowledge everything handled in one call. An
envelope that does not verify or open, even with freshly looked-up keys, is
acknowledged and reported as discarded (leaving it would return it forever).
One whose sender's keys changed is left in the mailbox and reported: it can
be read with ``accept_new_key`` once the change is confirmed. A version 2
envelope whose retention copy is not the one its content key gives (its
sender did not retain it honestly) is refused: its text is not shown, it is
reported to the gateway (``POST /v1/reports/retention-mismatch``, counted and
audited there) and then acknowledged. A recipient whose group is under
inbound retention (``GET /v1/me`` names the key) acknowledges each version 2
envelope it opened with the content key wrapped for its own org's retention
key, and lists those it could not open as ``unread``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from gateway.client.api import ClientAPIError, Submitted
from gateway.client.contacts import ContactBook, KeyChangedError, Trust
from gateway.core.address import Address
from gateway.core.durations import format_time_ms
from gateway.core.envelope import ENVELOPE_VERSION_V2, Envelope
from gateway.core.keytext import format_signing_key, parse_retention_key, parse_signing_key
from gateway.crypto.envelope_crypto import (
    open_envelope,
    recipient_retention_wrap,
    seal,
    seal_v2,
)
from gateway.crypto.key_records import parse_verified_key_record, verify_key_record
from gateway.crypto.keys import PublicKeys, UserKeys
from gateway.errors import (
    EnvelopeOpenError,
    KeyRecordError,
    ProtocolError,
    Reason,
    RemoteError,
    RetentionWrapMismatch,
)

MS_PER_SECOND: Final = 1000
DEFAULT_FETCH_LIMIT: Final = 100
BURN_ON_READ_REQUIRED: Final = "required"

ClockMs = Callable[[], int]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Session(Protocol):
    """What the reference client needs of :class:`~gateway.client.api.ClientSession`."""

    async def me(self) -> dict[str, Any]: ...

    async def submit(self, envelope: Envelope) -> Submitted: ...

    async def fetch(self, *, wait: int = 0, limit: int = 100) -> list[Envelope]: ...

    async def ack(
        self,
        envelope_ids: Sequence[str],
        *,
        retention: Mapping[str, tuple[str, bytes]] | None = None,
        unread: Sequence[str] = (),
    ) -> int: ...

    async def report_retention_mismatch(self, envelope_ids: Sequence[str]) -> int: ...

    async def status(self, envelope_id: str) -> dict[str, Any]: ...

    async def publish_keys(self, public_keys: dict[str, object]) -> dict[str, Any]: ...

    async def lookup_keys(self, address: str) -> dict[str, Any]: ...

    async def org_signing_key(self, org: str) -> str: ...


class UntrustedKeyRecordError(RemoteError):
    """A key record that does not verify against the org key the client trusts."""

    default_reason = Reason.KEY_RECORD_INVALID


class KeyLookupError(RemoteError):
    """The gateway could not give a user's key record (unknown, unpublished, peer down)."""

    default_reason = Reason.NOT_FOUND


@dataclass(frozen=True, slots=True)
class Sent:
    envelope_id: str
    status: str | None
    recipient: Address
    trust: Trust  # NEW the first time this contact's keys were used
    burn_on_read: bool
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Received:
    """One opened message: what ``gateway client recv`` prints as a JSON line."""

    envelope_id: str
    sender: Address
    sent_ms: int  # the envelope's `created`, as the sender's client set it
    text: str = field(repr=False)
    burn_on_read: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.envelope_id,
            "from": str(self.sender),
            "sent": format_time_ms(self.sent_ms),
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class Problem:
    """An envelope that was not opened, and whether it was discarded (acknowledged)."""

    envelope_id: str
    sender: Address
    message: str
    discarded: bool
    retention_mismatch: bool = False  # refused: its retention copy did not match


@dataclass(frozen=True, slots=True)
class Inbox:
    """The outcome of one :meth:`ReferenceClient.receive`."""

    messages: tuple[Received, ...]
    problems: tuple[Problem, ...]
    acknowledged: int
    reported: int = 0  # retention mismatches the gateway recorded


class ReferenceClient:
    """One user's client: their keys, their contacts and a session with their gateway."""

    def __init__(
        self,
        session: Session,
        keys: UserKeys,
        contacts: ContactBook,
        *,
        org_keys: Mapping[str, bytes] | None = None,
        clock_ms: ClockMs = wall_clock_ms,
    ) -> None:
        self.session = session
        self.keys = keys
        self.contacts = contacts
        # Keys the user pinned themselves win over what the gateway says.
        self._pinned = dict(org_keys or {})
        self._org_keys: dict[str, bytes] = dict(self._pinned)
        self._clock_ms = clock_ms

    @property
    def address(self) -> Address:
        return self.keys.address

    # -- trust ---------------------------------------------------------------------------
    async def org_key(self, org: str) -> bytes:
        """The Ed25519 key that ``org``'s key records must be signed with."""
        known = self._org_keys.get(org)
        if known is not None:
            return known
        text = await self.session.org_signing_key(org)
        try:
            key = parse_signing_key(text)
        except ValueError as exc:
            raise ProtocolError(f"the gateway's signing key for {org}: {exc}") from None
        self._org_keys[org] = key
        return key

    async def verified_keys(
        self, address: Address, *, accept_new_key: bool = False
    ) -> tuple[PublicKeys, Trust]:
        """``address``'s public keys: looked up, org signature checked, TOFU applied."""
        try:
            record = await self.session.lookup_keys(str(address))
        except ClientAPIError as exc:
            raise KeyLookupError(f"cannot get the keys of {address}: {exc}") from exc
        org_key = await self.org_key(address.org)
        try:
            public = verify_key_record(record, org_verify_key=org_key, expected_address=address)
        except KeyRecordError:
            source = "the key you pinned" if address.org in self._pinned else "the rules' key"
            raise UntrustedKeyRecordError(
                f"the key record of {address} is NOT signed by {address.org} "
                f"({source}: {format_signing_key(org_key)}); refusing to use it"
            ) from None
        trust = self.contacts.remember(
            public, now_ms=self._clock_ms(), accept_new_key=accept_new_key
        )
        self.contacts.save()
        return public, trust

    # -- publish ------------------------------------------------------------------------
    async def publish(self) -> int:
        """Publish our public keys; returns the ``issued`` time of the org-signed record."""
        public = self.keys.public()
        answer = await self.session.publish_keys(public.to_json())
        try:
            record = parse_verified_key_record(
                answer,
                org_verify_key=await self.org_key(self.address.org),
                expected_address=public.address,
            )
        except KeyRecordError:
            raise UntrustedKeyRecordError(
                f"the gateway answered a key record for {self.address} that is not signed "
                f"by the key of {self.address.org}"
            ) from None
        if record.public_keys != public:
            raise UntrustedKeyRecordError(
                f"the gateway signed other keys than ours for {self.address}"
            )
        return record.issued_ms

    # -- send ------------------------------------------------------------------------------
    async def send(
        self,
        to: Address,
        text: str,
        *,
        ttl_seconds: int | None = None,
        burn_on_read: bool = False,
        accept_new_key: bool = False,
    ) -> Sent:
        """Seal ``text`` for ``to`` and submit it; a refusal raises ``ClientAPIError``."""
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        me = await self.session.me()
        limits = me.get("limits") if isinstance(me, dict) else None
        if not isinstance(limits, dict):
            raise ProtocolError("GET /v1/me: answer has no limits")
        if ttl_seconds is None:
            ttl = limits.get("ttl")
            default = ttl.get("default") if isinstance(ttl, dict) else None
            if type(default) is not int or default <= 0:
                raise ProtocolError("GET /v1/me: answer has no default TTL")
            ttl_seconds = default
        if limits.get("burn_on_read") == BURN_ON_READ_REQUIRED:
            burn_on_read = True
        retention_key = _retention_key(me)
        public, trust = await self.verified_keys(to, accept_new_key=accept_new_key)
        now = self._clock_ms()
        if retention_key is None:
            envelope = seal(
                text.encode("utf-8"),
                sender=self.keys,
                recipient=public,
                created_ms=now,
                expires_ms=now + ttl_seconds * MS_PER_SECOND,
                burn_on_read=burn_on_read,
            )
        else:
            envelope = seal_v2(
                text.encode("utf-8"),
                sender=self.keys,
                recipient=public,
                created_ms=now,
                expires_ms=now + ttl_seconds * MS_PER_SECOND,
                burn_on_read=burn_on_read,
                retention_key_id=retention_key[0],
                retention_public_key=retention_key[1],
            )
        submitted = await self.session.submit(envelope)
        return Sent(
            envelope_id=envelope.id,
            status=submitted.status,
            recipient=to,
            trust=trust,
            burn_on_read=burn_on_read,
            expires_ms=envelope.expires,
        )

    # -- receive --------------------------------------------------------------------------
    async def receive(
        self, *, wait: int = 0, limit: int = DEFAULT_FETCH_LIMIT, accept_new_key: bool = False
    ) -> Inbox:
        """Fetch, verify, open and acknowledge what is in our mailbox."""
        envelopes = await self.session.fetch(wait=wait, limit=limit)
        inbound_key = _retention_key(await self.session.me(), "inbound") if envelopes else None
        copies: dict[str, tuple[str, bytes]] = {}
        messages: list[Received] = []
        problems: list[Problem] = []
        done: list[str] = []
        dishonest: list[str] = []
        for envelope in envelopes:
            try:
                payload = await self._open(envelope, accept_new_key=accept_new_key)
            except RetentionWrapMismatch:
                problems.append(
                    Problem(
                        envelope.id,
                        envelope.sender,
                        "REFUSED: its retention copy does not match the message: the sender "
                        "did not retain it honestly; not shown, reported to your gateway",
                        True,
                        retention_mismatch=True,
                    )
                )
                dishonest.append(envelope.id)
                done.append(envelope.id)
                continue
            except KeyChangedError as exc:
                problems.append(Problem(envelope.id, envelope.sender, exc.message, False))
                continue
            except (EnvelopeOpenError, UntrustedKeyRecordError, KeyLookupError) as exc:
                problems.append(
                    Problem(
                        envelope.id,
                        envelope.sender,
                        f"discarded: it could not be verified and opened ({exc.message})",
                        True,
                    )
                )
                done.append(envelope.id)
                continue
            if inbound_key is not None and envelope.version == ENVELOPE_VERSION_V2:
                # Under inbound retention the acknowledgement carries the content key
                # wrapped for our org's retention key: the gateway archives it.
                copies[envelope.id] = (
                    inbound_key[0],
                    recipient_retention_wrap(
                        envelope,
                        recipient=self.keys,
                        key_id=inbound_key[0],
                        public_key=inbound_key[1],
                    ),
                )
            messages.append(
                Received(
                    envelope_id=envelope.id,
                    sender=envelope.sender,
                    sent_ms=envelope.created,
                    text=payload.decode("utf-8", errors="replace"),
                    burn_on_read=envelope.burn_on_read,
                )
            )
            done.append(envelope.id)
        # Reported before acknowledged: the gateway records only what is in the mailbox.
        reported = await self.session.report_retention_mismatch(dishonest) if dishonest else 0
        if not done:
            acknowledged = 0
        elif inbound_key is None:
            acknowledged = await self.session.ack(done)
        else:
            unread = [p.envelope_id for p in problems if p.discarded]
            acknowledged = await self.session.ack(done, retention=copies, unread=unread)
        return Inbox(tuple(messages), tuple(problems), acknowledged, reported)

    async def _open(self, envelope: Envelope, *, accept_new_key: bool) -> bytes:
        known = self.contacts.get(envelope.sender)
        if known is not None:
            try:
                return open_envelope(
                    envelope, recipient=self.keys, sender_verify_key=known.verify_key
                )
            except RetentionWrapMismatch:
                raise  # signed by the key we know: no newer key changes that
            except EnvelopeOpenError:
                pass  # perhaps the sender has new keys: ask their org
        public, trust = await self.verified_keys(envelope.sender, accept_new_key=accept_new_key)
        if known is not None and trust is Trust.KNOWN:
            raise EnvelopeOpenError()  # the same keys failed already
        return open_envelope(envelope, recipient=self.keys, sender_verify_key=public.verify_key)

    # -- status ---------------------------------------------------------------------------
    async def status(self, envelope_id: str) -> dict[str, Any]:
        return await self.session.status(envelope_id)


def _retention_key(me: object, direction: str = "outbound") -> tuple[str, bytes] | None:
    """The retention key (id, X25519 key) ``GET /v1/me`` names, if under retention that way."""
    retention = me.get("retention") if isinstance(me, dict) else None
    if retention is None:
        return None
    key = retention.get("key") if isinstance(retention, dict) else None
    if not isinstance(retention, dict) or retention.get(direction) is not True:
        return None
    key_id = key.get("id") if isinstance(key, dict) else None
    text = key.get("public_key") if isinstance(key, dict) else None
    if not isinstance(key_id, str) or not isinstance(text, str):
        raise ProtocolError("GET /v1/me: retention without a usable key")
    try:
        return key_id, parse_retention_key(text)
    except ValueError as exc:
        raise ProtocolError(f"GET /v1/me: retention key: {exc}") from None
