"""The federation receiver on real sockets: mTLS on 127.0.0.1, a real SQLite store, real rules.

acme.example runs the receiver. Its rules (YAML in ``tmp_path``, loaded by the
real loader into a ``RulesHolder``) name two peers, globex and initech, each
with its own CA on disk; evil.example is nobody's peer. Certificates are
minted per test with ``gateway.pki.dev``; envelopes are sealed for real with
``gateway.crypto.envelope_crypto.seal``. Peers speak through httpx with the
federation client context, sending SNI ``acme.example`` to 127.0.0.1.

Every refusal test ends by checking that nothing was stored: no mailbox entry
and no recorded transaction.
"""

from __future__ import annotations

import functools
import itertools
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from gateway.core.address import Address
from gateway.core.envelope import Envelope, decode_envelope, encode_envelope, new_envelope_id
from gateway.core.keytext import format_signing_key
from gateway.core.ratelimit import RateLimiter
from gateway.crypto.envelope_crypto import open_envelope, seal
from gateway.crypto.keys import UserKeys
from gateway.errors import Reason, StorageFullError
from gateway.federation.protocol import SERVER_NAME, body_hash, encode_transaction
from gateway.federation.receiver import Receiver
from gateway.federation.trust import FederationTrust, follow_reloads
from gateway.http import HTTPServer, Router, ServerLimits
from gateway.pki import dev
from gateway.pki.certs import spki_pin
from gateway.pki.tls import federation_client_context
from gateway.reserve import Reserve
from gateway.rules_runtime import RulesHolder
from gateway.storage.base import Bound, Storage, TxnRecord
from gateway.storage.sqlite import open_sqlite_storage
from tests.integration.test_client_api_bounds import FakeReserve

ACME = "acme.example"
GLOBEX = "globex.example"
INITECH = "initech.example"
EVIL = "evil.example"
HOST = "127.0.0.1"
TEST_TIMEOUT = 30  # seconds: a hang fails the test instead of blocking the suite
DAY_MS = 86_400_000
MAX_BODY_BYTES = 64 * 1024  # small, so the 413 test needs no megabytes
MAX_ENVELOPES = 100
BOB, CAROL, DAVE = "bob@acme.example", "carol@acme.example", "dave@acme.example"

_names = itertools.count()


# -- the world -----------------------------------------------------------------------


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


@dataclass
class Clock:
    """The receiver's injected wall clock: fixed, so expiry is exact."""

    ms: int

    def __call__(self) -> int:
        return self.ms


@dataclass(frozen=True)
class Org:
    name: str
    ca: dev.Issued
    ca_file: Path
    cert_file: Path
    key_file: Path


def write_identity(directory: Path, ca: dev.Issued, org: str) -> tuple[Path, Path]:
    """A gateway certificate for ``org`` issued by ``ca``, written as a gateway loads it."""
    issued = dev.issue_gateway_cert(ca, org, now=datetime.now(UTC))
    stem = f"{org}-{next(_names)}"
    cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}.key"
    dev.write_file(cert_file, issued.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=False)
    dev.write_private_key(key_file, issued.key, replace=False)
    return cert_file, key_file


def make_org(directory: Path, name: str) -> Org:
    ca = dev.issue_ca(name, now=datetime.now(UTC))
    ca_file = directory / f"{name}-ca.pem"
    dev.write_file(ca_file, ca.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=False)
    cert_file, key_file = write_identity(directory, ca, name)
    return Org(name, ca, ca_file, cert_file, key_file)


def signing_key_text() -> str:
    return format_signing_key(dev.signing_public_key_raw(dev.generate_signing_key()))


def rules_text(peers: Sequence[str], *, pins: Mapping[str, str] | None = None) -> str:
    """acme's rules: bob hears every peer listed, carol globex's sales group, dave nobody."""
    lines = ["version: 1", f"org: {ACME}", "default: deny", "peers:" if peers else "peers: {}"]
    for org in peers:
        lines += [
            f"  {org}:",
            f"    endpoint: https://gw.{org}:8443",
            f"    ca: ../certs/{org}-ca.pem",
            f"    signing_key: {signing_key_text()}",
        ]
        if pins and org in pins:
            lines.append(f"    pins: [{pins[org]}]")
    lines += [
        "groups:",
        "  engineering:",
        "    members: [bob]",
        f"    receive_from: [{', '.join(peers)}]" if peers else "",
        "    limits:",
        "      max_envelope_bytes: 4096",
        "      ttl: {min: 1m, default: 1d, max: 7d}",
        "  partners:",
        "    members: [carol]",
    ]
    if GLOBEX in peers:
        lines.append(f"    receive_from: [{GLOBEX}/sales]")
    lines += ["  legal:", "    members: [dave]"]
    return "\n".join(line for line in lines if line) + "\n"


