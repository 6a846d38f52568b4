"""The test IdP itself: a real oidc-provider over TLS, device flow, MFA acr, disabling.

What the sign-in tests rely on, checked once here against the IdP directly
(no gateway involved), so a failure there points at the gateway, not the harness.
"""

from __future__ import annotations

from pathlib import Path

from joserfc import jwt
from joserfc.jwk import KeySet

from tests.certs_for_tests import CertAuthority
from tests.oidc_idp import MFA_ACR, PWD_ACR, IdPUser, running_idp

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def _device_sign_in(idp, browser, login: str, otp: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    meta = browser.get(f"{idp.issuer}/.well-known/openid-configuration").json()
    started = browser.post(
        meta["device_authorization_endpoint"],
        data={"client_id": "gateway", "scope": "openid profile groups offline_access"},
    ).json()
    idp.approve_device(started["user_code"], login, otp=otp)
    answer = browser.post(
        meta["token_endpoint"],
        data={
            "grant_type": DEVICE_GRANT,
            "device_code": started["device_code"],
            "client_id": "gateway",
        },
    )
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    tokens["_meta"] = meta
    tokens["_device_code"] = started["device_code"]
    return tokens


def test_device_flow_mfa_groups_and_disabling(tmp_path: Path) -> None:
    users = {
        "alice": IdPUser("sub-alice", "alice-pw", ["engineering"], otp="246810"),
        "carol": IdPUser("sub-carol", "carol-pw", ["legal"]),
    }
    with running_idp(tmp_path / "idp", CertAuthority.create("IdP CA"), users) as idp:
        assert idp.issuer.startswith("https://127.0.0.1:")
        with idp.http() as browser:
            alice = _device_sign_in(idp, browser, "alice", otp="246810")
            carol = _device_sign_in(idp, browser, "carol")
            keys = KeySet.import_key_set(browser.get(alice["_meta"]["jwks_uri"]).json())

            token = jwt.decode(alice["id_token"], keys, algorithms=["RS256"])
            assert token.claims["iss"] == idp.issuer
            assert token.claims["aud"] == "gateway"
            assert token.claims["preferred_username"] == "alice"
            assert token.claims["acr"] == MFA_ACR
            assert token.claims["amr"] == ["pwd", "otp"]
            carol_claims = jwt.decode(carol["id_token"], keys, algorithms=["RS256"]).claims
            assert carol_claims["groups"] == ["legal"]
            assert carol_claims["acr"] == PWD_ACR

            token_endpoint = alice["_meta"]["token_endpoint"]
            refreshed = browser.post(
                token_endpoint,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": alice["refresh_token"],
                    "client_id": "gateway",
                },
            )
            assert refreshed.status_code == 200, refreshed.text
            idp.disable("alice")
            refused = browser.post(
                token_endpoint,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": refreshed.json()["refresh_token"],
                    "client_id": "gateway",
                },
            )
            assert refused.status_code == 400
            assert refused.json()["error"] == "invalid_grant"

            # a device code is good for one exchange only; a replay also revokes
            # what the first exchange gave (RFC 6749 4.1.2)
            replay = browser.post(
                token_endpoint,
                data={
                    "grant_type": DEVICE_GRANT,
                    "device_code": carol["_device_code"],
                    "client_id": "gateway",
                },
            )
            assert replay.status_code == 400
            assert replay.json()["error"] == "invalid_grant"
            after_replay = browser.post(
                token_endpoint,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": carol["refresh_token"],
                    "client_id": "gateway",
                },
            )
            assert after_replay.status_code == 400
