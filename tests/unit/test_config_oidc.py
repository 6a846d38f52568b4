"""gateway.yaml's `oidc:` section: providers, session bounds, admin tokens on or off."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import DEFAULT_OIDC_ALGORITHMS, OIDCConfig, load_config
from gateway.errors import ConfigError

GOOD = """\
org: acme.example
oidc:
  providers:
    corp:
      issuer: https://idp.acme.example/realms/acme
      client_id: gateway
      client_secret_file: keys/oidc-secret
      audiences: [gateway, gateway-cli]
      user_claim: email
      clock_skew: 2m
      ca: pki/idp-ca.pem
  session_ttl: 5m
  refresh_ttl: 8h
  admin_tokens: false
"""


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return load_config(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_no_oidc_section_keeps_admin_tokens(tmp_path: Path) -> None:
    config = load(tmp_path, "org: acme.example\n")
    assert config.oidc == OIDCConfig()
    assert config.oidc.admin_tokens is True
    assert config.oidc.providers == ()


def test_a_full_provider(tmp_path: Path) -> None:
    oidc = load(tmp_path, GOOD).oidc
    (corp,) = oidc.providers
    assert corp.name == "corp"
    assert corp.issuer == "https://idp.acme.example/realms/acme"
    assert corp.audiences == ("gateway", "gateway-cli")
    assert corp.user_claim == "email"
    assert corp.clock_skew == 120.0
    assert corp.client_secret_file == tmp_path / "keys" / "oidc-secret"
    assert corp.ca == tmp_path / "pki" / "idp-ca.pem"
    assert corp.algorithms == DEFAULT_OIDC_ALGORITHMS
    assert (oidc.session_ttl, oidc.refresh_ttl, oidc.admin_tokens) == (300.0, 8 * 3600.0, False)
    assert oidc.provider("corp") is corp


def test_audiences_default_to_the_client_id(tmp_path: Path) -> None:
    text = (
        "org: a.example\noidc:\n  providers:\n"
        "    x:\n      issuer: https://i.example/\n      client_id: c\n"
    )
    (x,) = load(tmp_path, text).oidc.providers
    assert x.audiences == ("c",)
    assert x.issuer == "https://i.example/"  # kept exactly: it must equal the tokens' iss


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("issuer: https://idp.acme.example/realms/acme", "issuer: http://idp.acme.example"),
        ("algorithms", "algorithms: [HS256]"),
        ("algorithms", "algorithms: [none]"),
        ("session_ttl: 5m", "session_ttl: 2h"),
        ("refresh_ttl: 8h", "refresh_ttl: 1m"),
        ("admin_tokens: false", "admin_tokens: nope"),
        ("user_claim: email", "user_clam: email"),
        ("clock_skew: 2m", "clock_skew: 1h"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, change: str, says: str) -> None:
    if change == "algorithms":
        text = GOOD.replace(
            "      ca: pki/idp-ca.pem\n", f"      ca: pki/idp-ca.pem\n      {says}\n"
        )
    else:
        text = GOOD.replace(change, says)
    message = error_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "gateway.yaml"))
    key = says.split(":")[0].strip()
    assert key in message, message


def test_hmac_and_none_are_explained(tmp_path: Path) -> None:
    text = GOOD.replace(
        "      ca: pki/idp-ca.pem\n", "      ca: pki/idp-ca.pem\n      algorithms: [HS256]\n"
    )
    assert "asymmetric" in error_of(tmp_path, text)


def test_two_providers_with_one_issuer(tmp_path: Path) -> None:
    text = (
        "org: a.example\noidc:\n  providers:\n"
        "    x: {issuer: 'https://i.example', client_id: c}\n"
        "    y: {issuer: 'https://i.example', client_id: d}\n"
    )
    assert "another provider has this issuer" in error_of(tmp_path, text)
