"""Sign-in through the client API against the real test IdP (device flow), over real sockets.

A gateway half (rules, SQLite, ClientAPI + SignInAPI on port 0) and the npm
oidc-provider over TLS. The session clock is the real clock plus an offset the
test moves, so a session token can expire without waiting; the IdP keeps its
own (real) time.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.client.api import ClientAPIError, ClientSession
from gateway.client.browser import browser_login
from gateway.client.signin import SavedSession, device_login, session_refresher
from gateway.clientapi import ClientAPI, MailboxWaiters
from gateway.clientapi.signin import SignInAPI
from gateway.clientapi.tokens import issue_token
from gateway.config import OIDCConfig, OIDCProvider
from gateway.core.address import Address
from gateway.core.ratelimit import RateLimiter
from gateway.http import HTTPServer, Request, Router
from gateway.observability.metrics import (
    OIDC_SESSION_REFRESHES,
    OIDC_SIGNINS,
    OIDC_UNKNOWN_KID_REFRESHES,
)
from gateway.oidc.idp import IdP, idp_ssl_context
from gateway.oidc.members import IdPMemberships
from gateway.oidc.sessions import SessionService
from gateway.pki import dev
from gateway.rules_runtime import RulesHolder
from gateway.storage.sqlite import SqliteStorage, open_sqlite_storage
from tests.certs_for_tests import CertAuthority
from tests.integration.test_client_api import OPENAPI, conforms
from tests.oidc_idp import IdPServer, IdPUser

ORG = "acme.example"
RULES = f"""\
version: 1
org: {ORG}
default: deny
groups:
  engineering:
    members: [alice, bob]
  legal:
    members_from: {{claim: groups, value: legal}}
  secure:
    members_from: {{value: secure}}
    requires: {{acr: urn:gateway:test:mfa}}
