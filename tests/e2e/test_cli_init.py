"""`gateway init`, `gateway pki` and `gateway peer card`, run as the real console script.

openssl (an independent implementation) checks what init wrote: the SAN, the
chain, and the SPKI pin and signing key that the peer card prints.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config

pytestmark = pytest.mark.e2e

COMMAND_TIMEOUT = 60  # seconds; generous, so that a hang fails instead of blocking
OPENSSL = "/usr/bin/openssl"
_SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]

PRIVATE_KEYS = ("pki/ca.key", "pki/gateway.key", "pki/client-api.key", "keys/org-signing.key")
PIN_RE = re.compile(r"sha256/[A-Za-z0-9+/]{43}=")


def gateway(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def ok(*args: str | Path) -> str:
    result = gateway(*args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def openssl(*args: str | Path, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(
        [OPENSSL, *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    )
    return result.stdout


def openssl_pin(cert: Path) -> str:
    public_pem = openssl("x509", "-in", cert, "-noout", "-pubkey")
    der = openssl("pkey", "-pubin", "-outform", "DER", stdin=public_pem)
    return "sha256/" + base64.b64encode(hashlib.sha256(der).digest()).decode()


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under root: (content hash, mtime_ns, mode)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        entries[str(path.relative_to(root))] = (digest, info.st_mtime_ns, info.st_mode)
    return entries


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `gateway init` per module; tests that change things work on a copy."""
    directory = tmp_path_factory.mktemp("template") / "acme"
    ok("init", "--org", "acme.example", "--dir", directory)
    return directory


