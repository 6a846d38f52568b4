"""Certificate hierarchies minted at test time: root -> intermediate(s) -> leaf.

Like :mod:`tests.certs_for_tests`, independent of ``gateway.pki`` on purpose: a
partner's PKI is not made by our code. Each :class:`Node` is a certificate and
its key; :meth:`Node.ca` and :meth:`Node.leaf` issue under it, with knobs for the
broken cases the tests need (not a CA, expired, a path length, no keyCertSign).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> datetime:
    return datetime.now(UTC)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Node:
    """A certificate and its private key; ``parent`` is its issuer (None for a root)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    parent: Node | None = None

    # -- issuing ----------------------------------------------------------------------
    @classmethod
    def root(cls, name: str, *, path_length: int | None = None) -> Node:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def _issue(
        self,
        subject: x509.Name,
        *,
        ca: bool,
        path_length: int | None,
        names: tuple[str, ...],
        cert_sign: bool,
        not_before: datetime | None,
        not_after: datetime | None,
    ) -> Node:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(hours=1))
            .not_valid_after(not_after or now + timedelta(days=30))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
                critical=True,
            )
            .add_extension(_key_usage(cert_sign=cert_sign), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            ).add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        return Node(builder.sign(self.key, hashes.SHA256()), key, self)

    def ca(
        self,
        name: str,
        *,
        path_length: int | None = None,
        cert_sign: bool = True,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Node:
        """An intermediate CA under this one."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return self._issue(
            subject,
            ca=True,
            path_length=path_length,
            names=(),
            cert_sign=cert_sign,
            not_before=not_before,
            not_after=not_after,
        )

    def leaf(
        self,
        *names: str,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Node:
        """A gateway certificate (serverAuth + clientAuth) with ``names`` as dNSName SANs."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "x")])
        return self._issue(
            subject,
            ca=False,
            path_length=None,
            names=names,
            cert_sign=False,
            not_before=not_before,
            not_after=not_after,
        )

    # -- encodings --------------------------------------------------------------------
    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain(self, *, up_to_root: bool = False) -> list[Node]:
        """This certificate and its issuers, leaf first; the root only if asked."""
        found: list[Node] = []
        node: Node | None = self
        while node is not None:
            if node.parent is not None or up_to_root or node is self:
                found.append(node)
            node = node.parent
        return found

    def write(
        self, directory: Path, stem: str, *, present: list[Node] | None = None
    ) -> tuple[Path, Path]:
        """``stem.pem`` (this certificate, then ``present``, default: its intermediates)
        and ``stem.key``; returns both paths."""
        presented = self.chain()[1:] if present is None else present
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(self.pem + b"".join(node.pem for node in presented))
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)  # the gateway refuses a key others may read
        return cert_path, key_path
