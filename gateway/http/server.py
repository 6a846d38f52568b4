"""One listener: HTTP/1.1 on h11 over trio streams, optionally mutual TLS.

Theory of operation
-------------------
:meth:`HTTPServer.serve` binds, then runs two nurseries: an inner one with one
accept loop per bound socket, and an outer one holding one task per
connection. The accept loop closes a connection at once when the listener
already holds ``max_connections``; otherwise it starts the connection's task.

A connection's task, in order:

1. **TLS** (when the listener has an ``ssl_context``): the handshake within
   ``handshake_timeout``, then ``identify(stream)``, which names the org proven
   by the client certificate or raises :class:`~gateway.errors.PeerAuthError`.
   Any failure closes the connection and is counted in
   ``gateway_tls_handshake_failures_total{listener, reason}``
   (reasons: :mod:`gateway.http.tls`, or the ``PeerAuthError``'s reason).
2. **Per-peer cap**: an org already holding ``max_connections_per_peer``
   connections gets ``503`` to its first request, and the connection closes.
3. **Requests**, one at a time (keep-alive, as h11 allows): wait for the first
   byte (``idle_timeout`` between requests, ``request_timeout`` for a new
   connection's first request), then read the whole request, head and body,
   within ``request_timeout`` of that byte, then call the handler, then send
   the response with ``Content-Length``. Limits answer with 431/413/408 and
   ``Connection: close``, then the connection lingers briefly, discarding
   input, so the client can read the answer before the socket closes.

A handler's :class:`~gateway.errors.RemoteError` becomes 400 with
``{"error": reason, "message": ...}`` (the message is for the party that
caused it); a :class:`~gateway.errors.StorageFullError` (no room on the disk:
nothing was stored) becomes 507 ``insufficient_storage`` with ``Retry-After``
and one log line; any other :class:`~gateway.errors.StorageError` (the
database failed or went away: nothing was acknowledged) becomes 503
``storage_error`` with ``Retry-After``, one log line and a count in
``gateway_storage_unavailable_total``; any other exception becomes 500 with ``{"error":
"internal_error"}``, its traceback goes to the log (logger ``gateway.http``),
and the connection stays usable: the request was read whole before the
handler ran.

**Nothing raised by one connection reaches the listener's nursery**: each task
catches every ``Exception``, logs it and closes its own stream. Only
cancellation passes.

Stopping
--------
* :meth:`HTTPServer.close_peer_connections` cancels every connection whose
  proven org is the one given (a peer just removed from the rules): in-flight
  work on them is abandoned, the sockets close.
* :meth:`HTTPServer.stop_accepting` begins a graceful stop: the listening
  sockets close, connections waiting for a request (or in a handshake) close
  now, a request in progress is finished and answered with
  ``Connection: close``. :meth:`serve` returns when the last connection is
  gone, or after ``drain_timeout``, when the rest are cancelled.
* Cancelling :meth:`serve` closes everything at once.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import h11
import trio
from prometheus_client import Counter

from gateway.errors import (
    ConfigError,
    PeerAuthError,
    ProtocolError,
    Reason,
    RemoteError,
    StorageError,
    StorageFullError,
)
from gateway.http.limits import (
    KIB,
    REFUSED_BAD_REQUEST,
    REFUSED_BODY_TOO_LARGE,
    REFUSED_CONNECTION_LIMIT,
    REFUSED_HEADER_TOO_LARGE,
    REFUSED_PEER_CONNECTION_LIMIT,
    REFUSED_REASONS,
    REFUSED_REQUEST_TIMEOUT,
    REFUSED_SEND_TIMEOUT,
    ServerLimits,
)
from gateway.http.messages import (
    Handler,
    Request,
    Response,
    error_response,
    json_response,
    parse_target,
)
from gateway.http.tls import classify_handshake_error, describe_ssl_error
from gateway.observability.metrics import (
    HTTP_CONNECTIONS_REFUSED,
    HTTP_REQUESTS,
    STORAGE_UNAVAILABLE,
    TLS_HANDSHAKE_FAILURES,
)

LOGGER = logging.getLogger("gateway.http")

RECEIVE_BYTES: Final = 16 * KIB  # one read from a socket; h11 buffers at most a head + this
LINGER_TIMEOUT: Final = 1.0  # after an error answer, how long we let the client read it
LINGER_MAX_BYTES: Final = 256 * KIB  # ...and how much of its input we discard meanwhile
ACCEPT_RETRY_DELAY: Final = 0.1  # accept() failed for lack of file descriptors or memory
RETRY_AFTER_SECONDS: Final = 1  # told to a peer refused by the per-peer cap
STORAGE_RETRY_AFTER_SECONDS: Final = 30  # told on a full disk (507), like gateway.reserve
STORAGE_UNAVAILABLE_RETRY_AFTER_SECONDS: Final = 5  # told when the database failed (503)
# Rough size of what the request line and header framing add to the names and values.
HEAD_OVERHEAD_BYTES: Final = 16
HEADER_FRAMING_BYTES: Final = 4  # ": " and CRLF per header line

_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Framing is ours: a handler's own copies of these are dropped.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "date"})
_NO_BODY_STATUSES = frozenset({204, 304})
_MIN_STATUS, _MAX_STATUS = 200, 599

Identify = Callable[["trio.SSLStream[trio.SocketStream]"], str]


@dataclass(eq=False)
class _Connection:
    """What the server knows of one open connection."""

    remote: tuple[str, int]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    peer: str | None = None
    counts_for_peer: bool = False  # holds a slot under max_connections_per_peer
    idle_scope: trio.CancelScope | None = None  # set while a drain may close it at once


class _Refusal(Exception):
    """A request the layer answers itself (4xx) and then closes the connection."""

    def __init__(self, status: int, reason: Reason, counted_as: str) -> None:
        super().__init__(reason.value)
        self.status = status
        self.reason = reason
        self.counted_as = counted_as


class HTTPServer:
    """One named listener serving ``handler``; see the module docstring."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        identify: Identify | None = None,
        limits: ServerLimits = ServerLimits(),  # noqa: B008 (frozen, shared safely)
    ) -> None:
        if identify is not None and ssl_context is None:
            raise ValueError(f"listener {name!r}: identify needs an ssl_context (mutual TLS)")
        self.name = name
        self.limits = limits
        self.port: int | None = None  # bound port, once serving
        self._handler = handler
        self._ssl_context = ssl_context
        self._identify = identify
        self._connections: set[_Connection] = set()
        self._per_peer: dict[str, int] = {}
        self._accept_scope = trio.CancelScope()
        self._draining = False
        self._started = False
        self._refused: dict[str, Counter] = {
            reason: HTTP_CONNECTIONS_REFUSED.labels(name, reason) for reason in REFUSED_REASONS
        }
        self._answered: dict[int, Counter] = {}
        self._handshake_failures: dict[Reason, Counter] = {}

    # -- control ---------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def peer_connections(self, org: str) -> int:
        """How many open connections ``org`` holds under its per-peer cap."""
        return self._per_peer.get(org, 0)

    def close_peer_connections(self, org: str) -> int:
        """Abort every open connection proven to be ``org``'s; return how many."""
        closed = 0
        for conn in self._connections:
            if conn.peer == org:
                conn.scope.cancel()
                closed += 1
        if closed:
            LOGGER.info("%s: closing %d connection(s) of peer %s", self.name, closed, org)
        return closed

    def set_ssl_context(self, ssl_context: ssl.SSLContext) -> None:
        """Handshake connections accepted from now on with ``ssl_context`` (rules reload).

        Open connections keep the context they were made with; to be rid of a
        peer, :meth:`close_peer_connections` too. A listener without TLS stays
        without it (``ValueError``).
        """
        if self._ssl_context is None:
            raise ValueError(f"listener {self.name!r} serves without TLS; it cannot switch to TLS")
        self._ssl_context = ssl_context

    def stop_accepting(self) -> None:
        """Begin a graceful stop; :meth:`serve` returns once drained."""
        self._draining = True
        self._accept_scope.cancel()
        for conn in self._connections:
            if conn.idle_scope is not None:
                conn.idle_scope.cancel()

    # -- serving -----------------------------------------------------------------

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` until stopped; ``task_status.started(bound_port)``.

        With port 0 the kernel picks the port. A host that resolves to several
        addresses gets one socket each, and with port 0 the reported port is
        the first one's.
        """
        if self._started:
            raise RuntimeError(f"listener {self.name!r} is already serving")
        self._started = True
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(
                f"{self.name} listener: cannot listen on {where}: {exc.strerror or exc}"
            ) from exc
        self.port = int(listeners[0].socket.getsockname()[1])
        try:
            async with trio.open_nursery() as connections:
                with self._accept_scope:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(self._accept_loop, listener, connections)
                        task_status.started(self.port)
                # Only stop_accepting() ends the accept loops: refuse new
                # connections at the TCP level, then give the rest a bound.
                await _close_all(listeners)
                connections.cancel_scope.deadline = trio.current_time() + self.limits.drain_timeout
        finally:
            await _close_all(listeners)
        LOGGER.info("%s: stopped", self.name)

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                LOGGER.exception(
                    "%s: accept failed (%s); retrying in %ss",
                    self.name,
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                    ACCEPT_RETRY_DELAY,
                )
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if len(self._connections) >= self.limits.max_connections:
                self._refused[REFUSED_CONNECTION_LIMIT].inc()
                await trio.aclose_forcefully(stream)
                continue
            conn = _Connection(remote=_remote_of(stream))
            self._connections.add(conn)
            connections.start_soon(self._run_connection, stream, conn)

    async def _run_connection(self, stream: trio.SocketStream, conn: _Connection) -> None:
        try:
            with conn.scope:
                await self._serve_connection(stream, conn)
        except Exception:
            # The one place a connection's failure stops: never the listener's nursery.
            LOGGER.exception("%s: connection from %s failed", self.name, _fmt(conn.remote))
        finally:
            self._connections.discard(conn)
            if conn.counts_for_peer and conn.peer is not None:
                left = self._per_peer.get(conn.peer, 1) - 1
                if left > 0:
                    self._per_peer[conn.peer] = left
                else:
                    self._per_peer.pop(conn.peer, None)
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, raw: trio.SocketStream, conn: _Connection) -> None:
        stream: trio.abc.Stream = raw
        if self._ssl_context is not None:
            tls = trio.SSLStream(raw, self._ssl_context, server_side=True, https_compatible=True)
            if not await self._handshake(tls, conn):
                return
            stream = tls
        over_peer_cap = False
        if conn.peer is not None:
            if self._per_peer.get(conn.peer, 0) >= self.limits.max_connections_per_peer:
                over_peer_cap = True
                self._refused[REFUSED_PEER_CONNECTION_LIMIT].inc()
                LOGGER.info("%s: peer %s is over its connection cap", self.name, conn.peer)
            else:
                self._per_peer[conn.peer] = self._per_peer.get(conn.peer, 0) + 1
                conn.counts_for_peer = True
        session = _Session(self, stream, conn, over_peer_cap=over_peer_cap)
        await session.run()

    async def _handshake(self, tls: trio.SSLStream[trio.SocketStream], conn: _Connection) -> bool:
        """Handshake and identify; ``False`` (already counted) when refused."""
        with self._cancel_on_drain(conn) as drained:
            with trio.move_on_after(self.limits.handshake_timeout) as timer:
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    reason = classify_handshake_error(exc)
                    self._count_handshake_failure(reason, conn, describe_ssl_error(exc))
                    return False
        if timer.cancelled_caught:
            self._count_handshake_failure(Reason.HANDSHAKE_TIMEOUT, conn, "timed out")
            return False
        if drained.cancelled_caught:
            return False
        if self._identify is None:
            return True
        try:
            conn.peer = self._identify(tls)
        except PeerAuthError as exc:
            self._count_handshake_failure(exc.reason, conn, exc.message)
            return False
        except Exception:
            LOGGER.exception("%s: identify() failed for %s", self.name, _fmt(conn.remote))
            self._count_handshake_failure(Reason.HANDSHAKE_FAILED, conn, "identify() failed")
            return False
        return True

    @contextlib.contextmanager
    def _cancel_on_drain(self, conn: _Connection) -> Iterator[trio.CancelScope]:
        """A scope that :meth:`stop_accepting` cancels: the connection is between requests."""
        with trio.CancelScope() as scope:
            if self._draining:
                scope.cancel()
            conn.idle_scope = scope
            try:
                yield scope
            finally:
                conn.idle_scope = None

    # -- counting ------------------------------------------------------------------

    def _count_handshake_failure(self, reason: Reason, conn: _Connection, detail: str) -> None:
        child = self._handshake_failures.get(reason)
        if child is None:
            child = TLS_HANDSHAKE_FAILURES.labels(self.name, reason.value)
            self._handshake_failures[reason] = child
        child.inc()
        log = LOGGER.debug if reason is Reason.HANDSHAKE_FAILED else LOGGER.info
        log(
            "%s: refused TLS from %s: %s (%s)",
            self.name,
            _fmt(conn.remote),
            reason,
            detail,
            extra={
                "event": "handshake_refused",
                "listener": self.name,
                "remote": _fmt(conn.remote),
                "reason": reason.value,
            },
        )

    def _count_refused(self, counted_as: str) -> None:
        self._refused[counted_as].inc()

    def _count_answered(self, status: int) -> None:
        child = self._answered.get(status)
        if child is None:
            child = HTTP_REQUESTS.labels(self.name, str(status))
            self._answered[status] = child
        child.inc()

    async def _call_handler(self, request: Request) -> Response:
        """The handler's response, or the layer's answer for what it raised."""
        try:
            # Typed as object: a buggy handler's non-Response must still get a 500.
            response: object = await self._handler(request)
        except RemoteError as exc:
            LOGGER.debug(
                "%s: %s %s refused: %s", self.name, request.method, request.path, exc.reason
            )
            return json_response(400, {"error": exc.reason.value, "message": exc.message})
        except StorageFullError as exc:
            # No room on the disk: temporary, and nothing was stored. Not a bug: no traceback.
            LOGGER.error(  # noqa: TRY400 -- a full disk is not a bug: no traceback
                "%s: %s %s refused: %s", self.name, request.method, request.path, exc.message
            )
            return error_response(
                507,
                Reason.INSUFFICIENT_STORAGE,
                headers=[("retry-after", str(STORAGE_RETRY_AFTER_SECONDS))],
            )
        except StorageError as exc:
            # The database failed (gone, a connection lost mid-commit): temporary, and
            # nothing of this request was acknowledged. Not a bug: no traceback.
            STORAGE_UNAVAILABLE.labels(self.name).inc()
            LOGGER.error(  # noqa: TRY400 -- a database that went away is not a bug
                "%s: %s %s failed: %s", self.name, request.method, request.path, exc.message
            )
            return error_response(
                503,
                Reason.STORAGE,
                headers=[("retry-after", str(STORAGE_UNAVAILABLE_RETRY_AFTER_SECONDS))],
            )
        except Exception:
            LOGGER.exception("%s: handler failed on %s %s", self.name, request.method, request.path)
            return error_response(500, Reason.INTERNAL)
        if not isinstance(response, Response):
            LOGGER.error(
                "%s: handler returned %s, not a Response, for %s %s",
                self.name,
                type(response).__name__,
                request.method,
                request.path,
            )
            return error_response(500, Reason.INTERNAL)
        return response


class _Session:
    """The HTTP/1.1 exchange on one connection (after TLS, if any)."""

    def __init__(
        self,
        server: HTTPServer,
        stream: trio.abc.Stream,
        conn: _Connection,
        *,
        over_peer_cap: bool,
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.conn = conn
        self.over_peer_cap = over_peer_cap
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.limits.max_header_bytes
        )
        self.eof = False  # the client closed (or reset) its side

    async def run(self) -> None:
        first = True
        while await self._wait_for_request(first=first):
            first = False
            deadline = trio.current_time() + self.limits.request_timeout
            refusal: _Refusal | None = None
            request: Request | None = None
            try:
                with trio.move_on_at(deadline) as timer:
                    request = await self._read_request()
            except _Refusal as exc:
                refusal = exc
            if timer.cancelled_caught:
                refusal = _Refusal(408, Reason.REQUEST_TIMEOUT, REFUSED_REQUEST_TIMEOUT)
            if refusal is not None:
                self.server._count_refused(refusal.counted_as)
                await self._send(error_response(refusal.status, refusal.reason), close=True)
                await self._linger()
                return
            if request is None:
                return
            if self.over_peer_cap:
                refused = error_response(
                    503,
                    Reason.TOO_MANY_CONNECTIONS,
                    headers=[("retry-after", str(RETRY_AFTER_SECONDS))],
                )
                await self._send(refused, close=True)
                return
            response = await self.server._call_handler(request)
            keep_alive = await self._send(
                response, close=self.server._draining, head=request.method == "HEAD"
            )
            if not keep_alive:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    # -- reading ---------------------------------------------------------------------

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
        return data if isinstance(data, bytes) else bytes(data)

    async def _wait_for_request(self, *, first: bool) -> bool:
        """Wait for the next request's first byte; ``False`` to close quietly."""
        if self.h11.trailing_data[0]:
            return True  # pipelined: already buffered
        if self.server._draining:
            return False
        timeout = self.limits.request_timeout if first else self.limits.idle_timeout
        with self.server._cancel_on_drain(self.conn) as drained:
            with trio.move_on_after(timeout) as timer:
                data = await self._receive()
        if timer.cancelled_caught:
            if first:
                self.server._count_refused(REFUSED_REQUEST_TIMEOUT)
            return False
        if drained.cancelled_caught or not data:
            return False
        self.h11.receive_data(data)
        return True

    async def _next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._receive())
                continue
            if event is h11.PAUSED:
                raise RuntimeError("h11 paused while a request was being read")
            assert isinstance(event, h11.Event)
            return event

    async def _read_request(self) -> Request | None:
        """The whole next request, ``None`` if the client went away; ``_Refusal`` at a limit."""
        try:
            return await self._read_request_or_raise()
        except h11.RemoteProtocolError as exc:
            if self.eof:
                return None  # hung up mid-request: nobody to answer
            if exc.error_status_hint == 431:
                raise _Refusal(431, Reason.HEADER_TOO_LARGE, REFUSED_HEADER_TOO_LARGE) from exc
            raise _Refusal(400, Reason.PROTOCOL, REFUSED_BAD_REQUEST) from exc
        except ProtocolError as exc:
            raise _Refusal(400, Reason.PROTOCOL, REFUSED_BAD_REQUEST) from exc

    async def _read_request_or_raise(self) -> Request | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise RuntimeError(f"h11 gave {type(event).__name__} where a request starts")
        if _head_size(event) > self.limits.max_header_bytes:
            raise _Refusal(431, Reason.HEADER_TOO_LARGE, REFUSED_HEADER_TOO_LARGE)
        max_body = self.limits.max_body_bytes
        for name, value in event.headers:
            if name == b"content-length" and int(value) > max_body:
                raise _Refusal(413, Reason.BODY_TOO_LARGE, REFUSED_BODY_TOO_LARGE)
        path, query = parse_target(event.target.decode("ascii"))
        if self.h11.they_are_waiting_for_100_continue:
            go_ahead = h11.InformationalResponse(status_code=100, headers=[])
            await self._send_bytes(self.h11.send(go_ahead))
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > max_body:
                    raise _Refusal(413, Reason.BODY_TOO_LARGE, REFUSED_BODY_TOO_LARGE)
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # ConnectionClosed: h11 raises before this for a cut-off body
                return None
        return Request(
            method=event.method.decode("ascii"),
            path=path,
            query=query,
            headers=[(n.decode("ascii"), v.decode("latin-1")) for n, v in event.headers],
            body=bytes(body),
            peer=self.conn.peer,
            remote=self.conn.remote,
            listener=self.server.name,
        )

    # -- writing ---------------------------------------------------------------------

    async def _send(self, response: Response, *, close: bool, head: bool = False) -> bool:
        """Send ``response``; ``True`` if the connection may serve another request."""
        if self.eof and self.h11.their_state is not h11.DONE:
            return False
        try:
            head_event, body = self._check(response, close=close)
        except (h11.LocalProtocolError, ValueError, TypeError):
            # A handler's bug (bad status, header or body type): nothing is sent yet.
            LOGGER.exception("%s: handler's response cannot be sent", self.server.name)
            head_event, body = self._check(error_response(500, Reason.INTERNAL), close=close)
        try:
            parts = [self.h11.send(head_event)]
            if body and not head:
                parts.append(self.h11.send(h11.Data(data=body)))
            parts.append(self.h11.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            LOGGER.exception("%s: h11 refused our response", self.server.name)
            return False
        self.server._count_answered(head_event.status_code)
        if not await self._send_bytes(b"".join(p for p in parts if p)):
            return False
        return self.h11.our_state is h11.DONE

    def _check(self, response: Response, *, close: bool) -> tuple[h11.Response, bytes]:
        """The h11 head and the body to send for ``response``; raises if it is malformed."""
        status = response.status
        if not isinstance(status, int) or not _MIN_STATUS <= status <= _MAX_STATUS:
            raise ValueError(f"status {status!r} is not a final response status")
        body = response.body
        if not isinstance(body, bytes):
            raise TypeError(f"response body is {type(body).__name__}, not bytes")
        headers: list[tuple[str, str]] = []
        for name, value in response.headers:
            lowered = name.lower()
            if lowered == "connection" and "close" in value.lower():
                close = True
            if lowered not in _FRAMING_HEADERS:
                headers.append((name, value))
        headers.append(("date", email.utils.formatdate(usegmt=True)))
        if status in _NO_BODY_STATUSES:
            body = b""
        else:
            headers.append(("content-length", str(len(body))))
        if close:
            headers.append(("connection", "close"))
        # Constructing the event validates every header name and value.
        return h11.Response(status_code=status, headers=headers), body

    async def _send_bytes(self, data: bytes | None) -> bool:
        if not data:
            return True
        with trio.move_on_after(self.limits.send_timeout) as timer:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        if timer.cancelled_caught:
            self.server._count_refused(REFUSED_SEND_TIMEOUT)
            return False
        return True

    async def _linger(self) -> None:
        """Let the client read our last answer before the socket closes.

        Closing a socket with unread input makes the kernel send a reset, which
        can destroy the answer still in flight; so half-close where the stream
        allows it and discard what the client still sends, within a bound.
        """
        if self.eof:
            return
        with trio.move_on_after(LINGER_TIMEOUT):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                try:
                    await self.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            discarded = 0
            while discarded < LINGER_MAX_BYTES:
                data = await self._receive()
                if not data:
                    return
                discarded += len(data)


def _head_size(request: h11.Request) -> int:
    size = len(request.method) + len(request.target) + HEAD_OVERHEAD_BYTES
    for name, value in request.headers:
        size += len(name) + len(value) + HEADER_FRAMING_BYTES
    return size


def _remote_of(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("", 0)  # already gone; the connection will fail on its first read
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    return (str(address), 0)


def _fmt(remote: tuple[str, int]) -> str:
    host, port = remote
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _close_all(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)
