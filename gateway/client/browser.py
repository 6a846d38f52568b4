"""Sign-in where a browser is at hand: the authorization code flow with PKCE (RFC 7636, RFC 8252).

``gateway client login --browser``: the client asks its gateway which IdP to
use (``GET /v1/sessions/providers``), reads the IdP's discovery document, and
listens once on a loopback port for the redirect. It shows (or opens) the
authorization URL with a fresh ``state``, ``nonce`` and S256 code challenge;
the user signs in in the browser, the IdP redirects to
``http://127.0.0.1:PORT/callback?code=...&state=...``; the client checks the
state, redeems the code with its verifier at the IdP's token endpoint (a
public client: no secret), and hands the ID token, the IdP's refresh token
and the nonce to the gateway (``POST /v1/sessions``, ``grant_type: id_token``),
which verifies all of it as for the device flow and opens a session.

Bounded: one listener, at most :data:`MAX_CALLBACK_REQUESTS` requests on it
(a favicon fetch, a stray scan), each read within :data:`CALLBACK_READ_TIMEOUT`
and at most :data:`MAX_CALLBACK_BYTES`; the browser's part within ``sign_in_within`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlencode, urlsplit

import h11
import httpx
import trio

from gateway.client.api import ClientSession
from gateway.client.signin import Clock, SavedSession
from gateway.errors import ConfigError, GatewayError

CALLBACK_PATH: Final = "/callback"
MAX_CALLBACK_REQUESTS: Final = 16
MAX_CALLBACK_BYTES: Final = 16 * 1024
CALLBACK_READ_TIMEOUT: Final = 10.0
DEFAULT_TIMEOUT: Final = 600.0  # ten minutes to sign in
_DONE_PAGE: Final = (
    b"<!doctype html><title>Signed in</title><p>Signed in. You can close this tab and "
    b"return to the terminal.</p>"
)
_FAILED_PAGE: Final = b"<!doctype html><title>Sign-in failed</title><p>Sign-in failed: %s</p>"

OnUrl = Callable[[str], None]


class BrowserSignInError(GatewayError):
    """The code flow did not complete: refused at the IdP, a wrong state, a timeout."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """A code verifier (43+ characters) and its S256 challenge (RFC 7636 4.1, 4.2)."""
    verifier = _b64(secrets.token_bytes(32))
    return verifier, _b64(hashlib.sha256(verifier.encode("ascii")).digest())


def _pick_provider(providers: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    if name is None and len(providers) == 1:
        return providers[0]
    for provider in providers:
        if provider.get("name") == name:
            return provider
    names = ", ".join(str(p.get("name")) for p in providers) or "none"
    raise ConfigError(f"no sign-in provider {name!r} at this gateway (it has: {names})")


async def _wait_for_callback(
    listener: trio.SocketListener, state: str, issuer: str
) -> dict[str, list[str]]:
    """Serve the loopback listener until the IdP's redirect with our ``state`` arrives."""
    for _ in range(MAX_CALLBACK_REQUESTS):
        stream = await listener.accept()
        async with stream:
            target = await _read_target(stream)
            if target is None:
                continue
            parts = urlsplit(target)
            if parts.path != CALLBACK_PATH:
                await _answer(stream, 404, b"not found")
                continue
            query = parse_qs(parts.query)
            if query.get("state") != [state]:
                await _answer(stream, 400, _FAILED_PAGE % b"unexpected state")
                raise BrowserSignInError("the redirect carried another state: sign in again")
            if "iss" in query and query["iss"] != [issuer]:  # RFC 9207: a mix-up
                await _answer(stream, 400, _FAILED_PAGE % b"unexpected issuer")
                raise BrowserSignInError("the redirect came from another issuer: sign in again")
            if "error" in query:
                await _answer(stream, 400, _FAILED_PAGE % b"refused by the identity provider")
                raise BrowserSignInError(
                    f"the identity provider refused: {query['error'][0][:100]}"
                )
            await _answer(stream, 200, _DONE_PAGE)
            return query
    raise BrowserSignInError("too many requests on the loopback listener, none the redirect")


