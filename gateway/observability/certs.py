"""Certificate expiry as metrics: ``gateway_certificate_not_after_timestamp_seconds``.

Theory of operation
-------------------
One gauge, labelled ``certificate``, whose values come from a bounded set:

* the gateway's own certificates, under fixed names (:data:`FEDERATION`,
  :data:`CLIENT_API`, :data:`ORG_CA`): the first two are set by their
  :class:`~gateway.tls_runtime.CertificateHolder` from the pair *in use*
  (a bad file on disk is not in use), the org CA is read from its file;
* each peer's CA, under the peer's org name, taken from the rules in force
  (``Peer.ca_pem``, already in memory and validated by the rules loader).

A file may hold a chain: the gauge shows the *earliest* ``notAfter`` in it,
since the chain stops working when its first certificate expires.

:class:`CertificateGauges` remembers which peer labels it set, so a peer that
leaves the rules loses its series instead of leaving a stale one behind (and
an alert on it firing forever). Peers are refreshed on every rules reload
(:meth:`CertificateGauges.follow`); own files given to the periodic gauge
refresher (:mod:`gateway.observability.gauges`; the app gives it the org CA
file, which a CA rollover changes) are re-read there. A file that cannot be
read or parsed keeps its last value and counts
``gateway_certificate_read_errors_total``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509

from gateway.core.rules import CompiledRules
from gateway.errors import PKIError
from gateway.observability.metrics import CERTIFICATE_NOT_AFTER, CERTIFICATE_READ_ERRORS
from gateway.pki.certs import load_certificates_pem

LOGGER = logging.getLogger("gateway.observability.certs")

FEDERATION: Final = "federation"  # our federation (mTLS) certificate
CLIENT_API: Final = "client_api"  # the client API's server certificate, when TLS is on
ORG_CA: Final = "org_ca"  # the org's CA, which partners pin in their rules
OWN_CERTIFICATES: Final = frozenset({FEDERATION, CLIENT_API, ORG_CA})


class RulesSubscribable(Protocol):
    """What :meth:`CertificateGauges.follow` needs of a rules holder."""

    @property
    def current(self) -> CompiledRules: ...

    def subscribe(self, callback: Callable[[frozenset[str]], object]) -> Callable[[], None]: ...


def earliest_not_after(pem: bytes, *, source: str) -> float:
    """Unix seconds of the earliest ``notAfter`` among the certificates in ``pem``.

    ``PKIError`` naming ``source`` when ``pem`` holds no certificate.
    """
    certs = load_certificates_pem(pem, source=source)
    return min(_not_after(cert) for cert in certs)


def _not_after(cert: x509.Certificate) -> float:
    return cert.not_valid_after_utc.timestamp()


def read_own_not_after(files: Mapping[str, Path]) -> dict[str, float | None]:
    """``{name: not_after}`` for each own certificate file; ``None`` where it failed.

    Blocking file reads: call it in a worker thread from async code.
    """
    found: dict[str, float | None] = {}
    for name, path in files.items():
        if name not in OWN_CERTIFICATES:
            raise ValueError(
                f"own certificate name {name!r} is not one of {sorted(OWN_CERTIFICATES)}"
            )
        try:
            found[name] = earliest_not_after(path.read_bytes(), source=str(path))
        except (OSError, PKIError) as exc:
            LOGGER.warning("certificate %s (%s): cannot read its expiry: %s", name, path, exc)
            found[name] = None
    return found


class CertificateGauges:
    """The certificate gauge's series: own certificates and the peers of the rules."""

    def __init__(self) -> None:
        self._peers_shown: set[str] = set()

    def show_own(self, not_after: Mapping[str, float | None]) -> None:
        """Set own certificates' expiry; ``None`` (unreadable) keeps the last value."""
        for name, value in not_after.items():
            if value is None:
                CERTIFICATE_READ_ERRORS.labels(name).inc()
            else:
                CERTIFICATE_NOT_AFTER.labels(name).set(value)

    def show_peers(self, rules: CompiledRules) -> None:
        """One series per peer of ``rules`` (its CA's expiry); peers gone lose theirs."""
        shown: set[str] = set()
        for org, peer in rules.peers.items():
            if org in OWN_CERTIFICATES:  # cannot happen (peers are domains): never mix them
                continue
            try:
                value = earliest_not_after(peer.ca_pem.encode("ascii"), source=f"peer {org} CA")
            except (PKIError, UnicodeEncodeError):
                # The rules loader validated this PEM; if it no longer parses, say so once here.
                LOGGER.exception("peer %s: its CA from the rules has no readable expiry", org)
                continue
            CERTIFICATE_NOT_AFTER.labels(org).set(value)
            shown.add(org)
        for gone in self._peers_shown - shown:
            with contextlib.suppress(KeyError):
                CERTIFICATE_NOT_AFTER.remove(gone)
        self._peers_shown = shown

    def follow(self, rules: RulesSubscribable) -> Callable[[], None]:
        """Show the peers of ``rules.current`` now and after every reload; returns unsubscribe."""
        self.show_peers(rules.current)

        def reloaded(dropped: frozenset[str]) -> None:
            del dropped  # every reload may add peers too: show them all again
            self.show_peers(rules.current)

        return rules.subscribe(reloaded)
