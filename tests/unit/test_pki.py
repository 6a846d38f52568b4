"""The dev PKI, key files, TLS contexts and peer identity, without a network."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from gateway.cli.peer import render_card
from gateway.core.keytext import format_signing_key, parse_signing_key
from gateway.errors import PeerAuthError, PKIError, Reason
from gateway.pki import dev
from gateway.pki.certs import parse_pin, spki_pin, spki_sha256
from gateway.pki.identity import PeerTrust, org_from_certificate, verify_peer_certificate
from gateway.pki.tls import (
    client_api_server_context,
    federation_client_context,
    federation_server_context,
)

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def acme_ca() -> dev.Issued:
    return dev.issue_ca("acme.example", now=NOW)


@pytest.fixture(scope="module")
def globex_ca() -> dev.Issued:
    return dev.issue_ca("globex.example", now=NOW)


def der(issued: dev.Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


def leaf_with_names(
    ca: dev.Issued, names: list[x509.GeneralName] | None, *, cn: str = "whatever"
) -> x509.Certificate:
    """A leaf with arbitrary SANs (or none), for the cases dev.py refuses to make."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


# -- issuing ------------------------------------------------------------------------


def test_ca_is_a_p256_ca_with_pathlen_zero_for_ten_years(acme_ca: dev.Issued) -> None:
    cert = acme_ca.cert
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - NOW == timedelta(days=dev.CA_VALIDITY_DAYS)
    assert NOW - cert.not_valid_before_utc == dev.CLOCK_SKEW_ALLOWANCE
    cert.verify_directly_issued_by(cert)


def test_gateway_cert_names_the_org_only_and_serves_both_ways(acme_ca: dev.Issued) -> None:
    issued = dev.issue_gateway_cert(acme_ca, "ACME.example.", now=NOW)
    cert = issued.cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("acme.example")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc - NOW == timedelta(days=dev.DEFAULT_CERT_VALIDITY_DAYS)
    cert.verify_directly_issued_by(acme_ca.cert)
    assert dev.same_public_key(cert, issued.key)
    assert dev.key_pin(issued.key) == spki_pin(cert)


def test_serials_differ(acme_ca: dev.Issued) -> None:
    a = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW)
    b = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW, key=a.key)
    assert a.cert.serial_number != b.cert.serial_number
    assert spki_pin(a.cert) == spki_pin(b.cert)  # same key, same pin


@pytest.mark.parametrize("org", ["acme", "", "acme..example", "1.2.3.4", "ac me.example"])
def test_bad_org_is_refused(acme_ca: dev.Issued, org: str) -> None:
    with pytest.raises(PKIError, match="invalid org"):
        dev.issue_gateway_cert(acme_ca, org, now=NOW)
    with pytest.raises(PKIError, match="invalid org"):
        dev.issue_ca(org, now=NOW)


@pytest.mark.parametrize("days", [0, -1, dev.MAX_CERT_VALIDITY_DAYS + 1])
def test_validity_out_of_range_is_refused(acme_ca: dev.Issued, days: int) -> None:
    with pytest.raises(PKIError, match="out of range"):
        dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW, validity_days=days)


def test_validity_bounds_are_accepted(acme_ca: dev.Issued) -> None:
    for days in (dev.MIN_CERT_VALIDITY_DAYS, dev.MAX_CERT_VALIDITY_DAYS):
        cert = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW, validity_days=days).cert
        assert cert.not_valid_after_utc - NOW == timedelta(days=days)


def test_no_certificate_outlives_its_ca() -> None:
    ca = dev.issue_ca("acme.example", now=NOW, validity_days=30)
    with pytest.raises(PKIError, match="org CA expires"):
        dev.issue_gateway_cert(ca, "acme.example", now=NOW, validity_days=31)


def test_naive_now_is_refused() -> None:
    with pytest.raises(PKIError, match="timezone"):
        dev.issue_ca("acme.example", now=datetime(2030, 1, 1))


def _ips(names: list[x509.GeneralName]) -> set[str]:
    return {str(n.value) for n in names if isinstance(n, x509.IPAddress)}


def _dns(names: list[x509.GeneralName]) -> set[str]:
    return {n.value for n in names if isinstance(n, x509.DNSName)}


