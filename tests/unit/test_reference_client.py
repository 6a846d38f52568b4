"""The reference client's trust decisions, against a fake session (no network).

A tampered key record, a record signed by another org key, a changed key,
and an envelope whose signature does not verify: each is refused, and
refusing remembers nothing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.client.api import Submitted
from gateway.client.contacts import (
    ContactBook,
    KeyChangedError,
    Trust,
    decide_trust,
    default_contacts_path,
)
from gateway.client.reference import ReferenceClient, UntrustedKeyRecordError
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.core.keytext import format_signing_key
from gateway.crypto.envelope_crypto import generate_secret, seal
from gateway.crypto.key_records import org_verify_key, sign_key_record
from gateway.crypto.keys import UserKeys
from gateway.errors import ConfigError

NOW = 1_700_000_000_000
ACME_SEED, GLOBEX_SEED = generate_secret(), generate_secret()
ORG_SEEDS = {"acme.example": ACME_SEED, "globex.example": GLOBEX_SEED}
ALICE = UserKeys.generate(Address.of("alice", "acme.example"))
BOB = UserKeys.generate(Address.of("bob", "globex.example"))


class FakeSession:
    """The client API as a dict of signed records; records what was submitted and acked."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, object]] = {}
        self.mailbox: list[Envelope] = []
        self.submitted: list[Envelope] = []
        self.acked: list[str] = []

    def publish_as_org(self, keys: UserKeys) -> None:
        record = sign_key_record(
            keys.public(), org_signing_seed=ORG_SEEDS[keys.address.org], issued_ms=NOW
        )
        self.records[str(keys.address)] = record.to_json()

    async def me(self) -> dict[str, Any]:
        limits = {"ttl": {"min": 60, "default": 3600, "max": 86400}, "burn_on_read": "optional"}
        return {"address": "x", "group": "g", "limits": limits}

    async def submit(self, envelope: Envelope) -> Submitted:
        self.submitted.append(envelope)
        return Submitted(envelope.id, "queued")

    async def fetch(self, *, wait: int = 0, limit: int = 100) -> list[Envelope]:
        return list(self.mailbox)

    async def ack(self, envelope_ids: Sequence[str]) -> int:
        self.acked.extend(envelope_ids)
        return len(envelope_ids)

    async def status(self, envelope_id: str) -> dict[str, Any]:
        return {"id": envelope_id, "status": "queued", "at": NOW}

    async def publish_keys(self, public_keys: dict[str, object]) -> dict[str, Any]:
        return self.records[str(public_keys["address"])]

    async def lookup_keys(self, address: str) -> dict[str, Any]:
        return dict(self.records[address])

    async def org_signing_key(self, org: str) -> str:
        return format_signing_key(org_verify_key(ORG_SEEDS[org]))


def make_client(tmp_path: Path, session: FakeSession, keys: UserKeys = ALICE) -> ReferenceClient:
    contacts = ContactBook.load(tmp_path / f"{keys.address.user}.contacts.json")
    return ReferenceClient(session, keys, contacts, clock_ms=lambda: NOW)


async def test_a_tampered_record_is_refused_and_not_remembered(tmp_path: Path) -> None:
    session = FakeSession()
    session.publish_as_org(BOB)
    mallory = UserKeys.generate(BOB.address).public().to_json()
    session.records[str(BOB.address)]["encryption_key"] = mallory["encryption_key"]
    client = make_client(tmp_path, session)
    with pytest.raises(UntrustedKeyRecordError, match=r"NOT signed by globex\.example"):
        await client.send(BOB.address, "secret")
    assert session.submitted == []
    assert client.contacts.get(BOB.address) is None
    assert not (tmp_path / "alice.contacts.json").exists()


async def test_a_record_signed_by_another_org_key_is_refused(tmp_path: Path) -> None:
    session = FakeSession()
    session.records[str(BOB.address)] = sign_key_record(
        BOB.public(), org_signing_seed=ACME_SEED, issued_ms=NOW
    ).to_json()
    with pytest.raises(UntrustedKeyRecordError):
        await make_client(tmp_path, session).send(BOB.address, "secret")
    assert session.submitted == []


