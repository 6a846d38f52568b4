"""The HTTP layer on real sockets (127.0.0.1), with real TLS where it matters.

Happy paths go through httpx, as the gateway's own clients will; malformed and
slow clients are written by hand on raw trio streams, with an h11 client
parsing what comes back. Timeouts run on trio's autojump clock: no test waits
for real time.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from prometheus_client import REGISTRY

from gateway.errors import ConfigError, EnvelopeError, PeerAuthError, Reason, StorageError
from gateway.http import (
    HTTPServer,
    Request,
    Response,
    ServerLimits,
    json_response,
    text_response,
)
from gateway.http.server import STORAGE_UNAVAILABLE_RETRY_AFTER_SECONDS
from tests.certs_for_tests import CertAuthority, client_context, server_context_mtls

ACME = "acme.example"
GLOBEX = "globex.example"
HOST = "127.0.0.1"

_names = itertools.count()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A listener name of this test's own, so counters start at zero."""
    return f"t{next(_names)}-{request.node.name}"[:60]


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def tls_failures(listener: str, reason: Reason) -> float:
    return sample("gateway_tls_handshake_failures_total", listener=listener, reason=reason.value)


def refusals(listener: str, reason: str) -> float:
    return sample("gateway_http_connections_refused_total", listener=listener, reason=reason)


def answered(listener: str, status: int) -> float:
    return sample("gateway_http_requests_total", listener=listener, status=str(status))


async def echo(request: Request) -> Response:
    return json_response(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "body": request.body.decode("utf-8", "replace"),
            "peer": request.peer,
            "listener": request.listener,
            "remote_host": request.remote[0],
            "x_test": request.header("X-Test"),
        },
    )


async def start(nursery: trio.Nursery, server: HTTPServer) -> int:
    port: int = await nursery.start(functools.partial(server.serve, HOST, 0))
    return port