class AuditRecorder:
    """An audit sink that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    async def record(self, kind: str, **fields: object) -> None:
        self.records.append({"kind": kind, **fields})


@dataclass
class World:
    tmp_path: Path
    clock: Clock
    acme: Org
    globex: Org
    initech: Org
    evil: Org
    rules_file: Path
    holder: RulesHolder
    users: dict[str, UserKeys] = field(default_factory=dict)
    delivered: list[frozenset[str]] = field(default_factory=list)
    audit: AuditRecorder = field(default_factory=lambda: AuditRecorder())

    def keys(self, address: str) -> UserKeys:
        if address not in self.users:
            self.users[address] = UserKeys.generate(Address.parse(address))
        return self.users[address]

    def envelope(
        self,
        sender: str,
        recipient: str,
        *,
        payload: bytes = b"hello",
        group: str | None = "engineering",
        created_ms: int | None = None,
        ttl_ms: int = DAY_MS,
        burn_on_read: bool = False,
    ) -> Envelope:
        created = self.clock.ms - 1000 if created_ms is None else created_ms
        sealed = seal(
            payload,
            sender=self.keys(sender),
            recipient=self.keys(recipient).public(),
            created_ms=created,
            expires_ms=created + ttl_ms,
            burn_on_read=burn_on_read,
        )
        return sealed.with_group(group)

    def write_rules(self, peers: Sequence[str], *, pins: Mapping[str, str] | None = None) -> None:
        self.rules_file.write_text(rules_text(peers, pins=pins))

    def on_delivered(self, users: Collection[str]) -> None:
        self.delivered.append(frozenset(users))

    def client(self, org: Org, *, cert: tuple[Path, Path] | None = None) -> httpx.AsyncClient:
        """A peer's federation client: its certificate (or ``cert``), trusting acme's CA only."""
        cert_file, key_file = cert or (org.cert_file, org.key_file)
        context = federation_client_context(
            cert_file=cert_file, key_file=key_file, peer_ca_pem=self.acme.ca.cert_pem()
        )
        return httpx.AsyncClient(verify=context)


@pytest.fixture
def world(tmp_path: Path) -> World:
    certs = tmp_path / "certs"
    rules_dir = tmp_path / "rules"
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


@dataclass(frozen=True)
class Running:
    name: str
    server: HTTPServer
    port: int

    def url(self, txn_id: str) -> str:
        return f"https://{HOST}:{self.port}/federation/v1/transactions/{txn_id}"

    def tls_failures(self, reason: Reason) -> float:
        return sample(
            "gateway_tls_handshake_failures_total", listener=self.name, reason=reason.value
        )


@asynccontextmanager
async def receiving(
    world: World,
    store: Storage,
    *,
    follow: bool = True,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_envelopes: int = MAX_ENVELOPES,
    inbound_rate: RateLimiter | None = None,
    mailbox_bound: Bound | None = None,
    reserve: Reserve | None = None,
) -> AsyncIterator[Running]:
    """acme's federation listener with the receiver, wired as the app wires it."""
    name = f"federation-{next(_names)}"
    receiver = Receiver(
        org=ACME,
        rules=world.holder,
        storage=store,
        clock_ms=world.clock,
        max_envelopes=max_envelopes,
        on_delivered=world.on_delivered,
        audit=world.audit,
        inbound_rate=inbound_rate,
        mailbox_bound=mailbox_bound,
        reserve=reserve,
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
        name,
        router,
        ssl_context=trust.server_context(),
        identify=trust.identify,
        limits=ServerLimits(max_body_bytes=max_body_bytes),
    )
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(functools.partial(server.serve, HOST, 0))
        unsubscribe = follow_reloads(world.holder, trust, server) if follow else (lambda: None)
        try:
            yield Running(name, server, port)
        finally:
            unsubscribe()
            nursery.cancel_scope.cancel()


class OneShotBody(httpx.AsyncByteStream):
    """A request body that httpx reads without an async generator.

    When a server hangs up while the body is being sent (a refused handshake
    shows only then, in TLS 1.3), httpx abandons the body's iterator. Its own
    body streams are async generators, which trio reports as garbage collected
    unfinished; this plain iterator has nothing to finish.
    """

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> OneShotBody:  # type: ignore[override]
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


async def put(
    http: httpx.AsyncClient, running: Running, txn_id: str, body: bytes
) -> httpx.Response:
    request = http.build_request(
        "PUT",
        running.url(txn_id),
        headers={"content-type": "application/json", "content-length": str(len(body))},
        extensions={"sni_hostname": ACME},  # the receiving org, whatever host we dial
    )
    request.stream = OneShotBody(body)
    return await http.send(request)


def transaction(envelopes: Sequence[Envelope], *, origin: str = GLOBEX) -> bytes:
    return encode_transaction(origin, ACME, envelopes)


def results(response: httpx.Response) -> list[tuple[str | None, str]]:
    assert response.status_code == 200, response.text
    return [(item["id"], item["result"]) for item in response.json()["results"]]


async def mailbox_ids(store: Storage, user: str) -> list[str]:
    return [entry.envelope_id for entry in await store.mailbox_fetch(user, limit=1000)]