def test_client_api_names() -> None:
    loop = dev.client_api_names("127.0.0.1")
    assert _dns(loop) == {"localhost"}
    assert _ips(loop) == {"127.0.0.1", "::1"}
    lan = dev.client_api_names("10.1.2.3")
    assert _ips(lan) == {"10.1.2.3"}
    assert _dns(lan) == set()
    wildcard = dev.client_api_names("0.0.0.0")
    assert _ips(wildcard) == {"127.0.0.1", "::1"}
    named = dev.client_api_names("Gw.Acme.Example")
    assert _dns(named) == {"gw.acme.example"}
    assert _dns(dev.client_api_names("localhost")) == {"localhost"}
    assert _ips(dev.client_api_names("[::1]")) == {"::1", "127.0.0.1"}
    with pytest.raises(PKIError, match="neither an IP address nor a name"):
        dev.client_api_names("bad host")


def test_client_api_cert_is_server_only(acme_ca: dev.Issued) -> None:
    cert = dev.issue_client_api_cert(acme_ca, "127.0.0.1", now=NOW).cert
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(acme_ca.cert)


# -- files --------------------------------------------------------------------------


def test_private_key_file_is_0600_and_round_trips(tmp_path: Path, acme_ca: dev.Issued) -> None:
    path = tmp_path / "ca.key"
    old_umask = os.umask(0)  # a permissive umask must not loosen the file
    try:
        dev.write_private_key(path, acme_ca.key, replace=False)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dev.same_public_key(acme_ca.cert, dev.load_ec_key(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ca.key"]  # no temporary left behind


def test_write_without_replace_leaves_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(b"original")
    with pytest.raises(PKIError, match=r"x\.pem: already exists"):
        dev.write_file(path, b"new", mode=0o644, replace=False)
    assert path.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pem"]


def test_write_with_replace_replaces(tmp_path: Path) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(b"original")
    path.chmod(0o666)
    dev.write_file(path, b"new", mode=0o600, replace=True)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_into_a_missing_directory_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "x.key"
    with pytest.raises(PKIError, match=r"nope/x\.key: cannot write"):
        dev.write_file(path, b"k", mode=0o600, replace=False)


def test_garbage_key_file_is_named_and_not_quoted(tmp_path: Path) -> None:
    path = tmp_path / "gateway.key"
    path.write_text(garbage_pem("PRIVATE KEY"))
    path.chmod(0o600)
    with pytest.raises(PKIError) as info:
        dev.load_ec_key(path)
    assert str(path) in str(info.value)
    assert "c2VjcmV0" not in str(info.value)


def test_key_file_problems(tmp_path: Path, acme_ca: dev.Issued) -> None:
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(PKIError, match="is a directory"):
        dev.load_ec_key(tmp_path / "dir.key")
    with pytest.raises(PKIError, match="no such private key file"):
        dev.load_ec_key(tmp_path / "missing.key")
    big = tmp_path / "big.key"
    big.write_bytes(b"x" * (dev.MAX_KEY_FILE_BYTES + 1))
    big.chmod(0o600)
    with pytest.raises(PKIError, match="too large"):
        dev.load_ec_key(big)
    ed = tmp_path / "ed.key"
    dev.write_private_key(ed, dev.generate_signing_key(), replace=False)
    with pytest.raises(PKIError, match="not an ECDSA private key"):
        dev.load_ec_key(ed)
    ec_file = tmp_path / "ec.key"
    dev.write_private_key(ec_file, acme_ca.key, replace=False)
    with pytest.raises(PKIError, match="not an Ed25519 private key"):
        dev.load_signing_key(ec_file)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_files_open_to_group_or_others_are_refused(
    tmp_path: Path, acme_files: tuple[Path, Path], mode: int
) -> None:
    """Both ways keys are read (ours, and OpenSSL's for TLS) refuse them, saying how to fix."""
    cert, key = acme_files
    key.chmod(mode)
    fix = rf"\(mode {mode:04o}\); run: chmod 600 {key}"
    with pytest.raises(PKIError, match=rf"^{key}: the private key file is accessible by .*{fix}$"):
        dev.load_ec_key(key)
    with pytest.raises(PKIError, match=rf"^{key}: the private key file is accessible by .*{fix}$"):
        client_api_server_context(cert_file=cert, key_file=key)
    with pytest.raises(PKIError, match="accessible by group or others"):
        federation_server_context(cert_file=cert, key_file=key, trusted_ca_pems=[])
    signing = tmp_path / "org-signing.key"
    dev.write_private_key(signing, dev.generate_signing_key(), replace=False)
    signing.chmod(mode)
    with pytest.raises(PKIError, match=rf"^{signing}: the private key file is accessible"):
        dev.load_signing_key(signing)
    key.chmod(0o600)
    signing.chmod(0o600)
    dev.load_ec_key(key)
    dev.load_signing_key(signing)
    client_api_server_context(cert_file=cert, key_file=key)


def test_load_issued_checks_the_pair(tmp_path: Path, acme_ca: dev.Issued) -> None:
    cert = tmp_path / "ca.pem"
    dev.write_file(cert, acme_ca.cert_pem(), mode=0o644, replace=False)
    key = tmp_path / "other.key"
    dev.write_private_key(key, dev.generate_key(), replace=False)
    with pytest.raises(PKIError, match=r"other\.key: is not the private key of"):
        dev.load_issued(cert, key)


def test_certificate_file_problems(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(PKIError, match=r"garbage\.pem"):
        dev.load_certificate(garbage)
    with pytest.raises(PKIError, match="no such certificate file"):
        dev.load_certificate(tmp_path / "missing.pem")


def test_signing_key_is_usable_by_pynacl(tmp_path: Path) -> None:
    path = tmp_path / "org-signing.key"
    dev.write_private_key(path, dev.generate_signing_key(), replace=False)
    key = dev.load_signing_key(path)
    text = format_signing_key(dev.signing_public_key_raw(key))
    nacl_key = SigningKey(key.private_bytes_raw())
    assert bytes(nacl_key.verify_key) == parse_signing_key(text)
    signed = nacl_key.sign(b"key record")
    key.public_key().verify(signed.signature, b"key record")


# -- identity -----------------------------------------------------------------------


def trust_of(
    *cas: tuple[str, dev.Issued], pins: dict[str, set[bytes]] | None = None
) -> dict[str, PeerTrust]:
    pins = pins or {}
    return {
        org: PeerTrust(org=org, cas=(ca.cert,), pins=frozenset(pins.get(org, set())))
        for org, ca in cas
    }


def test_a_peer_is_the_org_in_its_san(acme_ca: dev.Issued, globex_ca: dev.Issued) -> None:
    cert = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW)
    trust = trust_of(("acme.example", acme_ca), ("globex.example", globex_ca))
    assert verify_peer_certificate(der(cert), trust, now=NOW) == "acme.example"


def test_the_cn_is_never_the_identity(acme_ca: dev.Issued) -> None:
    cert = leaf_with_names(acme_ca, [x509.DNSName("acme.example")], cn="globex.example")
    assert org_from_certificate(cert) == "acme.example"
    no_san = leaf_with_names(acme_ca, None, cn="acme.example")
    with pytest.raises(PeerAuthError) as info:
        org_from_certificate(no_san)
    assert info.value.reason is Reason.CERT_NO_ORG


@pytest.mark.parametrize(
    "names",
    [
        [],
        [x509.DNSName("acme.example"), x509.DNSName("globex.example")],
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        [x509.DNSName("localhost")],
        [x509.DNSName("*.acme.example")],
        [x509.UniformResourceIdentifier("https://acme.example")],
    ],
)
def test_certificates_that_name_no_single_org(
    acme_ca: dev.Issued, names: list[x509.GeneralName]
) -> None:
    cert = leaf_with_names(acme_ca, names, cn="acme.example")
    with pytest.raises(PeerAuthError) as info:
        org_from_certificate(cert)
    assert info.value.reason is Reason.CERT_NO_ORG


def _reason(der_bytes: bytes, trust: dict[str, PeerTrust], now: datetime = NOW) -> Reason:
    with pytest.raises(PeerAuthError) as info:
        verify_peer_certificate(der_bytes, trust, now=now)
    return info.value.reason


def test_unknown_org_is_refused(acme_ca: dev.Issued, globex_ca: dev.Issued) -> None:
    cert = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW)
    assert _reason(der(cert), trust_of(("globex.example", globex_ca))) is Reason.UNKNOWN_PEER


def test_one_peers_ca_cannot_vouch_for_another_org(
    acme_ca: dev.Issued, globex_ca: dev.Issued
) -> None:
    forged = dev.issue_gateway_cert(globex_ca, "acme.example", now=NOW)
    trust = trust_of(("acme.example", acme_ca), ("globex.example", globex_ca))
    assert _reason(der(forged), trust) is Reason.CERT_WRONG_CA


def test_a_ca_with_the_same_name_but_another_key_is_refused(acme_ca: dev.Issued) -> None:
    impostor_ca = dev.issue_ca("acme.example", now=NOW)  # same subject, different key
    assert impostor_ca.cert.subject == acme_ca.cert.subject
    forged = dev.issue_gateway_cert(impostor_ca, "acme.example", now=NOW)
    assert _reason(der(forged), trust_of(("acme.example", acme_ca))) is Reason.CERT_WRONG_CA


def test_validity_is_checked_at_now(acme_ca: dev.Issued) -> None:
    cert = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW, validity_days=10)
    trust = trust_of(("acme.example", acme_ca))
    after = NOW + timedelta(days=10, seconds=1)
    before = NOW - dev.CLOCK_SKEW_ALLOWANCE - timedelta(seconds=1)
    assert _reason(der(cert), trust, after) is Reason.CERT_EXPIRED
    assert _reason(der(cert), trust, before) is Reason.CERT_EXPIRED
    assert verify_peer_certificate(der(cert), trust, now=NOW + timedelta(days=10)) == (
        "acme.example"
    )


