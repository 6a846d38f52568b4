"""The dev PKI: an org CA, the certificates it issues, and the key files on disk.

An org runs one CA of its own (ECDSA P-256, ``CA:TRUE`` with ``pathlen:0``).
It issues, directly and with no intermediate:

* the **gateway certificate** (federation, both directions of mTLS): its only
  SAN is the dNSName of the org, which is the gateway's identity; EKU
  serverAuth and clientAuth;
* the **client API certificate**: a plain server certificate for the host the
  client API listens on.

Partners trust the org CA for that org only (see :mod:`gateway.pki.identity`),
and may pin the gateway certificate's key (see :mod:`gateway.pki.certs`).

Issuing is pure: the functions here take ``now`` and return values. Files are
written by :func:`write_file`, atomically: a temporary file created with
``O_CREAT|O_EXCL`` in the target directory, written, fsynced, then renamed into
place (or hard-linked, when an existing file must not be replaced), and the
directory fsynced. A reader sees the old file or the new one, never half of
one, and a private key is never readable by anyone else, not even for a moment.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core.address import normalize_domain
from gateway.errors import AddressError, PKIError
from gateway.files import read_private, write_atomically
from gateway.pki import DEFAULT_CERT_VALIDITY_DAYS
from gateway.pki.certs import load_ca_bundle_pem, load_certificates_pem, public_key_pin

CA_VALIDITY_DAYS = 3650
MIN_CERT_VALIDITY_DAYS = 1
MAX_CERT_VALIDITY_DAYS = 825  # the longest a public TLS certificate was ever allowed to live
# Certificates start a little in the past so that a partner whose clock runs
# slow does not refuse one that was issued a second ago.
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=5)
SERIAL_BITS = 159  # positive and at most 20 octets (RFC 5280 4.1.2.2)
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_CERT_FILE_BYTES = 1024 * 1024

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700

_CURVE = ec.SECP256R1()
_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as issued (not yet written anywhere)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return private_key_pem(self.key)


# -- issuing (pure) -----------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE)


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    """A new Ed25519 org signing key (signs the org's users' key records)."""
    return ed25519.Ed25519PrivateKey.generate()


def _org(org: str) -> str:
    try:
        return normalize_domain(org)
    except AddressError as exc:
        raise PKIError(f"invalid org: {exc}") from exc


def _check_validity_days(days: int) -> None:
    if not MIN_CERT_VALIDITY_DAYS <= days <= MAX_CERT_VALIDITY_DAYS:
        raise PKIError(
            f"validity of {days} days is out of range "
            f"{MIN_CERT_VALIDITY_DAYS}-{MAX_CERT_VALIDITY_DAYS}"
        )


def _serial() -> int:
    return secrets.randbits(SERIAL_BITS) | 1  # never zero


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise PKIError("internal: `now` must be timezone-aware")
    return now.astimezone(UTC)


def issue_ca(
    org: str,
    *,
    now: datetime,
    validity_days: int = CA_VALIDITY_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
    common_name: str | None = None,
) -> Issued:
    """A self-signed org CA: ``CA:TRUE, pathlen:0``, keyCertSign and cRLSign.

    ``common_name`` defaults to ``<org> gateway CA``; a CA rollover gives the new
    CA a name of its own, so that old and new are told apart everywhere.
    """
    org = _org(org)
    if validity_days < 1:
        raise PKIError(f"CA validity of {validity_days} days must be at least 1")
    now = _utc(now)
    key = key if key is not None else generate_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{org} gateway CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def _issue_leaf(
    ca: Issued,
    *,
    subject_cn: str,
    names: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    now: datetime,
    validity_days: int,
    key: ec.EllipticCurvePrivateKey | None,
) -> Issued:
    _check_validity_days(validity_days)
    now = _utc(now)
    not_after = now + timedelta(days=validity_days)
    if not_after > ca.cert.not_valid_after_utc:
        raise PKIError(
            f"the org CA expires on {ca.cert.not_valid_after_utc.isoformat()}, before the "
            f"certificate would ({not_after.isoformat()}): make a new CA or ask for fewer days"
        )
    key = key if key is not None else generate_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def issue_gateway_cert(
    ca: Issued,
    org: str,
    *,
    now: datetime,
    validity_days: int = DEFAULT_CERT_VALIDITY_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    """The federation certificate of ``org``: SAN dNSName = org only, serverAuth+clientAuth.

    ``ca`` is normally the CA of the same org; nothing here stops a CA from
    issuing for another org (tests need exactly that), which is why a peer's
    identity is only believed when its CA is *that org's* CA.
    """
    org = _org(org)
    return _issue_leaf(
        ca,
        subject_cn=org,
        names=[x509.DNSName(org)],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        now=now,
        validity_days=validity_days,
        key=key,
    )


def client_api_names(host: str) -> list[x509.GeneralName]:
    """The SANs for a client API listening on ``host`` (an IP or a DNS name).

    A loopback or wildcard address also gets ``localhost`` and the loopback IPs,
    so that local clients can reach it by either name.
    """
    names: list[x509.GeneralName] = []
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not host or any(c.isspace() for c in host):
            raise PKIError(
                f"client API host {host!r} is neither an IP address nor a name"
            ) from None
        names.append(x509.DNSName(host.lower()))
        local = host.lower() == "localhost"
    else:
        if not ip.is_unspecified:
            names.append(x509.IPAddress(ip))
        local = ip.is_loopback or ip.is_unspecified
    if local:
        for name in _LOOPBACK_NAMES:
            if x509.DNSName(name) not in names:
                names.append(x509.DNSName(name))
        for loop_ip in _LOOPBACK_IPS:
            if x509.IPAddress(loop_ip) not in names:
                names.append(x509.IPAddress(loop_ip))
    return names


def issue_client_api_cert(
    ca: Issued,
    host: str,
    *,
    now: datetime,
    validity_days: int = DEFAULT_CERT_VALIDITY_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    """A server certificate (serverAuth) for the client API on ``host``."""
    return _issue_leaf(
        ca,
        subject_cn=host.strip("[]") or "localhost",
        names=client_api_names(host),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        now=now,
        validity_days=validity_days,
        key=key,
    )


# -- encodings ----------------------------------------------------------------------


def private_key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: the file's mode (0600) is the protection."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def signing_public_key_raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public half, as :func:`gateway.core.keytext.format_signing_key` wants."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- files --------------------------------------------------------------------------


def write_file(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Write ``data`` to ``path`` atomically with exactly ``mode``.

    With ``replace=False`` an existing ``path`` is never touched: the new file is
    hard-linked into place, which fails if the name is taken, even when another
    process raced us to it. ``OSError`` is translated into ``PKIError`` naming
    the file.
    """
    try:
        write_atomically(path, data, mode=mode, replace=replace)
    except FileExistsError as exc:
        raise PKIError(f"{path}: already exists; not replacing it") from exc
    except OSError as exc:
        raise PKIError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, *, replace: bool
) -> None:
    write_file(path, private_key_pem(key), mode=PRIVATE_FILE_MODE, replace=replace)


