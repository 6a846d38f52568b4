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

Only envelopes among the first :data:`HEAD` of the caller's mailbox are looked
at: a client acknowledges and reports what it just fetched, from the head; so
a report cannot put words into the audit log about envelopes the caller never
received, and an acknowledgement cannot delete what it did not archive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from gateway.core.archive import ArchiveItem
from gateway.core.encoding import b64url_decode_canonical, loads_strict
from gateway.core.envelope import (
    ENVELOPE_ID_RE,
    ENVELOPE_VERSION,
    MAX_TIME_MS,
    RETENTION_KEY_ID_RE,
    RETENTION_WRAP_BYTES,
    Envelope,
    envelope_version_of,
)
from gateway.core.rules import CompiledRules, Group
from gateway.errors import ProtocolError, Reason
from gateway.observability.audit import AuditSink
from gateway.observability.metrics import (
    RETENTION_ARCHIVED,
    RETENTION_ARCHIVED_BYTES,
    RETENTION_MISMATCH_REPORTS,
    bounded,
)
from gateway.storage.base import MailboxEntry

log = logging.getLogger("gateway.clientapi")

HEAD: Final = 500  # envelopes at the head of a mailbox an ack or report may name
MAX_IDS: Final = 500  # ids in one acknowledgement or report
MS_PER_SECOND: Final = 1000
_ACK_FIELDS: Final = frozenset({"ids", "retention", "unread"})


class ArchiveSink(Protocol):
    """Where retained envelopes go (the storage's retention archive)."""

    async def append(self, items: Sequence[ArchiveItem], *, at_ms: int) -> list[str]: ...


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
    ) -> None:
        self._org = org
        self._mailboxes = mailboxes
        self._archive = archive  # None: enforced, nothing archived (tests, tools)
        self._audit = audit
        self._clock_ms = clock_ms

    async def archive_sent(
        self,
        *,
        group: Group,
        groups: Collection[str],
        sent: Sequence[tuple[Envelope, bytes]],
        now_ms: int,
    ) -> None:
        """Archive ``sent`` (envelope, stored bytes) if ``group`` is under outbound retention."""
        retention = group.retention
        if self._archive is None or not retention.outbound:
            return
        keep_until = min(now_ms + retention.keep * MS_PER_SECOND, MAX_TIME_MS)
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
            )
            for env, data in sent
            if env.retention is not None
        ]
        if items:
            archived = set(await self._archive.append(items, at_ms=now_ms))
            _count(group.name, groups, "outbound", items, archived)

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