"""
SESSION_TTL = 300.0


class Clock:
    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return _wall_ms() + self.offset_ms


def _wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Half:
    client: httpx.AsyncClient
    idp: IdPServer
    store: SqliteStorage
    clock: Clock
    provider: str
    rules: RulesHolder
    sessions: SessionService

    async def rules_group(self, user: str) -> str | None:
        group = self.rules.current.group_of(user)
        return None if group is None else group.name

    async def device_sign_in(
        self, login: str, otp: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        started = await self.client.post("/v1/sessions/device", json={})
        assert started.status_code == 200, started.text
        code = started.json()
        assert code["provider"] == self.provider
        assert code["verification_uri"].startswith(self.idp.issuer)
        pending = await self.client.post(
            "/v1/sessions", json={"grant_type": "device_code", "device_code": code["device_code"]}
        )
        assert pending.status_code == 400
        assert pending.json()["error"] == "authorization_pending"
        await trio.to_thread.run_sync(
            lambda: self.idp.approve_device(code["user_code"], login, otp=otp)
        )
        done = await self.client.post(
            "/v1/sessions", json={"grant_type": "device_code", "device_code": code["device_code"]}
        )
        return code["device_code"], {"status": done.status_code, **done.json()}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@pytest.fixture
async def half(tmp_path: Path) -> AsyncIterator[Half]:
    users = {
        "alice": IdPUser("sub-alice", "pw-alice", ["engineering"], otp="135790"),
        "carol": IdPUser("sub-carol", "pw-carol", ["legal"]),
        "mallory": IdPUser("sub-mallory", "pw-mallory"),
        "dana": IdPUser("sub-dana", "pw-dana", ["secure"], otp="246802"),
        "eve": IdPUser("sub-eve", "pw-eve", ["legal", "secure"]),
    }
    idp = IdPServer(tmp_path / "idp", CertAuthority.create("IdP CA"), users)
    await trio.to_thread.run_sync(idp.start)
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    name = f"sig{len(str(tmp_path)) % 97}"
    provider = OIDCProvider(
        name=name, issuer=idp.issuer, client_id="gateway", audiences=("gateway",), ca=idp.ca_path
    )
    settings = OIDCConfig(providers=(provider,), session_ttl=SESSION_TTL, refresh_ttl=3600)
    clock = Clock()
    try:
        async with (
            open_sqlite_storage(tmp_path / "gw.sqlite3") as store,
            httpx.AsyncClient(verify=idp_ssl_context(provider), timeout=10) as http,
        ):
            memberships = IdPMemberships()
            rules = RulesHolder.load(str(rules_path), idp_members=memberships)
            sessions = SessionService(
                memberships=memberships,
                org=ORG,
                config=settings,
                idps={name: IdP(provider, settings, http=http)},
                storage=store,
                rules=rules,
                clock_ms=clock,
            )
            api = ClientAPI(
                org=ORG,
                rules=rules,
                storage=store,
                org_signing_seed=dev.generate_signing_key().private_bytes_raw(),
                waiters=MailboxWaiters(),
                sessions=sessions,
                admin_tokens=False,
            )
            router = Router()
            api.add_routes(router)
            SignInAPI(sessions).add_routes(router)
            server = HTTPServer(f"signin-{name}", router, ssl_context=None)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(server.serve, "127.0.0.1", 0)
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=30
                ) as client:
                    yield Half(client, idp, store, clock, name, rules, sessions)
                nursery.cancel_scope.cancel()
    finally:
        idp.stop()


async def test_device_sign_in_expiry_refresh_and_disabling(half: Half) -> None:
    ok_before = _count(OIDC_SIGNINS, half.provider, "ok")
    device_code, signed = await half.device_sign_in("alice", otp="135790")
    assert signed["status"] == 200, signed
    assert signed["address"] == "alice@acme.example"
    assert signed["group"] == "engineering"
    assert signed["expires_in"] == SESSION_TTL
    assert _count(OIDC_SIGNINS, half.provider, "ok") == ok_before + 1
    me = await half.client.get("/v1/me", headers=bearer(signed["session_token"]))
    assert me.status_code == 200
    assert me.json()["address"] == "alice@acme.example"

    # the device code is spent: refused, counted, no second session
    replay = await half.client.post(
        "/v1/sessions", json={"grant_type": "device_code", "device_code": device_code}
    )
    assert replay.status_code == 400
    assert replay.json()["error"] == "device_code_invalid"
    assert _count(OIDC_SIGNINS, half.provider, "device_code_invalid") >= 1

    # the session token expires; the refresh re-checks the IdP and gives a new pair
    half.clock.offset_ms += int(SESSION_TTL * 1000) + 1000
    expired = await half.client.get("/v1/me", headers=bearer(signed["session_token"]))
    assert expired.status_code == 401
    assert expired.json()["error"] == "session_expired"
    refreshed = await half.client.post(
        "/v1/sessions",
        json={"grant_type": "refresh_token", "refresh_token": signed["refresh_token"]},
    )
    assert refreshed.status_code == 200, refreshed.text
    renewed = refreshed.json()
    assert renewed["session_token"] != signed["session_token"]
    openapi = yaml.safe_load(OPENAPI.read_text())
    conforms(openapi, "/v1/sessions", "post", 200, renewed)
    conforms(openapi, "/v1/sessions", "post", 401, expired.json())
    conforms(openapi, "/v1/sessions", "post", 400, replay.json())
    assert (
        await half.client.get("/v1/me", headers=bearer(renewed["session_token"]))
    ).status_code == 200
    # a refresh token is good once
    again = await half.client.post(
        "/v1/sessions",
        json={"grant_type": "refresh_token", "refresh_token": signed["refresh_token"]},
    )
    assert again.status_code == 401
    assert again.json()["error"] == "session_expired"

    # disabled at the IdP: the next refresh is refused and the session is gone
    half.idp.disable("alice")
    half.clock.offset_ms += int(SESSION_TTL * 1000) + 1000
    refused_before = _count(OIDC_SESSION_REFRESHES, half.provider, "refresh_refused")
    refused = await half.client.post(
        "/v1/sessions",
        json={"grant_type": "refresh_token", "refresh_token": renewed["refresh_token"]},
    )
    assert refused.status_code == 401
    assert refused.json()["error"] == "refresh_refused"
    assert _count(OIDC_SESSION_REFRESHES, half.provider, "refresh_refused") == refused_before + 1
    gone = await half.client.get("/v1/me", headers=bearer(renewed["session_token"]))
    assert gone.status_code == 401
    assert (await half.store.session_by_refresh(b"\0" * 32)) is None


async def test_a_user_in_no_group_is_refused_at_sign_in(half: Half) -> None:
    _, signed = await half.device_sign_in("mallory")
    assert signed["status"] == 403
    assert signed["error"] == "no_group"
    assert "mallory is in no group" in signed["message"]
    body = {key: value for key, value in signed.items() if key != "status"}  # the harness's
    conforms(yaml.safe_load(OPENAPI.read_text()), "/v1/sessions", "post", 403, body)


async def test_sign_out(half: Half) -> None:
    _, signed = await half.device_sign_in("carol")
    assert signed["group"] == "legal"
    out = await half.client.delete("/v1/sessions/current", headers=bearer(signed["session_token"]))
    assert out.status_code == 204
    me = await half.client.get("/v1/me", headers=bearer(signed["session_token"]))
    assert me.status_code == 401
    again = await half.client.delete(
        "/v1/sessions/current", headers=bearer(signed["session_token"])
    )
    assert again.status_code == 401


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_bad_id_tokens_are_refused_with_their_reason(half: Half) -> None:
    now = _wall_ms() // 1000
    claims = {
        "iss": half.idp.issuer,
        "sub": "sub-alice",
        "aud": "gateway",
        "exp": now + 60,
        "iat": now,
    }
    none_alg = f"{_b64(json.dumps({'alg': 'none'}).encode())}.{_b64(json.dumps(claims).encode())}."
    for token, reason in [("garbage", "token_malformed"), (none_alg, "token_algorithm")]:
        answer = await half.client.post(
            "/v1/sessions", json={"grant_type": "id_token", "id_token": token}
        )
        assert answer.status_code == 400
        assert answer.json()["error"] == reason
        assert _count(OIDC_SIGNINS, half.provider, reason) >= 1
    unknown_grant = await half.client.post("/v1/sessions", json={"grant_type": "password"})
    assert unknown_grant.status_code == 400


async def test_admin_tokens_turned_off(half: Half) -> None:
    token = await issue_token(half.store, Address.of("bob", ORG), at_ms=_wall_ms())
    refused = await half.client.get("/v1/me", headers=bearer(token))
    assert refused.status_code == 401
    assert refused.json()["error"] == "admin_tokens_disabled"
    assert "gateway client login" in refused.json()["message"]


async def test_groups_from_the_idp_and_mfa(half: Half) -> None:
    # carol's legal membership comes from the IdP's groups claim
    _, carol = await half.device_sign_in("carol")
    assert carol["status"] == 200, carol
    assert carol["group"] == "legal"
    assert half.store is not None
    # ... and the rules know it for her as a recipient too (the gateway's directory)
    group = await half.rules_group("carol")
    assert group == "legal"

    # a group that requires MFA refuses a password-only session, saying why
    _, weak = await half.device_sign_in("dana")
    assert weak["status"] == 403
    assert weak["error"] == "mfa_required"
    assert "group secure requires a stronger sign-in (acr urn:gateway:test:mfa)" in weak["message"]
    _, strong = await half.device_sign_in("dana", otp="246802")
    assert strong["status"] == 200, strong
    assert strong["group"] == "secure"

    # two groups from the IdP's claims: refused at sign-in with the reason
    _, eve = await half.device_sign_in("eve")
    assert eve["status"] == 403
    assert eve["error"] == "group_conflict"
    assert "legal (IdP claim groups=legal)" in eve["message"]
    assert "secure (IdP claim groups=secure)" in eve["message"]


async def test_reference_client_login_and_transparent_refresh(half: Half, tmp_path: Path) -> None:
    """What `gateway client login` and the later commands do, against the real IdP."""
    server = str(half.client.base_url).rstrip("/")
    shown: list[dict[str, Any]] = []

    def person_at_the_browser(started: dict[str, Any]) -> None:
        shown.append(started)
        half.idp.approve_device(started["user_code"], "alice", otp="135790")

    saved = await device_login(
        server, ca_file=None, provider=None, on_code=person_at_the_browser
    )  # polls after the IdP's interval (5 s): the one real wait of these tests
    assert shown[0]["verification_uri"].startswith(half.idp.issuer)
    assert (saved.address, saved.group) == ("alice@acme.example", "engineering")
    path = tmp_path / "alice.session.json"
    saved.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert SavedSession.load(path) == saved

    refresh = session_refresher(path, saved, ca_file=None)
    async with ClientSession(server, saved.session_token, refresh=refresh) as session:
        assert (await session.me())["address"] == "alice@acme.example"
        half.clock.offset_ms += int(SESSION_TTL * 1000) + 1000
        # expired: the session refreshes itself once and repeats the call
        assert (await session.me())["address"] == "alice@acme.example"
    renewed = SavedSession.load(path)
    assert renewed.session_token != saved.session_token
    assert renewed.refresh_token != saved.refresh_token

    # disabled at the IdP: the next refresh fails with the reason the client shows
    half.idp.disable("alice")
    half.clock.offset_ms += int(SESSION_TTL * 1000) + 1000
    again = session_refresher(path, renewed, ca_file=None)
    async with ClientSession(server, renewed.session_token, refresh=again) as session:
        with pytest.raises(ClientAPIError) as refused:
            await session.me()
    assert refused.value.code == "refresh_refused"
    assert "refused the refresh" in str(refused.value)


async def test_every_bad_id_token_is_refused_counted_and_changes_nothing(half: Half) -> None:
    """Tokens signed with the test IdP's own keys (the test made them), but wrong in one way."""
    idp_key = RSAKey.import_key(half.idp.jwks["keys"][0])  # kid rsa-1, served in the IdP's JWKS
    now = _wall_ms() // 1000
    good: dict[str, Any] = {
        "iss": half.idp.issuer,
        "sub": "sub-alice",
        "aud": "gateway",
        "exp": now + 60,
        "iat": now,
        "preferred_username": "alice",
        "groups": ["engineering"],
    }

    def signed(key: Any = idp_key, kid: str = "rsa-1", alg: str = "RS256", **changes: Any) -> str:
        return jwt.encode({"alg": alg, "kid": kid}, {**good, **changes}, key)

    stranger = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    unknown = RSAKey.generate_key(2048, parameters={"kid": "not-at-the-idp"})
    body = signed().split(".")[1]
    cases = {
        "token_issuer": signed(iss="https://idp.other.example"),
        "token_audience": signed(aud="another-client"),
        "token_expired": signed(exp=now - 3600, iat=now - 7200),
        "token_signature": signed(key=stranger),
        "token_algorithm": f"{_b64(json.dumps({'alg': 'none'}).encode())}.{body}.",
        "token_unknown_key": signed(key=unknown, kid="not-at-the-idp"),
        "token_azp": signed(aud=["gateway", "other"]),
        "token_not_yet_valid": signed(iat=now + 3600),
        "user_unmapped": signed(preferred_username="Alice Smith"),
    }
    # the sign-in that works, with the same key: the cases differ in one thing each
    assert (
        await half.client.post(
            "/v1/sessions", json={"grant_type": "id_token", "id_token": signed()}
        )
    ).status_code == 200
    sessions_before = len(await half.store.session_groups())
    for reason, token in cases.items():
        counted = _count(OIDC_SIGNINS, half.provider, reason)
        answer = await half.client.post(
            "/v1/sessions", json={"grant_type": "id_token", "id_token": token}
        )
        assert answer.status_code == 400, (reason, answer.text)
        assert answer.json()["error"] == reason, (reason, answer.json())
        assert token not in answer.text
        assert _count(OIDC_SIGNINS, half.provider, reason) == counted + 1, reason
    assert len(await half.store.session_groups()) == sessions_before
    # made-up kids: the JWKS was fetched again once, then the refetches are throttled
    forged = [signed(key=unknown, kid=f"made-up-{i}") for i in range(20)]
    throttled = _count(OIDC_UNKNOWN_KID_REFRESHES, half.provider, "throttled")
    for token in forged:
        answer = await half.client.post(
            "/v1/sessions", json={"grant_type": "id_token", "id_token": token}
        )
        assert answer.json()["error"] == "token_unknown_key"
    assert _count(OIDC_UNKNOWN_KID_REFRESHES, half.provider, "throttled") == throttled + 20


