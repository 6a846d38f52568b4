"""End to end: partners and clients reach two gateway nodes through HAProxy.

acme.example runs two nodes, acme-1 and acme-2, on one PostgreSQL database
(a fresh one for the test), each with its own name, listen ports and data
directory, and copies of the same certificates, keys and rules, as two hosts
would. A real ``haproxy`` runs in front of them with the configuration that
ships in deploy/haproxy/haproxy.cfg, changed only in its addresses, ports and
check timings (:func:`balancer_config`): layer 4, TLS passed through, each
node checked on its metrics listener's ``/readyz``. globex.example (SQLite)
has the balancer's address as acme's ``endpoint`` in its rules.

What must hold:

* the federation port of the balancer presents acme's own certificate (the
  TLS is the node's, not the balancer's);
* globex's envelopes reach alice through the balancer, and the acme nodes
  count them under ``peer="globex.example"``: a name a node can only have
  taken from globex's client certificate, since no header carries it;
* alice uses the client API through the balancer, her envelopes reach bob;
* alice's sessions are spread over both nodes (one state, any node);
* after the node that globex's connection went to is SIGKILLed, the
  balancer's health check marks it down and traffic both ways keeps flowing
  through the other; every envelope arrives exactly once.

One of the two nodes drives the lane to globex (its lease); nothing here
depends on which (tests/e2e/test_cluster.py is about that).

``haproxy`` is a system tool (Debian's ``haproxy``): missing, the test fails
and says how to install it; .ci/run installs it (in CI, or as root).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import trio
from cryptography import x509

from gateway.client.api import ClientSession, ClientTransportError
from gateway.config import HostPort
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.keys import UserKeys
from gateway.devnet import (
    LOOPBACK,
    DevNet,
    DevOrg,
    GatewayProcess,
    add_node,
    edit_config,
    free_port,
)
from tests.e2e.traffic import envelopes_to, metric_value, submit_retrying
from tests.postgres_for_tests import fresh_database

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme.example", "globex.example"
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
PER_PHASE = 200  # envelopes each way, before and after the kill
BATCH = 100
#: Until every check of the balancer passed, or a dead node is marked down.
BALANCER_TIMEOUT = 30.0
ARRIVAL_TIMEOUT = 90.0
SUBMIT_TIMEOUT = 30.0
POLL = 0.1
STOP_TIMEOUT = 10.0


def require_haproxy() -> str:
    """The haproxy binary; a failure (never a skip) if it is not installed."""
    found = shutil.which("haproxy")
    if found is None:
        found = next((p for p in HAPROXY_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail(
            "haproxy is not installed, and this test needs it: `apt-get install haproxy` "
            "(Debian/Ubuntu; .ci/run installs it in CI, or when run as root)",
            pytrace=False,
        )
    return found


def test_a_missing_haproxy_fails_the_test_and_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "HAPROXY_PATHS", ())
    with pytest.raises(pytest.fail.Exception, match="apt-get install haproxy"):
        require_haproxy()


# -- the balancer --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    org: DevOrg


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise AssertionError(
            f"{EXAMPLE} should hold {old!r} once (found {text.count(old)}): "
            "the test adapts that line; update both together"
        )
    return text.replace(old, new)


def balancer_config(
    *, federation: HostPort, client: HostPort, nodes: Sequence[Node], stats_socket: Path
) -> str:
    """deploy/haproxy/haproxy.cfg with the test's addresses, ports and quicker checks."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = _replace_once(text, "bind 10.9.0.10:8443", f"bind {federation}")
    text = _replace_once(text, "bind 10.1.0.10:8080", f"bind {client}")
    text = _replace_once(
        text, "stats socket /run/haproxy/admin.sock", f"stats socket {stats_socket}"
    )
    # Checks 10x as often as the example's, so that a dead node is out in about 0.4 s.
    text = _replace_once(
        text, "default-server inter 2s fall 3 rise 2", "default-server inter 200ms fall 2 rise 2"
    )
    for example_name, example_host, node in zip(("gw1", "gw2"), ("11", "12"), nodes, strict=True):
        metrics = node.org.metrics.port
        text = _replace_once(
            text,
            f"server {example_name} 10.9.0.{example_host}:8443 check port 9090",
            f"server {node.name} {node.org.federation} check port {metrics}",
        )
        text = _replace_once(
            text,
            f"server {example_name} 10.1.0.{example_host}:8080 check port 9090",
            f"server {node.name} {node.org.client} check port {metrics}",
        )
    return text


