"""A running gateway picks up renewed certificates without a restart (real sockets, real TLS).

One whole gateway (``run_gateway`` on the files ``gateway init`` writes); its
federation and client API certificates are renewed on disk while a federation
connection stays open. New connections get the new certificate, the open one
carries on, and a bad pair (a key that is not the certificate's) is refused,
counted, and changes nothing. The watcher polls every 50 ms here (the
gateway's poll interval, patched), so the waits are short and bounded.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from cryptography import x509
from prometheus_client import REGISTRY

import gateway.app
from gateway.app import BoundPorts, run_gateway
from gateway.cli.pki import ca_key_path, rotate
from gateway.config import GatewayConfig, load_config
from gateway.devnet import DevOrg, create_org
from gateway.pki import dev
from gateway.pki.tls import federation_client_context

ACME, GLOBEX = "acme.example", "globex.example"
TEST_TIMEOUT = 30.0
POLL = 0.05


def reloads(name: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_certificate_reloads_total", {"certificate": name, "result": result}
    )
    return value or 0.0


@asynccontextmanager
async def running(config: GatewayConfig) -> AsyncIterator[BoundPorts]:
    async with trio.open_nursery() as nursery:
        ports: BoundPorts = await nursery.start(
            lambda *, task_status: run_gateway(
                config, handle_signals=False, task_status=task_status
            )
        )
        yield ports
        nursery.cancel_scope.cancel()


async def open_federation(port: int, globex: GatewayConfig, acme_ca: Path) -> trio.SSLStream:  # type: ignore[type-arg]
    """An mTLS connection to acme's federation listener, as globex."""
    context = federation_client_context(
        cert_file=globex.tls.cert, key_file=globex.tls.key, peer_ca_pem=acme_ca.read_bytes()
    )
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname=ACME
    )
    await tls.do_handshake()
    return tls


def serial_of(tls: trio.SSLStream) -> int:  # type: ignore[type-arg]
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def ask_version(tls: trio.SSLStream) -> int:  # type: ignore[type-arg]
    """GET the version on ``tls``, read the whole answer; its status code."""
    await tls.send_all(b"GET /federation/v1/version HTTP/1.1\r\nhost: acme.example\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await tls.receive_some(65536)
        assert chunk, "connection closed"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += await tls.receive_some(65536)
    return int(lines[0].split()[1])


async def client_api_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cadata=ca.read_text())
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="127.0.0.1"
    )
    try:
        await tls.do_handshake()
        return serial_of(tls)
    finally:
        await trio.aclose_forcefully(tls)


@pytest.fixture
def orgs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[DevOrg, DevOrg]:
    monkeypatch.setattr(gateway.app, "RULES_POLL_INTERVAL", POLL)
    acme, globex = create_org(tmp_path, ACME), create_org(tmp_path, GLOBEX)
    groups = {"staff": {"members": ["alice"], "send_to": ["*"], "receive_from": ["*"]}}
    acme.write_rules(peers=[globex], groups=groups)
    globex.write_rules(peers=[acme], groups=groups)
    return acme, globex


async def test_renewed_certificates_serve_new_connections_and_open_ones_carry_on(
    orgs: tuple[DevOrg, DevOrg],
) -> None:
    acme_org, globex_org = orgs
    acme, globex = acme_org.config(), globex_org.config()
    assert acme.client_tls is not None
    with trio.fail_after(TEST_TIMEOUT):
        async with running(load_config(acme_org.config_path)) as ports:
            held = await open_federation(ports.federation, globex, acme.tls.ca)
            first = serial_of(held)
            assert await ask_version(held) == 200
            first_client = await client_api_serial(ports.client, acme.tls.ca)

            # Renew both, as an admin would: `gateway pki rotate`, and a new client API pair.
            now = datetime.now(UTC)
            rotate(acme, ca_key=ca_key_path(acme, None), validity_days=30, keep_key=False, now=now)
            ca = dev.load_issued(acme.tls.ca, ca_key_path(acme, None))
            renewed = dev.issue_client_api_cert(ca, "127.0.0.1", now=now, validity_days=30)
            dev.write_private_key(acme.client_tls.key, renewed.key, replace=True)
            dev.write_file(
                acme.client_tls.cert, renewed.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=True
            )
            new_serial = dev.load_certificate(acme.tls.cert).serial_number
            assert new_serial != first

            while True:  # the watcher sees the change within a few polls
                fresh = await open_federation(ports.federation, globex, acme.tls.ca)
                serial = serial_of(fresh)
                await trio.aclose_forcefully(fresh)
                if serial == new_serial:
                    break
                await trio.sleep(POLL)
            while await client_api_serial(ports.client, acme.tls.ca) == first_client:
                await trio.sleep(POLL)
            assert await client_api_serial(ports.client, acme.tls.ca) == renewed.cert.serial_number
            # The connection opened before the renewal is still served.
            assert serial_of(held) == first
            assert await ask_version(held) == 200

            # A half-done renewal: a new key beside the certificate. Refused and counted.
            failures = reloads("federation", "failure")
            dev.write_private_key(acme.tls.key, dev.generate_key(), replace=True)
            while reloads("federation", "failure") == failures:
                await trio.sleep(POLL)
            fresh = await open_federation(ports.federation, globex, acme.tls.ca)
            assert serial_of(fresh) == new_serial
            assert await ask_version(fresh) == 200
            await trio.aclose_forcefully(fresh)
            await trio.aclose_forcefully(held)
