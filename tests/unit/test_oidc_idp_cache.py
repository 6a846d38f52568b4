"""Discovery and JWKS caching (gateway.oidc.idp): bounded refresh on an unknown kid, stale window.

The IdP here is an httpx.MockTransport answering from a dict, so the cache's
decisions can be counted exactly; the real IdP is in tests/integration/test_oidc_idp.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.config import OIDCConfig, OIDCProvider
from gateway.errors import Reason, SignInError
from gateway.observability.metrics import (
    OIDC_FETCHES,
    OIDC_STALE_SERVES,
    OIDC_UNKNOWN_KID_REFRESHES,
)
from gateway.oidc.idp import IdP

ISSUER = "https://idp.test"
T0 = 1_800_000_000.0


class FakeIdP:
    def __init__(self) -> None:
        self.keys = [RSAKey.generate_key(2048, parameters={"kid": "k1"})]
        self.up = True
        self.requests: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if not self.up:
            raise httpx.ConnectError("down", request=request)
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "jwks_uri": f"{ISSUER}/jwks",
                    "token_endpoint": f"{ISSUER}/token",
                },
            )
        if request.url.path == "/jwks":
            return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in self.keys]})
        return httpx.Response(404)

    def token(self, kid: str, now: float) -> str:
        key = next(k for k in self.keys if k.kid == kid)
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": "s",
            "aud": "gateway",
            "exp": int(now) + 300,
            "iat": int(now),
        }
        return jwt.encode({"alg": "RS256", "kid": kid}, claims, key)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _value(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@pytest.fixture
def setup() -> tuple[FakeIdP, Clock, IdP]:
    fake, clock = FakeIdP(), Clock()
    name = f"p{id(fake) % 100000}"  # own metric series per test
    provider = OIDCProvider(name=name, issuer=ISSUER, client_id="gateway", audiences=("gateway",))
    settings = OIDCConfig(
        providers=(provider,), metadata_max_age=600, kid_refresh_interval=60, stale_for=3600
    )
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handler))
    return fake, clock, IdP(provider, settings, http=http, clock=clock)


async def test_cached_until_max_age(setup: tuple[FakeIdP, Clock, IdP]) -> None:
    fake, clock, idp = setup
    for _ in range(3):
        await idp.verify(fake.token("k1", clock.now))
    assert fake.requests == ["/.well-known/openid-configuration", "/jwks"]
    clock.now += 601
    await idp.verify(fake.token("k1", clock.now))
    assert fake.requests.count("/jwks") == 2
    assert _value(OIDC_FETCHES, idp.provider.name, "jwks", "ok") == 2


async def test_unknown_kid_refetches_once_per_interval(setup: tuple[FakeIdP, Clock, IdP]) -> None:
    fake, clock, idp = setup
    await idp.verify(fake.token("k1", clock.now))
    # the IdP rotates: a token with the new kid makes the gateway fetch the JWKS again
    fake.keys.append(RSAKey.generate_key(2048, parameters={"kid": "k2"}))
    assert (await idp.verify(fake.token("k2", clock.now))).subject == "s"
    assert fake.requests.count("/jwks") == 2
    # made-up kids: one refetch per interval at most, each refused
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k3"})
    forged = jwt.encode(
        {"alg": "RS256", "kid": "k3"},
        {"iss": ISSUER, "sub": "s", "aud": "gateway", "exp": int(T0) + 300, "iat": int(T0)},
        stranger,
    )
    for _ in range(50):
        with pytest.raises(SignInError) as caught:
            await idp.verify(forged)
        assert caught.value.reason is Reason.TOKEN_UNKNOWN_KEY
    assert fake.requests.count("/jwks") == 2  # the k2 refresh was under a minute ago
    clock.now += 61
    with pytest.raises(SignInError):
        await idp.verify(forged)
    assert fake.requests.count("/jwks") == 3
    name = idp.provider.name
    assert _value(OIDC_UNKNOWN_KID_REFRESHES, name, "refetched") == 2
    assert _value(OIDC_UNKNOWN_KID_REFRESHES, name, "throttled") == 50


async def test_stale_while_down_then_unavailable(setup: tuple[FakeIdP, Clock, IdP]) -> None:
    fake, clock, idp = setup
    await idp.verify(fake.token("k1", clock.now))
    fake.up = False
    clock.now += 601  # past max age: a refetch is tried, fails, the cache is served
    assert (await idp.verify(fake.token("k1", clock.now))).subject == "s"
    assert _value(OIDC_STALE_SERVES, idp.provider.name, "jwks") >= 1
    assert _value(OIDC_FETCHES, idp.provider.name, "discovery", "error") >= 1
    clock.now = T0 + 3601  # past stale_for
    with pytest.raises(SignInError) as caught:
        await idp.verify(fake.token("k1", clock.now))
    assert caught.value.reason is Reason.IDP_UNAVAILABLE
    fake.up = True
    assert (await idp.verify(fake.token("k1", clock.now))).subject == "s"


async def test_discovery_with_another_issuer_is_refused(setup: tuple[FakeIdP, Clock, IdP]) -> None:
    fake, clock, idp = setup

    def lying(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"issuer": "https://evil.test", "jwks_uri": "https://evil.test/jwks"}
        )

    liar = IdP(
        idp.provider,
        OIDCConfig(providers=(idp.provider,)),
        http=httpx.AsyncClient(transport=httpx.MockTransport(lying)),
        clock=clock,
    )
    with pytest.raises(SignInError) as caught:
        await liar.verify(fake.token("k1", clock.now))
    assert caught.value.reason is Reason.IDP_UNAVAILABLE
