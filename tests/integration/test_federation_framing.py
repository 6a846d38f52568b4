"""The binary transaction framing on real sockets: mTLS on 127.0.0.1, real SQLite, real rules.

acme.example runs the receiver of test_receiver.py (its world: rules, CAs,
sealed envelopes). globex.example sends, either by hand (httpx, to hit the
receiver with exact bodies) or with the real :class:`Sender`,
:class:`HttpxPeerTransport` and :class:`PeerVersions` over a spool in memory.
A "v1-only" peer is a receiver that does not list the binary framing in its
version document, or a sender that never frames.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio

from gateway.core.envelope import Envelope, encode_envelope, new_envelope_id
from gateway.crypto.envelope_crypto import generate_retention_key, seal_v2
from gateway.errors import Reason
from gateway.federation.framing import encode_framed_transaction
from gateway.federation.protocol import (
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_TXN_V2,
    body_hash,
    encode_transaction,
    version_document,
)
from gateway.federation.receiver import Receiver
from gateway.federation.sender import Sender
from gateway.federation.transport import HttpxPeerTransport
from gateway.federation.trust import FederationTrust
from gateway.federation.versions import PeerVersions
from gateway.http import HTTPServer, Request, Response, Router, ServerLimits, json_response
from gateway.rules_runtime import RulesHolder
from gateway.storage.base import Storage, spool_item
from gateway.storage.sqlite import open_sqlite_storage
from tests.integration.test_receiver import (
    ACME,
    BOB,
    DAVE,
    EVIL,
    GLOBEX,
    HOST,
    INITECH,
    MAX_BODY_BYTES,
    TEST_TIMEOUT,
    Clock,
    OneShotBody,
    World,
    assert_nothing_stored,
    mailbox_ids,
    make_org,
    results,
    rules_text,
    sample,
    signing_key_text,
    txns_counted,
)
from tests.integration.test_sender import FAST, MemoryStorage, spool

ALICE = "alice@globex.example"


@pytest.fixture
def world(tmp_path: Path) -> World:
    """test_receiver.py's world: acme receives from globex and initech."""
    certs, rules_dir = tmp_path / "certs", tmp_path / "rules"
    certs.mkdir()
    rules_dir.mkdir()
    orgs = {name: make_org(certs, name) for name in (ACME, GLOBEX, INITECH, EVIL)}
    rules_file = rules_dir / "acme.yaml"
    rules_file.write_text(rules_text([GLOBEX, INITECH]))
    return World(
        tmp_path=tmp_path,
        clock=Clock(int(datetime.now(UTC).timestamp()) * 1000),
        acme=orgs[ACME],
        globex=orgs[GLOBEX],
        initech=orgs[INITECH],
        evil=orgs[EVIL],
        rules_file=rules_file,
        holder=RulesHolder.load(rules_file),
    )


@pytest.fixture
async def store(world: World) -> AsyncIterator[Storage]:
    async with open_sqlite_storage(world.tmp_path / "acme.db") as opened:
        yield opened


def bodies(direction: str, peer: str, framing: str) -> float:
    return sample(
        "gateway_federation_transaction_bodies_total",
        direction=direction,
        peer=peer,
        framing=framing,
    )


class Counts:
    """Transaction bodies by framing, before and after (counters are process-wide)."""

    KEYS = (
        ("inbound", GLOBEX, "json"),
        ("inbound", GLOBEX, "binary_v2"),
        ("outbound", ACME, "json"),
        ("outbound", ACME, "binary_v2"),
    )

    def __init__(self) -> None:
        self.before = {key: bodies(*key) for key in self.KEYS}

    def delta(self) -> dict[str, float]:
        return {
            f"{direction} {framing}": bodies(direction, peer, framing) - self.before[key]
            for key in self.KEYS
            for direction, peer, framing in [key]
        }


@asynccontextmanager
async def serving(
    world: World, store: Storage, make: Callable[..., Receiver] = Receiver, **options: object
) -> AsyncIterator[int]:
    """acme's federation listener with a receiver built by ``make``; yields its port."""
    receiver = make(
        org=ACME,
        rules=world.holder,
        storage=store,
        clock_ms=world.clock,
        on_delivered=world.on_delivered,
        **options,
    )
    router = Router()
    receiver.add_routes(router)
    trust = FederationTrust(
        world.holder,
        cert_file=world.acme.cert_file,
        key_file=world.acme.key_file,
        clock_ms=world.clock,
    )
    server = HTTPServer(
        f"federation-framing-{new_envelope_id()}",
        router,
        ssl_context=trust.server_context(),
        identify=trust.identify,
        limits=ServerLimits(max_body_bytes=MAX_BODY_BYTES),
    )
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(functools.partial(server.serve, HOST, 0))
        yield port
        nursery.cancel_scope.cancel()


