"""The retention archive's keeper: deletes what its group's ``keep`` let go, shows its state.

Every ``interval`` seconds: delete the archive records whose ``delete_after``
has passed and whose sender and recipient no legal hold names
(:meth:`~gateway.storage.archive.Archive.expire`; on SQLite, deleted rows
leave the file's bytes through secure delete and the scrub, as the mailbox
sweeper's do), then set the archive gauges. A failure is logged and tried
again next time: the archive keeps growing meanwhile, never shrinks wrongly.

In a cluster (PostgreSQL) every node runs this sweeper, without a lease: the
deletions are idempotent and safe to run at once (each node deletes rows no
other node is deleting, :mod:`gateway.storage.postgres.archive`), so two
nodes sweeping together delete each record once, and
``gateway_retention_archive_deleted_total`` summed over the nodes counts each
once. The gauges are the shared archive's, the same on every node.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import trio

from gateway.errors import StorageError, StorageFullError
from gateway.observability.metrics import (
    RETENTION_ARCHIVE_DELETED,
    RETENTION_ARCHIVE_OLDEST_AGE,
    RETENTION_ARCHIVE_RECORDS,
    RETENTION_HOLDS,
)
from gateway.storage.archive import ArchiveStats

LOGGER = logging.getLogger("gateway.retention")

ARCHIVE_SWEEP_INTERVAL: Final = 60.0  # seconds


class SweptArchive(Protocol):
    async def expire(self, *, now_ms: int) -> int: ...

    async def stats(self) -> ArchiveStats: ...


async def _no_scrub() -> bool:
    return True


async def sweep_archive(
    archive: SweptArchive, *, now_ms: int, scrub: Callable[[], Awaitable[bool]] = _no_scrub
) -> int:
    """One sweep: delete what may go, set the gauges; how many records went.

    ``scrub`` (the storage's) makes deleted records unrecoverable from the
    engine's files at once, as the mailbox sweeper does after its deletions.
    """
    deleted = await archive.expire(now_ms=now_ms)
    if deleted:
        RETENTION_ARCHIVE_DELETED.inc(deleted)
        LOGGER.info("retention archive: %d record(s) past their keep deleted", deleted)
        await scrub()
    stats = await archive.stats()
    RETENTION_ARCHIVE_RECORDS.set(stats.records)
    RETENTION_HOLDS.set(stats.holds)
    oldest = stats.oldest_archived_ms
    RETENTION_ARCHIVE_OLDEST_AGE.set(0 if oldest is None else max(0, now_ms - oldest) / 1000)
    return deleted


async def run_archive_sweeper(
    archive: SweptArchive,
    *,
    clock_ms: Callable[[], int],
    interval: float = ARCHIVE_SWEEP_INTERVAL,
    scrub: Callable[[], Awaitable[bool]] = _no_scrub,
    sweeps: Callable[[], bool] = lambda: True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sweep now and every ``interval`` seconds until cancelled.

    Only while ``sweeps()`` (this node holds the org's sweeper lease, gateway.cluster).
    """
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval!r}")
    task_status.started()
    while True:
        if not sweeps():
            await trio.sleep(interval)
            continue
        try:
            await sweep_archive(archive, now_ms=clock_ms(), scrub=scrub)
        except StorageFullError as exc:  # no traceback: not a bug (gateway.reserve)
            LOGGER.error("archive sweep failed: %s; trying again in %ss", exc.message, interval)  # noqa: TRY400
        except StorageError:
            LOGGER.exception("archive sweep failed; trying again in %ss", interval)
        await trio.sleep(interval)
