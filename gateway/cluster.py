"""The nodes of one org: membership, and who drives each lane and the sweepers.

Theory of operation
-------------------
Every gateway node runs one :class:`LeaseKeeper`. Each **round** (every
``lease_time / 5``; 2 s by default) it:

1. **Beats**: writes its row in ``nodes`` (name, a random *incarnation* drawn
   at start, version, the SHA-256 of the rules in force, the time). If the
   row it replaced belonged to another incarnation after its own first beat,
   two live processes share one ``node:`` name: that is logged as an error
   and counted, since they would take each other's leases.
2. **Reads** the nodes and the leases. A node is *live* while its last beat
   is younger than the validity of a lease (``lease_time`` minus one round).
3. **Renews** the leases it holds, in one write, to ``now + validity``. A
   lease that is no longer its own (granted to another node while this one
   was paused) is *lost*: its lane stops at once.
4. **Gives back** what it should not hold: the lane of a peer that left the
   rules, and any lease whose preferred owner is another live node.
5. **Claims** the leases it is the preferred owner of and that nobody holds
   (free, released or expired); and, as a fallback, any lease that has
   stayed expired for a whole round (its preferred owner is not taking it).

The **preferred owner** of a lease is the live node that scores highest for
it by rendezvous hashing (SHA-256 of the lease's name and the node's name):
every node computes the same answer from the same list, lanes spread evenly
over the live nodes, and when a node joins or leaves only the lanes that
hash to it move. The wanted leases are ``lane:<peer>`` for every peer of the
rules in force and ``sweeper`` (the org-wide expiry and pruning, run by the
node that holds it).

**Timing.** A lease is written valid for ``lease_time - round`` and renewed
every round, so a node can miss three renewals (a pause, a slow database)
before it loses anything. A node killed with SIGKILL renews nothing more: its
leases expire at most ``lease_time - round`` after its last renewal, and a
survivor sees that at its next round, so its lanes are driven again within
``lease_time`` of its death. A node that stops cleanly (SIGTERM) removes its
row and releases its leases: survivors take them at their next round.

**Safety.** Owning a lease lets a node *drive* the lane; it is the fencing
token (:mod:`gateway.storage.leases`) on the lane's writes that keeps a node
that lost its lease from recording anything. The lane also stops sending once
its lease is past its validity by this node's own clock, whatever the
database says (:meth:`LeaseKeeper.valid`). Envelopes sent twice across a
takeover (in flight when the lease moved) are harmless: the receiver's
envelope-id dedup stores each once.

**Restarts.** A node restarted under the same name (after a crash) finds
its previous incarnation in its row at its first beat; that process is dead,
so the node takes its leases at once instead of waiting for them to run out
(two live processes with one name are a mistake the beat reports). A single
SQLite node therefore resumes sending as soon as it is up again.

**Faults.** A round that meets a storage error is logged (one line) and
counted; the keeper keeps what it holds until its validity runs out by its
own clock, then stops driving it (:meth:`valid`), and claims it back once the
database answers again.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from gateway.config import MAX_LEASE_TIME, MIN_LEASE_TIME, Limits
from gateway.errors import StorageError
from gateway.observability.metrics import (
    CLUSTER_CLOCK_OFFSET,
    CLUSTER_DUPLICATE_NODE,
    CLUSTER_LEASE_CHANGES,
    CLUSTER_LEASES_HELD,
    CLUSTER_NODES_LIVE,
    CLUSTER_ROUND_FAILURES,
)
from gateway.storage.leases import (
    SWEEPER_LEASE,
    Lease,
    NodeRecord,
    lane_lease,
    lease_peer,
)

LOGGER = logging.getLogger("gateway.cluster")

DEFAULT_LEASE_TIME: Final = Limits().lease_time  # a dead node's lanes are driven again within it
ROUNDS_PER_LEASE: Final = 5
#: A node that has not beaten for this long is forgotten (by the sweeper's holder):
#: `gateway nodes` lists it as gone until then.
FORGET_NODE_AFTER_MS: Final = 24 * 3600 * 1000
INCARNATION_BYTES: Final = 8


class ClusterStorage(Protocol):
    """The part of :class:`~gateway.storage.base.Storage` the keeper uses."""

    async def node_beat(self, record: NodeRecord) -> str | None: ...

    async def node_leave(self, node: str, incarnation: str, *, at_ms: int) -> None: ...

    async def nodes_list(self) -> list[NodeRecord]: ...

    async def lease_claim(
        self,
        name: str,
        *,
        node: str,
        incarnation: str,
        at_ms: int,
        until_ms: int,
        take_from: str | None = None,
    ) -> Lease | None: ...

    async def leases_renew(
        self, names: Collection[str], *, node: str, incarnation: str, at_ms: int, until_ms: int
    ) -> list[Lease]: ...

    async def lease_release(self, lease: Lease, *, at_ms: int) -> bool: ...

    async def leases_list(self) -> list[Lease]: ...

    async def nodes_forget(self, *, beat_before_ms: int) -> int: ...


def preferred_owner(name: str, live_nodes: Iterable[str]) -> str | None:
    """The live node that should hold ``name``: rendezvous (highest random weight) hashing."""
    best: tuple[bytes, str] | None = None
    for node in live_nodes:
        score = hashlib.sha256(f"{name}\0{node}".encode()).digest()
        if best is None or (score, node) > best:
            best = (score, node)
    return None if best is None else best[1]


@dataclass(frozen=True, slots=True)
class Timing:
    """A lease's times in ms, all from ``lease_time`` (seconds)."""

    lease_ms: int

    @classmethod
    def of(cls, lease_time: float) -> Timing:
        if not MIN_LEASE_TIME <= lease_time <= MAX_LEASE_TIME:
            raise ValueError(
                f"lease_time must be within {MIN_LEASE_TIME:g}..{MAX_LEASE_TIME:g} seconds, "
                f"got {lease_time!r}"
            )
        return cls(round(lease_time * 1000))

    @property
    def round_ms(self) -> int:
        return self.lease_ms // ROUNDS_PER_LEASE

    @property
    def valid_ms(self) -> int:
        """How long a written lease (and a beat) counts: one round less than the lease time."""
        return self.lease_ms - self.round_ms