def server_states(stats_socket: Path) -> dict[tuple[str, str], dict[str, str]]:
    """``show stat`` on the admin socket: (backend, server) to that row's columns."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        for _ in range(1000):  # the socket closes after one answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    lines = b"".join(chunks).decode("utf-8").removeprefix("# ").splitlines()
    rows = csv.DictReader(line for line in lines if line)
    return {
        (row["pxname"], row["svname"]): row
        for row in rows
        if row["svname"] not in ("FRONTEND", "BACKEND")
    }


@dataclass
class Balancer:
    process: subprocess.Popen[bytes]
    log_path: Path
    stats_socket: Path
    federation: HostPort
    client: HostPort

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def states(self) -> dict[tuple[str, str], dict[str, str]]:
        return server_states(self.stats_socket)

    async def wait_until(self, want: Mapping[str, str], what: str) -> None:
        """Until each server named in ``want`` has that status (UP, DOWN) in both backends;
        UP only once its last check was the HTTP one on ``/readyz`` that passed (L7OK)."""
        deadline = trio.current_time() + BALANCER_TIMEOUT
        states: dict[tuple[str, str], dict[str, str]] = {}
        while trio.current_time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited early:\n{self.log_tail()}")
            if self.stats_socket.exists():
                states = await trio.to_thread.run_sync(self.states)
                rows = [(s, row) for (_, s), row in states.items() if s in want]
                if len(rows) == 2 * len(want) and all(
                    row["status"] == want[server]
                    and (want[server] != "UP" or row["check_status"] == "L7OK")
                    for server, row in rows
                ):
                    return
            await trio.sleep(POLL)
        summary = {
            f"{b}/{s}": f"{row['status']} ({row['check_status']} {row['check_desc']})"
            for (b, s), row in states.items()
        }
        raise AssertionError(
            f"haproxy: {what} not seen after {BALANCER_TIMEOUT} s: {summary}\n{self.log_tail()}"
        )


@contextmanager
def running_balancer(
    base: Path, nodes: Sequence[Node], *, federation: HostPort, client: HostPort
) -> Iterator[Balancer]:
    """haproxy in the foreground (``-db``), stopped on exit; its log in ``base``."""
    binary = require_haproxy()
    stats_socket = base / "haproxy.sock"
    config_path = base / "haproxy.cfg"
    config_path.write_text(
        balancer_config(
            federation=federation, client=client, nodes=nodes, stats_socket=stats_socket
        ),
        encoding="utf-8",
    )
    checked = subprocess.run(
        [binary, "-c", "-q", "-f", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, f"haproxy -c: {checked.stdout}{checked.stderr}"
    log_path = base / "haproxy.log"
    log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [binary, "-db", "-f", str(config_path)],  # -db: foreground, no daemon
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield Balancer(process, log_path, stats_socket, federation, client)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


# -- the orgs ------------------------------------------------------------------------------


def session(url: str, org: DevOrg, token: str) -> ClientSession:
    return ClientSession(url, token, ca_file=org.ca_file, timeout=10.0)


async def submit(url: str, org: DevOrg, token: str, envelopes: Sequence[Envelope]) -> None:
    await submit_retrying(
        url, org.ca_file, token, envelopes, batch=BATCH, poll=POLL, timeout=SUBMIT_TIMEOUT
    )


async def receive(url: str, org: DevOrg, token: str, expected: set[str]) -> dict[str, int]:
    """Fetch and acknowledge until ``expected`` arrived; how often each id came."""
    seen: dict[str, int] = {}
    with trio.move_on_after(ARRIVAL_TIMEOUT):
        while not expected <= set(seen):
            try:
                async with session(url, org, token) as client:
                    got = await client.fetch(wait=2, limit=500)
                    for env in got:
                        seen[env.id] = seen.get(env.id, 0) + 1
                    if got:
                        await client.ack([env.id for env in got])
            except ClientTransportError:
                await trio.sleep(POLL)
        async with session(url, org, token) as client:
            for env in await client.fetch(wait=1, limit=500):  # nothing comes twice
                seen[env.id] = seen.get(env.id, 0) + 1
    return seen


def inbound_from_globex(metrics: str) -> float:
    return metric_value(
        metrics,
        "gateway_federation_envelopes_total",
        direction="inbound",
        peer=GLOBEX,
        outcome="accepted",
    )


def server_certificate_names(balancer: Balancer, acme: DevOrg, globex: DevOrg) -> list[str]:
    """The DNS names of the certificate the balancer's federation port presents
    (to a client that shows globex's certificate, as globex's gateway does)."""
    context = ssl.create_default_context(cafile=str(acme.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    pki = globex.directory / "pki"
    context.load_cert_chain(pki / "gateway.pem", pki / "gateway.key")
    with (
        socket.create_connection(
            (balancer.federation.host, balancer.federation.port), timeout=10
        ) as raw,
        context.wrap_socket(raw, server_hostname=ACME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return names.value.get_values_for_type(x509.DNSName)


@pytest.fixture
def acme_database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


async def start(proc: GatewayProcess) -> None:
    proc.start()
    await trio.to_thread.run_sync(proc.wait_ready)


async def test_partners_and_clients_reach_either_node_through_haproxy(
    tmp_path: Path, acme_database: str
) -> None:
    require_haproxy()
    with DevNet(tmp_path) as net:
        acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
        federation_port, client_port = free_port(), free_port()
        balanced_endpoint = f"https://{LOOPBACK}:{federation_port}"
        # The peer card (and so globex's rules) carries the balancer's address.
        edit_config(acme, node="acme-1", storage=acme_database, endpoint=balanced_endpoint)
        acme.write_rules(
            peers=[globex],
            groups={
                "engineering": {
                    "members": ["alice"],
                    "send_to": [GLOBEX],
                    "receive_from": [GLOBEX],
                }
            },
        )
        globex.write_rules(
            peers=[acme],
            groups={"partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]}},
        )
        assert f'endpoint: "{balanced_endpoint}"' in globex.rules_path.read_text()
        acme_2 = add_node(acme, tmp_path / "acme.example-2")
        edit_config(acme_2, node="acme-2")
        nodes = [Node("acme-1", acme), Node("acme-2", acme_2)]
        proc_1 = net.process(ACME)
        proc_2 = GatewayProcess(acme_2, tmp_path / "acme.example-2.log")
        net.processes["acme.example-2"] = proc_2  # stopped with the others
        proc_globex = net.process(GLOBEX)
        for proc in (proc_1, proc_2, proc_globex):
            await start(proc)

        balancer_addresses = {
            "federation": HostPort(LOOPBACK, federation_port),
            "client": HostPort(LOOPBACK, client_port),
        }
        with running_balancer(tmp_path, nodes, **balancer_addresses) as balancer:
            await balancer.wait_until({"acme-1": "UP", "acme-2": "UP"}, "both nodes up")
            # Passed through: the TLS server at the balancer's port is an acme node.
            names = await trio.to_thread.run_sync(server_certificate_names, balancer, acme, globex)
            assert names == [ACME], names
            balanced_client_api = f"https://{balancer.client}"

            alice_token, bob_token = acme.issue_token("alice"), globex.issue_token("bob")
            alice = UserKeys.generate(Address.of("alice", ACME))
            bob = UserKeys.generate(Address.of("bob", GLOBEX))

            async def exchange(survivors: Sequence[GatewayProcess]) -> None:
                """globex to alice and alice (through the balancer) to bob, each envelope
                arriving once; alice reads through the balancer too."""
                to_alice = envelopes_to(bob, Address.of("alice", ACME), PER_PHASE)
                to_bob = envelopes_to(alice, Address.of("bob", GLOBEX), PER_PHASE)
                await submit(globex.client_url, globex, bob_token, to_alice)
                await submit(balanced_client_api, acme, alice_token, to_bob)
                at_alice = await receive(
                    balanced_client_api, acme, alice_token, {e.id for e in to_alice}
                )
                at_bob = await receive(globex.client_url, globex, bob_token, {e.id for e in to_bob})
                logs = "\n".join(p.log_tail() for p in (*survivors, proc_globex))
                logs += "\n" + balancer.log_tail()
                assert at_alice == dict.fromkeys((e.id for e in to_alice), 1), logs
                assert at_bob == dict.fromkeys((e.id for e in to_bob), 1), logs

            procs = {"acme-1": proc_1, "acme-2": proc_2}
            await exchange(list(procs.values()))
            # The nodes named globex from its client certificate (no header carries it).
            counted = {
                name: inbound_from_globex(await trio.to_thread.run_sync(proc.metrics))
                for name, proc in procs.items()
            }
            assert sum(counted.values()) == PER_PHASE, counted
            # Any node serves any client: alice's sessions went to both.
            states = await trio.to_thread.run_sync(balancer.states)
            sessions = {name: int(states["client_api_nodes", name]["stot"]) for name in procs}
            assert all(sessions.values()), sessions

            # The node that globex's connection went to dies (SIGKILL); the balancer's
            # checks take it out; the other node carries everything, both ways.
            victim = max(counted, key=lambda name: counted[name])
            (survivor,) = set(procs) - {victim}
            procs[victim].kill()
            await balancer.wait_until({victim: "DOWN", survivor: "UP"}, f"{victim} marked down")
            await exchange([procs[survivor]])
            after = inbound_from_globex(await trio.to_thread.run_sync(procs[survivor].metrics))
            assert after - counted[survivor] == PER_PHASE, (counted, after)
            assert balancer.process.poll() is None, balancer.log_tail()

        assert procs[survivor].stop() == 0
        assert proc_globex.stop() == 0