@pytest.fixture
def setup(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "acme"
    shutil.copytree(template, copy, symlinks=True)
    return copy


def test_init_writes_a_working_setup(tmp_path: Path) -> None:
    directory = tmp_path / "x"
    out = ok("init", "--org", "Acme.Example", "--dir", directory)
    assert "initialized acme.example" in out

    text = openssl("x509", "-in", directory / "pki/gateway.pem", "-noout", "-text").decode()
    assert "DNS:acme.example" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    ca_text = openssl("x509", "-in", directory / "pki/ca.pem", "-noout", "-text").decode()
    assert "CA:TRUE, pathlen:0" in ca_text
    assert "ASN1 OID: prime256v1" in ca_text
    for leaf in ("gateway.pem", "client-api.pem"):
        verified = openssl("verify", "-CAfile", directory / "pki/ca.pem", directory / "pki" / leaf)
        assert verified.decode().strip().endswith(": OK")
    client_text = openssl("x509", "-in", directory / "pki/client-api.pem", "-noout", "-text")
    assert "IP Address:127.0.0.1" in client_text.decode()
    assert "DNS:localhost" in client_text.decode()

    for key in PRIVATE_KEYS:
        assert stat.S_IMODE((directory / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE((directory / "data").stat().st_mode) == 0o700
    assert not list(directory.rglob(".*.tmp"))

    config = load_config(directory / "gateway.yaml")
    assert config.org == "acme.example"
    assert config.tls.cert == directory / "pki/gateway.pem"
    assert config.endpoint == "https://127.0.0.1:8443"
    assert str(config.listen.client) == "127.0.0.1:8080"

    rules = yaml.safe_load((directory / "rules.yaml").read_text())
    assert rules["version"] == 1
    assert rules["org"] == "acme.example"
    assert rules["default"] == "deny"
    assert rules["peers"] == {}
    assert all("members" in group for group in rules["groups"].values())


def test_init_takes_listen_addresses_and_endpoint(tmp_path: Path) -> None:
    directory = tmp_path / "x"
    ok(
        "init",
        "--org",
        "globex.example",
        "--dir",
        directory,
        "--federation-listen",
        "0.0.0.0:9443",
        "--client-listen",
        "[::1]:9080",
        "--metrics-listen",
        "127.0.0.1:0",
        "--endpoint",
        "https://gw.globex.example:9443",
        "--validity-days",
        "30",
    )
    config = load_config(directory / "gateway.yaml")
    assert str(config.listen.federation) == "0.0.0.0:9443"
    assert str(config.listen.client) == "[::1]:9080"
    assert config.listen.metrics.port == 0
    assert config.endpoint == "https://gw.globex.example:9443"
    end = openssl("x509", "-in", directory / "pki/gateway.pem", "-noout", "-enddate", "-startdate")
    assert b"notAfter=" in end
    shown = ok("pki", "show", "--dir", directory)
    assert "days left:   29" in shown or "days left:   30" in shown


def test_a_second_init_changes_nothing_and_force_replaces(setup: Path) -> None:
    before = snapshot(setup)
    result = gateway("init", "--org", "acme.example", "--dir", setup)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "already holds a gateway setup" in result.stderr
    assert "--force" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(setup) == before

    # A single leftover file is enough to refuse.
    lone = setup.parent / "lone"
    lone.mkdir()
    (lone / "rules.yaml").write_text("mine")
    assert gateway("init", "--org", "acme.example", "--dir", lone).returncode != 0
    assert [p.name for p in lone.iterdir()] == ["rules.yaml"]

    ok("init", "--org", "acme.example", "--dir", setup, "--force")
    after = snapshot(setup)
    for name in ("pki/ca.pem", "pki/gateway.pem", "pki/gateway.key", "keys/org-signing.key"):
        assert after[name][0] != before[name][0], name
    for key in PRIVATE_KEYS:
        assert stat.S_IMODE((setup / key).stat().st_mode) == 0o600


def test_pki_show(setup: Path) -> None:
    out = ok("pki", "show", "--dir", setup)
    assert "org CA:" in out
    assert "federation certificate:" in out
    assert "client API certificate:" in out
    assert "subject:     CN=acme.example gateway CA,O=acme.example" in out
    assert "SAN:         DNS:acme.example" in out
    assert f"SPKI pin:    {openssl_pin(setup / 'pki/gateway.pem')}" in out
    assert f"SPKI pin:    {openssl_pin(setup / 'pki/ca.pem')}" in out
    assert re.search(r"not before:  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", out)
    assert re.search(r"not after:   \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", out)
    assert re.search(r"days left:   (89|90)\n", out)
    assert re.search(r"days left:   (3649|3650)\n", out)
    assert "WARNING" not in out

    single = ok("pki", "show", "--cert", setup / "pki/gateway.pem")
    assert single.startswith("certificate: ")
    assert "DNS:acme.example" in single


def test_peer_card_is_the_peers_entry(setup: Path) -> None:
    card = yaml.safe_load(ok("peer", "card", "--dir", setup))
    signing_der = openssl(
        "pkey", "-in", setup / "keys/org-signing.key", "-pubout", "-outform", "DER"
    )
    signing_key = "ed25519:" + base64.urlsafe_b64encode(signing_der[-32:]).decode().rstrip("=")
    assert card == {
        "acme.example": {
            "endpoint": "https://127.0.0.1:8443",
            "ca_pem": (setup / "pki/ca.pem").read_text(),
            "pins": [openssl_pin(setup / "pki/gateway.pem")],
            "signing_key": signing_key,
        }
    }


def test_rotate_changes_the_key_and_pin(setup: Path) -> None:
    old_pin = openssl_pin(setup / "pki/gateway.pem")
    old_ca = (setup / "pki/ca.pem").read_bytes()
    out = ok("pki", "rotate", "--dir", setup, "--validity-days", "10")
    new_pin = openssl_pin(setup / "pki/gateway.pem")
    assert new_pin != old_pin
    assert f"old pin: {old_pin}" in out
    assert f"new pin: {new_pin}" in out
    assert "add the new pin" in out
    assert (setup / "pki/ca.pem").read_bytes() == old_ca
    assert stat.S_IMODE((setup / "pki/gateway.key").stat().st_mode) == 0o600
    verified = openssl("verify", "-CAfile", setup / "pki/ca.pem", setup / "pki/gateway.pem")
    assert verified.decode().strip().endswith(": OK")
    # The new key belongs to the new certificate.
    cert_pub = openssl("x509", "-in", setup / "pki/gateway.pem", "-noout", "-pubkey")
    key_pub = openssl("pkey", "-in", setup / "pki/gateway.key", "-pubout")
    assert cert_pub == key_pub
    assert re.search(r"days left:   (9|10)\n", ok("pki", "show", "--dir", setup))


def test_rotate_in_two_steps_announces_the_pin_first(setup: Path) -> None:
    current = openssl_pin(setup / "pki/gateway.pem")
    out = ok("pki", "rotate", "--dir", setup, "--prepare")
    match = PIN_RE.search(out.split("next pin:")[1])
    assert match is not None
    next_pin = match.group(0)
    assert openssl_pin(setup / "pki/gateway.pem") == current  # nothing in use changed yet
    assert stat.S_IMODE((setup / "pki/gateway.next.key").stat().st_mode) == 0o600
    card = yaml.safe_load(ok("peer", "card", "--dir", setup))
    assert card["acme.example"]["pins"] == [current, next_pin]

    ok("pki", "rotate", "--dir", setup)
    assert openssl_pin(setup / "pki/gateway.pem") == next_pin
    assert not (setup / "pki/gateway.next.key").exists()

    ok("pki", "rotate", "--dir", setup, "--keep-key")
    assert openssl_pin(setup / "pki/gateway.pem") == next_pin


def _damage(setup: Path, name: str, how: str) -> None:
    path = setup / name
    if how == "group-readable":
        path.chmod(0o640)
        return
    path.unlink()
    if how == "garbage":
        path.write_text(garbage_pem("PRIVATE KEY"))
        if path.suffix == ".key":
            path.chmod(0o600)  # garbage, not a permission problem
    elif how == "directory":
        path.mkdir()


BAD_INPUTS = [
    # (arguments, damage to the setup, text the one line must contain)
    (["init", "--dir", "{dir}/new"], None, "--org DOMAIN is required"),
    (["init", "--org", "not a domain", "--dir", "{dir}/new"], None, "--org: domain"),
    (["init", "--org", "acme", "--dir", "{dir}/new"], None, "needs at least two labels"),
    (["init", "--org", "acme.example", "--dir", "{dir}/gateway.yaml"], None, "not a directory"),
    (
        ["init", "--org", "a.example", "--dir", "{dir}/new", "--client-listen", "nope"],
        None,
        "--client-listen: 'nope' is not HOST:PORT",
    ),
    (
        ["init", "--org", "a.example", "--dir", "{dir}/new", "--validity-days", "0"],
        None,
        "--validity-days: 0 is out of range",
    ),
    (
        ["init", "--org", "a.example", "--dir", "{dir}/new", "--endpoint", "http://x"],
        None,
        "--endpoint: 'http://x' must be an https:// URL",
    ),
    (["pki", "show", "--dir", "{dir}/missing"], None, "missing: no such directory"),
    (["pki", "show", "--cert", "{dir}/missing.pem"], None, "missing.pem: no such certificate"),
    (["pki", "show", "--cert", "{dir}/rules.yaml"], None, "rules.yaml: not a PEM certificate"),
    (["pki", "show", "--dir", "{dir}"], ("pki/gateway.pem", "garbage"), "gateway.pem: not a PEM"),
    (["pki", "show", "--dir", "{dir}"], ("gateway.yaml", "garbage"), "gateway.yaml: "),
    (["pki", "rotate", "--dir", "{dir}"], ("pki/ca.key", "garbage"), "ca.key: not an unencrypted"),
    (["pki", "rotate", "--dir", "{dir}"], ("pki/ca.key", "directory"), "ca.key: is a directory"),
    (["pki", "rotate", "--dir", "{dir}"], ("pki/ca.key", "missing"), "ca.key: no such private"),
    (["pki", "rotate", "--dir", "{dir}", "--validity-days", "x"], None, "'x' is not a whole"),
    (
        ["pki", "rotate", "--dir", "{dir}", "--keep-key"],
        ("pki/gateway.key", "garbage"),
        "gateway.key: not an unencrypted",
    ),
    (["peer", "card", "--dir", "{dir}/missing"], None, "missing: no such directory"),
    (
        ["peer", "card", "--dir", "{dir}"],
        ("keys/org-signing.key", "garbage"),
        "org-signing.key: not an unencrypted PEM private key",
    ),
    (
        ["peer", "card", "--dir", "{dir}"],
        ("keys/org-signing.key", "directory"),
        "org-signing.key: is a directory",
    ),
    (["peer", "card", "--dir", "{dir}"], ("pki/ca.pem", "missing"), "ca.pem: no such certificate"),
    (
        ["peer", "card", "--dir", "{dir}"],
        ("keys/org-signing.key", "group-readable"),
        "org-signing.key: the private key file is accessible by group or others (mode 0640); "
        "run: chmod 600 ",
    ),
    (
        ["pki", "rotate", "--dir", "{dir}", "--keep-key"],
        ("pki/gateway.key", "group-readable"),
        "gateway.key: the private key file is accessible by group or others (mode 0640)",
    ),
    (["pki"], None, "name a command"),
    (["peer"], None, "name a command"),
]


@pytest.mark.parametrize(("args", "damage", "expected"), BAD_INPUTS)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    setup: Path, args: list[str], damage: tuple[str, str] | None, expected: str
) -> None:
    if damage is not None:
        _damage(setup, *damage)
    before = snapshot(setup)
    result = gateway(*(arg.format(dir=setup) for arg in args))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: error: ")
    assert expected in lines[0]
    assert "Z2FyYmFnZQ" not in lines[0]  # never a key's content
    assert snapshot(setup) == before
    assert not (setup / "new").exists()


def test_module_entry_point_works_too(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "init", "--org", "acme.example", "--dir", tmp_path / "m"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m/pki/gateway.pem").is_file()


def garbage_pem(label: str) -> str:
    """A PEM block of the given label around bytes that are no key (built at run time,
    so no file of the repository looks like it holds a private key)."""
    return f"-----BEGIN {label}-----\nZ2FyYmFnZQ==\n-----END {label}-----\n"
