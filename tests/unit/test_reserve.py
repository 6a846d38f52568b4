"""The storage reserve: closed below the minimum, open again by itself, fed by free pages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from gateway.reserve import SpaceReserve, filesystem_free_bytes

MIB = 1024 * 1024


class Disk:
    """A filesystem and a database whose free space the test sets."""

    def __init__(self, free: int, reusable: int = 0) -> None:
        self.free = free
        self.reusable = reusable

    def filesystem_free(self, path: Path) -> int:
        return self.free

    async def reusable_bytes(self) -> int:
        return self.reusable

    def reserve(self, minimum: int) -> SpaceReserve:
        return SpaceReserve(
            Path("/data"),
            minimum,
            reusable_bytes=self.reusable_bytes,
            filesystem_free=self.filesystem_free,
        )


async def test_the_reserve_closes_below_the_minimum_and_opens_again_by_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = Disk(free=100 * MIB)
    reserve = disk.reserve(20 * MIB)
    assert reserve.shortfall() is None  # no sample yet: nothing known to be short
    await reserve.sample()
    assert reserve.shortfall() is None
    assert REGISTRY.get_sample_value("gateway_storage_available_bytes") == 100 * MIB
    assert REGISTRY.get_sample_value("gateway_storage_reserve_bytes") == 20 * MIB

    disk.free = 12 * MIB
    with caplog.at_level(logging.INFO, logger="gateway.storage"):
        await reserve.sample()
        await reserve.sample()  # still short: said once
    assert reserve.shortfall() == (
        "12.0 MiB available on /data, at the reserve of 20.0 MiB "
        "(limits.storage_min_free_bytes); new envelopes are taken again from 25.0 MiB"
    )
    assert await reserve.admit(1) == reserve.shortfall()
    reached = [r for r in caplog.records if getattr(r, "event", None) == "storage_reserve_reached"]
    assert [r.levelno for r in reached] == [logging.ERROR]

    # Just above the line is not enough: no flapping at the edge.
    disk.free = 21 * MIB
    await reserve.sample()
    assert reserve.shortfall() is not None
    assert reserve.shortfall().startswith("21.0 MiB available")  # type: ignore[union-attr]

    # Deleted envelopes leave free pages in the database: they count as room.
    disk.reusable = 4 * MIB
    with caplog.at_level(logging.INFO, logger="gateway.storage"):
        assert await reserve.sample() == 25 * MIB
    assert reserve.shortfall() is None
    assert await reserve.admit(1) is None
    assert [getattr(r, "event", None) for r in caplog.records][-1] == "storage_reserve_cleared"


async def test_a_write_that_found_the_disk_full_closes_it_until_a_sample_finds_room() -> None:
    disk = Disk(free=100 * MIB)
    reserve = disk.reserve(20 * MIB)
    await reserve.sample()
    reserve.note_full()
    assert reserve.shortfall() == "a write failed for want of space on /data"
    assert await reserve.admit(1) is not None
    await reserve.sample()
    assert reserve.shortfall() is None


async def test_watch_samples_on_its_interval(autojump_clock: trio.testing.MockClock) -> None:
    disk = Disk(free=100 * MIB)
    reserve = disk.reserve(20 * MIB)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda *, task_status: reserve.watch(task_status=task_status))
        assert reserve.available == 100 * MIB  # sampled before it reports started
        disk.free = 5 * MIB
        await trio.sleep(0.4)
        assert reserve.shortfall() is None  # not sampled yet
        await trio.sleep(0.2)
        assert reserve.shortfall() is not None  # the sample at 0.5 s
        nursery.cancel_scope.cancel()


async def test_a_failing_probe_keeps_the_last_sample(caplog: pytest.LogCaptureFixture) -> None:
    disk = Disk(free=5 * MIB)
    reserve = disk.reserve(20 * MIB)
    await reserve.sample()

    def broken(path: Path) -> int:
        raise OSError("statvfs failed")

    reserve._filesystem_free = broken
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda *, task_status: reserve.watch(task_status=task_status))
        nursery.cancel_scope.cancel()
    assert reserve.shortfall() is not None
    assert "measuring the free space of /data failed" in caplog.text


def test_a_negative_reserve_is_refused() -> None:
    with pytest.raises(ValueError, match="min_free_bytes"):
        SpaceReserve(Path("/data"), -1)


def test_the_filesystem_probe_reads_this_filesystem(tmp_path: Path) -> None:
    assert filesystem_free_bytes(tmp_path) > 0


async def test_requests_admitted_between_samples_count_against_the_room() -> None:
    disk = Disk(free=30 * MIB)
    reserve = disk.reserve(20 * MIB)
    await reserve.sample()
    # A byte of a request takes about a quarter more on the disk (rows, indexes, WAL).
    assert await reserve.admit(4 * MIB) is None
    assert await reserve.admit(4 * MIB) is None  # 10 MiB counted: exactly at the reserve
    # The estimate says no: a fresh sample decides. The disk took less than feared.
    disk.free = 24 * MIB
    assert await reserve.admit(2 * MIB) is None
    assert reserve.available == 24 * MIB
    # ...and when it confirms, the reserve closes.
    disk.free = 21 * MIB
    why = await reserve.admit(2 * MIB)
    assert why is not None
    assert why.startswith("21.0 MiB available on /data, at the reserve of 20.0 MiB")
    assert reserve.shortfall() == why
    assert await reserve.admit(1) == why  # closed: even a small one waits
    # The next sample with room for 25 MiB opens it.
    disk.free = 26 * MIB
    await reserve.sample()
    assert await reserve.admit(4 * MIB) is None
