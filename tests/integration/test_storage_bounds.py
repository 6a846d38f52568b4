"""Lane and mailbox bounds in the SQLite store: checked inside the write, all or nothing.

The counters the bound is checked against are read in the same transaction
that would add to them, so writers running at once cannot overshoot together;
a call that would pass a bound stores nothing and names every key that is full.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.errors import CapacityError, Reason
from gateway.storage.base import Bound
from gateway.storage.sqlite import SqliteStorage, open_sqlite_storage
from tests.integration.test_storage_sqlite import BOB, CAROL, GLOBEX, INITECH, mail, spool_item


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    async with open_sqlite_storage(tmp_path / "gateway.db") as opened:
        yield opened


async def depth(store: SqliteStorage, peer: str) -> int:
    stats = await store.spool_stats()
    return stats[peer].depth if peer in stats else 0


async def test_a_lane_takes_envelopes_up_to_its_bound_and_not_one_more(
    store: SqliteStorage,
) -> None:
    bound = Bound(max_envelopes=3, max_bytes=10**6)
    assert await store.spool_put([spool_item("a"), spool_item("b")], at_ms=1, bound=bound)
    assert await store.spool_put([spool_item("c")], at_ms=1, bound=bound) == ["c"]
    with pytest.raises(CapacityError) as full:
        await store.spool_put([spool_item("d")], at_ms=1, bound=bound)
    assert (full.value.reason, full.value.full) == (Reason.LANE_FULL, frozenset({GLOBEX}))
    assert await depth(store, GLOBEX) == 3
    # An envelope the lane already holds is a harmless retry, not a new one.
    assert await store.spool_put([spool_item("a")], at_ms=1, bound=bound) == []
    # Without a bound (the sender's own writes, admin tools) nothing is refused.
    assert await store.spool_put([spool_item("d")], at_ms=1) == ["d"]


async def test_a_call_that_would_pass_a_bound_stores_nothing_and_names_every_full_lane(
    store: SqliteStorage,
) -> None:
    bound = Bound(max_envelopes=2, max_bytes=10**6)
    await store.spool_put([spool_item("g1"), spool_item("g2")], at_ms=1, bound=bound)
    await store.spool_put([spool_item("i1", peer=INITECH)], at_ms=1, bound=bound)
    batch = [
        spool_item("g3"),
        spool_item("i2", peer=INITECH),
        spool_item("i3", peer=INITECH),
        spool_item("x1", peer="example.org"),
    ]
    with pytest.raises(CapacityError) as full:
        await store.spool_put(batch, at_ms=1, bound=bound)
    assert full.value.full == frozenset({GLOBEX, INITECH})
    assert (await depth(store, GLOBEX), await depth(store, INITECH)) == (2, 1)
    assert await depth(store, "example.org") == 0  # all or nothing
    assert await store.status_get("x1") is None


async def test_a_lane_bound_counts_bytes(store: SqliteStorage) -> None:
    bound = Bound(max_envelopes=100, max_bytes=250)
    await store.spool_put([spool_item("a", data=b"x" * 200)], at_ms=1, bound=bound)
    with pytest.raises(CapacityError):
        await store.spool_put([spool_item("b", data=b"x" * 51)], at_ms=1, bound=bound)
    assert await store.spool_put([spool_item("b", data=b"x" * 50)], at_ms=1, bound=bound)


async def test_writers_at_once_never_overshoot_a_lane(store: SqliteStorage) -> None:
    bound = Bound(max_envelopes=10, max_bytes=10**6)
    stored: list[str] = []
    refused = 0

    async def writer(n: int) -> None:
        nonlocal refused
        try:
            stored.extend(await store.spool_put([spool_item(f"e{n}")], at_ms=1, bound=bound))
        except CapacityError:
            refused += 1

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(writer, n)
    assert (len(stored), refused) == (10, 30)
    assert await depth(store, GLOBEX) == 10


async def test_a_mailbox_takes_envelopes_up_to_its_bound(store: SqliteStorage) -> None:
    bound = Bound(max_envelopes=2, max_bytes=10**6)
    outcome = await store.mailbox_put_local([mail("m1"), mail("m2")], at_ms=1, bound=bound)
    assert outcome.stored == ("m1", "m2")
    with pytest.raises(CapacityError) as full:
        await store.mailbox_put_local(
            [mail("m3"), mail("c1", recipient=CAROL)], at_ms=1, bound=bound
        )
    assert (full.value.reason, full.value.full) == (Reason.MAILBOX_FULL, frozenset({BOB}))
    assert await store.status_get("c1") is None  # nothing of the call was stored
    # A retry of a stored envelope is not a new one.
    assert (await store.mailbox_put_local([mail("m1")], at_ms=1, bound=bound)).stored == ()
    await store.mailbox_ack(BOB, ["m1"])
    assert (await store.mailbox_put_local([mail("m3")], at_ms=1, bound=bound)).stored == ("m3",)
    assert (await store.mailbox_depth(BOB)).envelopes == 2
