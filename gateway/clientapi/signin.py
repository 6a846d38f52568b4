"""The client API's sign-in endpoints (docs/client-api.md, "Sign-in"), over gateway.oidc.

``GET /v1/sessions/providers`` says which IdPs a client may sign in with (for
a client that runs the code flow with PKCE itself); ``POST /v1/sessions/device``
starts a device sign-in; ``POST /v1/sessions``
exchanges a device code (once approved), an ID token from a client's own code
flow with PKCE, or a refresh token for a session; ``DELETE /v1/sessions/current``
signs out. None of them takes a bearer token: the grant in the body is the
credential, so they share one rate bound (:data:`SIGNIN_RATE` a second,
:data:`SIGNIN_BURST` at once; past it ``429 rate_limited`` with Retry-After):
each may make the gateway call the IdP, and a flood must not turn the gateway
into an amplifier against it. Refusals are ``{"error": <reason code>, "message": <for the user>}``;
the IdP's own error text is never passed on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import trio

from gateway.core.encoding import loads_strict
from gateway.core.ratelimit import RateLimiter
from gateway.errors import Reason, SignInError
from gateway.http import Request, Response, Router, error_response, json_response
from gateway.observability.metrics import OIDC_SIGNINS
from gateway.oidc.sessions import SessionService

SIGNIN_RATE: Final = 50.0  # sign-in calls a second, for the whole gateway
SIGNIN_BURST: Final = 500.0
_SIGNIN_KEY: Final = "signin"
MAX_SIGNIN_BODY_BYTES: Final = 32 * 1024  # an ID token and a refresh token, with room
GRANT_DEVICE_CODE: Final = "device_code"
GRANT_ID_TOKEN: Final = "id_token"  # noqa: S105 -- a grant type's name
GRANT_REFRESH_TOKEN: Final = "refresh_token"  # noqa: S105 -- a grant type's name

#: The HTTP status of each sign-in refusal; anything else is 400.
_STATUS: Final[Mapping[Reason, int]] = {
    Reason.IDP_UNAVAILABLE: 503,
    Reason.NO_GROUP: 403,
    Reason.GROUP_CONFLICT: 403,
    Reason.MFA_REQUIRED: 403,
    Reason.ACCESS_DENIED: 403,
    Reason.UNAUTHORIZED: 401,
    Reason.SESSION_EXPIRED: 401,
    Reason.REFRESH_REFUSED: 401,
    Reason.ADMIN_TOKENS_DISABLED: 401,
}
WWW_AUTHENTICATE: Final = ("www-authenticate", 'Bearer realm="gateway"')


def signin_error_response(exc: SignInError) -> Response:
    status = _STATUS.get(exc.reason, 400)
    headers = [WWW_AUTHENTICATE] if status == 401 else None
    if exc.reason is Reason.IDP_UNAVAILABLE:
        headers = [("retry-after", "30")]
    return json_response(
        status, {"error": exc.reason.value, "message": exc.message}, headers=headers
    )


def _body(request: Request, fields: set[str]) -> dict[str, str] | Response:
    if len(request.body) > MAX_SIGNIN_BODY_BYTES:
        return error_response(413, Reason.BODY_TOO_LARGE)
    try:
        value = loads_strict(request.body or b"{}")
    except ValueError:
        return error_response(400, Reason.PROTOCOL)
    if not isinstance(value, dict) or not set(value) <= fields:
        return error_response(400, Reason.PROTOCOL)
    if not all(isinstance(v, str) for v in value.values()):
        return error_response(400, Reason.PROTOCOL)
    return value


class SignInAPI:
    """Handlers of the sign-in endpoints; :meth:`add_routes` puts them on a router."""

    def __init__(self, sessions: SessionService, *, rate: RateLimiter | None = None) -> None:
        self._sessions = sessions
        self._rate = rate if rate is not None else RateLimiter(rate=SIGNIN_RATE, burst=SIGNIN_BURST)

    def _limited(self) -> Response | None:
        wait = self._rate.take(_SIGNIN_KEY, trio.current_time())
        if wait <= 0:
            return None
        OIDC_SIGNINS.labels("other", Reason.RATE_LIMITED.value).inc()
        return json_response(
            429,
            {"error": Reason.RATE_LIMITED.value, "message": "too many sign-ins; try again later"},
            headers=[("retry-after", str(max(1, math.ceil(wait))))],
        )

    def add_routes(self, router: Router) -> None:
        router.add("GET", "/v1/sessions/providers", self.get_providers)
        router.add("POST", "/v1/sessions/device", self.post_device)
        router.add("POST", "/v1/sessions", self.post_session)
        router.add("DELETE", "/v1/sessions/current", self.delete_current)

    async def get_providers(self, request: Request, params: Mapping[str, str]) -> Response:
        """What a client needs to run the code flow with PKCE itself (all public)."""
        return json_response(200, {"providers": self._sessions.provider_info()})

    async def post_device(self, request: Request, params: Mapping[str, str]) -> Response:
        limited = self._limited()
        if limited is not None:
            return limited
        body = _body(request, {"provider"})
        if isinstance(body, Response):
            return body
        try:
            started = await self._sessions.start_device(body.get("provider"))
        except SignInError as exc:
            return signin_error_response(exc)
        return json_response(200, started)

    async def post_session(self, request: Request, params: Mapping[str, str]) -> Response:
        limited = self._limited()
        if limited is not None:
            return limited
        body = _body(
            request,
            {"grant_type", "provider", "device_code", "id_token", "refresh_token", "nonce"},
        )
        if isinstance(body, Response):
            return body
        grant = body.get("grant_type")
        try:
            if grant == GRANT_DEVICE_CODE and "device_code" in body:
                signed_in = await self._sessions.complete_device(
                    body.get("provider"), body["device_code"]
                )
            elif grant == GRANT_ID_TOKEN and "id_token" in body:
                signed_in = await self._sessions.sign_in_with_id_token(
                    body.get("provider"),
                    body["id_token"],
                    idp_refresh_token=body.get("refresh_token"),
                    nonce=body.get("nonce"),
                )
            elif grant == GRANT_REFRESH_TOKEN and "refresh_token" in body:
                signed_in = await self._sessions.refresh(body["refresh_token"])
            else:
                return error_response(400, Reason.PROTOCOL)
        except SignInError as exc:
            return signin_error_response(exc)
        return json_response(200, signed_in.to_json(), headers=[("cache-control", "no-store")])

    async def delete_current(self, request: Request, params: Mapping[str, str]) -> Response:
        authorization = request.header("authorization") or ""
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not await self._sessions.sign_out(token.strip()):
            return error_response(401, Reason.UNAUTHORIZED, headers=[WWW_AUTHENTICATE])
        return Response(204, [], b"")
