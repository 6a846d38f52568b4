"""The origin gateway enforces retention: a group under outbound retention sends only
version 2 envelopes with a retention copy for a key of the rules (docs/retention.md).

Real sockets, a real SQLite store and real rules, as in test_client_api.py. A refusal
stores nothing, is answered with its reason and rule, and is counted.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nacl.signing import SigningKey

from gateway.core.address import Address
from gateway.core.archive import check_chain, parse_sender_key
from gateway.core.envelope import (
    RETENTION_WRAP_BYTES,
    WRAPPED_KEY_BYTES,
    Envelope,
    RetentionWrap,
    b64url_encode,
    decode_envelope,
    encode_envelope,
    new_envelope_id,
    signing_bytes,
)
from gateway.core.keytext import format_retention_key, format_signing_key, parse_signing_key
from gateway.crypto.key_records import (
    envelope_signed_by,
    parse_verified_key_record,
    sign_key_record,
)
from gateway.crypto.keys import UserKeys
from gateway.observability.audit import AuditEvent, AuditValue
from gateway.storage.base import EnvelopeRecord
from tests.integration.test_client_api import (
    GLOBEX,
    HOUR_MS,
    NOW_MS,
    OPENAPI,
    ORG,
    Gateway,
    _start,
    conforms,
    envelope,
    line_of,
    rules_text,
    sample,
)

KEY_2026 = secrets.token_bytes(32)
KEY_2025 = secrets.token_bytes(32)


def retention_rules(globex_verify_key: bytes) -> str:
    text = rules_text(globex_verify_key)
    section = (
        "retention:\n"
        f"  key: {{id: acme-2026, public_key: {format_retention_key(KEY_2026)}}}\n"
        f"  previous: [{{id: acme-2025, public_key: {format_retention_key(KEY_2025)}}}]\n"
    )
    text = text.replace("default: deny\n", "default: deny\n" + section, 1)
    # engineering (alice, bob, dave) is under outbound retention; legal (carol) under
    # inbound retention only.
    text = text.replace(
        "    members: [carol]\n",
        "    members: [carol]\n    retention: {inbound: required, keep: 90d}\n",
        1,
    )
    return text.replace(
        "    members: [alice, bob, dave]\n",
        "    members: [alice, bob, dave]\n    retention: {outbound: required, keep: 30d}\n",
        1,
    )


class RecordingAudit:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, object]]] = []

    async def record(self, kind: str, **fields: AuditValue) -> None:
        AuditEvent.of(kind, at=0.0, **fields)  # the real checks of kinds and fields
        self.records.append((kind, dict(fields)))


@pytest.fixture
def audit() -> RecordingAudit:
    return RecordingAudit()


@pytest.fixture
async def gw(tmp_path: Path, audit: RecordingAudit) -> AsyncIterator[Gateway]:
    async for gateway in _start(
        tmp_path,
        ssl_context=None,
        client_verify=None,
        make_rules=retention_rules,
        audit=audit,
        with_archive=True,
    ):
        yield gateway


def v2(
    sender: str,
    recipient: str,
    *,
    key_id: str | None = "acme-2026",
    public_key: bytes = KEY_2026,
) -> Envelope:
    """A version 2 envelope as a client would submit it: random bytes of the right sizes."""
    retention = (
        None
        if key_id is None
        else RetentionWrap(key_id, public_key, secrets.token_bytes(RETENTION_WRAP_BYTES))
    )
    return Envelope(
        version=2,
        id=new_envelope_id(),
        sender=Address.parse(sender),
        recipient=Address.parse(recipient),
        created=NOW_MS,
        expires=NOW_MS + HOUR_MS,
        burn_on_read=False,
        ciphertext=secrets.token_bytes(100),
        signature=secrets.token_bytes(64),
        wrapped_key=secrets.token_bytes(WRAPPED_KEY_BYTES),
        retention=retention,
    )


@pytest.mark.parametrize(
    ("make", "reason", "rule_needle"),
    [
        (
            lambda: envelope("alice@acme.example", "zed@globex.example"),
            "retention_required",
            "retention: {outbound",
        ),
        (
            lambda: v2("alice@acme.example", "zed@globex.example", key_id=None),
            "retention_required",
            "retention: {outbound",
        ),
        (
            lambda: v2("alice@acme.example", "zed@globex.example", key_id="acme-2027"),
            "retention_key_unknown",
            "retention:",
        ),
        (
            lambda: v2("alice@acme.example", "zed@globex.example", public_key=KEY_2025),
            "retention_key_unknown",
            "retention:",
        ),
        (
            lambda: v2("alice@acme.example", "bob@acme.example", key_id=None),
            "retention_required",
            "retention: {outbound",
        ),
    ],
    ids=["version-1", "no-copy", "unknown-id", "id-with-another-key", "local-no-copy"],
)
async def test_a_missing_or_wrong_retention_copy_is_refused_and_nothing_stored(
    gw: Gateway,
    audit: RecordingAudit,
    make: Callable[[], Envelope],
    reason: str,
    rule_needle: str,
) -> None:
    env = make()
    direction = "local" if env.recipient.org == "acme.example" else "outbound"
    labels = {"direction": direction, "reason": reason}
    before = sample("gateway_policy_denials_total", **labels)
    submitted = sample("gateway_clientapi_submissions_total", result=reason)
    answer = await gw.submit("alice", env)
    assert answer.status_code == 403
    body = answer.json()
    assert body["error"] == reason
    assert body["rule"] == f"rules.yaml:{line_of(gw.rules_text, rule_needle)}"
    await gw.assert_nothing_stored(env)
    assert gw.spooled == []
    assert sample("gateway_policy_denials_total", **labels) == before + 1
    assert sample("gateway_clientapi_submissions_total", result=reason) == submitted + 1
    [(kind, fields)] = audit.records
    assert kind == "policy_denial"
    assert fields["reason"] == reason
    assert fields["envelope_id"] == env.id


@pytest.mark.parametrize("key_id", ["acme-2026", "acme-2025"])
async def test_a_copy_for_the_current_or_a_previous_key_goes_through_unchanged(
    gw: Gateway, key_id: str
) -> None:
    env = v2(
        "alice@acme.example",
        "zed@globex.example",
        key_id=key_id,
        public_key=KEY_2026 if key_id == "acme-2026" else KEY_2025,
    )
    answer = await gw.submit("alice", env)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "queued"
    assert gw.spooled == ["globex.example"]
    (summary,) = [s for s in await gw.store.spool_list() if s.envelope_id == env.id]
    entries = await gw.store.spool_take("globex.example", max_items=10, max_bytes=10**7)
    (entry,) = [e for e in entries if e.envelope_id == env.id]
    assert entry.data == encode_envelope(env.with_group("engineering"))
    assert decode_envelope(entry.data).retention == env.retention
    assert summary.envelope_id == env.id


async def test_groups_not_under_outbound_retention_send_either_version(gw: Gateway) -> None:
    # carol (legal) may reach colleagues only, and is not under outbound retention.
    old = envelope("carol@acme.example", "bob@acme.example")
    new = v2("carol@acme.example", "bob@acme.example", key_id=None)
    assert (await gw.submit("carol", old)).status_code == 202
    assert (await gw.submit("carol", new)).status_code == 202
    assert set(await gw.mailbox("bob")) == {old.id, new.id}


async def test_a_batch_refuses_only_the_envelopes_without_a_copy(gw: Gateway) -> None:
    good = v2("alice@acme.example", "zed@globex.example")
    bad = envelope("alice@acme.example", "zed@globex.example")
    body = b'{"envelopes":[' + encode_envelope(good) + b"," + encode_envelope(bad) + b"]}"
    answer = await gw.client.post("/v1/envelopes/batch", content=body, headers=gw.auth("alice"))
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert results[0] == {"id": good.id, "status": "queued"}
    assert results[1]["error"] == "retention_required"
    await gw.assert_nothing_stored(bad)


async def test_me_names_the_retention_key_to_wrap_for(gw: Gateway) -> None:
    alice = (await gw.client.get("/v1/me", headers=gw.auth("alice"))).json()
    assert alice["retention"] == {
        "outbound": True,
        "inbound": False,
        "key": {"id": "acme-2026", "public_key": format_retention_key(KEY_2026)},
    }
    carol = (await gw.client.get("/v1/me", headers=gw.auth("carol"))).json()
    assert carol["retention"]["inbound"] is True
    assert carol["retention"]["outbound"] is False
    erin = (await gw.client.get("/v1/me", headers=gw.auth("erin"))).json()
    assert "retention" not in erin


def mailbox_record(env: Envelope) -> EnvelopeRecord:
    return EnvelopeRecord(
        envelope_id=env.id,
        sender=str(env.sender),
        recipient=str(env.recipient),
        created_ms=env.created,
        expires_ms=env.expires,
        burn_on_read=False,
        data=encode_envelope(env),
    )


async def test_a_retention_mismatch_report_is_counted_and_audited(
    gw: Gateway, audit: RecordingAudit
) -> None:
    from_peer = v2("zed@globex.example", "bob@acme.example")
    from_colleague = v2("alice@acme.example", "bob@acme.example")
    await gw.store.mailbox_put_local(
        [mailbox_record(from_peer), mailbox_record(from_colleague)], at_ms=NOW_MS
    )
    peer_before = sample(
        "gateway_clientapi_retention_mismatch_reports_total", origin="globex.example"
    )
    local_before = sample("gateway_clientapi_retention_mismatch_reports_total", origin="local")
    never_received = new_envelope_id()
    answer = await gw.client.post(
        "/v1/reports/retention-mismatch",
        json={"ids": [from_peer.id, from_colleague.id, never_received]},
        headers=gw.auth("bob"),
    )
    assert answer.status_code == 200
    assert answer.json() == {"recorded": 2}
    assert (
        sample("gateway_clientapi_retention_mismatch_reports_total", origin="globex.example")
        == peer_before + 1
    )
    assert (
        sample("gateway_clientapi_retention_mismatch_reports_total", origin="local")
        == local_before + 1
    )
    assert [(kind, fields["envelope_id"], fields["sender"]) for kind, fields in audit.records] == [
        ("retention_mismatch", from_peer.id, "zed@globex.example"),
        ("retention_mismatch", from_colleague.id, "alice@acme.example"),
    ]
    # Someone else's report about bob's envelopes records nothing.
    other = await gw.client.post(
        "/v1/reports/retention-mismatch", json={"ids": [from_peer.id]}, headers=gw.auth("dave")
    )
    assert other.json() == {"recorded": 0}
    assert len(audit.records) == 2


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"ids": []}', b'{"ids": ["short"]}', b'{"ids": "x"}', b"[]", b"not json"],
)
async def test_a_malformed_report_is_400_and_records_nothing(
    gw: Gateway, audit: RecordingAudit, body: bytes
) -> None:
    answer = await gw.client.post(
        "/v1/reports/retention-mismatch", content=body, headers=gw.auth("bob")
    )
    assert answer.status_code == 400
    assert audit.records == []
    unauthenticated = await gw.client.post("/v1/reports/retention-mismatch", content=body)
    assert unauthenticated.status_code == 401


async def test_the_retention_answers_match_the_openapi_file(gw: Gateway) -> None:
    document: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    me = await gw.client.get("/v1/me", headers=gw.auth("alice"))
    conforms(document, "/v1/me", "get", 200, me.json())
    refused = await gw.submit("alice", envelope("alice@acme.example", "zed@globex.example"))
    conforms(document, "/v1/envelopes", "post", 403, refused.json())
    env = v2("zed@globex.example", "bob@acme.example")
    await gw.store.mailbox_put_local([mailbox_record(env)], at_ms=NOW_MS)
    fetched = await gw.client.get("/v1/mailbox", headers=gw.auth("bob"))
    conforms(document, "/v1/mailbox", "get", 200, fetched.json())
    report = await gw.client.post(
        "/v1/reports/retention-mismatch", json={"ids": [env.id]}, headers=gw.auth("bob")
    )
    conforms(document, "/v1/reports/retention-mismatch", "post", 200, report.json())


async def test_retained_envelopes_are_archived_once_and_refused_ones_never(gw: Gateway) -> None:
    labels = {"group": "engineering", "direction": "outbound"}
    before = sample("gateway_retention_archived_envelopes_total", **labels)
    sent = v2("alice@acme.example", "zed@globex.example")
    local = v2("alice@acme.example", "bob@acme.example")
    refused = v2("alice@acme.example", "zed@globex.example", key_id=None)
    for env in (sent, local, refused, sent):  # the last: a client's retry
        await gw.submit("alice", env)
    records = await gw.store.archive.records(from_ms=0, to_ms=NOW_MS + 1)
    assert [(r.envelope_id, r.direction, r.group, r.key_id) for r in records] == [
        (sent.id, "outbound", "engineering", "acme-2026"),
        (local.id, "outbound", "engineering", "acme-2026"),
    ]
    assert records[0].envelope == encode_envelope(sent.with_group("engineering"))
    assert records[0].delete_after_ms == NOW_MS + 30 * 86_400_000
    assert check_chain(records) == []
    assert sample("gateway_retention_archived_envelopes_total", **labels) == before + 2
    # carol's group is not under outbound retention: nothing she sends is archived.
    await gw.submit("carol", envelope("carol@acme.example", "bob@acme.example"))
    assert len(await gw.store.archive.records(from_ms=0, to_ms=NOW_MS + 1)) == 2


# -- inbound retention: legal (carol) acknowledges with a retention copy ------------------


async def ack(gw: Gateway, user: str, body: dict[str, object]) -> httpx.Response:
    return await gw.client.post("/v1/mailbox/ack", json=body, headers=gw.auth(user))


def copy_for(env: Envelope, key_id: str = "acme-2026") -> dict[str, dict[str, str]]:
    return {env.id: {"key_id": key_id, "wrap": b64url_encode(bytes(range(RETENTION_WRAP_BYTES)))}}


async def test_a_version_1_envelope_to_a_recipient_under_inbound_retention_is_refused(
    gw: Gateway,
) -> None:
    env = envelope("erin@acme.example", "carol@acme.example", burn_on_read=True)
    answer = await gw.submit("erin", env)
    assert answer.status_code == 403
    assert answer.json()["error"] == "retention_required"
    await gw.assert_nothing_stored(env)
    assert (
        await gw.submit("erin", v2_burning("erin@acme.example", "carol@acme.example"))
    ).status_code == 202


def v2_burning(sender: str, recipient: str) -> Envelope:
    return dataclasses.replace(v2(sender, recipient, key_id=None), burn_on_read=True)


async def test_an_ack_under_inbound_retention_needs_a_copy_and_is_archived(
    gw: Gateway, audit: RecordingAudit
) -> None:
    env = v2("alice@acme.example", "carol@acme.example")
    assert (await gw.submit("alice", env)).status_code == 202
    refused = await ack(gw, "carol", {"ids": [env.id]})
    assert refused.status_code == 403
    assert refused.json()["error"] == "retention_required"
    assert await gw.mailbox("carol") == [env.id]  # nothing deleted
    unknown_key = await ack(gw, "carol", {"ids": [env.id], "retention": copy_for(env, "acme-2027")})
    assert unknown_key.status_code == 403
    answer = await ack(gw, "carol", {"ids": [env.id], "retention": copy_for(env)})
    assert answer.json() == {"deleted": 1}
    records = await gw.store.archive.records(from_ms=0, to_ms=NOW_MS + 1)
    inbound = [r for r in records if r.direction == "inbound"]
    assert [(r.envelope_id, r.group, r.recipient, r.key_id) for r in inbound] == [
        (env.id, "legal", "carol@acme.example", "acme-2026")
    ]
    assert inbound[0].wrap == bytes(range(RETENTION_WRAP_BYTES))
    assert check_chain(records) == []


async def test_unread_and_version_1_envelopes_go_unarchived_and_audited(
    gw: Gateway, audit: RecordingAudit
) -> None:
    unreadable = v2("alice@acme.example", "carol@acme.example")
    old = envelope("zed@globex.example", "carol@acme.example")
    await gw.submit("alice", unreadable)
    await gw.store.mailbox_put_local([mailbox_record(old)], at_ms=NOW_MS)  # from before the rule
    answer = await ack(
        gw, "carol", {"ids": [unreadable.id, old.id], "retention": {}, "unread": [unreadable.id]}
    )
    assert answer.json() == {"deleted": 2}
    assert [
        (kind, fields["envelope_id"], fields["reason"])
        for kind, fields in audit.records
        if kind == "retention_not_archived"
    ] == [
        ("retention_not_archived", unreadable.id, "unread"),
        ("retention_not_archived", old.id, "version_1"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"ids": [], "retention": {"x": {}}},
        {"ids": [], "retention": {new_envelope_id(): {"key_id": "k", "wrap": "AAAA"}}},
        {"ids": [], "retention": {new_envelope_id(): {"key_id": "-k", "wrap": "A" * 107}}},
        {"ids": [], "unread": ["short"]},
        {"ids": [], "colour": "blue"},
    ],
)
async def test_a_malformed_ack_is_400(gw: Gateway, body: dict[str, object]) -> None:
    assert (await ack(gw, "carol", body)).status_code == 400


# -- the sender's key, archived with each envelope ---------------------------------------------


def signed(env: Envelope, keys: UserKeys) -> Envelope:
    signature = SigningKey(keys.signing_seed).sign(signing_bytes(env)).signature
    return dataclasses.replace(env, signature=signature)


async def publish(gw: Gateway, user: str) -> UserKeys:
    keys = UserKeys.generate(Address.of(user, ORG))
    answer = await gw.client.put("/v1/keys", json=keys.public().to_json(), headers=gw.auth(user))
    assert answer.status_code == 200
    return keys


def recorded_key(sender_key: bytes, sender: str) -> tuple[str, bytes]:
    """The org key named and the verify key of the key record an archive record carries."""
    org_key, record = parse_sender_key(sender_key)
    verified = parse_verified_key_record(
        record, org_verify_key=parse_signing_key(org_key), expected_address=Address.parse(sender)
    )
    return org_key, verified.verify_key


async def test_a_sent_envelope_is_archived_with_the_key_that_verifies_its_signature(
    gw: Gateway,
) -> None:
    unverified = "gateway_retention_sender_unverified_total"
    bad_before = sample(unverified, direction="outbound", reason="signature_invalid")
    none_before = sample(unverified, direction="outbound", reason="no_key_record")
    alice = await publish(gw, "alice")
    good = signed(v2("alice@acme.example", "zed@globex.example"), alice)
    forged = v2("alice@acme.example", "zed@globex.example")  # random signature bytes
    for env in (good, forged):
        assert (await gw.submit("alice", env)).status_code == 202
    dave_env = v2("dave@acme.example", "zed@globex.example")  # dave published no keys
    assert (await gw.submit("dave", dave_env)).status_code == 202

    records = {
        r.envelope_id: r for r in await gw.store.archive.records(from_ms=0, to_ms=NOW_MS + 1)
    }
    org_key, verify_key = recorded_key(records[good.id].sender_key, "alice@acme.example")
    assert org_key == format_signing_key(bytes(SigningKey(gw.org_seed).verify_key))
    assert verify_key == alice.public().verify_key
    assert envelope_signed_by(decode_envelope(records[good.id].envelope), verify_key)
    # A signature the sender's key does not verify: archived with that key, as evidence, counted.
    assert recorded_key(records[forged.id].sender_key, "alice@acme.example")[1] == verify_key
    assert not envelope_signed_by(decode_envelope(records[forged.id].envelope), verify_key)
    assert sample(unverified, direction="outbound", reason="signature_invalid") == bad_before + 1
    # No key record published: archived without one, counted.
    assert records[dave_env.id].sender_key == b""
    assert sample(unverified, direction="outbound", reason="no_key_record") == none_before + 1
    assert check_chain(list(records.values())) == []


async def test_a_partners_envelope_is_archived_with_its_key_record_from_the_peer(
    gw: Gateway,
) -> None:
    zed = UserKeys.generate(Address.of("zed", GLOBEX))
    gw.remote_records["zed@globex.example"] = sign_key_record(
        zed.public(), org_signing_seed=gw.globex_seed, issued_ms=NOW_MS - 5
    ).encode()
    env = signed(v2("zed@globex.example", "carol@acme.example", key_id=None), zed)
    await gw.store.mailbox_put_local([mailbox_record(env)], at_ms=NOW_MS)
    answer = await ack(gw, "carol", {"ids": [env.id], "retention": copy_for(env)})
    assert answer.json() == {"deleted": 1}
    [record] = await gw.store.archive.records(from_ms=0, to_ms=NOW_MS + 1)
    org_key, verify_key = recorded_key(record.sender_key, "zed@globex.example")
    assert org_key == format_signing_key(bytes(SigningKey(gw.globex_seed).verify_key))
    assert verify_key == zed.public().verify_key
    assert envelope_signed_by(decode_envelope(record.envelope), verify_key)
    assert check_chain([record]) == []
