"""Whom the federation listener lets in: the peers of the rules in force.

Theory of operation
-------------------
Two checks stand between a TCP connection and the receiver, both derived from
the current rules (a :class:`RulesSource`, normally the app's
:class:`~gateway.rules_runtime.RulesHolder`):

1. **The TLS handshake** (OpenSSL): the server context built by
   :meth:`FederationTrust.server_context` trusts every peer's CA at once, and
   nothing else. A certificate from any other CA never completes a handshake.
2. **identify** (ours, right after the handshake): :meth:`FederationTrust.identify`
   runs :func:`~gateway.pki.identity.verify_peer_certificate` against the
   :class:`~gateway.pki.identity.PeerTrust` of every peer, which adds what
   OpenSSL cannot know: the certificate's org is a peer *now*, its issuer is
   *that peer's* CA (globex's CA cannot vouch for initech), and its key
   matches the peer's pins if any. The certificate may chain through
   intermediate CAs the peer presents after it, but only up to *that peer's*
   CA(s). Its answer becomes ``request.peer``.

Both are built once per rules object (compared by identity, as
``RulesHolder`` swaps a new object in on every reload) and kept, so a
connection costs no PEM parsing. ``identify`` always reads ``rules.current``,
so the moment new rules are swapped in, a dropped peer's next handshake is
refused by identify even before the server context is replaced.

On a reload the app calls :func:`follow_reloads` once at start-up; after each
swap that drops peers it installs the new server context with
``server.set_ssl_context`` (new connections only) and closes the dropped
peers' open connections with ``server.close_peer_connections``.

The gateway's own certificate comes from an :class:`OwnSource` (normally the
app's :class:`~gateway.tls_runtime.CertificateHolder`) when one is given: the
server context is then built per (rules, certificate pair) from the checked
bytes, and :func:`follow_certificate` installs a new one after the pair is
renewed. Open connections keep the pair they were made with.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import trio

from gateway.core.rules import CompiledRules
from gateway.pki.identity import (
    PeerTrust,
    peer_certificate_der,
    peer_intermediates_der,
    verify_peer_certificate,
)
from gateway.pki.own import OwnCertificate
from gateway.pki.tls import federation_server_context

LOGGER = logging.getLogger("gateway.federation")

MS_PER_SECOND = 1000
NS_PER_MS = 1_000_000


class RulesSource(Protocol):
    """Where the rules in force are read, once per decision (``RulesHolder`` is one)."""

    @property
    def current(self) -> CompiledRules: ...


class ReloadNotifier(RulesSource, Protocol):
    """A rules source that tells subscribers which peers a reload dropped."""

    def subscribe(self, callback: Callable[[frozenset[str]], object]) -> Callable[[], None]: ...


class OwnSource(Protocol):
    """Where the gateway's own certificate in use is read (``CertificateHolder`` is one)."""

    @property
    def current(self) -> OwnCertificate: ...


class OwnNotifier(OwnSource, Protocol):
    def subscribe(self, callback: Callable[[OwnCertificate], object]) -> Callable[[], None]: ...


class PeerListener(Protocol):
    """The part of :class:`~gateway.http.HTTPServer` a reload acts on."""

    def set_ssl_context(self, ssl_context: ssl.SSLContext) -> None: ...

    def close_peer_connections(self, org: str) -> int: ...


def system_clock_ms() -> int:
    """The real wall clock in Unix ms: the default where a clock is injected."""
    return time.time_ns() // NS_PER_MS


def peer_trust(rules: CompiledRules) -> dict[str, PeerTrust]:
    """The :class:`PeerTrust` of every peer of ``rules`` (CA certificate(s) and pins)."""
    return {
        org: PeerTrust.from_pem(
            org,
            peer.ca_pem.encode("ascii"),
            pins=peer.pins,
            source=f"rules peer {org}",
        )
        for org, peer in rules.peers.items()
    }


@dataclass(frozen=True, slots=True)
class _Built:
    rules: CompiledRules
    peers: Mapping[str, PeerTrust]


