"""The federation sender, its spool sweeper, and the httpx transport.

Most tests run the real :class:`Sender` and sweeper against a fake transport on
trio's autojump clock, so an hour-long outage takes milliseconds and every
attempt's virtual time can be asserted. The wall clock the sender stores
(``clock_ms``) is derived from ``trio.current_time()``: one virtual clock
drives both.

Storage: tests that assert *how soon* something happens use
:class:`MemoryStorage`, an in-memory engine of the spool and peer-state part of
the storage interface with the same semantics as SQLite's (take does not
remove, the first entry is always returned, answered ids are ignored once
gone). It does its work on the trio thread. SQLite does its work in threads,
and the autojump clock jumps whenever every task is blocked, including while
one waits for a database thread; so on SQLite a virtual deadline can only be
asserted as a lower bound. The restart test, which needs real persistence,
runs on SQLite and asserts lower bounds only.

The last tests use the real :class:`HttpxPeerTransport` over real mTLS on
127.0.0.1 against our HTTP server, on the normal clock with ``fail_after``
bounds (the autojump clock would jump while sockets wait).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from gateway.core.address import Address
from gateway.core.envelope import Envelope, decode_envelope, encode_envelope, new_envelope_id
from gateway.core.keytext import format_signing_key
from gateway.errors import Reason, StorageError
from gateway.federation.protocol import (
    ACCEPTED,
    TRANSACTIONS_PATH,
    EnvelopeResult,
    decode_transaction,
    encode_results,
    encode_transaction,
    splice_transaction,
)
from gateway.federation.sender import (
    Sender,
    SenderSettings,
    SenderStorage,
    new_txn_id,
    news_ends,
)
from gateway.federation.sweeper import run_spool_sweeper, sweep_spool
from gateway.federation.transport import (
    FailureKind,
    HttpxPeerTransport,
    TransportError,
    interpret_answer,
    translate_httpx_error,
)
from gateway.http.messages import Handler, Request, Response
from gateway.http.server import HTTPServer
from gateway.pki import dev
from gateway.pki.certs import spki_pin
from gateway.pki.identity import PeerTrust, peer_certificate_der, verify_peer_certificate
from gateway.pki.tls import federation_server_context
from gateway.rules_runtime import RulesHolder
from gateway.storage.base import (
    EXPIRE_BATCH,
    STATUS_EXPIRED,
    STATUS_FORWARDED,
    STATUS_QUEUED,
    ExpiredEnvelope,
    LaneStats,
    PeerState,
    SpoolEntry,
    SpoolItem,
)
from gateway.storage.leases import Lease

ORG = "acme.example"
A = "globex.example"
B = "initech.example"
EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: where virtual time 0 sits on the wall clock
MINUTE = 60.0
HOUR = 3600.0
DAY_MS = 86_400_000
SIGNING_KEY = format_signing_key(bytes(range(32)))


def clock_ms() -> int:
    """The wall clock the sender stores, driven by trio's (virtual) clock."""
    return EPOCH_MS + int(trio.current_time() * 1000)


def virtual(ms: int) -> float:
    """The trio time at which ``clock_ms()`` reads ``ms``."""
    return (ms - EPOCH_MS) / 1000


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- envelopes -------------------------------------------------------------------------


def make_item(peer: str, *, ttl_ms: int = DAY_MS, size: int = 100, user: str = "bob") -> SpoolItem:
    now = clock_ms()
    envelope = Envelope(
        version=1,
        id=new_envelope_id(),
        sender=Address.parse(f"alice@{ORG}"),
        recipient=Address.parse(f"{user}@{peer}"),
        created=now,
        expires=now + ttl_ms,
        burn_on_read=False,
        ciphertext=os.urandom(size),
        signature=os.urandom(64),
        group="engineering",
    )
    return SpoolItem(
        envelope_id=envelope.id,
        sender=str(envelope.sender),
        recipient=str(envelope.recipient),
        created_ms=envelope.created,
        expires_ms=envelope.expires,
        burn_on_read=False,
        data=encode_envelope(envelope),
        peer=peer,
    )


# -- an in-memory storage with SQLite's semantics ------------------------------------------


