"""One OpenID Provider as the gateway sees it: discovery and JWKS, cached; its token endpoints.

Theory of operation
-------------------
The discovery document (``issuer + /.well-known/openid-configuration``) and
the JWKS it points to are fetched over TLS (the provider's ``ca``, or the
system's CAs), and kept. Each is fetched again once it is older than
``metadata_max_age``; an ID token whose ``kid`` is in no cached key makes the
JWKS be fetched again at once (the IdP rotated its keys), but at most once per
``kid_refresh_interval`` per provider, so a stream of tokens with made-up
kids costs the IdP one request a minute, not one each. When a fetch fails
the cached copy is served while it is younger than ``stale_for`` (the IdP is
down, signed-in users keep working); past that, sign-in fails with
``idp_unavailable``. One :class:`trio.Lock` per provider means concurrent
requests wait for one fetch rather than each making its own.

Every fetch, stale serve and unknown-kid refresh is counted in
``gateway_oidc_*`` metrics with the provider's name (from gateway.yaml) as
label. httpx errors are translated here into ``SignInError(idp_unavailable)``;
an IdP's error text is logged locally, never passed to a client.

The token endpoint calls (device authorization, polling with a device code,
refresh) are here too; their outcomes map onto reason codes
(:data:`TOKEN_ERRORS`).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import trio
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gateway.config import OIDCConfig, OIDCProvider
from gateway.errors import ConfigError, Reason, SignInError
from gateway.observability.metrics import (
    OIDC_FETCHES,
    OIDC_METADATA_FETCHED,
    OIDC_STALE_SERVES,
    OIDC_UNKNOWN_KID_REFRESHES,
)
from gateway.oidc import idtoken
from gateway.oidc.idtoken import VerifiedIdToken

log = logging.getLogger("gateway.oidc")

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
HTTP_TIMEOUT: Final = 10.0
MAX_DOCUMENT_BYTES: Final = 256 * 1024  # discovery documents and JWKS are a few KiB
MAX_JWKS_KEYS: Final = 64
DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
DISCOVERY: Final = "discovery"
JWKS: Final = "jwks"

#: The token endpoint's error codes (RFC 6749 5.2, RFC 8628 3.5) as our reason codes.
TOKEN_ERRORS: Final[Mapping[str, Reason]] = {
    "authorization_pending": Reason.AUTHORIZATION_PENDING,
    "slow_down": Reason.SLOW_DOWN,
    "access_denied": Reason.ACCESS_DENIED,
    "expired_token": Reason.DEVICE_CODE_INVALID,
    "invalid_grant": Reason.DEVICE_CODE_INVALID,
}

Clock = Callable[[], float]


def idp_ssl_context(provider: OIDCProvider) -> ssl.SSLContext:
    """TLS 1.2 or newer to the IdP, verified against its ``ca`` or the system's CAs."""
    try:
        context = ssl.create_default_context(
            cafile=str(provider.ca) if provider.ca is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"oidc.providers.{provider.name}.ca: cannot load {provider.ca}: {exc}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def read_client_secret(provider: OIDCProvider) -> str | None:
    if provider.client_secret_file is None:
        return None
    try:
        secret = provider.client_secret_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"oidc.providers.{provider.name}.client_secret_file: cannot read "
            f"{provider.client_secret_file}: {exc.strerror or exc}"
        ) from None
    if not secret:
        raise ConfigError(f"oidc.providers.{provider.name}.client_secret_file: is empty")
    return secret


def _json_problem(response: httpx.Response, doc: str) -> str | None:
    """What is wrong with ``response`` as a JSON object document, or ``None``."""
    if response.status_code != 200:
        return f"{doc} answered {response.status_code}"
    if len(response.content) > MAX_DOCUMENT_BYTES:
        return f"{doc} is larger than {MAX_DOCUMENT_BYTES} bytes"
    try:
        value = response.json()
    except ValueError:
        return f"{doc} is not JSON"
    return None if isinstance(value, dict) else f"{doc} is not a JSON object"


@dataclass
class _Cached:
    value: Any
    fetched_at: float


@dataclass(frozen=True)
class TokenAnswer:
    """What the token endpoint gave: an ID token, and an IdP refresh token if any."""

    id_token: str | None
    refresh_token: str | None