class LeaseKeeper:
    """This node's beat and leases; see the module docstring."""

    def __init__(
        self,
        storage: ClusterStorage,
        *,
        node: str,
        version: str,
        rules_sha256: Callable[[], str],
        peers: Callable[[], Collection[str]],
        clock_ms: Callable[[], int],
        lease_time: float = DEFAULT_LEASE_TIME,
        incarnation: str | None = None,
        on_released: Callable[[str], None] | None = None,
    ) -> None:
        self.node = node
        # Told the peer of each lane this node gives back, so that the node that
        # should drive it hears at once (SpoolAnnouncer) rather than at its next round.
        self._on_released = on_released
        self.incarnation = incarnation or secrets.token_hex(INCARNATION_BYTES)
        self.timing = Timing.of(lease_time)
        self._storage = storage
        self._version = version
        self._rules_sha256 = rules_sha256
        self._peers = peers
        self._clock_ms = clock_ms
        self._started_ms = clock_ms()
        self._held: dict[str, Lease] = {}
        self._subscribers: list[Callable[[], object]] = []
        self._beats = 0
        # The incarnation our first beat replaced: this node before its restart,
        # dead, so its leases are taken at once rather than when they run out.
        self._predecessor: str | None = None
        self._round_now = trio.Event()
        self.live_nodes: tuple[str, ...] = ()
        self.changed = trio.Event()  # set, and replaced, whenever what this node holds changes

    # -- what the sender and the sweepers ask ----------------------------------
    def holds(self, name: str) -> Lease | None:
        """The lease ``name`` if this node holds it (as of its last round), else None."""
        return self._held.get(name)

    def valid(self, name: str) -> bool:
        """Whether this node holds ``name`` and, by its own clock, the lease is still valid."""
        lease = self._held.get(name)
        return lease is not None and lease.until_ms > self._clock_ms()

    def lanes(self) -> frozenset[str]:
        """The peers whose lane this node holds."""
        return frozenset(peer for name in self._held if (peer := lease_peer(name)) is not None)

    def runs_sweepers(self) -> bool:
        return self.valid(SWEEPER_LEASE)

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback()`` after every round that changed what this node holds."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def lost(self, lease: Lease) -> None:
        """A fenced write refused ``lease``: forget it now (the next round may claim again)."""
        held = self._held.get(lease.name)
        if held is not None and held.epoch == lease.epoch:
            del self._held[lease.name]
            CLUSTER_LEASE_CHANGES.labels("lost").inc()
            LOGGER.warning(
                "lease %s (epoch %d) was granted to another node: stopped driving it",
                lease.name,
                lease.epoch,
                extra={"event": "lease_lost", "lease": lease.name},
            )
            self._announce()

    def round_soon(self) -> None:
        self._round_now.set()

    def news(self, peers: Iterable[str] | None) -> None:
        """Another node spooled for, or gave back, the lanes of ``peers`` (None: any).

        If one of them is this node's to drive and it does not hold it, a round
        now claims it (a lane handed over waits no round for its new driver).
        """
        live = self.live_nodes or (self.node,)
        if peers is None:
            self.round_soon()
            return
        for peer in peers:
            name = lane_lease(peer)
            if name not in self._held and preferred_owner(name, live) == self.node:
                self.round_soon()
                return

    # -- the loop ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run rounds until cancelled; ``started()`` after the first (even a failed one)."""
        try:
            await self._round_safely()
            task_status.started()
            while True:
                with trio.move_on_after(self.timing.round_ms / 1000):
                    await self._round_now.wait()
                self._round_now = trio.Event()
                await self._round_safely()
        finally:
            with trio.move_on_after(2.0, shield=True):
                await self._leave()

    async def _leave(self) -> None:
        try:
            await self._storage.node_leave(self.node, self.incarnation, at_ms=self._clock_ms())
        except StorageError as exc:
            LOGGER.warning("cluster: could not give back this node's leases: %s", exc.message)
            return
        if self._held:
            LOGGER.info("cluster: %d lease(s) given back on stopping", len(self._held))
            CLUSTER_LEASE_CHANGES.labels("released").inc(len(self._held))
        self._held.clear()
        CLUSTER_LEASES_HELD.labels("lane").set(0)
        CLUSTER_LEASES_HELD.labels("sweeper").set(0)

    async def _round_safely(self) -> None:
        try:
            await self.round()
        except StorageError as exc:
            CLUSTER_ROUND_FAILURES.inc()
            LOGGER.error(  # noqa: TRY400 -- a database fault, not a bug: one line
                "cluster: lease round failed: %s; leases held are driven until they run out",
                exc.message,
                exc_info=LOGGER.isEnabledFor(logging.DEBUG),
            )
            self._drop_invalid()

    def _drop_invalid(self) -> None:
        now = self._clock_ms()
        gone = [name for name, lease in self._held.items() if lease.until_ms <= now]
        for name in gone:
            del self._held[name]
        if gone:
            CLUSTER_LEASE_CHANGES.labels("expired").inc(len(gone))
            self._announce()

    async def round(self) -> None:
        """One round (see the module docstring); public for tests."""
        storage = self._storage
        timing = self.timing
        now = self._clock_ms()
        replaced = await storage.node_beat(
            NodeRecord(
                node=self.node,
                incarnation=self.incarnation,
                version=self._version,
                rules_sha256=self._rules_sha256(),
                started_ms=self._started_ms,
                beat_ms=now,
            )
        )
        if not self._beats and replaced is not None and replaced != self.incarnation:
            self._predecessor = replaced
        elif self._beats and replaced is not None and replaced != self.incarnation:
            CLUSTER_DUPLICATE_NODE.inc()
            LOGGER.error(
                "cluster: another live process uses this node's name %r; give every node "
                "its own `node:` in gateway.yaml (the two take each other's leases)",
                self.node,
                extra={"event": "duplicate_node_name", "node": self.node},
            )
        self._beats += 1
        nodes = await storage.nodes_list()
        own = next((n for n in nodes if n.incarnation == self.incarnation), None)
        if own is not None and own.skew_ms is not None:
            CLUSTER_CLOCK_OFFSET.set(own.skew_ms / 1000)
        leases = {lease.name: lease for lease in await storage.leases_list()}
        live = sorted(
            n.node for n in nodes if n.live_at(now, timing.valid_ms) or n.node == self.node
        )
        self.live_nodes = tuple(live)
        CLUSTER_NODES_LIVE.set(len(live))
        wanted = {lane_lease(peer) for peer in self._peers()} | {SWEEPER_LEASE}
        before = dict(self._held)
        until = now + timing.valid_ms

        # Renew what we hold, in one write; what is not ours any more is lost.
        renewed = await storage.leases_renew(
            list(self._held),
            node=self.node,
            incarnation=self.incarnation,
            at_ms=now,
            until_ms=until,
        )
        kept = {lease.name: lease for lease in renewed if lease.epoch == before[lease.name].epoch}
        for name in set(self._held) - set(kept):
            CLUSTER_LEASE_CHANGES.labels("lost").inc()
            LOGGER.warning(
                "lease %s was granted to another node while this one could not renew it",
                name,
                extra={"event": "lease_lost", "lease": name},
            )
        self._held = kept

        # Give back what another live node should drive, or nobody (a peer gone).
        for name, lease in list(self._held.items()):
            owner = preferred_owner(name, live)
            if name in wanted and owner == self.node:
                continue
            if await storage.lease_release(lease, at_ms=now):
                CLUSTER_LEASE_CHANGES.labels("released").inc()
            self._held.pop(name, None)  # lost() may have dropped it meanwhile
            peer = lease_peer(name)
            if peer is not None and self._on_released is not None and name in wanted:
                self._on_released(peer)
            LOGGER.info(
                "lease %s given back (%s)",
                name,
                "no longer wanted" if name not in wanted else f"{owner} is its preferred node",
                extra={"event": "lease_released", "lease": name},
            )

        # Claim what is ours to drive and free; or left expired for a whole round.
        for name in sorted(wanted - set(self._held)):
            row = leases.get(name)
            inherited = (
                row is not None and row.held_at(now) and row.incarnation == self._predecessor
            )
            if row is not None and row.held_at(now) and not inherited:
                continue
            mine = inherited or preferred_owner(name, live) == self.node
            abandoned = row is not None and bool(row.node) and now - row.until_ms >= timing.round_ms
            if not (mine or abandoned):
                continue
            granted = await storage.lease_claim(
                name,
                node=self.node,
                incarnation=self.incarnation,
                at_ms=now,
                until_ms=until,
                take_from=self._predecessor,
            )
            if granted is None:
                continue
            self._held[name] = granted
            took_over = row is not None and bool(row.node) and row.incarnation != self.incarnation
            CLUSTER_LEASE_CHANGES.labels("taken_over" if took_over else "acquired").inc()
            LOGGER.info(
                "lease %s acquired (epoch %d)%s",
                name,
                granted.epoch,
                f", taken over from {row.node}" if took_over and row is not None else "",
                extra={"event": "lease_acquired", "lease": name, "epoch": granted.epoch},
            )
        if SWEEPER_LEASE in self._held and any(
            node.beat_ms < now - FORGET_NODE_AFTER_MS for node in nodes
        ):
            forgotten = await storage.nodes_forget(beat_before_ms=now - FORGET_NODE_AFTER_MS)
            LOGGER.info("cluster: forgot %d node(s) silent for a day", forgotten)
        lanes = sum(1 for name in self._held if lease_peer(name) is not None)
        CLUSTER_LEASES_HELD.labels("lane").set(lanes)
        CLUSTER_LEASES_HELD.labels("sweeper").set(1 if SWEEPER_LEASE in self._held else 0)
        if {n: lease.epoch for n, lease in before.items()} != {
            n: lease.epoch for n, lease in self._held.items()
        }:
            self._announce()

    def _announce(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                LOGGER.exception("cluster: a lease subscriber failed")


class SpoolAnnouncing(Protocol):
    async def announce_spooled(self, peers: Collection[str]) -> None: ...


class SpoolAnnouncer:
    """Tells the node driving a lane that this node spooled for it (PostgreSQL NOTIFY).

    :meth:`wake` is called by the sender for a lane that does not run here;
    :meth:`run` sends what gathered, one statement per burst. A failure costs
    latency only: the lane's owner finds the envelopes at its next poll.
    """

    def __init__(self, storage: SpoolAnnouncing) -> None:
        self._storage = storage
        self._pending: set[str] = set()
        self._ready = trio.Event()

    def wake(self, peer: str) -> None:
        self._pending.add(peer)
        self._ready.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            peers, self._pending = self._pending, set()
            try:
                await self._storage.announce_spooled(peers)
            except StorageError as exc:
                LOGGER.debug("cluster: could not announce spooled envelopes: %s", exc.message)
