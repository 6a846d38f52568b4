"""The federation sender: one lane per peer drains its spool, in order, in transactions.

Theory of operation
-------------------
(After Synapse's federation sender: per-destination queues, idempotent
transactions, backoff per destination; unlike it, a lane may keep a few
transactions in flight, so that a backlog drains with both gateways working.)

**Lanes.** The spool holds one lane per peer. :meth:`Sender.run` keeps one trio
task per peer of the rules in force, and that task is the lane's only
consumer. It takes envelopes in spool order and sends each batch as one
transaction in a task of its own, up to ``inflight_transactions`` at once
(``limits.max_inflight_transactions``; the transport keeps one persistent
connection per slot). While transactions are in flight the lane takes what
follows them (``spool_take(after_seq=...)``, a cursor reset whenever the lane
is idle), so no envelope is in two transactions at once; a second slot is
used only for a full batch, so a backlog fills every slot while a trickle
goes one transaction at a time, each gathering what arrived meanwhile.
Envelopes leave a lane in spool order; with more than one transaction in
flight the peer may store two consecutive transactions in either order (one
slot keeps strict order). Lanes share nothing but the storage: a dead or
slow peer holds up its own task only, and every transaction has a deadline
(``transaction_timeout``).

**Waking.** A lane reads its spool only when something may be there: after
:meth:`Sender.notify` (the client API calls it right after spooling for that
peer), a failure, a take that filled a whole batch, or ``poll_interval``
without news, which also picks up what another process or a restart left in
the spool.

**A transaction.** ``spool_take`` returns the head of the lane without
removing it: at most ``max_transaction_envelopes`` envelopes and
``max_transaction_bytes`` bytes (the first one always, however large).
Envelopes whose expiry has passed (``SpoolEntry.expires_ms``) are never sent:
they leave the lane at once with status ``expired``. The spool holds each
envelope's canonical bytes (group included), so the rest are not decoded and
encoded again: their bytes are spliced into one body
(:func:`~gateway.federation.protocol.splice_transaction`) under a fresh random
transaction id, and one parse in C checks that the body holds exactly these
envelope ids in order. Only if it does not (a damaged or foreign spool entry)
is each envelope decoded: one that no longer decodes, or holds another id,
leaves with ``rejected:<its reason>`` and costs no other envelope anything.
To a peer whose version document lists the binary framing
(docs/protocol.md §3a; :meth:`_LaneRunner.media_type`) the spooled bytes go
in length-delimited records instead, unparsed: a damaged one costs only its
own slot, which the peer answers by position. A peer that refuses the frame
(``415``/``400``) gets the same envelopes at once as JSON under a new id, and
JSON for a while (:mod:`gateway.federation.versions`).
A batch that fails (id, exact body bytes, envelope ids) is kept:
while the lane's head still begins with the same envelopes, a retry resends
the **same id and the same bytes**, which the receiver answers from its record
(docs/protocol.md §5). It is dropped on an answer, on ``409`` (the peer holds
that id with another body) and on ``413``, after which batches are halved
(down to one envelope) until the next success. (Of several failing at once,
the first is kept; the others go again under new ids, which the receiver's
envelope-id dedup makes harmless.)

**Answers.** One ``spool_complete`` records every envelope's fate:
``accepted`` becomes ``forwarded``, any other result ``rejected:<reason>``,
except a temporary one (``mailbox_full``, docs/protocol.md §4b): that envelope
stays spooled (status ``queued``) and ``spool_defer`` keeps it out of the
lane's takes for :data:`DEFER_INITIAL_MS`, doubling each time it is answered
so again, up to :data:`DEFER_MAX_MS`; it goes again in a new transaction
until it is answered otherwise or expires. The rest of the lane does not wait
for it.
That durable write runs in the background while the lane sends its next
transaction (it changes nothing the peer sees, and the peer already holds
the envelopes): the cursor keeps the answered envelopes out of what the lane
takes next, and at most one such write is outstanding, so writes land in the
order of the answers. If it fails, the envelopes are still spooled and go
again (the lane takes from its head once idle), which the receiver's
envelope-id dedup makes harmless. A
result code that is not one of ours becomes ``rejected:protocol_error``: a
peer's text never reaches a status a local user reads. An answer that does not
name our envelopes in the order sent counts as a failure and the batch goes
again, which the receiver's envelope-id dedup makes harmless.

**Failures.** Anything that leaves the transaction unanswered is a
:class:`~gateway.federation.transport.TransportError`. The lane counts it,
draws the next try with :mod:`gateway.federation.backoff` (exponential, full
jitter, capped, and no sooner than a ``Retry-After``), and writes the
:class:`~gateway.storage.base.PeerState` *before* it sleeps, so a restarted
gateway reads it and does not hammer a dead peer. While it waits, the lane
re-reads that state every ``poll_interval``: ``gateway spool retry`` (another
process) clears it and ends the wait. So does news that the peer is up
(:meth:`Sender.heard_from`: the federation listener calls it on every
authenticated request from a peer of the rules, and a gateway greets its peers
when it starts, see :mod:`gateway.federation.liveness`) when the failure was
that the peer could not be reached: the lane tries at once, at most once per
``backoff_initial``, keeping its failure count, so a peer that is reachable
but still failing goes on backing off longer each time (after Synapse, which
wakes a destination when that server contacts it). A peer that answered with
an error, or asked for time with ``Retry-After``, is not cut short.
A success resets the state; it is written when
it changes anything but ``last_success_ms``, and otherwise at most every
:data:`LAST_SUCCESS_WRITE_INTERVAL_MS`, so a busy lane does not pay one more
durable write per transaction. Transactions in flight together that fail count
as one failure (each remembers the count it was sent under), and no
transaction starts once one beside it has failed; a success beside a failure
ends the backoff (the peer answers), and the failed envelopes go again.

**Envelope versions.** Before a lane sends a batch holding version 2
envelopes, it asks what the peer speaks (:mod:`gateway.federation.versions`,
read from the peer's ``GET /federation/v1/version`` and remembered a while);
envelopes of a version the peer does not list leave the lane unsent with
``rejected:envelope_bad_version``. When that cannot be known (the peer is
down), the lane sends anyway: the peer's answer per envelope decides.

**Rules reloads.** The sender reconciles its lanes with the rules every
``poll_interval``, and at once after a reload that drops peers
(``RulesHolder.subscribe``). A new peer gets a lane. A peer whose endpoint, CA
or pins changed gets a new lane: the old one is cancelled (its in-flight
transaction is abandoned and its connection closed; the envelopes are still
spooled and go again). A peer that left the rules loses its lane and its
connection.

**Envelopes for a peer that is not in the rules** stay in the spool untouched:
no lane sends them; the spool sweeper gives them ``expired`` at their expiry;
and if the peer comes back (a reload that undoes a mistake) its new lane
drains them. Answering them ``rejected:unknown_peer`` at once would turn a
typo in a rules file into lost messages. The client API never spools new ones
for such a peer: its policy check refuses them.

**Time.** Storage times (``backoff_until_ms``, ``at_ms``, expiry) are Unix ms
from the injected ``clock_ms``; waiting uses ``trio.sleep``, so a test drives
both from one virtual clock.

**Crashes.** Nothing is removed before its answer is durable: a crash between
sending and ``spool_complete`` sends the batch again after the restart, and
the receiver stores nothing twice.

**Several nodes.** With ``leases`` (:class:`gateway.cluster.LeaseKeeper`),
the sender runs a lane only for the peers whose lane lease this node holds,
and reconciles as soon as that changes. Every write a lane makes (its
answers, deferrals and peer state) carries the lease as a fencing token, so
a lane whose lease was granted to another node records nothing:
:class:`~gateway.storage.leases.LeaseLostError` stops it, and its envelopes
are the new owner's to send. A lane also sends nothing while its lease is
past its validity by this node's clock (a round that could not renew it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import random as random_module
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio
from prometheus_client import Counter

from gateway.config import MAX_INFLIGHT_TRANSACTIONS, Limits
from gateway.core.encoding import b64url_encode
from gateway.core.envelope import decode_envelope, envelope_version_of
from gateway.core.rules import CompiledRules, Peer
from gateway.errors import EnvelopeError, Reason, StorageError
from gateway.federation.backoff import (
    BackoffPolicy,
    RandomSource,
    after_failure,
    after_success,
    remaining_seconds,
)
from gateway.federation.framing import encode_framed_transaction
from gateway.federation.protocol import (
    ACCEPTED,
    MAX_TRANSACTION_ENVELOPES,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_TXN_V2,
    TEMPORARY_RESULTS,
    EnvelopeResult,
    encode_transaction,
    splice_transaction,
    spliced_body_holds,
)
from gateway.federation.transport import (
    CLOSE_TIMEOUT,
    REASON_CODES,
    FailureKind,
    PeerTransport,
    TransportError,
)
from gateway.federation.versions import EnvelopeVersionSource, TransactionTypeSource
from gateway.observability.metrics import (
    FEDERATION_ENVELOPES,
    FEDERATION_TRANSACTION_BODIES,
    FEDERATION_TRANSACTION_DURATION,
    FEDERATION_TRANSACTIONS,
    PEER_BACKOFF,
    PEER_BACKOFF_CUT,
    PEER_CONSECUTIVE_FAILURES,
    PEER_TRANSACTIONS_IN_FLIGHT,
    PEER_UP,
    SPOOL_EXPIRED,
    bounded,
)
from gateway.storage.base import (
    MAX_ITEMS_PER_CALL,
    STATUS_EXPIRED,
    STATUS_FORWARDED,
    PeerState,
    SpoolEntry,
    rejected_status,
)
from gateway.storage.leases import Lease, LeaseLostError, lane_lease

LOGGER = logging.getLogger("gateway.federation.sender")

DIRECTION: Final = "outbound"
RESULT_OK: Final = "ok"  # gateway_federation_transactions_total{result} of an answered one
OUTCOME_EXPIRED: Final = "expired"
# gateway_peer_backoff_cut_total{cause}: what ended a backoff before its time
BACKOFF_CUT_HEARD: Final = "heard"  # an authenticated request from the peer
BACKOFF_CUT_RETRY: Final = "retry"  # gateway spool retry
DEFAULT_POLL_INTERVAL: Final = 5.0  # seconds; also how often a backing-off lane re-reads its state
LAST_SUCCESS_WRITE_INTERVAL_MS: Final = 10_000
TXN_ID_BYTES: Final = 16  # random bytes of a transaction id (22 base64url characters)
MAX_TRANSACTION_BYTES: Final = 2**40  # spool_take's ceiling
MAX_TIMEOUT_SECONDS: Final = 3600.0  # a transaction deadline or poll interval beyond this is a typo
_MAX_LOGGED_CODE: Final = 40  # characters of an unknown result code in our log
# An envelope answered with a temporary result (mailbox_full) goes again after
# DEFER_INITIAL_MS, then twice as long each time, up to DEFER_MAX_MS (protocol.md §4b).
DEFER_INITIAL_MS: Final = 30_000
DEFER_MAX_MS: Final = 15 * 60_000
_DEFAULT_LIMITS: Final = Limits()

ClockMs = Callable[[], int]


def system_clock_ms() -> int:
    """The real wall clock, Unix ms."""
    return time.time_ns() // 1_000_000


def new_txn_id() -> str:
    """A fresh transaction id: 16 random bytes, unpadded base64url."""
    return b64url_encode(secrets.token_bytes(TXN_ID_BYTES))


class SenderStorage(Protocol):
    """The part of :class:`~gateway.storage.base.Storage` the sender uses."""

    async def spool_take(
        self,
        peer: str,
        *,
        max_items: int,
        max_bytes: int,
        after_seq: int = 0,
        now_ms: int | None = None,
    ) -> list[SpoolEntry]: ...

    async def spool_complete(
        self, peer: str, results: Mapping[str, str], *, at_ms: int, fence: Lease | None = None
    ) -> int: ...

    async def spool_defer(
        self,
        peer: str,
        envelope_ids: Collection[str],
        *,
        at_ms: int,
        delay_ms: int,
        max_delay_ms: int,
        fence: Lease | None = None,
    ) -> int: ...

    async def peer_state_get(self, peer: str) -> PeerState | None: ...

    async def peer_state_put(self, state: PeerState, *, fence: Lease | None = None) -> None: ...


class LaneLeases(Protocol):
    """Which lanes this node drives (``gateway.cluster.LeaseKeeper`` is one)."""

    @property
    def changed(self) -> trio.Event: ...

    def lanes(self) -> frozenset[str]: ...

    def holds(self, name: str) -> Lease | None: ...

    def valid(self, name: str) -> bool: ...

    def lost(self, lease: Lease) -> None: ...

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]: ...


class RulesFeed(Protocol):
    """The rules in force and their reloads (``RulesHolder`` is one)."""

    @property
    def current(self) -> CompiledRules: ...

    def subscribe(self, callback: Callable[[frozenset[str]], object]) -> Callable[[], None]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderSettings:
    """The sender's bounds. Sizes in bytes, times in seconds."""

    max_transaction_envelopes: int = _DEFAULT_LIMITS.max_transaction_envelopes
    max_transaction_bytes: int = _DEFAULT_LIMITS.max_transaction_bytes
    backoff_initial: float = _DEFAULT_LIMITS.backoff_initial
    backoff_max: float = _DEFAULT_LIMITS.backoff_max
    transaction_timeout: float = _DEFAULT_LIMITS.request_timeout
    poll_interval: float = DEFAULT_POLL_INTERVAL
    inflight_transactions: int = _DEFAULT_LIMITS.max_inflight_transactions

    def __post_init__(self) -> None:
        if not 1 <= self.inflight_transactions <= MAX_INFLIGHT_TRANSACTIONS:
            raise ValueError(
                f"inflight_transactions must be within 1..{MAX_INFLIGHT_TRANSACTIONS}, "
                f"got {self.inflight_transactions}"
            )
        most = min(MAX_TRANSACTION_ENVELOPES, MAX_ITEMS_PER_CALL)
        if not 1 <= self.max_transaction_envelopes <= most:
            raise ValueError(
                f"max_transaction_envelopes must be within 1..{most}, "
                f"got {self.max_transaction_envelopes}"
            )
        if not 1 <= self.max_transaction_bytes <= MAX_TRANSACTION_BYTES:
            raise ValueError(
                f"max_transaction_bytes must be within 1..{MAX_TRANSACTION_BYTES}, "
                f"got {self.max_transaction_bytes}"
            )
        for name in ("transaction_timeout", "poll_interval"):
            value = getattr(self, name)
            if not 0 < value <= MAX_TIMEOUT_SECONDS:
                raise ValueError(
                    f"{name} must be within (0, {MAX_TIMEOUT_SECONDS}] seconds, got {value!r}"
                )
        # Checked now, not at the first failure.
        BackoffPolicy(initial=self.backoff_initial, cap=self.backoff_max)

    @property
    def backoff(self) -> BackoffPolicy:
        return BackoffPolicy(initial=self.backoff_initial, cap=self.backoff_max)

    @classmethod
    def from_limits(
        cls, limits: Limits, *, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> SenderSettings:
        """The settings ``gateway.yaml``'s ``limits`` give."""
        return cls(
            max_transaction_envelopes=limits.max_transaction_envelopes,
            max_transaction_bytes=limits.max_transaction_bytes,
            backoff_initial=limits.backoff_initial,
            backoff_max=limits.backoff_max,
            transaction_timeout=limits.request_timeout,
            poll_interval=poll_interval,
            inflight_transactions=limits.max_inflight_transactions,
        )


Link = tuple[tuple[str, ...], str, tuple[str, ...]]  # endpoints, CA fingerprint, pins


def _link(peer: Peer) -> Link:
    return (peer.endpoints, peer.ca_sha256, peer.pins)


@dataclass(eq=False)
class _Lane:
    """One peer's lane task, as the sender tracks it."""

    org: str
    link: Link
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wake: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    # The spool may hold something the lane has not taken: set by notify(), a
    # failure, a full take and the poll; the lane reads its spool only then.
    dirty: bool = True
    # While the lane waits out a backoff that news can end (the peer could not be
    # reached), heard_from() sets ``heard``: the peer is up.
    heard: trio.Event = field(default_factory=trio.Event)
    awaiting_news: bool = False
    heard_cut_at: float = -math.inf  # trio time the last news from the peer ended a backoff


@dataclass(eq=False)
class _Completion:
    """An answered batch whose ``spool_complete`` is running in the background."""

    done: trio.Event = field(default_factory=trio.Event)
    error: StorageError | None = None


@dataclass(frozen=True, slots=True)
class _Batch:
    """A transaction as built: resent byte for byte while its envelopes head the lane."""

    txn_id: str
    body: bytes = field(repr=False)
    ids: tuple[str, ...]
    media_type: str = MEDIA_TYPE_JSON
    # The binary framing's records (the spooled bytes), to fall back to JSON with.
    records: tuple[bytes, ...] = field(default=(), repr=False)


# A binary body answered so is sent again at once as JSON (a new id), and the peer
# gets JSON for a while: 415 from a receiver that does not take the type, 400 from
# one that predates Content-Types and read the frame as (broken) JSON.
_FALLBACK_STATUSES: Final = frozenset({400, 415})
_FRAMING_LABELS: Final = {MEDIA_TYPE_JSON: "json", MEDIA_TYPE_TXN_V2: "binary_v2"}
_BODY_COUNTERS: dict[tuple[str, str], Counter] = {}


def _count_body(peer_label: str, media_type: str) -> None:
    child = _BODY_COUNTERS.get((peer_label, media_type))
    if child is None:
        child = FEDERATION_TRANSACTION_BODIES.labels(
            DIRECTION, peer_label, _FRAMING_LABELS[media_type]
        )
        _BODY_COUNTERS[(peer_label, media_type)] = child
    child.inc()


class Sender:
    """Drains every peer's spool lane; see the module docstring."""

    def __init__(
        self,
        *,
        org: str,
        storage: SenderStorage,
        transport: PeerTransport,
        rules: RulesFeed,
        clock_ms: ClockMs = system_clock_ms,
        settings: SenderSettings = SenderSettings(),
        random: RandomSource = random_module.random,
        envelope_versions: EnvelopeVersionSource | None = None,
        leases: LaneLeases | None = None,
        remote_wake: Callable[[str], None] | None = None,
    ) -> None:
        self.org = org
        # Tells the node driving a lane that runs elsewhere (cluster.SpoolAnnouncer).
        self._remote_wake = remote_wake
        # None: this process drives every peer's lane (one node, or a test).
        self._leases = leases
        # None: send every envelope as it is, and let each peer answer for itself.
        self._envelope_versions = envelope_versions
        self.settings = settings
        self._storage = storage
        self._transport = transport
        self._rules = rules
        self._clock_ms = clock_ms
        self._random = random
        self._lanes: dict[str, _Lane] = {}
        self._stopping: dict[str, _Lane] = {}  # cancelled lanes still closing
        self._nursery: trio.Nursery | None = None
        self._reconcile_now = trio.Event()

    @property
    def lanes(self) -> frozenset[str]:
        """Peers with a running lane."""
        return frozenset(self._lanes)

    def notify(self, peer: str) -> None:
        """Wake ``peer``'s lane: something was just spooled for it. Safe to call any time.

        If another node drives that lane, ``remote_wake`` tells it (cluster).
        """
        if not self.wake_local(peer) and self._remote_wake is not None:
            self._remote_wake(peer)

    def wake_local(self, peer: str) -> bool:
        """Wake ``peer``'s lane if it runs here; whether it does."""
        lane = self._lanes.get(peer)
        if lane is None:
            return False
        lane.dirty = True
        lane.wake.set()
        return True

    def wake_lanes(self, peers: Iterable[str] | None) -> None:
        """Another node spooled for ``peers`` (None: any): wake those lanes that run here."""
        for peer in list(self._lanes) if peers is None else peers:
            self.wake_local(peer)

    def heard_from(self, peer: str) -> None:
        """``peer`` reached us (an authenticated request): if its lane is backing off, try now.

        A peer that just opened an mTLS connection to us is most likely up
        again. Cheap enough for every request: a dict lookup and a flag. The
        lane ends a backoff this way at most once per ``backoff_initial``, and
        only one that followed a failure to reach the peer (see
        :func:`news_ends`): a peer that answered, even with an error or a
        ``Retry-After``, was up already, and its answer stands.
        """
        lane = self._lanes.get(peer)
        if (
            lane is not None
            and lane.awaiting_news
            and trio.current_time() - lane.heard_cut_at >= self.settings.backoff_initial
        ):
            lane.heard.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the lanes until cancelled; ``started()`` once the first ones are running."""
        if self._nursery is not None:
            raise RuntimeError("the sender is already running")
        unsubscribe = self._rules.subscribe(self._on_peers_dropped)
        unfollow = self._leases.subscribe(self._reconcile_now.set) if self._leases else None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._reconcile()
                task_status.started()
                while True:
                    with trio.move_on_after(self.settings.poll_interval):
                        await self._reconcile_now.wait()
                    self._reconcile_now = trio.Event()
                    self._reconcile()
        finally:
            unsubscribe()
            if unfollow is not None:
                unfollow()
            self._nursery = None
            self._lanes.clear()
            self._stopping.clear()

    def _on_peers_dropped(self, peers: frozenset[str]) -> None:
        self._reconcile_now.set()

    def fence(self, peer: str) -> Lease | None:
        """The lease a lane's writes carry (None with no leases); LeaseLostError if not held."""
        if self._leases is None:
            return None
        lease = self._leases.holds(lane_lease(peer))
        if lease is None:
            raise LeaseLostError(f"{peer}: this node no longer holds its lane's lease")
        return lease

    def _reconcile(self) -> None:
        """Start, restart and stop lanes so there is one per peer of the rules in force."""
        assert self._nursery is not None
        peers = self._rules.current.peers
        if self._leases is not None:
            owned = self._leases.lanes()
            peers = {org: entry for org, entry in peers.items() if org in owned}
        for org, lane in list(self._lanes.items()):
            entry = peers.get(org)
            if entry is not None and _link(entry) == lane.link:
                continue
            LOGGER.info(
                "%s: %s; stopping its lane",
                org,
                "endpoint or trust changed"
                if entry is not None
                else "no longer a peer"
                if self._rules.current.peer(org) is None
                else "another node drives it now",
            )
            lane.scope.cancel()
            del self._lanes[org]
            self._stopping[org] = lane
        for org, entry in peers.items():
            if org in self._lanes:
                continue
            lane = _Lane(org=org, link=_link(entry))
            self._lanes[org] = lane
            self._nursery.start_soon(self._run_lane, lane, self._stopping.get(org))

    async def _run_lane(self, lane: _Lane, previous: _Lane | None) -> None:
        try:
            with lane.scope:
                if previous is not None:
                    # The old lane closes its connection first, so it cannot close ours.
                    await previous.done.wait()
                await _LaneRunner(self, lane).run()
        finally:
            try:
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await self._transport.close_peer(lane.org)
            except Exception:
                LOGGER.exception("%s: closing its connection failed", lane.org)
            finally:
                lane.done.set()
                if self._stopping.get(lane.org) is lane:
                    del self._stopping[lane.org]
                if self._rules.current.peer(lane.org) is None or lane.org not in self._lanes:
                    # Gone from the rules, or driven by another node now: no stale series.
                    _forget_peer_gauges(lane.org)


def _forget_peer_gauges(org: str) -> None:
    """Drop the gauges of a peer that left the rules, so no stale series stays."""
    for gauge in (PEER_UP, PEER_BACKOFF, PEER_CONSECUTIVE_FAILURES, PEER_TRANSACTIONS_IN_FLIGHT):
        with contextlib.suppress(KeyError):
            gauge.remove(org)


class _LaneMetrics:
    """One lane's labelled children, made once."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.up = PEER_UP.labels(label)
        self.backoff = PEER_BACKOFF.labels(label)
        self.failures = PEER_CONSECUTIVE_FAILURES.labels(label)
        self.in_flight = PEER_TRANSACTIONS_IN_FLIGHT.labels(label)
        self.in_flight.set(0)  # a lane restarted (new endpoint, CA or pins) starts with none
        self.expired = SPOOL_EXPIRED.labels(label)
        self.duration = FEDERATION_TRANSACTION_DURATION.labels(DIRECTION)
        self._outcomes: dict[str, Counter] = {}
        self._results: dict[str, Counter] = {}
        self._cuts: dict[str, Counter] = {}

    def backoff_cut(self, cause: str) -> Counter:
        child = self._cuts.get(cause)
        if child is None:
            child = self._cuts[cause] = PEER_BACKOFF_CUT.labels(self.label, cause)
        return child

    def outcome(self, outcome: str) -> Counter:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = FEDERATION_ENVELOPES.labels(
                DIRECTION, self.label, outcome
            )
        return child

    def result(self, result: str) -> Counter:
        child = self._results.get(result)
        if child is None:
            child = self._results[result] = FEDERATION_TRANSACTIONS.labels(
                DIRECTION, self.label, result
            )
        return child

    def show(self, state: PeerState, *, now_ms: int) -> None:
        self.failures.set(state.failures)
        self.backoff.set(remaining_seconds(state, now_ms=now_ms))
        self.up.set(1 if state.failures == 0 and state.last_success_ms is not None else 0)


class _LaneRunner:
    """The loop of one lane. Its attributes are the lane's memory between steps."""

    def __init__(self, sender: Sender, lane: _Lane) -> None:
        self.sender = sender
        self.lane = lane
        self.org = lane.org
        self.settings = sender.settings
        self.storage = sender._storage
        self.clock_ms = sender._clock_ms
        self.metrics = _LaneMetrics(bounded(lane.org, sender._rules.current.peers))
        self.state: PeerState | None = None
        self.persisted_success_ms: int | None = None
        self.batch: _Batch | None = None  # a failed batch, resent as it was while it heads the lane
        self.max_items = self.settings.max_transaction_envelopes
        self.completion: _Completion | None = None
        self.completion_lock = trio.Lock()  # one spool_complete outstanding at a time
        self.slots = trio.Semaphore(self.settings.inflight_transactions)
        self.flights = 0  # transactions sent and not yet answered or failed
        # The highest seq taken into a transaction since the lane was last idle (no
        # transaction in flight, no answer being written): the next take starts after it.
        self.cursor = 0
        self.error: StorageError | None = None  # a transaction task's, raised by the next step
        self.landed = trio.Event()  # set when a transaction ends (answered or failed)
        # Envelopes were left behind the cursor (a failed transaction or write):
        # once idle, the lane takes from its head again.
        self.behind = False
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await self.loop()

    def fence(self) -> Lease | None:
        return self.sender.fence(self.org)

    async def loop(self) -> None:
        while True:
            try:
                await self.step()
            except LeaseLostError as exc:
                # Another node drives this lane now: record nothing more, and wait
                # for the sender to stop this lane (it reconciles on the change).
                LOGGER.warning("%s: %s; the lane stops", self.org, exc.message)
                leases = self.sender._leases
                if leases is not None and exc.lease is not None:
                    leases.lost(exc.lease)  # the keeper forgets that grant, if still its own
                self.sender._reconcile_now.set()
                await trio.sleep_forever()
            except StorageError as exc:
                # A full disk or a database that went away: not a bug, one line (the
                # traceback at DEBUG); the lane tries again after a poll interval.
                LOGGER.error(  # noqa: TRY400
                    "%s: storage failed: %s; the lane tries again in %ss",
                    self.org,
                    exc.message,
                    self.settings.poll_interval,
                    exc_info=LOGGER.isEnabledFor(logging.DEBUG),
                )
                await trio.sleep(self.settings.poll_interval)

    async def step(self) -> None:
        """One turn: wait out a backoff, or wait for work, or start one transaction."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.state is None:
            stored = await self.storage.peer_state_get(self.org)
            self.state = stored if stored is not None else PeerState(peer=self.org)
            self.persisted_success_ms = self.state.last_success_ms
            self.metrics.show(self.state, now_ms=self.clock_ms())
        lane = self.lane
        leases = self.sender._leases
        if leases is not None and not leases.valid(lane_lease(self.org)):
            # Held, but not renewed in time (the database is slow or away): send
            # nothing until the keeper renews it, or the lane is stopped.
            with trio.move_on_after(self.settings.poll_interval):
                await leases.changed.wait()
            return
        if not lane.dirty:
            # Nothing new to take: wait for a notify(), a transaction ending (its
            # failure makes the lane dirty), or the poll (another process, a restart).
            lane.wake = trio.Event()
            with trio.move_on_after(self.settings.poll_interval) as poll:
                await lane.wake.wait()
            if poll.cancelled_caught:
                lane.dirty = True
            return
        # A free transaction slot first: with every slot in flight there is nothing to do.
        await self.slots.acquire()
        # True once the slot is given back, or handed to a transaction's task (which
        # gives it back when it ends); otherwise the ``finally`` gives it back.
        released = False
        try:
            now = self.clock_ms()
            if self.state.backoff_until_ms > now:
                self.slots.release()
                released = True
                await self.wait_backoff(self.state, now)
                return
            self.metrics.backoff.set(0)
            # Cleared before looking: a notify() from here on makes it dirty again.
            lane.dirty = False
            self.landed = trio.Event()
            try:
                entries, from_head = await self.take()
            except StorageError:
                lane.dirty = True
                raise
            if not entries:
                return
            now = self.clock_ms()
            expired = [entry for entry in entries if entry.expires_ms <= now]
            if expired:
                lane.dirty = True
                await self.expire(expired, now)
                return
            if await self.refuse_unspoken(entries):
                lane.dirty = True
                return
            full = self.is_full(entries)
            if self.flights and not full:
                # Another transaction is in flight and this one would be small: let it
                # fill up until that one ends (a backlog fills every slot; a trickle
                # goes one transaction at a time, each gathering what came meanwhile).
                lane.dirty = True
                self.slots.release()
                released = True
                with trio.move_on_after(self.settings.poll_interval):
                    await self.landed.wait()
                return
            batch = await self.batch_for(entries, from_head=from_head)
            if batch is None:
                lane.dirty = True  # unusable entries left the lane: look again
                return
            if self.state.backoff_until_ms > self.clock_ms():
                lane.dirty = True  # a transaction in flight failed meanwhile: back off first
                return
            if full or len(batch.ids) < len(entries):
                lane.dirty = True  # more may follow at once
            self.cursor = max(self.cursor, entries[len(batch.ids) - 1].seq)
            self.flights += 1
            self.metrics.in_flight.set(self.flights)
            assert self.nursery is not None
            self.nursery.start_soon(self.fly, batch)
            released = True
        finally:
            if not released:
                self.slots.release()

    def is_full(self, entries: Sequence[SpoolEntry]) -> bool:
        """Whether ``entries`` make a transaction as large as the bounds allow."""
        if len(entries) >= self.max_items:
            return True
        total = sum(entry.size for entry in entries)
        return total + max(entry.size for entry in entries) > self.settings.max_transaction_bytes

    async def take(self) -> tuple[list[SpoolEntry], bool]:
        """What follows the transactions in flight (the lane's head when it is idle).

        Also tells whether it was taken from the head of the lane.
        """
        completion = self.completion
        if (
            completion is not None
            and completion.done.is_set()
            and not self.completion_lock.locked()
        ):
            await self.settle()  # its StorageError is raised here
        from_head = self.flights == 0 and self.completion is None
        if from_head:
            self.cursor = 0
            self.behind = False
        entries = await self.storage.spool_take(
            self.org,
            max_items=self.max_items,
            max_bytes=self.settings.max_transaction_bytes,
            after_seq=self.cursor,
            now_ms=self.clock_ms(),
        )
        return entries, from_head

    async def fly(self, batch: _Batch) -> None:
        """One transaction's task: send, then record the answer or the failure."""
        try:
            await self.send(batch)
        except StorageError as exc:
            self.error = exc
        finally:
            self.flights -= 1
            self.metrics.in_flight.set(self.flights)
            self.slots.release()
            self.landed.set()
            self.look_again_if_behind()
            if self.lane.dirty:  # a failure: the lane has to look again
                self.lane.wake.set()

    def look_again_if_behind(self) -> None:
        """Once idle, a lane that left envelopes behind its cursor takes from its head."""
        if self.behind and self.flights == 0:
            self.lane.dirty = True

    async def settle(self) -> None:
        """Wait for the outstanding ``spool_complete``; its ``StorageError`` is raised here."""
        completion = self.completion
        if completion is None:
            return
        await completion.done.wait()
        if self.completion is completion:
            self.completion = None
        if completion.error is not None:
            raise completion.error

    async def wait_backoff(self, state: PeerState, now: int) -> None:
        """Wait out (part of) a backoff; it ends early on news of the peer or an admin's retry."""
        remaining = remaining_seconds(state, now_ms=now)
        self.metrics.backoff.set(remaining)
        lane = self.lane
        lane.heard = trio.Event()
        lane.awaiting_news = news_ends(state)
        try:
            with trio.move_on_after(min(remaining, self.settings.poll_interval)):
                await lane.heard.wait()
        finally:
            lane.awaiting_news = False
        if lane.heard.is_set() and self.state is state:
            lane.heard_cut_at = trio.current_time()
            now = self.clock_ms()
            LOGGER.info(
                "%s: heard from the peer while backing off (%d failure(s)); trying now",
                self.org,
                state.failures,
                extra={"event": "peer_heard", "peer": self.org},
            )
            # The failure count stays: if the peer still fails, the next wait is longer.
            until = min(now, state.backoff_until_ms)
            self.state = dataclasses.replace(state, backoff_until_ms=until)
            self.metrics.backoff_cut(BACKOFF_CUT_HEARD).inc()
            self.metrics.show(self.state, now_ms=now)
            return
        stored = await self.storage.peer_state_get(self.org)
        if stored is not None and stored.backoff_until_ms < state.backoff_until_ms:
            LOGGER.info("%s: backoff cleared (gateway spool retry); trying now", self.org)
            self.state = stored
            self.metrics.backoff_cut(BACKOFF_CUT_RETRY).inc()
            self.metrics.show(stored, now_ms=self.clock_ms())

    async def expire(self, expired: Sequence[SpoolEntry], now: int) -> None:
        """Take envelopes that expired while spooled out of the lane, unsent."""
        removed = await self.storage.spool_complete(
            self.org,
            {entry.envelope_id: STATUS_EXPIRED for entry in expired},
            at_ms=now,
            fence=self.fence(),
        )
        self.metrics.expired.inc(removed)
        self.metrics.outcome(OUTCOME_EXPIRED).inc(removed)
        LOGGER.info("%s: %d envelope(s) expired in the spool", self.org, removed)

    async def refuse_unspoken(self, entries: Sequence[SpoolEntry]) -> bool:
        """Take envelopes of a version the peer does not speak out of the lane, unsent.

        Asks only when the batch holds a version 2 envelope; whether any left.
        """
        source = self.sender._envelope_versions
        if source is None:
            return False
        versions = {entry.envelope_id: envelope_version_of(entry.data) for entry in entries}
        if all(version == 1 for version in versions.values()):
            return False
        spoken = await source.envelope_versions(self.org)
        if spoken is None:
            return False  # not known now: the peer answers for each envelope
        unspoken = [envelope_id for envelope_id, v in versions.items() if v not in spoken]
        if not unspoken:
            return False
        status = rejected_status(Reason.ENVELOPE_BAD_VERSION.value)
        removed = await self.storage.spool_complete(
            self.org, dict.fromkeys(unspoken, status), at_ms=self.clock_ms(), fence=self.fence()
        )
        self.metrics.outcome(Reason.ENVELOPE_BAD_VERSION.value).inc(removed)
        LOGGER.warning(
            "%s: %d envelope(s) of a version the peer does not speak (it speaks %s): "
            "rejected unsent",
            self.org,
            removed,
            ", ".join(map(str, sorted(spoken))),
            extra={"event": "envelope_version_unspoken", "peer": self.org},
        )
        return True

    async def batch_for(self, entries: Sequence[SpoolEntry], *, from_head: bool) -> _Batch | None:
        """The batch to send for these entries: the kept one if it still heads the lane."""
        media_type = await self.media_type()
        if self.batch is not None and from_head:
            kept = tuple(entry.envelope_id for entry in entries[: len(self.batch.ids)])
            if kept == self.batch.ids and self.batch.media_type in (media_type, MEDIA_TYPE_JSON):
                return self.batch
            self.batch = None  # expired, purged or answered meanwhile: a new transaction
        ids = tuple(entry.envelope_id for entry in entries)
        if media_type == MEDIA_TYPE_TXN_V2:
            # The spooled bytes go as they are, each in its own length-delimited record:
            # a damaged one costs only its own slot, so nothing is parsed here.
            records = tuple(entry.data for entry in entries)
            body = encode_framed_transaction(self.sender.org, self.org, records)
            return _Batch(new_txn_id(), body, ids, MEDIA_TYPE_TXN_V2, records)
        body = splice_transaction(self.sender.org, self.org, [entry.data for entry in entries])
        if not spliced_body_holds(body, ids):
            return await self.batch_decoded(entries)
        return _Batch(txn_id=new_txn_id(), body=body, ids=ids)

    def types_source(self) -> TransactionTypeSource | None:
        """The version source, when it also knows transaction framings (PeerVersions does)."""
        source = self.sender._envelope_versions
        return source if isinstance(source, TransactionTypeSource) else None

    async def media_type(self) -> str:
        """The Content-Type of the next transaction: binary if the peer takes it, else JSON."""
        source = self.types_source()
        if source is None:
            return MEDIA_TYPE_JSON
        types = await source.transaction_types(self.org)
        return MEDIA_TYPE_TXN_V2 if MEDIA_TYPE_TXN_V2 in types else MEDIA_TYPE_JSON

    async def batch_decoded(self, entries: Sequence[SpoolEntry]) -> _Batch | None:
        """The slow way, for a head whose spliced bytes are not a sound transaction.

        Each envelope is decoded; those that do not decode (or hold another
        id) leave the lane rejected, and the next turn builds a new batch.
        """
        envelopes = []
        unusable: dict[str, str] = {}
        for entry in entries:
            try:
                envelope = decode_envelope(entry.data)
            except EnvelopeError as exc:
                # Spooled bytes that no longer decode: a bug or a damaged file. Only
                # this envelope pays for it; the peer would refuse it anyway.
                LOGGER.exception(
                    "%s: spooled envelope %s does not decode", self.org, entry.envelope_id
                )
                unusable[entry.envelope_id] = rejected_status(exc.reason.value)
                continue
            if envelope.id != entry.envelope_id:
                LOGGER.error(
                    "%s: spooled envelope %s holds another id", self.org, entry.envelope_id
                )
                unusable[entry.envelope_id] = rejected_status(Reason.ENVELOPE_BAD_ID.value)
                continue
            envelopes.append(envelope)
        if unusable:
            await self.storage.spool_complete(
                self.org, unusable, at_ms=self.clock_ms(), fence=self.fence()
            )
            for status in unusable.values():
                self.metrics.outcome(status.removeprefix("rejected:")).inc()
            return None
        # Every envelope decodes, yet the spliced body was not sound (bytes that
        # are not this gateway's canonical form): encode them afresh.
        LOGGER.warning("%s: spooled bytes did not splice into a sound transaction", self.org)
        body = encode_transaction(self.sender.org, self.org, envelopes)
        return _Batch(txn_id=new_txn_id(), body=body, ids=tuple(env.id for env in envelopes))

    async def send(self, batch: _Batch) -> None:
        started = trio.current_time()
        assert self.state is not None
        failures_before = self.state.failures
        transport = self.sender._transport
        _count_body(self.metrics.label, batch.media_type)
        try:
            with trio.fail_after(self.settings.transaction_timeout):
                if batch.media_type == MEDIA_TYPE_JSON:
                    results = await transport.send_transaction(
                        self.org, batch.txn_id, batch.body, expected=len(batch.ids)
                    )
                else:
                    results = await transport.send_transaction(
                        self.org,
                        batch.txn_id,
                        batch.body,
                        expected=len(batch.ids),
                        content_type=batch.media_type,
                    )
            _check_results(self.org, batch, results)
        except trio.TooSlowError:
            failure = TransportError(
                f"{self.org}: no answer within {self.settings.transaction_timeout}s",
                kind=FailureKind.TIMEOUT,
                reason=Reason.REQUEST_TIMEOUT,
            )
            await self.failed(batch, failure, failures_before=failures_before)
        except TransportError as exc:
            if batch.media_type != MEDIA_TYPE_JSON and exc.status in _FALLBACK_STATUSES:
                fallback = self.fall_back(batch, exc)
                if fallback is not None:
                    await self.send(fallback)
                else:  # spooled bytes that do not splice: the lane's next take sorts them out
                    self.behind = self.lane.dirty = True
                return
            await self.failed(batch, exc, failures_before=failures_before)
        except Exception as exc:
            # A bug in a transport must not take the gateway down: count it, back off.
            LOGGER.exception("%s: transaction %s failed unexpectedly", self.org, batch.txn_id)
            failure = TransportError(
                f"{self.org}: internal error ({type(exc).__name__})",
                kind=FailureKind.INTERNAL,
                reason=Reason.INTERNAL,
            )
            await self.failed(batch, failure, failures_before=failures_before)
        else:
            self.metrics.duration.observe(trio.current_time() - started)
            await self.answered(batch, results)

    def fall_back(self, batch: _Batch, error: TransportError) -> _Batch | None:
        """The JSON batch for a binary one the peer refused; JSON to it from now on, a while.

        ``None`` if the spooled bytes do not splice into a sound JSON body.
        """
        source = self.types_source()
        if source is not None:
            source.refused(self.org, batch.media_type)
        LOGGER.warning(
            "%s: refused a %s transaction (%s); sending it as JSON",
            self.org,
            batch.media_type,
            error.message,
            extra={"event": "transaction_framing_refused", "peer": self.org},
        )
        if self.batch is batch:
            self.batch = None
        body = splice_transaction(self.sender.org, self.org, batch.records)
        if not spliced_body_holds(body, batch.ids):
            return None
        # A new id: the peer may hold the old one with the binary body (§5, "the same body").
        return _Batch(new_txn_id(), body, batch.ids)

    async def answered(self, batch: _Batch, results: Sequence[EnvelopeResult]) -> None:
        statuses: dict[str, str] = {}
        deferred: list[str] = []
        outcomes: collections.Counter[str] = collections.Counter()
        for envelope_id, result in zip(batch.ids, results, strict=True):
            if result.result == ACCEPTED:
                statuses[envelope_id] = STATUS_FORWARDED
                outcomes[ACCEPTED] += 1
                continue
            if result.result in TEMPORARY_RESULTS:
                # Not final: the envelope stays spooled and goes again later.
                deferred.append(envelope_id)
                outcomes[result.result] += 1
                continue
            code = result.result if result.result in REASON_CODES else Reason.PROTOCOL.value
            if code != result.result:
                LOGGER.warning(
                    "%s: envelope %s answered with an unknown code %r; recorded as %s",
                    self.org,
                    envelope_id,
                    result.result[:_MAX_LOGGED_CODE],
                    code,
                )
            statuses[envelope_id] = rejected_status(code)
            outcomes[code] += 1
            LOGGER.info(
                "%s: envelope %s rejected by the peer: %s",
                self.org,
                envelope_id,
                code,
                extra={
                    "event": "envelope_rejected_by_peer",
                    "direction": "outbound",
                    "envelope_id": envelope_id,
                    "txn_id": batch.txn_id,
                    "peer": self.org,
                    "reason": code,
                },
            )
        async with self.completion_lock:
            # One write outstanding at a time: the previous one lands first.
            await self.settle()
            now = self.clock_ms()
            completion = _Completion()
            self.completion = completion
            assert self.nursery is not None
            self.nursery.start_soon(self.complete, completion, statuses, deferred, outcomes, now)
        if self.batch is batch:
            self.batch = None
        self.max_items = self.settings.max_transaction_envelopes
        self.metrics.result(RESULT_OK).inc()
        rejected = len(statuses) - outcomes[ACCEPTED]
        if deferred:
            LOGGER.info(
                "%s: transaction %s: %d envelope(s) answered mailbox_full; they go again later",
                self.org,
                batch.txn_id,
                len(deferred),
                extra={
                    "event": "envelopes_deferred_by_peer",
                    "txn_id": batch.txn_id,
                    "peer": self.org,
                    "envelopes": len(deferred),
                },
            )
        LOGGER.debug(
            "%s: transaction %s answered: %d accepted, %d rejected, %d deferred",
            self.org,
            batch.txn_id,
            outcomes[ACCEPTED],
            rejected,
            len(deferred),
            extra={
                "event": "transaction_sent",
                "txn_id": batch.txn_id,
                "peer": self.org,
                "envelopes": len(batch.ids),
                "accepted": outcomes[ACCEPTED],
                "rejected": rejected,
                "deferred": len(deferred),
            },
        )
        state = self.state
        assert state is not None
        if state.failures:
            LOGGER.info("%s: reachable again after %d failure(s)", self.org, state.failures)
        self.state = after_success(state, now_ms=now)
        self.metrics.show(self.state, now_ms=now)
        stale = (
            self.persisted_success_ms is None
            or now - self.persisted_success_ms >= LAST_SUCCESS_WRITE_INTERVAL_MS
        )
        if state.failures or state.backoff_until_ms or state.last_error is not None or stale:
            await self.storage.peer_state_put(self.state, fence=self.fence())
            self.persisted_success_ms = now

    async def complete(
        self,
        completion: _Completion,
        statuses: Mapping[str, str],
        deferred: Sequence[str],
        outcomes: collections.Counter[str],
        now: int,
    ) -> None:
        """Record an answered batch's fates, then count them (the background write).

        The deferrals land before the lane takes from its head again (it waits
        for this write), so a deferred envelope is not sent again at once.
        """
        try:
            if statuses:
                await self.storage.spool_complete(self.org, statuses, at_ms=now, fence=self.fence())
            if deferred:
                await self.storage.spool_defer(
                    self.org,
                    deferred,
                    at_ms=now,
                    delay_ms=DEFER_INITIAL_MS,
                    max_delay_ms=DEFER_MAX_MS,
                    fence=self.fence(),
                )
        except StorageError as exc:
            completion.error = exc  # raised in the lane by settle()
            self.behind = True  # the envelopes are still spooled: they go again
        else:
            for outcome, count in outcomes.items():
                self.metrics.outcome(outcome).inc(count)
        finally:
            completion.done.set()
            self.look_again_if_behind()
            if self.lane.dirty:
                self.lane.wake.set()

    async def failed(self, batch: _Batch, error: TransportError, *, failures_before: int) -> None:
        """Record a failed transaction; ``failures_before``: the count when it was sent."""
        # The envelopes are still spooled: they go again (after the backoff).
        self.behind = self.lane.dirty = True
        now = self.clock_ms()
        state = self.state
        assert state is not None
        if state.failures <= failures_before:
            self.state = after_failure(
                state,
                now_ms=now,
                policy=self.settings.backoff,
                random=self.sender._random,
                error=f"{error.kind.value}: {error.message}",
                retry_after=error.retry_after,
            )
        # else: a transaction sent beside this one has failed since, and its failure
        # set the backoff: one outage is one failure per round, however many were
        # in flight, or the backoff would grow twice as fast with two.
        assert self.state is not None
        if error.kind is FailureKind.TXN_CONFLICT:
            if self.batch is batch:
                self.batch = None  # the peer holds this id with another body: use a new one
        elif error.kind is FailureKind.TOO_LARGE:
            if self.batch is batch:
                self.batch = None
            self.max_items = max(1, len(batch.ids) // 2)
        elif self.batch is None:
            self.batch = batch  # resent byte for byte while it heads the lane
        self.metrics.result(error.kind.value).inc()
        self.metrics.show(self.state, now_ms=now)
        LOGGER.warning(
            "%s: transaction %s (%d envelope(s)) failed: %s; failure %d, next try in %.1fs",
            self.org,
            batch.txn_id,
            len(batch.ids),
            error.message,
            self.state.failures,
            remaining_seconds(self.state, now_ms=now),
            extra={
                "event": "transaction_failed",
                "txn_id": batch.txn_id,
                "peer": self.org,
                "envelopes": len(batch.ids),
                "reason": error.kind.value,
                "failures": self.state.failures,
            },
        )
        # Durable before the wait: a restart in the middle of it waits too.
        await self.storage.peer_state_put(self.state, fence=self.fence())


# Failures that news from the peer can end: it could not be reached (no connection,
# a deadline, a broken connection). One that answered (an HTTP error, 429/503 with
# Retry-After, a bad answer) or whose certificate we refused was up already.
_UNREACHABLE_KINDS: Final = frozenset(
    kind.value for kind in (FailureKind.CONNECT, FailureKind.TIMEOUT, FailureKind.NETWORK)
)


def news_ends(state: PeerState) -> bool:
    """Whether news that the peer is up may end the backoff of ``state``.

    Read from ``last_error``, which :meth:`_LaneRunner.failed` writes as
    ``"<kind>: <message>"``, so a backoff read back after a restart is judged
    the same way.
    """
    error = state.last_error
    return error is not None and error.partition(":")[0] in _UNREACHABLE_KINDS


def _check_results(peer: str, batch: _Batch, results: Sequence[EnvelopeResult]) -> None:
    """The answer must name our envelopes, in the order sent.

    In the binary framing a slot's position names its envelope (records are
    length-delimited), so a refusal there may say ``null`` for a record the
    peer could not read (docs/protocol.md §4); never an acceptance.
    """
    framed = batch.media_type != MEDIA_TYPE_JSON
    if len(results) != len(batch.ids) or any(
        result.envelope_id != envelope_id
        and not (framed and result.envelope_id is None and result.result != ACCEPTED)
        for result, envelope_id in zip(results, batch.ids, strict=False)
    ):
        raise TransportError(
            f"{peer}: the answer to transaction {batch.txn_id} does not name its envelopes "
            "in the order sent",
            kind=FailureKind.BAD_ANSWER,
        )