def _read_bounded(path: Path, *, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except IsADirectoryError as exc:
        raise PKIError(f"{path}: is a directory, not a {what} file") from exc
    except FileNotFoundError as exc:
        raise PKIError(f"{path}: no such {what} file") from exc
    except OSError as exc:
        raise PKIError(f"{path}: cannot read {what} file: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise PKIError(f"{path}: larger than {limit} bytes; not a {what} file")
    return data


def read_certificate_file(path: Path) -> bytes:
    """The bytes of a PEM file, bounded, with errors naming the file."""
    return _read_bounded(path, limit=MAX_CERT_FILE_BYTES, what="certificate")


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file; ``PKIError`` naming the file otherwise."""
    return load_certificates_pem(read_certificate_file(path), source=str(path))[0]


def read_private_key_file(path: Path) -> bytes:
    """The bytes of a private key file; ``PKIError`` naming the file when it is
    missing, unreadable, too large, or accessible by group or others."""
    if path.is_dir():
        raise PKIError(f"{path}: is a directory, not a private key file")
    try:
        return read_private(path, max_bytes=MAX_KEY_FILE_BYTES, what="private key file")
    except FileNotFoundError as exc:
        raise PKIError(f"{path}: no such private key file") from exc
    except OSError as exc:
        raise PKIError(f"{path}: cannot read private key file: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise PKIError(f"{path}: {exc}") from exc


def _load_private_key(path: Path) -> object:
    data = read_private_key_file(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # Never include the library's text: it may quote parts of the key.
        raise PKIError(f"{path}: not an unencrypted PEM private key") from exc


def load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = _load_private_key(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: not an ECDSA private key")
    return key


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The org's Ed25519 signing key from its PKCS#8 PEM file."""
    key = _load_private_key(path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PKIError(f"{path}: not an Ed25519 private key")
    return key


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    """A certificate and its key from two files, checked to belong together."""
    cert = load_certificate(cert_path)
    key = load_ec_key(key_path)
    if not same_public_key(cert, key):
        raise PKIError(f"{key_path}: is not the private key of {cert_path}")
    return Issued(cert=cert, key=key)


def load_ca_bundle(path: Path) -> tuple[x509.Certificate, ...]:
    """The org CA file: one CA, or two during a CA rollover; ``PKIError`` naming the file."""
    return load_ca_bundle_pem(read_certificate_file(path), source=str(path))


def load_issuing_ca(ca_path: Path, key_path: Path) -> Issued:
    """The CA in the org CA file (a bundle during a rollover) whose key is ``key_path``."""
    key = load_ec_key(key_path)
    for cert in load_ca_bundle(ca_path):
        if same_public_key(cert, key):
            return Issued(cert=cert, key=key)
    raise PKIError(f"{key_path}: is the key of none of the CAs in {ca_path}")


def same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def key_pin(key: ec.EllipticCurvePrivateKey) -> str:
    """The ``sha256/...`` SPKI pin a certificate for ``key`` will have."""
    return public_key_pin(key.public_key())