async def test_a_pinned_org_key_wins_over_the_gateways(tmp_path: Path) -> None:
    session = FakeSession()
    session.publish_as_org(BOB)
    contacts = ContactBook.load(tmp_path / "c.json")
    wrong = {"globex.example": org_verify_key(ACME_SEED)}
    client = ReferenceClient(session, ALICE, contacts, org_keys=wrong, clock_ms=lambda: NOW)
    with pytest.raises(UntrustedKeyRecordError, match="the key you pinned"):
        await client.send(BOB.address, "secret")


async def test_send_seals_to_the_verified_keys_and_remembers_them(tmp_path: Path) -> None:
    session = FakeSession()
    session.publish_as_org(BOB)
    client = make_client(tmp_path, session)
    sent = await client.send(BOB.address, "hello")
    assert sent.trust is Trust.NEW
    [envelope] = session.submitted
    assert envelope.expires - envelope.created == 3600 * 1000  # the group's default TTL
    path = tmp_path / "alice.contacts.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ContactBook.load(path).get(BOB.address) is not None
    assert (await client.send(BOB.address, "again")).trust is Trust.KNOWN


async def test_a_changed_key_is_refused_until_accepted(tmp_path: Path) -> None:
    session = FakeSession()
    session.publish_as_org(BOB)
    await make_client(tmp_path, session).send(BOB.address, "first")
    new_bob = UserKeys.generate(BOB.address)
    session.publish_as_org(new_bob)
    with pytest.raises(KeyChangedError, match="CHANGED"):
        await make_client(tmp_path, session).send(BOB.address, "second")
    assert len(session.submitted) == 1
    sent = await make_client(tmp_path, session).send(BOB.address, "third", accept_new_key=True)
    assert sent.trust is Trust.REPLACED
    assert (await make_client(tmp_path, session).send(BOB.address, "4")).trust is Trust.KNOWN


async def test_receive_opens_verified_envelopes_and_discards_forged_ones(tmp_path: Path) -> None:
    session = FakeSession()
    session.publish_as_org(ALICE)
    good = seal(b"hi bob", sender=ALICE, recipient=BOB.public(), created_ms=NOW, expires_ms=NOW + 1)
    forger = UserKeys(ALICE.address, generate_secret(), generate_secret())
    forged = seal(
        b"pay me", sender=forger, recipient=BOB.public(), created_ms=NOW, expires_ms=NOW + 1
    )
    session.mailbox = [good, forged]
    inbox = await make_client(tmp_path, session, BOB).receive()
    assert [(m.envelope_id, m.text) for m in inbox.messages] == [(good.id, "hi bob")]
    assert [(p.envelope_id, p.discarded) for p in inbox.problems] == [(forged.id, True)]
    assert session.acked == [good.id, forged.id]
    assert inbox.messages[0].to_json()["sent"] == "2023-11-14T22:13:20.000Z"


def test_decide_trust_and_the_contacts_file(tmp_path: Path) -> None:
    public = BOB.public()
    assert decide_trust(None, public, accept_new_key=False) is Trust.NEW
    book = ContactBook(tmp_path / "book.json")
    assert book.remember(public, now_ms=NOW) is Trust.NEW
    book.save()
    loaded = ContactBook.load(tmp_path / "book.json")
    known = loaded.get(BOB.address)
    assert known is not None
    assert known.first_seen_ms == NOW
    assert decide_trust(known, public, accept_new_key=False) is Trust.KNOWN
    other = UserKeys.generate(BOB.address).public()
    with pytest.raises(KeyChangedError):
        decide_trust(known, other, accept_new_key=False)
    assert decide_trust(known, other, accept_new_key=True) is Trust.REPLACED
    assert default_contacts_path(Path("/k/alice.json")) == Path("/k/alice.contacts.json")

    os.chmod(tmp_path / "book.json", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        ContactBook.load(tmp_path / "book.json")
    (tmp_path / "bad.json").write_text('{"v": 1}')
    os.chmod(tmp_path / "bad.json", 0o600)
    with pytest.raises(ConfigError, match=r"bad\.json"):
        ContactBook.load(tmp_path / "bad.json")