async def _read_target(stream: trio.SocketStream) -> str | None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_CALLBACK_BYTES)
    with trio.move_on_after(CALLBACK_READ_TIMEOUT):
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                connection.receive_data(data)
                if not data:
                    return None
                continue
            if isinstance(event, h11.Request):
                return event.target.decode("ascii", "replace")
            return None
    return None


async def _answer(stream: trio.SocketStream, status: int, body: bytes) -> None:
    head = (
        f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
        "content-type: text/html; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
    ).encode("ascii")
    with trio.move_on_after(CALLBACK_READ_TIMEOUT):
        await stream.send_all(head + body)


async def browser_login(
    server: str,
    *,
    ca_file: Path | None,
    idp_ca_file: Path | None,
    provider: str | None,
    on_url: OnUrl,
    sign_in_within: float = DEFAULT_TIMEOUT,
    clock: Clock = time.time,
) -> SavedSession:
    """Sign in with the code flow and PKCE; the session the gateway opened."""
    async with ClientSession(server, "", ca_file=ca_file) as gateway:
        chosen = _pick_provider((await gateway.sign_in_providers())["providers"], provider)
        verify: ssl.SSLContext = ssl.create_default_context(
            cafile=str(idp_ca_file) if idp_ca_file is not None else None
        )
        async with httpx.AsyncClient(verify=verify, timeout=30.0) as idp:
            try:
                meta = (
                    await idp.get(
                        str(chosen["issuer"]).rstrip("/") + "/.well-known/openid-configuration"
                    )
                ).json()
            except (httpx.HTTPError, ValueError) as exc:
                raise BrowserSignInError(
                    f"cannot read the IdP's discovery document: {exc}"
                ) from exc
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            listener = listeners[0]
            try:
                port = listener.socket.getsockname()[1]
                redirect_uri = f"http://127.0.0.1:{port}{CALLBACK_PATH}"
                verifier, challenge = pkce_pair()
                state, nonce = _b64(secrets.token_bytes(16)), _b64(secrets.token_bytes(16))
                query = urlencode(
                    {
                        "response_type": "code",
                        "client_id": chosen["client_id"],
                        "redirect_uri": redirect_uri,
                        "scope": " ".join(chosen.get("scopes") or ["openid"]),
                        "state": state,
                        "nonce": nonce,
                        "code_challenge": challenge,
                        "code_challenge_method": "S256",
                    }
                )
                on_url(f"{meta['authorization_endpoint']}?{query}")
                with trio.fail_after(sign_in_within):
                    callback = await _wait_for_callback(listener, state, str(chosen["issuer"]))
            except trio.TooSlowError:
                raise BrowserSignInError("no sign-in in the browser in time") from None
            finally:
                for each in listeners:
                    await each.aclose()
            code = callback.get("code", [""])[0]
            try:
                redeemed = await idp.post(
                    meta["token_endpoint"],
                    data={
                        "grant_type": "authorization_code",
                        "code": code,
                        "redirect_uri": redirect_uri,
                        "client_id": chosen["client_id"],
                        "code_verifier": verifier,
                    },
                )
                tokens = redeemed.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise BrowserSignInError(f"the IdP's token endpoint failed: {exc}") from exc
            if redeemed.status_code != 200 or "id_token" not in tokens:
                raise BrowserSignInError(
                    f"the IdP refused the code ({str(tokens.get('error', 'no id_token'))[:100]})"
                )
        grant = {
            "grant_type": "id_token",
            "provider": str(chosen["name"]),
            "id_token": tokens["id_token"],
            "nonce": nonce,
        }
        if isinstance(tokens.get("refresh_token"), str):
            grant["refresh_token"] = tokens["refresh_token"]
        answer = await gateway.open_session(grant)
    return SavedSession.from_answer(server, answer, now=clock())
