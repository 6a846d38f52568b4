"""Nodes and leases: the storage contract on both engines, and the keeper's rounds.

The keeper tests drive rounds by hand on an explicit clock (``Clock``): a
node "dies" by no longer running rounds, exactly what SIGKILL leaves in the
database, and no test waits for time to pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.cluster import LeaseKeeper, Timing, preferred_owner
from gateway.federation.sender import Sender
from gateway.storage.base import STATUS_FORWARDED, PeerState
from gateway.storage.leases import (
    SWEEPER_LEASE,
    Lease,
    LeaseLostError,
    NodeRecord,
    decide_claim,
    lane_lease,
)
from gateway.storage.postgres import open_postgres_storage
from gateway.storage.sqlite import open_sqlite_storage
from tests.integration.test_sender import (
    EPOCH_MS,
    FAST,
    ORG,
    A,
    FakeTransport,
    GatedTransport,
    load_rules,
    make_item,
    sample,
)
from tests.integration.test_storage_sqlite import GLOBEX, spool_item

LANE = lane_lease(GLOBEX)
T0 = 1_700_000_000_000


def node(name: str, incarnation: str, *, beat_ms: int = T0) -> NodeRecord:
    return NodeRecord(
        node=name,
        incarnation=incarnation,
        version="1.0",
        rules_sha256="ab" * 32,
        started_ms=T0,
        beat_ms=beat_ms,
    )


# -- the rule of a claim (pure) ----------------------------------------------------
def test_a_claim_takes_a_free_lease_extends_its_own_and_waits_for_anothers() -> None:
    first = decide_claim(None, name=LANE, node="a", incarnation="i-a", at_ms=0, until_ms=10)
    assert first is not None
    assert (first.epoch, first.since_ms, first.until_ms) == (1, 0, 10)
    renewed = decide_claim(first, name=LANE, node="a", incarnation="i-a", at_ms=5, until_ms=15)
    assert renewed is not None
    assert (renewed.epoch, renewed.since_ms) == (1, 0)
    assert decide_claim(first, name=LANE, node="b", incarnation="i-b", at_ms=9, until_ms=19) is None
    taken = decide_claim(first, name=LANE, node="b", incarnation="i-b", at_ms=10, until_ms=20)
    assert taken is not None
    assert (taken.node, taken.epoch, taken.since_ms) == ("b", 2, 10)


def test_the_preferred_owner_is_stable_and_moves_only_the_lanes_of_a_node_that_leaves() -> None:
    names = [lane_lease(f"peer{i}.example") for i in range(600)]
    three = {name: preferred_owner(name, ["a", "b", "c"]) for name in names}
    assert {three[name] for name in names} == {"a", "b", "c"}
    counts = [list(three.values()).count(n) for n in "abc"]
    assert all(150 <= count <= 250 for count in counts), counts
    two = {name: preferred_owner(name, ["a", "b"]) for name in names}
    assert all(two[name] == three[name] for name in names if three[name] != "c")
    assert preferred_owner(LANE, []) is None


# -- the storage contract, both engines -------------------------------------------
async def test_a_lease_is_claimed_renewed_refused_and_taken_over_with_a_new_epoch(
    engine_store: Any,
) -> None:
    store = engine_store
    a = await store.lease_claim(LANE, node="a", incarnation="i-a", at_ms=T0, until_ms=T0 + 8_000)
    assert a == Lease(
        name=LANE, node="a", incarnation="i-a", epoch=1, since_ms=T0, until_ms=T0 + 8_000
    )
    # Another node cannot take it while it is held...
    assert (
        await store.lease_claim(
            LANE, node="b", incarnation="i-b", at_ms=T0 + 1, until_ms=T0 + 9_000
        )
        is None
    )
    # ...its holder renews it (same epoch)...
    renewed = await store.leases_renew(
        [LANE, SWEEPER_LEASE], node="a", incarnation="i-a", at_ms=T0 + 2_000, until_ms=T0 + 10_000
    )
    assert [(x.name, x.epoch, x.until_ms) for x in renewed] == [(LANE, 1, T0 + 10_000)]
    # ...and once it has run out, another node takes it with the next epoch.
    b = await store.lease_claim(
        LANE, node="b", incarnation="i-b", at_ms=T0 + 10_000, until_ms=T0 + 18_000
    )
    assert b is not None
    assert (b.node, b.epoch, b.since_ms) == ("b", 2, T0 + 10_000)
    # The old holder's renewal finds nothing of its own.
    assert (
        await store.leases_renew(
            [LANE], node="a", incarnation="i-a", at_ms=T0 + 10_001, until_ms=T0 + 18_001
        )
        == []
    )
    assert await store.leases_list() == [b]


async def test_a_write_under_a_lease_granted_to_another_node_since_changes_nothing(
    engine_store: Any,
) -> None:
    store = engine_store
    await store.spool_put([spool_item("e1"), spool_item("e2")], at_ms=T0)
    old = await store.lease_claim(LANE, node="a", incarnation="i-a", at_ms=T0, until_ms=T0 + 10)
    assert old is not None
    # Fenced writes pass while the grant is current...
    await store.peer_state_put(PeerState(peer=GLOBEX, failures=1), fence=old)
    new = await store.lease_claim(
        LANE, node="b", incarnation="i-b", at_ms=T0 + 10, until_ms=T0 + 20
    )
    assert new is not None
    assert new.epoch == 2
    # ...and are refused, whole, once it has been granted to another node.
    with pytest.raises(LeaseLostError, match="no longer this node's"):
        await store.spool_complete(GLOBEX, {"e1": STATUS_FORWARDED}, at_ms=T0 + 11, fence=old)
    with pytest.raises(LeaseLostError):
        await store.spool_defer(
            GLOBEX, ["e2"], at_ms=T0 + 11, delay_ms=1_000, max_delay_ms=10_000, fence=old
        )
    with pytest.raises(LeaseLostError):
        await store.peer_state_put(PeerState(peer=GLOBEX, failures=7), fence=old)
    assert [
        e.envelope_id for e in await store.spool_take(GLOBEX, max_items=10, max_bytes=10**6)
    ] == [
        "e1",
        "e2",
    ]
    state = await store.peer_state_get(GLOBEX)
    assert state is not None
    assert state.failures == 1
    assert await store.status_get("e1") is not None  # still queued, from the spool row
    # The new holder's writes go through.
    assert (
        await store.spool_complete(GLOBEX, {"e1": STATUS_FORWARDED}, at_ms=T0 + 12, fence=new) == 1
    )


async def test_a_clean_stop_removes_the_node_and_releases_its_leases(engine_store: Any) -> None:
    store = engine_store
    assert await store.node_beat(node("a", "i-a")) is None
    assert await store.node_beat(node("a", "i-a", beat_ms=T0 + 1)) == "i-a"
    assert await store.node_beat(node("b", "i-b")) is None
    await store.lease_claim(LANE, node="a", incarnation="i-a", at_ms=T0, until_ms=T0 + 8_000)
    assert [n.node for n in await store.nodes_list()] == ["a", "b"]
    await store.node_leave("a", "i-a", at_ms=T0 + 100)
    assert [n.node for n in await store.nodes_list()] == ["b"]
    (lease,) = await store.leases_list()
    assert lease.until_ms == T0 + 100
    assert not lease.held_at(T0 + 100)
    taken = await store.lease_claim(
        LANE, node="b", incarnation="i-b", at_ms=T0 + 100, until_ms=T0 + 8_100
    )
    assert taken is not None
    assert taken.epoch == 2


async def test_a_release_ends_only_the_grant_it_names(engine_store: Any) -> None:
    store = engine_store
    first = await store.lease_claim(LANE, node="a", incarnation="i-a", at_ms=T0, until_ms=T0 + 10)
    second = await store.lease_claim(
        LANE, node="b", incarnation="i-b", at_ms=T0 + 10, until_ms=T0 + 20
    )
    assert first is not None
    assert second is not None
    assert not await store.lease_release(first, at_ms=T0 + 11)
    assert (await store.leases_list())[0].until_ms == T0 + 20
    assert await store.lease_release(second, at_ms=T0 + 11)
    assert (await store.leases_list())[0].until_ms == T0 + 11


# -- several nodes on one PostgreSQL database ---------------------------------------
async def test_nodes_claiming_one_lease_at_once_get_one_grant(postgres_url: str) -> None:
    async with (
        open_postgres_storage(postgres_url) as one,
        open_postgres_storage(postgres_url) as two,
    ):
        grants: list[Lease] = []

        async def claim(store: Any, who: str) -> None:
            lease = await store.lease_claim(
                LANE, node=who, incarnation=f"i-{who}", at_ms=T0, until_ms=T0 + 8_000
            )
            if lease is not None:
                grants.append(lease)

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(claim, one if i % 2 else two, f"n{i}")
        assert len(grants) == 1
        assert await one.leases_list() == grants


async def test_a_beat_records_the_nodes_clock_offset_from_the_server(postgres_url: str) -> None:
    async with open_postgres_storage(postgres_url) as store:
        now = int(time.time() * 1000)
        await store.node_beat(node("a", "i-a", beat_ms=now + 60_000))
        (record,) = await store.nodes_list()
        assert record.skew_ms is not None
        assert 59_000 < record.skew_ms < 61_000


# -- the keeper's rounds -------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.ms = EPOCH_MS

    def __call__(self) -> int:
        return self.ms


PEERS = [f"peer{i}.example" for i in range(12)]


def keeper(
    store: Any,
    name: str,
    clock: Clock,
    peers: Callable[[], Collection[str]] = lambda: PEERS,
    on_released: Callable[[str], None] | None = None,
) -> LeaseKeeper:
    return LeaseKeeper(
        store,
        node=name,
        version="1.0",
        rules_sha256=lambda: "cd" * 32,
        peers=peers,
        clock_ms=clock,
        lease_time=10.0,
        incarnation=f"{name}-1",
        on_released=on_released,
    )


def everything() -> set[str]:
    return {lane_lease(peer) for peer in PEERS} | {SWEEPER_LEASE}


async def held_by(store: Any, now: int) -> dict[str, str]:
    return {lease.name: lease.node for lease in await store.leases_list() if lease.held_at(now)}


async def test_three_nodes_share_the_lanes_and_one_runs_the_sweepers(engine_store: Any) -> None:
    clock = Clock()
    keepers = [keeper(engine_store, name, clock) for name in ("a", "b", "c")]
    for _ in range(3):  # each sees the others after a round; the next settles it
        for k in keepers:
            await k.round()
        clock.ms += 2_000
    holders = await held_by(engine_store, clock.ms)
    assert set(holders) == everything()
    for name in holders:
        assert holders[name] == preferred_owner(name, ["a", "b", "c"])
    assert sum(k.runs_sweepers() for k in keepers) == 1
    assert set().union(*(k.lanes() for k in keepers)) == set(PEERS)
    assert sum(len(k.lanes()) for k in keepers) == len(PEERS)  # no lane twice


async def test_a_dead_nodes_lanes_are_taken_within_the_lease_time(engine_store: Any) -> None:
    clock = Clock()
    a, b = keeper(engine_store, "a", clock), keeper(engine_store, "b", clock)
    for _ in range(3):
        await a.round()
        await b.round()
        clock.ms += 2_000
    a_held = set(a.lanes())
    assert a_held
    assert b.lanes()
    await a.round()  # a renews one last time, then dies (SIGKILL: no leave)
    died = clock.ms
    timing = Timing.of(10.0)
    while a_held - b.lanes():
        clock.ms += timing.round_ms
        assert clock.ms - died <= timing.lease_ms, "b did not take a's lanes within the lease time"
        await b.round()
    assert b.lanes() == set(PEERS)
    assert b.runs_sweepers()
    assert all(
        lease.node == "b" and lease.epoch >= 2
        for lease in await engine_store.leases_list()
        if lease.name in {lane_lease(p) for p in a_held}
    )


async def test_a_paused_node_learns_it_lost_its_lanes_and_a_returning_node_gets_its_own_back(
    engine_store: Any,
) -> None:
    clock = Clock()
    a, b = keeper(engine_store, "a", clock), keeper(engine_store, "b", clock)
    for _ in range(3):
        await a.round()
        await b.round()
        clock.ms += 2_000
    mine = a.lanes()
    lost_before = sample("gateway_cluster_lease_changes_total", change="lost")
    clock.ms += 20_000  # a pauses longer than a lease; b takes everything
    await b.round()
    await b.round()
    assert b.lanes() == set(PEERS)
    assert not any(a.valid(lane_lease(peer)) for peer in mine)  # by a's own clock, too
    await a.round()  # a wakes: its renewal finds nothing of its own
    assert a.lanes() == frozenset()
    lost = sample("gateway_cluster_lease_changes_total", change="lost") - lost_before
    assert lost >= len(mine)  # every lane it held (and the sweeper, if it had it)
    # a beats again: b gives back what prefers a, and a claims it.
    for _ in range(3):
        clock.ms += 2_000
        await b.round()
        await a.round()
    assert a.lanes() == mine
    assert a.lanes().isdisjoint(b.lanes())


async def test_a_peer_gone_from_the_rules_gives_its_lane_back(engine_store: Any) -> None:
    clock = Clock()
    peers = list(PEERS)
    a = keeper(engine_store, "a", clock, peers=lambda: peers)
    await a.round()
    assert a.lanes() == set(PEERS)
    peers.remove(PEERS[0])
    clock.ms += 2_000
    await a.round()
    assert PEERS[0] not in a.lanes()
    assert lane_lease(PEERS[0]) not in await held_by(engine_store, clock.ms)


async def test_a_stopping_keeper_gives_everything_back(engine_store: Any) -> None:
    clock = Clock()
    a = keeper(engine_store, "a", clock)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            assert a.lanes() == set(PEERS)
            scope.cancel()
    assert await held_by(engine_store, clock.ms) == {}
    assert await engine_store.nodes_list() == []


# -- the sender under leases: fencing in action --------------------------------------
async def test_a_lane_whose_lease_moved_while_its_transaction_flew_records_nothing(
    tmp_path: Path,
) -> None:
    """a sends, pauses past its lease, b takes the lane and delivers; a's late answer is fenced."""
    clock = Clock()
    rules = load_rules(tmp_path, [A])
    settings = dataclasses.replace(FAST, poll_interval=0.2)
    async with open_sqlite_storage(tmp_path / "gateway.db") as store:
        ka = keeper(store, "a", clock, peers=lambda: [A])
        kb = keeper(store, "b", clock, peers=lambda: [A])
        await ka.round()
        assert ka.lanes() == {A}
        slow, quick = GatedTransport(), FakeTransport()
        common = {"org": ORG, "storage": store, "rules": rules, "clock_ms": clock}
        sender_a = Sender(transport=slow, leases=ka, settings=settings, **common)
        sender_b = Sender(transport=quick, leases=kb, settings=settings, **common)
        items = [make_item(A) for _ in range(5)]
        await store.spool_put(items, at_ms=clock())
        lost_before = sample("gateway_cluster_lease_changes_total", change="lost")
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(sender_a.run)
                await nursery.start(sender_b.run)
                sender_a.notify(A)
                while slow.in_flight == 0:  # a's transaction is at the peer, unanswered
                    await trio.sleep(0.01)
                clock.ms += 20_000  # a pauses past its lease; b takes the lane
                await kb.round()
                assert kb.lanes() == {A}
                while len(quick.delivered[A]) < len(items):
                    await trio.sleep(0.01)
                ids = {item.envelope_id for item in items}
                while await store.spool_take(A, max_items=10, max_bytes=10**6):
                    await trio.sleep(0.01)
                # a's answer arrives at last: its write is fenced, its lane stops.
                slow.gate.set()
                while A in sender_a.lanes:
                    await trio.sleep(0.01)
                assert ka.lanes() == frozenset()
                nursery.cancel_scope.cancel()
        lost = sample("gateway_cluster_lease_changes_total", change="lost") - lost_before
        assert lost == 1
        for envelope_id in ids:
            status = await store.status_get(envelope_id)
            assert status is not None
            assert status.status == STATUS_FORWARDED
        assert set(quick.delivered[A]) == ids  # the receiver's dedup saw each once from b


