"""The gateway's own certificate and key, checked as a pair before they are used.

An :class:`OwnCertificate` is the *bytes* of a certificate file (the
certificate, then any intermediates the gateway presents) and of its key file,
with what was read from them. TLS contexts are built from those bytes
(:mod:`gateway.pki.tls`), never by opening the files again, so the pair that
was checked is the pair that is served, even if the files change meanwhile.

:func:`check_own_certificate` is pure (bytes and ``now`` in): it refuses, with
a :class:`~gateway.errors.PKIError` that says what is wrong,

* a certificate file that does not parse, holds no certificate or more than
  :data:`~gateway.pki.identity.MAX_PRESENTED_CERTIFICATES`;
* a key file that is not an unencrypted PEM private key, or not the key of
  the (first) certificate: the half-written state of a renewal where one file
  is new and the other not yet;
* a certificate that is not valid at ``now``;
* for the federation certificate: one whose one dNSName SAN is not this org,
  or that does not chain (through the intermediates in the file) to one of
  the org's CAs (``tls.ca``, which holds two CAs during a CA rollover).

The library's error text about a private key is never repeated: it may quote
parts of the key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import PeerAuthError, PKIError, Reason
from gateway.pki.certs import load_certificates_pem
from gateway.pki.identity import MAX_PRESENTED_CERTIFICATES, chain_to_anchor, org_from_certificate

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class OwnCertificate:
    """A checked certificate file (leaf first, then intermediates) and its key file."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    leaf: x509.Certificate = field(repr=False)
    intermediates: tuple[x509.Certificate, ...] = field(repr=False)
    sha256: str  # of both files' content: what "the same pair" means

    @property
    def not_after(self) -> float:
        """Unix seconds when the first certificate presented expires."""
        return min(
            cert.not_valid_after_utc.timestamp() for cert in (self.leaf, *self.intermediates)
        )

    def describe(self) -> str:
        """For the log: subject, serial and expiry of the leaf (nothing secret)."""
        return (
            f"{self.leaf.subject.rfc4514_string()} serial {self.leaf.serial_number:x}, "
            f"not after {self.leaf.not_valid_after_utc.isoformat()}"
        )


def pair_sha256(cert_pem: bytes, key_pem: bytes) -> str:
    digest = hashlib.sha256()
    for data in (cert_pem, key_pem):
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def check_own_certificate(
    cert_pem: bytes,
    key_pem: bytes,
    *,
    cert_source: str,
    key_source: str,
    now: datetime,
    org: str | None = None,
    cas: Sequence[x509.Certificate] = (),
) -> OwnCertificate:
    """The checked pair, or ``PKIError`` (see the module docstring).

    With ``org``, the certificate must name it; with ``cas``, it must chain to
    one of them through the intermediates that follow it in the file.
    """
    certs = load_certificates_pem(cert_pem, source=cert_source)
    if len(certs) > MAX_PRESENTED_CERTIFICATES:
        raise PKIError(
            f"{cert_source}: holds {len(certs)} certificates; at most "
            f"{MAX_PRESENTED_CERTIFICATES} (the certificate and its intermediates)"
        )
    leaf, intermediates = certs[0], tuple(certs[1:])
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{key_source}: not an unencrypted PEM private key") from exc
    try:
        matches = key.public_key().public_bytes(*_SPKI) == leaf.public_key().public_bytes(*_SPKI)
    except (ValueError, TypeError, AttributeError):
        matches = False
    if not matches:
        raise PKIError(
            f"{key_source}: is not the private key of the certificate in {cert_source} "
            "(a renewal half done? both files must be replaced)"
        )
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise PKIError(
            f"{cert_source}: not valid now ({now.isoformat()}): valid from "
            f"{leaf.not_valid_before_utc.isoformat()} to {leaf.not_valid_after_utc.isoformat()}"
        )
    if org is not None:
        try:
            named = org_from_certificate(leaf)
        except PeerAuthError as exc:
            raise PKIError(f"{cert_source}: {exc.message}") from exc
        if named != org:
            raise PKIError(f"{cert_source}: names {named}, not this org {org}")
    if cas:
        path = chain_to_anchor(leaf, intermediates, cas, now=now)
        if isinstance(path, Reason):
            why = {
                Reason.CERT_WRONG_CA: "does not chain to the org CA",
                Reason.CERT_EXPIRED: "chains to the org CA only through a CA not valid now",
            }.get(path, "chains to the org CA only through a CA that may not issue it")
            raise PKIError(
                f"{cert_source}: {why} (its intermediates, if any, must follow it in the file)"
            )
    return OwnCertificate(
        cert_pem=cert_pem,
        key_pem=key_pem,
        leaf=leaf,
        intermediates=intermediates,
        sha256=pair_sha256(cert_pem, key_pem),
    )