async def assert_nothing_stored(store: Storage, *txns: tuple[str, str]) -> None:
    for user in (BOB, CAROL, DAVE):
        assert await mailbox_ids(store, user) == [], user
    for origin, txn_id in txns:
        assert await store.txn_lookup(origin, txn_id) is None, (origin, txn_id)


def envelopes_counted(peer: str, outcome: str) -> float:
    return sample(
        "gateway_federation_envelopes_total", direction="inbound", peer=peer, outcome=outcome
    )


def txns_counted(peer: str, result: str) -> float:
    return sample(
        "gateway_federation_transactions_total", direction="inbound", peer=peer, result=result
    )


def denials_counted(reason: str) -> float:
    return sample("gateway_policy_denials_total", direction="inbound", reason=reason)


class Deltas:
    """Metric samples before and after: counters are module-wide, so tests compare."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read
        self._before = read()

    def __call__(self) -> dict[str, float]:
        after = self._read()
        return {key: after[key] - self._before[key] for key in after}


async def good_peer_is_served(world: World, running: Running, store: Storage) -> None:
    """The listener still works for a legitimate peer (and stores what it sends)."""
    env = world.envelope("alice@initech.example", BOB)
    async with world.client(world.initech) as http:
        reply = await put(http, running, new_envelope_id(), transaction([env], origin=INITECH))
    assert results(reply) == [(env.id, "accepted")]
    assert env.id in await mailbox_ids(store, BOB)


# -- deliveries and decisions --------------------------------------------------------


async def test_allowed_envelopes_land_in_mailboxes_and_denied_get_their_reason(
    world: World, store: Storage
) -> None:
    alice = "alice@globex.example"
    sent = {
        "to bob": world.envelope(alice, BOB, payload=b"for bob"),
        "to carol as sales": world.envelope(alice, CAROL, group="sales"),
        "to carol as engineering": world.envelope(alice, CAROL, group="engineering"),
        "to dave": world.envelope(alice, DAVE),
        "to nobody": world.envelope(alice, "nobody@acme.example"),
        "too large": world.envelope(alice, BOB, payload=b"x" * 5000),
        "ttl too long": world.envelope(alice, BOB, ttl_ms=8 * DAY_MS),
        "expired": world.envelope(alice, BOB, created_ms=world.clock.ms - 2 * DAY_MS),
        "from a third org": world.envelope("eve@initech.example", BOB),
        "not for us": world.envelope(alice, "zed@initech.example"),
    }
    expected = {
        "to bob": "accepted",
        "to carol as sales": "accepted",
        "to carol as engineering": "peer_not_allowed",
        "to dave": "peer_not_allowed",
        "to nobody": "recipient_unknown",
        "too large": "too_large",
        "ttl too long": "ttl_out_of_bounds",
        "expired": "expired",
        "from a third org": "sender_not_origin",
        "not for us": "recipient_not_local",
    }
    # What globex reads: a recipient it may not reach looks like one who does not exist.
    answered = {
        key: "recipient_unknown" if reason == "peer_not_allowed" else reason
        for key, reason in expected.items()
    }
    outcomes = sorted(set(expected.values()))
    counted = Deltas(lambda: {o: envelopes_counted(GLOBEX, o) for o in outcomes})
    denied = Deltas(lambda: {o: denials_counted(o) for o in outcomes})
    txns = Deltas(lambda: {"ok": txns_counted(GLOBEX, "ok")})
    latency = Deltas(lambda: {"count": sample("gateway_delivery_latency_seconds_count")})
    txn_id = new_envelope_id()
    body = transaction(list(sent.values()))

    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.globex) as http:
            reply = await put(http, running, txn_id, body)

        assert results(reply) == [(env.id, answered[key]) for key, env in sent.items()]
        assert await mailbox_ids(store, BOB) == [sent["to bob"].id]
        assert await mailbox_ids(store, CAROL) == [sent["to carol as sales"].id]
        assert await mailbox_ids(store, DAVE) == []
        assert world.delivered == [frozenset({BOB, CAROL})]

        # What bob's client fetches opens with his key: ciphertext and signature intact.
        (entry,) = await store.mailbox_fetch(BOB, limit=10)
        stored = decode_envelope(entry.data)
        assert stored == sent["to bob"]
        payload = open_envelope(
            stored,
            recipient=world.keys(BOB),
            sender_verify_key=world.keys(alice).public().verify_key,
        )
        assert payload == b"for bob"

        record = await store.txn_lookup(GLOBEX, txn_id)
        assert record is not None
        assert record.body_hash == body_hash(body)
        assert dict(record.results) == {env.id: answered[key] for key, env in sent.items()}

    # The audit log keeps the real reason beside what globex read.
    audited = {r["envelope_id"]: (r["reason"], r["answered"]) for r in world.audit.records}
    assert audited[sent["to dave"].id] == ("peer_not_allowed", "recipient_unknown")
    assert audited[sent["to carol as engineering"].id] == ("peer_not_allowed", "recipient_unknown")
    assert audited[sent["to nobody"].id] == ("recipient_unknown", "recipient_unknown")
    assert counted() == {o: float(list(expected.values()).count(o)) for o in outcomes}
    policy = {o: float(list(expected.values()).count(o)) for o in outcomes}
    policy.update(accepted=0.0, expired=0.0)  # not policy decisions
    assert denied() == policy
    assert txns() == {"ok": 1.0}
    assert latency() == {"count": 2.0}


async def test_version_endpoint(world: World, store: Storage) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.globex) as http:
            reply = await http.get(
                f"https://{HOST}:{running.port}/federation/v1/version",
                extensions={"sni_hostname": ACME},
            )
    assert reply.status_code == 200
    assert reply.json() == {
        "versions": ["v1"],
        "envelope_versions": [1, 2],
        "transaction_types": ["application/json", "application/vnd.gateway.txn.v2"],
        "server": SERVER_NAME,
    }


async def test_a_replayed_transaction_gets_the_same_answer_and_stores_nothing_twice(
    world: World, store: Storage
) -> None:
    allowed = world.envelope("alice@globex.example", BOB)
    denied = world.envelope("alice@globex.example", DAVE)
    body = transaction([allowed, denied, allowed])  # the repeat is answered, stored once
    txn_id = new_envelope_id()
    replays = Deltas(lambda: {"replayed": txns_counted(GLOBEX, "replayed")})
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.globex) as http:
            first = await put(http, running, txn_id, body)
            world.clock.ms += 3 * DAY_MS  # everything has expired since: the answer stays
            again = await put(http, running, txn_id, body)
        expected = [
            (allowed.id, "accepted"),
            (denied.id, "recipient_unknown"),  # what a peer reads for a segmented user
            (allowed.id, "accepted"),
        ]
        assert results(first) == expected
        assert again.content == first.content
        assert await mailbox_ids(store, BOB) == [allowed.id]
        assert world.delivered == [frozenset({BOB})]
    assert replays() == {"replayed": 1.0}


class CountingLookups:
    """The store, counting ``txn_lookup`` calls (each a trip to a reader thread)."""

    def __init__(self, store: Storage) -> None:
        self._store = store
        self.lookups = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def txn_lookup(self, origin: str, txn_id: str) -> TxnRecord | None:
        self.lookups += 1
        return await self._store.txn_lookup(origin, txn_id)


async def test_the_replay_check_rides_in_the_commit_and_the_recorded_id_still_decides_first(
    world: World, store: Storage
) -> None:
    counting = CountingLookups(store)
    receiver_store: Any = counting  # a Storage in every way the receiver uses
    env = world.envelope("alice@globex.example", BOB, group="engineering")
    body = transaction([env])
    txn_id = new_envelope_id()
    replays = Deltas(lambda: {"replayed": txns_counted(GLOBEX, "replayed")})
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            receiving(world, receiver_store, max_envelopes=2) as running,
            world.client(world.globex) as http,
        ):
            first = await put(http, running, txn_id, body)
            again = await put(http, running, txn_id, body)
            # New and replayed transactions alike: no read before the commit.
            assert counting.lookups == 0
            assert results(first) == [(env.id, "accepted")]
            assert again.content == first.content
            # A body refused for any reason still gets 409 when its id is recorded...
            for other in (
                b"{",
                transaction([env], origin=INITECH),
                encode_transaction(GLOBEX, INITECH, [env]),
                transaction([env, env, env]),  # over this receiver's bound of 2
            ):
                conflict = await put(http, running, txn_id, other)
                assert conflict.status_code == 409, other[:60]
            assert counting.lookups == 4
        # ...and a recorded body over today's bound gets its recorded answer.
        big = transaction([env, env, env])
        big_id = new_envelope_id()
        async with receiving(world, store) as running, world.client(world.globex) as http:
            answered = await put(http, running, big_id, big)
        async with (
            receiving(world, store, max_envelopes=2) as running,
            world.client(world.globex) as http,
        ):
            replayed = await put(http, running, big_id, big)
        assert replayed.content == answered.content
        assert results(replayed) == [(env.id, "accepted")] * 3
        # The mailbox holds one copy, byte for byte what encode_envelope writes (group too).
        (entry,) = await store.mailbox_fetch(BOB, limit=10)
        assert entry.data == encode_envelope(env)
        assert b'"group":"engineering"' in entry.data
    assert replays() == {"replayed": 2.0}


async def test_an_envelope_accepted_before_is_accepted_again_but_never_stored_twice(
    world: World,
) -> None:
    first = world.envelope("alice@globex.example", BOB)
    second = world.envelope("alice@globex.example", BOB)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_sqlite_storage(world.tmp_path / "acme.db") as store:
            async with receiving(world, store) as running, world.client(world.globex) as http:
                reply = await put(http, running, new_envelope_id(), transaction([first]))
                assert results(reply) == [(first.id, "accepted")]
                # The sender never heard the answer: it sends again, in a new transaction.
                reply = await put(http, running, new_envelope_id(), transaction([first]))
                assert results(reply) == [(first.id, "accepted")]
            assert await mailbox_ids(store, BOB) == [first.id]

        # The receiver restarts: the dedup is on disk.
        async with open_sqlite_storage(world.tmp_path / "acme.db") as store:
            async with receiving(world, store) as running, world.client(world.globex) as http:
                reply = await put(http, running, new_envelope_id(), transaction([first, second]))
            assert results(reply) == [(first.id, "accepted"), (second.id, "accepted")]
            assert await mailbox_ids(store, BOB) == [first.id, second.id]
    assert world.delivered == [frozenset({BOB}), frozenset({BOB})]


# -- refusals: nothing stored ----------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("org of another peer, signed by globex's CA", Reason.CERT_WRONG_CA),
        ("org in no rules, signed by globex's CA", Reason.UNKNOWN_PEER),
        ("org in no rules, signed by its own CA", Reason.CERT_UNTRUSTED),
    ],
)
async def test_a_certificate_that_is_not_a_peers_own_is_refused_at_the_handshake(
    world: World, store: Storage, case: str, reason: Reason
) -> None:
    claimed, issuer = {
        "org of another peer, signed by globex's CA": (INITECH, world.globex.ca),
        "org in no rules, signed by globex's CA": (EVIL, world.globex.ca),
        "org in no rules, signed by its own CA": (EVIL, world.evil.ca),
    }[case]
    cert = write_identity(world.tmp_path / "certs", issuer, claimed)
    env = world.envelope(f"mallory@{claimed}", BOB)
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running:
            async with world.client(world.globex, cert=cert) as http:
                with pytest.raises(httpx.TransportError):
                    await put(http, running, txn_id, transaction([env], origin=claimed))
            await trio.testing.wait_all_tasks_blocked()
            assert running.tls_failures(reason) == 1
            assert running.server.open_connections == 0
            await assert_nothing_stored(store, (claimed, txn_id), (GLOBEX, txn_id))
            await good_peer_is_served(world, running, store)


async def test_an_origin_other_than_the_certificates_org_is_refused(
    world: World, store: Storage
) -> None:
    # globex, proven by its certificate, claims to send for initech.
    env = world.envelope("eve@initech.example", BOB)
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running:
            async with world.client(world.globex) as http:
                reply = await put(http, running, txn_id, transaction([env], origin=INITECH))
            assert reply.status_code == 403
            assert reply.json() == {"error": "origin_mismatch"}
            await assert_nothing_stored(store, (GLOBEX, txn_id), (INITECH, txn_id))
            await good_peer_is_served(world, running, store)


async def test_a_destination_other_than_us_is_refused(world: World, store: Storage) -> None:
    env = world.envelope("alice@globex.example", BOB)
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.globex) as http:
            reply = await put(http, running, txn_id, encode_transaction(GLOBEX, INITECH, [env]))
        assert reply.status_code == 421
        assert reply.json() == {"error": "destination_mismatch"}
        await assert_nothing_stored(store, (GLOBEX, txn_id))


async def test_a_peer_speaking_for_a_third_org_gets_sender_not_origin(
    world: World, store: Storage
) -> None:
    env = world.envelope("eve@initech.example", BOB)
    txn_id = new_envelope_id()
    denied = Deltas(lambda: {"d": denials_counted("sender_not_origin")})
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.globex) as http:
            reply = await put(http, running, txn_id, transaction([env]))
        assert results(reply) == [(env.id, "sender_not_origin")]
        await assert_nothing_stored(store)
        # The answer is recorded (a retry must get it again), the envelope is not.
        record = await store.txn_lookup(GLOBEX, txn_id)
        assert record is not None
        assert dict(record.results) == {env.id: "sender_not_origin"}
        assert world.delivered == []
    assert denied() == {"d": 1.0}


async def test_a_body_over_the_limit_gets_413(world: World, store: Storage) -> None:
    env = world.envelope("alice@globex.example", BOB, payload=b"x" * MAX_BODY_BYTES)
    body = transaction([env])
    assert len(body) > MAX_BODY_BYTES
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running:
            async with world.client(world.globex) as http:
                reply = await put(http, running, txn_id, body)
            assert reply.status_code == 413
            assert reply.json() == {"error": "body_too_large"}
            await assert_nothing_stored(store, (GLOBEX, txn_id))
            await good_peer_is_served(world, running, store)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"origin": "globex.example", "destination"', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"origin": "globex.example", "destination": "acme.example", "envelopes": NaN}', "JSON"),
        (b"[]", "must be a JSON object"),
        (
            b'{"origin": "globex.example", "destination": "acme.example", "envelopes": [], "x": 1}',
            "unknown field",
        ),
    ],
)
async def test_a_body_that_is_not_a_transaction_gets_400(
    world: World, store: Storage, body: bytes, message: str
) -> None:
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.globex) as http:
            reply = await put(http, running, txn_id, body)
            assert reply.status_code == 400
            answer: dict[str, Any] = reply.json()
            assert answer["error"] == "protocol_error"
            assert message in answer["message"]
            # The connection stays usable: the request was read whole.
            env = world.envelope("alice@globex.example", BOB)
            good = await put(http, running, new_envelope_id(), transaction([env]))
            assert results(good) == [(env.id, "accepted")]
        assert await store.txn_lookup(GLOBEX, txn_id) is None


async def test_a_bad_transaction_id_or_too_many_envelopes_get_400(
    world: World, store: Storage
) -> None:
    env = world.envelope("alice@globex.example", BOB)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            receiving(world, store, max_body_bytes=1024 * 1024) as running,
            world.client(world.globex) as http,
        ):
            bad_id = await put(http, running, "x" * 65, transaction([env]))
            too_many = await put(http, running, "many", transaction([env] * (MAX_ENVELOPES + 1)))
        assert bad_id.status_code == 400
        assert "transaction id" in bad_id.json()["message"]
        assert too_many.status_code == 400
        assert f"at most {MAX_ENVELOPES}" in too_many.json()["message"]
        await assert_nothing_stored(store, (GLOBEX, "many"))


async def test_a_transaction_id_reused_for_another_body_gets_409(
    world: World, store: Storage
) -> None:
    first = world.envelope("alice@globex.example", BOB)
    other = world.envelope("alice@globex.example", BOB)
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.globex) as http:
            assert results(await put(http, running, txn_id, transaction([first]))) == [
                (first.id, "accepted")
            ]
            conflict = await put(http, running, txn_id, transaction([other]))
            assert conflict.status_code == 409
            assert conflict.json() == {"error": "txn_conflict"}
            # ...also for a body that would not even parse: the id decides first.
            assert (await put(http, running, txn_id, b"{")).status_code == 409
        assert await mailbox_ids(store, BOB) == [first.id]
        record = await store.txn_lookup(GLOBEX, txn_id)
        assert record is not None
        assert record.body_hash == body_hash(transaction([first]))


async def test_a_peer_removed_by_a_reload_loses_its_connection_and_its_next_handshake(
    world: World, store: Storage
) -> None:
    kept = world.envelope("alice@globex.example", BOB)
    late = world.envelope("alice@globex.example", BOB)
    late_txn = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            receiving(world, store) as running,
            world.client(world.globex) as globex,
            world.client(world.initech) as initech,
        ):
            reply = await put(globex, running, new_envelope_id(), transaction([kept]))
            assert results(reply) == [(kept.id, "accepted")]
            from_initech = world.envelope("alice@initech.example", BOB)
            reply = await put(
                initech, running, new_envelope_id(), transaction([from_initech], origin=INITECH)
            )
            assert results(reply) == [(from_initech.id, "accepted")]
            assert running.server.peer_connections(GLOBEX) == 1
            assert running.server.peer_connections(INITECH) == 1

            world.write_rules([INITECH])
            record = await world.holder.reload()
            assert record is not None
            assert record.dropped_peers == (GLOBEX,)
            await trio.testing.wait_all_tasks_blocked()
            assert running.server.peer_connections(GLOBEX) == 0  # closed by the reload
            assert running.server.peer_connections(INITECH) == 1  # untouched

            with pytest.raises(httpx.TransportError):
                await put(globex, running, late_txn, transaction([late]))
            await trio.testing.wait_all_tasks_blocked()
            # The new context no longer trusts globex's CA: refused in the handshake.
            assert running.tls_failures(Reason.CERT_UNTRUSTED) == 1

            again = world.envelope("alice@initech.example", BOB)
            reply = await put(
                initech, running, new_envelope_id(), transaction([again], origin=INITECH)
            )
            assert results(reply) == [(again.id, "accepted")]
            assert running.server.peer_connections(INITECH) == 1  # still the same connection

        assert await store.txn_lookup(GLOBEX, late_txn) is None
        assert await mailbox_ids(store, BOB) == [kept.id, from_initech.id, again.id]


async def test_a_peer_added_by_a_reload_is_trusted_at_once(world: World, store: Storage) -> None:
    world.write_rules([GLOBEX])
    await world.holder.reload()
    env = world.envelope("alice@initech.example", BOB)
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running, world.client(world.initech) as initech:
            # Not a peer yet: its CA is not trusted, the handshake fails.
            with pytest.raises(httpx.TransportError):
                await put(initech, running, new_envelope_id(), transaction([env], origin=INITECH))
            world.write_rules([GLOBEX, INITECH])
            record = await world.holder.reload()
            assert record is not None
            assert record.ok
            assert record.dropped_peers == ()
            reply = await put(
                initech, running, new_envelope_id(), transaction([env], origin=INITECH)
            )
            assert results(reply) == [(env.id, "accepted")]
    assert await mailbox_ids(store, BOB) == [env.id]


async def test_a_request_racing_a_reload_is_refused_with_403(world: World, store: Storage) -> None:
    # Without the app's wiring the keep-alive connection survives the reload;
    # the receiver still reads the rules in force and refuses.
    env = world.envelope("alice@globex.example", BOB)
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            receiving(world, store, follow=False) as running,
            world.client(world.globex) as http,
        ):
            version = await http.get(
                f"https://{HOST}:{running.port}/federation/v1/version",
                extensions={"sni_hostname": ACME},
            )
            assert version.status_code == 200
            world.write_rules([INITECH])
            assert await world.holder.reload() is not None
            reply = await put(http, running, txn_id, transaction([env]))
            assert running.server.peer_connections(GLOBEX) == 1  # the same connection
        assert reply.status_code == 403
        assert reply.json() == {"error": "unknown_peer"}
        await assert_nothing_stored(store, (GLOBEX, txn_id))


def test_the_receiver_refuses_a_bad_configuration(world: World) -> None:
    for bad in (0, MAX_ENVELOPES * 100, True):
        with pytest.raises(ValueError, match="max_envelopes"):
            Receiver(
                org=ACME,
                rules=world.holder,
                storage=None,  # type: ignore[arg-type]
                clock_ms=world.clock,
                max_envelopes=bad,
            )
    with pytest.raises(ValueError, match="receiver org"):
        Receiver(org="not a domain", rules=world.holder, storage=None, clock_ms=world.clock)  # type: ignore[arg-type]


# -- trust ---------------------------------------------------------------------------


async def test_a_pinned_peer_must_present_the_pinned_key(world: World, store: Storage) -> None:
    pinned = write_identity(world.tmp_path / "certs", world.globex.ca, GLOBEX)
    world.write_rules([GLOBEX, INITECH], pins={GLOBEX: spki_pin(dev.load_certificate(pinned[0]))})
    await world.holder.reload()
    env = world.envelope("alice@globex.example", BOB)
    txn_id = new_envelope_id()
    with trio.fail_after(TEST_TIMEOUT):
        async with receiving(world, store) as running:
            async with world.client(world.globex) as http:  # its usual, unpinned key
                with pytest.raises(httpx.TransportError):
                    await put(http, running, txn_id, transaction([env]))
            await trio.testing.wait_all_tasks_blocked()
            assert running.tls_failures(Reason.PIN_MISMATCH) == 1
            await assert_nothing_stored(store, (GLOBEX, txn_id))
            async with world.client(world.globex, cert=pinned) as http:
                reply = await put(http, running, txn_id, transaction([env]))
            assert results(reply) == [(env.id, "accepted")]


async def test_trust_is_built_once_per_rules_object(world: World) -> None:
    trust = FederationTrust(
        world.holder, cert_file=world.acme.cert_file, key_file=world.acme.key_file
    )
    context, peers = trust.server_context(), trust.peers()
    assert trust.server_context() is context
    assert trust.peers() is peers
    assert set(peers) == {GLOBEX, INITECH}
    assert peers[GLOBEX].cas == (world.globex.ca.cert,)

    world.write_rules([INITECH])
    await world.holder.reload()
    assert trust.update() is trust.server_context() is not context
    assert set(trust.peers()) == {INITECH}


@dataclass
class FakeListener:
    """Records what a reload asks of the federation listener."""

    contexts: list[ssl.SSLContext] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def set_ssl_context(self, ssl_context: ssl.SSLContext) -> None:
        self.contexts.append(ssl_context)

    def close_peer_connections(self, org: str) -> int:
        self.closed.append(org)
        return 1


async def test_follow_reloads_closes_only_drops_and_survives_a_broken_context(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    trust = FederationTrust(
        world.holder, cert_file=world.acme.cert_file, key_file=world.acme.key_file
    )
    listener = FakeListener()
    unsubscribe = follow_reloads(world.holder, trust, listener)

    # Nothing dropped: the context is rebuilt for the new rules (a peer added
    # by a reload must be trusted at once), and no connection is closed.
    await world.holder.reload()
    assert listener.closed == []
    assert listener.contexts == [trust.server_context()]

    world.write_rules([INITECH])
    await world.holder.reload()
    assert listener.closed == [GLOBEX]
    assert listener.contexts[-1] is trust.server_context()
    assert len(listener.contexts) == 2

    # The gateway's own certificate has gone: the old context stays, the
    # connections close all the same, and identify refuses by the new rules.
    world.acme.cert_file.unlink()
    world.write_rules([])
    with caplog.at_level(logging.ERROR, logger="gateway.federation"):
        await world.holder.reload()
    assert listener.closed == [GLOBEX, INITECH]
    assert len(listener.contexts) == 2
    assert "cannot build the TLS context" in caplog.text
    assert trust.peers() == {}

    unsubscribe()
    world.write_rules([GLOBEX])
    await world.holder.reload()
    world.write_rules([])
    await world.holder.reload()
    assert listener.closed == [GLOBEX, INITECH]


async def test_a_peer_over_its_inbound_rate_gets_429_and_its_retry_goes_through(
    world: World, store: Storage
) -> None:
    alice, eve = "alice@globex.example", "eve@initech.example"
    limiter = RateLimiter(rate=0.5, burst=3)  # envelopes a second, per peer
    first = [world.envelope(alice, BOB) for _ in range(2)]
    second = [world.envelope(alice, BOB) for _ in range(2)]
    refused = Deltas(lambda: {"n": txns_counted(GLOBEX, "rate_limited")})
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            receiving(world, store, inbound_rate=limiter) as running,
            world.client(world.globex) as globex,
            world.client(world.initech) as initech,
        ):
            assert results(await put(globex, running, "t1", transaction(first))) == [
                (env.id, "accepted") for env in first
            ]
            # Two more envelopes, one token left: the whole transaction waits, nothing stored.
            over = await put(globex, running, "t2", transaction(second))
            assert over.status_code == 429
            assert over.headers["retry-after"] == "2"  # one token short at 0.5 a second
            assert over.json() == {"error": "rate_limited"}
            assert await store.txn_lookup(GLOBEX, "t2") is None
            assert await mailbox_ids(store, BOB) == [env.id for env in first]
            # Another peer has a bucket of its own.
            from_initech = world.envelope(eve, BOB)
            answer = await put(initech, running, "t3", transaction([from_initech], origin=INITECH))
            assert results(answer) == [(from_initech.id, "accepted")]
            # After Retry-After the same transaction is taken, once.
            world.clock.ms += 2_000
            assert results(await put(globex, running, "t2", transaction(second))) == [
                (env.id, "accepted") for env in second
            ]
    assert refused() == {"n": 1.0}
    assert await mailbox_ids(store, BOB) == [e.id for e in (*first, from_initech, *second)]


async def test_a_full_mailbox_is_a_temporary_answer_and_the_envelope_lands_once_there_is_room(
    world: World, store: Storage
) -> None:
    alice = "alice@globex.example"
    for_bob = [world.envelope(alice, BOB) for _ in range(3)]
    for_carol = world.envelope(alice, CAROL, group="sales")
    refused = Deltas(
        lambda: {"n": sample("gateway_mailbox_full_refusals_total", path="federation")}
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            receiving(world, store, mailbox_bound=Bound(2, 10**6)) as running,
            world.client(world.globex) as globex,
        ):
            body = transaction([*for_bob, for_carol, for_bob[2]])
            expected = [
                (for_bob[0].id, "accepted"),
                (for_bob[1].id, "accepted"),
                (for_bob[2].id, "mailbox_full"),
                (for_carol.id, "accepted"),
                (for_bob[2].id, "mailbox_full"),  # a repeat reads like its first slot
            ]
            assert results(await put(globex, running, "t1", body)) == expected
            # The recorded answer: a retry of the same transaction reads the same.
            assert results(await put(globex, running, "t1", body)) == expected
            assert await mailbox_ids(store, BOB) == [e.id for e in for_bob[:2]]
            assert await mailbox_ids(store, CAROL) == [for_carol.id]
            # bob reads and acknowledges one: the envelope comes again in a new
            # transaction (protocol.md §4b) and is stored, once.
            await store.mailbox_ack(BOB, [for_bob[0].id])
            again = transaction([for_bob[2]])
            assert results(await put(globex, running, "t2", again)) == [(for_bob[2].id, "accepted")]
            assert results(await put(globex, running, "t3", again)) == [(for_bob[2].id, "accepted")]
    assert await mailbox_ids(store, BOB) == [for_bob[1].id, for_bob[2].id]
    assert refused() == {"n": 1.0}


async def test_below_the_storage_reserve_a_transaction_waits_with_503_and_nothing_is_recorded(
    world: World, store: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserve = FakeReserve()
    first = [world.envelope("alice@globex.example", BOB) for _ in range(2)]
    refused = Deltas(
        lambda: {
            "envelopes": sample("gateway_storage_reserve_refusals_total", path="federation"),
            "txns": txns_counted(GLOBEX, "insufficient_storage"),
        }
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            receiving(world, store, reserve=reserve) as running,
            world.client(world.globex) as globex,
        ):
            reserve.why = "12.0 MiB available on /data, below the reserve of 20.0 MiB"
            answer = await put(globex, running, "t1", transaction(first))
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "30"
            assert answer.json() == {"error": "insufficient_storage"}
            assert await store.txn_lookup(GLOBEX, "t1") is None
            assert await mailbox_ids(store, BOB) == []
            # Room again: the same transaction is taken, once.
            reserve.why = None
            assert results(await put(globex, running, "t1", transaction(first))) == [
                (env.id, "accepted") for env in first
            ]

            # A commit that finds the disk full anyway: the same 503, and the reserve
            # closes until its next sample.
            async def disk_full(*args: object, **kwargs: object) -> NoReturn:
                raise StorageFullError("storage acme.db: commit failed: database or disk is full")

            monkeypatch.setattr(store, "deliver", disk_full)
            later = [world.envelope("alice@globex.example", BOB)]
            answer = await put(globex, running, "t2", transaction(later))
            assert (answer.status_code, answer.json()) == (503, {"error": "insufficient_storage"})
            assert reserve.noted == 1
    assert refused() == {"envelopes": 3.0, "txns": 2.0}
    assert await mailbox_ids(store, BOB) == [env.id for env in first]