async def test_browser_login_with_pkce(half: Half) -> None:
    """`gateway client login --browser`: the code flow with PKCE and a loopback redirect."""
    server = str(half.client.base_url).rstrip("/")
    answer = (await half.client.get("/v1/sessions/providers")).json()
    conforms(yaml.safe_load(OPENAPI.read_text()), "/v1/sessions/providers", "get", 200, answer)
    providers = answer["providers"]
    assert providers == [
        {
            "name": half.provider,
            "issuer": half.idp.issuer,
            "client_id": "gateway",
            "scopes": ["openid", "profile", "email", "groups", "offline_access"],
        }
    ]
    urls: list[str] = []
    pages: list[str] = []
    got_url = trio.Event()

    def on_url(url: str) -> None:
        urls.append(url)
        got_url.set()

    result: list[SavedSession] = []

    async def login() -> None:
        result.append(
            await browser_login(
                server, ca_file=None, idp_ca_file=half.idp.ca_path, provider=None, on_url=on_url
            )
        )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(login)
            await got_url.wait()
            assert "code_challenge_method=S256" in urls[0]
            assert "nonce=" in urls[0]
            pages.append(
                await trio.to_thread.run_sync(lambda: half.idp.browser_sign_in(urls[0], "carol"))
            )
    assert "Signed in" in pages[0]
    (saved,) = result
    assert (saved.address, saved.group) == ("carol@acme.example", "legal")
    me = await half.client.get("/v1/me", headers=bearer(saved.session_token))
    assert me.json()["group"] == "legal"
    # the IdP's refresh token came along: the session refreshes like a device-flow one
    refreshed = await half.client.post(
        "/v1/sessions", json={"grant_type": "refresh_token", "refresh_token": saved.refresh_token}
    )
    assert refreshed.status_code == 200, refreshed.text