class MemoryStorage:
    """The spool, statuses and peer states, in memory, with the engines' semantics."""

    def __init__(self) -> None:
        self.spool: list[SpoolEntry] = []
        self.statuses: dict[str, str] = {}
        self.states: dict[str, PeerState] = {}
        self.deferred: dict[str, tuple[int, int]] = {}  # id -> (not before, deferrals)
        self.scrubs = 0
        self._seq = 0

    async def spool_put(self, items: Sequence[SpoolItem], *, at_ms: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        spooled = []
        for item in items:
            if item.envelope_id in self.statuses:
                continue
            self._seq += 1
            values = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
            self.spool.append(SpoolEntry(**values, seq=self._seq, spooled_ms=at_ms))
            self.statuses[item.envelope_id] = STATUS_QUEUED
            spooled.append(item.envelope_id)
        return spooled

    async def spool_take(
        self,
        peer: str,
        *,
        max_items: int,
        max_bytes: int,
        after_seq: int = 0,
        now_ms: int | None = None,
    ) -> list[SpoolEntry]:
        await trio.lowlevel.checkpoint()
        taken: list[SpoolEntry] = []
        total = 0
        for entry in self.spool:
            if entry.peer != peer or entry.seq <= after_seq:
                continue
            deferred = self.deferred.get(entry.envelope_id)
            if now_ms is not None and deferred is not None and deferred[0] > now_ms:
                continue
            if len(taken) == max_items or (taken and total + entry.size > max_bytes):
                break
            taken.append(entry)
            total += entry.size
        return taken

    async def spool_complete(
        self, peer: str, results: Mapping[str, str], *, at_ms: int, fence: Lease | None = None
    ) -> int:
        assert fence is None  # no leases here: this process drives every lane
        await trio.lowlevel.checkpoint()
        gone = [e for e in self.spool if e.peer == peer and e.envelope_id in results]
        for entry in gone:
            self.spool.remove(entry)
            self.deferred.pop(entry.envelope_id, None)
            self.statuses[entry.envelope_id] = results[entry.envelope_id]
        return len(gone)

    async def spool_defer(
        self,
        peer: str,
        envelope_ids: Collection[str],
        *,
        at_ms: int,
        delay_ms: int,
        max_delay_ms: int,
        fence: Lease | None = None,
    ) -> int:
        assert fence is None
        await trio.lowlevel.checkpoint()
        held = {e.envelope_id for e in self.spool if e.peer == peer}
        count = 0
        for envelope_id in envelope_ids:
            if envelope_id not in held:
                continue
            _, times = self.deferred.get(envelope_id, (0, 0))
            delay = min(max_delay_ms, delay_ms * 2**times)
            self.deferred[envelope_id] = (at_ms + delay, times + 1)
            count += 1
        return count

    async def spool_expire(
        self, now_ms: int, *, limit: int = EXPIRE_BATCH
    ) -> list[ExpiredEnvelope]:
        await trio.lowlevel.checkpoint()
        due = sorted((e for e in self.spool if e.expires_ms <= now_ms), key=lambda e: e.expires_ms)
        expired = []
        for entry in due[:limit]:
            self.spool.remove(entry)
            self.statuses[entry.envelope_id] = STATUS_EXPIRED
            expired.append(
                ExpiredEnvelope(
                    envelope_id=entry.envelope_id,
                    sender=entry.sender,
                    recipient=entry.recipient,
                    peer=entry.peer,
                )
            )
        return expired

    async def spool_stats(self) -> dict[str, LaneStats]:
        await trio.lowlevel.checkpoint()
        stats: dict[str, LaneStats] = {}
        for entry in self.spool:
            lane = stats.get(entry.peer)
            if lane is None:
                stats[entry.peer] = LaneStats(
                    peer=entry.peer,
                    depth=1,
                    bytes=entry.size,
                    oldest_created_ms=entry.created_ms,
                    oldest_spooled_ms=entry.spooled_ms,
                )
            else:
                stats[entry.peer] = dataclasses.replace(
                    lane, depth=lane.depth + 1, bytes=lane.bytes + entry.size
                )
        return stats

    async def spool_retry(self, peer: str | None = None) -> int:
        await trio.lowlevel.checkpoint()
        changed = 0
        for name, state in list(self.states.items()):
            if peer is None or name == peer:
                self.states[name] = dataclasses.replace(state, failures=0, backoff_until_ms=0)
                changed += 1
        return changed

    async def peer_state_get(self, peer: str) -> PeerState | None:
        await trio.lowlevel.checkpoint()
        return self.states.get(peer)

    async def peer_state_put(self, state: PeerState, *, fence: Lease | None = None) -> None:
        assert fence is None
        await trio.lowlevel.checkpoint()
        self.states[state.peer] = state

    async def scrub(self) -> bool:
        await trio.lowlevel.checkpoint()
        self.scrubs += 1
        return True

    def depth(self, peer: str) -> int:
        return sum(1 for entry in self.spool if entry.peer == peer)


# -- a fake peer transport ----------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    at: float  # trio time
    peer: str
    txn_id: str
    body: bytes
    ids: tuple[str, ...]
    delivered: bool


Script = Callable[[Sequence[str]], list[EnvelopeResult]]


@dataclass
class FakeTransport:
    """Peers that answer like a receiver would, or are down, or hang; records everything."""

    down: set[str] = field(default_factory=set)
    hang: set[str] = field(default_factory=set)
    reject: dict[str, str] = field(default_factory=dict)  # envelope id -> result code
    scripted: dict[str, list[TransportError | Script]] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    delivered_at: dict[str, float] = field(default_factory=dict)  # first arrival by id
    delivered: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    closed: list[str] = field(default_factory=list)

    async def send_transaction(
        self, peer: str, txn_id: str, body: bytes, *, expected: int
    ) -> list[EnvelopeResult]:
        await trio.lowlevel.checkpoint()
        txn = decode_transaction(body)  # the real codec: what a receiver would parse
        assert txn.origin == ORG
        assert txn.destination == peer
        ids = tuple(slot.envelope_id or "" for slot in txn.slots)
        assert len(ids) == expected
        assert all(slot.error is None for slot in txn.slots)
        now = trio.current_time()
        script = self.scripted.get(peer)
        step = script.pop(0) if script else None
        up = peer not in self.down and peer not in self.hang and step is None
        self.attempts.append(Attempt(now, peer, txn_id, body, ids, up))
        if peer in self.hang:
            await trio.sleep_forever()
        if peer in self.down:
            raise TransportError(f"{peer}: connection refused", kind=FailureKind.CONNECT)
        if isinstance(step, TransportError):
            raise step
        if step is not None:
            return step(ids)
        for envelope_id in ids:
            if envelope_id not in self.delivered_at:  # the receiver's dedup
                self.delivered_at[envelope_id] = now
                self.delivered[peer].append(envelope_id)
        return [EnvelopeResult(i, self.reject.get(i, ACCEPTED)) for i in ids]

    async def close_peer(self, peer: str) -> None:
        await trio.lowlevel.checkpoint()
        self.closed.append(peer)

    def attempts_to(self, peer: str) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.peer == peer]


# -- rules -------------------------------------------------------------------------------


def write_rules(directory: Path, peers: Mapping[str, str], *, pins: Mapping[str, str] = {}) -> Path:
    """A rules file naming ``peers`` (org -> endpoint); their CA files are made if missing."""
    lines = ["version: 1", f"org: {ORG}", "default: deny", "peers:" if peers else "peers: {}"]
    for org, endpoint in peers.items():
        ca_file = directory / f"{org}-ca.pem"
        if not ca_file.exists():
            ca_file.write_bytes(dev.issue_ca(org, now=datetime.now(UTC)).cert_pem())
        lines += [
            f"  {org}:",
            f"    endpoint: {endpoint}",
            f"    ca: {ca_file.name}",
            f"    signing_key: {SIGNING_KEY}",
        ]
        if org in pins:
            lines.append(f'    pins: ["{pins[org]}"]')
    lines += [
        "groups:",
        "  engineering:",
        "    members: [alice]",
        '    send_to: ["*"]',
    ]
    path = directory / "rules.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_rules(directory: Path, peers: Iterable[str]) -> RulesHolder:
    return RulesHolder.load(
        write_rules(directory, {org: f"https://gw.{org}:8443" for org in peers})
    )


# -- running ------------------------------------------------------------------------------


FAST = SenderSettings(
    max_transaction_envelopes=10,
    max_transaction_bytes=1_000_000,
    backoff_initial=1.0,
    backoff_max=300.0,
    transaction_timeout=30.0,
    poll_interval=5.0,
)


def top() -> float:
    """The top of every backoff window: delays are exactly 1, 2, 4, ... seconds."""
    return 1.0


@asynccontextmanager
async def running(sender: Sender, *extra: Callable[..., object]) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        for task in extra:
            await nursery.start(task)
        yield nursery
        nursery.cancel_scope.cancel()


WAIT_LIMIT = 24 * 3600.0  # virtual seconds: a predicate that never holds fails the test


async def wait_until(
    predicate: Callable[[], bool], *, step: float = 0.1, limit: float = WAIT_LIMIT
) -> float:
    """Poll ``predicate`` on the virtual clock; return the time it became true."""
    deadline = trio.current_time() + limit
    while not predicate():
        if trio.current_time() > deadline:
            raise AssertionError(f"not true after {limit} virtual seconds")
        await trio.sleep(step)
    return trio.current_time()


def make_sender(
    storage: SenderStorage,
    transport: FakeTransport,
    rules: RulesHolder,
    *,
    settings: SenderSettings = FAST,
    rng: Callable[[], float] = top,
) -> Sender:
    return Sender(
        org=ORG,
        storage=storage,
        transport=transport,
        rules=rules,
        clock_ms=clock_ms,
        settings=settings,
        random=rng,
    )


async def spool(storage: MemoryStorage, sender: Sender | None, items: Sequence[SpoolItem]) -> None:
    await storage.spool_put(items, at_ms=clock_ms())
    if sender is not None:
        for peer in {item.peer for item in items}:
            sender.notify(peer)


# -- batching, order, results ---------------------------------------------------------------


async def test_batches_hold_at_most_n_envelopes_and_keep_lane_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    sender = make_sender(
        storage,
        transport,
        load_rules(tmp_path, [A]),
        settings=dataclasses.replace(FAST, max_transaction_envelopes=3),
    )
    items = [make_item(A) for _ in range(8)]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    assert [len(a.ids) for a in transport.attempts] == [3, 3, 2]
    assert transport.delivered[A] == [item.envelope_id for item in items]
    assert {storage.statuses[item.envelope_id] for item in items} == {STATUS_FORWARDED}
    assert len({a.txn_id for a in transport.attempts}) == 3


