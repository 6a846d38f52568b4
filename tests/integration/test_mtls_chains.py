"""Real PKIs on real sockets: peers whose certificates chain through intermediates.

Each test mints root -> intermediate(s) -> leaf hierarchies with cryptography
(:mod:`tests.chains_for_tests`), writes the gateway-side files, and does real
TLS 1.3 mTLS handshakes on 127.0.0.1 with the gateway's own contexts
(:mod:`gateway.pki.tls`). The listener identifies each client as the federation
listener does (:meth:`gateway.federation.trust.FederationTrust.identify`): the
leaf, the intermediates it presented, and the trust of every peer.

The refusals come in two kinds: OpenSSL refuses during the handshake (a
missing or expired intermediate, a leaf signed by a non-CA), or the handshake
completes against *some* peer's root and our identity check refuses (an
intermediate under globex's root vouching for initech).
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
from gateway.http.tls import classify_handshake_error
from gateway.pki.identity import (
    PeerTrust,
    peer_certificate_der,
    peer_intermediates_der,
    verify_peer_certificate,
)
from gateway.pki.tls import federation_client_context, federation_server_context
from tests.chains_for_tests import Node

TEST_TIMEOUT = 30
HELLO = b"hello "


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Outcome:
    org: str | None = None
    reason: Reason | None = None


@dataclass(frozen=True)
class Listener:
    port: int
    outcomes: trio.MemoryReceiveChannel[Outcome]


def identify(tls: trio.SSLStream[trio.SocketStream], peers: dict[str, PeerTrust]) -> str:
    return verify_peer_certificate(
        peer_certificate_der(tls), peers, now=now(), intermediates=peer_intermediates_der(tls)
    )


@asynccontextmanager
async def serving(
    cert_file: Path, key_file: Path, peers: dict[str, PeerTrust]
) -> AsyncIterator[Listener]:
    context = federation_server_context(
        cert_file=cert_file,
        key_file=key_file,
        trusted_ca_pems=[
            ca.public_bytes(Encoding.PEM) for peer in peers.values() for ca in peer.cas
        ],
    )
    send, receive = trio.open_memory_channel[Outcome](16)

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        outcome: Outcome
        try:
            with trio.fail_after(10):
                await tls.do_handshake()
            org = identify(tls, peers)
            await tls.send_all(HELLO + org.encode() + b"\n")
            outcome = Outcome(org=org)
        except PeerAuthError as exc:
            outcome = Outcome(reason=exc.reason)
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            outcome = Outcome(reason=classify_handshake_error(exc))
        finally:
            await trio.aclose_forcefully(tls)
        await send.send(outcome)

    # A hang fails the test instead of blocking the suite.
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                trio.serve_listeners, handle, await trio.open_tcp_listeners(0, host="127.0.0.1")
            )
            yield Listener(port=listeners[0].socket.getsockname()[1], outcomes=receive)
            nursery.cancel_scope.cancel()


async def dial(port: int, context: ssl.SSLContext, *, server_org: str) -> bytes:
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname=server_org
    )
    try:
        await tls.do_handshake()
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = await tls.receive_some(1024)
            if not chunk:
                break
            greeting += chunk
        return greeting
    finally:
        await trio.aclose_forcefully(tls)


@dataclass(frozen=True)
class World:
    """acme listens; globex and initech are its peers, each with root -> intermediate."""

    tmp: Path
    acme_root: Node
    acme_server: tuple[Path, Path]
    globex_root: Node
    globex_issuing: Node
    initech_root: Node
    initech_issuing: Node

    def peers(self) -> dict[str, PeerTrust]:
        return {
            "globex.example": PeerTrust(org="globex.example", cas=(self.globex_root.cert,)),
            "initech.example": PeerTrust(org="initech.example", cas=(self.initech_root.cert,)),
        }

    def client(self, leaf: Node, stem: str, *, present: list[Node] | None = None) -> ssl.SSLContext:
        cert, key = leaf.write(self.tmp, stem, present=present)
        return federation_client_context(
            cert_file=cert, key_file=key, peer_ca_pem=self.acme_root.pem
        )

    async def outcome_of(self, listener: Listener, context: ssl.SSLContext) -> Outcome:
        try:
            greeting = await dial(listener.port, context, server_org="acme.example")
        except trio.BrokenResourceError:
            greeting = b""
        outcome = await listener.outcomes.receive()
        if outcome.org is None:
            assert not greeting.startswith(HELLO)
        else:
            assert greeting == HELLO + outcome.org.encode() + b"\n"
        return outcome

    async def globex_gets_through(self, listener: Listener) -> None:
        leaf = self.globex_issuing.leaf("globex.example")
        outcome = await self.outcome_of(listener, self.client(leaf, "globex-good"))
        assert outcome == Outcome(org="globex.example")


@pytest.fixture
def world(tmp_path: Path) -> World:
    acme_root = Node.root("acme root")
    acme_server = acme_root.ca("acme issuing").leaf("acme.example").write(tmp_path, "acme")
    globex_root = Node.root("globex root")
    initech_root = Node.root("initech root")
    return World(
        tmp=tmp_path,
        acme_root=acme_root,
        acme_server=acme_server,
        globex_root=globex_root,
        globex_issuing=globex_root.ca("globex issuing"),
        initech_root=initech_root,
        initech_issuing=initech_root.ca("initech issuing"),
    )


async def test_leaf_through_intermediates_identifies_its_org_both_ways(world: World) -> None:
    """Both sides present leaf + intermediate; each trusts only the other's root."""
    async with serving(*world.acme_server, world.peers()) as listener:
        await world.globex_gets_through(listener)
        # Two intermediates deep, presented in the wrong order: still found.
        deep = world.initech_issuing.ca("initech team").leaf("initech.example")
        context = world.client(deep, "initech-deep", present=list(reversed(deep.chain()[1:])))
        assert await world.outcome_of(listener, context) == Outcome(org="initech.example")