def test_pins(acme_ca: dev.Issued) -> None:
    cert = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW)
    other = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW)
    pinned = trust_of(
        ("acme.example", acme_ca), pins={"acme.example": {spki_sha256(other.cert), b"x" * 32}}
    )
    assert _reason(der(cert), pinned) is Reason.PIN_MISMATCH
    assert verify_peer_certificate(der(other), pinned, now=NOW) == "acme.example"


@given(st.binary(max_size=2048))
def test_garbage_der_raises_only_peer_auth_error(data: bytes) -> None:
    with pytest.raises(PeerAuthError):
        verify_peer_certificate(data, {}, now=NOW)


def test_peer_trust_from_pem(acme_ca: dev.Issued) -> None:
    leaf = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW)
    trust = PeerTrust.from_pem(
        "ACME.example", acme_ca.cert_pem(), pins=[spki_pin(leaf.cert)], source="rules.yaml"
    )
    assert trust.org == "acme.example"
    assert trust.cas == (acme_ca.cert,)
    assert trust.pins == frozenset({parse_pin(spki_pin(leaf.cert))})
    with pytest.raises(PKIError, match=r"rules\.yaml: invalid pin"):
        PeerTrust.from_pem("acme.example", acme_ca.cert_pem(), pins=["md5/x"], source="rules.yaml")
    with pytest.raises(PKIError, match="not a CA certificate"):
        PeerTrust.from_pem("acme.example", leaf.cert_pem(), source="rules.yaml")
    with pytest.raises(PKIError, match=r"rules\.yaml: domain"):
        PeerTrust.from_pem("acme", acme_ca.cert_pem(), source="rules.yaml")


