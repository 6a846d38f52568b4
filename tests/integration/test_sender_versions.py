"""A lane learns what envelope versions its peer speaks before sending it version 2 ones.

The real Sender on trio's autojump clock, with the in-memory storage and fake
transport of test_sender.py, and a fake source of peers' envelope versions;
then :class:`PeerVersions` itself against a fake ``GET``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing

from gateway.core.envelope import Envelope, decode_envelope, encode_envelope, envelope_version_of
from gateway.errors import Reason
from gateway.federation.framing import decode_any_transaction, is_framed
from gateway.federation.protocol import (
    ACCEPTED,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_TXN_V2,
    VERSION_PATH,
    EnvelopeResult,
    parse_envelope_versions,
    version_document,
)
from gateway.federation.sender import Sender
from gateway.federation.transport import FailureKind, TransportError
from gateway.federation.versions import PeerVersions
from gateway.storage.base import SpoolItem
from tests.integration.test_sender import (
    FAST,
    ORG,
    A,
    Attempt,
    FakeTransport,
    MemoryStorage,
    clock_ms,
    load_rules,
    make_item,
    running,
    sample,
    spool,
    wait_until,
)


def make_v2_item(peer: str) -> SpoolItem:
    item = make_item(peer)
    v1 = decode_envelope(item.data)
    v2 = Envelope(
        version=2,
        id=v1.id,
        sender=v1.sender,
        recipient=v1.recipient,
        created=v1.created,
        expires=v1.expires,
        burn_on_read=False,
        ciphertext=os.urandom(100),
        signature=os.urandom(64),
        group="engineering",
        wrapped_key=os.urandom(80),
    )
    return dataclasses.replace(item, data=encode_envelope(v2))


@dataclass
class FakeVersions:
    speaks: dict[str, frozenset[int] | None] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    async def envelope_versions(self, peer: str) -> frozenset[int] | None:
        await trio.lowlevel.checkpoint()
        self.asked.append(peer)
        return self.speaks.get(peer)


def make_sender(
    storage: MemoryStorage, transport: FakeTransport, tmp_path: Path, versions: FakeVersions
) -> Sender:
    return Sender(
        org=ORG,
        storage=storage,
        transport=transport,
        rules=load_rules(tmp_path, [A]),
        clock_ms=clock_ms,
        settings=FAST,
        random=lambda: 1.0,
        envelope_versions=versions,
    )


async def test_the_version_of_canonical_bytes() -> None:
    assert envelope_version_of(make_item(A).data) == 1
    assert envelope_version_of(make_v2_item(A).data) == 2


async def test_a_peer_speaking_only_version_1_gets_no_version_2_envelope(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    versions = FakeVersions({A: frozenset({1})})
    sender = make_sender(storage, transport, tmp_path, versions)
    old, new, old_again = make_item(A), make_v2_item(A), make_item(A)
    labels = {"direction": "outbound", "peer": A, "outcome": "envelope_bad_version"}
    before = sample("gateway_federation_envelopes_total", **labels)
    async with running(sender):
        await spool(storage, sender, [old, new, old_again])
        await wait_until(lambda: storage.depth(A) == 0)
    assert storage.statuses[new.envelope_id] == "rejected:envelope_bad_version"
    assert storage.statuses[old.envelope_id] == "forwarded"
    assert storage.statuses[old_again.envelope_id] == "forwarded"
    sent = [i for attempt in transport.attempts for i in attempt.ids]
    assert new.envelope_id not in sent
    assert versions.asked == [A]
    assert sample("gateway_federation_envelopes_total", **labels) == before + 1


async def test_a_peer_speaking_version_2_gets_it_and_version_1_alone_asks_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    versions = FakeVersions({A: frozenset({1, 2})})
    sender = make_sender(storage, transport, tmp_path, versions)
    only_v1 = make_item(A)
    async with running(sender):
        await spool(storage, sender, [only_v1])
        await wait_until(lambda: storage.depth(A) == 0)
        assert versions.asked == []
        new = make_v2_item(A)
        await spool(storage, sender, [new])
        await wait_until(lambda: storage.depth(A) == 0)
    assert storage.statuses[new.envelope_id] == "forwarded"
    assert versions.asked == [A]


async def test_when_the_versions_are_not_known_the_lane_sends_and_the_peer_decides(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FakeTransport()
    versions = FakeVersions({A: None})
    sender = make_sender(storage, transport, tmp_path, versions)
    new = make_v2_item(A)
    transport.reject[new.envelope_id] = Reason.ENVELOPE_BAD_VERSION.value  # an old receiver
    async with running(sender):
        await spool(storage, sender, [new])
        await wait_until(lambda: storage.depth(A) == 0)
    assert storage.statuses[new.envelope_id] == "rejected:envelope_bad_version"
    assert len(transport.attempts) == 1


# -- PeerVersions ----------------------------------------------------------------------


@dataclass
class FakeGetter:
    answers: list[tuple[int, bytes] | Exception]
    asked: list[tuple[str, str]] = field(default_factory=list)

    async def get(self, peer: str, path: str, *, max_bytes: int) -> tuple[int, bytes]:
        await trio.lowlevel.checkpoint()
        self.asked.append((peer, path))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def document(**changes: object) -> bytes:
    return json.dumps({**version_document(), **changes}).encode()


def test_our_version_document_lists_both_envelope_versions() -> None:
    assert version_document()["envelope_versions"] == [1, 2]
    assert parse_envelope_versions(document()) == frozenset({1, 2})
    old = {"versions": ["v1"], "server": "federation-gateway/0.9"}
    assert parse_envelope_versions(json.dumps(old).encode()) == frozenset({1})


async def test_peer_versions_are_asked_once_and_remembered_for_a_while(
    autojump_clock: trio.testing.MockClock,
) -> None:
    getter = FakeGetter([(200, document()), (200, document(envelope_versions=[1]))])
    versions = PeerVersions(getter, ttl=3600.0)
    assert await versions.envelope_versions(A) == frozenset({1, 2})
    await trio.sleep(3599)
    assert await versions.envelope_versions(A) == frozenset({1, 2})
    assert getter.asked == [(A, VERSION_PATH)]
    await trio.sleep(2)
    assert await versions.envelope_versions(A) == frozenset({1})  # it downgraded
    assert len(getter.asked) == 2


async def test_a_failed_question_is_unknown_and_asked_again_soon(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = TransportError(f"{A}: connection refused", kind=FailureKind.CONNECT)
    getter = FakeGetter(
        [
            refused,
            (500, b"{}"),
            (200, b"not json"),
            (200, document(envelope_versions="all")),
            (200, document()),
        ]
    )
    versions = PeerVersions(getter, failed_ttl=60.0)
    for _ in range(4):
        assert await versions.envelope_versions(A) is None
        assert await versions.envelope_versions(A) is None  # remembered: not asked again
        await trio.sleep(61)
    assert await versions.envelope_versions(A) == frozenset({1, 2})
    assert len(getter.asked) == 5


async def test_a_hanging_peer_is_unknown_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Hanging:
        async def get(self, peer: str, path: str, *, max_bytes: int) -> tuple[int, bytes]:
            await trio.sleep_forever()
            raise AssertionError

    versions = PeerVersions(Hanging(), timeout=10.0)
    started = trio.current_time()
    assert await versions.envelope_versions(A) is None
    assert trio.current_time() - started == 10.0


# -- transaction framings ------------------------------------------------------------------


async def test_transaction_types_come_from_the_same_document_and_a_refusal_is_remembered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old = json.dumps({"versions": ["v1"], "envelope_versions": [1, 2]}).encode()
    getter = FakeGetter([(200, document()), (200, document()), (200, old)])
    versions = PeerVersions(getter, ttl=3600.0)
    both = frozenset({MEDIA_TYPE_JSON, MEDIA_TYPE_TXN_V2})
    assert await versions.transaction_types(A) == both
    assert await versions.envelope_versions(A) == frozenset({1, 2})  # one question for both
    assert len(getter.asked) == 1
    versions.refused(A, MEDIA_TYPE_TXN_V2)
    versions.refused(A, MEDIA_TYPE_JSON)  # never: JSON is every peer's
    assert await versions.transaction_types(A) == {MEDIA_TYPE_JSON}
    await trio.sleep(3599)
    assert await versions.transaction_types(A) == {MEDIA_TYPE_JSON}
    await trio.sleep(2)  # the refusal and the document both stop standing: asked again
    assert await versions.transaction_types(A) == both
    assert len(getter.asked) == 2
    await trio.sleep(3601)
    assert await versions.transaction_types(A) == {MEDIA_TYPE_JSON}  # a peer without the list


async def test_when_the_types_are_not_known_json_is_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = TransportError(f"{A}: connection refused", kind=FailureKind.CONNECT)
    versions = PeerVersions(FakeGetter([refused]))
    assert await versions.transaction_types(A) == {MEDIA_TYPE_JSON}


@dataclass
class FramingTransport(FakeTransport):
    """A peer that reads both framings, answering a broken slot as a receiver does."""

    content_types: list[str] = field(default_factory=list)

    async def send_transaction(
        self,
        peer: str,
        txn_id: str,
        body: bytes,
        *,
        expected: int,
        content_type: str = MEDIA_TYPE_JSON,
    ) -> list[EnvelopeResult]:
        await trio.lowlevel.checkpoint()
        self.content_types.append(content_type)
        assert is_framed(body) == (content_type == MEDIA_TYPE_TXN_V2)
        txn = decode_any_transaction(body)
        assert len(txn.slots) == expected
        ids = tuple(slot.envelope_id or "" for slot in txn.slots)
        self.attempts.append(Attempt(trio.current_time(), peer, txn_id, body, ids, True))
        return [
            EnvelopeResult(slot.envelope_id, ACCEPTED if slot.error is None else slot.error.value)
            for slot in txn.slots
        ]


@dataclass
class FramingVersions(FakeVersions):
    types: frozenset[str] = frozenset({MEDIA_TYPE_JSON, MEDIA_TYPE_TXN_V2})
    refusals: list[tuple[str, str]] = field(default_factory=list)

    async def transaction_types(self, peer: str) -> frozenset[str]:
        await trio.lowlevel.checkpoint()
        return self.types

    def refused(self, peer: str, media_type: str) -> None:
        self.refusals.append((peer, media_type))


async def test_a_damaged_spool_entry_in_a_frame_costs_only_its_own_envelope(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FramingTransport()
    versions = FramingVersions({A: frozenset({1, 2})})
    sender = make_sender(storage, transport, tmp_path, versions)
    good, damaged, v2 = make_item(A), make_item(A), make_v2_item(A)
    # Bytes that no longer parse: the receiver cannot read its id and answers null.
    damaged = dataclasses.replace(damaged, data=damaged.data[:40])
    async with running(sender):
        await spool(storage, sender, [good, damaged, v2])
        await wait_until(lambda: storage.depth(A) == 0)
    assert transport.content_types == [MEDIA_TYPE_TXN_V2]  # one transaction, framed
    assert storage.statuses[good.envelope_id] == "forwarded"
    assert storage.statuses[v2.envelope_id] == "forwarded"
    assert storage.statuses[damaged.envelope_id] == "rejected:envelope_malformed"


async def test_an_answer_that_accepts_a_null_id_is_still_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    storage, transport = MemoryStorage(), FramingTransport()
    answers = [[EnvelopeResult(None, ACCEPTED)]]  # the first answer: accepted, id null

    async def answer(*args: object, **kwargs: object) -> list[EnvelopeResult]:
        results = await FramingTransport.send_transaction(transport, *args, **kwargs)  # type: ignore[arg-type]
        return answers.pop() if answers else results

    transport.send_transaction = answer  # type: ignore[method-assign]
    sender = make_sender(storage, transport, tmp_path, FramingVersions({}))
    item = make_item(A)
    async with running(sender):
        await spool(storage, sender, [item])
        await wait_until(lambda: storage.statuses.get(item.envelope_id) == "forwarded")
    # A position may name a refused envelope, never an accepted one: a bad answer, sent again.
    assert transport.content_types == [MEDIA_TYPE_TXN_V2, MEDIA_TYPE_TXN_V2]
    assert transport.attempts[0].body == transport.attempts[1].body  # the same bytes
