"""The reference client and retention: it wraps for the key its gateway names, and refuses
(then reports) a message whose retention copy does not match, against a fake session."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from gateway.core.envelope import Envelope, signing_bytes
from gateway.core.keytext import format_retention_key
from gateway.crypto.envelope_crypto import (
    generate_retention_key,
    open_retained,
    seal,
    seal_v2,
)
from tests.unit.test_reference_client import ALICE, BOB, NOW, FakeSession, make_client

RETENTION_SECRET, RETENTION_KEY = generate_retention_key()


class RetainingSession(FakeSession):
    """A gateway that puts its user's group under outbound retention."""

    def __init__(self, *, retained: bool = True) -> None:
        super().__init__()
        self.retained = retained
        self.reported: list[str] = []

    async def me(self) -> dict[str, Any]:
        answer = await super().me()
        if self.retained:
            answer["retention"] = {
                "outbound": True,
                "inbound": False,
                "key": {"id": "acme-2026", "public_key": format_retention_key(RETENTION_KEY)},
            }
        return answer

    async def report_retention_mismatch(self, envelope_ids: Sequence[str]) -> int:
        assert not set(envelope_ids) & set(self.acked), "reported after it was acknowledged"
        self.reported.extend(envelope_ids)
        return len(envelope_ids)


async def test_a_sender_under_retention_seals_version_2_for_the_named_key(
    tmp_path: Path,
) -> None:
    session = RetainingSession()
    session.publish_as_org(BOB)
    await make_client(tmp_path, session).send(BOB.address, "for the record")
    [envelope] = session.submitted
    assert envelope.version == 2
    assert envelope.retention is not None
    assert envelope.retention.key_id == "acme-2026"
    assert open_retained(envelope, retention_secret=RETENTION_SECRET) == b"for the record"


async def test_a_sender_not_under_retention_seals_version_1(tmp_path: Path) -> None:
    session = RetainingSession(retained=False)
    session.publish_as_org(BOB)
    await make_client(tmp_path, session).send(BOB.address, "hello")
    [envelope] = session.submitted
    assert envelope.version == 1


def from_alice(text: str, **options: Any) -> Envelope:
    return seal_v2(
        text.encode(),
        sender=ALICE,
        recipient=BOB.public(),
        created_ms=NOW,
        expires_ms=NOW + 3_600_000,
        retention_key_id="acme-2026",
        retention_public_key=RETENTION_KEY,
        **options,
    )


def cheating(envelope: Envelope, wrap: bytes) -> Envelope:
    """What a sender that does not retain honestly sends: another wrap, signed."""
    assert envelope.retention is not None
    changed = dataclasses.replace(
        envelope, retention=dataclasses.replace(envelope.retention, wrap=wrap)
    )
    signature = SigningKey(ALICE.signing_seed).sign(signing_bytes(changed)).signature
    return dataclasses.replace(changed, signature=signature)


async def test_a_dishonest_retention_copy_is_refused_reported_and_acknowledged(
    tmp_path: Path,
) -> None:
    session = RetainingSession()
    session.publish_as_org(ALICE)
    honest = from_alice("kept")
    dishonest = cheating(from_alice("hidden from the archive"), bytes(range(80)))
    old = seal(b"old", sender=ALICE, recipient=BOB.public(), created_ms=NOW, expires_ms=NOW + 1)
    session.mailbox = [honest, dishonest, old]
    inbox = await make_client(tmp_path, session, BOB).receive()
    assert [m.text for m in inbox.messages] == ["kept", "old"]
    [problem] = inbox.problems
    assert problem.envelope_id == dishonest.id
    assert problem.retention_mismatch
    assert problem.discarded
    assert "REFUSED" in problem.message
    assert "did not retain it honestly" in problem.message
    assert "hidden" not in problem.message
    assert session.reported == [dishonest.id]
    assert inbox.reported == 1
    assert set(session.acked) == {honest.id, dishonest.id, old.id}


async def test_a_known_sender_is_not_looked_up_again_for_a_mismatch(tmp_path: Path) -> None:
    session = RetainingSession()
    session.publish_as_org(ALICE)
    client = make_client(tmp_path, session, BOB)
    session.mailbox = [from_alice("first")]
    await client.receive()
    session.records.clear()  # a lookup now would fail: the known key must decide
    session.mailbox = [cheating(from_alice("second"), bytes(80))]
    inbox = await client.receive()
    assert [p.retention_mismatch for p in inbox.problems] == [True]
    assert inbox.reported == 1