class IdP:
    """One provider: cached metadata and keys, ID-token verification, token endpoint calls."""

    def __init__(
        self,
        provider: OIDCProvider,
        settings: OIDCConfig,
        *,
        http: httpx.AsyncClient,
        clock: Clock = time.time,
        client_secret: str | None = None,
    ) -> None:
        self.provider = provider
        self._settings = settings
        self._http = http
        self._clock = clock
        self._secret = client_secret
        self._lock = trio.Lock()
        self._metadata: _Cached | None = None
        self._keys: _Cached | None = None
        self._last_kid_refresh: float | None = None
        name = provider.name
        self._fetches = {
            (doc, result): OIDC_FETCHES.labels(name, doc, result)
            for doc in (DISCOVERY, JWKS)
            for result in ("ok", "error")
        }
        self._stale = {doc: OIDC_STALE_SERVES.labels(name, doc) for doc in (DISCOVERY, JWKS)}
        self._fetched = {doc: OIDC_METADATA_FETCHED.labels(name, doc) for doc in (DISCOVERY, JWKS)}
        self._kid_refreshes = {
            result: OIDC_UNKNOWN_KID_REFRESHES.labels(name, result)
            for result in ("refetched", "throttled")
        }

    # -- fetching ----------------------------------------------------------------
    async def _get_json(self, url: str, doc: str) -> dict[str, Any]:
        problem: object
        try:
            response = await self._http.get(url, headers={"accept": "application/json"})
        except httpx.HTTPError as exc:
            problem = exc
        else:
            problem = _json_problem(response, doc)
            if problem is None:
                self._fetches[(doc, "ok")].inc()
                return response.json()  # type: ignore[no-any-return]
        self._fetches[(doc, "error")].inc()
        log.warning("oidc %s: fetching %s failed: %s", self.provider.name, doc, problem)
        raise SignInError(
            f"the identity provider {self.provider.name} cannot be reached",
            reason=Reason.IDP_UNAVAILABLE,
        )

    async def _fetch_metadata(self) -> dict[str, Any]:
        url = self.provider.issuer.rstrip("/") + DISCOVERY_PATH
        meta = await self._get_json(url, DISCOVERY)
        if meta.get("issuer") != self.provider.issuer:
            self._fetches[(DISCOVERY, "error")].inc()
            log.warning(
                "oidc %s: discovery names issuer %r, not %r",
                self.provider.name,
                meta.get("issuer"),
                self.provider.issuer,
            )
            raise SignInError(
                f"the identity provider {self.provider.name} is misconfigured (issuer)",
                reason=Reason.IDP_UNAVAILABLE,
            )
        for field in ("jwks_uri", "token_endpoint"):
            value = meta.get(field)
            if not isinstance(value, str) or not value.startswith("https://"):
                raise SignInError(
                    f"the identity provider {self.provider.name} has no https {field}",
                    reason=Reason.IDP_UNAVAILABLE,
                )
        return meta

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        raw = await self._get_json(jwks_uri, JWKS)
        keys = raw.get("keys")
        if not isinstance(keys, list) or len(keys) > MAX_JWKS_KEYS:
            self._fetches[(JWKS, "error")].inc()
            raise SignInError("the IdP's JWKS is malformed", reason=Reason.IDP_UNAVAILABLE)
        usable = [
            key
            for key in keys
            if isinstance(key, dict) and key.get("use", "sig") == "sig" and key.get("kty") != "oct"
        ]
        try:
            return KeySet.import_key_set({"keys": usable})
        except (JoseError, ValueError, TypeError) as exc:
            raise SignInError("the IdP's JWKS is malformed", reason=Reason.IDP_UNAVAILABLE) from exc

    def _fresh(self, cached: _Cached | None, now: float) -> bool:
        return cached is not None and now - cached.fetched_at < self._settings.metadata_max_age

    def _usable_stale(self, cached: _Cached | None, now: float) -> bool:
        return cached is not None and now - cached.fetched_at < self._settings.stale_for

    async def metadata(self) -> dict[str, Any]:
        """The discovery document: cached, refetched when old, served stale within bounds."""
        async with self._lock:
            return await self._metadata_locked()

    async def _metadata_locked(self) -> dict[str, Any]:
        now = self._clock()
        if self._fresh(self._metadata, now):
            assert self._metadata is not None
            return dict(self._metadata.value)
        try:
            meta = await self._fetch_metadata()
        except SignInError:
            if self._usable_stale(self._metadata, now):
                assert self._metadata is not None
                self._stale[DISCOVERY].inc()
                return dict(self._metadata.value)
            raise
        self._metadata = _Cached(meta, now)
        self._fetched[DISCOVERY].set(now)
        return dict(meta)

    async def keys(self, kid: str | None = None) -> KeySet:
        """The JWKS: cached; refetched when old, or (bounded) when ``kid`` is in no key."""
        async with self._lock:
            now = self._clock()
            cached = self._keys
            if self._fresh(cached, now):
                assert cached is not None
                if idtoken.has_key(cached.value, kid):
                    return cached.value  # type: ignore[no-any-return]
                last = self._last_kid_refresh
                if last is not None and now - last < self._settings.kid_refresh_interval:
                    self._kid_refreshes["throttled"].inc()
                    return cached.value  # type: ignore[no-any-return]
                self._kid_refreshes["refetched"].inc()
                self._last_kid_refresh = now
            try:
                meta = await self._metadata_locked()
                keys = await self._fetch_keys(meta["jwks_uri"])
            except SignInError:
                if self._usable_stale(cached, now):
                    assert cached is not None
                    self._stale[JWKS].inc()
                    return cached.value  # type: ignore[no-any-return]
                raise
            self._keys = _Cached(keys, now)
            self._fetched[JWKS].set(now)
            return keys

    # -- ID tokens -----------------------------------------------------------------
    async def verify(self, token: str, *, nonce: str | None = None) -> VerifiedIdToken:
        """Verify ``token`` (:func:`.idtoken.verify_id_token`) with fresh enough keys."""
        signed = idtoken.parse(token)
        idtoken.check_algorithm(signed, self.provider)
        keys = await self.keys(idtoken.key_id(signed))
        return idtoken.verify_id_token(
            token, provider=self.provider, keys=keys, now=self._clock(), nonce=nonce
        )

    # -- the token endpoint ----------------------------------------------------------
    def _client_auth(self, data: dict[str, str]) -> httpx.BasicAuth | None:
        if self._secret is None:
            data["client_id"] = self.provider.client_id
            return None
        return httpx.BasicAuth(self.provider.client_id, self._secret)

    async def _post(self, url: str, data: dict[str, str], what: str) -> tuple[int, dict[str, Any]]:
        auth = self._client_auth(data)
        try:
            response = await self._http.post(
                url, data=data, auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT
            )
            body = response.json() if len(response.content) <= MAX_DOCUMENT_BYTES else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("oidc %s: %s failed: %s", self.provider.name, what, exc)
            raise SignInError(
                f"the identity provider {self.provider.name} cannot be reached",
                reason=Reason.IDP_UNAVAILABLE,
            ) from exc
        if not isinstance(body, dict):
            raise SignInError(
                f"the identity provider {self.provider.name} answered {what} with no JSON object",
                reason=Reason.IDP_UNAVAILABLE,
            )
        return response.status_code, body

    async def start_device_flow(self) -> dict[str, Any]:
        """RFC 8628 3.1: a device code and a user code, with where to enter the latter."""
        meta = await self.metadata()
        url = meta.get("device_authorization_endpoint")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise SignInError(
                f"the identity provider {self.provider.name} offers no device flow",
                reason=Reason.IDP_UNAVAILABLE,
            )
        status, body = await self._post(
            url, {"scope": " ".join(self.provider.scopes)}, "device authorization"
        )
        if status != 200 or not all(
            isinstance(body.get(name), str) for name in ("device_code", "user_code")
        ):
            log.warning("oidc %s: device authorization refused: %s", self.provider.name, status)
            raise SignInError(
                f"the identity provider {self.provider.name} refused to start a device sign-in",
                reason=Reason.IDP_UNAVAILABLE,
            )
        return body

    async def _token(self, data: dict[str, str], what: str, refused: Reason) -> TokenAnswer:
        meta = await self.metadata()
        status, body = await self._post(meta["token_endpoint"], data, what)
        if status != 200:
            error = body.get("error")
            reason = refused
            if refused is Reason.DEVICE_CODE_INVALID and isinstance(error, str):
                reason = TOKEN_ERRORS.get(error, refused)
            log.info("oidc %s: %s refused: %s", self.provider.name, what, error)
            raise SignInError(f"the identity provider refused the {what} ({reason})", reason=reason)
        id_token = body.get("id_token")
        refresh = body.get("refresh_token")
        return TokenAnswer(
            id_token=id_token if isinstance(id_token, str) else None,
            refresh_token=refresh if isinstance(refresh, str) else None,
        )

    async def poll_device(self, device_code: str) -> TokenAnswer:
        """RFC 8628 3.4: the tokens once the user approved; ``authorization_pending`` before."""
        return await self._token(
            {"grant_type": DEVICE_GRANT, "device_code": device_code},
            "device code",
            Reason.DEVICE_CODE_INVALID,
        )

    async def refresh(self, refresh_token: str) -> TokenAnswer:
        """A refresh at the IdP: it fails for a disabled user or a revoked grant."""
        return await self._token(
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            "refresh",
            Reason.REFRESH_REFUSED,
        )
