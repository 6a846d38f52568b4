"""What both storage engines share: argument checks and row mapping.

Each engine's methods check their arguments with these before anything
touches the database (``ValueError``, a caller's bug), and map the rows they
read back into the values of :mod:`gateway.storage.base` the same way, so
the two engines answer alike.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from gateway.core.address import MAX_DOMAIN_LENGTH
from gateway.storage.base import (
    MAX_ENVELOPE_ID_LENGTH,
    MAX_ITEMS_PER_CALL,
    MAX_STATUS_LENGTH,
    MAX_USER_LENGTH,
    RESULT_ACCEPTED,
    EnvelopeRecord,
    MailboxEntry,
    PeerState,
    SessionRecord,
    SpoolEntry,
    SpoolSummary,
    TxnRecord,
    check_batch,
    check_status,
    check_text,
)

Row = tuple[Any, ...]
_R = TypeVar("_R", bound=EnvelopeRecord)


# -- argument checks (before anything is queued) ---------------------------------
def _peer(peer: object) -> str:
    return check_text("peer", peer, MAX_DOMAIN_LENGTH)


def _user(user: object) -> str:
    return check_text("user", user, MAX_USER_LENGTH)


def _ids(what: str, ids: Collection[str]) -> list[str]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Collection):
        raise ValueError(f"{what} must be a collection of envelope ids, got {type(ids).__name__}")
    if len(ids) > MAX_ITEMS_PER_CALL:
        raise ValueError(f"{what}: {len(ids)} ids in one call, at most {MAX_ITEMS_PER_CALL}")
    return [check_text(f"{what} id", i, MAX_ENVELOPE_ID_LENGTH) for i in ids]


def _records(what: str, entries: Sequence[EnvelopeRecord], kind: type[EnvelopeRecord]) -> None:
    check_batch(what, entries)
    for entry in entries:
        if not isinstance(entry, kind):
            raise ValueError(f"{what} must hold {kind.__name__}, got {type(entry).__name__}")


def _statuses(results: Mapping[str, str]) -> list[tuple[str, str]]:
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a mapping, got {type(results).__name__}")
    if len(results) > MAX_ITEMS_PER_CALL:
        raise ValueError(f"results: {len(results)} in one call, at most {MAX_ITEMS_PER_CALL}")
    return [
        (check_text("results id", k, MAX_ENVELOPE_ID_LENGTH), check_status(v))
        for k, v in results.items()
    ]


def _txn_results(results: Mapping[str, str], entries: Sequence[EnvelopeRecord]) -> str:
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a mapping, got {type(results).__name__}")
    if len(results) > MAX_ITEMS_PER_CALL:
        raise ValueError(f"results: {len(results)} in one call, at most {MAX_ITEMS_PER_CALL}")
    for key, value in results.items():
        check_text("results id", key, MAX_ENVELOPE_ID_LENGTH)
        check_text(f"result of {key}", value, MAX_STATUS_LENGTH)
    for entry in entries:
        if results.get(entry.envelope_id) != RESULT_ACCEPTED:
            raise ValueError(
                f"entry {entry.envelope_id} is stored but its result is "
                f"{results.get(entry.envelope_id)!r}, not {RESULT_ACCEPTED!r}"
            )
    return json.dumps(dict(results), separators=(",", ":"))


# -- row mapping -----------------------------------------------------------------
# Envelope rows (spool_take, mailbox_fetch: once per envelope sent or fetched)
# become records without the record checks: this file is ours, and every such
# row was written (spool_put, _store_in_mailboxes) from a record that passed
# them, with times from check_ms. See EnvelopeRecord._from_trusted.
def _spool_entry(row: Row) -> SpoolEntry:
    seq, envelope_id, peer, sender, recipient, created, expires, spooled, burn, data = row
    return SpoolEntry._from_trusted(
        seq=seq,
        envelope_id=envelope_id,
        peer=peer,
        sender=sender,
        recipient=recipient,
        created_ms=created,
        expires_ms=expires,
        spooled_ms=spooled,
        burn_on_read=bool(burn),
        data=bytes(data),
    )


def _spool_summary(row: Row) -> SpoolSummary:
    seq, envelope_id, peer, sender, recipient, created, expires, spooled, size = row
    return SpoolSummary(
        seq=seq,
        envelope_id=envelope_id,
        peer=peer,
        sender=sender,
        recipient=recipient,
        created_ms=created,
        expires_ms=expires,
        spooled_ms=spooled,
        size=size,
    )


def _mailbox_entry(row: Row) -> MailboxEntry:
    seq, envelope_id, recipient, sender, created, expires, stored, burn, data = row
    return MailboxEntry._from_trusted(
        seq=seq,
        envelope_id=envelope_id,
        recipient=recipient,
        sender=sender,
        created_ms=created,
        expires_ms=expires,
        stored_ms=stored,
        burn_on_read=bool(burn),
        data=bytes(data),
    )


def _txn_record(origin: str, txn_id: str, row: Row) -> TxnRecord:
    body_hash, results, at_ms = row
    return TxnRecord(
        origin=origin,
        txn_id=txn_id,
        body_hash=bytes(body_hash),
        results=json.loads(results),
        at_ms=at_ms,
    )


def _peer_state(row: Row) -> PeerState:
    peer, failures, backoff_until, last_success, last_error = row
    return PeerState(
        peer=peer,
        failures=failures,
        backoff_until_ms=backoff_until,
        last_success_ms=last_success,
        last_error=last_error,
    )


def _first_unseen(entries: Sequence[_R], skip: set[str]) -> list[_R]:
    """Entries whose id is not in ``skip``, each id once (its first occurrence), in order."""
    fresh: list[_R] = []
    for entry in entries:
        if entry.envelope_id not in skip:
            skip.add(entry.envelope_id)
            fresh.append(entry)
    return fresh


# -- sign-in sessions: one row shape for both engines -------------------------------
# Columns, in order: session_id, user, provider, access_hash, access_expires_ms,
# refresh_hash, refresh_expires_ms, created_ms, idp_refresh_token, idp_groups,
# acr, amr (the lists as JSON arrays).
def _session_values(record: SessionRecord) -> tuple[object, ...]:
    if not isinstance(record, SessionRecord):
        raise TypeError("session_put takes a SessionRecord")
    return (
        record.session_id,
        record.user,
        record.provider,
        record.access_hash,
        record.access_expires_ms,
        record.refresh_hash,
        record.refresh_expires_ms,
        record.created_ms,
        record.idp_refresh_token,
        json.dumps(list(record.idp_groups)),
        record.acr,
        json.dumps(list(record.amr)),
    )


def _session_record(row: Row) -> SessionRecord:
    return SessionRecord(
        session_id=row[0],
        user=row[1],
        provider=row[2],
        access_hash=bytes(row[3]),
        access_expires_ms=int(row[4]),
        refresh_hash=bytes(row[5]),
        refresh_expires_ms=int(row[6]),
        created_ms=int(row[7]),
        idp_refresh_token=row[8],
        idp_groups=tuple(json.loads(row[9])),
        acr=row[10],
        amr=tuple(json.loads(row[11])),
    )