async def test_peer_with_two_roots_during_a_rollover(world: World) -> None:
    new_root = Node.root("globex root 2027")
    peers = world.peers()
    peers["globex.example"] = PeerTrust(
        org="globex.example", cas=(world.globex_root.cert, new_root.cert)
    )
    async with serving(*world.acme_server, peers) as listener:
        await world.globex_gets_through(listener)  # the old root's hierarchy
        leaf = new_root.ca("globex issuing 2027").leaf("globex.example")
        assert await world.outcome_of(listener, world.client(leaf, "globex-new")) == Outcome(
            org="globex.example"
        )


async def test_intermediate_of_another_partners_root_cannot_vouch_for_an_org(
    world: World,
) -> None:
    """globex's intermediate issues a certificate that says initech: OpenSSL accepts the
    chain (globex's root is trusted), the identity check refuses it."""
    forged = world.globex_issuing.leaf("initech.example")
    async with serving(*world.acme_server, world.peers()) as listener:
        outcome = await world.outcome_of(listener, world.client(forged, "forged"))
        assert outcome == Outcome(reason=Reason.CERT_WRONG_CA)
        # Presenting initech's real intermediate beside it changes nothing.
        context = world.client(
            forged, "forged2", present=[world.initech_issuing, world.globex_issuing]
        )
        assert await world.outcome_of(listener, context) == Outcome(reason=Reason.CERT_WRONG_CA)
        await world.globex_gets_through(listener)


async def test_broken_chains_are_refused_and_others_still_served(world: World) -> None:
    not_a_ca = world.globex_issuing.leaf("globex.example")
    under_a_leaf = not_a_ca.leaf("globex.example")
    expired = world.globex_root.ca(
        "globex old issuing",
        not_before=now() - timedelta(days=30),
        not_after=now() - timedelta(days=1),
    ).leaf("globex.example", not_before=now() - timedelta(days=2))
    missing = world.globex_issuing.leaf("globex.example")
    cases = {
        "under_a_leaf": (under_a_leaf, None, Reason.CERT_UNTRUSTED),
        "expired_intermediate": (expired, None, Reason.CERT_EXPIRED),
        "missing_intermediate": (missing, [], Reason.CERT_UNTRUSTED),
    }
    async with serving(*world.acme_server, world.peers()) as listener:
        for stem, (leaf, present, reason) in cases.items():
            outcome = await world.outcome_of(listener, world.client(leaf, stem, present=present))
            assert outcome == Outcome(reason=reason), stem
            await world.globex_gets_through(listener)


async def test_server_chain_with_another_org_in_its_san_fails_the_client(world: World) -> None:
    """Dialing acme, the server presents a good chain under acme's root for the wrong name."""
    wrong = world.acme_root.ca("acme issuing 2").leaf("other.example").write(world.tmp, "wrong")
    async with serving(*wrong, world.peers()) as listener:
        leaf = world.globex_issuing.leaf("globex.example")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await dial(listener.port, world.client(leaf, "globex"), server_org="acme.example")
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
        assert "hostname mismatch" in str(caught.value.__cause__).lower()


async def test_client_refuses_a_server_chain_under_another_root(world: World) -> None:
    """The federation client trusts only the dialed peer's root: a chain to globex's root
    naming acme is refused even though the name matches."""
    impostor = world.globex_issuing.leaf("acme.example").write(world.tmp, "impostor")
    async with serving(*impostor, world.peers()) as listener:
        leaf = world.globex_issuing.leaf("globex.example")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await dial(listener.port, world.client(leaf, "globex"), server_org="acme.example")
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