# -- TLS contexts -------------------------------------------------------------------


@pytest.fixture
def acme_files(tmp_path: Path, acme_ca: dev.Issued) -> tuple[Path, Path]:
    issued = dev.issue_gateway_cert(acme_ca, "acme.example", now=datetime.now(UTC))
    cert, key = tmp_path / "gateway.pem", tmp_path / "gateway.key"
    dev.write_file(cert, issued.cert_pem(), mode=0o644, replace=False)
    dev.write_private_key(key, issued.key, replace=False)
    return cert, key


def test_federation_contexts_are_tls13_mtls(
    acme_files: tuple[Path, Path], acme_ca: dev.Issued, globex_ca: dev.Issued
) -> None:
    cert, key = acme_files
    server = federation_server_context(
        cert_file=cert, key_file=key, trusted_ca_pems=[acme_ca.cert_pem(), globex_ca.cert_pem()]
    )
    assert server.minimum_version is ssl.TLSVersion.TLSv1_3
    assert server.maximum_version is ssl.TLSVersion.TLSv1_3
    assert server.verify_mode is ssl.CERT_REQUIRED
    assert len(server.get_ca_certs()) == 2
    client = federation_client_context(
        cert_file=cert, key_file=key, peer_ca_pem=globex_ca.cert_pem()
    )
    assert client.minimum_version is ssl.TLSVersion.TLSv1_3
    assert client.maximum_version is ssl.TLSVersion.TLSv1_3
    assert client.verify_mode is ssl.CERT_REQUIRED
    assert client.check_hostname is True
    assert len(client.get_ca_certs()) == 1


