"""End to end: real `gateway run` processes, killed with SIGKILL mid-flow.

10,000 envelopes go from alice@acme.example to bob@globex.example while
globex's gateway is killed twice and acme's once, each restarted. Every
envelope must end in bob's mailbox exactly once: none lost, none twice.
Bob's client acknowledges as it reads, so an envelope delivered a second
time after its first copy was read would show up again and be caught.

The test runs once per storage engine: both orgs on their default SQLite
files, then both on PostgreSQL, each org in a fresh database of its own on
the machine's server (tests/postgres_for_tests.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from gateway.client.api import ClientSession, ClientTransportError
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.envelope_crypto import seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess
from tests.postgres_for_tests import fresh_database

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme.example", "globex.example"
ENVELOPES = 10_000
BATCH = 250
DRAIN_TIMEOUT = 240.0  # generous: a slow CI machine, three restarts


@pytest.fixture
def databases(storage_engine: str) -> Iterator[dict[str, str]]:
    """Each org's ``storage:`` value: ``sqlite`` (the default), or a fresh PostgreSQL
    database of its own."""
    if storage_engine == "sqlite":
        yield {ACME: "sqlite", GLOBEX: "sqlite"}
        return
    with ExitStack() as stack:
        yield {org: stack.enter_context(fresh_database()) for org in (ACME, GLOBEX)}


def use_storage(org: DevOrg, storage: str) -> None:
    text = org.config_path.read_text()
    assert "\nstorage: sqlite" in text, "gateway init no longer writes `storage: sqlite`"
    org.config_path.write_text(text.replace("\nstorage: sqlite", f"\nstorage: {storage}", 1))


def session(org: DevOrg, token: str) -> ClientSession:
    return ClientSession(org.client_url, token, ca_file=org.ca_file, timeout=10.0)


async def restart(proc: GatewayProcess) -> None:
    proc.start()
    await trio.to_thread.run_sync(proc.wait_ready)


async def submit_until_accepted(
    acme: DevOrg, token: str, batch: list[Envelope], proc: GatewayProcess
) -> None:
    """Submit one batch; while acme is down, wait and submit the same batch again."""
    deadline = trio.current_time() + 60
    while True:
        try:
            async with session(acme, token) as alice:
                answers = await alice.submit_batch(batch)
        except ClientTransportError:
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.2)
            continue
        assert [a.envelope_id for a in answers] == [e.id for e in batch]
        assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
        return


async def test_ten_thousand_envelopes_survive_sigkills_exactly_once(
    tmp_path: Path, databases: dict[str, str]
) -> None:
    with DevNet(tmp_path) as net:
        acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
        use_storage(acme, databases[ACME])
        use_storage(globex, databases[GLOBEX])
        acme.write_rules(
            peers=[globex], groups={"engineering": {"members": ["alice"], "send_to": [GLOBEX]}}
        )
        globex.write_rules(
            peers=[acme], groups={"partners": {"members": ["bob"], "receive_from": [ACME]}}
        )
        proc_a, proc_b = net.process(ACME), net.process(GLOBEX)
        await restart(proc_a)
        await restart(proc_b)
        alice_token = acme.issue_token("alice")
        bob_token = globex.issue_token("bob")

        alice = UserKeys.generate(Address.of("alice", ACME))
        bob = UserKeys.generate(Address.of("bob", GLOBEX)).public()
        now = time.time_ns() // 1_000_000
        envelopes = [
            seal(
                i.to_bytes(4, "big") * 16,
                sender=alice,
                recipient=bob,
                created_ms=now,
                expires_ms=now + 3_600_000,
            )
            for i in range(ENVELOPES)
        ]
        sent = {env.id for env in envelopes}
        assert len(sent) == ENVELOPES

        batches = [envelopes[i : i + BATCH] for i in range(0, ENVELOPES, BATCH)]
        for number, batch in enumerate(batches):
            # The crashes, at fixed points of the flow.
            if number == 8:
                proc_b.kill()  # globex dies while acme is forwarding to it
            elif number == 14:
                await restart(proc_b)
            elif number == 20:
                proc_a.kill()  # acme dies with a spool full of envelopes for globex
                await restart(proc_a)
            elif number == 28:
                proc_b.kill()
                await restart(proc_b)
            await submit_until_accepted(acme, alice_token, batch, proc_a)

        seen: dict[str, int] = {}
        with trio.move_on_after(DRAIN_TIMEOUT):
            async with session(globex, bob_token) as bob_session:
                while len(seen) < ENVELOPES:
                    got = await bob_session.fetch(wait=5, limit=500)
                    for env in got:
                        seen[env.id] = seen.get(env.id, 0) + 1
                    if got:
                        await bob_session.ack([env.id for env in got])
                # Anything delivered twice would arrive again after its first ack.
                late = await bob_session.fetch(wait=2, limit=500)
                for env in late:
                    seen[env.id] = seen.get(env.id, 0) + 1

        missing = sent - set(seen)
        twice = {i: n for i, n in seen.items() if n > 1}
        assert not missing, f"{len(missing)} envelopes never arrived:\n{proc_a.log_tail()}"
        assert not twice, f"{len(twice)} envelopes arrived more than once"
        assert set(seen) == sent

        assert proc_a.stop() == 0
        assert proc_b.stop() == 0
