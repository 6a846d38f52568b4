"""ID-token verification: pure, with the JOSE library (joserfc) doing the cryptography.

The checks, in order, each refusing with its own :class:`~gateway.errors.Reason`
(OpenID Connect Core 3.1.3.7):

1. the token is a compact JWS (``token_malformed``);
2. its ``alg`` is in the provider's allowlist, which holds asymmetric
   algorithms only, so ``none`` and HMAC keyed with a public key never verify
   (``token_algorithm``);
3. its ``kid`` names a key of the IdP's JWKS (``token_unknown_key``; the
   caller refetches the JWKS, bounded, and asks again: :func:`key_id`);
4. the signature verifies (``token_signature``);
5. ``iss`` is the provider's issuer (``token_issuer``), ``aud`` names one of
   its audiences (``token_audience``), ``azp`` is our client when present and
   present when there are several audiences (``token_azp``), ``exp`` is in the
   future and ``iat``/``nbf`` not (each within the clock skew:
   ``token_expired``, ``token_not_yet_valid``), ``nonce`` is the one sent when
   one was (``token_nonce``), ``sub`` is there.

Every refusal is a :class:`~gateway.errors.SignInError`; its message says which
check failed and never carries the token. ``now`` is passed in.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import KeySet

from gateway.config import OIDCProvider
from gateway.core.address import Address
from gateway.errors import AddressError, Reason, SignInError

MAX_ID_TOKEN_BYTES: Final = 16 * 1024  # ID tokens are ~1 KiB; a big group claim stays far below


@dataclass(frozen=True)
class VerifiedIdToken:
    """The claims of an ID token that passed every check."""

    provider: str  # the provider's name in gateway.yaml
    claims: Mapping[str, Any]

    @property
    def subject(self) -> str:
        return str(self.claims["sub"])

    @property
    def acr(self) -> str | None:
        value = self.claims.get("acr")
        return value if isinstance(value, str) else None

    @property
    def amr(self) -> tuple[str, ...]:
        value = self.claims.get("amr")
        if isinstance(value, list):
            return tuple(item for item in value if isinstance(item, str))
        return ()

    def groups(self, claim: str) -> frozenset[str]:
        """The IdP's groups of the user (``claim``: a list of strings, or one string)."""
        value = self.claims.get(claim)
        if isinstance(value, str):
            return frozenset({value})
        if isinstance(value, list):
            return frozenset(item for item in value if isinstance(item, str))
        return frozenset()


def _refuse(reason: Reason, message: str) -> SignInError:
    return SignInError(message, reason=reason)


def parse(token: str) -> jws.CompactSignature:
    """The token's JWS parts, not yet verified; ``token_malformed`` if it is not a JWS."""
    if not isinstance(token, str) or len(token) > MAX_ID_TOKEN_BYTES or token.count(".") != 2:
        raise _refuse(Reason.TOKEN_MALFORMED, "the ID token is not a compact JWS")
    try:
        return jws.extract_compact(token.encode("ascii"))
    except (JoseError, ValueError, UnicodeError):
        raise _refuse(Reason.TOKEN_MALFORMED, "the ID token is not a compact JWS") from None


def check_algorithm(signed: jws.CompactSignature, provider: OIDCProvider) -> str:
    alg = signed.headers().get("alg")
    if not isinstance(alg, str) or alg not in provider.algorithms:
        allowed = ", ".join(provider.algorithms)
        raise _refuse(
            Reason.TOKEN_ALGORITHM, f"the ID token's alg {alg!r} is not allowed ({allowed})"
        )
    return alg


def key_id(signed: jws.CompactSignature) -> str | None:
    kid = signed.headers().get("kid")
    return kid if isinstance(kid, str) else None


def has_key(keys: KeySet, kid: str | None) -> bool:
    """Whether ``keys`` holds the key for ``kid`` (no kid: the set has exactly one key)."""
    if kid is None:
        return len(keys.keys) == 1
    return any(key.kid == kid for key in keys.keys)


