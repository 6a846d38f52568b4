"""ID-token checks (gateway.oidc.idtoken): every refusal with its reason, tokens signed here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from gateway.config import OIDCProvider
from gateway.errors import Reason, SignInError
from gateway.oidc.idtoken import map_user, verify_id_token

ISSUER = "https://idp.acme.example/realms/acme"
NOW = 1_800_000_000
PROVIDER = OIDCProvider(
    name="corp", issuer=ISSUER, client_id="gateway", audiences=("gateway",), clock_skew=60.0
)
RSA = RSAKey.generate_key(2048, parameters={"kid": "k1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "k2"})
KEYS = KeySet.import_key_set({"keys": [RSA.as_dict(private=False), EC.as_dict(private=False)]})


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "sub-alice",
        "aud": "gateway",
        "exp": NOW + 300,
        "iat": NOW,
        "preferred_username": "alice",
        "groups": ["legal"],
        "acr": "mfa",
        "amr": ["pwd", "otp"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    payload: dict[str, Any], key: Any = RSA, alg: str = "RS256", kid: str | None = "k1"
) -> str:
    header: dict[str, Any] = {"alg": alg}
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(header, payload, key, algorithms=[alg])


def refused(token: str, reason: Reason, **kwargs: Any) -> SignInError:
    with pytest.raises(SignInError) as caught:
        verify_id_token(token, provider=PROVIDER, keys=KEYS, now=NOW, **kwargs)
    assert caught.value.reason is reason, caught.value
    assert token not in str(caught.value)
    return caught.value


def test_a_good_token_passes() -> None:
    token = verify_id_token(sign(claims()), provider=PROVIDER, keys=KEYS, now=NOW)
    assert token.subject == "sub-alice"
    assert token.acr == "mfa"
    assert token.amr == ("pwd", "otp")
    assert token.groups("groups") == {"legal"}
    es = sign(claims(), key=EC, alg="ES256", kid="k2")
    assert verify_id_token(es, provider=PROVIDER, keys=KEYS, now=NOW).subject == "sub-alice"


def test_another_issuer() -> None:
    refused(sign(claims(iss="https://evil.example")), Reason.TOKEN_ISSUER)


def test_another_audience() -> None:
    refused(sign(claims(aud="someone-else")), Reason.TOKEN_AUDIENCE)
    refused(sign(claims(aud=None)), Reason.TOKEN_AUDIENCE)


def test_azp() -> None:
    refused(sign(claims(aud=["gateway", "other"])), Reason.TOKEN_AZP)
    refused(sign(claims(azp="other")), Reason.TOKEN_AZP)
    ok = sign(claims(aud=["gateway", "other"], azp="gateway"))
    assert verify_id_token(ok, provider=PROVIDER, keys=KEYS, now=NOW)


def test_expired_within_and_beyond_the_skew() -> None:
    assert verify_id_token(sign(claims(exp=NOW - 59)), provider=PROVIDER, keys=KEYS, now=NOW)
    refused(sign(claims(exp=NOW - 60)), Reason.TOKEN_EXPIRED)


def test_issued_in_the_future() -> None:
    assert verify_id_token(sign(claims(iat=NOW + 60)), provider=PROVIDER, keys=KEYS, now=NOW)
    refused(sign(claims(iat=NOW + 61)), Reason.TOKEN_NOT_YET_VALID)
    refused(sign(claims(nbf=NOW + 61)), Reason.TOKEN_NOT_YET_VALID)
    refused(sign(claims(iat=None)), Reason.TOKEN_MALFORMED)


def test_bad_signature() -> None:
    impostor = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    refused(sign(claims(), key=impostor), Reason.TOKEN_SIGNATURE)
    head, _body, sig = sign(claims()).split(".")
    tampered = (
        base64.urlsafe_b64encode(json.dumps(claims(sub="sub-mallory")).encode())
        .rstrip(b"=")
        .decode()
    )
    refused(f"{head}.{tampered}.{sig}", Reason.TOKEN_SIGNATURE)


def _unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join(
        [part(json.dumps(header).encode()), part(json.dumps(payload).encode()), part(signature)]
    )


def test_alg_none_is_refused() -> None:
    refused(_unsigned({"alg": "none", "kid": "k1"}, claims()), Reason.TOKEN_ALGORITHM)
    refused(_unsigned({"alg": "None"}, claims()), Reason.TOKEN_ALGORITHM)


def test_hmac_keyed_with_the_public_key_is_refused() -> None:
    # the classic forgery: HS256 with the IdP's public key (which anyone has) as the secret;
    # joserfc will not even make such a key, so it is signed by hand here
    public_pem = RSA.as_pem(private=False)
    header = _unsigned({"alg": "HS256", "kid": "k1"}, claims()).rsplit(".", 1)[0]
    mac = hmac.new(public_pem, header.encode(), hashlib.sha256).digest()
    forged = header + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    refused(forged, Reason.TOKEN_ALGORITHM)
    hs_provider = OIDCProvider(**{**PROVIDER.__dict__, "algorithms": ("HS256",)})
    with pytest.raises(SignInError) as caught:  # even if an allowlist named it (config refuses)
        verify_id_token(forged, provider=hs_provider, keys=KEYS, now=NOW)
    assert caught.value.reason is Reason.TOKEN_SIGNATURE
    assert OctKey  # the JOSE library's symmetric keys exist; they are never used here


def test_unknown_kid() -> None:
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k9"})
    refused(sign(claims(), key=stranger, kid="k9"), Reason.TOKEN_UNKNOWN_KEY)
    refused(sign(claims(), kid=None), Reason.TOKEN_UNKNOWN_KEY)  # two keys: a kid is needed


def test_nonce() -> None:
    token = sign(claims(nonce="n-123"))
    assert verify_id_token(token, provider=PROVIDER, keys=KEYS, now=NOW, nonce="n-123")
    refused(token, Reason.TOKEN_NONCE, nonce="n-456")
    refused(sign(claims()), Reason.TOKEN_NONCE, nonce="n-123")


@pytest.mark.parametrize(
    "garbage", ["", "a.b", "a.b.c", "x" * 20000, "eyJhbGciOiJSUzI1NiJ9.e30", "....", "é.é.é"]
)
def test_garbage_is_malformed(garbage: str) -> None:
    with pytest.raises(SignInError) as caught:
        verify_id_token(garbage, provider=PROVIDER, keys=KEYS, now=NOW)
    assert caught.value.reason in (Reason.TOKEN_MALFORMED, Reason.TOKEN_ALGORITHM)


def test_payload_not_an_object() -> None:
    # a validly signed JWS whose payload is a JSON list
    listed = jws.serialize_compact({"alg": "RS256", "kid": "k1"}, b"[1, 2]", RSA)
    refused(listed, Reason.TOKEN_MALFORMED)


def _verified(**changes: Any):  # type: ignore[no-untyped-def]
    return verify_id_token(sign(claims(**changes)), provider=PROVIDER, keys=KEYS, now=NOW)


def test_user_claim_maps_to_a_local_address() -> None:
    assert str(map_user(_verified(), PROVIDER, "acme.example")) == "alice@acme.example"
    by_email = OIDCProvider(**{**PROVIDER.__dict__, "user_claim": "email"})
    token = _verified(email="Alice@ACME.example")
    assert str(map_user(token, by_email, "acme.example")) == "alice@acme.example"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "no 'preferred_username' claim"),
        ("Alice Smith", "not a user name or an address"),
        ("alice@globex.example", "not a user of acme.example"),
        (42, "no 'preferred_username' claim"),
    ],
)
def test_user_claim_that_does_not_map(value: object, says: str) -> None:
    with pytest.raises(SignInError, match=says) as caught:
        map_user(_verified(preferred_username=value), PROVIDER, "acme.example")
    assert caught.value.reason is Reason.USER_UNMAPPED
