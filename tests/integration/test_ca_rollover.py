"""A CA rollover between two running gateways, step by step, with mail flowing at every step.

acme rolls its org CA over (``gateway pki ca-rollover start|switch|finish``)
while acme and globex run (``run_gateway``, real mTLS on 127.0.0.1). globex
follows the documented partner steps by rewriting its rules with acme's peer
card. Nothing restarts: every file change is picked up by the watchers (their
poll interval patched to 50 ms). After each step, mail goes both ways. At the
end globex trusts only the new CA, so acme's sender can only get through with
its certificate from the new CA: the hot reload reached the outgoing side too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

import gateway.app
from gateway.cli.main import main
from gateway.cli.pki import (
    ca_key_path,
    ca_rollover_finish,
    ca_rollover_start,
    ca_rollover_switch,
    next_ca_key_path,
    previous_ca_key_path,
)
from gateway.config import GatewayConfig
from gateway.core.address import Address
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevOrg, create_org
from gateway.errors import PKIError
from gateway.pki import dev
from gateway.pki.tls import federation_client_context
from tests.integration.test_two_gateways import (
    ACME,
    GLOBEX,
    running,
    sealed,
    wait_for_mail,
    write_rules,
)

TEST_TIMEOUT = 60.0
POLL = 0.05


@pytest.fixture
def orgs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[DevOrg, DevOrg]:
    monkeypatch.setattr(gateway.app, "RULES_POLL_INTERVAL", POLL)
    acme, globex = create_org(tmp_path, ACME), create_org(tmp_path, GLOBEX)
    write_rules(acme, globex)
    return acme, globex


def acme_leaf(tmp: Path, ca: dev.Issued, acme: GatewayConfig, stem: str) -> tuple[Path, Path]:
    """A certificate for acme.example from ``ca``, for acme's gateway key (globex pins it),
    on disk, as a test client presents it."""
    issued = dev.issue_gateway_cert(
        ca, ACME, now=datetime.now(UTC), validity_days=30, key=dev.load_ec_key(acme.tls.key)
    )
    cert, key = tmp / f"{stem}.pem", tmp / f"{stem}.key"
    dev.write_file(cert, issued.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=False)
    dev.write_private_key(key, issued.key, replace=False)
    return cert, key


async def globex_accepts(globex: GatewayConfig, port: int, leaf: tuple[Path, Path]) -> bool:
    """Does globex's federation listener let in a client presenting ``leaf``?"""
    context = federation_client_context(
        cert_file=leaf[0], key_file=leaf[1], peer_ca_pem=globex.tls.ca.read_bytes()
    )
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname=GLOBEX
    )
    try:
        await tls.do_handshake()
        await tls.send_all(b"GET /federation/v1/version HTTP/1.1\r\nhost: globex.example\r\n\r\n")
        return (await tls.receive_some(64)).startswith(b"HTTP/1.1 200")
    except trio.BrokenResourceError:
        return False  # TLS 1.3: a refused client certificate shows after the handshake
    finally:
        await trio.aclose_forcefully(tls)


