"""End to end: three acme nodes and two globex nodes, each org on its own PostgreSQL database.

Every node of an org runs from a copy of the same directory (certificates,
keys, rules) with its own ``node:`` name, listen ports and data directory,
as separate hosts would. Each org's ``endpoint:`` lists all of its nodes'
federation URLs, so the other org's rules (pasted from its peer card) carry
them all: partners reach any node through the several-endpoints mechanism.

The run, in phases, while long-polling readers fetch on other nodes than the
ones the envelopes were submitted through:

1. envelopes both ways, submitted through every node;
2. the acme node that holds globex's lane lease is killed with SIGKILL (the
   test reads the lease from the database), and one globex node too; the
   test measures how long acme's lane stays without a driver, and sends
   more envelopes both ways through the survivors;
3. both dead nodes are restarted; more envelopes both ways through all.

At the end every accepted envelope arrived exactly once, and every status
an acme sender reads is final (``forwarded``). The test prints the lane
takeover time and the cross-node long-poll wake latency (carol long-polls
on one node while alice writes to her through another).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from gateway.client.api import ClientTransportError
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess, make_cluster
from tests.e2e.traffic import envelopes_to, session, submit_retrying
from tests.postgres_for_tests import fresh_database

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme.example", "globex.example"
LEASE_TIME = 4.0  # seconds (limits.lease_time): kept short so the test is quick
PER_NODE = 25  # envelopes submitted through each live node, each way, per phase
BATCH = 20
ARRIVAL_TIMEOUT = 120.0
SUBMIT_TIMEOUT = 30.0
POLL = 0.05
WAKE_PROBES = 20


def cluster(net: DevNet, org: str, count: int, database: str) -> list[DevOrg]:
    """``count`` nodes of ``org`` on ``database`` (gateway.devnet.make_cluster)."""
    return make_cluster(
        net.add_org(org), count, storage=database, limits={"lease_time": f"{LEASE_TIME:g}s"}
    )


def lane_holder(database: str, peer: str) -> tuple[str, int] | None:
    """(node, epoch) of the lease on ``peer``'s lane, if held now (read from the database)."""
    now_ms = int(time.time() * 1000)
    with psycopg.connect(database, autocommit=True) as conn:
        row = conn.execute(
            "SELECT node, epoch FROM leases WHERE name = %s AND node <> '' AND until_ms > %s",
            (f"lane:{peer}", now_ms),
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


async def submit(node: DevOrg, token: str, envelopes: Sequence[Envelope]) -> None:
    await submit_retrying(
        node.client_url,
        node.ca_file,
        token,
        envelopes,
        batch=BATCH,
        poll=POLL,
        timeout=SUBMIT_TIMEOUT,
    )


class Reader:
    """One user's long-polling reader, moved from node to node; counts every arrival."""

    def __init__(self, token: str, nodes: Sequence[DevOrg]) -> None:
        self.token = token
        self.nodes = list(nodes)  # the nodes it may read through, in turn
        self.seen: dict[str, int] = {}

    async def run(self) -> None:
        turn = 0
        while True:
            node = self.nodes[turn % len(self.nodes)]
            turn += 1
            try:
                async with session(node, self.token) as client:
                    for _ in range(5):  # a few polls on this node, then the next
                        got = await client.fetch(wait=2, limit=500)
                        for env in got:
                            self.seen[env.id] = self.seen.get(env.id, 0) + 1
                        if got:
                            await client.ack([env.id for env in got])
            except ClientTransportError:
                await trio.sleep(POLL)  # that node is down: the next one

    async def wait_for(self, expected: set[str], what: str, logs: Any) -> None:
        with trio.move_on_after(ARRIVAL_TIMEOUT):
            while not expected <= set(self.seen):
                await trio.sleep(POLL)
        missing = expected - set(self.seen)
        assert not missing, f"{what}: {len(missing)} of {len(expected)} missing\n{logs()}"


async def wake_latencies(
    sender: DevOrg, reader: DevOrg, token_a: str, token_c: str, keys: UserKeys
) -> list[float]:
    """carol long-polls on ``reader`` while alice writes to her through ``sender``; seconds
    from alice's accepted submission to carol's fetch returning."""
    latencies = []
    carol = Address.of("carol", ACME)
    async with session(reader, token_c) as poller, session(sender, token_a) as writer:
        for _ in range(WAKE_PROBES):
            (envelope,) = envelopes_to(keys, carol, 1)
            got: list[Envelope] = []
            answered = trio.Event()

            async def poll(into: list[Envelope], done: trio.Event) -> None:
                into.extend(await poller.fetch(wait=10, limit=10))
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll, got, answered)
                await trio.sleep(0.2)  # the poll is waiting on the other node
                (answer,) = await writer.submit_batch([envelope])
                submitted_at = trio.current_time()
                assert answer.ok, answer.error
                await answered.wait()
            latencies.append(trio.current_time() - submitted_at)
            assert [e.id for e in got] == [envelope.id]
            await poller.ack([envelope.id])
    return latencies


@pytest.fixture
def databases() -> Iterator[tuple[str, str]]:
    with fresh_database() as acme, fresh_database() as globex:
        yield acme, globex


async def start_all(procs: Sequence[GatewayProcess]) -> None:
    for proc in procs:
        proc.start()
    for proc in procs:
        await trio.to_thread.run_sync(proc.wait_ready)


