"""The retention archive's interface, shared by both engines (docs/retention.md).

:class:`Archive` is what the services use (the client API appends, the
archive sweeper expires and reads the stats, ``gateway retention`` exports
and manages holds); :class:`~gateway.storage.sqlite.archive.SqliteArchive`
and :class:`~gateway.storage.postgres.archive.PostgresArchive` implement it
with the same semantics, and the same contract tests run on both
(tests/integration/test_retention_archive.py). The values, bounds, argument
checks and row mapping live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from gateway.core.archive import (
    DIRECTIONS,
    MAX_SENDER_KEY_BYTES,
    ArchiveItem,
    ArchiveRecord,
)
from gateway.core.envelope import RETENTION_WRAP_BYTES
from gateway.storage.base import (
    MAX_ENVELOPE_ID_LENGTH,
    MAX_ITEMS_PER_CALL,
    MAX_USER_LENGTH,
    check_ms,
    check_text,
)

DELETE_CHUNK: Final = 1_000  # records deleted per commit
MAX_NOTE_LENGTH: Final = 500
MAX_RECORDS_PER_READ: Final = 1_000
MAX_LABEL_LENGTH: Final = 64  # group names and key ids

#: The columns a record is read from, in :func:`archive_record`'s order.
RECORD_COLUMNS: Final = (
    "seq, envelope_id, grp, direction, sender, recipient, key_id, archived_ms, "
    "delete_after_ms, envelope, prev, hash, wrap, sender_key"
)


@dataclass(frozen=True, slots=True)
class ArchiveStats:
    records: int
    bytes: int
    oldest_archived_ms: int | None
    holds: int


@dataclass(frozen=True, slots=True)
class Hold:
    user: str
    added_ms: int
    note: str


class Archive(Protocol):
    """The retention archive of one storage."""

    async def append(self, items: Sequence[ArchiveItem], *, at_ms: int) -> list[str]:
        """Archive ``items`` durably, chained after the newest record; the ids newly archived.

        An envelope already archived in the same direction is skipped (a
        client's retry). Appends from several processes sharing the storage
        still make one chain.
        """
        ...

    async def records(
        self,
        *,
        from_ms: int,
        to_ms: int,
        user: str | None = None,
        after_seq: int = 0,
        limit: int = MAX_RECORDS_PER_READ,
    ) -> list[ArchiveRecord]:
        """Records archived in ``[from_ms, to_ms)``, by seq, after ``after_seq``; of ``user``."""
        ...

    async def expire(self, *, now_ms: int) -> int:
        """Delete records past their ``delete_after_ms`` that no hold keeps; how many.

        Safe to run from several processes at once: each record goes once.
        """
        ...

    async def hold_add(self, user: str, *, at_ms: int, note: str = "") -> bool:
        """Hold ``user``'s records past their deletion time; False if already held."""
        ...

    async def hold_remove(self, user: str) -> bool: ...

    async def holds(self) -> list[Hold]: ...

    async def stats(self) -> ArchiveStats: ...


def check_append(items: Sequence[ArchiveItem], at_ms: int) -> list[ArchiveItem]:
    """``items`` as a list once every one is valid; ``ValueError``/``TypeError`` otherwise."""
    check_ms("at_ms", at_ms)
    if len(items) > MAX_ITEMS_PER_CALL:
        raise ValueError(f"at most {MAX_ITEMS_PER_CALL} items per call")
    for item in items:
        check_item(item)
    return list(items)


def check_item(item: ArchiveItem) -> None:
    if not isinstance(item, ArchiveItem):
        raise TypeError(f"expected an ArchiveItem, got {type(item).__name__}")
    check_text("envelope_id", item.envelope_id, MAX_ENVELOPE_ID_LENGTH)
    check_text("sender", item.sender, MAX_USER_LENGTH)
    check_text("recipient", item.recipient, MAX_USER_LENGTH)
    check_text("group", item.group, MAX_LABEL_LENGTH)
    check_text("key_id", item.key_id, MAX_LABEL_LENGTH)
    check_ms("delete_after_ms", item.delete_after_ms)
    if item.direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    if not isinstance(item.envelope, bytes) or not item.envelope:
        raise ValueError("envelope must be non-empty bytes")
    if not isinstance(item.wrap, bytes) or len(item.wrap) not in (0, RETENTION_WRAP_BYTES):
        raise ValueError(f"wrap must be empty or {RETENTION_WRAP_BYTES} bytes")
    if not isinstance(item.sender_key, bytes) or len(item.sender_key) > MAX_SENDER_KEY_BYTES:
        raise ValueError(f"sender_key must be bytes, at most {MAX_SENDER_KEY_BYTES}")
    if not item.sender_key.isascii():
        raise ValueError("sender_key must be ASCII JSON (sender_key_blob)")


def check_read(*, from_ms: int, to_ms: int, user: str | None, limit: int) -> None:
    check_ms("from_ms", from_ms)
    check_ms("to_ms", to_ms)
    if not 0 < limit <= MAX_RECORDS_PER_READ:
        raise ValueError(f"limit must be within 1-{MAX_RECORDS_PER_READ}")
    if user is not None:
        check_text("user", user, MAX_USER_LENGTH)


def check_hold(user: str, at_ms: int, note: str) -> None:
    check_text("user", user, MAX_USER_LENGTH)
    check_ms("at_ms", at_ms)
    if len(note) > MAX_NOTE_LENGTH:
        raise ValueError(f"a note is at most {MAX_NOTE_LENGTH} characters")


def archive_record(row: Sequence[object]) -> ArchiveRecord:
    """A record from a row of :data:`RECORD_COLUMNS` (either engine's types)."""
    seq, envelope_id, grp, direction, sender, recipient, key_id, archived, delete_after = row[:9]
    envelope, prev, digest, wrap, sender_key = row[9:]
    return ArchiveRecord(
        seq=int(seq),  # type: ignore[call-overload]
        envelope_id=str(envelope_id),
        group=str(grp),
        direction=str(direction),
        sender=str(sender),
        recipient=str(recipient),
        key_id=str(key_id),
        archived_ms=int(archived),  # type: ignore[call-overload]
        delete_after_ms=int(delete_after),  # type: ignore[call-overload]
        envelope=bytes(envelope),  # type: ignore[call-overload]
        prev=bytes(prev),  # type: ignore[call-overload]
        hash=bytes(digest),  # type: ignore[call-overload]
        wrap=bytes(wrap),  # type: ignore[call-overload]
        sender_key=bytes(sender_key),  # type: ignore[call-overload]
    )
