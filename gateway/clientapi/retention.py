"""Retention in the client API (docs/retention.md, docs/client-api.md).

Theory of operation
-------------------
Three duties, each called by :class:`~gateway.clientapi.api.ClientAPI` once
the caller is authenticated and its rules read:

* **Sent** (:meth:`RetentionDesk.archive_sent`): the allowed envelopes of a
  member of a group under outbound retention (the rules refused those without
  a retention copy for a key of theirs) are appended to the archive durably
  *before* they are stored for delivery, so nothing is delivered unarchived.
  A full disk raises ``StorageFullError``: the caller refuses them all.
* **Acknowledged** (:meth:`RetentionDesk.retain_acknowledged`): a member of a
  group under inbound retention acknowledges each version 2 envelope it read
  with the content key wrapped for the org's retention key; those are
  archived with that copy before they are deleted. One acknowledged without a
  copy for a key of the rules makes the whole acknowledgement refused, and
  nothing is deleted. What the client says it could not open (``unread``) and
  version 1 envelopes (no content key) go unarchived, audited.
* **Reported** (:meth:`RetentionDesk.record_mismatches`): envelopes a client
  refused because their retention copy did not match are counted and audited.

Each archived envelope carries its **sender's key** (:class:`SenderKeyBook`):
the key record the sender's org signed (ours from the key directory; a
partner's through the peer, checked against the key its rules pin) whose
verify key the gateway checked the envelope's signature with, so that an
export proves offline who signed each envelope, whatever keys rotated since.
An envelope is archived all the same when no key verifies it (the archive
must be complete; the recipient's client refuses it anyway): it is counted
(``gateway_retention_sender_unverified_total``) and ``gateway retention
open`` names it.

Only envelopes among the first :data:`HEAD` of the caller's mailbox are looked
at: a client acknowledges and reports what it just fetched, from the head; so
a report cannot put words into the audit log about envelopes the caller never
received, and an acknowledgement cannot delete what it did not archive.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from gateway.core.address import Address
from gateway.core.archive import ArchiveItem, sender_key_blob
from gateway.core.encoding import b64url_decode_canonical, loads_strict
from gateway.core.envelope import (
    ENVELOPE_ID_RE,
    ENVELOPE_VERSION,
    MAX_TIME_MS,
    RETENTION_KEY_ID_RE,
    RETENTION_WRAP_BYTES,
    Envelope,
    decode_envelope,
    envelope_version_of,
)
from gateway.core.keytext import format_signing_key
from gateway.core.rules import CompiledRules, Group
from gateway.crypto.key_records import (
    KeyRecord,
    envelope_signed_by,
    parse_verified_key_record,
)
from gateway.errors import EnvelopeError, GatewayError, KeyRecordError, ProtocolError, Reason
from gateway.observability.audit import AuditSink
from gateway.observability.metrics import (
    RETENTION_ARCHIVED,
    RETENTION_ARCHIVED_BYTES,
    RETENTION_MISMATCH_REPORTS,
    RETENTION_SENDER_UNVERIFIED,
    bounded,
)
from gateway.storage.base import MailboxEntry

log = logging.getLogger("gateway.clientapi")

HEAD: Final = 500  # envelopes at the head of a mailbox an ack or report may name
MAX_IDS: Final = 500  # ids in one acknowledgement or report
MS_PER_SECOND: Final = 1000
_ACK_FIELDS: Final = frozenset({"ids", "retention", "unread"})
#: How long an acknowledgement waits for a peer's key record of a sender (then archives
#: the envelope without one, counted as no_key_record).
SENDER_KEY_LOOKUP_SECONDS: Final = 5.0


class ArchiveSink(Protocol):
    """Where retained envelopes go (the storage's retention archive)."""

    async def append(self, items: Sequence[ArchiveItem], *, at_ms: int) -> list[str]: ...


class KeyDirectory(Protocol):
    """Where the org's users' signed key records are (the storage)."""

    async def user_keys_get(self, user: str) -> bytes | None: ...


RemoteKeys = Callable[[Address], Awaitable[bytes | None]]


class SenderKeyBook:
    """The sender's key an archive record carries (:func:`~gateway.core.archive.sender_key_blob`).

    A sender of this org: its key record from the key directory, signed with
    this org's key. A partner's user: the key record its gateway serves
    (``remote``), checked against the signing key the rules pin for that
    peer. Then the envelope's signature must verify with the record's verify
    key; see the module docstring for what happens when it does not.
    """

    def __init__(
        self, *, org: str, org_verify_key: bytes, directory: KeyDirectory, remote: RemoteKeys
    ) -> None:
        self._org = org
        self._org_verify_key = org_verify_key
        self._directory = directory
        self._remote = remote

    async def blobs(
        self, envelopes: Sequence[Envelope], *, rules: CompiledRules, direction: str
    ) -> dict[str, bytes]:
        """Envelope id -> the sender key to archive with it (``b""``: none found)."""
        records: dict[Address, tuple[KeyRecord, bytes] | None] = {}
        found: dict[str, bytes] = {}
        for env in envelopes:
            if env.sender not in records:
                records[env.sender] = await self._record(env.sender, rules, direction)
            known = records[env.sender]
            if known is None:
                found[env.id] = b""
                continue
            record, org_key = known
            if not envelope_signed_by(env, record.verify_key):
                # Archived with this key all the same: `retention open` names it.
                self._unverified(env, direction, "signature_invalid")
            found[env.id] = sender_key_blob(
                org_key=format_signing_key(org_key), record=record.encode()
            )
        return found

    async def _record(
        self, sender: Address, rules: CompiledRules, direction: str
    ) -> tuple[KeyRecord, bytes] | None:
        """The sender's key record, verified, and the org key that signed it; or None."""
        data: bytes | None = None
        if sender.org == self._org:
            org_key = self._org_verify_key
            data = await self._directory.user_keys_get(str(sender))
        else:
            peer = rules.peer(sender.org)
            org_key = peer.signing_key if peer is not None else b""
            if peer is not None:
                with trio.move_on_after(SENDER_KEY_LOOKUP_SECONDS):
                    try:
                        data = await self._remote(sender)
                    except GatewayError as exc:
                        log.info("key lookup of sender %s failed: %s", sender, exc.reason)
        if data is None:
            RETENTION_SENDER_UNVERIFIED.labels(direction, "no_key_record").inc()
            log.info("archiving envelopes of %s without a sender key: none found", sender)
            return None
        try:
            record = parse_verified_key_record(
                data, org_verify_key=org_key, expected_address=sender
            )
        except KeyRecordError:
            RETENTION_SENDER_UNVERIFIED.labels(direction, "key_record_invalid").inc()
            log.warning("the key record of %s does not verify: archived without it", sender)
            return None
        return record, org_key

    @staticmethod
    def _unverified(env: Envelope, direction: str, reason: str) -> None:
        RETENTION_SENDER_UNVERIFIED.labels(direction, reason).inc()
        log.warning(
            "envelope %s from %s: its signature does not verify with the sender's key record; "
            "archived with it, `gateway retention open` will name it",
            env.id,
            env.sender,
            extra={"event": "retention_sender_unverified", "envelope_id": env.id},
        )


class MailboxReader(Protocol):
    async def mailbox_fetch(
        self, user: str, *, limit: int, after: int | None = None, now_ms: int | None = None
    ) -> list[MailboxEntry]: ...


@dataclass(frozen=True, slots=True)
class Ack:
    """A parsed acknowledgement."""

    ids: list[str]
    retention: dict[str, tuple[str, bytes]]  # envelope id -> (key id, retention copy)
    unread: frozenset[str]


class RetentionDesk:
    """The client API's retention duties; see the module docstring."""

    def __init__(
        self,
        *,
        org: str,
        mailboxes: MailboxReader,
        archive: ArchiveSink | None,
        audit: AuditSink,
        clock_ms: Callable[[], int],
        sender_keys: SenderKeyBook | None = None,
    ) -> None:
        self._org = org
        self._mailboxes = mailboxes
        self._archive = archive  # None: enforced, nothing archived (tests, tools)
        self._audit = audit
        self._clock_ms = clock_ms
        self._sender_keys = sender_keys  # None: records carry no sender key (tests)

    async def archive_sent(
        self,
        *,
        group: Group,
        rules: CompiledRules,
        sent: Sequence[tuple[Envelope, bytes]],
        now_ms: int,
    ) -> None:
        """Archive ``sent`` (envelope, stored bytes) if ``group`` is under outbound retention."""
        retention = group.retention
        if self._archive is None or not retention.outbound:
            return
        keep_until = min(now_ms + retention.keep * MS_PER_SECOND, MAX_TIME_MS)
        retained = [env for env, _ in sent if env.retention is not None]
        keys = await self._blobs(retained, rules, "outbound")
        items = [
            ArchiveItem(
                envelope_id=env.id,
                group=group.name,
                direction="outbound",
                sender=str(env.sender),
                recipient=str(env.recipient),
                key_id=env.retention.key_id,
                delete_after_ms=keep_until,
                envelope=data,
                sender_key=keys.get(env.id, b""),
            )
            for env, data in sent
            if env.retention is not None
        ]
        if items:
            archived = set(await self._archive.append(items, at_ms=now_ms))
            _count(group.name, rules.rules.groups, "outbound", items, archived)

    async def _blobs(
        self, envelopes: Sequence[Envelope], rules: CompiledRules, direction: str
    ) -> dict[str, bytes]:
        if self._sender_keys is None or not envelopes:
            return {}
        return await self._sender_keys.blobs(envelopes, rules=rules, direction=direction)

    async def retain_acknowledged(
        self, *, user: str, group: Group, rules: CompiledRules, ack: Ack, ids: list[str]
    ) -> list[str] | str:
        """The ids that may be deleted (archived first), or why the ack is refused."""
        org = rules.rules.retention
        retention = group.retention
        wanted = set(ids)
        entries = [
            entry
            for entry in await self._mailboxes.mailbox_fetch(user, limit=HEAD)
            if entry.envelope_id in wanted
        ]
        now_ms = self._clock_ms()
        keep_until = min(now_ms + retention.keep * MS_PER_SECOND, MAX_TIME_MS)
        items: list[ArchiveItem] = []
        unarchived: list[tuple[MailboxEntry, str]] = []
        missing = 0
        for entry in entries:
            copy = ack.retention.get(entry.envelope_id)
            if entry.envelope_id in ack.unread:
                unarchived.append((entry, "unread"))
            elif envelope_version_of(entry.data) == ENVELOPE_VERSION:
                unarchived.append((entry, "version_1"))
            elif copy is None or org is None or org.key_named(copy[0]) is None:
                missing += 1
            else:
                items.append(
                    ArchiveItem(
                        envelope_id=entry.envelope_id,
                        group=group.name,
                        direction="inbound",
                        sender=entry.sender,
                        recipient=user,
                        key_id=copy[0],
                        delete_after_ms=keep_until,
                        envelope=entry.data,
                        wrap=copy[1],
                    )
                )
        if missing:
            current = f" for key {org.key.id}" if org is not None else ""
            return (
                f"group {group.name} is under inbound retention: acknowledge each envelope "
                f"read with a retention copy{current} ({missing} without one); nothing was "
                "deleted"
            )
        if items and self._archive is not None:
            items = await self._with_sender_keys(items, rules)
            archived = set(await self._archive.append(items, at_ms=now_ms))
            _count(group.name, rules.rules.groups, "inbound", items, archived)
        for entry, why in unarchived:
            await self._audit.record(
                "retention_not_archived",
                envelope_id=entry.envelope_id,
                user=user,
                sender=entry.sender,
                group=group.name,
                reason=why,
            )
        return [entry.envelope_id for entry in entries]

    async def _with_sender_keys(
        self, items: list[ArchiveItem], rules: CompiledRules
    ) -> list[ArchiveItem]:
        envelopes = []
        for item in items:
            try:
                envelopes.append(decode_envelope(item.envelope))
            except EnvelopeError:  # stored bytes the gateway validated: not expected
                log.warning("envelope %s: stored bytes do not decode", item.envelope_id)
        keys = await self._blobs(envelopes, rules, "inbound")
        return [
            dataclasses.replace(item, sender_key=keys.get(item.envelope_id, b"")) for item in items
        ]

    async def record_mismatches(
        self, *, user: str, group: str, peers: Collection[str], ids: Sequence[str]
    ) -> int:
        """Count and audit the reported envelopes found at the head of ``user``'s mailbox."""
        wanted = set(ids)
        found = [
            entry
            for entry in await self._mailboxes.mailbox_fetch(user, limit=HEAD)
            if entry.envelope_id in wanted
        ]
        for entry in found:
            sender_org = entry.sender.rpartition("@")[2]
            origin = "local" if sender_org == self._org else bounded(sender_org, peers)
            RETENTION_MISMATCH_REPORTS.labels(origin).inc()
            log.warning(
                "envelope %s from %s to %s: the recipient's client refused it, its retention "
                "copy does not match",
                entry.envelope_id,
                entry.sender,
                user,
                extra={
                    "event": "retention_mismatch",
                    "envelope_id": entry.envelope_id,
                    "user": user,
                },
            )
            await self._audit.record(
                "retention_mismatch",
                envelope_id=entry.envelope_id,
                user=user,
                sender=entry.sender,
                group=group,
            )
        return len(found)


def _count(
    group: str,
    groups: Collection[str],
    direction: str,
    items: Sequence[ArchiveItem],
    archived: set[str],
) -> None:
    label = bounded(group, groups)
    RETENTION_ARCHIVED.labels(label, direction).inc(len(archived))
    RETENTION_ARCHIVED_BYTES.labels(label, direction).inc(
        sum(len(item.envelope) for item in items if item.envelope_id in archived)
    )


# -- request bodies ---------------------------------------------------------------------


def _json(body: bytes, what: str) -> object:
    try:
        return loads_strict(body)
    except ValueError:
        raise ProtocolError(f"{what}: request body is not JSON") from None


def envelope_ids(value: object, name: str, limit: int) -> list[str]:
    """``value`` as a list of at most ``limit`` envelope ids; ``ProtocolError`` otherwise."""
    if not isinstance(value, list) or len(value) > limit:
        raise ProtocolError(f"field {name!r} must be a list of at most {limit} ids")
    for envelope_id in value:
        if not isinstance(envelope_id, str) or not ENVELOPE_ID_RE.fullmatch(envelope_id):
            raise ProtocolError(
                f"field {name!r} must hold envelope ids (22 characters of base64url)",
                reason=Reason.ENVELOPE_BAD_ID,
            )
    return value


def parse_report(body: bytes) -> list[str]:
    """``{"ids": [...]}`` of a retention mismatch report: 1 to :data:`MAX_IDS` ids."""
    obj = _json(body, "retention mismatch report")
    if not isinstance(obj, dict) or set(obj) != {"ids"}:
        raise ProtocolError("retention mismatch report: body must be a JSON object with 'ids'")
    ids = envelope_ids(obj["ids"], "ids", MAX_IDS)
    if not ids:
        raise ProtocolError(f"field 'ids' must be a list of 1 to {MAX_IDS} ids")
    return ids


def parse_ack(body: bytes) -> Ack:
    """``{"ids": [...]}``, with ``retention`` and ``unread`` under inbound retention."""
    obj = _json(body, "acknowledgement")
    if not isinstance(obj, dict) or "ids" not in obj or not obj.keys() <= _ACK_FIELDS:
        raise ProtocolError(
            "acknowledgement: body must be a JSON object with 'ids' "
            "(and, under inbound retention, 'retention' and 'unread')"
        )
    ids = envelope_ids(obj["ids"], "ids", MAX_IDS)
    unread = frozenset(envelope_ids(obj.get("unread", []), "unread", MAX_IDS))
    copies = obj.get("retention", {})
    if not isinstance(copies, dict) or len(copies) > MAX_IDS:
        raise ProtocolError(f"field 'retention' must map at most {MAX_IDS} envelope ids")
    retention = {envelope_id: _copy(envelope_id, copy) for envelope_id, copy in copies.items()}
    return Ack(ids, retention, unread)


def _copy(envelope_id: str, copy: object) -> tuple[str, bytes]:
    envelope_ids([envelope_id], "retention", 1)
    fields: Mapping[str, object] = copy if isinstance(copy, dict) else {}
    key_id, text = fields.get("key_id"), fields.get("wrap")
    if (
        fields.keys() != {"key_id", "wrap"}
        or not isinstance(key_id, str)
        or not RETENTION_KEY_ID_RE.fullmatch(key_id)
        or not isinstance(text, str)
    ):
        raise ProtocolError(
            "field 'retention' must map envelope ids to objects with key_id and wrap",
            reason=Reason.ENVELOPE_BAD_RETENTION,
        )
    try:
        wrap = b64url_decode_canonical(text)
    except ValueError:
        wrap = b""
    if len(wrap) != RETENTION_WRAP_BYTES:
        raise ProtocolError(
            f"a retention copy is {RETENTION_WRAP_BYTES} bytes of canonical base64url",
            reason=Reason.ENVELOPE_BAD_RETENTION,
        )
    return key_id, wrap
