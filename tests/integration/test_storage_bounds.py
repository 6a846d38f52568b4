"""Lane and mailbox bounds in the SQLite store: checked inside the write, all or nothing.

The counters the bound is checked against are read in the same transaction
that would add to them, so writers running at once cannot overshoot together;
a call that would pass a bound stores nothing and names every key that is full.
"""

from __future__ import annotations

import pytest
import trio

from gateway.errors import CapacityError, Reason
from gateway.storage.base import Bound
from gateway.storage.sqlite import SqliteStorage
from tests.integration.test_storage_sqlite import (
    BOB,
    CAROL,
    GLOBEX,
    INITECH,
    accepted,
    mail,
    spool_item,
)


@pytest.fixture
def store(engine_store: SqliteStorage) -> SqliteStorage:
    """Each engine in turn (tests/conftest.py)."""
    return engine_store


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


# -- the receiver's commit: one answer per envelope -------------------------------------


async def test_a_peers_envelopes_beyond_a_full_mailbox_are_answered_mailbox_full(
    store: SqliteStorage,
) -> None:
    bound = Bound(max_envelopes=2, max_bytes=10**6)
    await store.mailbox_put_local([mail("m1")], at_ms=1)
    entries = [mail("t1"), mail("c1", recipient=CAROL), mail("t2"), mail("t3")]
    outcome = await store.deliver(
        GLOBEX, "txn-1", b"h" * 32, accepted(*entries), entries, at_ms=2, bound=bound
    )
    # bob had room for one more; carol's envelope is not held up by bob's mailbox.
    assert outcome.stored == ("t1", "c1")
    assert outcome.mailbox_full == frozenset({"t2", "t3"})
    assert outcome.recipients == frozenset({BOB, CAROL})
    # The recorded answer is the one given, so a replay reads the same.
    record = await store.txn_lookup(GLOBEX, "txn-1")
    assert record is not None
    assert record.results == {
        "t1": "accepted",
        "c1": "accepted",
        "t2": "mailbox_full",
        "t3": "mailbox_full",
    }
    assert (await store.mailbox_depth(BOB)).envelopes == 2


async def test_an_envelope_answered_mailbox_full_is_stored_once_there_is_room(
    store: SqliteStorage,
) -> None:
    bound = Bound(max_envelopes=1, max_bytes=10**6)
    first, later = [mail("t1")], [mail("t2")]
    await store.deliver(GLOBEX, "txn-1", b"h" * 32, accepted(*first), first, at_ms=1, bound=bound)
    full = await store.deliver(
        GLOBEX, "txn-2", b"h" * 32, accepted(*later), later, at_ms=2, bound=bound
    )
    assert (full.stored, full.mailbox_full) == ((), frozenset({"t2"}))
    # Not marked seen: once bob has fetched and acknowledged, the same envelope in a
    # new transaction is stored, exactly once.
    await store.mailbox_ack(BOB, ["t1"])
    again = await store.deliver(
        GLOBEX, "txn-3", b"h" * 32, accepted(*later), later, at_ms=3, bound=bound
    )
    assert (again.stored, again.mailbox_full) == (("t2",), frozenset())
    repeat = await store.deliver(
        GLOBEX, "txn-4", b"h" * 32, accepted(*later), later, at_ms=4, bound=bound
    )
    assert (repeat.stored, repeat.mailbox_full) == ((), frozenset())
    assert [e.envelope_id for e in await store.mailbox_fetch(BOB, limit=10)] == ["t2"]


async def test_a_smaller_envelope_may_fit_where_a_larger_one_did_not(
    store: SqliteStorage,
) -> None:
    bound = Bound(max_envelopes=10, max_bytes=100)
    entries = [mail("big", data=b"x" * 80), mail("huge", data=b"x" * 50), mail("s", data=b"x" * 20)]
    outcome = await store.deliver(
        GLOBEX, "txn-1", b"h" * 32, accepted(*entries), entries, at_ms=1, bound=bound
    )
    assert (outcome.stored, outcome.mailbox_full) == (("big", "s"), frozenset({"huge"}))


# -- deferred spool entries -----------------------------------------------------------


async def test_a_deferred_envelope_is_not_taken_until_its_time(store: SqliteStorage) -> None:
    await store.spool_put([spool_item("a"), spool_item("b"), spool_item("c")], at_ms=1)

    async def taken(now_ms: int | None) -> list[str]:
        entries = await store.spool_take(GLOBEX, max_items=10, max_bytes=10**6, now_ms=now_ms)
        return [e.envelope_id for e in entries]

    deferred = await store.spool_defer(
        GLOBEX, ["b", "gone"], at_ms=1_000, delay_ms=30_000, max_delay_ms=100_000
    )
    assert deferred == 1  # "gone" is not in the lane
    assert await taken(1_000) == ["a", "c"]
    assert await taken(30_999) == ["a", "c"]
    assert await taken(31_000) == ["a", "b", "c"]
    assert await taken(None) == ["a", "b", "c"]  # admin listings see everything
    # Twice as long each time, up to the ceiling.
    await store.spool_defer(GLOBEX, ["b"], at_ms=40_000, delay_ms=30_000, max_delay_ms=100_000)
    assert await taken(99_999) == ["a", "c"]
    assert await taken(100_000) == ["a", "b", "c"]
    await store.spool_defer(GLOBEX, ["b"], at_ms=200_000, delay_ms=30_000, max_delay_ms=100_000)
    assert await taken(299_999) == ["a", "c"]
    assert await taken(300_000) == ["a", "b", "c"]
    # An admin's retry ends the wait.
    await store.spool_defer(GLOBEX, ["b"], at_ms=400_000, delay_ms=30_000, max_delay_ms=100_000)
    await store.spool_retry(GLOBEX)
    assert await taken(400_000) == ["a", "b", "c"]


async def test_a_deferral_leaves_with_its_envelope(store: SqliteStorage) -> None:
    await store.spool_put([spool_item("a")], at_ms=1)
    await store.spool_defer(GLOBEX, ["a"], at_ms=1, delay_ms=30_000, max_delay_ms=60_000)
    await store.spool_complete(GLOBEX, {"a": "forwarded"}, at_ms=2)
    rows = await store.engine.read(
        lambda conn: conn.execute("SELECT count(*) FROM spool_deferred").fetchone()
    )
    assert rows == (0,)


async def test_a_deferral_names_only_the_peers_own_envelopes(store: SqliteStorage) -> None:
    await store.spool_put([spool_item("a"), spool_item("i", peer=INITECH)], at_ms=1)
    assert (
        await store.spool_defer(INITECH, ["a"], at_ms=1, delay_ms=30_000, max_delay_ms=60_000) == 0
    )
    with pytest.raises(ValueError, match="delay_ms"):
        await store.spool_defer(GLOBEX, ["a"], at_ms=1, delay_ms=0, max_delay_ms=60_000)
