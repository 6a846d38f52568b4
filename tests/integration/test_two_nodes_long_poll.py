"""Two nodes of one org on one PostgreSQL database: a long-poll on one wakes for the other.

Both are `run_gateway` with the files `gateway init` writes, the storage
pointed at a fresh database and the listeners on free ports. alice submits
through node A to carol (a local delivery, stored by A); carol's long-poll
on node B answers with the envelope at once, not at the end of its wait.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import trio

from gateway.app import BoundPorts, run_gateway
from gateway.client.api import ClientSession
from gateway.clientapi.tokens import issue_token
from gateway.config import GatewayConfig, HostPort, ListenConfig, StorageConfig, load_config
from gateway.core.address import Address
from gateway.crypto.keys import UserKeys
from gateway.devnet import create_org
from gateway.storage.postgres import open_postgres_storage
from tests.integration.test_two_gateways import sealed
from tests.postgres_for_tests import fresh_database

ACME = "acme.example"
LONG_POLL_S = 20  # carol's wait: an answer well before it came from the wake
WAKE_BOUND_S = 5.0  # generous for a shared machine; the storage test measures latency


def node_config(config: GatewayConfig, url: str, name: str, tmp_path: Path) -> GatewayConfig:
    free = ListenConfig(*(HostPort("127.0.0.1", 0) for _ in range(3)))
    return dataclasses.replace(
        config,
        storage=StorageConfig("postgresql", url=url),
        listen=free,
        node=name,
        audit_log=tmp_path / f"audit-{name}.log",
    )


async def test_a_long_poll_on_node_b_wakes_for_mail_stored_through_node_a(
    tmp_path: Path,
) -> None:
    acme = create_org(tmp_path, ACME)
    acme.write_rules(groups={"staff": {"members": ["alice", "carol"]}})
    config = load_config(acme.config_path)
    with fresh_database() as url:
        async with trio.open_nursery() as nursery:
            ports: list[BoundPorts] = []
            for name in ("node-a", "node-b"):
                node = node_config(config, url, name, tmp_path)
                ports.append(
                    await nursery.start(
                        lambda *, task_status, node=node: run_gateway(
                            node, handle_signals=False, task_status=task_status
                        )
                    )
                )
            now = time.time_ns() // 1_000_000
            async with open_postgres_storage(url, pool_size=1) as storage:
                tokens = {
                    user: await issue_token(storage, Address.of(user, ACME), at_ms=now)
                    for user in ("alice", "carol")
                }
            a, b = (f"https://127.0.0.1:{p.client}" for p in ports)
            alice_keys = UserKeys.generate(Address.of("alice", ACME))
            carol_keys = UserKeys.generate(Address.of("carol", ACME))
            async with (
                ClientSession(a, tokens["alice"], ca_file=acme.ca_file) as alice,
                ClientSession(b, tokens["carol"], ca_file=acme.ca_file) as carol,
            ):
                got: list[float] = []

                async def long_poll() -> None:
                    envelopes = await carol.fetch(wait=LONG_POLL_S)
                    got.append(trio.current_time())
                    assert [e.id for e in envelopes] == [envelope.id]

                envelope = sealed(alice_keys, carol_keys, b"hello from node A")
                async with trio.open_nursery() as polls:
                    polls.start_soon(long_poll)
                    # The poll is waiting on node B (its watch taken, its read empty).
                    await trio.sleep(0.5)
                    sent = trio.current_time()
                    await alice.submit(envelope)
                assert got[0] - sent < WAKE_BOUND_S
            nursery.cancel_scope.cancel()