async def test_nodes_silent_for_long_are_forgotten(engine_store: Any) -> None:
    store = engine_store
    await store.node_beat(node("old", "i-old", beat_ms=T0))
    await store.node_beat(node("new", "i-new", beat_ms=T0 + 10_000))
    assert await store.nodes_forget(beat_before_ms=T0 + 1) == 1
    assert [n.node for n in await store.nodes_list()] == ["new"]


async def test_a_lane_given_back_is_announced_and_its_new_driver_claims_it_at_once(
    engine_store: Any,
) -> None:
    """a held every lane alone; b joins: a gives back b's lanes and says so, and news of
    them makes b claim them without waiting for its next round."""
    clock = Clock()
    given_back: list[str] = []
    a = keeper(engine_store, "a", clock, on_released=given_back.append)
    b = keeper(engine_store, "b", clock)
    await a.round()
    assert a.lanes() == set(PEERS)
    await b.round()  # b beats: it is live now, and holds nothing yet (a holds all)
    assert b.lanes() == frozenset()
    await a.round()  # a sees b and gives back what hashes to b
    for_b = {p for p in PEERS if preferred_owner(lane_lease(p), ["a", "b"]) == "b"}
    assert set(given_back) == for_b
    b.news(given_back)  # what b's listener does when it hears the announcement
    assert b._round_now.is_set()
    await b.round()
    assert b.lanes() == for_b
    assert a.lanes() == set(PEERS) - for_b


async def test_a_node_restarted_after_a_crash_takes_its_own_leases_at_once(
    engine_store: Any,
) -> None:
    """SIGKILL leaves a's leases held for a while; a's next process (same name) takes them
    at its first round, without waiting for them to run out. Another node still waits."""
    clock = Clock()
    first = keeper(engine_store, "a", clock)
    await first.round()
    assert first.lanes() == set(PEERS)
    clock.ms += 100  # killed: no leave, the leases stay held for most of a lease
    other = keeper(engine_store, "b", clock)
    await other.round()
    assert other.lanes() == frozenset()  # held by a's dead process: b waits
    again = LeaseKeeper(
        engine_store,
        node="a",
        version="1.0",
        rules_sha256=lambda: "cd" * 32,
        peers=lambda: PEERS,
        clock_ms=clock,
        lease_time=10.0,
        incarnation="a-2",
    )
    await again.round()
    held = {lease.name: lease for lease in await engine_store.leases_list()}
    mine = {p for p in PEERS if preferred_owner(lane_lease(p), ["a", "b"]) == "a"}
    assert mine <= again.lanes()  # at once, not after the lease time
    assert all(held[lane_lease(p)].epoch == 2 for p in again.lanes())
