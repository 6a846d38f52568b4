"""`gateway run` on PostgreSQL, as an admin meets it: federation with an SQLite gateway,
a kill -9, and a database that goes away and comes back.

acme.example keeps its state in a PostgreSQL database of its own (created for
the test on the machine's server, dropped after); globex.example keeps the
default SQLite file. Envelopes go both ways, across a SIGKILL of acme, and
arrive once. When acme's database goes away, its client API answers 503 with
Retry-After (nothing acknowledged), /readyz says `storage` is not ready, the
metric counts it, and acme takes envelopes again by itself once the database
is back.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from gateway.client.api import ClientSession
from gateway.core.address import Address
from gateway.core.envelope import Envelope, encode_envelope
from gateway.crypto.envelope_crypto import seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess, gateway_command
from tests.e2e.traffic import metric_value
from tests.postgres_for_tests import bring_back, cut_off, fresh_database

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme.example", "globex.example"
ARRIVAL_TIMEOUT = 60.0


@pytest.fixture
def acme_database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def use_storage(org: DevOrg, url: str) -> None:
    text = org.config_path.read_text()
    assert "\nstorage: sqlite" in text
    org.config_path.write_text(text.replace("\nstorage: sqlite", f"\nstorage: {url}"))


def session(org: DevOrg, token: str) -> ClientSession:
    return ClientSession(org.client_url, token, ca_file=org.ca_file, timeout=10.0)


def sealed(sender: UserKeys, recipient: Address, count: int, tag: int) -> list[Envelope]:
    keys = UserKeys.generate(recipient).public()
    now = time.time_ns() // 1_000_000
    return [
        seal(
            (tag * 100_000 + i).to_bytes(8, "big") * 8,
            sender=sender,
            recipient=keys,
            created_ms=now,
            expires_ms=now + 3_600_000,
        )
        for i in range(count)
    ]


async def start(proc: GatewayProcess) -> None:
    proc.start()
    await trio.to_thread.run_sync(proc.wait_ready)


async def submit(org: DevOrg, token: str, batch: list[Envelope]) -> None:
    async with session(org, token) as client:
        answers = await client.submit_batch(batch)
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]


async def receive_all(org: DevOrg, token: str, expected: set[str]) -> dict[str, int]:
    """Fetch and acknowledge until ``expected`` arrived; how often each id came."""
    seen: dict[str, int] = {}
    with trio.move_on_after(ARRIVAL_TIMEOUT):
        async with session(org, token) as client:
            while not expected <= set(seen):
                got = await client.fetch(wait=5, limit=500)
                for env in got:
                    seen[env.id] = seen.get(env.id, 0) + 1
                if got:
                    await client.ack([env.id for env in got])
            for env in await client.fetch(wait=1, limit=500):  # nothing comes twice
                seen[env.id] = seen.get(env.id, 0) + 1
    return seen


def pair(net: DevNet, acme_database: str) -> tuple[DevOrg, DevOrg]:
    acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
    acme.write_rules(
        peers=[globex],
        groups={
            "engineering": {
                "members": ["alice", "dave"],
                "send_to": [GLOBEX],
                "receive_from": [GLOBEX],
            }
        },
    )
    globex.write_rules(
        peers=[acme],
        groups={"partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]}},
    )
    use_storage(acme, acme_database)
    return acme, globex


async def test_a_postgresql_gateway_federates_with_an_sqlite_gateway(
    tmp_path: Path, acme_database: str
) -> None:
    with DevNet(tmp_path) as net:
        acme, globex = pair(net, acme_database)
        proc_acme, proc_globex = net.process(ACME), net.process(GLOBEX)
        await start(proc_acme)
        await start(proc_globex)
        alice_token, bob_token = acme.issue_token("alice"), globex.issue_token("bob")
        alice = UserKeys.generate(Address.of("alice", ACME))
        bob = UserKeys.generate(Address.of("bob", GLOBEX))

        to_bob = sealed(alice, Address.of("bob", GLOBEX), 60, tag=1)
        await submit(acme, alice_token, to_bob[:30])
        proc_acme.kill()  # acme dies with envelopes in its PostgreSQL spool
        await start(proc_acme)
        await submit(acme, alice_token, to_bob[30:])
        to_alice = sealed(bob, Address.of("alice", ACME), 40, tag=2)
        await submit(globex, bob_token, to_alice)

        at_bob = await receive_all(globex, bob_token, {e.id for e in to_bob})
        at_alice = await receive_all(acme, alice_token, {e.id for e in to_alice})
        assert at_bob == dict.fromkeys((e.id for e in to_bob), 1), proc_acme.log_tail()
        assert at_alice == dict.fromkeys((e.id for e in to_alice), 1), proc_acme.log_tail()
        # The admin commands read the same database while acme runs.
        for command in (("peers", "--json"), ("spool", "ls", "--json")):
            done = subprocess.run(
                gateway_command(*command, "-c", str(acme.config_path)),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            json.loads(done.stdout)
        peers = subprocess.run(
            gateway_command("peers", "-c", str(acme.config_path)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert GLOBEX in peers.stdout
        assert proc_acme.stop() == 0
        assert proc_globex.stop() == 0


def readyz(org: DevOrg) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{org.metrics_url}/readyz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_a_database_that_goes_away_is_503_not_ready_and_recovers(
    tmp_path: Path, acme_database: str
) -> None:
    with DevNet(tmp_path) as net:
        acme = net.add_org(ACME)
        acme.write_rules(groups={"engineering": {"members": ["alice", "dave"]}})
        use_storage(acme, acme_database)
        proc = net.process(ACME)
        await start(proc)
        token = acme.issue_token("alice")
        alice = UserKeys.generate(Address.of("alice", ACME))
        await submit(acme, token, sealed(alice, Address.of("dave", ACME), 3, tag=1))

        await trio.to_thread.run_sync(cut_off, acme_database)
        batch = sealed(alice, Address.of("dave", ACME), 3, tag=2)
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(acme.ca_file)), timeout=20
        ) as http:
            answer = await http.post(
                f"{acme.client_url}/v1/envelopes/batch",
                headers={"authorization": f"Bearer {token}"},
                content=b'{"envelopes":[' + b",".join(map(encode_envelope, batch)) + b"]}",
            )
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "storage_error"
        assert int(answer.headers["retry-after"]) > 0
        status, body = await trio.to_thread.run_sync(readyz, acme)
        assert status == 503
        assert body["ready"] is False
        assert "storage" in json.dumps(body)
        metrics = await trio.to_thread.run_sync(proc.metrics)
        assert metric_value(metrics, "gateway_storage_unavailable_total", listener="client") >= 1

        await trio.to_thread.run_sync(bring_back, acme_database)
        with trio.fail_after(60):
            while (await trio.to_thread.run_sync(readyz, acme))[0] != 200:
                await trio.sleep(0.5)
        # The same batch again: taken now, stored once.
        await submit(acme, token, batch)
        dave_token = acme.issue_token("dave")
        seen = await receive_all(acme, dave_token, {e.id for e in batch})
        assert all(seen[e.id] == 1 for e in batch)
        assert proc.stop() == 0
