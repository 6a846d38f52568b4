"""A peer is who its verified certificate says: the org in its SAN, vouched for by its own CA.

After a TLS handshake OpenSSL has checked that the peer's certificate chains to
*some* CA the gateway trusts. The federation server trusts every peer's CA at
once, so that alone would let globex's CA vouch for a certificate claiming to
be initech. :func:`verify_peer_certificate` closes that gap, in this order:

1. the org is the certificate's one dNSName SAN (never the CN) and a valid
   domain (``cert_no_org``);
2. the org is a peer (``unknown_peer``);
3. the certificate chains to one of *that peer's* CAs (the rules may give
   several, during a CA rollover), directly or through intermediate CAs that
   the peer presented after its certificate (``cert_wrong_ca`` when no such
   path exists; ``cert_untrusted`` when the only paths break a CA's
   constraints; ``cert_expired`` when the only paths run through a CA that is
   not valid now). Only the peer's own CAs are anchors: an intermediate
   issued under globex's root never vouches for initech, whatever it says;
4. ``now`` is within the certificate's validity (``cert_expired``);
5. if the peer has pins, the certificate's SPKI digest is one of them
   (``pin_mismatch``).

The path search (:func:`chain_to_anchor`) is pure and bounded: at most
:data:`MAX_PRESENTED_CERTIFICATES` certificates presented, at most
:data:`MAX_INTERMEDIATES` intermediates on a path. A CA on the path
(intermediate or anchor) must have basicConstraints ``CA:TRUE``, keyCertSign
if it has a keyUsage, a ``pathlen`` (if any) not smaller than the number of
intermediates below it, and be valid at ``now``; each certificate's issuer
name and signature must match the next one up. OpenSSL has already checked
the same chain (and the rest of RFC 5280) during the handshake against the
union of all peers' CAs; this check pins the anchor to the org.

Every failure is a :class:`~gateway.errors.PeerAuthError` with its reason code.
The same function checks a server certificate on the client side.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from gateway.core.address import normalize_domain
from gateway.errors import AddressError, PeerAuthError, PKIError, Reason
from gateway.pki.certs import load_ca_bundle_pem, parse_pin, spki_sha256

#: A peer may present its certificate and at most this many more (intermediates).
MAX_PRESENTED_CERTIFICATES: Final = 8
_ENCODING_DER: Final = 2  # _ssl.ENCODING_DER, for the chain's _ssl.Certificate objects
#: A path from a peer's certificate to its CA has at most this many intermediates.
MAX_INTERMEDIATES: Final = 4


@dataclass(frozen=True)
class PeerTrust:
    """What this gateway trusts about one peer: its org, its CA(s), optional SPKI pins."""

    org: str
    cas: tuple[x509.Certificate, ...]
    pins: frozenset[bytes] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.cas:
            raise ValueError(f"{self.org}: a peer needs at least one CA")

    @classmethod
    def from_pem(
        cls, org: str, ca_pem: bytes, *, pins: Iterable[str] = (), source: str
    ) -> PeerTrust:
        """Build from the textual forms in the rules; ``PKIError`` naming ``source``."""
        try:
            org = normalize_domain(org)
        except AddressError as exc:
            raise PKIError(f"{source}: {exc}") from exc
        cas = load_ca_bundle_pem(ca_pem, source=source)
        digests: set[bytes] = set()
        for pin in pins:
            try:
                digests.add(parse_pin(pin))
            except ValueError as exc:
                raise PKIError(f"{source}: {exc}") from exc
        return cls(org=org, cas=cas, pins=frozenset(digests))


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


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Issuer name and signature match (nothing else)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ca_problem(ca: x509.Certificate, *, below: int, now: datetime) -> Reason | None:
    """Why ``ca`` may not sign a certificate with ``below`` intermediates under it, if so."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return Reason.CERT_UNTRUSTED
    if not constraints.ca:
        return Reason.CERT_UNTRUSTED
    if constraints.path_length is not None and below > constraints.path_length:
        return Reason.CERT_UNTRUSTED
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    except ValueError:
        return Reason.CERT_UNTRUSTED
    if usage is not None and not usage.key_cert_sign:
        return Reason.CERT_UNTRUSTED
    if not _valid_at(ca, now):
        return Reason.CERT_EXPIRED
    return None


# When several paths fail, the most telling reason is reported.
_FAILURE_RANK: Final = {Reason.CERT_WRONG_CA: 0, Reason.CERT_UNTRUSTED: 1, Reason.CERT_EXPIRED: 2}