def verify_id_token(
    token: str,
    *,
    provider: OIDCProvider,
    keys: KeySet,
    now: float,
    nonce: str | None = None,
) -> VerifiedIdToken:
    """``token``'s claims if every check passes; :class:`SignInError` with the reason if not."""
    signed = parse(token)
    alg = check_algorithm(signed, provider)
    kid = key_id(signed)
    if not has_key(keys, kid):
        raise _refuse(Reason.TOKEN_UNKNOWN_KEY, f"no key {kid!r} in the IdP's JWKS")
    try:
        key = keys.get_by_kid(kid)
        if not jws.validate_compact(signed, key, algorithms=[alg]):
            raise BadSignatureError()
    except JoseError:
        raise _refuse(Reason.TOKEN_SIGNATURE, "the ID token's signature does not verify") from None
    try:
        claims = json.loads(signed.payload)
    except (TypeError, ValueError, UnicodeError):
        claims = None
    if not isinstance(claims, dict):
        raise _refuse(Reason.TOKEN_MALFORMED, "the ID token's payload is not a JSON object")
    check_claims(claims, provider=provider, now=now, nonce=nonce)
    return VerifiedIdToken(provider=provider.name, claims=claims)


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(Reason.TOKEN_MALFORMED, f"the ID token's {name} is missing or not a number")
    return float(value)


def check_claims(
    claims: Mapping[str, Any], *, provider: OIDCProvider, now: float, nonce: str | None
) -> None:
    """The claim checks of :func:`verify_id_token` (step 5), on an already verified payload."""
    if claims.get("iss") != provider.issuer:
        raise _refuse(Reason.TOKEN_ISSUER, f"the ID token is not from {provider.issuer}")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _refuse(Reason.TOKEN_MALFORMED, "the ID token has no sub")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise _refuse(Reason.TOKEN_AUDIENCE, "the ID token's aud is missing or malformed")
    if not set(audiences) & set(provider.audiences):
        raise _refuse(Reason.TOKEN_AUDIENCE, "the ID token is not meant for this gateway (aud)")
    azp = claims.get("azp")
    if azp is not None and azp != provider.client_id:
        raise _refuse(Reason.TOKEN_AZP, "the ID token was issued to another client (azp)")
    if azp is None and len(audiences) > 1:
        raise _refuse(Reason.TOKEN_AZP, "the ID token has several audiences and no azp")
    skew = provider.clock_skew
    exp = _number(claims, "exp", required=True)
    assert exp is not None
    if exp <= now - skew:
        raise _refuse(Reason.TOKEN_EXPIRED, "the ID token has expired")
    for name in ("iat", "nbf"):
        at = _number(claims, name, required=name == "iat")
        if at is not None and at > now + skew:
            raise _refuse(Reason.TOKEN_NOT_YET_VALID, f"the ID token's {name} is in the future")
    if nonce is not None:
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
            raise _refuse(Reason.TOKEN_NONCE, "the ID token's nonce is not the one sent")


def map_user(token: VerifiedIdToken, provider: OIDCProvider, org: str) -> Address:
    """The local user the provider's ``user_claim`` names; ``user_unmapped`` saying why not.

    The claim holds a user name (``alice``) or an address of this org
    (``alice@acme.example``, as an ``email`` or ``upn`` claim does).
    """
    claim = provider.user_claim
    value = token.claims.get(claim)
    if not isinstance(value, str) or not value:
        raise _refuse(Reason.USER_UNMAPPED, f"the ID token has no {claim!r} claim to name the user")
    try:
        address = Address.parse(value) if "@" in value else Address.of(value, org)
    except AddressError:
        raise _refuse(
            Reason.USER_UNMAPPED,
            f"the ID token's {claim!r} claim ({value!r}) is not a user name or an address",
        ) from None
    if address.org != org:
        raise _refuse(
            Reason.USER_UNMAPPED,
            f"the ID token's {claim!r} claim ({value!r}) is not a user of {org}",
        )
    return address
