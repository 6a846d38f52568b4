"""Storing allowed submissions: local ones into mailboxes, others into the spool.

Each write is bounded (``lane_bound``, ``mailbox_bound``): a full mailbox or
lane refuses the envelopes for it and the rest is written again
(:func:`store_what_fits`); a full disk refuses the whole write.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gateway.errors import CapacityError, Reason, StorageFullError
from gateway.observability.metrics import (
    MAILBOX_FULL_REFUSALS,
    SPOOL_FULL_REFUSALS,
    STORAGE_RESERVE_REFUSALS,
)
from gateway.reserve import Reserve
from gateway.storage.base import Bound, DeliverOutcome, EnvelopeRecord, SpoolItem, Storage

log = logging.getLogger("gateway.clientapi")

_Item = TypeVar("_Item", EnvelopeRecord, SpoolItem)
_Written = TypeVar("_Written")


async def store_what_fits(
    items: list[_Item],
    key_of: Callable[[_Item], str],
    write: Callable[[list[_Item]], Awaitable[_Written]],
    reason: Reason,
    full: dict[str, Reason],
    refused: Callable[[frozenset[str], list[_Item]], None],
) -> _Written | None:
    """``write(items)``, leaving out the items of every key the bound says is full.

    The bound is checked inside the write, and a full key refuses the whole
    call: the items of the keys named full are marked ``reason`` in ``full``,
    ``refused(keys, items)`` counts them, and the rest is written again. Each
    round leaves out at least one more key, so it ends; ``None`` when nothing
    was left to write.
    """
    while items:
        try:
            return await write(items)
        except CapacityError as exc:
            dropped = [item for item in items if key_of(item) in exc.full]
            if not dropped:  # the store named no key of ours: never loop on it
                raise
            for item in dropped:
                full[item.envelope_id] = reason
            refused(exc.full, dropped)
            items = [item for item in items if key_of(item) not in exc.full]
    return None


class SubmissionStore:
    """Writes a submission's allowed envelopes, leaving out what finds no room."""

    def __init__(
        self,
        *,
        storage: Storage,
        lane_bound: Bound | None,
        mailbox_bound: Bound | None,
        reserve: Reserve | None,
    ) -> None:
        self._storage = storage
        self._lane_bound = lane_bound
        self._mailbox_bound = mailbox_bound
        self._reserve = reserve

    def disk_full(
        self, exc: StorageFullError, items: Sequence[EnvelopeRecord], full: dict[str, Reason]
    ) -> None:
        """A write found no room on the disk: its envelopes are refused, nothing was stored."""
        for item in items:
            full.setdefault(item.envelope_id, Reason.INSUFFICIENT_STORAGE)
        STORAGE_RESERVE_REFUSALS.labels("client").inc(len(items))
        if self._reserve is not None:
            self._reserve.note_full()
        log.error("refused %d envelope(s): %s", len(items), exc.message)

    async def put_local(
        self, entries: list[EnvelopeRecord], now_ms: int, full: dict[str, Reason]
    ) -> DeliverOutcome:
        """Store local deliveries; entries for full mailboxes go into ``full`` instead."""

        async def write(batch: list[EnvelopeRecord]) -> DeliverOutcome:
            return await self._storage.mailbox_put_local(
                batch, at_ms=now_ms, bound=self._mailbox_bound
            )

        def refused(_recipients: frozenset[str], dropped: list[EnvelopeRecord]) -> None:
            MAILBOX_FULL_REFUSALS.labels("local").inc(len(dropped))

        outcome = await store_what_fits(
            entries, lambda e: e.recipient, write, Reason.MAILBOX_FULL, full, refused
        )
        return outcome if outcome is not None else DeliverOutcome(stored=(), recipients=frozenset())

    async def put_spool(
        self, items: list[SpoolItem], now_ms: int, full: dict[str, Reason]
    ) -> list[str]:
        """Spool ``items``; items for full lanes go into ``full`` instead."""

        async def write(batch: list[SpoolItem]) -> list[str]:
            return await self._storage.spool_put(batch, at_ms=now_ms, bound=self._lane_bound)

        def refused(peers: frozenset[str], dropped: list[SpoolItem]) -> None:
            for peer in peers:
                SPOOL_FULL_REFUSALS.labels(peer).inc(sum(1 for i in dropped if i.peer == peer))
            log.warning(
                "spool lane full for %s: submissions to it are refused (503) until it drains",
                ", ".join(sorted(peers)),
                extra={"event": "lane_full", "peers": sorted(peers)},
            )

        spooled = await store_what_fits(
            items, lambda i: i.peer, write, Reason.LANE_FULL, full, refused
        )
        return spooled if spooled is not None else []
