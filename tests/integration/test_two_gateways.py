"""Two whole gateways in one trio test, on 127.0.0.1 with real TLS and real storage.

Each gateway is `run_gateway` with the files `gateway init` writes, rules with
the partner's peer card pasted in, and real clients on the client API. This is
the integration depth of issue 4's first acceptance point: envelopes from each
org to the other, the allowed ones in mailboxes, the denied ones with their
reason codes, at the origin or at the receiver.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from gateway.app import BoundPorts, run_gateway
from gateway.client.api import ClientAPIError, ClientSession
from gateway.clientapi.tokens import issue_token
from gateway.config import load_config
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.envelope_crypto import open_envelope, seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevOrg, create_org
from gateway.storage.sqlite import open_sqlite_storage

ACME, GLOBEX = "acme.example", "globex.example"
TEST_TIMEOUT = 30.0
HOUR_MS = 3600 * 1000


@dataclass
class Running:
    org: DevOrg
    ports: BoundPorts
    tokens: dict[str, str]

    def session(self, user: str) -> ClientSession:
        return ClientSession(
            f"https://127.0.0.1:{self.ports.client}", self.tokens[user], ca_file=self.org.ca_file
        )


def write_rules(acme: DevOrg, globex: DevOrg) -> None:
    acme.write_rules(
        peers=[globex],
        groups={
            "engineering": {
                "members": ["alice"],
                "send_to": [GLOBEX],
                "receive_from": [f"{GLOBEX}/partners"],
            },
            "legal": {"members": ["carol"]},
        },
    )
    globex.write_rules(
        peers=[acme],
        groups={
            "partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]},
            "interns": {"members": ["dave"], "send_to": [ACME]},
        },
    )


@asynccontextmanager
async def running(org: DevOrg, users: list[str]) -> AsyncIterator[Running]:
    config = load_config(org.config_path)
    async with trio.open_nursery() as nursery:
        ports: BoundPorts = await nursery.start(
            lambda *, task_status: run_gateway(
                config, handle_signals=False, task_status=task_status
            )
        )
        assert config.storage.sqlite_path is not None
        tokens = {}
        async with open_sqlite_storage(config.storage.sqlite_path) as storage:
            for user in users:
                tokens[user] = await issue_token(
                    storage, Address.of(user, org.org), at_ms=time.time_ns() // 1_000_000
                )
        yield Running(org, ports, tokens)
        nursery.cancel_scope.cancel()


def sealed(
    sender: UserKeys, recipient: UserKeys, text: bytes, *, ttl_ms: int = HOUR_MS
) -> Envelope:
    now = time.time_ns() // 1_000_000
    return seal(
        text, sender=sender, recipient=recipient.public(), created_ms=now, expires_ms=now + ttl_ms
    )


async def wait_for_mail(session: ClientSession, count: int) -> list[Envelope]:
    got: list[Envelope] = []
    while len(got) < count:
        got.extend(await session.fetch(wait=10))
    return got


async def wait_for_status(session: ClientSession, envelope_id: str, status: str) -> None:
    while (await session.status(envelope_id))["status"] != status:
        await trio.sleep(0.05)


@pytest.fixture
def orgs(tmp_path: Path) -> tuple[DevOrg, DevOrg]:
    acme, globex = create_org(tmp_path, ACME), create_org(tmp_path, GLOBEX)
    write_rules(acme, globex)
    return acme, globex


async def test_two_gateways_deliver_both_ways_and_deny_with_reasons(
    orgs: tuple[DevOrg, DevOrg],
) -> None:
    acme_org, globex_org = orgs
    keys = {
        name: UserKeys.generate(Address.of(name, org))
        for name, org in (("alice", ACME), ("carol", ACME), ("bob", GLOBEX), ("dave", GLOBEX))
    }
    ghost = UserKeys.generate(Address.of("ghost", GLOBEX))
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running(acme_org, ["alice", "carol"]) as acme,
            running(globex_org, ["bob", "dave"]) as globex,
            acme.session("alice") as alice,
            acme.session("carol") as carol,
            globex.session("bob") as bob,
        ):
            # alice -> bob: forwarded over mTLS, lands in bob's mailbox.
            hello = sealed(keys["alice"], keys["bob"], b"hello bob")
            submitted = await alice.submit(hello)
            assert (submitted.envelope_id, submitted.status) == (hello.id, "queued")
            [got] = await wait_for_mail(bob, 1)
            assert got.id == hello.id
            assert got.group == "engineering"  # asserted by acme, the origin
            assert (
                open_envelope(
                    got, recipient=keys["bob"], sender_verify_key=keys["alice"].public().verify_key
                )
                == b"hello bob"
            )
            await wait_for_status(alice, hello.id, "forwarded")  # in bob's mailbox at globex
            assert await bob.ack([got.id]) == 1

            # bob -> alice: the other way.
            answer = sealed(keys["bob"], keys["alice"], b"hi alice")
            await bob.submit(answer)
            [back] = await wait_for_mail(alice, 1)
            assert back.id == answer.id
            assert back.group == "partners"

            # carol (legal, segmented) -> bob: denied at the origin, at once.
            with pytest.raises(ClientAPIError) as denied:
                await carol.submit(sealed(keys["carol"], keys["bob"], b"from legal"))
            assert (denied.value.status, denied.value.code) == (403, "peer_not_allowed")

            # alice -> dave: acme lets it go, globex's rules refuse it, and tell acme only
            # what they would say of a user who does not exist (dave's group is segmented).
            to_intern = sealed(keys["alice"], keys["dave"], b"to an intern")
            await alice.submit(to_intern)
            await wait_for_status(alice, to_intern.id, "rejected:recipient_unknown")

            # alice -> a user globex does not have.
            to_ghost = sealed(keys["alice"], ghost, b"anyone there?")
            await alice.submit(to_ghost)
            await wait_for_status(alice, to_ghost.id, "rejected:recipient_unknown")

            # Nothing else reached bob.
            assert await bob.fetch(wait=0) == []


async def test_a_peer_that_starts_again_greets_us_and_ends_our_backoff(
    orgs: tuple[DevOrg, DevOrg],
) -> None:
    acme_org, globex_org = orgs
    # A backoff of up to a day: only the greeting can bring the envelope over in time.
    config = acme_org.config_path.read_text()
    assert "backoff_initial: 1s" in config
    assert "backoff_max: 5m" in config
    acme_org.config_path.write_text(
        config.replace("backoff_initial: 1s", "backoff_initial: 1d").replace(
            "backoff_max: 5m", "backoff_max: 1d"
        )
    )
    keys = {
        name: UserKeys.generate(Address.of(name, org))
        for name, org in (("alice", ACME), ("bob", GLOBEX))
    }

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"peer": GLOBEX, **extra.get(name, {})}) or 0.0

    extra = {"gateway_peer_backoff_cut_total": {"cause": "heard"}}
    cuts = sample("gateway_peer_backoff_cut_total")
    with trio.fail_after(TEST_TIMEOUT):
        async with running(acme_org, ["alice"]) as acme, acme.session("alice") as alice:
            envelope = sealed(keys["alice"], keys["bob"], b"are you back?")
            await alice.submit(envelope)
            # globex is not running: the first try fails and the lane backs off.
            while sample("gateway_peer_consecutive_failures") < 1:
                await trio.sleep(0.05)
            async with running(globex_org, ["bob"]) as globex, globex.session("bob") as bob:
                [got] = await wait_for_mail(bob, 1)
                assert got.id == envelope.id
            await wait_for_status(alice, envelope.id, "forwarded")
    assert sample("gateway_peer_backoff_cut_total") == cuts + 1


async def test_two_gateways_of_this_version_frame_their_transactions_both_ways(
    orgs: tuple[DevOrg, DevOrg],
) -> None:
    acme_org, globex_org = orgs
    keys = {
        name: UserKeys.generate(Address.of(name, org))
        for name, org in (("alice", ACME), ("bob", GLOBEX))
    }

    def framed(direction: str, peer: str, framing: str) -> float:
        labels = {"direction": direction, "peer": peer, "framing": framing}
        return REGISTRY.get_sample_value("gateway_federation_transaction_bodies_total", labels) or 0

    keys_of = [(d, p) for d in ("inbound", "outbound") for p in (ACME, GLOBEX)]
    before = {(d, p, f): framed(d, p, f) for d, p in keys_of for f in ("json", "binary_v2")}
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running(acme_org, ["alice"]) as acme,
            running(globex_org, ["bob"]) as globex,
            acme.session("alice") as alice,
            globex.session("bob") as bob,
        ):
            hello = sealed(keys["alice"], keys["bob"], b"framed hello")
            await alice.submit(hello)
            [got] = await wait_for_mail(bob, 1)
            assert (got.id, got.group) == (hello.id, "engineering")
            answer = sealed(keys["bob"], keys["alice"], b"framed answer")
            await bob.submit(answer)
            [back] = await wait_for_mail(alice, 1)
            assert back.id == answer.id
    after = {key: framed(*key) - value for key, value in before.items()}
    for direction, peer in keys_of:
        assert after[(direction, peer, "json")] == 0
        assert after[(direction, peer, "binary_v2")] >= 1