class FederationTrust:
    """The federation listener's trust, following the rules in force; see the module doc."""

    def __init__(
        self,
        rules: RulesSource,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        own: OwnSource | None = None,
        clock_ms: Callable[[], int] = system_clock_ms,
    ) -> None:
        if own is None and (cert_file is None or key_file is None):
            raise ValueError("give cert_file and key_file, or own")
        self._rules = rules
        self._cert_file = cert_file
        self._key_file = key_file
        self._own = own
        self._clock_ms = clock_ms
        self._peers: _Built | None = None
        self._context: tuple[CompiledRules, OwnCertificate | None, ssl.SSLContext] | None = None

    def peers(self, rules: CompiledRules | None = None) -> Mapping[str, PeerTrust]:
        """The peers' trust for ``rules`` (default: the current rules), built once per rules."""
        rules = self._rules.current if rules is None else rules
        built = self._peers
        if built is None or built.rules is not rules:
            built = _Built(rules, peer_trust(rules))
            self._peers = built
        return built.peers

    def server_context(self, rules: CompiledRules | None = None) -> ssl.SSLContext:
        """The mTLS server context trusting exactly the peers' CAs, built once per rules.

        ``PKIError`` if the gateway's certificate or key cannot be loaded.
        """
        rules = self._rules.current if rules is None else rules
        own = self._own.current if self._own is not None else None
        cached = self._context
        if cached is not None and cached[0] is rules and cached[1] is own:
            return cached[2]
        context = federation_server_context(
            cert_file=self._cert_file,
            key_file=self._key_file,
            own=own,
            trusted_ca_pems=[peer.ca_pem.encode("ascii") for peer in rules.peers.values()],
        )
        self._context = (rules, own, context)
        return context

    def update(self, rules: CompiledRules | None = None) -> ssl.SSLContext:
        """Build the trust for ``rules`` (default: current) now; return its server context."""
        self.peers(rules)
        return self.server_context(rules)

    def identify(self, stream: trio.SSLStream[Any]) -> str:
        """The org the client certificate proves, or ``PeerAuthError`` (for ``HTTPServer``)."""
        now = datetime.fromtimestamp(self._clock_ms() / MS_PER_SECOND, tz=UTC)
        return verify_peer_certificate(
            peer_certificate_der(stream),
            self.peers(),
            now=now,
            intermediates=peer_intermediates_der(stream),
        )


def follow_reloads(
    holder: ReloadNotifier, trust: FederationTrust, server: PeerListener
) -> Callable[[], None]:
    """Keep ``server`` in line with ``holder``'s rules; returns the unsubscribe function.

    After a reload that drops peers: the new server context goes in first (so
    no new handshake of theirs completes), then their open connections close.
    If the new context cannot be built, the old one stays, the failure is
    logged, and the connections still close: identify refuses those peers
    anyway, as it reads the current rules.
    """

    def on_dropped(dropped: frozenset[str]) -> None:
        try:
            server.set_ssl_context(trust.update(holder.current))
        except Exception:
            LOGGER.exception("federation listener: cannot build the TLS context of the new rules")
        for org in sorted(dropped):
            closed = server.close_peer_connections(org)
            LOGGER.info(
                "peer %s left the rules: %d open connection(s) closed",
                org,
                closed,
                extra={"event": "peer_dropped", "peer": org, "connections_closed": closed},
            )

    return holder.subscribe(on_dropped)


def follow_certificate(
    holder: OwnNotifier, trust: FederationTrust, server: PeerListener
) -> Callable[[], None]:
    """After the gateway's certificate is renewed, new connections get the new pair.

    The holder has checked the pair; if the context still cannot be built, the
    old one stays and the failure is logged. Returns the unsubscribe function.
    """

    def on_renewed(own: OwnCertificate) -> None:
        try:
            server.set_ssl_context(trust.update())
        except Exception:
            LOGGER.exception("federation listener: cannot build the TLS context of the new pair")
            return
        LOGGER.info("federation listener: new connections get %s", own.describe())

    return holder.subscribe(on_renewed)
