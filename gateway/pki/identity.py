"""A peer is who its verified certificate says: the org in its SAN, vouched for by its own CA.

After a TLS handshake OpenSSL has checked that the peer's certificate chains to
*some* CA the gateway trusts. The federation server trusts every peer's CA at
once, so that alone would let globex's CA vouch for a certificate claiming to
be initech. :func:`verify_peer_certificate` closes that gap, in this order:

1. the org is the certificate's one dNSName SAN (never the CN) and a valid
   domain (``cert_no_org``);
2. the org is a peer (``unknown_peer``);
3. the certificate is issued directly by *that peer's* CA; intermediates are
   not supported (``cert_wrong_ca``);
4. ``now`` is within its validity (``cert_expired``);
5. if the peer has pins, the certificate's SPKI digest is one of them
   (``pin_mismatch``).

Every failure is a :class:`~gateway.errors.PeerAuthError` with its reason code.
The same function checks a server certificate on the client side.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from gateway.core.address import normalize_domain
from gateway.errors import AddressError, PeerAuthError, PKIError, Reason
from gateway.pki.certs import load_ca_pem, parse_pin, spki_sha256


@dataclass(frozen=True)
class PeerTrust:
    """What this gateway trusts about one peer: its org, its CA, optional SPKI pins."""

    org: str
    ca: x509.Certificate
    pins: frozenset[bytes] = field(default_factory=frozenset)

    @classmethod
    def from_pem(
        cls, org: str, ca_pem: bytes, *, pins: Iterable[str] = (), source: str
    ) -> PeerTrust:
        """Build from the textual forms in the rules; ``PKIError`` naming ``source``."""
        try:
            org = normalize_domain(org)
        except AddressError as exc:
            raise PKIError(f"{source}: {exc}") from exc
        ca = load_ca_pem(ca_pem, source=source)
        digests: set[bytes] = set()
        for pin in pins:
            try:
                digests.add(parse_pin(pin))
            except ValueError as exc:
                raise PKIError(f"{source}: {exc}") from exc
        return cls(org=org, ca=ca, pins=frozenset(digests))


def org_from_certificate(cert: x509.Certificate) -> str:
    """The org a certificate names: its one dNSName SAN, which must be a valid domain."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerAuthError(
            "certificate has no subjectAltName", reason=Reason.CERT_NO_ORG
        ) from None
    except ValueError as exc:  # a malformed extension
        raise PeerAuthError(
            "certificate has an unreadable subjectAltName", reason=Reason.CERT_NO_ORG
        ) from exc
    names = san.get_values_for_type(x509.DNSName)
    if len(names) != 1:
        raise PeerAuthError(
            f"certificate has {len(names)} dNSName SANs; exactly one (the org) is required",
            reason=Reason.CERT_NO_ORG,
        )
    try:
        return normalize_domain(names[0])
    except AddressError as exc:
        raise PeerAuthError(
            "certificate's dNSName SAN is not a valid org domain", reason=Reason.CERT_NO_ORG
        ) from exc


def verify_peer_certificate(der: bytes, trust: Mapping[str, PeerTrust], *, now: datetime) -> str:
    """The org that the DER certificate ``der`` proves, or ``PeerAuthError``."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PeerAuthError(
            "peer certificate does not parse", reason=Reason.CERT_UNTRUSTED
        ) from exc
    org = org_from_certificate(cert)
    peer = trust.get(org)
    if peer is None:
        raise PeerAuthError(f"{org} is not a peer", reason=Reason.UNKNOWN_PEER)
    try:
        cert.verify_directly_issued_by(peer.ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PeerAuthError(
            f"certificate for {org} is not issued by {org}'s CA", reason=Reason.CERT_WRONG_CA
        ) from exc
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PeerAuthError(
            f"certificate for {org} is not valid at {now.isoformat()}",
            reason=Reason.CERT_EXPIRED,
        )
    if peer.pins and spki_sha256(cert) not in peer.pins:
        raise PeerAuthError(
            f"certificate for {org} matches none of its pins", reason=Reason.PIN_MISMATCH
        )
    return org


def peer_certificate_der(stream: trio.SSLStream[Any] | ssl.SSLObject | ssl.SSLSocket) -> bytes:
    """The DER certificate the other side presented, after the handshake.

    ``PeerAuthError(cert_missing)`` when there is none (a context that does not
    require one, or a handshake that has not happened).
    """
    try:
        der = stream.getpeercert(binary_form=True)
    except (trio.NeedHandshakeError, ValueError) as exc:  # no handshake yet
        raise PeerAuthError("no TLS session yet", reason=Reason.CERT_MISSING) from exc
    if not der:
        raise PeerAuthError("peer presented no certificate", reason=Reason.CERT_MISSING)
    return bytes(der)
