"""Reading certificates and the textual forms admins paste: SPKI pins and CA PEMs.

* An **SPKI pin** is ``sha256/`` followed by the standard base64 (with ``=``
  padding, as in HPKP and curl's ``--pinnedpubkey``) of the SHA-256 of the
  certificate's DER SubjectPublicKeyInfo. It survives re-issuing a certificate
  for the same key, and changes when the key does.
* A **CA PEM** must hold exactly one certificate, which must be a CA
  (basicConstraints ``CA:TRUE``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from gateway.errors import PKIError

PIN_PREFIX = "sha256/"
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
