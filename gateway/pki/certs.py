"""Reading certificates and the textual forms admins paste: SPKI pins and CA PEMs.

* An **SPKI pin** is ``sha256/`` followed by the standard base64 (with ``=``
  padding, as in HPKP and curl's ``--pinnedpubkey``) of the SHA-256 of the
  certificate's DER SubjectPublicKeyInfo. It survives re-issuing a certificate
  for the same key, and changes when the key does.
* A **CA PEM** must hold exactly one certificate, which must be a CA
  (basicConstraints ``CA:TRUE``).
* A **CA bundle** (a peer's trust anchors in the rules, or the org's own CA
  file during a CA rollover) holds one to :data:`MAX_CAS_PER_BUNDLE` CA
  certificates, each a CA, none twice: old and new CA side by side while an
  org changes its CA.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from gateway.errors import PKIError

PIN_PREFIX = "sha256/"
#: At most this many CA certificates in one bundle (a rollover needs two).
MAX_CAS_PER_BUNDLE = 8
_PIN_RE = re.compile(r"sha256/[A-Za-z0-9+/]{43}=")


def load_certificates_pem(pem: bytes, *, source: str) -> list[x509.Certificate]:
    """Every certificate in ``pem``; ``PKIError`` naming ``source`` when there is none."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PKIError(f"{source}: not a PEM certificate ({exc})") from exc
    if not certs:
        raise PKIError(f"{source}: holds no PEM certificate")
    return certs


def load_ca_pem(pem: bytes, *, source: str) -> x509.Certificate:
    """Exactly one CA certificate from ``pem``, or ``PKIError`` saying what is wrong."""
    certs = load_certificates_pem(pem, source=source)
    if len(certs) != 1:
        raise PKIError(f"{source}: holds {len(certs)} certificates; a CA file holds exactly one")
    cert = certs[0]
    if not is_ca(cert):
        raise PKIError(f"{source}: is not a CA certificate (basicConstraints CA:TRUE missing)")
    return cert


def load_ca_bundle_pem(pem: bytes, *, source: str) -> tuple[x509.Certificate, ...]:
    """One or more CA certificates from ``pem``, in file order; ``PKIError`` otherwise."""
    certs = load_certificates_pem(pem, source=source)
    if len(certs) > MAX_CAS_PER_BUNDLE:
        raise PKIError(
            f"{source}: holds {len(certs)} certificates; a CA bundle holds at most "
            f"{MAX_CAS_PER_BUNDLE}"
        )
    seen: set[bytes] = set()
    for index, cert in enumerate(certs, start=1):
        where = source if len(certs) == 1 else f"{source}: certificate {index}"
        if not is_ca(cert):
            raise PKIError(f"{where}: is not a CA certificate (basicConstraints CA:TRUE missing)")
        der = cert.public_bytes(serialization.Encoding.DER)
        if der in seen:
            raise PKIError(f"{where}: the same CA certificate is in the bundle twice")
        seen.add(der)
    return tuple(certs)


def bundle_sha256(certs: Sequence[x509.Certificate]) -> str:
    """Hex SHA-256 of the certificates' DER, concatenated: for one CA, its fingerprint."""
    digest = hashlib.sha256()
    for cert in certs:
        digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.hexdigest()


def bundle_pem(certs: Sequence[x509.Certificate]) -> str:
    """The PEM text of ``certs``, one after the other, re-encoded."""
    return "".join(cert.public_bytes(serialization.Encoding.PEM).decode("ascii") for cert in certs)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(constraints.ca)


def spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def spki_pin(cert: x509.Certificate) -> str:
    """The ``sha256/...`` pin of ``cert``'s public key."""
    return PIN_PREFIX + base64.b64encode(spki_sha256(cert)).decode("ascii")


def parse_pin(text: str) -> bytes:
    """The 32-byte digest of a ``sha256/...`` pin; ``ValueError`` saying what is wrong."""
    if not isinstance(text, str) or not _PIN_RE.fullmatch(text):
        raise ValueError(
            f"invalid pin {text!r}: expected sha256/ and 44 characters of base64 "
            "(see `gateway pki show`)"
        )
    try:
        digest = base64.b64decode(text[len(PIN_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid pin {text!r}: bad base64") from exc
    if len(digest) != 32:
        raise ValueError(f"invalid pin {text!r}: not a SHA-256 digest")
    return digest


def public_key_pin(public_key: CertificatePublicKeyTypes) -> str:
    """The ``sha256/...`` pin that any certificate for ``public_key`` will have."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PIN_PREFIX + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")