def chain_to_anchor(
    cert: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    now: datetime,
    max_intermediates: int = MAX_INTERMEDIATES,
) -> tuple[x509.Certificate, ...] | Reason:
    """The path from ``cert`` up to one of ``anchors``, or why there is none (pure).

    The path is ``(cert, intermediate..., anchor)``, using each of
    ``intermediates`` at most once. ``cert`` itself is not checked here (its
    name and validity are the caller's). The failure is ``cert_wrong_ca`` (no
    path: the issuers are not these anchors), ``cert_untrusted`` (a CA on
    every path breaks its constraints) or ``cert_expired`` (a CA on the
    best path is not valid at ``now``).
    """
    worst = Reason.CERT_WRONG_CA

    def note(reason: Reason) -> None:
        nonlocal worst
        if _FAILURE_RANK[reason] > _FAILURE_RANK[worst]:
            worst = reason

    def search(
        path: tuple[x509.Certificate, ...], used: frozenset[int]
    ) -> tuple[x509.Certificate, ...] | None:
        top = path[-1]
        below = len(path) - 1  # intermediates under the next CA up
        for anchor in anchors:
            if top.issuer == anchor.subject and _issued_by(top, anchor):
                problem = _ca_problem(anchor, below=below, now=now)
                if problem is None:
                    return (*path, anchor)
                note(problem)
        if below >= max_intermediates:
            return None
        for index, candidate in enumerate(intermediates):
            if index in used or top.issuer != candidate.subject or not _issued_by(top, candidate):
                continue
            problem = _ca_problem(candidate, below=below, now=now)
            if problem is not None:
                note(problem)
                continue
            found = search((*path, candidate), used | {index})
            if found is not None:
                return found
        return None

    found = search((cert,), frozenset())
    return found if found is not None else worst


def verify_peer_certificate(
    der: bytes,
    trust: Mapping[str, PeerTrust],
    *,
    now: datetime,
    intermediates: Sequence[bytes] = (),
) -> str:
    """The org that the DER certificate ``der`` proves, or ``PeerAuthError``.

    ``intermediates`` are the other certificates the peer presented (DER), in
    any order; see the module docstring for the checks.
    """
    if len(intermediates) + 1 > MAX_PRESENTED_CERTIFICATES:
        raise PeerAuthError(
            f"peer presented {len(intermediates) + 1} certificates; at most "
            f"{MAX_PRESENTED_CERTIFICATES} are read",
            reason=Reason.CERT_UNTRUSTED,
        )
    try:
        cert = x509.load_der_x509_certificate(der)
        extra = [x509.load_der_x509_certificate(item) for item in intermediates]
    except ValueError as exc:
        raise PeerAuthError(
            "peer certificate does not parse", reason=Reason.CERT_UNTRUSTED
        ) from exc
    org = org_from_certificate(cert)
    peer = trust.get(org)
    if peer is None:
        raise PeerAuthError(f"{org} is not a peer", reason=Reason.UNKNOWN_PEER)
    path = chain_to_anchor(cert, extra, peer.cas, now=now)
    if isinstance(path, Reason):
        message = {
            Reason.CERT_WRONG_CA: f"certificate for {org} does not chain to {org}'s CA",
            Reason.CERT_UNTRUSTED: (
                f"certificate for {org}: a CA on its path to {org}'s CA may not issue it"
            ),
            Reason.CERT_EXPIRED: (
                f"certificate for {org}: a CA on its path to {org}'s CA is not valid at "
                f"{now.isoformat()}"
            ),
        }.get(path, f"certificate for {org} is not trusted")
        raise PeerAuthError(message, reason=path)
    if not _valid_at(cert, now):
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


def _ssl_object(
    stream: trio.SSLStream[Any] | ssl.SSLObject | ssl.SSLSocket,
) -> ssl.SSLObject | ssl.SSLSocket | None:
    if isinstance(stream, ssl.SSLObject | ssl.SSLSocket):
        return stream
    # trio forwards only some SSLObject methods; the chain is not one of them.
    found = getattr(stream, "_ssl_object", None)
    return found if isinstance(found, ssl.SSLObject) else None


def peer_intermediates_der(
    stream: trio.SSLStream[Any] | ssl.SSLObject | ssl.SSLSocket,
) -> list[bytes]:
    """The certificates the other side presented after its own, DER, in its order.

    Python 3.13 has ``get_unverified_chain()``; 3.10 to 3.12 have it only on
    the private ``_sslobj``. Where neither is reachable the answer is empty:
    a peer that relies on intermediates is then refused (``cert_wrong_ca``),
    never let in on less evidence. At most :data:`MAX_PRESENTED_CERTIFICATES`
    are returned (more fail the check that reads them).
    """
    obj = _ssl_object(stream)
    if obj is None:
        return []
    getter = getattr(obj, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(obj, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return []
    try:
        chain = getter() or []
        leaf = obj.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return []
    found: list[bytes] = []
    for item in chain[: MAX_PRESENTED_CERTIFICATES + 1]:
        der = item if isinstance(item, bytes) else item.public_bytes(_ENCODING_DER)
        if der != leaf:  # a server-side chain from OpenSSL may or may not start with it
            found.append(bytes(der))
    return found
