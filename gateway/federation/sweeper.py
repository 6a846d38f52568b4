"""The spool sweeper: envelopes that expire while spooled leave with status ``expired``.

Theory of operation
-------------------
Every ``interval`` seconds, :func:`run_spool_sweeper` runs one
:func:`sweep_spool`:

1. ``spool_expire(now)`` in batches of ``batch`` until a batch comes back
   short (at most ``max_batches`` per sweep, so one sweep is bounded; the
   rest waits for the next). The storage records status ``expired`` in the
   same commit that removes each envelope. Whatever lane they were in, and
   whether or not that peer is still in the rules, expired envelopes go: this
   is how the envelopes of a peer that is down, or gone from the rules, end.
2. After any removal, ``scrub()``, so the deleted ciphertext does not linger
   in the engine's journal. (``False`` means readers held it back; the next
   sweep tries again.)
3. The spool gauges are refreshed from ``spool_stats()``: depth and age of
   the oldest envelope per peer. Peers come from the rules (``peers()``); any
   other lane is summed into the ``other`` label. A lane that emptied since
   the last sweep is shown as 0.

The sender also drops expired envelopes it finds at the head of a lane
before sending; between the two, an envelope past its expiry is never sent.
A storage failure is logged and the sweep is tried again at the next
interval: the sweeper never takes the gateway down.

Time: ``clock_ms`` gives Unix ms for expiry; the waits are ``trio.sleep``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from gateway.errors import StorageError
from gateway.observability.metrics import (
    FEDERATION_ENVELOPES,
    OTHER,
    SPOOL_ENVELOPES,
    SPOOL_EXPIRED,
    SPOOL_OLDEST_AGE,
    bounded,
)
from gateway.storage.base import EXPIRE_BATCH, MAX_ITEMS_PER_CALL, ExpiredEnvelope, LaneStats

LOGGER = logging.getLogger("gateway.federation.sweeper")

DEFAULT_SWEEP_INTERVAL: Final = 60.0  # seconds: expiry is honoured to within a minute
MAX_BATCHES_PER_SWEEP: Final = 100  # x EXPIRE_BATCH envelopes per sweep, at most
MS_PER_SECOND: Final = 1000
_DIRECTION: Final = "outbound"
_OUTCOME_EXPIRED: Final = "expired"


class SweeperStorage(Protocol):
    """The part of :class:`~gateway.storage.base.Storage` the sweeper uses."""

    async def spool_expire(self, now_ms: int, *, limit: int = ...) -> list[ExpiredEnvelope]: ...

    async def spool_stats(self) -> dict[str, LaneStats]: ...

    async def scrub(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class SweepResult:
    expired: int  # envelopes removed with status `expired`
    scrubbed: bool | None  # None: nothing removed, no scrub needed
    lanes: int  # non-empty lanes after the sweep


def _no_peers() -> Collection[str]:
    return ()


class SpoolGauges:
    """The spool gauges, remembering which labels it set so emptied lanes show 0."""

    def __init__(self) -> None:
        self._shown: set[str] = set()

    def update(self, stats: dict[str, LaneStats], *, now_ms: int, peers: Collection[str]) -> None:
        depth: collections.Counter[str] = collections.Counter()
        oldest: dict[str, int] = {}
        for lane in stats.values():
            label = bounded(lane.peer, peers)
            depth[label] += lane.depth
            if label not in oldest or lane.oldest_spooled_ms < oldest[label]:
                oldest[label] = lane.oldest_spooled_ms
        for label in self._shown - set(depth):
            SPOOL_ENVELOPES.labels(label).set(0)
            SPOOL_OLDEST_AGE.labels(label).set(0)
        for label, count in depth.items():
            SPOOL_ENVELOPES.labels(label).set(count)
            SPOOL_OLDEST_AGE.labels(label).set(max(0, now_ms - oldest[label]) / MS_PER_SECOND)
        self._shown = set(depth)


async def sweep_spool(
    storage: SweeperStorage,
    *,
    now_ms: int,
    peers: Collection[str] = (),
    gauges: SpoolGauges | None = None,
    batch: int = EXPIRE_BATCH,
    max_batches: int = MAX_BATCHES_PER_SWEEP,
    scrub: bool = False,
    expire: bool = True,
) -> SweepResult:
    """One sweep at ``now_ms``: expire, scrub if anything went (or ``scrub``), refresh gauges.

    With ``expire`` False (another node runs the org's sweeps) only the gauges.
    """
    if not 1 <= batch <= MAX_ITEMS_PER_CALL:
        raise ValueError(f"batch must be within 1..{MAX_ITEMS_PER_CALL}, got {batch}")
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    by_peer: collections.Counter[str] = collections.Counter()
    for _ in range(max_batches if expire else 0):
        expired = await storage.spool_expire(now_ms, limit=batch)
        for envelope in expired:
            by_peer[bounded(envelope.peer or OTHER, peers)] += 1
        if len(expired) < batch:
            break
    total = sum(by_peer.values())
    if total:
        for label, count in by_peer.items():
            SPOOL_EXPIRED.labels(label).inc(count)
            FEDERATION_ENVELOPES.labels(_DIRECTION, label, _OUTCOME_EXPIRED).inc(count)
        LOGGER.info(
            "spool: %d envelope(s) expired (%s)",
            total,
            ", ".join(f"{peer}: {count}" for peer, count in sorted(by_peer.items())),
        )
    scrubbed: bool | None = None
    if total or (scrub and expire):
        scrubbed = await storage.scrub()
        if not scrubbed:
            LOGGER.info("spool: scrub held back by readers; the next sweep tries again")
    stats = await storage.spool_stats()
    (gauges or SpoolGauges()).update(stats, now_ms=now_ms, peers=peers)
    return SweepResult(expired=total, scrubbed=scrubbed, lanes=len(stats))


async def run_spool_sweeper(
    storage: SweeperStorage,
    *,
    clock_ms: Callable[[], int],
    interval: float = DEFAULT_SWEEP_INTERVAL,
    peers: Callable[[], Collection[str]] = _no_peers,
    sweeps: Callable[[], bool] = lambda: True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sweep now and then every ``interval`` seconds, until cancelled.

    ``peers()`` names the peers of the rules in force (the metric labels).
    ``sweeps()`` says whether this node runs the org's expiry now (it holds the
    sweeper lease, gateway.cluster); every node refreshes its gauges.
    """
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval!r}")
    gauges = SpoolGauges()
    scrub_pending = False
    task_status.started()
    while True:
        try:
            result = await sweep_spool(
                storage,
                now_ms=clock_ms(),
                peers=peers(),
                gauges=gauges,
                scrub=scrub_pending,
                expire=sweeps(),
            )
            scrub_pending = result.scrubbed is False
        except StorageError as exc:  # one line, traceback at DEBUG: a disk or database fault
            LOGGER.error(  # noqa: TRY400
                "spool sweep failed: %s; trying again in %ss",
                exc.message,
                interval,
                exc_info=LOGGER.isEnabledFor(logging.DEBUG),
            )
        await trio.sleep(interval)