async def put(
    http: httpx.AsyncClient, port: int, txn_id: str, body: bytes, content_type: str | None
) -> httpx.Response:
    headers = {"content-length": str(len(body))}
    if content_type is not None:
        headers["content-type"] = content_type
    request = http.build_request(
        "PUT",
        f"https://{HOST}:{port}/federation/v1/transactions/{txn_id}",
        headers=headers,
        extensions={"sni_hostname": ACME},
    )
    request.stream = OneShotBody(body)
    return await http.send(request)


def framed(envelopes: Sequence[Envelope], *, origin: str = GLOBEX) -> bytes:
    return encode_framed_transaction(origin, ACME, [encode_envelope(env) for env in envelopes])


def retained(world: World, recipient: str = BOB) -> Envelope:
    """An envelope of version 2 with its retention copy, as globex's client seals it."""
    _secret, public = generate_retention_key()
    return seal_v2(
        b"for the record",
        sender=world.keys(ALICE),
        recipient=world.keys(recipient).public(),
        created_ms=world.clock.ms - 1000,
        expires_ms=world.clock.ms + 86_400_000,
        retention_key_id="globex-2026",
        retention_public_key=public,
    ).with_group("engineering")


async def stored_bytes(store: Storage, user: str) -> dict[str, bytes]:
    return {entry.envelope_id: entry.data for entry in await store.mailbox_fetch(user, limit=100)}


# -- the receiver, by hand --------------------------------------------------------------


async def test_a_binary_transaction_is_judged_like_json_and_stored_byte_for_byte(
    world: World, store: Storage
) -> None:
    v1 = world.envelope(ALICE, BOB)
    v2 = retained(world)
    denied = world.envelope(ALICE, DAVE)
    body = framed([v1, v2, denied])
    counts = Counts()
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world, store) as port, world.client(world.globex) as http:
            reply = await put(http, port, new_envelope_id(), body, MEDIA_TYPE_TXN_V2)
    assert reply.headers["content-type"] == MEDIA_TYPE_JSON  # the answer stays JSON
    assert results(reply) == [
        (v1.id, "accepted"),
        (v2.id, "accepted"),
        (denied.id, "recipient_unknown"),
    ]
    kept = await stored_bytes(store, BOB)
    assert kept == {v1.id: encode_envelope(v1), v2.id: encode_envelope(v2)}
    assert kept[v2.id] in body  # the very bytes of the frame
    assert await mailbox_ids(store, DAVE) == []
    assert counts.delta()["inbound binary_v2"] == 1
    assert counts.delta()["inbound json"] == 0


async def test_replay_and_conflict_under_the_binary_framing(world: World, store: Storage) -> None:
    first = world.envelope(ALICE, BOB)
    other = world.envelope(ALICE, BOB)
    body = framed([first, first])
    txn_id = new_envelope_id()
    replayed = txns_counted(GLOBEX, "replayed")
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world, store) as port, world.client(world.globex) as http:
            answer = await put(http, port, txn_id, body, MEDIA_TYPE_TXN_V2)
            assert results(answer) == [(first.id, "accepted"), (first.id, "accepted")]
            world.clock.ms += 3 * 86_400_000  # expired since: the recorded answer stands
            again = await put(http, port, txn_id, body, MEDIA_TYPE_TXN_V2)
            assert again.content == answer.content
            # The same bytes are the same body, whatever Content-Type says.
            assert (await put(http, port, txn_id, body, "text/plain")).content == answer.content
            # Another frame, or the same envelopes as JSON, is another body: 409.
            for conflicting, media_type in [
                (framed([other]), MEDIA_TYPE_TXN_V2),
                (framed([first]), MEDIA_TYPE_TXN_V2),
                (encode_transaction(GLOBEX, ACME, [first, first]), MEDIA_TYPE_JSON),
                (body[:-1], MEDIA_TYPE_TXN_V2),  # not even a frame: the id decides first
            ]:
                refused = await put(http, port, txn_id, conflicting, media_type)
                assert refused.status_code == 409, refused.text
                assert refused.json() == {"error": "txn_conflict"}
    assert await mailbox_ids(store, BOB) == [first.id]
    record = await store.txn_lookup(GLOBEX, txn_id)
    assert record is not None
    assert record.body_hash == body_hash(body)
    assert txns_counted(GLOBEX, "replayed") == replayed + 2