async def test_three_and_two_nodes_exchange_exactly_once_through_kills_and_restarts(
    tmp_path: Path, databases: tuple[str, str]
) -> None:
    acme_db, globex_db = databases
    with DevNet(tmp_path) as net:
        acme = cluster(net, ACME, 3, acme_db)
        globex = cluster(net, GLOBEX, 2, globex_db)
        acme[0].write_rules(
            peers=[globex[0]],
            groups={
                "engineering": {
                    "members": ["alice", "carol"],
                    "send_to": [GLOBEX],
                    "receive_from": [GLOBEX],
                }
            },
        )
        globex[0].write_rules(
            peers=[acme[0]],
            groups={"partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]}},
        )
        for nodes in (acme, globex):  # one rules file per org, copied to every node
            for node in nodes[1:]:
                shutil.copy(nodes[0].rules_path, node.rules_path)
        rules_text = globex[0].rules_path.read_text()
        assert all(f"https://{node.federation}" in rules_text for node in acme)
        procs = {
            f"{org.split('.')[0]}-{n}": GatewayProcess(node, tmp_path / f"{org}-{n}.log")
            for org, nodes in ((ACME, acme), (GLOBEX, globex))
            for n, node in enumerate(nodes, start=1)
        }
        net.processes.update(procs)  # stopped with the others
        await start_all(list(procs.values()))
        node_of = dict(zip(procs, [*acme, *globex], strict=True))

        def logs() -> str:
            return "\n".join(f"--- {name}\n{proc.log_tail(15)}" for name, proc in procs.items())

        alice_token = acme[0].issue_token("alice")
        carol_token = acme[0].issue_token("carol")
        bob_token = globex[0].issue_token("bob")
        alice = UserKeys.generate(Address.of("alice", ACME))
        bob = UserKeys.generate(Address.of("bob", GLOBEX))
        # alice reads on acme-3 then acme-2; bob on globex-2 then globex-1.
        at_alice = Reader(alice_token, [acme[2], acme[1]])
        at_bob = Reader(bob_token, [globex[1], globex[0]])
        to_bob_all: list[Envelope] = []
        to_alice_all: list[Envelope] = []

        async def phase(live: Sequence[str], what: str) -> None:
            to_bob: list[Envelope] = []
            to_alice: list[Envelope] = []
            for name in live:
                node = node_of[name]
                if node.org == ACME:
                    batch = envelopes_to(alice, Address.of("bob", GLOBEX), PER_NODE)
                    await submit(node, alice_token, batch)
                    to_bob += batch
                else:
                    batch = envelopes_to(bob, Address.of("alice", ACME), PER_NODE)
                    await submit(node, bob_token, batch)
                    to_alice += batch
            to_bob_all.extend(to_bob)
            to_alice_all.extend(to_alice)
            await at_bob.wait_for({e.id for e in to_bob}, f"{what}: at bob", logs)
            await at_alice.wait_for({e.id for e in to_alice}, f"{what}: at alice", logs)

        async with trio.open_nursery() as readers:
            readers.start_soon(at_alice.run)
            readers.start_soon(at_bob.run)

            await phase(list(procs), "all nodes")
            latencies = await wake_latencies(acme[0], acme[1], alice_token, carol_token, alice)

            # The acme node driving globex's lane dies, and one globex node with it.
            holder = await trio.to_thread.run_sync(lane_holder, acme_db, GLOBEX)
            assert holder is not None, logs()
            victim, epoch = f"{holder[0]}", holder[1]
            assert victim in procs, holder
            killed_at = time.monotonic()
            procs[victim].kill()
            procs["globex-1"].kill()
            takeover = None
            while time.monotonic() - killed_at < 3 * LEASE_TIME:
                now_holder = await trio.to_thread.run_sync(lane_holder, acme_db, GLOBEX)
                if now_holder is not None and now_holder[0] != victim:
                    takeover = time.monotonic() - killed_at
                    assert now_holder[1] > epoch
                    break
                await trio.sleep(POLL)
            assert takeover is not None, f"nobody took globex's lane from {victim}\n{logs()}"
            survivors = [name for name in procs if name not in (victim, "globex-1")]
            await phase(survivors, f"{victim} and globex-1 dead")

            procs[victim].start()
            procs["globex-1"].start()
            for name in (victim, "globex-1"):
                await trio.to_thread.run_sync(procs[name].wait_ready)
            await phase(list(procs), "all nodes again")
            readers.cancel_scope.cancel()

        # Exactly once, and every status alice's client reads is final.
        assert at_bob.seen == dict.fromkeys((e.id for e in to_bob_all), 1), logs()
        assert at_alice.seen == dict.fromkeys((e.id for e in to_alice_all), 1), logs()
        async with session(acme[1], alice_token) as client:
            statuses = {(await client.status(e.id))["status"] for e in to_bob_all}
        assert statuses == {"forwarded"}, statuses
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        print(
            f"\nlane takeover after SIGKILL of {victim}: {takeover:.2f} s "
            f"(limits.lease_time {LEASE_TIME:g} s); cross-node long-poll wake over "
            f"{len(latencies)} probes: p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
            f"{len(to_bob_all)} + {len(to_alice_all)} envelopes, each once"
        )
        assert takeover <= LEASE_TIME + 0.5, f"takeover {takeover:.2f} s > lease time {LEASE_TIME}"
        for proc in procs.values():
            assert proc.stop() == 0, proc.log_tail()