async def test_sign_in_calls_share_one_rate_bound(half: Half) -> None:
    limited_api = SignInAPI(
        half.sessions, rate=RateLimiter(rate=0.001, burst=2)
    )  # two calls, then a very long wait
    request = Request("POST", "/v1/sessions", body=b'{"grant_type": "id_token", "id_token": "x"}')
    first = await limited_api.post_session(request, {})
    second = await limited_api.post_session(request, {})
    assert (first.status, second.status) == (400, 400)
    before = _count(OIDC_SIGNINS, "other", "rate_limited")
    third = await limited_api.post_session(request, {})
    assert third.status == 429
    assert json.loads(third.body)["error"] == "rate_limited"
    assert dict(third.headers)["retry-after"] == "1000"
    assert _count(OIDC_SIGNINS, "other", "rate_limited") == before + 1


@pytest.mark.parametrize(
    "token", ["gws_" + "é" * 43, "gws_" + "a" * 42 + "!", "gws_", "gwt_" + "a" * 43, "gws"]
)
async def test_garbage_bearer_and_refresh_tokens_are_401(half: Half, token: str) -> None:
    me = await half.client.get(
        "/v1/me", headers={"authorization": f"Bearer {token}".encode("latin-1")}
    )
    assert me.status_code == 401
    refresh = await half.client.post(
        "/v1/sessions",
        json={"grant_type": "refresh_token", "refresh_token": token.replace("gws_", "gwr_")},
    )
    assert refresh.status_code == 401
    assert refresh.json()["error"] == "session_expired"