async def test_a_frame_that_is_not_sound_or_a_type_not_taken_changes_nothing(
    world: World, store: Storage
) -> None:
    good = framed([world.envelope(ALICE, BOB)])
    protocol_errors = txns_counted(GLOBEX, Reason.PROTOCOL.value)
    unsupported = txns_counted(GLOBEX, Reason.UNSUPPORTED_MEDIA_TYPE.value)
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world, store) as port, world.client(world.globex) as http:
            for bad in (good[:-1], good + b"\x00", b"GWTX\x03" + good[5:], b"", b"{}"):
                reply = await put(http, port, "broken", bad, MEDIA_TYPE_TXN_V2)
                assert reply.status_code == 400
                assert reply.json()["error"] == "protocol_error"
            # JSON sent as binary, and a frame sent as JSON, are refused too.
            json_body = encode_transaction(GLOBEX, ACME, [world.envelope(ALICE, BOB)])
            assert (await put(http, port, "a", json_body, MEDIA_TYPE_TXN_V2)).status_code == 400
            assert (await put(http, port, "b", good, MEDIA_TYPE_JSON)).status_code == 400
            # The origin inside the frame is checked against the certificate.
            forged = framed([world.envelope(ALICE, BOB)], origin=INITECH)
            assert (await put(http, port, "c", forged, MEDIA_TYPE_TXN_V2)).status_code == 403
            refused = await put(http, port, "d", good, "application/x-other")
            assert refused.status_code == 415
            assert refused.json() == {
                "error": "unsupported_media_type",
                "accepted": [MEDIA_TYPE_JSON, MEDIA_TYPE_TXN_V2],
            }
        await assert_nothing_stored(store, (GLOBEX, "broken"), (GLOBEX, "d"))
    assert txns_counted(GLOBEX, Reason.PROTOCOL.value) == protocol_errors + 7
    assert txns_counted(GLOBEX, Reason.UNSUPPORTED_MEDIA_TYPE.value) == unsupported + 1


async def test_a_receiver_that_takes_json_only_says_so_and_refuses_frames_with_415(
    world: World, store: Storage
) -> None:
    env = world.envelope(ALICE, BOB)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(world, store, transaction_types=[MEDIA_TYPE_JSON]) as port,
            world.client(world.globex) as http,
        ):
            version = await http.get(
                f"https://{HOST}:{port}/federation/v1/version", extensions={"sni_hostname": ACME}
            )
            assert version.json()["transaction_types"] == [MEDIA_TYPE_JSON]
            refused = await put(http, port, "v2", framed([env]), MEDIA_TYPE_TXN_V2)
            assert refused.status_code == 415
            # No Content-Type at all is JSON, as before the framing existed.
            body = encode_transaction(GLOBEX, ACME, [env])
            assert results(await put(http, port, "v1", body, None)) == [(env.id, "accepted")]
    assert await mailbox_ids(store, BOB) == [env.id]


# -- the sender against the receiver ------------------------------------------------------


def globex_rules(world: World, port: int) -> RulesHolder:
    path = world.tmp_path / "rules" / "globex.yaml"
    path.write_text(
        "\n".join(
            [
                "version: 1",
                f"org: {GLOBEX}",
                "default: deny",
                "peers:",
                f"  {ACME}:",
                f"    endpoint: https://{HOST}:{port}",
                f"    ca: {world.acme.ca_file}",
                f"    signing_key: {signing_key_text()}",
                "groups:",
                "  engineering:",
                "    members: [alice]",
                '    send_to: ["*"]',
            ]
        )
        + "\n"
    )
    return RulesHolder.load(path)