async def test_batches_hold_at_most_m_bytes_but_an_oversized_head_goes_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    small = [make_item(A, size=300) for _ in range(5)]
    large = make_item(A, size=3000)
    limit = 2 * small[0].size + small[0].size // 2  # two small ones fit, three do not
    assert large.size > limit
    sender = make_sender(
        storage,
        transport,
        load_rules(tmp_path, [A]),
        settings=dataclasses.replace(FAST, max_transaction_bytes=limit),
    )
    items = [*small[:3], large, *small[3:]]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    sizes = {item.envelope_id: item.size for item in items}
    assert [len(a.ids) for a in transport.attempts] == [2, 1, 1, 2]
    for attempt in transport.attempts:
        assert len(attempt.ids) == 1 or sum(sizes[i] for i in attempt.ids) <= limit
    assert transport.delivered[A] == [item.envelope_id for item in items]


async def test_rejected_results_become_rejected_statuses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    ok, denied, unknown, odd = (make_item(A) for _ in range(4))
    transport.reject[denied.envelope_id] = Reason.PEER_NOT_ALLOWED.value
    transport.reject[unknown.envelope_id] = Reason.RECIPIENT_UNKNOWN.value
    transport.reject[odd.envelope_id] = "Something the peer made up!"  # never shown to a user
    before = sample(
        "gateway_federation_envelopes_total",
        direction="outbound",
        peer=A,
        outcome="peer_not_allowed",
    )
    async with running(sender):
        await spool(storage, sender, [ok, denied, unknown, odd])
        await wait_until(lambda: storage.depth(A) == 0)
    assert storage.statuses[ok.envelope_id] == "forwarded"
    assert storage.statuses[denied.envelope_id] == "rejected:peer_not_allowed"
    assert storage.statuses[unknown.envelope_id] == "rejected:recipient_unknown"
    assert storage.statuses[odd.envelope_id] == "rejected:protocol_error"
    assert len(transport.attempts) == 1  # a rejection is final: never sent again
    after = sample(
        "gateway_federation_envelopes_total",
        direction="outbound",
        peer=A,
        outcome="peer_not_allowed",
    )
    assert after == before + 1


async def test_a_full_mailbox_at_the_peer_keeps_the_envelope_and_sends_it_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    waiting, other = make_item(A, user="bob"), make_item(A, user="carol")
    transport.reject[waiting.envelope_id] = Reason.MAILBOX_FULL.value
    labels = {"direction": "outbound", "peer": A}
    before = sample("gateway_federation_envelopes_total", **labels, outcome="mailbox_full")
    async with running(sender):
        await spool(storage, sender, [waiting, other])
        await wait_until(lambda: storage.statuses[other.envelope_id] == STATUS_FORWARDED)
        # Not final: still spooled, still queued, and carol's envelope did not wait for it.
        assert storage.depth(A) == 1
        assert storage.statuses[waiting.envelope_id] == STATUS_QUEUED
        # Sent again only after 30 s, then 60 s, 120 s: in a new transaction each time.
        await wait_until(lambda: len(transport.attempts) == 4, limit=HOUR)
        gaps = [b.at - a.at for a, b in itertools.pairwise(transport.attempts)]
        # Each at the lane's first look (every poll_interval) once the wait is over.
        for gap, wait in zip(gaps, (30, 60, 120), strict=True):
            assert wait <= gap <= wait + FAST.poll_interval + 0.5
        assert len({a.txn_id for a in transport.attempts}) == 4
        assert all(a.ids == (waiting.envelope_id,) for a in transport.attempts[1:])
        # bob fetched his mail: the next try is accepted, and that is final.
        del transport.reject[waiting.envelope_id]
        await wait_until(lambda: storage.depth(A) == 0, limit=HOUR)
    assert storage.statuses[waiting.envelope_id] == STATUS_FORWARDED
    assert waiting.envelope_id not in storage.deferred
    after = sample("gateway_federation_envelopes_total", **labels, outcome="mailbox_full")
    assert after == before + 4


