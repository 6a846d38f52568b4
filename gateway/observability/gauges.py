"""State gauges refreshed on a short period: spool, mailboxes, own certificates.

Theory of operation
-------------------
Counters and histograms are updated where things happen. Gauges that describe
*stored state* (spool depth and oldest age per peer, mailbox depth per group)
are not: they are read from the storage by :func:`run_gauge_refresher` every
:data:`GAUGE_REFRESH_INTERVAL` seconds, and ``/metrics`` only renders what is
already there. So a scrape costs the same whatever the storage holds and a
scrape storm never turns into a query storm; the price is that these gauges
lag by up to one interval, well inside any alert's ``for:``. (The spool
sweeper also refreshes the spool gauges after each sweep; both read the same
storage, so they agree.)

Each refresh does two cheap reads in the storage's reader threads
(``spool_stats``: one row per non-empty lane; ``mailbox_stats``: one row per
non-empty mailbox) and, every :data:`OWN_CERTIFICATES_EVERY` refreshes, reads
the gateway's own certificate files in a worker thread. Mailbox depth is
summed by the recipient's group in the rules in force, never labelled per
user. A storage failure is logged and the next refresh tries again: the
refresher never takes the gateway down.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Protocol

import trio

from gateway.core.rules import CompiledRules
from gateway.errors import StorageError
from gateway.federation.sweeper import SpoolGauges
from gateway.observability.certs import CertificateGauges, read_own_not_after
from gateway.observability.metrics import (
    MAILBOX_BYTES,
    MAILBOX_ENVELOPES,
    OTHER,
    STORAGE_SEGMENT_BYTES,
    STORAGE_SEGMENT_FILES,
    STORAGE_SEGMENT_MISSING,
)
from gateway.storage.base import LaneStats, MailboxDepth

LOGGER = logging.getLogger("gateway.observability.gauges")

#: Seconds between refreshes: far below the 5-minute alert windows, and one
#: refresh is two indexed reads, so the storage does not notice it.
GAUGE_REFRESH_INTERVAL: Final = 10.0
#: Own certificate files change only on rotation: read them every Nth refresh.
OWN_CERTIFICATES_EVERY: Final = 30


class GaugeStorage(Protocol):
    """The part of :class:`~gateway.storage.base.Storage` the refresher reads."""

    async def spool_stats(self) -> dict[str, LaneStats]: ...

    async def mailbox_stats(self) -> dict[str, MailboxDepth]: ...


class RulesSource(Protocol):
    @property
    def current(self) -> CompiledRules: ...


def mailbox_totals(
    stats: Mapping[str, MailboxDepth], rules: CompiledRules
) -> dict[str, MailboxDepth]:
    """Mailbox depths summed by the recipient's group (``other``: in no group)."""
    envelopes: collections.Counter[str] = collections.Counter()
    size: collections.Counter[str] = collections.Counter()
    for recipient, depth in stats.items():
        group = rules.group_of(recipient.rpartition("@")[0])
        label = group.name if group is not None else OTHER
        envelopes[label] += depth.envelopes
        size[label] += depth.bytes
    return {
        label: MailboxDepth(envelopes=count, bytes=size[label])
        for label, count in envelopes.items()
    }


class MailboxGauges:
    """The mailbox gauges; groups shown before and empty now are shown as 0."""

    def __init__(self) -> None:
        self._shown: set[str] = set()

    def update(self, stats: Mapping[str, MailboxDepth], rules: CompiledRules) -> None:
        totals = mailbox_totals(stats, rules)
        # Every group of the rules gets a series (0 when empty), so dashboards see it.
        labels = set(totals) | set(rules.rules.groups)
        for label in self._shown - labels:
            MAILBOX_ENVELOPES.remove(label)
            MAILBOX_BYTES.remove(label)
        for label in labels:
            depth = totals.get(label, MailboxDepth(envelopes=0, bytes=0))
            MAILBOX_ENVELOPES.labels(label).set(depth.envelopes)
            MAILBOX_BYTES.labels(label).set(depth.bytes)
        self._shown = labels


async def refresh_gauges(
    storage: GaugeStorage,
    rules: CompiledRules,
    *,
    now_ms: int,
    spool: SpoolGauges,
    mailboxes: MailboxGauges,
) -> None:
    """One refresh of the storage-backed gauges."""
    spool.update(await storage.spool_stats(), now_ms=now_ms, peers=rules.peers.keys())
    mailboxes.update(await storage.mailbox_stats(), rules)
    segment_stats = getattr(storage, "segment_stats", None)  # SQLite's segment files only
    if segment_stats is not None:
        files, _envelopes, size = segment_stats()
        STORAGE_SEGMENT_FILES.set(files)
        STORAGE_SEGMENT_BYTES.set(size)
    segment_missing = getattr(storage, "segment_missing", None)
    if segment_missing is not None:
        STORAGE_SEGMENT_MISSING.set(segment_missing())


async def run_gauge_refresher(
    storage: GaugeStorage,
    rules: RulesSource,
    *,
    clock_ms: Callable[[], int],
    own_certificates: Mapping[str, Path],
    certificates: CertificateGauges,
    interval: float = GAUGE_REFRESH_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Refresh now, then every ``interval`` seconds, until cancelled.

    ``own_certificates`` maps names of
    :data:`~gateway.observability.certs.OWN_CERTIFICATES` to their files.
    """
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval!r}")
    spool, mailboxes = SpoolGauges(), MailboxGauges()
    turn = 0
    started = False
    while True:
        if turn % OWN_CERTIFICATES_EVERY == 0:
            certificates.show_own(
                await trio.to_thread.run_sync(read_own_not_after, dict(own_certificates))
            )
        try:
            await refresh_gauges(
                storage, rules.current, now_ms=clock_ms(), spool=spool, mailboxes=mailboxes
            )
        except StorageError as exc:  # one line, traceback at DEBUG: a disk or database fault
            LOGGER.error(  # noqa: TRY400
                "refreshing the spool and mailbox gauges failed: %s; next try in %ss",
                exc.message,
                interval,
                exc_info=LOGGER.isEnabledFor(logging.DEBUG),
            )
        if not started:
            task_status.started()
            started = True
        turn += 1
        await trio.sleep(interval)