@asynccontextmanager
async def sending(
    world: World, port: int, *, frames: bool = True
) -> AsyncIterator[tuple[Sender, MemoryStorage, PeerVersions]]:
    """globex's sender towards acme; ``frames=False`` is a sender from before the framing."""
    rules = globex_rules(world, port)
    transport = HttpxPeerTransport(
        GLOBEX, world.globex.cert_file, world.globex.key_file, rules, timeout=10.0
    )
    versions = PeerVersions(transport)
    storage = MemoryStorage()
    sender = Sender(
        org=GLOBEX,
        storage=storage,
        transport=transport,
        rules=rules,
        clock_ms=world.clock,
        settings=FAST,
        random=lambda: 1.0,
        envelope_versions=versions if frames else None,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            yield sender, storage, versions
            nursery.cancel_scope.cancel()
    finally:
        await transport.aclose()


async def send_and_wait(
    sender: Sender, storage: MemoryStorage, envelopes: Sequence[Envelope]
) -> dict[str, str]:
    items = [spool_item(env, encode_envelope(env), ACME) for env in envelopes]
    await spool(storage, sender, items)
    while storage.depth(ACME):
        await trio.sleep(0.02)
    return {env.id: storage.statuses[env.id] for env in envelopes}


async def test_v2_to_v2_the_sender_frames_and_the_mailbox_holds_the_spooled_bytes(
    world: World, store: Storage
) -> None:
    v1 = world.envelope(ALICE, BOB)
    v2 = retained(world)
    denied = world.envelope(ALICE, DAVE)
    counts = Counts()
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world, store) as port, sending(world, port) as (sender, spooled, _):
            statuses = await send_and_wait(sender, spooled, [v1, v2, denied])
    assert statuses == {
        v1.id: "forwarded",
        v2.id: "forwarded",
        denied.id: "rejected:recipient_unknown",
    }
    assert await stored_bytes(store, BOB) == {
        v1.id: encode_envelope(v1),
        v2.id: encode_envelope(v2),
    }
    assert counts.delta() == {
        "inbound json": 0,
        "inbound binary_v2": 1,
        "outbound json": 0,
        "outbound binary_v2": 1,
    }


async def test_a_v1_only_peer_and_a_v2_gateway_speak_json_both_ways(
    world: World, store: Storage
) -> None:
    there, back = world.envelope(ALICE, BOB), retained(world)
    counts = Counts()
    with trio.fail_after(TEST_TIMEOUT):
        # A sender from before the framing, to a gateway that takes both: JSON.
        async with serving(world, store) as port, sending(world, port, frames=False) as lane:
            sender, spooled, _ = lane
            assert await send_and_wait(sender, spooled, [there]) == {there.id: "forwarded"}
        # A gateway that frames, to a receiver that lists JSON only: JSON, never a frame.
        async with (
            serving(world, store, transaction_types=[MEDIA_TYPE_JSON]) as port,
            sending(world, port) as (sender, spooled, versions),
        ):
            assert await send_and_wait(sender, spooled, [back]) == {back.id: "forwarded"}
            assert await versions.transaction_types(ACME) == {MEDIA_TYPE_JSON}
    # Envelope version 2, with its retention copy, went in a JSON transaction.
    assert await stored_bytes(store, BOB) == {
        there.id: encode_envelope(there),
        back.id: encode_envelope(back),
    }
    assert counts.delta() == {
        "inbound json": 2,
        "inbound binary_v2": 0,
        "outbound json": 2,
        "outbound binary_v2": 0,
    }


class ListsButRefuses(Receiver):
    """A node that lists the framing in its document but answers frames with 415."""

    def __init__(self, **options: object) -> None:
        super().__init__(transaction_types=[MEDIA_TYPE_JSON], **options)  # type: ignore[arg-type]

    async def get_version(self, request: Request, params: object) -> Response:
        return json_response(200, version_document())


class IgnoresContentType(ListsButRefuses):
    """A receiver from before Content-Type mattered: it reads every body as JSON (400)."""

    def _media_type(self, content_type: str | None) -> str | None:
        return MEDIA_TYPE_JSON


@pytest.mark.parametrize("receiver", [ListsButRefuses, IgnoresContentType])
async def test_a_peer_that_refuses_frames_gets_json_at_once_and_from_then_on(
    world: World, store: Storage, receiver: type[Receiver]
) -> None:
    first, later = world.envelope(ALICE, BOB), world.envelope(ALICE, BOB)
    counts = Counts()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(world, store, receiver) as port,
            sending(world, port) as (sender, spooled, versions),
        ):
            assert await send_and_wait(sender, spooled, [first]) == {first.id: "forwarded"}
            assert await versions.transaction_types(ACME) == {MEDIA_TYPE_JSON}
            assert await send_and_wait(sender, spooled, [later]) == {later.id: "forwarded"}
    assert await mailbox_ids(store, BOB) == [first.id, later.id]
    # One frame, refused; then JSON: the same batch at once (no backoff), and the next.
    # (The old receiver read the frame as a JSON body; the other refused its type unread.)
    assert counts.delta() == {
        "inbound json": 3 if receiver is IgnoresContentType else 2,
        "inbound binary_v2": 0,
        "outbound json": 2,
        "outbound binary_v2": 1,
    }
    state = await spooled.peer_state_get(ACME)
    assert state is None or state.failures == 0
