"""A lean HTTP/1.1 client: h11 over trio's ``SSLStream``, one request per connection at a time.

The federation hot path sends one ``PUT`` per transaction to a peer over a
few persistent connections. This module is the part of that which speaks
HTTP: dial (TCP, then the TLS handshake under one connect deadline), write a
request's head and body in **one** ``send_all`` (one TLS record where it fits
in 16 KiB), read the answer with h11 up to a byte limit, and say whether the
connection may carry another request. Pooling, endpoint failover, trust and
the translation into :class:`~gateway.federation.transport.TransportError`
are the transport's (``gateway/federation/transport.py``); this module knows
nothing of peers or rules.

Failures are raised as the small tree below, in the same places httpx would
raise its own, so the transport translates them into the same words:

==================  ============================================================
``ConnectError``    no connection: TCP refused or unreachable, a failed handshake
``ConnectTimeout``  TCP connect and handshake not done within the timeout
``WriteTimeout``    the request not written within the timeout
``ReadTimeout``     no byte of the answer for the timeout
``PoolTimeout``     no connection of the peer free within the timeout
``ConnectionLost``  the connection broke, or the server spoke broken HTTP;
                    ``before_answer`` when no byte of an answer had arrived
``AnswerTooLarge``  the answer is over the caller's byte limit
``RequestInvalid``  h11 refused our own request (a bug or a bad endpoint URL)
==================  ============================================================

Each timeout is per phase and per operation, as httpx's: the connect timeout
covers TCP and the handshake; the write timeout the one write; the read
timeout each wait for more bytes of the answer.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

RECEIVE_BYTES: Final = 64 * 1024  # one read of the answer
DEFAULT_HTTPS_PORT: Final = 443

OpenTCP = Callable[[str, int], Awaitable[trio.abc.Stream]]


class LeanHTTPError(Exception):
    """A request that got no usable answer; the subclass says in which phase."""


class ConnectError(LeanHTTPError):
    """No connection: TCP failed, or the TLS handshake did (the cause says which)."""


class LeanTimeout(LeanHTTPError):
    """A phase took longer than the timeout."""


class ConnectTimeout(LeanTimeout, ConnectError):
    """TCP connect and TLS handshake not done in time (also a ``ConnectError``)."""


class WriteTimeout(LeanTimeout):
    pass


class ReadTimeout(LeanTimeout):
    pass


class PoolTimeout(LeanTimeout):
    pass


class ConnectionLost(LeanHTTPError):
    """The connection broke or the server's HTTP was broken.

    ``before_answer``: not a byte of an answer had arrived, so the server may
    not have seen the request at all (on a reused connection, the usual case
    is a server that closed it while it was idle).
    """

    def __init__(self, message: str, *, before_answer: bool) -> None:
        super().__init__(message)
        self.before_answer = before_answer


class AnswerTooLarge(LeanHTTPError):
    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class RequestInvalid(LeanHTTPError):
    """h11 refused to frame our request (a bad endpoint URL, or a bug of ours)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to dial and what to put in the request line and ``Host``."""

    url: str
    host: str  # for connecting: a name or an IP, without brackets
    port: int
    authority: str  # the Host header: as httpx writes it (no :443)
    prefix: str  # the URL's path, without a trailing slash

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``ValueError`` unless ``url`` is ``https://HOST[:PORT][/PATH]``."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"endpoint URL with user, query or fragment: {url!r}")
        port = parts.port or DEFAULT_HTTPS_PORT  # ValueError for a port out of range
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        authority = shown if port == DEFAULT_HTTPS_PORT else f"{shown}:{port}"
        return cls(url, host, port, authority, parts.path.rstrip("/"))


class Connection:
    """One TLS connection to one endpoint and its h11 state."""

    __slots__ = ("endpoint", "h11", "idle_since", "index", "requests", "stream")

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream], endpoint: Endpoint, index: int):
        self.stream = stream
        self.endpoint = endpoint
        self.index = index  # the endpoint's place in the peer's list
        self.h11 = h11.Connection(h11.CLIENT)
        self.requests = 0  # answered on this connection so far
        self.idle_since = trio.current_time()

    def dropped(self) -> bool:
        """The server closed (or wrote to) this idle connection: do not reuse it.

        An idle HTTP/1.1 connection has nothing to read; bytes or EOF waiting
        mean the server is closing it.
        """
        transport = self.stream.transport_stream
        if isinstance(transport, trio.SocketStream):
            return transport.socket.is_readable()
        return False  # a test's in-memory stream: nothing to ask

    async def aclose(self, *, within: float) -> None:
        """Close politely (TLS close_notify) within ``within`` seconds, else at once."""
        with trio.move_on_after(within, shield=True) as timer:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.aclose()
        if timer.cancelled_caught:
            await trio.aclose_forcefully(self.stream)


async def open_connection(
    endpoint: Endpoint,
    index: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str,
    phase_timeout: float,
    open_tcp: OpenTCP,
) -> Connection:
    """TCP and the TLS handshake with ``server_hostname`` as SNI and checked name."""
    with trio.move_on_after(phase_timeout) as timer:
        try:
            tcp = await open_tcp(endpoint.host, endpoint.port)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {endpoint.url}: {exc}") from exc
        tls = trio.SSLStream(tcp, context, server_hostname=server_hostname, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            raise ConnectError(f"TLS handshake with {endpoint.url} failed") from exc
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return Connection(tls, endpoint, index)
    assert timer.cancelled_caught
    raise ConnectTimeout(f"connecting to {endpoint.url} took over {phase_timeout} s")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated ones
    body: bytes
    reusable: bool  # the connection may carry the next request


def frame_request(
    conn: Connection, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes | None
) -> bytes:
    """The request's bytes, head and body together (h11 checks each header)."""
    all_headers = [("host", conn.endpoint.authority), *headers]
    if body is not None:
        all_headers.append(("content-length", str(len(body))))
    try:
        head = conn.h11.send(
            h11.Request(method=method, target=conn.endpoint.prefix + path, headers=all_headers)
        )
        parts = [head] if head else []
        if body:
            parts.extend(conn.h11.send_with_data_passthrough(h11.Data(data=body)) or ())
        tail = conn.h11.send(h11.EndOfMessage())
    except h11.LocalProtocolError as exc:
        raise RequestInvalid(f"cannot frame {method} {path}: {exc}") from exc
    if tail:
        parts.append(tail)
    return b"".join(parts)


