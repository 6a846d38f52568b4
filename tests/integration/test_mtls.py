"""Federation mTLS on real sockets on 127.0.0.1, with certificates minted per test.

A small serve loop stands in for the HTTP layer: it wraps each connection in a
TLS 1.3 server stream, turns the verified certificate into an org with
:func:`verify_peer_certificate`, answers ``hello <org>`` and closes. Every
refusal is caught per connection, so a refused client never takes the
listener down: each refusal test then connects a good client to the same
listener.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.errors import PeerAuthError, Reason
from gateway.pki import dev
from gateway.pki.certs import spki_sha256
from gateway.pki.identity import PeerTrust, peer_certificate_der, verify_peer_certificate
from gateway.pki.tls import federation_client_context, federation_server_context

TEST_TIMEOUT = 30  # seconds: generous, so that a hang fails instead of blocking the suite
HANDSHAKE_TIMEOUT = 10
HELLO = b"hello "


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Org:
    name: str
    ca: dev.Issued


@dataclass(frozen=True)
class Identity:
    """A certificate and key on disk, as a gateway would load them."""

    cert_file: Path
    key_file: Path
    issued: dev.Issued


def make_org(name: str) -> Org:
    return Org(name=name, ca=dev.issue_ca(name, now=now()))


def identity(
    tmp_path: Path, ca: dev.Issued, org: str, *, issued_at: datetime | None = None, days: int = 90
) -> Identity:
    issued = dev.issue_gateway_cert(ca, org, now=issued_at or now(), validity_days=days)
    stem = f"{org}-{spki_sha256(issued.cert).hex()[:8]}"
    cert_file, key_file = tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key"
    dev.write_file(cert_file, issued.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=False)
    dev.write_private_key(key_file, issued.key, replace=False)
    return Identity(cert_file=cert_file, key_file=key_file, issued=issued)


def trust(*orgs: Org, pins: dict[str, set[bytes]] | None = None) -> dict[str, PeerTrust]:
    pins = pins or {}
    return {
        org.name: PeerTrust(
            org=org.name, cas=(org.ca.cert,), pins=frozenset(pins.get(org.name, ()))
        )
        for org in orgs
    }


@dataclass(frozen=True)
class Outcome:
    org: str | None = None  # who the client proved to be
    reason: Reason | None = None  # why it was refused
    error: BaseException | None = None  # the TLS error, for a refused handshake


@dataclass(frozen=True)
class Listener:
    port: int
    outcomes: trio.MemoryReceiveChannel[Outcome]


@asynccontextmanager
async def serving(
    server: Identity, peers: dict[str, PeerTrust], *, context: ssl.SSLContext | None = None
) -> AsyncIterator[Listener]:
    if context is None:
        context = federation_server_context(
            cert_file=server.cert_file,
            key_file=server.key_file,
            trusted_ca_pems=[c.public_bytes(Encoding.PEM) for p in peers.values() for c in p.cas],
        )
    send, receive = trio.open_memory_channel[Outcome](16)

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        outcome: Outcome
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
            org = verify_peer_certificate(peer_certificate_der(tls), peers, now=now())
            await tls.send_all(HELLO + org.encode() + b"\n")
            outcome = Outcome(org=org)
        except PeerAuthError as exc:
            outcome = Outcome(reason=exc.reason)
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            outcome = Outcome(reason=Reason.HANDSHAKE_FAILED, error=exc.__cause__ or exc)
        finally:
            await trio.aclose_forcefully(tls)
        await send.send(outcome)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            trio.serve_listeners, handle, await trio.open_tcp_listeners(0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield Listener(port=port, outcomes=receive)
        nursery.cancel_scope.cancel()


async def dial(
    port: int, context: ssl.SSLContext, *, server_org: str, server_trust: dict[str, PeerTrust]
) -> tuple[str, bytes]:
    """Connect, check the server's identity, read the greeting: (server org, greeting)."""
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname=server_org
    )
    try:
        await tls.do_handshake()
        server = verify_peer_certificate(peer_certificate_der(tls), server_trust, now=now())
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = await tls.receive_some(1024)
            if not chunk:
                break
            greeting += chunk
        return server, greeting
    finally:
        await trio.aclose_forcefully(tls)


def client_context(me: Identity, server: Org) -> ssl.SSLContext:
    return federation_client_context(
        cert_file=me.cert_file, key_file=me.key_file, peer_ca_pem=server.ca.cert_pem()
    )


@dataclass(frozen=True)
class World:
    """acme runs the listener; globex is its trusted peer; evil is trusted by nobody."""

    tmp_path: Path
    acme: Org
    globex: Org
    evil: Org
    acme_server: Identity
    globex_client: Identity

    async def good_client_gets_through(self, listener: Listener) -> None:
        server, greeting = await dial(
            listener.port,
            client_context(self.globex_client, self.acme),
            server_org="acme.example",
            server_trust=trust(self.acme),
        )
        assert server == "acme.example"
        assert greeting == b"hello globex.example\n"
        assert (await listener.outcomes.receive()).org == "globex.example"

    async def refused(self, listener: Listener, context: ssl.SSLContext) -> Outcome:
        """Dial with ``context``: the server must refuse, and the client must see no greeting."""
        try:
            _, greeting = await dial(
                listener.port, context, server_org="acme.example", server_trust=trust(self.acme)
            )
        except trio.BrokenResourceError:
            pass  # the server's alert, or its close without close_notify
        else:
            assert not greeting.startswith(HELLO)
        outcome = await listener.outcomes.receive()
        assert outcome.org is None
        return outcome


