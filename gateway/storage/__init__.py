"""Durable state: the storage interface and its engines.

Everything the gateway must not lose or must not do twice lives behind one
interface, :class:`gateway.storage.base.Storage`:

* the **spool**: outbound envelopes, one lane per peer, in insertion order;
* **mailboxes**: inbound envelopes, one per local user;
* **dedup**: every envelope id a mailbox ever accepted (until it expires), so a
  re-sent envelope is answered ``accepted`` and not stored twice;
* **transactions**: each received ``(origin, txn_id)`` with the hash of its
  body and its per-envelope results, so a retry gets the same answer;
* **delivery statuses** of envelopes our users sent;
* **peer state**: failures and backoff, so a restart does not hammer a dead peer;
* client **tokens** (hashed) and published **user key records**.

Engines: :mod:`gateway.storage.sqlite` (embedded, the default) and
:mod:`gateway.storage.postgres` (a PostgreSQL database, ``storage:
postgresql://...``); :mod:`gateway.storage.opening` opens the one a config
names. Both pass the same contract tests. Services depend on
:class:`~gateway.storage.base.Storage` only, so a test can hand them a fake.

Every write method is durable when it returns; every method raises
:class:`gateway.errors.StorageError` when the database fails, and
``ValueError`` for arguments that break the interface's own rules (a
programming error in the caller, never input from the network).
"""

from gateway.storage.base import (
    RESULT_ACCEPTED,
    STATUS_DELIVERED,
    STATUS_EXPIRED,
    STATUS_FORWARDED,
    STATUS_PURGED,
    STATUS_QUEUED,
    DeliverOutcome,
    DeliveryStatus,
    EnvelopeRecord,
    ExpiredEnvelope,
    LaneStats,
    MailboxEntry,
    PeerState,
    PruneCounts,
    SpoolEntry,
    SpoolItem,
    SpoolSummary,
    Storage,
    TxnRecord,
    rejected_status,
)

__all__ = [
    "RESULT_ACCEPTED",
    "STATUS_DELIVERED",
    "STATUS_EXPIRED",
    "STATUS_FORWARDED",
    "STATUS_PURGED",
    "STATUS_QUEUED",
    "DeliverOutcome",
    "DeliveryStatus",
    "EnvelopeRecord",
    "ExpiredEnvelope",
    "LaneStats",
    "MailboxEntry",
    "PeerState",
    "PruneCounts",
    "SpoolEntry",
    "SpoolItem",
    "SpoolSummary",
    "Storage",
    "TxnRecord",
    "rejected_status",
]
