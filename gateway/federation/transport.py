"""Sending one transaction to one peer: the seam, and its lean h11 implementation.

The sender sees only :class:`PeerTransport`: ``send_transaction`` returns the
peer's per-envelope results, or raises :class:`TransportError` for anything
that leaves the envelopes undelivered and worth another try later. Every such
failure has a :class:`FailureKind`, a word from a small closed set that the
metrics and the backoff use; its message is ours (never the peer's text).

Theory of operation (:class:`H11PeerTransport`)
-----------------------------------------------
HTTP/1.1 on h11 over trio's ``SSLStream``, the same layer as our server
(:mod:`gateway.federation.h11client` speaks the HTTP; this module pools,
fails over and trusts; :mod:`~gateway.federation.outcomes` words failures and
answers; :mod:`~gateway.federation.pinning` checks pins). Until the seventh performance round this
was an ``httpx.AsyncClient`` per peer; the lean client costs ~0.5 ms less
CPU per transaction (about half of httpx's for a small one) and writes a
request's head and body in one TLS record (docs/performance.md, "Seventh
round"). ``HttpxPeerTransport`` remains as
another name of the class.

Per peer, one ``ssl.SSLContext`` from
:func:`~gateway.pki.tls.federation_client_context` that trusts only that
peer's CA and presents our gateway certificate, and up to
``connections_per_peer`` persistent connections (HTTP keep-alive): one per
transaction the sender may keep in flight, since HTTP/1.1 carries one request
at a time per connection; a request waits for a free one at most the timeout.
A kept connection is reused unless it has been idle for
:data:`KEEPALIVE_EXPIRY` or the server has closed it (its socket reads EOF);
an answer with ``Connection: close``, or any failure, closes it. If a kept
connection breaks before a byte of the answer arrives (the server closed it
as the request went), the request is written once more on a new connection:
harmless, since a transaction id makes a retry a replay (docs/protocol.md §5).

The client dials an ``endpoint`` the rules give (its host may be an IP
address; a peer running several gateway nodes may list several: the one that
worked last is tried first, and one that cannot be connected to is skipped
for the next at once, see :meth:`H11PeerTransport._exchange`) but verifies
the server as the **peer's org**: the handshake's ``server_hostname`` is the
org, so SNI is the org and OpenSSL's hostname check (the context has
``check_hostname``) wants the org as a dNSName SAN; ``Host`` names the
endpoint, as httpx wrote it.

When the rules pin the peer's key, the pin is checked **inside the
handshake**: the context's ``sslobject_class`` is a subclass of
``ssl.SSLObject`` whose ``do_handshake`` compares the server certificate's
SPKI digest with the pins as soon as OpenSSL has verified it, and fails the
handshake otherwise. The connection then breaks before our Finished message
leaves, so a server that fails the pin never sees our certificate or a byte
of the transaction. (Reading the certificate after the handshake would check
it only after the envelopes were sent.)

Before each request the peer's current entry in the rules (endpoint, CA,
pins) and our own certificate in use (``own``, when the app gives its
:class:`~gateway.tls_runtime.CertificateHolder`) are compared with those the
peer's connections were made for; if a reload changed either, a new context
and pool are made, so new trust and a renewed certificate apply from the next
transaction. The old pool is retired: its idle connections close at once,
requests already on it finish, then their connections close.
:meth:`H11PeerTransport.close_peer` does the same for a peer (the sender
calls it when a peer's lane stops).

Timeouts are httpx's, per phase: connect (TCP and handshake), write, each
read, and the wait for a free connection, each ``timeout`` seconds. Every
failure is translated here, at the edge, into the words httpx's failures got
(:func:`translate_error`); an answer is read up to :data:`MAX_ANSWER_BYTES`
only. Key lookups and version documents (:meth:`H11PeerTransport.get`) use
the same connections.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import trio
from prometheus_client import Counter

from gateway import __version__
from gateway.config import MAX_INFLIGHT_TRANSACTIONS
from gateway.core.rules import CompiledRules, Peer
from gateway.errors import PKIError, Reason
from gateway.federation.h11client import (
    Answer,
    ConnectError,
    Connection,
    ConnectionLost,
    Endpoint,
    LeanHTTPError,
    OpenTCP,
    PoolTimeout,
    exchange,
    open_connection,
)
from gateway.federation.outcomes import (
    MAX_RETRY_AFTER_SECONDS,
    REASON_CODES,
    FailureKind,
    TransportError,
    interpret_answer,
    parse_retry_after,
    translate_error,
    translate_httpx_error,
)
from gateway.federation.pinning import PinMismatchError, pinned_sslobject_class
from gateway.federation.protocol import (
    MEDIA_TYPE_JSON,
    TRANSACTIONS_PATH,
    EnvelopeResult,
    check_txn_id,
)
from gateway.observability.metrics import PEER_ENDPOINT_FAILOVERS, bounded
from gateway.pki.certs import parse_pin
from gateway.pki.own import OwnCertificate
from gateway.pki.tls import federation_client_context

# The seam's words, re-exported where the sender, the app and tests have always
# found them (they live in outcomes.py and pinning.py).
__all__ = [
    "MAX_RETRY_AFTER_SECONDS",
    "REASON_CODES",
    "FailureKind",
    "H11PeerTransport",
    "HttpxPeerTransport",
    "PeerTransport",
    "PinMismatchError",
    "TransportError",
    "interpret_answer",
    "parse_retry_after",
    "pinned_sslobject_class",
    "translate_error",
    "translate_httpx_error",
]

LOGGER = logging.getLogger("gateway.federation.transport")

DEFAULT_REQUEST_TIMEOUT: Final = 30.0  # seconds per phase: connect, write, read
# Below the receiver's idle keep-alive (60 s, docs/protocol.md §8), so we close
# an idle connection before the peer does and never write into a dying one.
KEEPALIVE_EXPIRY: Final = 50.0
# One connection per transaction the sender may keep in flight to a peer (below the
# receiver's default cap of 16 connections per peer, gateway/http/limits.py).
MAX_CONNECTIONS_PER_PEER: Final = MAX_INFLIGHT_TRANSACTIONS
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024  # 1000 results of ~100 bytes, with room to spare
CLOSE_TIMEOUT: Final = 5.0  # closing a client never holds up a reload or shutdown longer
USER_AGENT: Final = f"federation-gateway/{__version__}"


class PeerTransport(Protocol):
    """How the sender reaches peers. A fake stands in for it in tests."""

    async def send_transaction(
        self,
        peer: str,
        txn_id: str,
        body: bytes,
        *,
        expected: int,
        content_type: str = MEDIA_TYPE_JSON,
    ) -> list[EnvelopeResult]:
        """PUT one transaction; exactly ``expected`` results, in order, or ``TransportError``.

        ``content_type`` is the body's framing (docs/protocol.md §3a); the
        sender passes it only for a body that is not JSON.
        """
        ...

    async def close_peer(self, peer: str) -> None:
        """Drop any connection held for ``peer`` (its lane stopped)."""
        ...


class RulesView(Protocol):
    """Where the rules in force are read (``RulesHolder`` is one)."""

    @property
    def current(self) -> CompiledRules: ...


class OwnView(Protocol):
    """Where our certificate in use is read (``CertificateHolder`` is one)."""

    @property
    def current(self) -> OwnCertificate: ...


# -- the lean h11 transport ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Link:
    """What a peer's client was built for; a reload that changes it rebuilds the client."""

    endpoints: tuple[str, ...]
    ca_sha256: str
    pins: tuple[str, ...]
    own_sha256: str  # our certificate pair presented ("" when read from files)

    @classmethod
    def of(cls, peer: Peer, own: OwnCertificate | None) -> _Link:
        return cls(
            endpoints=tuple(endpoint.rstrip("/") for endpoint in peer.endpoints),
            ca_sha256=peer.ca_sha256,
            pins=peer.pins,
            own_sha256=own.sha256 if own is not None else "",
        )