@pytest.fixture
def world(tmp_path: Path) -> World:
    acme, globex, evil = (
        make_org("acme.example"),
        make_org("globex.example"),
        make_org("evil.example"),
    )
    return World(
        tmp_path=tmp_path,
        acme=acme,
        globex=globex,
        evil=evil,
        acme_server=identity(tmp_path, acme.ca, "acme.example"),
        globex_client=identity(tmp_path, globex.ca, "globex.example"),
    )


def verify_error(outcome: Outcome) -> str:
    assert outcome.reason is Reason.HANDSHAKE_FAILED
    assert isinstance(outcome.error, ssl.SSLCertVerificationError), repr(outcome.error)
    return str(outcome.error.verify_message)


async def test_two_orgs_that_trust_each_other_learn_each_others_org(world: World) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, trust(world.globex)) as listener:
            await world.good_client_gets_through(listener)
            # And the other way round: globex serves, acme dials.
        globex_server = identity(world.tmp_path, world.globex.ca, "globex.example")
        acme_client = identity(world.tmp_path, world.acme.ca, "acme.example")
        async with serving(globex_server, trust(world.acme)) as listener:
            server, greeting = await dial(
                listener.port,
                client_context(acme_client, world.globex),
                server_org="globex.example",
                server_trust=trust(world.globex),
            )
            assert server == "globex.example"
            assert greeting == b"hello acme.example\n"
            outcome = await listener.outcomes.receive()
            assert outcome.org == "acme.example"


async def test_a_client_without_a_certificate_is_refused(world: World) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=world.acme.ca.cert_pem().decode())
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, trust(world.globex)) as listener:
            outcome = await world.refused(listener, context)
            assert outcome.reason is Reason.HANDSHAKE_FAILED
            assert isinstance(outcome.error, ssl.SSLError)
            assert outcome.error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
            await world.good_client_gets_through(listener)


async def test_a_client_of_an_untrusted_ca_is_refused(world: World) -> None:
    evil_client = identity(world.tmp_path, world.evil.ca, "evil.example")
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, trust(world.globex)) as listener:
            outcome = await world.refused(listener, client_context(evil_client, world.acme))
            assert "unable to get local issuer certificate" in verify_error(outcome)
            await world.good_client_gets_through(listener)


async def test_an_expired_client_is_refused(world: World) -> None:
    expired = identity(
        world.tmp_path,
        world.globex.ca,
        "globex.example",
        issued_at=now() - timedelta(days=100),
        days=30,
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, trust(world.globex)) as listener:
            outcome = await world.refused(listener, client_context(expired, world.acme))
            assert "expired" in verify_error(outcome)
            await world.good_client_gets_through(listener)


@pytest.mark.parametrize(
    ("claimed_org", "reason"),
    [
        ("initech.example", Reason.CERT_WRONG_CA),  # a peer, but not globex's to vouch for
        ("hooli.example", Reason.UNKNOWN_PEER),  # no peer at all
    ],
)
async def test_a_peer_ca_cannot_speak_for_a_third_org(
    world: World, claimed_org: str, reason: Reason
) -> None:
    initech = make_org("initech.example")
    forged = identity(world.tmp_path, world.globex.ca, claimed_org)
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, trust(world.globex, initech)) as listener:
            outcome = await world.refused(listener, client_context(forged, world.acme))
            assert outcome.reason is reason
            await world.good_client_gets_through(listener)


async def test_a_client_whose_key_is_not_pinned_is_refused(world: World) -> None:
    other_key = identity(world.tmp_path, world.globex.ca, "globex.example")
    pinned = trust(
        world.globex, pins={"globex.example": {spki_sha256(world.globex_client.issued.cert)}}
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, pinned) as listener:
            outcome = await world.refused(listener, client_context(other_key, world.acme))
            assert outcome.reason is Reason.PIN_MISMATCH
            await world.good_client_gets_through(listener)


async def test_a_server_with_no_peers_refuses_everyone(world: World) -> None:
    context = federation_server_context(
        cert_file=world.acme_server.cert_file,
        key_file=world.acme_server.key_file,
        trusted_ca_pems=[],
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, {}, context=context) as listener:
            outcome = await world.refused(listener, client_context(world.globex_client, world.acme))
            assert "unable to get local issuer certificate" in verify_error(outcome)


async def test_the_client_refuses_a_server_that_is_not_the_org_it_dialed(world: World) -> None:
    # acme's CA issued the server certificate, but the client dialed initech with acme's CA:
    # the name check of the client context refuses it before any identity code runs.
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, trust(world.globex)) as listener:
            with pytest.raises(trio.BrokenResourceError) as info:
                await dial(
                    listener.port,
                    client_context(world.globex_client, world.acme),
                    server_org="initech.example",
                    server_trust=trust(world.acme),
                )
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
            assert "Hostname mismatch" in str(info.value.__cause__.verify_message)
            await listener.outcomes.receive()  # the server saw the client give up
            await world.good_client_gets_through(listener)


async def test_peer_certificate_der_needs_a_handshake(world: World) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(world.acme_server, trust(world.globex)) as listener:
            stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
            tls = trio.SSLStream(
                stream,
                client_context(world.globex_client, world.acme),
                server_hostname="acme.example",
            )
            with pytest.raises(PeerAuthError) as info:
                peer_certificate_der(tls)
            assert info.value.reason is Reason.CERT_MISSING
            await trio.aclose_forcefully(tls)
            await listener.outcomes.receive()