async def test_ca_rollover_without_an_outage(orgs: tuple[DevOrg, DevOrg], tmp_path: Path) -> None:
    acme_org, globex_org = orgs
    acme, globex = acme_org.config(), globex_org.config()
    keys = {
        name: UserKeys.generate(Address.of(name, org))
        for name, org in (("alice", ACME), ("bob", GLOBEX))
    }
    old_ca = dev.load_issuing_ca(acme.tls.ca, ca_key_path(acme, None))
    old_leaf = acme_leaf(tmp_path, old_ca, acme, "old-ca-leaf")
    sent = 0

    async def mail_flows_both_ways() -> None:
        nonlocal sent
        sent += 1
        await alice.submit(sealed(keys["alice"], keys["bob"], b"to bob %d" % sent))
        [got] = await wait_for_mail(bob, 1)
        assert await bob.ack([got.id]) == 1
        await bob.submit(sealed(keys["bob"], keys["alice"], b"to alice %d" % sent))
        [back] = await wait_for_mail(alice, 1)
        assert await alice.ack([back.id]) == 1

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running(acme_org, ["alice"]) as acme_run,
            running(globex_org, ["bob"]) as globex_run,
            acme_run.session("alice") as alice,
            globex_run.session("bob") as bob,
        ):
            port = globex_run.ports.federation
            await mail_flows_both_ways()

            # acme, step 1: a new CA beside the old one; nothing presented changes.
            new_cert = ca_rollover_start(acme, now=datetime.now(UTC))
            assert dev.load_ca_bundle(acme.tls.ca) == (old_ca.cert, new_cert)
            with pytest.raises(PKIError, match="already under way"):
                ca_rollover_start(acme, now=datetime.now(UTC))
            new_ca = dev.load_issuing_ca(acme.tls.ca, next_ca_key_path(acme))
            new_leaf = acme_leaf(tmp_path, new_ca, acme, "new-ca-leaf")
            assert not await globex_accepts(globex, port, new_leaf)
            await mail_flows_both_ways()

            # globex, step 1: trust both (acme's card now carries both CAs).
            assert acme_org.card().count("BEGIN CERTIFICATE") == 2
            write_rules(acme_org, globex_org)
            while not await globex_accepts(globex, port, new_leaf):
                await trio.sleep(POLL)
            assert await globex_accepts(globex, port, old_leaf)
            await mail_flows_both_ways()

            # acme, step 2: present a certificate from the new CA (same key, same pin).
            pin = acme_org.card().split("pins:")[1]
            ca_rollover_switch(acme, now=datetime.now(UTC), validity_days=30)
            assert dev.load_certificate(acme.tls.cert).issuer == new_cert.subject
            assert previous_ca_key_path(acme).exists()
            assert acme_org.card().split("pins:")[1] == pin
            await mail_flows_both_ways()

            # acme, step 3, and globex, step 2: only the new CA, on both sides.
            ca_rollover_finish(acme)
            assert dev.load_ca_bundle(acme.tls.ca) == (new_cert,)
            assert not previous_ca_key_path(acme).exists()
            write_rules(acme_org, globex_org)
            while await globex_accepts(globex, port, old_leaf):
                await trio.sleep(POLL)
            # Only a certificate from the new CA gets into globex now: mail still flows,
            # so acme's sender presents the renewed certificate.
            await mail_flows_both_ways()


def test_rollover_steps_refuse_to_run_out_of_order(orgs: tuple[DevOrg, DevOrg]) -> None:
    acme = orgs[0].config()
    before = acme.tls.ca.read_bytes()
    with pytest.raises(PKIError, match="ca-rollover start` first"):
        ca_rollover_switch(acme, now=datetime.now(UTC), validity_days=30)
    with pytest.raises(PKIError, match="switch` comes first"):
        ca_rollover_finish(acme)
    assert acme.tls.ca.read_bytes() == before  # nothing changed
    ca_rollover_start(acme, now=datetime.now(UTC))
    with pytest.raises(PKIError, match="switch` comes first"):
        ca_rollover_finish(acme)
    # A partner's old copy of our card still verifies: tls.ca starts with the old CA.
    assert dev.load_ca_bundle(acme.tls.ca)[0].public_bytes(Encoding.PEM) == before


def test_the_command_line_runs_the_three_steps(
    orgs: tuple[DevOrg, DevOrg], capsys: pytest.CaptureFixture[str]
) -> None:
    directory = str(orgs[0].directory)
    assert main(["pki", "ca-rollover", "start", "--dir", directory]) == 0
    assert "gateway peer card" in capsys.readouterr().out
    assert main(["pki", "show", "--dir", directory]) == 0
    assert "org CA 2 of 2 (CA rollover)" in capsys.readouterr().out
    assert main(["pki", "ca-rollover", "switch", "--dir", directory]) == 0
    assert "same key, same pin" in capsys.readouterr().out
    assert main(["pki", "ca-rollover", "finish", "--dir", directory]) == 0
    assert "now holds only" in capsys.readouterr().out
    assert main(["pki", "ca-rollover", "finish", "--dir", directory]) != 0
    assert "switch` comes first" in capsys.readouterr().err