class _PeerClient:
    """A peer's TLS context, its idle connections and how many requests are on it.

    ``slots`` bounds the connections: a request holds one from before it takes
    a connection until it gives it back, so at most ``connections_per_peer``
    exist at once (idle ones count only while in ``idle``, which never holds
    more than that).
    """

    __slots__ = ("context", "current", "endpoints", "idle", "inflight", "link", "retired", "slots")

    def __init__(
        self, link: _Link, context: ssl.SSLContext, endpoints: tuple[Endpoint, ...], size: int
    ) -> None:
        self.link = link
        self.context = context
        self.endpoints = endpoints
        self.slots = trio.Semaphore(size)
        self.idle: list[Connection] = []  # the last one given back at the end
        self.inflight = 0
        self.retired = False
        self.current = 0  # the endpoint tried first: the last one that worked


class H11PeerTransport:
    """:class:`PeerTransport` over mTLS: h11 on trio's ``SSLStream``, persistent connections.

    Each peer gets up to ``connections_per_peer`` persistent connections: one
    per transaction the sender may have in flight to that peer (HTTP/1.1
    carries one request at a time per connection).
    """

    def __init__(
        self,
        org: str,
        cert_file: Path | None,
        key_file: Path | None,
        rules: RulesView,
        *,
        own: OwnView | None = None,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        connections_per_peer: int = 1,
        open_tcp: OpenTCP | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_answer_bytes < 1:
            raise ValueError(f"max_answer_bytes must be positive, got {max_answer_bytes!r}")
        if not 1 <= connections_per_peer <= MAX_CONNECTIONS_PER_PEER:
            raise ValueError(
                f"connections_per_peer must be within 1..{MAX_CONNECTIONS_PER_PEER}, "
                f"got {connections_per_peer!r}"
            )
        self.org = org
        # One persistent connection per transaction the sender keeps in flight.
        self._connections_per_peer = connections_per_peer
        if own is None and (cert_file is None or key_file is None):
            raise ValueError("give cert_file and key_file, or own")
        self._cert_file = cert_file
        self._key_file = key_file
        self._own = own
        self._rules = rules
        self._timeout = timeout
        self._max_answer_bytes = max_answer_bytes
        # How a TCP connection is opened (a test may hand in-memory streams instead).
        self._open_tcp: OpenTCP = open_tcp if open_tcp is not None else _open_tcp
        self._clients: dict[str, _PeerClient] = {}

    @property
    def peers_connected(self) -> frozenset[str]:
        """Peers that have a client (not necessarily an open connection)."""
        return frozenset(self._clients)

    async def send_transaction(
        self,
        peer: str,
        txn_id: str,
        body: bytes,
        *,
        expected: int,
        content_type: str = MEDIA_TYPE_JSON,
    ) -> list[EnvelopeResult]:
        check_txn_id(txn_id)
        client = await self._client_for(peer)
        client.inflight += 1
        try:
            answer = await self._exchange(
                client,
                peer,
                "PUT",
                f"{TRANSACTIONS_PATH}{txn_id}",
                (
                    ("content-type", content_type),
                    ("accept", MEDIA_TYPE_JSON),
                    ("user-agent", USER_AGENT),
                ),
                body,
                limit=self._max_answer_bytes,
            )
        finally:
            await self._release(client)
        return interpret_answer(
            peer,
            answer.status,
            answer.body,
            expected=expected,
            retry_after=answer.headers.get("retry-after"),
        )

    async def get(self, peer: str, path: str, *, max_bytes: int) -> tuple[int, bytes]:
        """``GET path`` on the peer's persistent mTLS connections: (status, body).

        The same connections, SNI and in-handshake pin check as transactions.
        The body is read up to ``max_bytes`` only (``TransportError`` beyond);
        every failure is translated. The status is the caller's to judge.
        """
        if not path.startswith("/federation/"):
            raise ValueError(f"not a federation path: {path!r}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
        client = await self._client_for(peer)
        client.inflight += 1
        try:
            answer = await self._exchange(
                client,
                peer,
                "GET",
                path,
                (("accept", "application/json"), ("user-agent", USER_AGENT)),
                None,
                limit=max_bytes,
            )
        finally:
            await self._release(client)
        return answer.status, answer.body

    async def _exchange(
        self,
        client: _PeerClient,
        peer: str,
        method: str,
        path: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes | None,
        *,
        limit: int,
    ) -> Answer:
        """One request on one of the peer's endpoints, translated: the answer read.

        The endpoint that worked last goes first. One that cannot be connected
        to (refused, unreachable, a connect timeout, a failed handshake) has
        received nothing of the request, so the next one is tried at once; the
        one that answers is kept for the next request (docs/protocol.md §1).
        Anything after the request was sent is this request's failure, with
        one exception: a kept-alive connection that the server had closed
        while it was idle (it broke before a byte of an answer came) is
        replaced by a new one and the request written once more, which a
        transaction id makes harmless (docs/protocol.md §5).
        """
        try:
            with trio.move_on_after(self._timeout) as waiting:
                await client.slots.acquire()
            if waiting.cancelled_caught:
                raise PoolTimeout(f"no connection to {peer} free within {self._timeout} s")
        except LeanHTTPError as exc:
            raise translate_error(exc, peer) from exc
        try:
            return await self._exchange_on_endpoints(
                client, peer, method, path, headers, body, limit=limit
            )
        finally:
            client.slots.release()

    async def _exchange_on_endpoints(
        self,
        client: _PeerClient,
        peer: str,
        method: str,
        path: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes | None,
        *,
        limit: int,
    ) -> Answer:
        endpoints = client.endpoints
        first = client.current
        failed: LeanHTTPError | None = None
        for step in range(len(endpoints)):
            index = (first + step) % len(endpoints)
            try:
                answer = await self._request(
                    client, peer, index, method, path, headers, body, limit=limit
                )
            except ConnectError as exc:
                failed = exc
                if len(endpoints) > 1:
                    LOGGER.warning(
                        "%s: cannot connect to %s (%s); trying the next endpoint",
                        peer,
                        endpoints[index].url,
                        translate_error(exc, peer).kind.value,
                        extra={"event": "peer_endpoint_failed", "peer": peer},
                    )
                continue
            except LeanHTTPError as exc:
                raise translate_error(exc, peer) from exc
            if index != client.current:
                client.current = index
                self._failovers(peer).inc()
                LOGGER.warning(
                    "%s: now using endpoint %s",
                    peer,
                    endpoints[index].url,
                    extra={"event": "peer_endpoint_switched", "peer": peer},
                )
            return answer
        assert failed is not None  # endpoints is never empty
        error = translate_error(failed, peer)
        if len(endpoints) > 1:
            error = TransportError(
                f"{error.message} (and every other of its {len(endpoints)} endpoints)",
                kind=error.kind,
                reason=error.reason,
            )
        raise error from failed

    async def _request(
        self,
        client: _PeerClient,
        peer: str,
        index: int,
        method: str,
        path: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes | None,
        *,
        limit: int,
    ) -> Answer:
        """The request on a kept connection to endpoint ``index``, or on a new one."""
        conn = await self._take_idle(client, index)
        fresh = conn is None
        if conn is None:
            conn = await self._dial(client, peer, index)
        while True:
            answered = False
            try:
                answer = await exchange(
                    conn, method, path, headers, body, limit=limit, phase_timeout=self._timeout
                )
                answered = True
            except ConnectionLost as exc:
                if fresh or not exc.before_answer:
                    raise
                LOGGER.debug("%s: a kept connection was closed by the server; a new one", peer)
                fresh = True
            finally:
                if not answered:
                    await trio.aclose_forcefully(conn.stream)
            if answered:
                break
            conn = await self._dial(client, peer, index)
        if answer.reusable and not client.retired:
            conn.idle_since = trio.current_time()
            client.idle.append(conn)
        else:
            await conn.aclose(within=CLOSE_TIMEOUT)
        return answer

    async def _take_idle(self, client: _PeerClient, index: int) -> Connection | None:
        """The most recently used kept connection to endpoint ``index`` still good, if any.

        Kept connections to other endpoints (after a failover), idle longer
        than :data:`KEEPALIVE_EXPIRY`, or that the server has closed, are closed.
        """
        now = trio.current_time()
        found: Connection | None = None
        stale: list[Connection] = []
        keep: list[Connection] = []
        for conn in reversed(client.idle):
            if conn.index != index or now - conn.idle_since > KEEPALIVE_EXPIRY or conn.dropped():
                stale.append(conn)
            elif found is None:
                found = conn
            else:
                keep.append(conn)
        keep.reverse()
        client.idle = keep
        for conn in stale:
            await conn.aclose(within=CLOSE_TIMEOUT)
        return found

    async def _dial(self, client: _PeerClient, peer: str, index: int) -> Connection:
        return await open_connection(
            client.endpoints[index],
            index,
            client.context,
            server_hostname=peer,  # SNI and the name checked: the org, whatever host we dial
            phase_timeout=self._timeout,
            open_tcp=self._open_tcp,
        )

    def _failovers(self, peer: str) -> Counter:
        return PEER_ENDPOINT_FAILOVERS.labels(bounded(peer, self._rules.current.peers))

    async def _client_for(self, peer: str) -> _PeerClient:
        entry = self._rules.current.peer(peer)
        if entry is None:
            await self.close_peer(peer)
            raise TransportError(
                f"{peer} is not a peer in the rules in force",
                kind=FailureKind.UNKNOWN_PEER,
                reason=Reason.UNKNOWN_PEER,
            )
        own = self._own.current if self._own is not None else None
        link = _Link.of(entry, own)
        existing = self._clients.get(peer)
        if existing is not None:
            if existing.link == link:
                return existing
            LOGGER.info(
                "%s: %s changed; new connections from now on",
                peer,
                "our certificate"
                if existing.link.own_sha256 != link.own_sha256
                else "endpoint or trust in the rules",
            )
            del self._clients[peer]
            await self._retire(existing)
        try:
            endpoints = tuple(Endpoint.parse(url) for url in link.endpoints)
        except ValueError as exc:  # the rules loader checked them; a bug if we get here
            raise TransportError(
                f"{peer}: the endpoint URL cannot be used: {exc}", kind=FailureKind.LOCAL
            ) from exc
        client = _PeerClient(
            link, self._context_for(entry, own), endpoints, self._connections_per_peer
        )
        self._clients[peer] = client
        return client

    def _context_for(self, peer: Peer, own: OwnCertificate | None) -> ssl.SSLContext:
        try:
            context = federation_client_context(
                cert_file=self._cert_file,
                key_file=self._key_file,
                own=own,
                peer_ca_pem=peer.ca_pem.encode("ascii"),
            )
        except PKIError as exc:
            raise TransportError(
                f"{peer.org}: cannot build the TLS context: {exc}",
                kind=FailureKind.LOCAL,
                reason=Reason.PKI,
            ) from exc
        if peer.pins:
            try:
                digests = frozenset(parse_pin(pin) for pin in peer.pins)
            except ValueError as exc:  # the rules loader checked them; a bug if we get here
                raise TransportError(
                    f"{peer.org}: {exc}", kind=FailureKind.LOCAL, reason=Reason.RULES
                ) from exc
            context.sslobject_class = pinned_sslobject_class(digests, org=peer.org)
        return context

    async def _release(self, client: _PeerClient) -> None:
        client.inflight -= 1
        if client.retired and client.inflight == 0:
            await self._close_idle(client)

    async def _retire(self, client: _PeerClient) -> None:
        """No new requests on ``client``; its idle connections close now, busy ones when done."""
        client.retired = True
        await self._close_idle(client)

    @staticmethod
    async def _close_idle(client: _PeerClient) -> None:
        idle, client.idle = client.idle, []
        for conn in idle:
            await conn.aclose(within=CLOSE_TIMEOUT)

    async def close_peer(self, peer: str) -> None:
        client = self._clients.pop(peer, None)
        if client is None:
            return
        await self._retire(client)

    async def aclose(self) -> None:
        """Close every peer's connections (requests on them finish first)."""
        for peer in list(self._clients):
            await self.close_peer(peer)


# The name the app and tests have used since the transport was on httpx.
HttpxPeerTransport = H11PeerTransport


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)