# -- a small h11 client for raw streams ------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class H11Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int, ssl_context: ssl.SSLContext | None = None) -> H11Client:
        stream: trio.abc.Stream = await trio.open_tcp_stream(HOST, port)
        if ssl_context is None:
            return cls(stream)
        tls = trio.SSLStream(stream, ssl_context, server_hostname=HOST, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(tls)

    async def send_head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        request = h11.Request(method=method, target=target, headers=[("host", HOST), *headers])
        await self.stream.send_all(self.conn.send(request) or b"")

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Reply:
        all_headers = list(headers)
        if body or method in {"PUT", "POST"}:
            all_headers.append(("content-length", str(len(body))))
        await self.send_head(method, target, all_headers)
        data = self.conn.send(h11.Data(data=body)) if body else b""
        await self.stream.send_all((data or b"") + (self.conn.send(h11.EndOfMessage()) or b""))
        return await self.read_reply()

    async def read_reply(self) -> Reply:
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise AssertionError(f"unexpected {event!r}")
        assert response is not None
        if self.conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            self.conn.start_next_cycle()
        headers = {n.decode(): v.decode() for n, v in response.headers}
        return Reply(response.status_code, headers, bytes(body))

    async def is_closed_by_server(self) -> bool:
        """Read until the server closes; True if it did (EOF or reset)."""
        try:
            while True:
                if not await self.stream.receive_some(65536):
                    return True
        except trio.BrokenResourceError:
            return True

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


Connect = Callable[..., Awaitable[H11Client]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``await connect(port, ssl_context=None)``: a client closed when the test ends."""
    opened: list[H11Client] = []

    async def open_client(port: int, ssl_context: ssl.SSLContext | None = None) -> H11Client:
        client = await H11Client.open(port, ssl_context)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        await client.aclose()


async def raw_exchange(port: int, data: bytes) -> Reply:
    """Send ``data`` as is, read until the server closes, parse the one response."""
    stream = await trio.open_tcp_stream(HOST, port)
    try:
        await stream.send_all(data)
        received = bytearray()
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        await stream.aclose()
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/", headers=[("host", HOST)]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(bytes(received))
    parser.receive_data(b"")
    head = parser.next_event()
    assert isinstance(head, h11.Response), head
    body = bytearray()
    while isinstance(event := parser.next_event(), h11.Data):
        body += event.data
    headers = {n.decode(): v.decode() for n, v in head.headers}
    return Reply(head.status_code, headers, bytes(body))


# -- plain HTTP ----------------------------------------------------------------------


async def test_get_and_put_round_trip(nursery: trio.Nursery, name: str) -> None:
    server = HTTPServer(name, echo)
    port = await start(nursery, server)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as client:
        got = await client.get("/a%20b/c", params={"x": ["1", "2"], "y": ""})
        put = await client.put("/things/1", content=b"hello", headers={"X-Test": "yes"})
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/json"
    assert int(got.headers["content-length"]) == len(got.content)
    assert got.json() == {
        "method": "GET",
        "path": "/a b/c",
        "query": {"x": ["1", "2"], "y": [""]},
        "body": "",
        "peer": None,
        "listener": name,
        "remote_host": HOST,
        "x_test": None,
    }
    assert put.status_code == 200
    assert put.json()["method"] == "PUT"
    assert put.json()["body"] == "hello"
    assert put.json()["x_test"] == "yes"
    assert answered(name, 200) == 2


async def test_keep_alive_serves_requests_on_one_connection(
    nursery: trio.Nursery, name: str, connect: Connect
) -> None:
    server = HTTPServer(name, echo)
    port = await start(nursery, server)
    client = await connect(port)
    first = await client.request("GET", "/one")
    second = await client.request("PUT", "/two", body=b"x" * 100)
    assert (first.status, second.status) == (200, 200)
    assert first.json()["path"] == "/one"
    assert second.json()["body"] == "x" * 100
    assert "connection" not in second.headers
    assert server.open_connections == 1
    # Two requests in one write (pipelined) get two answers, in order.
    pipelined = b"GET /p1 HTTP/1.1\r\nhost: a\r\n\r\nGET /p2 HTTP/1.1\r\nhost: a\r\n\r\n"
    await client.stream.send_all(pipelined)
    client.conn = h11.Connection(h11.CLIENT)  # a parser that expects both answers
    for path in ("/p1", "/p2"):
        client.conn.send(h11.Request(method="GET", target=path, headers=[("host", "a")]))
        client.conn.send(h11.EndOfMessage())
        reply = await client.read_reply()
        assert reply.json()["path"] == path
    await client.aclose()


async def test_head_gets_headers_without_body(
    nursery: trio.Nursery, name: str, connect: Connect
) -> None:
    async def hello(request: Request) -> Response:
        return text_response(200, "hello")

    port = await start(nursery, HTTPServer(name, hello))
    client = await connect(port)
    reply = await client.request("HEAD", "/")
    assert reply.status == 200
    assert reply.headers["content-length"] == "5"
    assert reply.body == b""
    assert (await client.request("GET", "/")).body == b"hello"


async def test_header_over_limit_gets_431(nursery: trio.Nursery, name: str) -> None:
    limits = ServerLimits(max_header_bytes=1024)
    port = await start(nursery, HTTPServer(name, echo, limits=limits))
    # A complete head just over the limit, arriving in one read...
    big = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 1024 + b"\r\n\r\n"
    reply = await raw_exchange(port, big)
    assert reply.status == 431
    assert reply.headers["connection"] == "close"
    assert json.loads(reply.body) == {"error": "header_too_large"}
    # ...and one that never ends, which h11's buffer cap stops.
    endless = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 8192
    assert (await raw_exchange(port, endless)).status == 431
    assert refusals(name, "header_too_large") == 2
    # Just under the limit is served.
    fits = b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\nx-ok: " + b"a" * 800 + b"\r\n\r\n"
    assert (await raw_exchange(port, fits)).status == 200


async def test_default_header_limit_is_16_kib(nursery: trio.Nursery, name: str) -> None:
    port = await start(nursery, HTTPServer(name, echo))
    head = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * (16 * 1024) + b"\r\n\r\n"
    assert (await raw_exchange(port, head)).status == 431


async def test_body_over_limit_by_content_length_gets_413_unread(
    nursery: trio.Nursery, name: str, connect: Connect
) -> None:
    limits = ServerLimits(max_body_bytes=1000)
    port = await start(nursery, HTTPServer(name, echo, limits=limits))
    client = await connect(port)
    # The body is never sent: the answer comes from the head alone.
    await client.send_head("PUT", "/upload", [("content-length", "1001")])
    reply = await client.read_reply()
    assert reply.status == 413
    assert reply.headers["connection"] == "close"
    assert json.loads(reply.body) == {"error": "body_too_large"}
    assert await client.is_closed_by_server()
    assert refusals(name, "body_too_large") == 1
    # Exactly at the limit is accepted.
    async with httpx.AsyncClient() as http:
        ok = await http.put(f"http://{HOST}:{port}/upload", content=b"b" * 1000)
    assert ok.status_code == 200
    assert len(ok.json()["body"]) == 1000


async def test_chunked_body_growing_over_limit_gets_413(
    nursery: trio.Nursery, name: str, connect: Connect
) -> None:
    limits = ServerLimits(max_body_bytes=1000)
    port = await start(nursery, HTTPServer(name, echo, limits=limits))
    client = await connect(port)
    await client.send_head("PUT", "/upload", [("transfer-encoding", "chunked")])
    for _ in range(4):  # 1200 bytes in all
        await client.stream.send_all(client.conn.send(h11.Data(data=b"c" * 300)) or b"")
    reply = await client.read_reply()
    assert reply.status == 413
    assert await client.is_closed_by_server()
    assert refusals(name, "body_too_large") == 1

    # A chunked body within the limit is read whole.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"d" * 300

    async with httpx.AsyncClient() as http:
        ok = await http.put(f"http://{HOST}:{port}/upload", content=chunks())
    assert ok.json()["body"] == "d" * 900


async def test_expect_100_continue(nursery: trio.Nursery, name: str, connect: Connect) -> None:
    port = await start(nursery, HTTPServer(name, echo))
    client = await connect(port)
    await client.send_head("PUT", "/x", [("content-length", "2"), ("expect", "100-continue")])
    got = await client.stream.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 100 ")
    client.conn.receive_data(bytes(got))
    await client.stream.send_all(
        (client.conn.send(h11.Data(data=b"ok")) or b"")
        + (client.conn.send(h11.EndOfMessage()) or b"")
    )
    reply = await client.read_reply()
    assert reply.json()["body"] == "ok"


async def test_malformed_requests_get_400_and_the_listener_keeps_serving(
    nursery: trio.Nursery, name: str
) -> None:
    port = await start(nursery, HTTPServer(name, echo))
    for garbage in (
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /a%2Fb HTTP/1.1\r\nhost: a\r\n\r\n",  # an encoded slash
        b"GET http://elsewhere/ HTTP/1.1\r\nhost: a\r\n\r\n",  # not origin-form
        b"GET /%ff HTTP/1.1\r\nhost: a\r\n\r\n",  # not UTF-8
        b"PUT / HTTP/1.1\r\nhost: a\r\ncontent-length: x\r\n\r\n",
    ):
        reply = await raw_exchange(port, garbage)
        assert reply.status == 400, garbage
        assert json.loads(reply.body) == {"error": "protocol_error"}
    assert refusals(name, "bad_request") == 5
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://{HOST}:{port}/fine")).status_code == 200


async def test_handler_exception_gets_generic_500_and_is_logged(
    nursery: trio.Nursery, name: str, caplog: pytest.LogCaptureFixture, connect: Connect
) -> None:
    async def buggy(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("secret detail of a bug")
        return await echo(request)

    port = await start(nursery, HTTPServer(name, buggy))
    with caplog.at_level(logging.ERROR, logger="gateway.http"):
        client = await connect(port)
        boom = await client.request("GET", "/boom")
    assert boom.status == 500
    assert json.loads(boom.body) == {"error": "internal_error"}
    assert b"secret" not in boom.body
    assert any(
        r.name == "gateway.http" and r.exc_info and "secret detail" in str(r.exc_info[1])
        for r in caplog.records
    )
    # The same connection is still sane, and so is a new one.
    assert (await client.request("GET", "/after")).status == 200
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://{HOST}:{port}/other")).status_code == 200
    assert answered(name, 500) == 1


async def test_a_failed_database_gets_503_with_retry_after_and_is_counted(
    nursery: trio.Nursery, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def storage_gone(request: Request) -> Response:
        raise StorageError("storage postgresql://gw@db/gw: OperationalError: connection lost")

    before = sample("gateway_storage_unavailable_total", listener=name)
    port = await start(nursery, HTTPServer(name, storage_gone))
    with caplog.at_level(logging.ERROR, logger="gateway.http"):
        async with httpx.AsyncClient() as http:
            reply = await http.post(f"http://{HOST}:{port}/v1/envelopes", content=b"{}")
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == str(STORAGE_UNAVAILABLE_RETRY_AFTER_SECONDS)
    assert reply.json() == {"error": "storage_error"}
    assert b"postgresql" not in reply.content
    assert sample("gateway_storage_unavailable_total", listener=name) == before + 1
    # One line, no traceback: a database that went away is not a bug.
    [record] = [r for r in caplog.records if r.name == "gateway.http"]
    assert record.exc_info is None
    assert "connection lost" in record.getMessage()


async def test_remote_error_from_handler_gets_400_with_reason(
    nursery: trio.Nursery, name: str
) -> None:
    async def picky(request: Request) -> Response:
        raise EnvelopeError("field 'to' is missing", reason=Reason.ENVELOPE_BAD_TO)

    port = await start(nursery, HTTPServer(name, picky))
    async with httpx.AsyncClient() as http:
        reply = await http.put(f"http://{HOST}:{port}/x", content=b"{}")
    assert reply.status_code == 400
    assert reply.json() == {"error": "envelope_bad_to", "message": "field 'to' is missing"}


@pytest.mark.parametrize(
    "bad",
    [
        "not a response",
        Response(999),
        Response(101),
        Response(200, [("x-bad", "line\nbreak")]),
        Response(200, [("x-bad", "caf\u00e9")]),
        Response(200, body="text, not bytes"),  # type: ignore[arg-type]
    ],
    ids=["not-a-response", "status-999", "status-101", "newline", "non-ascii", "str-body"],
)
async def test_malformed_handler_responses_become_500(
    nursery: trio.Nursery, name: str, connect: Connect, bad: object
) -> None:
    async def wrong(request: Request) -> Response:
        if request.path == "/bad":
            return bad  # type: ignore[return-value]
        return await echo(request)

    port = await start(nursery, HTTPServer(name, wrong))
    client = await connect(port)
    reply = await client.request("GET", "/bad")
    assert reply.status == 500
    assert json.loads(reply.body) == {"error": "internal_error"}
    assert (await client.request("GET", "/good")).status == 200
    assert answered(name, 500) == 1


async def test_connection_close_is_honoured(
    nursery: trio.Nursery, name: str, connect: Connect
) -> None:
    port = await start(nursery, HTTPServer(name, echo))
    client = await connect(port)
    reply = await client.request("GET", "/", headers=[("connection", "close")])
    assert reply.status == 200
    assert reply.headers["connection"] == "close"
    assert await client.is_closed_by_server()


async def test_slow_request_gets_408(
    nursery: trio.Nursery, name: str, autojump_clock: trio.testing.MockClock, connect: Connect
) -> None:
    limits = ServerLimits(request_timeout=10)
    port = await start(nursery, HTTPServer(name, echo, limits=limits))
    client = await connect(port)
    await client.stream.send_all(b"GET / HTTP/1.1\r\n")
    started = trio.current_time()

    async def trickle() -> None:
        # One byte every 2 s keeps the line busy but never finishes in time.
        for byte in b"host: a\r\nx-slow: " + b"z" * 20:
            await trio.sleep(2)
            try:
                await client.stream.send_all(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    nursery.start_soon(trickle)
    reply = await client.read_reply()
    assert reply.status == 408
    assert trio.current_time() - started == pytest.approx(10, abs=0.01)
    assert json.loads(reply.body) == {"error": "request_timeout"}
    assert await client.is_closed_by_server()
    assert refusals(name, "request_timeout") == 1


async def test_new_connection_must_start_a_request_in_time(
    nursery: trio.Nursery, name: str, autojump_clock: trio.testing.MockClock, connect: Connect
) -> None:
    limits = ServerLimits(request_timeout=10, idle_timeout=300)
    port = await start(nursery, HTTPServer(name, echo, limits=limits))
    client = await connect(port)
    started = trio.current_time()
    assert await client.is_closed_by_server()
    assert trio.current_time() - started == pytest.approx(10, abs=0.01)
    assert refusals(name, "request_timeout") == 1


async def test_idle_keep_alive_connection_closed_after_idle_timeout(
    nursery: trio.Nursery, name: str, autojump_clock: trio.testing.MockClock, connect: Connect
) -> None:
    limits = ServerLimits(idle_timeout=60)
    server = HTTPServer(name, echo, limits=limits)
    port = await start(nursery, server)
    client = await connect(port)
    assert (await client.request("GET", "/")).status == 200
    await trio.sleep(59)
    assert (await client.request("GET", "/still-open")).status == 200
    idle_from = trio.current_time()
    assert await client.is_closed_by_server()
    assert trio.current_time() - idle_from == pytest.approx(60, abs=0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert server.open_connections == 0
    assert refusals(name, "request_timeout") == 0  # idle closes are quiet


async def test_max_connections_closes_extra_connections_at_once(
    nursery: trio.Nursery, name: str, connect: Connect
) -> None:
    server = HTTPServer(name, echo, limits=ServerLimits(max_connections=2))
    port = await start(nursery, server)
    first = await connect(port)
    second = await connect(port)
    await trio.testing.wait_all_tasks_blocked()
    assert server.open_connections == 2
    extra = await connect(port)
    assert await extra.is_closed_by_server()
    assert refusals(name, "connection_limit") == 1
    assert (await first.request("GET", "/")).status == 200
    await second.aclose()
    await trio.testing.wait_all_tasks_blocked()
    again = await connect(port)
    assert (await again.request("GET", "/")).status == 200


async def test_port_in_use_is_a_config_error(nursery: trio.Nursery, name: str) -> None:
    port = await start(nursery, HTTPServer(name, echo))
    with pytest.raises(ConfigError, match=rf"{name}-b listener: cannot listen on 127.0.0.1:{port}"):
        await HTTPServer(name + "-b", echo).serve(HOST, port)


# -- graceful stop ---------------------------------------------------------------------


async def test_graceful_stop_finishes_in_flight_requests(
    nursery: trio.Nursery, name: str, connect: Connect
) -> None:
    release = trio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            await release.wait()
        return await echo(request)

    server = HTTPServer(name, handler)
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await server.serve(HOST, 0, task_status=task_status)
        stopped.set()

    port: int = await nursery.start(run)
    idle = await connect(port)
    assert (await idle.request("GET", "/fast")).status == 200
    busy = await connect(port)
    await busy.send_head("GET", "/slow")
    await busy.stream.send_all(busy.conn.send(h11.EndOfMessage()) or b"")
    await trio.testing.wait_all_tasks_blocked()

    server.stop_accepting()
    assert await idle.is_closed_by_server()  # nothing in flight: closed now
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(HOST, port)  # no longer listening
    assert not stopped.is_set()

    release.set()
    reply = await busy.read_reply()
    assert reply.status == 200
    assert reply.headers["connection"] == "close"
    assert await busy.is_closed_by_server()
    with trio.fail_after(5):
        await stopped.wait()


async def test_graceful_stop_aborts_what_outlives_the_drain_timeout(
    nursery: trio.Nursery, name: str, autojump_clock: trio.testing.MockClock, connect: Connect
) -> None:
    async def stuck(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = HTTPServer(name, stuck, limits=ServerLimits(drain_timeout=7))
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await server.serve(HOST, 0, task_status=task_status)
        stopped.set()

    port: int = await nursery.start(run)
    client = await connect(port)
    await client.send_head("GET", "/")
    await client.stream.send_all(client.conn.send(h11.EndOfMessage()) or b"")
    await trio.testing.wait_all_tasks_blocked()
    stop_at = trio.current_time()
    server.stop_accepting()
    await stopped.wait()
    assert trio.current_time() - stop_at == pytest.approx(7, abs=0.01)
    assert await client.is_closed_by_server()


# -- mutual TLS ------------------------------------------------------------------------


@dataclass
class PKI:
    directory: Path
    ca: CertAuthority
    server: ssl.SSLContext

    def client(
        self, org: str | None, *, ca: CertAuthority | None = None, **kw: datetime
    ) -> ssl.SSLContext:
        leaf = None if org is None else (ca or self.ca).issue(org, **kw)
        stem = f"client-{next(_names)}"
        return client_context(self.ca, self.directory, leaf, stem=stem)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = CertAuthority.create("Federation test CA")
    server = server_context_mtls(ca, ca.issue("gw.test.example"), tmp_path)
    return PKI(tmp_path, ca, server)


def identify_by_san(
    allowed: Iterable[str] = (ACME, GLOBEX),
) -> Callable[[trio.SSLStream[trio.SocketStream]], str]:
    """The test's identify(): the certificate's first dNSName, if it is an allowed org."""
    orgs = frozenset(allowed)

    def identify(stream: trio.SSLStream[trio.SocketStream]) -> str:
        der = stream.getpeercert(binary_form=True)
        if der is None:
            raise PeerAuthError("no client certificate", reason=Reason.CERT_MISSING)
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if not names:
            raise PeerAuthError("no dNSName", reason=Reason.CERT_NO_ORG)
        if names[0] not in orgs:
            raise PeerAuthError(f"{names[0]} is not a peer", reason=Reason.UNKNOWN_PEER)
        return names[0]

    return identify


def mtls_server(
    name: str, pki: PKI, handler: Callable[[Request], Awaitable[Response]] = echo, **limits: float
) -> HTTPServer:
    return HTTPServer(
        name,
        handler,
        ssl_context=pki.server,
        identify=identify_by_san(),
        limits=ServerLimits(**limits),  # type: ignore[arg-type]
    )


async def good_client_is_served(port: int, pki: PKI, org: str = ACME) -> None:
    async with httpx.AsyncClient(verify=pki.client(org)) as http:
        reply = await http.get(f"https://{HOST}:{port}/who")
    assert reply.status_code == 200
    assert reply.json()["peer"] == org


async def is_refused(port: int, context: ssl.SSLContext) -> bool:
    """Connect with ``context``; True if the server ends the connection without an answer.

    With TLS 1.3 the client's half of the handshake completes before the
    server has judged the client's certificate, so the refusal shows on read.
    """
    client: H11Client | None = None
    try:
        client = await H11Client.open(port, context)
        await client.send_head("GET", "/")
        await client.stream.send_all(client.conn.send(h11.EndOfMessage()) or b"")
        refused = await client.is_closed_by_server()
    except trio.BrokenResourceError:
        refused = True
    finally:
        if client is not None:
            await client.aclose()
    await trio.testing.wait_all_tasks_blocked()  # let the server finish counting
    return refused


async def test_mtls_handler_sees_the_proven_org(nursery: trio.Nursery, name: str, pki: PKI) -> None:
    port = await start(nursery, mtls_server(name, pki))
    await good_client_is_served(port, pki, ACME)
    await good_client_is_served(port, pki, GLOBEX)
    async with httpx.AsyncClient(verify=pki.client(ACME)) as http:
        spoof = await http.get(f"https://{HOST}:{port}/who", headers={"X-Peer": GLOBEX})
    assert spoof.json()["peer"] == ACME


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no certificate", Reason.CERT_MISSING),
        ("untrusted CA", Reason.CERT_UNTRUSTED),
        ("expired", Reason.CERT_EXPIRED),
        ("identify refuses", Reason.UNKNOWN_PEER),
    ],
)
async def test_mtls_refusals_are_counted_and_the_listener_survives(
    nursery: trio.Nursery, name: str, pki: PKI, case: str, reason: Reason
) -> None:
    port = await start(nursery, mtls_server(name, pki))
    now = datetime.now(UTC)
    context = {
        "no certificate": lambda: pki.client(None),
        "untrusted CA": lambda: pki.client(ACME, ca=CertAuthority.create("Stranger CA")),
        "expired": lambda: pki.client(
            ACME, not_before=now - timedelta(days=3), not_after=now - timedelta(days=1)
        ),
        "identify refuses": lambda: pki.client("initech.example"),
    }[case]()
    for attempt in (1, 2, 3):
        assert await is_refused(port, context)
        assert tls_failures(name, reason) == attempt
        await good_client_is_served(port, pki)


async def test_non_tls_and_aborted_handshakes_never_take_the_listener_down(
    nursery: trio.Nursery, name: str, pki: PKI, connect: Connect
) -> None:
    port = await start(nursery, mtls_server(name, pki))
    plain = await connect(port)
    await plain.stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert await plain.is_closed_by_server()
    hang_up = await connect(port)
    await hang_up.aclose()
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    assert await is_refused(port, old)
    await trio.testing.wait_all_tasks_blocked()
    assert tls_failures(name, Reason.HANDSHAKE_FAILED) == 3
    await good_client_is_served(port, pki)


async def test_handshake_timeout_is_counted(
    nursery: trio.Nursery,
    name: str,
    pki: PKI,
    autojump_clock: trio.testing.MockClock,
    connect: Connect,
) -> None:
    port = await start(nursery, mtls_server(name, pki, handshake_timeout=10))
    silent = await connect(port)
    started = trio.current_time()
    assert await silent.is_closed_by_server()
    assert trio.current_time() - started == pytest.approx(10, abs=0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert tls_failures(name, Reason.HANDSHAKE_TIMEOUT) == 1
    await good_client_is_served(port, pki)


async def test_per_peer_connection_cap(
    nursery: trio.Nursery, name: str, pki: PKI, connect: Connect
) -> None:
    server = mtls_server(name, pki, max_connections_per_peer=2)
    port = await start(nursery, server)
    acme = pki.client(ACME)
    held = [await connect(port, acme) for _ in range(2)]
    for client in held:
        assert (await client.request("GET", "/")).status == 200
    assert server.peer_connections(ACME) == 2

    extra = await connect(port, acme)
    refused = await extra.request("GET", "/")
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert json.loads(refused.body) == {"error": "too_many_connections"}
    assert await extra.is_closed_by_server()
    assert refusals(name, "peer_connection_limit") == 1

    await good_client_is_served(port, pki, GLOBEX)  # another org is not affected
    await held[0].aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert server.peer_connections(ACME) == 1
    await good_client_is_served(port, pki, ACME)


async def test_close_peer_connections_aborts_only_that_org(
    nursery: trio.Nursery, name: str, pki: PKI, connect: Connect
) -> None:
    server = mtls_server(name, pki)
    port = await start(nursery, server)
    acme = await connect(port, pki.client(ACME))
    globex = await connect(port, pki.client(GLOBEX))
    assert (await acme.request("GET", "/")).status == 200
    assert (await globex.request("GET", "/")).status == 200

    assert server.close_peer_connections(ACME) == 1
    assert await acme.is_closed_by_server()
    assert (await globex.request("GET", "/")).status == 200
    await trio.testing.wait_all_tasks_blocked()
    assert server.peer_connections(ACME) == 0
    assert server.close_peer_connections(ACME) == 0


async def test_close_peer_connections_abandons_a_request_in_flight(
    nursery: trio.Nursery, name: str, pki: PKI, connect: Connect
) -> None:
    entered = trio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = mtls_server(name, pki, slow)
    port = await start(nursery, server)
    client = await connect(port, pki.client(ACME))
    await client.send_head("GET", "/")
    await client.stream.send_all(client.conn.send(h11.EndOfMessage()) or b"")
    await entered.wait()
    assert server.close_peer_connections(ACME) == 1
    assert await client.is_closed_by_server()


def test_identify_needs_tls() -> None:
    with pytest.raises(ValueError, match="identify needs an ssl_context"):
        HTTPServer("x", echo, identify=identify_by_san())


async def test_set_ssl_context_applies_to_new_connections_only(
    nursery: trio.Nursery, name: str, pki: PKI, connect: Connect
) -> None:
    server = mtls_server(name, pki)
    port = await start(nursery, server)
    before = await connect(port, pki.client(ACME))
    assert (await before.request("GET", "/")).status == 200

    # From now on only clients of the second CA get in (a rules reload does this).
    second_ca = CertAuthority.create("Second federation CA")
    server.set_ssl_context(
        server_context_mtls(second_ca, pki.ca.issue("gw.test.example"), pki.directory)
    )
    assert (await before.request("GET", "/")).status == 200  # open: unaffected
    assert await is_refused(port, pki.client(ACME))
    assert tls_failures(name, Reason.CERT_UNTRUSTED) == 1
    async with httpx.AsyncClient(verify=pki.client(GLOBEX, ca=second_ca)) as http:
        reply = await http.get(f"https://{HOST}:{port}/who")
    assert reply.json()["peer"] == GLOBEX


def test_set_ssl_context_needs_a_tls_listener(pki: PKI) -> None:
    with pytest.raises(ValueError, match="without TLS"):
        HTTPServer("plain", echo).set_ssl_context(pki.server)
