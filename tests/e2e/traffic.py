"""Two real gateways and real traffic between them, for the observability tests.

acme.example (alice and dave in ``engineering``, carol in ``legal``, which
reaches no one) sends to globex.example (bob in ``partners``). The flow:
``envelopes`` from alice to bob, one from carol to bob (denied by policy),
and ``local`` from alice to dave (a local delivery). :func:`run_flow` returns
once globex's own ``/metrics`` shows every one of alice's envelopes accepted.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gateway.client.api import ClientSession, ClientTransportError
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.envelope_crypto import seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess

ACME, GLOBEX = "acme.example", "globex.example"
BATCH = 100
#: How long the envelopes may take to reach globex's mailboxes.
ARRIVAL_TIMEOUT = 60.0
POLL = 0.2


@dataclass
class Flow:
    acme: DevOrg
    globex: DevOrg
    proc_acme: GatewayProcess
    proc_globex: GatewayProcess
    sent: int  # alice -> bob, all accepted by acme
    denied: int  # carol -> bob, refused by acme's rules
    local: int  # alice -> dave


def session(org: DevOrg, token: str) -> ClientSession:
    return ClientSession(org.client_url, token, ca_file=org.ca_file, timeout=10.0)


async def submit_retrying(
    url: str,
    ca_file: Path,
    token: str,
    envelopes: Sequence[Envelope],
    *,
    batch: int,
    poll: float,
    timeout: float = 30.0,
) -> None:
    """Submit in batches of ``batch`` to the client API at ``url``; a batch whose
    connection breaks (a node dying) is sent again, for up to ``timeout`` seconds."""
    for start in range(0, len(envelopes), batch):
        chunk = envelopes[start : start + batch]
        deadline = trio.current_time() + timeout
        while True:
            try:
                async with ClientSession(url, token, ca_file=ca_file, timeout=10.0) as client:
                    answers = await client.submit_batch(chunk)
            except ClientTransportError:
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(poll)
                continue
            assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
            break


async def start_pair(net: DevNet) -> tuple[DevOrg, DevOrg, GatewayProcess, GatewayProcess]:
    acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
    acme.write_rules(
        peers=[globex],
        groups={
            "engineering": {"members": ["alice", "dave"], "send_to": [GLOBEX]},
            "legal": {"members": ["carol"]},
        },
    )
    globex.write_rules(
        peers=[acme], groups={"partners": {"members": ["bob"], "receive_from": [ACME]}}
    )
    proc_acme, proc_globex = net.process(ACME), net.process(GLOBEX)
    for proc in (proc_acme, proc_globex):
        proc.start()
        await trio.to_thread.run_sync(proc.wait_ready)
    return acme, globex, proc_acme, proc_globex


def envelopes_to(
    sender: UserKeys, recipient: Address, count: int, *, payload_bytes: int = 64
) -> list[Envelope]:
    keys = UserKeys.generate(recipient).public()
    now = time.time_ns() // 1_000_000
    return [
        seal(
            i.to_bytes(4, "big") * (payload_bytes // 4),
            sender=sender,
            recipient=keys,
            created_ms=now,
            expires_ms=now + 3_600_000,
        )
        for i in range(count)
    ]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in ``text`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


async def wait_for_metric(
    proc: GatewayProcess, name: str, at_least: float, timeout: float, **labels: str
) -> float:
    deadline = trio.current_time() + timeout
    while True:
        value = metric_value(await trio.to_thread.run_sync(proc.metrics), name, **labels)
        if value >= at_least:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(
                f"{name}{labels} is {value} after {timeout} s, wanted >= {at_least}\n"
                f"{proc.log_tail()}"
            )
        await trio.sleep(POLL)


async def run_flow(net: DevNet, *, envelopes: int, local: int = 5) -> Flow:
    acme, globex, proc_acme, proc_globex = await start_pair(net)
    alice_token, carol_token = acme.issue_token("alice"), acme.issue_token("carol")
    alice = UserKeys.generate(Address.of("alice", ACME))
    carol = UserKeys.generate(Address.of("carol", ACME))
    to_bob = envelopes_to(alice, Address.of("bob", GLOBEX), envelopes)
    async with session(acme, alice_token) as client:
        for start in range(0, len(to_bob), BATCH):
            answers = await client.submit_batch(to_bob[start : start + BATCH])
            assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
        answers = await client.submit_batch(envelopes_to(alice, Address.of("dave", ACME), local))
        assert all(a.ok and a.status == "delivered" for a in answers), answers[:3]
    async with session(acme, carol_token) as client:
        (denied,) = await client.submit_batch(envelopes_to(carol, Address.of("bob", GLOBEX), 1))
        assert denied.error is not None, denied
    await wait_for_metric(
        proc_globex,
        "gateway_federation_envelopes_total",
        envelopes,
        ARRIVAL_TIMEOUT,
        direction="inbound",
        outcome="accepted",
    )
    return Flow(acme, globex, proc_acme, proc_globex, envelopes, 1, local)


def require_tool(name: str) -> str:
    """The path of ``name`` (prometheus, promtool); a skip locally, a failure in CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed, and CI must run this test: .ci/run installs it")
    pytest.skip(f"{name} is not installed: apt-get install prometheus (Debian/Ubuntu)")