def test_server_context_with_no_peer_ca_still_builds(acme_files: tuple[Path, Path]) -> None:
    cert, key = acme_files
    context = federation_server_context(cert_file=cert, key_file=key, trusted_ca_pems=[])
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.get_ca_certs() == []


def test_client_api_context(acme_files: tuple[Path, Path]) -> None:
    cert, key = acme_files
    context = client_api_server_context(cert_file=cert, key_file=key)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3  # TLS 1.3 only by default
    assert context.verify_mode is ssl.CERT_NONE
    allowing_1_2 = client_api_server_context(cert_file=cert, key_file=key, min_version="1.2")
    assert allowing_1_2.minimum_version is ssl.TLSVersion.TLSv1_2
    tls12_suites = {c["name"] for c in allowing_1_2.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12_suites
    assert all(name.startswith("ECDHE-") for name in tls12_suites)
    assert all(("GCM" in name) or ("CHACHA20" in name) for name in tls12_suites)


def test_context_errors_name_the_file(
    tmp_path: Path, acme_files: tuple[Path, Path], acme_ca: dev.Issued
) -> None:
    cert, key = acme_files
    with pytest.raises(PKIError, match=r"missing\.pem: no such certificate file"):
        client_api_server_context(cert_file=tmp_path / "missing.pem", key_file=key)
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(PKIError, match=r"dir\.key: is not a private key file"):
        client_api_server_context(cert_file=cert, key_file=tmp_path / "dir.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(PKIError, match=r"garbage\.key: not a usable"):
        client_api_server_context(cert_file=cert, key_file=garbage)
    other = tmp_path / "other.key"
    dev.write_private_key(other, dev.generate_key(), replace=False)
    with pytest.raises(PKIError, match=r"other\.key: not a usable"):
        federation_server_context(cert_file=cert, key_file=other, trusted_ca_pems=[])
    with pytest.raises(PKIError, match="peer CA #2: not a usable CA certificate"):
        federation_server_context(
            cert_file=cert, key_file=key, trusted_ca_pems=[acme_ca.cert_pem(), b"junk"]
        )
    with pytest.raises(PKIError, match="peer CA: not a usable CA certificate"):
        federation_client_context(cert_file=cert, key_file=key, peer_ca_pem=b"\xff")


# -- peer card ------------------------------------------------------------------------


def test_peer_card_loads_as_one_peers_entry(acme_ca: dev.Issued) -> None:
    leaf = dev.issue_gateway_cert(acme_ca, "acme.example", now=NOW)
    signing = format_signing_key(dev.signing_public_key_raw(dev.generate_signing_key()))
    text = render_card(
        org="acme.example",
        endpoints=["https://gw.acme.example:8443"],
        cas=[acme_ca.cert],
        pins=[spki_pin(leaf.cert)],
        signing_key=signing,
    )
    assert yaml.safe_load(text) == {
        "acme.example": {
            "endpoint": "https://gw.acme.example:8443",
            "ca_pem": acme_ca.cert_pem().decode("ascii"),
            "pins": [spki_pin(leaf.cert)],
            "signing_key": signing,
        }
    }
    # Pasted under `peers:` (indented by two), it is still that entry.
    indented = "peers:\n" + "".join(f"  {line}\n" for line in text.splitlines())
    assert yaml.safe_load(indented)["peers"] == yaml.safe_load(text)
    # A gateway of several nodes: the card lists every endpoint.
    nodes = ["https://gw1.acme.example:8443", "https://gw2.acme.example:8443"]
    several = render_card(
        org="acme.example",
        endpoints=nodes,
        cas=[acme_ca.cert],
        pins=[spki_pin(leaf.cert)],
        signing_key=signing,
    )
    assert yaml.safe_load(several)["acme.example"]["endpoint"] == nodes


def garbage_pem(label: str) -> str:
    """A PEM block of the given label around bytes that are no key (built at run time,
    so no file of the repository looks like it holds a private key)."""
    return f"-----BEGIN {label}-----\nZ2FyYmFnZQ==\n-----END {label}-----\n"
