"""The free-space reserve: new work stops before the disk is full, and resumes by itself.

After Postfix's ``queue_minfree``. A store that fills its disk to the last
byte cannot even delete: SQLite writes a deleted page's new contents (zeroes,
``secure_delete``) to the WAL first, so at 0 bytes free an acknowledgement, an
expiry or a completed transaction fails like a submission does. So the gateway
keeps ``limits.storage_min_free_bytes`` in reserve: below it, **new**
envelopes (client submissions, inbound transactions) are refused with a
temporary answer, while everything that frees space (acknowledgements, expiry,
the spool draining to a peer, purges) goes on in the reserve.

What counts as available is the free space of the filesystem that holds the
database **plus the free pages inside the database**: SQLite keeps a deleted
row's pages for reuse instead of giving them back to the filesystem, so once
a mailbox is read or a lane drains the gateway has room again although
``df`` shows none. :meth:`SpaceReserve.watch` samples both every
``interval`` seconds. Between two samples a fast client could write more
than the reserve, so the request paths **admit** each request against the
last sample minus what was admitted since (:meth:`SpaceReserve.admit`, the
request's size and a quarter for rows, indexes and the WAL); a submission
costs no system call, except near the line, where a fresh sample decides. A write
that fails for want of space anyway (another process filled the disk between
two samples) calls :meth:`SpaceReserve.note_full`, which holds the reserve
closed until the next sample says otherwise.

Once closed (a sample below the reserve, a request that would take the
space below it, or a full disk), the reserve stays closed until a sample
finds :data:`RESUME_FACTOR` times the reserve available: the gateway does
not flap between taking and refusing while it hovers at the line, and
``/readyz`` says the same thing twice in a row.

Metrics: ``gateway_storage_available_bytes`` and
``gateway_storage_reserve_bytes`` (each sample), and
``gateway_storage_reserve_refusals_total{path}`` (counted by the callers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Protocol

import trio

from gateway.observability.metrics import STORAGE_AVAILABLE_BYTES, STORAGE_RESERVE_BYTES

LOGGER = logging.getLogger("gateway.storage")

DEFAULT_INTERVAL: Final = 0.5  # seconds between samples
#: Bytes of disk one byte of a request takes, about (rows, indexes, the WAL's share;
#: measured on a 25 MB tmpfs: 10.5 MB of envelopes took 12.7 MB). Each sample corrects it.
WRITE_AMPLIFICATION: Final = 1.25
#: A closed reserve opens again once this many times the reserve is available.
RESUME_FACTOR: Final = 1.25
#: What a client or a peer is told to wait before trying again.
RETRY_AFTER_SECONDS: Final = 30

FreeBytes = Callable[[], Awaitable[int]]


class Reserve(Protocol):
    """What the request paths ask of a :class:`SpaceReserve` (a test may fake it)."""

    async def admit(self, size: int) -> str | None: ...

    def note_full(self) -> None: ...


def filesystem_free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


class SpaceReserve:
    """Whether there is room for new envelopes; see the module docstring."""

    def __init__(
        self,
        path: Path,
        min_free_bytes: int,
        *,
        reusable_bytes: FreeBytes | None = None,
        filesystem_free: Callable[[Path], int] = filesystem_free_bytes,
    ) -> None:
        if isinstance(min_free_bytes, bool) or min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be 0 or more, got {min_free_bytes!r}")
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.resume_bytes = int(min_free_bytes * RESUME_FACTOR)
        self._reusable = reusable_bytes
        self._filesystem_free = filesystem_free
        self.available: int | None = None  # the last sample; None before the first
        self._admitted = 0  # bytes admitted since the last sample, amplified
        self._why: str | None = None  # set while closed
        STORAGE_RESERVE_BYTES.set(min_free_bytes)

    @property
    def closed(self) -> bool:
        return self._why is not None

    def shortfall(self) -> str | None:
        """Why new envelopes must wait, or None if the reserve is open."""
        return self._why

    async def admit(self, size: int) -> str | None:
        """Admit a request of ``size`` bytes (None), or say why it must wait.

        An admitted request counts against the room until the next sample.
        One that the estimate says would take the room below the reserve gets
        a fresh sample first (a burst between two samples is often smaller on
        the disk than feared), and closes the reserve only if that confirms it.
        """
        if self._why is not None or self.available is None:
            return self._why
        cost = int(max(0, size) * WRITE_AMPLIFICATION)
        if self.available - self._admitted - cost < self.min_free_bytes:
            available = await self.sample()
            if self.shortfall() is None and available - cost < self.min_free_bytes:
                self._close(self._below(available))
            why = self.shortfall()
            if why is not None:
                return why
        self._admitted += cost
        return None

    def note_full(self) -> None:
        """A write failed for want of space: closed until a sample finds room."""
        self._close(f"a write failed for want of space on {self.path}")

    async def sample(self) -> int:
        """Measure the space available now; the reserve opens or closes accordingly."""
        # statvfs on the trio thread: microseconds on the local filesystem that
        # SQLite's WAL requires anyway (a thread hand-off would cost more).
        free = self._filesystem_free(self.path)
        reusable = await self._reusable() if self._reusable is not None else 0
        available = self.available = free + reusable
        self._admitted = 0
        STORAGE_AVAILABLE_BYTES.set(available)
        if self._why is None:
            if available < self.min_free_bytes:
                self._close(self._below(available))
        elif available >= self.resume_bytes:
            self._why = None
            LOGGER.warning(
                "storage reserve: %s available on %s again; taking new envelopes",
                _mib(available),
                self.path,
                extra={"event": "storage_reserve_cleared", "available": available},
            )
        else:
            self._why = self._below(available)  # the numbers /readyz shows stay current
        return available

    async def watch(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Sample every ``interval`` seconds until cancelled (the first before starting)."""
        await self._sample_logged()
        task_status.started()
        while True:
            await trio.sleep(interval)
            await self._sample_logged()

    async def _sample_logged(self) -> None:
        try:
            await self.sample()
        except Exception:
            # A probe that fails says nothing about the space: keep the last sample.
            LOGGER.exception("measuring the free space of %s failed", self.path)

    def _below(self, available: int) -> str:
        return (
            f"{_mib(max(0, available))} available on {self.path}, at the reserve of "
            f"{_mib(self.min_free_bytes)} (limits.storage_min_free_bytes); new envelopes "
            f"are taken again from {_mib(self.resume_bytes)}"
        )

    def _close(self, why: str) -> None:
        was_open = self._why is None
        self._why = why
        if was_open:
            LOGGER.error(
                "storage reserve reached: %s; new submissions and inbound transactions "
                "are refused until there is room (acknowledgements, expiry and delivery "
                "to peers go on)",
                why,
                extra={"event": "storage_reserve_reached", "available": self.available},
            )