async def exchange(
    conn: Connection,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
    *,
    limit: int,
    phase_timeout: float,
) -> Answer:
    """Send one request on ``conn`` and read its answer (up to ``limit`` bytes of body).

    On any exception the connection is left in a state the caller must close.
    """
    data = frame_request(conn, method, path, headers, body)
    write_failed: BaseException | None = None
    with trio.move_on_after(phase_timeout) as timer:
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # As httpcore: a server may answer (413, 503) and close before reading
            # all of a body; look for that answer before calling it a broken link.
            write_failed = exc
    if timer.cancelled_caught:
        raise WriteTimeout(f"writing to {conn.endpoint.url} took over {phase_timeout} s")
    try:
        return await _read_answer(conn, limit=limit, phase_timeout=phase_timeout)
    except ConnectionLost as exc:
        if write_failed is not None:
            raise ConnectionLost(
                f"the connection to {conn.endpoint.url} broke while the request was written",
                before_answer=exc.before_answer,
            ) from write_failed
        raise


async def _read_answer(conn: Connection, *, limit: int, phase_timeout: float) -> Answer:
    state = conn.h11
    received_any = False
    status = 0
    headers: dict[str, str] = {}
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            event = state.next_event()
        except h11.RemoteProtocolError as exc:
            raise ConnectionLost(
                f"{conn.endpoint.url} sent a broken answer: {exc}", before_answer=not received_any
            ) from exc
        if event is h11.NEED_DATA:
            with trio.move_on_after(phase_timeout) as timer:
                try:
                    data = await conn.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ConnectionLost(
                        f"the connection to {conn.endpoint.url} broke",
                        before_answer=not received_any,
                    ) from exc
            if timer.cancelled_caught:
                raise ReadTimeout(f"no answer from {conn.endpoint.url} for {phase_timeout} s")
            received_any = received_any or bool(data)
            state.receive_data(bytes(data))  # b"" is the server's EOF
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {
                name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers
            }
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise AnswerTooLarge(
                    f"answer of {declared} bytes is over our limit of {limit}", status=status
                )
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise AnswerTooLarge(f"answer is over our limit of {limit} bytes", status=status)
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            reusable = state.our_state is h11.DONE and state.their_state is h11.DONE
            if reusable:
                try:
                    state.start_next_cycle()
                except h11.LocalProtocolError:
                    reusable = False
            conn.requests += 1
            return Answer(status, headers, b"".join(chunks), reusable)
        else:  # ConnectionClosed before the end of an answer
            raise ConnectionLost(
                f"{conn.endpoint.url} closed the connection without an answer",
                before_answer=not received_any,
            )