async def test_an_envelope_deferred_until_it_expires_expires(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    item = make_item(A, ttl_ms=5 * 60_000)
    transport.reject[item.envelope_id] = Reason.MAILBOX_FULL.value
    async with running(sender, partial(run_spool_sweeper, storage, clock_ms=clock_ms)):
        await spool(storage, sender, [item])
        await wait_until(lambda: storage.statuses[item.envelope_id] == STATUS_EXPIRED, limit=HOUR)
    # 30 s, 60 s, 120 s after the first: the fourth would be after its expiry.
    assert len(transport.attempts) == 4
    assert all(a.at < virtual(item.expires_ms) for a in transport.attempts)


async def test_the_body_is_the_spooled_bytes_spliced_and_stays_the_same_on_a_retry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    transport.scripted[A] = [TransportError("down", kind=FailureKind.CONNECT)]
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    items = [make_item(A, size=size) for size in (1, 100, 1000)]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    first, second = transport.attempts
    assert (first.txn_id, first.body) == (second.txn_id, second.body)
    assert first.body == splice_transaction(ORG, A, [item.data for item in items])
    decoded = [decode_envelope(item.data) for item in items]
    assert first.body == encode_transaction(ORG, A, decoded)  # what decode + encode gave
    assert all(env.group == "engineering" for env in decoded)


def damaged_item(peer: str, data: bytes) -> SpoolItem:
    return dataclasses.replace(make_item(peer), data=data)


async def test_damaged_spool_entries_are_rejected_and_cost_no_other_envelope(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    good = [make_item(A) for _ in range(4)]
    truncated = damaged_item(A, good[0].data[:-10])
    two_in_one = damaged_item(A, good[1].data + b"," + good[2].data)
    other_id = damaged_item(A, make_item(A).data)
    items = [good[0], truncated, good[1], two_in_one, other_id, good[2], good[3]]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    assert storage.statuses[truncated.envelope_id] == "rejected:envelope_malformed"
    assert storage.statuses[two_in_one.envelope_id] == "rejected:envelope_malformed"
    assert storage.statuses[other_id.envelope_id] == "rejected:envelope_bad_id"
    assert {storage.statuses[item.envelope_id] for item in good} == {STATUS_FORWARDED}
    assert transport.delivered[A] == [item.envelope_id for item in good]  # in lane order
    (attempt,) = transport.attempts  # every body sent was sound (FakeTransport checks)
    assert attempt.body == splice_transaction(ORG, A, [item.data for item in good])


class SlowCompletions(MemoryStorage):
    """``spool_complete`` holds until released; records how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()
        self.running = 0
        self.most_at_once = 0
        self.failures_left = 0

    async def spool_complete(
        self, peer: str, results: Mapping[str, str], *, at_ms: int, fence: Lease | None = None
    ) -> int:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.release.wait()
            if self.failures_left:
                self.failures_left -= 1
                raise StorageError("disk full")
            return await super().spool_complete(peer, results, at_ms=at_ms)
        finally:
            self.running -= 1


async def test_the_next_transaction_goes_while_the_last_answer_is_written(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = SlowCompletions(), FakeTransport()
    sender = make_sender(
        storage,
        transport,
        load_rules(tmp_path, [A]),
        settings=dataclasses.replace(FAST, max_transaction_envelopes=3, inflight_transactions=1),
    )
    items = [make_item(A) for _ in range(7)]
    async with running(sender):
        await spool(storage, sender, items)
        # The first answer's write is held, yet the second batch goes, without those ids...
        await wait_until(lambda: len(transport.attempts) == 2)
        first, second = transport.attempts
        assert first.ids == tuple(item.envelope_id for item in items[:3])
        assert second.ids == tuple(item.envelope_id for item in items[3:6])
        # ...and no third: its answer waits for the first write (one outstanding at a time).
        await trio.sleep(10 * MINUTE)
        assert len(transport.attempts) == 2
        assert storage.depth(A) == 7  # nothing removed before its write
        storage.release.set()
        await wait_until(lambda: storage.depth(A) == 0)
    assert [a.ids for a in transport.attempts][2:] == [(items[6].envelope_id,)]
    assert storage.most_at_once == 1
    assert {storage.statuses[item.envelope_id] for item in items} == {STATUS_FORWARDED}
    assert transport.delivered[A] == [item.envelope_id for item in items]


async def test_a_failed_background_write_sends_the_envelopes_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = SlowCompletions(), FakeTransport()
    storage.release.set()
    storage.failures_left = 1
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    items = [make_item(A) for _ in range(2)]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    ids = tuple(item.envelope_id for item in items)
    assert [a.ids for a in transport.attempts] == [ids, ids]  # the receiver dedups the copy
    assert transport.delivered[A] == list(ids)
    assert {storage.statuses[i] for i in ids} == {STATUS_FORWARDED}


# -- several transactions in flight -------------------------------------------------------------


@dataclass
class GatedTransport(FakeTransport):
    """Holds every transaction until ``gate`` is set; records how many were in flight at once."""

    gate: trio.Event = field(default_factory=trio.Event)
    in_flight: int = 0
    most_in_flight: int = 0
    failing: frozenset[int] = frozenset()  # attempts (0-based) that fail after the gate

    async def send_transaction(
        self, peer: str, txn_id: str, body: bytes, *, expected: int
    ) -> list[EnvelopeResult]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            attempt = len(self.attempts)
            results = await super().send_transaction(peer, txn_id, body, expected=expected)
            await self.gate.wait()
            if attempt in self.failing:
                # Lost on the way back: the receiver stored them, the sender will resend.
                raise TransportError(f"{peer}: connection reset", kind=FailureKind.NETWORK)
            return results
        finally:
            self.in_flight -= 1


async def test_two_transactions_go_at_once_each_envelope_in_one_and_in_lane_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), GatedTransport()
    settings = dataclasses.replace(FAST, max_transaction_envelopes=3, inflight_transactions=2)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    items = [make_item(A) for _ in range(8)]
    ids = [item.envelope_id for item in items]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: len(transport.attempts) == 2)
        # Both slots are taken: nothing more goes until one is answered (or times out).
        await trio.sleep(FAST.transaction_timeout / 2)
        assert [a.ids for a in transport.attempts] == [tuple(ids[0:3]), tuple(ids[3:6])]
        assert transport.in_flight == 2
        assert sample("gateway_peer_transactions_in_flight", peer=A) == 2
        transport.gate.set()
        await wait_until(lambda: storage.depth(A) == 0)
        assert sample("gateway_peer_transactions_in_flight", peer=A) == 0
    assert transport.most_in_flight == 2
    assert [a.ids for a in transport.attempts] == [
        tuple(ids[0:3]),
        tuple(ids[3:6]),
        tuple(ids[6:8]),
    ]
    assert transport.delivered[A] == ids
    assert {storage.statuses[i] for i in ids} == {STATUS_FORWARDED}


async def test_a_failed_transaction_beside_an_answered_one_goes_again_and_nothing_twice(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), GatedTransport(failing=frozenset({0}))
    settings = dataclasses.replace(FAST, max_transaction_envelopes=3, inflight_transactions=2)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    items = [make_item(A) for _ in range(6)]
    ids = [item.envelope_id for item in items]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: len(transport.attempts) == 2)
        opened = trio.current_time()
        transport.gate.set()
        await wait_until(lambda: storage.depth(A) == 0)
    # Resent at once (the other answer shows the peer is up and ends the backoff)
    # or when the backoff (exactly 1 s here) ends, whichever lands last; never at
    # the next poll (5 s).
    assert transport.attempts[2].at - opened <= 1.0 + 0.01
    attempts = [a.ids for a in transport.attempts]
    assert attempts[:2] == [tuple(ids[0:3]), tuple(ids[3:6])]
    # The failed batch goes again, as it was (same id and bytes: it heads the lane).
    assert attempts[2:] == [tuple(ids[0:3])]
    assert transport.attempts[2].txn_id == transport.attempts[0].txn_id
    assert transport.attempts[2].body == transport.attempts[0].body
    assert transport.delivered[A] == ids  # the receiver's dedup: each id stored once
    assert {storage.statuses[i] for i in ids} == {STATUS_FORWARDED}


async def test_transactions_failing_together_count_as_one_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), GatedTransport(failing=frozenset({0, 1}))
    settings = dataclasses.replace(FAST, max_transaction_envelopes=3, inflight_transactions=2)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    items = [make_item(A) for _ in range(6)]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: len(transport.attempts) == 2)
        failed_at = trio.current_time()
        transport.gate.set()
        await wait_until(lambda: A in storage.states and storage.states[A].failures > 0)
        await trio.sleep(0.001)  # let the second failure be recorded too
        # Two transactions failed in one round: one failure, the first backoff (1 s).
        assert storage.states[A].failures == 1
        assert virtual(storage.states[A].backoff_until_ms) == pytest.approx(
            failed_at + 1.0, abs=0.002
        )
        await wait_until(lambda: storage.depth(A) == 0)
    assert round(transport.attempts[2].at - failed_at, 3) == 1.0
    assert transport.delivered[A] == [item.envelope_id for item in items]


async def test_one_in_flight_keeps_strict_order_across_transactions(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), GatedTransport()
    transport.gate.set()
    settings = dataclasses.replace(FAST, max_transaction_envelopes=2, inflight_transactions=1)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    items = [make_item(A) for _ in range(7)]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    assert transport.most_in_flight == 1
    assert transport.delivered[A] == [item.envelope_id for item in items]


def test_inflight_transactions_out_of_range_is_refused(tmp_path: Path) -> None:
    for bad in (0, 9):
        with pytest.raises(ValueError, match=r"inflight_transactions must be within 1\.\.8"):
            dataclasses.replace(FAST, inflight_transactions=bad)
        with pytest.raises(ValueError, match=r"connections_per_peer must be within 1\.\.8"):
            HttpxPeerTransport(
                ORG,
                tmp_path / "cert.pem",
                tmp_path / "key.pem",
                load_rules(tmp_path, [A]),
                connections_per_peer=bad,
            )


# -- failures and backoff ---------------------------------------------------------------------


async def test_a_failing_peer_backs_off_exponentially_and_persists_its_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport(down={A})
    settings = dataclasses.replace(FAST, backoff_initial=1.0, backoff_max=8.0)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    item = make_item(A)
    start = trio.current_time()
    states: list[PeerState] = []
    async with running(sender):
        await spool(storage, sender, [item])
        for n in range(1, 8):
            await wait_until(lambda n=n: len(transport.attempts) == n, step=0.01)
            await trio.sleep(0.001)  # let the lane write its state
            states.append(storage.states[A])
            assert sample("gateway_peer_up", peer=A) == 0
            assert sample("gateway_peer_consecutive_failures", peer=A) == n
        transport.down.clear()
        await wait_until(lambda: storage.depth(A) == 0)
        await trio.sleep(0.001)
    times = [round(a.at - start, 3) for a in transport.attempts]
    # Windows 1, 2, 4, 8, then capped at 8; the answered attempt ends the series.
    assert times == [0, 1, 3, 7, 15, 23, 31, 39]
    for n, (state, attempt) in enumerate(zip(states, transport.attempts, strict=False), 1):
        assert state.failures == n
        assert virtual(state.backoff_until_ms) == pytest.approx(
            attempt.at + min(8.0, 2.0 ** (n - 1)), abs=0.002
        )
        assert state.last_error is not None
        assert state.last_error.startswith("connect:")
    # Every retry of the unchanged batch is the same transaction, byte for byte.
    assert len({(a.txn_id, a.body) for a in transport.attempts}) == 1
    final = storage.states[A]
    assert (final.failures, final.backoff_until_ms, final.last_error) == (0, 0, None)
    assert final.last_success_ms is not None
    assert virtual(final.last_success_ms) == pytest.approx(39)
    assert storage.statuses[item.envelope_id] == STATUS_FORWARDED
    assert sample("gateway_peer_up", peer=A) == 1
    assert sample("gateway_peer_consecutive_failures", peer=A) == 0


async def test_a_restarted_sender_honours_the_persisted_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The in-memory storage with the engines' semantics: the virtual clock must
    # not jump while a task waits for a storage thread (it would race past the
    # envelope's expiry). That peer state survives a reopen of the real store is
    # tests/integration/test_storage_sqlite.py's to show; here: a new Sender
    # reads the stored backoff and waits it out.
    rules = load_rules(tmp_path, [A])
    storage, transport = MemoryStorage(), FakeTransport(down={A})
    settings = dataclasses.replace(FAST, backoff_initial=600.0, backoff_max=600.0)
    item = make_item(A)
    await storage.spool_put([item], at_ms=clock_ms())
    first = make_sender(storage, transport, rules, settings=settings)
    async with running(first):
        await wait_until(lambda: A in storage.states, step=0.01)
    state = storage.states[A]
    assert state.failures == 1
    failed_at = transport.attempts[0].at
    assert virtual(state.backoff_until_ms) >= failed_at + 600 - 0.002

    # The peer is back, and the gateway restarts: the stored backoff still holds.
    transport.down.clear()
    before_restart = len(transport.attempts)
    second = make_sender(storage, transport, rules, settings=settings)
    async with running(second):
        done = await wait_until(lambda: storage.depth(A) == 0, step=1)
        await wait_until(lambda: storage.states[A].failures == 0, step=1)
    after_restart = transport.attempts[before_restart:]
    assert len(after_restart) == 1  # no hammering: one attempt after the restart
    assert after_restart[0].at >= virtual(state.backoff_until_ms) - 0.002
    assert done <= virtual(state.backoff_until_ms) + settings.poll_interval + 1
    assert storage.statuses[item.envelope_id] == STATUS_FORWARDED
    after = storage.states[A]
    assert (after.failures, after.backoff_until_ms) == (0, 0)
    assert after.last_success_ms is not None


async def test_spool_retry_from_an_admin_ends_the_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport(down={A})
    settings = dataclasses.replace(FAST, backoff_initial=3600.0, backoff_max=3600.0)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    cuts = sample("gateway_peer_backoff_cut_total", peer=A, cause="retry")
    async with running(sender):
        await spool(storage, sender, [make_item(A)])
        await wait_until(lambda: len(transport.attempts) == 1, step=0.01)
        transport.down.clear()
        await trio.sleep(10)
        assert len(transport.attempts) == 1
        retried = trio.current_time()
        await storage.spool_retry(A)  # what `gateway spool retry` does, from another process
        done = await wait_until(lambda: storage.depth(A) == 0, step=0.01)
    assert done - retried <= settings.poll_interval + 0.01
    assert sample("gateway_peer_backoff_cut_total", peer=A, cause="retry") == cuts + 1


async def test_news_from_a_backing_off_peer_ends_the_wait_and_keeps_the_count(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport(down={A})
    settings = dataclasses.replace(FAST, backoff_initial=3600.0, backoff_max=3600.0)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A, B]), settings=settings)
    cuts = sample("gateway_peer_backoff_cut_total", peer=A, cause="heard")
    async with running(sender):
        await spool(storage, sender, [make_item(A)])
        await wait_until(lambda: len(transport.attempts) == 1, step=0.01)
        await trio.sleep(10)
        assert storage.states[A].failures == 1
        sender.heard_from(B)  # another peer's news changes nothing for A
        sender.heard_from("nobody.example")  # nor does one that is no peer
        await trio.sleep(10)
        assert len(transport.attempts) == 1
        transport.down.clear()
        heard = trio.current_time()
        sender.heard_from(A)
        done = await wait_until(lambda: storage.depth(A) == 0, step=0.001)
    assert done - heard <= 0.01  # at once, not at the poll (5 s) nor the backoff (up to 1 h)
    assert [a.delivered for a in transport.attempts] == [False, True]
    assert sample("gateway_peer_backoff_cut_total", peer=A, cause="heard") == cuts + 1
    assert storage.states[A].failures == 0  # the success reset it, as ever


async def test_news_ends_a_backoff_at_most_once_per_backoff_initial_and_a_failure_still_counts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport(down={A})
    settings = dataclasses.replace(FAST, backoff_initial=60.0, backoff_max=3600.0)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    start = trio.current_time()
    async with running(sender):
        await spool(storage, sender, [make_item(A)])
        await wait_until(lambda: len(transport.attempts) == 1, step=0.01)
        await trio.sleep(1)
        sender.heard_from(A)  # t=1: ends the 60 s wait; the peer is still down
        await wait_until(lambda: len(transport.attempts) == 2, step=0.001)
        await trio.sleep(0.01)
        assert storage.states[A].failures == 2  # counted: the next window is 120 s
        await trio.sleep(1)
        sender.heard_from(A)  # t=2: within 60 s of the last cut, so ignored
        await trio.sleep(30)
        assert len(transport.attempts) == 2
        await trio.sleep(30)
        sender.heard_from(A)  # t=62: a minute after the last cut, so it counts again
        await wait_until(lambda: len(transport.attempts) == 3, step=0.001)
    times = [a.at - start for a in transport.attempts]
    assert times == pytest.approx([0, 1, 62], abs=0.05)


async def test_news_does_not_cut_short_a_peer_that_answered_with_retry_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    busy = TransportError("busy", kind=FailureKind.HTTP_503, status=503, retry_after=240.0)
    transport.scripted[A] = [busy]
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    start = trio.current_time()
    async with running(sender):
        await spool(storage, sender, [make_item(A)])
        await wait_until(lambda: len(transport.attempts) == 1, step=0.01)
        for _ in range(3):
            await trio.sleep(60)
            sender.heard_from(A)  # it was up: it asked for four minutes, it gets them
        assert len(transport.attempts) == 1
        await wait_until(lambda: storage.depth(A) == 0, step=0.01)
    assert transport.attempts[1].at - start == pytest.approx(240, abs=0.05)


@pytest.mark.parametrize(
    ("last_error", "ends"),
    [
        ("connect: globex.example: connection refused", True),
        ("timeout: globex.example: no answer within 30s", True),
        ("network: globex.example: the connection broke", True),
        ("http_503: globex.example: answered 503", False),
        ("http_5xx: globex.example: answered 500", False),
        ("tls: globex.example: certificate not trusted", False),
        ("bad_answer: globex.example: not an answer", False),
        (None, False),
    ],
)
def test_news_ends_only_a_backoff_after_the_peer_could_not_be_reached(
    last_error: str | None, ends: bool
) -> None:
    state = PeerState(peer=A, failures=3, backoff_until_ms=EPOCH_MS, last_error=last_error)
    assert news_ends(state) is ends


async def test_news_from_a_peer_that_is_not_backing_off_changes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    async with running(sender):
        await spool(storage, sender, [make_item(A)])
        await wait_until(lambda: storage.depth(A) == 0, step=0.01)
        for _ in range(3):
            sender.heard_from(A)
        await trio.sleep(60)
        assert len(transport.attempts) == 1
        assert A not in storage.states or storage.states[A].failures == 0


async def test_409_gets_a_new_transaction_id_and_413_halves_the_batch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    transport.scripted[A] = [
        TransportError("conflict", kind=FailureKind.TXN_CONFLICT, status=409),
        TransportError("too large", kind=FailureKind.TOO_LARGE, status=413),
    ]
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    items = [make_item(A) for _ in range(8)]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    first, second, third, *rest = transport.attempts
    assert first.ids == second.ids
    assert first.txn_id != second.txn_id
    assert len(second.ids) == 8
    assert len(third.ids) == 4
    assert [len(a.ids) for a in rest] == [4]  # a success restores the full batch size
    assert transport.delivered[A] == [item.envelope_id for item in items]


async def test_an_answer_that_does_not_match_is_a_failure_and_the_same_batch_goes_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    transport.scripted[A] = [lambda ids: [EnvelopeResult(i, ACCEPTED) for i in reversed(ids)]]
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]))
    items = [make_item(A) for _ in range(3)]
    async with running(sender):
        await spool(storage, sender, items)
        await wait_until(lambda: storage.depth(A) == 0)
    first, second = transport.attempts
    assert (first.txn_id, first.body) == (second.txn_id, second.body)
    assert second.at - first.at == pytest.approx(1.0)  # one failure: the first window
    assert storage.states[A].last_error is None
    assert transport.delivered[A] == [item.envelope_id for item in items]


async def test_envelopes_expired_in_a_backed_off_lane_are_never_sent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport(down={A})
    settings = dataclasses.replace(FAST, backoff_initial=60.0, backoff_max=60.0)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A]), settings=settings)
    short, long = make_item(A, ttl_ms=10_000), make_item(A)
    before = sample("gateway_spool_expired_total", peer=A)
    async with running(sender):  # no sweeper: the lane itself drops them
        await spool(storage, sender, [short, long])
        await wait_until(lambda: len(transport.attempts) == 1, step=0.01)
        transport.down.clear()
        await wait_until(lambda: storage.depth(A) == 0)
    assert storage.statuses[short.envelope_id] == STATUS_EXPIRED
    assert storage.statuses[long.envelope_id] == STATUS_FORWARDED
    assert transport.delivered[A] == [long.envelope_id]
    assert transport.attempts[1].ids == (long.envelope_id,)
    assert sample("gateway_spool_expired_total", peer=A) == before + 1


# -- independence of lanes: the acceptance test ------------------------------------------------


async def test_a_peer_down_for_an_hour_does_not_delay_another_and_drains_when_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rules = load_rules(tmp_path, [A, B])
    storage, transport = MemoryStorage(), FakeTransport(down={A})
    sender = make_sender(storage, transport, rules, rng=random.Random(4).random)
    sweeper = partial(
        run_spool_sweeper,
        storage,
        clock_ms=clock_ms,
        interval=MINUTE,
        peers=lambda: rules.current.peers,
    )
    spooled_b: dict[str, float] = {}
    short_a: list[SpoolItem] = []  # 20 minutes to live: most expire during the outage
    long_a: list[SpoolItem] = []  # a day to live: all wait for A
    start = trio.current_time()
    async with running(sender, sweeper):
        for minute in range(60):
            a_item = make_item(A, ttl_ms=20 * 60_000 if minute % 2 else DAY_MS)
            (short_a if minute % 2 else long_a).append(a_item)
            b_item = make_item(B)
            await spool(storage, sender, [a_item, b_item])
            spooled_b[b_item.envelope_id] = trio.current_time()
            await trio.sleep(MINUTE)
        assert trio.current_time() - start == pytest.approx(HOUR)
        assert sample("gateway_spool_envelopes", peer=A) > 0
        assert sample("gateway_spool_oldest_age_seconds", peer=A) > 50 * MINUTE
        transport.down.clear()  # A is back
        back = trio.current_time()
        drained = await wait_until(lambda: storage.depth(A) == 0)
        await trio.sleep(2 * MINUTE)  # a sweep after the drain refreshes the gauges

    # B: every envelope arrived within a second of being spooled, all hour long.
    assert set(transport.delivered_at) >= set(spooled_b)
    assert max(transport.delivered_at[i] - t for i, t in spooled_b.items()) <= 1.0
    assert transport.delivered[B] == list(spooled_b)

    # A: it was tried throughout the outage, backing off up to the 300 s cap, no faster.
    outage = [a.at for a in transport.attempts_to(A) if a.at < back]
    gaps = [later - earlier for earlier, later in itertools.pairwise(outage)]
    assert 12 <= len(outage) <= 60
    assert max(gaps) <= FAST.backoff_max + 0.01
    assert outage[-1] > back - FAST.backoff_max - 1  # still trying near the end

    # A is drained within one backoff window of its return, in spool order.
    assert drained - back <= FAST.backoff_max + 1
    in_spool_order = sorted(long_a + short_a, key=lambda i: i.created_ms)
    sent = [
        item.envelope_id for item in in_spool_order if item.envelope_id in transport.delivered_at
    ]
    assert transport.delivered[A] == sent
    assert {storage.statuses[item.envelope_id] for item in long_a} == {STATUS_FORWARDED}

    # A's envelopes that expired meanwhile got `expired` and were never sent after expiry.
    expired = [item for item in short_a if virtual(item.expires_ms) <= back]
    assert len(expired) >= 20
    for item in short_a:
        status = storage.statuses[item.envelope_id]
        if item in expired:
            assert status == STATUS_EXPIRED
        assert status in {STATUS_EXPIRED, STATUS_FORWARDED}
        for attempt in transport.attempts_to(A):
            if item.envelope_id in attempt.ids:
                assert attempt.at < virtual(item.expires_ms)
        if status == STATUS_EXPIRED:
            assert item.envelope_id not in transport.delivered_at
    assert storage.scrubs > 0  # the sweeper scrubbed after removing
    assert sample("gateway_spool_envelopes", peer=A) == 0
    assert storage.states[A].failures == 0


async def test_a_peer_that_hangs_is_cut_off_by_the_deadline_and_delays_no_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport(hang={A})
    settings = dataclasses.replace(FAST, transaction_timeout=20.0)
    sender = make_sender(storage, transport, load_rules(tmp_path, [A, B]), settings=settings)
    async with running(sender):
        await spool(storage, sender, [make_item(A)])
        await trio.sleep(1)
        for _ in range(5):
            item = make_item(B)
            spooled = trio.current_time()
            await spool(storage, sender, [item])
            arrived = await wait_until(lambda i=item: i.envelope_id in transport.delivered_at)
            assert arrived - spooled <= 1.0
            await trio.sleep(7)
        await wait_until(lambda: len(transport.attempts_to(A)) == 2, step=0.01)
    state = storage.states[A]
    assert state.failures >= 1
    assert state.last_error is not None
    assert state.last_error.startswith("timeout:")
    first, second = transport.attempts_to(A)[:2]
    assert second.at - first.at == pytest.approx(20.0 + 1.0)  # deadline, then the first window


# -- rules reloads ------------------------------------------------------------------------------


async def test_lanes_follow_the_rules_and_a_removed_peers_envelopes_wait(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    endpoints = {A: f"https://gw.{A}:8443", B: f"https://gw.{B}:8443"}
    rules = RulesHolder.load(write_rules(tmp_path, endpoints))
    storage, transport = MemoryStorage(), FakeTransport()
    sender = make_sender(storage, transport, rules)
    async with running(sender):
        assert sender.lanes == {A, B}
        # B leaves the rules: its lane stops and its connection closes.
        write_rules(tmp_path, {A: endpoints[A]})
        record = await rules.reload()
        assert record is not None
        assert record.ok
        await wait_until(lambda: sender.lanes == {A})
        await wait_until(lambda: B in transport.closed)
        # Envelopes still spooled for B (an older process put them there) wait.
        waiting = make_item(B)
        await spool(storage, sender, [waiting])
        await trio.sleep(10 * MINUTE)
        assert storage.statuses[waiting.envelope_id] == STATUS_QUEUED
        assert transport.attempts_to(B) == []
        # A's endpoint changes: its lane is replaced and its old connection closed.
        closed_a = transport.closed.count(A)
        write_rules(tmp_path, {A: "https://gw2.globex.example:9443", B: endpoints[B]})
        await rules.reload()
        await wait_until(lambda: transport.closed.count(A) == closed_a + 1)
        # ... and B is back: its lane drains what waited.
        await wait_until(lambda: storage.depth(B) == 0)
        assert sender.lanes == {A, B}
        item = make_item(A)
        await spool(storage, sender, [item])
        await wait_until(lambda: storage.depth(A) == 0)
    assert storage.statuses[waiting.envelope_id] == STATUS_FORWARDED
    assert transport.delivered[A] == [item.envelope_id]


# -- the sweeper ---------------------------------------------------------------------------------


async def test_a_sweep_expires_scrubs_and_shows_each_lane(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage = MemoryStorage()
    gone = [make_item(A, ttl_ms=1000) for _ in range(5)]
    kept = [make_item(A), make_item(B), make_item("other.example")]
    await storage.spool_put([*gone, *kept], at_ms=clock_ms())
    before = sample("gateway_spool_expired_total", peer=A)
    await trio.sleep(90)
    result = await sweep_spool(storage, now_ms=clock_ms(), peers={A, B}, batch=2)
    assert (result.expired, result.scrubbed, result.lanes) == (5, True, 3)
    assert {storage.statuses[item.envelope_id] for item in gone} == {STATUS_EXPIRED}
    assert sample("gateway_spool_expired_total", peer=A) == before + 5
    assert sample("gateway_spool_envelopes", peer=A) == 1
    assert sample("gateway_spool_envelopes", peer="other") == 1  # not a peer: bounded label
    assert sample("gateway_spool_oldest_age_seconds", peer=B) == pytest.approx(90, abs=0.01)
    again = await sweep_spool(storage, now_ms=clock_ms(), peers={A, B})
    assert (again.expired, again.scrubbed) == (0, None)


# -- the transport's edges, without a network ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (503, FailureKind.HTTP_503),
        (429, FailureKind.HTTP_429),
        (500, FailureKind.HTTP_5XX),
        (409, FailureKind.TXN_CONFLICT),
        (413, FailureKind.TOO_LARGE),
        (403, FailureKind.HTTP_4XX),
        (302, FailureKind.HTTP_OTHER),
    ],
)
def test_every_status_but_200_is_a_retryable_failure(status: int, kind: FailureKind) -> None:
    body = b'{"error":"origin_mismatch","message":"peer text that must not travel"}'
    with pytest.raises(TransportError) as caught:
        interpret_answer(A, status, body, expected=1, retry_after="7")
    assert caught.value.kind is kind
    assert caught.value.status == status
    assert caught.value.retry_after == 7
    assert "peer text" not in caught.value.message


def test_a_200_that_is_not_an_answer_is_a_bad_answer() -> None:
    good = encode_results([EnvelopeResult("x", ACCEPTED)])
    assert interpret_answer(A, 200, good, expected=1) == [EnvelopeResult("x", ACCEPTED)]
    for body, expected in ((good, 2), (b"not json", 1), (b'{"results": 5}', 1)):
        with pytest.raises(TransportError) as caught:
            interpret_answer(A, 200, body, expected=expected)
        assert caught.value.kind is FailureKind.BAD_ANSWER


def test_httpx_errors_are_translated() -> None:
    request = httpx.Request("PUT", "https://127.0.0.1:1/")
    cases = [
        (httpx.ConnectError("refused", request=request), FailureKind.CONNECT),
        (httpx.ConnectTimeout("slow", request=request), FailureKind.TIMEOUT),
        (httpx.ReadTimeout("slow", request=request), FailureKind.TIMEOUT),
        (httpx.RemoteProtocolError("garbage", request=request), FailureKind.NETWORK),
        (httpx.UnsupportedProtocol("ftp", request=request), FailureKind.LOCAL),
    ]
    for exc, kind in cases:
        assert translate_httpx_error(exc, A).kind is kind


# -- the real transport: mTLS on 127.0.0.1 ---------------------------------------------------

TLS_TEST_TIMEOUT = 30  # seconds, real time: a hang fails instead of blocking the suite


@dataclass(frozen=True)
class Side:
    org: str
    ca: dev.Issued
    gateway: dev.Issued
    cert_file: Path
    key_file: Path


def make_side(directory: Path, org: str) -> Side:
    now = datetime.now(UTC)
    ca = dev.issue_ca(org, now=now)
    gateway = dev.issue_gateway_cert(ca, org, now=now)
    cert_file, key_file = directory / f"{org}.pem", directory / f"{org}.key"
    dev.write_file(cert_file, gateway.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=False)
    dev.write_private_key(key_file, gateway.key, replace=False)
    (directory / f"{org}-ca.pem").write_bytes(ca.cert_pem())
    return Side(org, ca, gateway, cert_file, key_file)


def answer_accepting_all(request: Request) -> Response:
    """A receiver's answer that accepts every envelope of the transaction."""
    txn = decode_transaction(request.body)
    results = [EnvelopeResult(slot.envelope_id, ACCEPTED) for slot in txn.slots]
    return Response(200, [("content-type", "application/json")], encode_results(results))


def federation_server(
    receiving: Side, sending: Side, handler: Handler, *, names: list[str | None] | None = None
) -> HTTPServer:
    """``receiving``'s federation listener, trusting ``sending`` (SNI names go to ``names``)."""
    context = federation_server_context(
        cert_file=receiving.cert_file,
        key_file=receiving.key_file,
        trusted_ca_pems=[sending.ca.cert_pem()],
    )
    if names is not None:
        context.sni_callback = lambda _obj, name, _ctx: names.append(name)
    trust = {sending.org: PeerTrust(org=sending.org, cas=(sending.ca.cert,))}

    def identify(stream: trio.SSLStream[trio.SocketStream]) -> str:
        return verify_peer_certificate(peer_certificate_der(stream), trust, now=datetime.now(UTC))

    return HTTPServer("federation", handler, ssl_context=context, identify=identify)


async def test_the_httpx_transport_speaks_mtls_as_the_rules_say(tmp_path: Path) -> None:
    acme, globex = make_side(tmp_path, ORG), make_side(tmp_path, A)
    seen: list[Request] = []
    server_names: list[str | None] = []

    async def receiver(request: Request) -> Response:
        seen.append(request)
        return answer_accepting_all(request)

    server = federation_server(globex, acme, receiver, names=server_names)
    with trio.fail_after(TLS_TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            endpoint = f"https://127.0.0.1:{port}"  # an IP: the name checked is the org's
            good_pin = spki_pin(globex.gateway.cert)
            rules_file = write_rules(tmp_path, {A: endpoint}, pins={A: good_pin})
            rules = RulesHolder.load(rules_file)
            transport = HttpxPeerTransport(ORG, acme.cert_file, acme.key_file, rules, timeout=10.0)
            try:
                envelopes = [decode_envelope(make_item(A).data) for _ in range(2)]
                body = encode_transaction(ORG, A, envelopes)
                txn_id = new_txn_id()
                results = await transport.send_transaction(A, txn_id, body, expected=2)
                assert results == [EnvelopeResult(e.id, ACCEPTED) for e in envelopes]
                (request,) = seen
                assert request.peer == ORG  # our client certificate proved our org
                assert request.method == "PUT"
                assert request.path == TRANSACTIONS_PATH + txn_id
                assert request.body == body  # the exact bytes
                assert server_names == [A]  # SNI is the peer's org, not the endpoint's IP

                # A second transaction rides the same persistent connection.
                again = await transport.send_transaction(A, new_txn_id(), body, expected=2)
                assert again == results
                assert seen[1].remote == seen[0].remote
                assert server_names == [A]

                # A pin that matches no key of the server: refused inside the handshake,
                # before a byte of the transaction leaves.
                other_pin = spki_pin(
                    dev.issue_gateway_cert(globex.ca, A, now=datetime.now(UTC)).cert
                )
                write_rules(tmp_path, {A: endpoint}, pins={A: other_pin})
                await rules.reload()
                with pytest.raises(TransportError) as caught:
                    await transport.send_transaction(A, new_txn_id(), body, expected=2)
                assert caught.value.kind is FailureKind.PIN_MISMATCH
                assert caught.value.reason is Reason.PIN_MISMATCH
                assert len(seen) == 2

                # Another CA for the peer: the server's certificate is not trusted.
                stranger = dev.issue_ca(A, now=datetime.now(UTC))
                (tmp_path / f"{A}-ca.pem").write_bytes(stranger.cert_pem())
                write_rules(tmp_path, {A: endpoint})
                await rules.reload()
                with pytest.raises(TransportError) as caught:
                    await transport.send_transaction(A, new_txn_id(), body, expected=2)
                assert caught.value.kind is FailureKind.TLS
                assert caught.value.reason is Reason.CERT_UNTRUSTED
                assert len(seen) == 2

                # The right CA and pin again: the client is rebuilt and it works.
                (tmp_path / f"{A}-ca.pem").write_bytes(globex.ca.cert_pem())
                write_rules(tmp_path, {A: endpoint}, pins={A: good_pin})
                await rules.reload()
                await transport.send_transaction(A, new_txn_id(), body, expected=2)
                assert len(seen) == 3

                # A peer that left the rules is not dialled.
                write_rules(tmp_path, {})
                await rules.reload()
                with pytest.raises(TransportError) as caught:
                    await transport.send_transaction(A, new_txn_id(), body, expected=2)
                assert caught.value.kind is FailureKind.UNKNOWN_PEER
                assert transport.peers_connected == frozenset()
            finally:
                await transport.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("connections", [1, 2])
async def test_the_httpx_transport_keeps_one_connection_per_transaction_in_flight(
    tmp_path: Path, connections: int
) -> None:
    acme, globex = make_side(tmp_path, ORG), make_side(tmp_path, A)
    holding = 0
    most_held = 0
    remotes: set[object] = set()
    both_here = trio.Event()

    async def receiver(request: Request) -> Response:
        nonlocal holding, most_held
        remotes.add(request.remote)
        holding += 1
        most_held = max(most_held, holding)
        try:
            if holding == 2:
                both_here.set()
            if connections == 2:
                await both_here.wait()  # each answer waits until both are here at once
        finally:
            holding -= 1
        return answer_accepting_all(request)

    server = federation_server(globex, acme, receiver)
    with trio.fail_after(TLS_TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            rules = RulesHolder.load(write_rules(tmp_path, {A: f"https://127.0.0.1:{port}"}))
            transport = HttpxPeerTransport(
                ORG,
                acme.cert_file,
                acme.key_file,
                rules,
                timeout=10.0,
                connections_per_peer=connections,
            )
            try:
                body = encode_transaction(ORG, A, [decode_envelope(make_item(A).data)])

                async with trio.open_nursery() as senders:
                    for _ in range(2):
                        senders.start_soon(
                            partial(transport.send_transaction, A, new_txn_id(), body, expected=1)
                        )
            finally:
                await transport.aclose()
            nursery.cancel_scope.cancel()
    # With two connections both transactions were at the receiver at once; with one,
    # the second went after the first's answer, on the same connection.
    assert most_held == connections
    assert len(remotes) == connections


async def test_nothing_listening_is_a_connect_failure(tmp_path: Path) -> None:
    acme = make_side(tmp_path, ORG)
    make_side(tmp_path, A)  # its CA file, for the rules
    with trio.socket.socket() as probe:  # a port that was free a moment ago
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rules = RulesHolder.load(write_rules(tmp_path, {A: f"https://127.0.0.1:{port}"}))
    transport = HttpxPeerTransport(ORG, acme.cert_file, acme.key_file, rules, timeout=5.0)
    try:
        with trio.fail_after(TLS_TEST_TIMEOUT), pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), b"{}", expected=0)
    finally:
        await transport.aclose()
    assert caught.value.kind is FailureKind.CONNECT


async def test_a_peer_with_several_endpoints_is_reached_on_one_that_works(tmp_path: Path) -> None:
    """Nodes of one peer: a dead endpoint is skipped at once, and the live one is kept."""
    acme, globex = make_side(tmp_path, ORG), make_side(tmp_path, A)
    seen: dict[str, list[str]] = {"first": [], "second": []}

    def receiver(name: str) -> Handler:
        async def handle(request: Request) -> Response:
            seen[name].append(request.path)
            return answer_accepting_all(request)

        return handle

    with trio.socket.socket() as probe:  # a port that was free a moment ago
        await probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    failovers = functools.partial(sample, "gateway_peer_endpoint_failovers_total", peer=A)
    before = failovers()
    with trio.fail_after(TLS_TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            second_scope = trio.CancelScope()

            async def serve_second(*, task_status: trio.TaskStatus[int]) -> None:
                with second_scope:
                    server = federation_server(globex, acme, receiver("second"))
                    await server.serve("127.0.0.1", 0, task_status=task_status)

            second = await nursery.start(serve_second)
            endpoints = f"[https://127.0.0.1:{free_port}, https://127.0.0.1:{second}]"
            rules = RulesHolder.load(write_rules(tmp_path, {A: endpoints}))
            transport = HttpxPeerTransport(ORG, acme.cert_file, acme.key_file, rules, timeout=10.0)
            envelopes = [decode_envelope(make_item(A).data)]
            body = encode_transaction(ORG, A, envelopes)
            try:
                # Nothing listens at the first: the second takes it, and is kept.
                await transport.send_transaction(A, new_txn_id(), body, expected=1)
                await transport.send_transaction(A, new_txn_id(), body, expected=1)
                assert (len(seen["first"]), len(seen["second"])) == (0, 2)
                assert failovers() == before + 1

                # The first node comes up and the second goes away: the first takes over.
                await nursery.start(
                    federation_server(globex, acme, receiver("first")).serve,
                    "127.0.0.1",
                    free_port,
                )
                second_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                await transport.send_transaction(A, new_txn_id(), body, expected=1)
                assert (len(seen["first"]), len(seen["second"])) == (1, 2)
                assert failovers() == before + 2

                # Both down: a connect failure that says all were tried.
                nursery.cancel_scope.cancel()
            finally:
                await transport.aclose()
    rules = RulesHolder.load(write_rules(tmp_path, {A: endpoints}))
    transport = HttpxPeerTransport(ORG, acme.cert_file, acme.key_file, rules, timeout=5.0)
    try:
        with trio.fail_after(TLS_TEST_TIMEOUT), pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), body, expected=1)
    finally:
        await transport.aclose()
    assert caught.value.kind is FailureKind.CONNECT
    assert "and every other of its 2 endpoints" in caught.value.message
