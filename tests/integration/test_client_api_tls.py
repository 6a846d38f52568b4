"""The client API's TLS on real sockets: TLS 1.3 by default, TLS 1.2 only with ECDHE + AEAD.

A TLS scanner once flagged the client API for offering TLS 1.2 with CBC
suites (LUCKY13). Here a real trio TLS server with the gateway's own context
meets clients that offer only what a scanner would try.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from gateway.pki import dev
from gateway.pki.tls import CLIENT_API_TLS12_CIPHERS, client_api_server_context

HOST = "127.0.0.1"
TIMEOUT = 10


@pytest.fixture
def ca_and_files(tmp_path: Path) -> tuple[dev.Issued, Path, Path]:
    now = datetime.now(UTC)
    ca = dev.issue_ca("acme.example", now=now)
    issued = dev.issue_client_api_cert(ca, HOST, now=now)
    cert, key = tmp_path / "client-api.pem", tmp_path / "client-api.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    key.chmod(0o600)  # the gateway refuses a key file open to group or others
    return ca, cert, key


@asynccontextmanager
async def serving(context: ssl.SSLContext) -> AsyncIterator[int]:
    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        try:
            with trio.move_on_after(TIMEOUT):
                await tls.do_handshake()
                await tls.send_all(b"hello\n")
        except trio.BrokenResourceError:
            pass  # the refusals under test
        finally:
            await trio.aclose_forcefully(tls)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            trio.serve_listeners, handle, await trio.open_tcp_listeners(0, host=HOST)
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def client(
    ca: dev.Issued, *, version: ssl.TLSVersion | None = None, ciphers: str | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.cert_pem().decode())
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


async def handshake(port: int, context: ssl.SSLContext) -> tuple[str, str] | None:
    """(protocol, cipher) of an accepted handshake, or None when refused."""
    tls = trio.SSLStream(await trio.open_tcp_stream(HOST, port), context, server_hostname=HOST)
    try:
        with trio.fail_after(TIMEOUT):
            await tls.do_handshake()
            assert await tls.receive_some(16) == b"hello\n"
        cipher = tls.cipher()
        assert cipher is not None
        return cipher[1], cipher[0]
    except trio.BrokenResourceError:
        return None
    finally:
        await trio.aclose_forcefully(tls)


# What a scanner offers: CBC suites (LUCKY13), static RSA key exchange, DHE.
CBC = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256:AES128-SHA"
STATIC_RSA = "AES128-GCM-SHA256:AES256-GCM-SHA384"
DHE = "DHE-RSA-AES128-GCM-SHA256"


async def test_by_default_only_tls_1_3(ca_and_files: tuple[dev.Issued, Path, Path]) -> None:
    ca, cert, key = ca_and_files
    async with serving(client_api_server_context(cert_file=cert, key_file=key)) as port:
        accepted = await handshake(port, client(ca))
        assert accepted is not None
        assert accepted[0] == "TLSv1.3"
        # A TLS 1.2 client is refused, whatever suite it offers.
        assert await handshake(port, client(ca, version=ssl.TLSVersion.TLSv1_2)) is None
        tls12_aead = client(ca, version=ssl.TLSVersion.TLSv1_2, ciphers=CLIENT_API_TLS12_CIPHERS)
        assert await handshake(port, tls12_aead) is None


async def test_tls_1_2_when_allowed_is_ecdhe_with_aead_only(
    ca_and_files: tuple[dev.Issued, Path, Path],
) -> None:
    ca, cert, key = ca_and_files
    context = client_api_server_context(cert_file=cert, key_file=key, min_version="1.2")
    tls12 = ssl.TLSVersion.TLSv1_2
    async with serving(context) as port:
        # A modern client still gets TLS 1.3.
        modern = await handshake(port, client(ca))
        assert modern is not None
        assert modern[0] == "TLSv1.3"
        # A TLS 1.2 client with a default offer gets an ECDHE AEAD suite.
        negotiated = await handshake(port, client(ca, version=tls12))
        assert negotiated is not None
        assert negotiated[0] == "TLSv1.2"
        assert negotiated[1].startswith("ECDHE-")
        assert negotiated[1] in CLIENT_API_TLS12_CIPHERS.split(":")
        assert ("GCM" in negotiated[1]) or ("CHACHA20" in negotiated[1])
        for offer in (CBC, STATIC_RSA, DHE):
            assert await handshake(port, client(ca, version=tls12, ciphers=offer)) is None, offer


def test_every_tls_1_2_suite_is_ecdhe_and_aead() -> None:
    for suite in CLIENT_API_TLS12_CIPHERS.split(":"):
        assert suite.startswith("ECDHE-")
        assert suite.endswith(("-GCM-SHA256", "-GCM-SHA384", "-CHACHA20-POLY1305"))


def test_an_unknown_minimum_is_refused(ca_and_files: tuple[dev.Issued, Path, Path]) -> None:
    _ca, cert, key = ca_and_files
    with pytest.raises(ValueError, match=r"one of 1\.2, 1\.3"):
        client_api_server_context(cert_file=cert, key_file=key, min_version="1.1")
