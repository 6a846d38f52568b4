"""The federated key directory: two whole gateways in one trio test, real mTLS.

alice's client asks acme for bob's keys; acme asks globex over the peer's
persistent mTLS client (``GET /federation/v1/keys/bob``), checks globex's
signature against the key its rules pin, and passes the record on. The
client checks it again against the key ``GET /v1/orgs/globex.example`` names.
Also: what the federation endpoint answers to whom, and the bounded read.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import yaml

from gateway.app import BoundPorts, run_gateway
from gateway.client.api import ClientAPIError, ClientSession, client_ssl_context
from gateway.clientapi.tokens import issue_token
from gateway.config import load_config
from gateway.core.address import Address
from gateway.core.keytext import parse_signing_key
from gateway.core.rules import CompiledRules, load_rules
from gateway.crypto.key_records import verify_key_record
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevOrg, create_org
from gateway.errors import Reason
from gateway.federation.keys import KeyDirectory, fetch_remote_keys
from gateway.federation.protocol import KEYS_PATH
from gateway.federation.transport import FailureKind, HttpxPeerTransport, TransportError
from gateway.http import Request
from gateway.rules_runtime import RulesHolder
from gateway.storage.sqlite import open_sqlite_storage
from tests.integration.test_client_api import OPENAPI, conforms

ACME, GLOBEX = "acme.example", "globex.example"
TEST_TIMEOUT = 30.0


@dataclass
class Running:
    org: DevOrg
    ports: BoundPorts
    tokens: dict[str, str]

    def session(self, user: str) -> ClientSession:
        return ClientSession(
            f"https://127.0.0.1:{self.ports.client}", self.tokens[user], ca_file=self.org.ca_file
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


def card_key(org: DevOrg) -> bytes:
    return parse_signing_key(org.card().split("signing_key:")[1].split()[0])


@pytest.fixture
def orgs(tmp_path: Path) -> tuple[DevOrg, DevOrg]:
    acme, globex = create_org(tmp_path, ACME), create_org(tmp_path, GLOBEX)
    acme.write_rules(
        peers=[globex],
        groups={"engineering": {"members": ["alice"], "send_to": [GLOBEX]}},
    )
    globex.write_rules(
        peers=[acme],
        groups={"partners": {"members": ["bob", "dave"], "receive_from": [ACME]}},
    )
    return acme, globex


async def test_a_peer_users_keys_come_through_our_gateway_signed_by_their_org(
    orgs: tuple[DevOrg, DevOrg],
) -> None:
    acme_org, globex_org = orgs
    bob_keys = UserKeys.generate(Address.of("bob", GLOBEX))
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running(acme_org, ["alice"]) as acme,
            running(globex_org, ["bob"]) as globex,
            acme.session("alice") as alice,
            globex.session("bob") as bob,
        ):
            # Not published yet: 404 through the peer.
            with pytest.raises(ClientAPIError) as missing:
                await alice.lookup_keys(f"bob@{GLOBEX}")
            assert (missing.value.status, missing.value.code) == (404, "not_found")

            published = await bob.publish_keys(bob_keys.public().to_json())
            record = await alice.lookup_keys(f"bob@{GLOBEX}")
            assert record == published  # globex's signed record, passed on unchanged

            # The org keys the client API names: ours, and the one our rules pin for globex.
            assert parse_signing_key(await alice.org_signing_key(ACME)) == card_key(acme_org)
            globex_key = parse_signing_key(await alice.org_signing_key(GLOBEX))
            assert globex_key == card_key(globex_org)
            public = verify_key_record(
                record, org_verify_key=globex_key, expected_address=bob_keys.address
            )
            assert public == bob_keys.public()

            # The endpoint's answers are those docs/openapi.yaml describes.
            openapi = yaml.safe_load(OPENAPI.read_text())
            async with httpx.AsyncClient(
                base_url=f"https://127.0.0.1:{acme.ports.client}",
                verify=client_ssl_context(acme_org.ca_file),
                headers={"authorization": f"Bearer {acme.tokens['alice']}"},
            ) as raw:
                for org, status in ((GLOBEX, 200), ("initech.example", 404), ("no", 400)):
                    answer = await raw.get(f"/v1/orgs/{org}")
                    assert answer.status_code == status
                    conforms(openapi, "/v1/orgs/{org}", "get", status, answer.json())

            # A user globex's rules do not know, and a user who never published: 404.
            for user in (f"ghost@{GLOBEX}", f"dave@{GLOBEX}"):
                with pytest.raises(ClientAPIError) as absent:
                    await alice.lookup_keys(user)
                assert (absent.value.status, absent.value.code) == (404, "not_found")
            # An org that is not a peer.
            for call in (
                alice.lookup_keys("x@initech.example"),
                alice.org_signing_key("initech.example"),
            ):
                with pytest.raises(ClientAPIError) as unknown:
                    await call
                assert (unknown.value.status, unknown.value.code) == (404, "unknown_peer")


async def test_the_federation_endpoint_over_mtls_with_a_bounded_read(
    orgs: tuple[DevOrg, DevOrg],
) -> None:
    acme_org, globex_org = orgs
    acme_config = load_config(acme_org.config_path)
    rules = RulesHolder.load(str(acme_config.rules))
    bob_keys = UserKeys.generate(Address.of("bob", GLOBEX))
    with trio.fail_after(TEST_TIMEOUT):
        async with running(globex_org, ["bob"]) as globex, globex.session("bob") as bob:
            published = await bob.publish_keys(bob_keys.public().to_json())
            transport = HttpxPeerTransport(ACME, acme_config.tls.cert, acme_config.tls.key, rules)
            try:
                data = await fetch_remote_keys(transport, GLOBEX, "bob")
                assert data is not None
                assert (
                    verify_key_record(
                        data, org_verify_key=card_key(globex_org), expected_address=bob_keys.address
                    )
                    == bob_keys.public()
                )
                assert published == json.loads(data)
                assert await fetch_remote_keys(transport, GLOBEX, "ghost") is None
                assert await fetch_remote_keys(transport, GLOBEX, "dave") is None
                # One persistent client for the peer, shared with the sender's transactions.
                assert transport.peers_connected == {GLOBEX}

                with pytest.raises(TransportError) as too_big:
                    await transport.get(GLOBEX, KEYS_PATH + "bob", max_bytes=16)
                assert too_big.value.kind is FailureKind.BAD_ANSWER
                with pytest.raises(TransportError) as unknown:
                    await fetch_remote_keys(transport, "initech.example", "bob")
                assert unknown.value.kind is FailureKind.UNKNOWN_PEER
            finally:
                await transport.aclose()


class _Keys:
    def __init__(self, records: dict[str, bytes]) -> None:
        self.records = records
        self.asked: list[str] = []

    async def user_keys_get(self, user: str) -> bytes | None:
        self.asked.append(user)
        return self.records.get(user)


class _Rules:
    def __init__(self, rules: CompiledRules) -> None:
        self.current = rules


async def test_the_directory_answers_only_peers_in_the_rules(
    orgs: tuple[DevOrg, DevOrg],
) -> None:
    _acme, globex = orgs
    text = globex.rules_path.read_bytes()
    rules = CompiledRules(
        load_rules(text, filename=str(globex.rules_path), read_file=lambda p: Path(p).read_bytes())
    )
    store = _Keys({f"bob@{GLOBEX}": b'{"record":"as stored"}'})
    directory = KeyDirectory(org=GLOBEX, rules=_Rules(rules), storage=store)

    async def ask(peer: str | None, user: str) -> tuple[int, bytes]:
        request = Request("GET", KEYS_PATH + user, peer=peer)
        answer = await directory.get_keys(request, {"user": user})
        return answer.status, answer.body

    assert await ask(ACME, "bob") == (200, b'{"record":"as stored"}')
    assert await ask(ACME, "BOB") == (200, b'{"record":"as stored"}')  # one user, any case
    not_found = b'{"error":"' + Reason.RECIPIENT_UNKNOWN.value.encode() + b'"}'
    assert await ask(ACME, "dave") == (404, not_found)  # in the rules, never published
    assert await ask(ACME, "ghost") == (404, not_found)  # not in the rules: asked all the same
    assert await ask(ACME, "a..b") == (400, b'{"error":"address_bad_user"}')
    forbidden = (403, b'{"error":"unknown_peer"}')
    assert await ask(None, "bob") == forbidden
    assert await ask("initech.example", "bob") == forbidden
    # Every well-formed lookup from a peer costs one storage read, whoever the user is.
    assert store.asked == [f"bob@{GLOBEX}", f"bob@{GLOBEX}", f"dave@{GLOBEX}", f"ghost@{GLOBEX}"]
