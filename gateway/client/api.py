"""The client API seen from a client: one session, one method per endpoint.

:class:`ClientSession` speaks docs/client-api.md over one persistent httpx
connection pool. It knows nothing of keys or plaintext: it moves envelopes
(already sealed) and signed key records. The reference client
(``gateway client``), the demo and the benchmark are built on it.

Errors are translated at this edge: a transport failure is a
:class:`ClientTransportError`; an answer with an error code is a
:class:`ClientAPIError` carrying the gateway's reason code and HTTP status.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, decode_answer, encode_batch
from gateway.core.encoding import b64url_encode
from gateway.core.envelope import Envelope, encode_envelope
from gateway.core.records import decode_envelope_record_json
from gateway.errors import GatewayError, ProtocolError, Reason, RemoteError

#: Time to connect, send and get an answer (a long-poll adds its own wait on top).
DEFAULT_TIMEOUT = 30.0
_JSON_HEADERS = {"content-type": "application/json"}
_BINARY_BATCH_HEADERS = {"content-type": MEDIA_TYPE_BATCH_V1}
#: A fetch asks for the binary answer; JSON, which every gateway speaks, will do.
FETCH_ACCEPT = f"{MEDIA_TYPE_BATCH_V1}, application/json;q=0.5"
_FETCH_HEADERS = {"accept": FETCH_ACCEPT}

ReadAnswer = Callable[[httpx.Response], Any]


def _content_headers(content_type: str) -> dict[str, str]:
    if content_type == MEDIA_TYPE_BATCH_V1:
        return _BINARY_BATCH_HEADERS
    if content_type == "application/json":
        return _JSON_HEADERS
    return {"content-type": content_type}


class ClientTransportError(GatewayError):
    """The gateway could not be reached or did not answer."""


class _BrokenAnswer(Exception):
    """An answer of status ok whose body does not read: a transport failure, said so."""


def _read_json(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError as exc:
        raise _BrokenAnswer("answer is not JSON") from exc


def _media_type(answer: httpx.Response) -> str:
    content_type: str = answer.headers.get("content-type", "")
    return content_type.partition(";")[0].strip().lower()


def _read_mailbox_answer(answer: httpx.Response, *, limit: int) -> list[Envelope]:
    """The envelopes of a mailbox answer, in whichever form the gateway chose.

    Its ``Content-Type`` says which: the binary answer (each record a stored
    envelope's canonical encoding, read with the ciphertext cut out of the
    JSON scan), or JSON from a gateway that predates it and ignores
    ``Accept``. A record that is no envelope raises ``EnvelopeError``, as an
    element of a JSON answer does.
    """
    if _media_type(answer) != MEDIA_TYPE_BATCH_V1:
        return [Envelope.from_json(item) for item in _read_json(answer)["envelopes"]]
    try:
        records = decode_answer(answer.content, max_envelopes=limit)
    except ProtocolError as exc:
        raise _BrokenAnswer(exc.message) from exc
    envelopes = []
    for index, record in enumerate(records, 1):
        try:
            obj = decode_envelope_record_json(record)
        except ValueError as exc:
            raise _BrokenAnswer(f"record #{index} of the answer is not JSON") from exc
        envelopes.append(Envelope.from_json(obj))
    return envelopes


class ClientAPIError(RemoteError):
    """The gateway answered with an error; ``code`` is its reason code."""

    def __init__(
        self, status: int, code: str, message: str | None = None, *, rule: str | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.rule = rule  # the deciding rule's `file:line` of a policy refusal
        text = f"gateway answered {status} {code}" + (f" (rule {rule})" if rule else "")
        super().__init__(text + (f": {message}" if message else ""), reason=Reason.PROTOCOL)


@dataclass(frozen=True, slots=True)
class Submitted:
    """The answer to one submitted envelope: its id, and a status or an error code."""

    envelope_id: str | None
    status: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def client_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the gateway against ``ca_file`` (the org CA), or the system's CAs."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ClientSession:
    """One user's session with its gateway's client API."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 4,
        refresh: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        """``token`` may be empty for the sign-in endpoints. With ``refresh``, an answer
        ``401 session_expired`` makes the session call it for a new token and try once more."""
        self.server = server.rstrip("/")
        self._refresh = refresh
        verify: ssl.SSLContext | bool = (
            client_ssl_context(ca_file) if self.server.startswith("https://") else False
        )
        self._timeout = timeout
        # Batches go in the binary framing until the gateway says it does not take it.
        self.binary_batches = True
        self._http = httpx.AsyncClient(
            base_url=self.server,
            headers={"authorization": f"Bearer {token}"} if token else None,
            verify=verify,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        content: bytes | None = None,
        content_type: str = "application/json",
        params: dict[str, int] | None = None,
        extra_time: float = 0.0,
        ok: Sequence[int] = (200, 202),
        headers: Mapping[str, str] | None = None,
        read: ReadAnswer = _read_json,
    ) -> Any:
        call = functools.partial(
            self._call_once,
            method,
            path,
            json=json,
            content=content,
            content_type=content_type,
            params=params,
            extra_time=extra_time,
            ok=ok,
            headers=headers,
            read=read,
        )
        try:
            return await call()
        except ClientAPIError as exc:
            if self._refresh is None or exc.status != 401 or exc.code != "session_expired":
                raise
        # The session token expired: trade the refresh token for a new one, once.
        self._http.headers["authorization"] = f"Bearer {await self._refresh()}"
        return await call()

    async def _call_once(
        self,
        method: str,
        path: str,
        *,
        json: object,
        content: bytes | None,
        params: dict[str, int] | None,
        extra_time: float,
        ok: Sequence[int],
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        read: ReadAnswer = _read_json,
    ) -> Any:
        """One request; ``headers`` go with it, ``read`` reads an answer of an ``ok`` status."""
        if content is not None:
            headers = {**_content_headers(content_type), **(headers or {})}
        try:
            answer = await self._http.request(
                method,
                path,
                json=json,
                content=content,
                headers=headers,
                params=params,
                timeout=self._timeout + extra_time,
            )
        except httpx.HTTPError as exc:
            raise ClientTransportError(
                f"{self.server}: {type(exc).__name__}: {exc or 'no answer'}"
            ) from exc
        if answer.status_code not in ok:
            code, message, rule = "http_error", None, None
            try:
                body = answer.json()
                code = str(body.get("error", code))
                message = body.get("message")
                rule = body.get("rule")
            except ValueError:
                pass
            raise ClientAPIError(
                answer.status_code,
                code,
                message,
                rule=rule if isinstance(rule, str) else None,
            )
        if answer.status_code == 204:
            return None
        try:
            return read(answer)
        except _BrokenAnswer as exc:
            raise ClientTransportError(f"{self.server}: {exc}") from exc

    # -- sign-in (docs/client-api.md 1a) ----------------------------------------------------
    async def sign_in_providers(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("GET", "/v1/sessions/providers", ok=(200,))
        return answer

    async def start_device_sign_in(self, provider: str | None = None) -> dict[str, Any]:
        body = {"provider": provider} if provider else {}
        answer: dict[str, Any] = await self._call("POST", "/v1/sessions/device", json=body)
        return answer

    async def open_session(self, grant: dict[str, str]) -> dict[str, Any]:
        """``POST /v1/sessions``: a device code, an ID token or a refresh token for a session."""
        answer: dict[str, Any] = await self._call_once(
            "POST",
            "/v1/sessions",
            json=grant,
            content=None,
            params=None,
            extra_time=0.0,
            ok=(200,),
        )
        return answer

    async def sign_out(self) -> None:
        await self._call_once(
            "DELETE",
            "/v1/sessions/current",
            json=None,
            content=None,
            params=None,
            extra_time=0.0,
            ok=(204,),
        )

    async def me(self) -> dict[str, Any]:
        """``GET /v1/me``: the caller's address, group and the group's limits."""
        result: dict[str, Any] = await self._call("GET", "/v1/me")
        return result

    async def submit(self, envelope: Envelope) -> Submitted:
        """``POST /v1/envelopes``; a refusal raises :class:`ClientAPIError`."""
        # encode_envelope: the ciphertext is copied in, not scanned by a JSON encoder.
        body = await self._call("POST", "/v1/envelopes", content=encode_envelope(envelope))
        return Submitted(body.get("id"), body.get("status"))

    async def submit_batch(self, envelopes: Sequence[Envelope]) -> list[Submitted]:
        """``POST /v1/envelopes/batch``: one answer per envelope, in order.

        The body is the binary batch (docs/client-api.md): each envelope's
        canonical encoding, which the gateway keeps as it is. A gateway that
        answers ``415`` does not take it (an older one): this session then
        sends JSON, now and from then on. Nothing was stored on a ``415``.
        """
        records = [encode_envelope(envelope) for envelope in envelopes]
        body: Any = None
        if self.binary_batches:
            try:
                body = await self._call(
                    "POST",
                    "/v1/envelopes/batch",
                    content=encode_batch(records),
                    content_type=MEDIA_TYPE_BATCH_V1,
                )
            except ClientAPIError as exc:
                if exc.status != 415:
                    raise
                self.binary_batches = False
        if body is None:
            content = b'{"envelopes":[' + b",".join(records) + b"]}"
            body = await self._call("POST", "/v1/envelopes/batch", content=content)
        return [
            Submitted(item.get("id"), item.get("status"), item.get("error"))
            for item in body["results"]
        ]

    async def fetch(self, *, wait: int = 0, limit: int = 100) -> list[Envelope]:
        """``GET /v1/mailbox``: up to ``limit`` envelopes, waiting up to ``wait`` s for one.

        Asks for the binary answer (docs/client-api.md, "The binary answer")
        and reads the form the answer's ``Content-Type`` names: a gateway that
        predates it answers JSON whatever the request accepts.
        """
        envelopes: list[Envelope] = await self._call(
            "GET",
            "/v1/mailbox",
            params={"wait": wait, "limit": limit},
            extra_time=wait,
            headers=_FETCH_HEADERS,
            read=functools.partial(_read_mailbox_answer, limit=limit),
        )
        return envelopes

    async def ack(
        self,
        envelope_ids: Sequence[str],
        *,
        retention: Mapping[str, tuple[str, bytes]] | None = None,
        unread: Sequence[str] = (),
    ) -> int:
        """``POST /v1/mailbox/ack``: delete these from the mailbox; returns how many went.

        Under inbound retention: ``retention`` maps each id read to (key id,
        retention copy), and ``unread`` lists those the client could not open.
        """
        request: dict[str, object] = {"ids": list(envelope_ids)}
        if retention is not None:
            request["retention"] = {
                envelope_id: {"key_id": key_id, "wrap": b64url_encode(wrap)}
                for envelope_id, (key_id, wrap) in retention.items()
            }
            request["unread"] = list(unread)
        body = await self._call("POST", "/v1/mailbox/ack", json=request)
        return int(body["deleted"])

    async def report_retention_mismatch(self, envelope_ids: Sequence[str]) -> int:
        """``POST /v1/reports/retention-mismatch``: envelopes refused for a dishonest
        retention copy; returns how many the gateway recorded."""
        body = await self._call(
            "POST", "/v1/reports/retention-mismatch", json={"ids": list(envelope_ids)}
        )
        return int(body["recorded"])

    async def status(self, envelope_id: str) -> dict[str, Any]:
        """``GET /v1/status/{id}``: ``{"id", "status", "at"}`` of an envelope we sent."""
        result: dict[str, Any] = await self._call("GET", f"/v1/status/{envelope_id}")
        return result

    async def publish_keys(self, public_keys: dict[str, object]) -> dict[str, Any]:
        """``PUT /v1/keys``: publish our public keys; returns the org-signed record."""
        result: dict[str, Any] = await self._call("PUT", "/v1/keys", json=public_keys)
        return result

    async def lookup_keys(self, address: str) -> dict[str, Any]:
        """``GET /v1/keys/{address}``: the signed key record (local, or through the peer)."""
        result: dict[str, Any] = await self._call("GET", f"/v1/keys/{address}")
        return result

    async def org_signing_key(self, org: str) -> str:
        """``GET /v1/orgs/{org}``: the org key records are checked with (``ed25519:...``)."""
        body = await self._call("GET", f"/v1/orgs/{org}")
        key = body.get("signing_key") if isinstance(body, dict) else None
        if not isinstance(key, str):
            raise ClientTransportError(f"{self.server}: /v1/orgs/{org}: no signing_key")
        return key
