"""The lean h11 federation client against servers that misbehave.

Most tests hand the transport in-memory streams instead of TCP (its
``open_tcp`` seam) with real TLS on top, each connection served by a small
scripted server in the test: everything happens in this process, so trio's
autojump clock can run the timeouts in virtual time and the tests assert the
virtual instant a failure comes. One test uses real sockets and our own
``HTTPServer`` closing an idle keep-alive connection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from gateway.core.envelope import decode_envelope
from gateway.federation.protocol import (
    ACCEPTED,
    EnvelopeResult,
    decode_transaction,
    encode_results,
    encode_transaction,
)
from gateway.federation.sender import new_txn_id
from gateway.federation.transport import FailureKind, H11PeerTransport, TransportError
from gateway.http.limits import ServerLimits
from gateway.http.messages import Request, Response
from gateway.pki import dev
from gateway.pki.certs import spki_pin
from gateway.pki.tls import federation_server_context
from gateway.rules_runtime import RulesHolder
from tests.integration.test_sender import (
    ORG,
    TLS_TEST_TIMEOUT,
    A,
    Side,
    federation_server,
    make_item,
    make_side,
    write_rules,
)

TIMEOUT = 10.0  # the transport's timeout per phase, in virtual seconds here
ENDPOINT = "https://gw.globex.example:8443"

# One scripted server connection: the TLS stream (handshake done) and its h11 state.
Script = Callable[[trio.SSLStream[trio.abc.Stream], h11.Connection], Awaitable[None]]


class MemoryPeer:
    """A peer reached over in-memory streams, each connection run by ``script``."""

    def __init__(self, receiving: Side, sending: Side, script: Script) -> None:
        self.context = federation_server_context(
            cert_file=receiving.cert_file,
            key_file=receiving.key_file,
            trusted_ca_pems=[sending.ca.cert_pem()],
        )
        self.script = script
        self.dialled: list[tuple[str, int]] = []
        self.handshakes_failed = 0
        self.plaintext = bytearray()  # every byte of HTTP the server received, all connections
        self.nursery: trio.Nursery | None = None

    async def open_tcp(self, host: str, port: int) -> trio.abc.Stream:
        assert self.nursery is not None
        self.dialled.append((host, port))
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server)
        return client

    async def _serve(self, raw: trio.abc.Stream) -> None:
        tls = trio.SSLStream(raw, self.context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            self.handshakes_failed += 1
            await trio.aclose_forcefully(raw)
            return
        try:
            await self.script(_Recording(tls, self.plaintext), h11.Connection(h11.SERVER))  # type: ignore[arg-type]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tls)


class _Recording:
    """An SSLStream that keeps what the server read, for the tests to look at."""

    def __init__(self, tls: trio.SSLStream[trio.abc.Stream], into: bytearray) -> None:
        self._tls = tls
        self._into = into

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._tls.receive_some(max_bytes)
        self._into += data
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._tls.send_all(data)

    async def aclose(self) -> None:
        await self._tls.aclose()


async def read_request(
    stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection
) -> tuple[h11.Request, bytes] | None:
    """The next request on the connection, or ``None`` at the client's EOF."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = state.next_event()
        if event is h11.NEED_DATA:
            state.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body)
        else:
            return None


def accepting(body: bytes) -> bytes:
    txn = decode_transaction(body)
    return encode_results([EnvelopeResult(slot.envelope_id, ACCEPTED) for slot in txn.slots])


def one_transaction() -> tuple[bytes, list[EnvelopeResult]]:
    envelopes = [decode_envelope(make_item(A).data) for _ in range(2)]
    body = encode_transaction(ORG, A, envelopes)
    return body, [EnvelopeResult(e.id, ACCEPTED) for e in envelopes]


def transport_for(
    tmp_path: Path,
    acme: Side,
    peer: MemoryPeer,
    *,
    pins: dict[str, str] | None = None,
    **options: int,
) -> H11PeerTransport:
    rules = RulesHolder.load(write_rules(tmp_path, {A: ENDPOINT}, pins=pins or {}))
    return H11PeerTransport(
        ORG,
        acme.cert_file,
        acme.key_file,
        rules,
        timeout=TIMEOUT,
        open_tcp=peer.open_tcp,
        **options,  # type: ignore[arg-type]
    )


async def run_with(
    tmp_path: Path,
    script: Script,
    test: Callable[[H11PeerTransport, MemoryPeer], Awaitable[None]],
    **options: int,
) -> MemoryPeer:
    acme, globex = make_side(tmp_path, ORG), make_side(tmp_path, A)
    peer = MemoryPeer(globex, acme, script)
    async with trio.open_nursery() as nursery:
        peer.nursery = nursery
        transport = transport_for(tmp_path, acme, peer, **options)
        try:
            await test(transport, peer)
        finally:
            await transport.aclose()
        nursery.cancel_scope.cancel()
    return peer


def answer(status: int, body: bytes, *extra: tuple[str, str]) -> list[h11.Event]:
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), *extra]
    return [
        h11.Response(status_code=status, headers=headers),
        h11.Data(data=body),
        h11.EndOfMessage(),
    ]


async def send(
    stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection, events: list[h11.Event]
) -> None:
    await stream.send_all(b"".join(state.send(event) or b"" for event in events))


# -- keep-alive -----------------------------------------------------------------------------


async def test_a_kept_connection_the_server_closed_is_replaced_and_the_request_sent_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The server answers, then closes the connection while it is idle; nothing is lost."""
    served: list[str] = []

    async def close_after_one(
        stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection
    ) -> None:
        got = await read_request(stream, state)
        assert got is not None
        served.append(got[0].target.decode())
        await send(stream, state, answer(200, accepting(got[1])))
        # No "connection: close": a keep-alive answer, then the server goes away.

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        for _ in range(3):
            body, results = one_transaction()
            assert await transport.send_transaction(A, new_txn_id(), body, expected=2) == results
            await trio.sleep(1)

    with caplog.at_level(logging.DEBUG, logger="gateway.federation.transport"):
        peer = await run_with(tmp_path, close_after_one, test)
    assert len(served) == 3
    # In memory nothing tells an idle connection is gone: each reuse found it broken.
    assert sum("closed by the server" in r.getMessage() for r in caplog.records) == 2
    assert len(peer.dialled) == 3  # a new connection each time, dialled at the endpoint's host
    assert peer.dialled[0] == ("gw.globex.example", 8443)


async def test_connection_close_in_an_answer_means_a_new_connection_next(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def answer_and_close(
        stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection
    ) -> None:
        got = await read_request(stream, state)
        assert got is not None
        await send(stream, state, answer(200, accepting(got[1]), ("connection", "close")))

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        for _ in range(2):
            body, results = one_transaction()
            assert await transport.send_transaction(A, new_txn_id(), body, expected=2) == results

    peer = await run_with(tmp_path, answer_and_close, test)
    assert len(peer.dialled) == 2


async def test_one_connection_carries_many_requests_and_each_goes_in_one_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    reads: list[int] = []

    async def keep_alive(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        while True:
            # Read record by record: a request in one write arrives in one TLS record.
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            reads.append(len(data))
            state.receive_data(bytes(data))
            event = state.next_event()
            assert isinstance(event, h11.Request)
            body = bytearray()
            while not isinstance(event := state.next_event(), h11.EndOfMessage):
                assert isinstance(event, h11.Data), "the body came in a second read"
                body += event.data
            await send(stream, state, answer(200, accepting(bytes(body))))
            state.start_next_cycle()

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        for _ in range(3):
            body, results = one_transaction()
            assert len(body) < 16_000  # fits one TLS record
            assert await transport.send_transaction(A, new_txn_id(), body, expected=2) == results

    peer = await run_with(tmp_path, keep_alive, test)
    assert len(peer.dialled) == 1
    assert len(reads) == 3


async def test_a_real_server_closing_an_idle_connection_costs_nothing(tmp_path: Path) -> None:
    """Our HTTPServer's idle keep-alive limit closes the connection between two transactions."""
    acme, globex = make_side(tmp_path, ORG), make_side(tmp_path, A)
    remotes: list[object] = []

    async def receiver(request: Request) -> Response:
        remotes.append(request.remote)
        return Response(200, [("content-type", "application/json")], accepting(request.body))

    server = federation_server(globex, acme, receiver)
    server.limits = ServerLimits(idle_timeout=0.2)
    with trio.fail_after(TLS_TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            rules = RulesHolder.load(write_rules(tmp_path, {A: f"https://127.0.0.1:{port}"}))
            transport = H11PeerTransport(ORG, acme.cert_file, acme.key_file, rules, timeout=10.0)
            try:
                for _ in range(2):
                    body, results = one_transaction()
                    assert (
                        await transport.send_transaction(A, new_txn_id(), body, expected=2)
                        == results
                    )
                    await trio.sleep(0.6)  # past the server's idle limit
            finally:
                await transport.aclose()
            nursery.cancel_scope.cancel()
    assert len(remotes) == 2
    assert remotes[0] != remotes[1]  # a second connection


# -- answers that are not right ----------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_answer_over_the_limit_is_a_bad_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, framing: str
) -> None:
    limit = 1000

    async def oversize(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        got = await read_request(stream, state)
        assert got is not None
        big = b"x" * (limit + 1)
        if framing == "content-length":
            await send(stream, state, answer(200, big))
        else:
            head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
            await send(
                stream,
                state,
                [head, *(h11.Data(data=big[i : i + 100]) for i in range(0, len(big), 100))],
            )
            await trio.sleep_forever()  # never ends the answer: the limit must stop the read

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        body, _ = one_transaction()
        with pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), body, expected=2)
        assert caught.value.kind is FailureKind.BAD_ANSWER
        assert caught.value.status == 200
        assert trio.current_time() < TIMEOUT  # refused on reading, not after a timeout

    await run_with(tmp_path, oversize, test, max_answer_bytes=limit)


async def test_a_chunked_answer_is_read(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def chunked(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        while (got := await read_request(stream, state)) is not None:
            results = accepting(got[1])
            head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
            pieces = [h11.Data(data=results[i : i + 7]) for i in range(0, len(results), 7)]
            await send(stream, state, [head, *pieces, h11.EndOfMessage()])
            state.start_next_cycle()

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        for _ in range(2):
            body, results = one_transaction()
            assert await transport.send_transaction(A, new_txn_id(), body, expected=2) == results
        assert len(peer.dialled) == 1  # chunked answers keep the connection

    await run_with(tmp_path, chunked, test)


async def test_a_truncated_answer_is_a_network_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def truncated(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        got = await read_request(stream, state)
        assert got is not None
        whole = accepting(got[1])
        head = h11.Response(status_code=200, headers=[("content-length", str(len(whole)))])
        await stream.send_all(state.send(head) + whole[: len(whole) // 2])  # type: ignore[operator]
        # then the connection closes

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        body, _ = one_transaction()
        with pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), body, expected=2)
        assert caught.value.kind is FailureKind.NETWORK
        assert len(peer.dialled) == 1  # an answer had begun: not written again

    await run_with(tmp_path, truncated, test)


async def test_retry_after_and_status_reach_the_sender(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def busy(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        got = await read_request(stream, state)
        assert got is not None
        await send(stream, state, answer(503, b'{"error":"overloaded"}', ("retry-after", "17")))

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        body, _ = one_transaction()
        with pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), body, expected=2)
        assert (caught.value.kind, caught.value.status, caught.value.retry_after) == (
            FailureKind.HTTP_503,
            503,
            17,
        )

    await run_with(tmp_path, busy, test)


# -- timeouts, in virtual time -------------------------------------------------------------------


async def test_a_server_that_never_answers_times_out_after_the_read_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def stall(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        assert await read_request(stream, state) is not None
        await trio.sleep_forever()

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        body, _ = one_transaction()
        start = trio.current_time()
        with pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), body, expected=2)
        assert caught.value.kind is FailureKind.TIMEOUT
        assert trio.current_time() - start == pytest.approx(TIMEOUT, abs=0.01)

    await run_with(tmp_path, stall, test)


async def test_a_server_that_stops_mid_answer_times_out_per_read(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The read timeout is per wait for bytes, as httpx's: a slow trickle is not cut off."""

    async def trickle(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        got = await read_request(stream, state)
        assert got is not None
        whole = accepting(got[1])
        head = h11.Response(status_code=200, headers=[("content-length", str(len(whole)))])
        await stream.send_all(state.send(head) or b"")
        for i in range(3):
            await trio.sleep(TIMEOUT * 0.9)
            await stream.send_all(whole[i : i + 1])
        await trio.sleep_forever()

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        body, _ = one_transaction()
        start = trio.current_time()
        with pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), body, expected=2)
        assert caught.value.kind is FailureKind.TIMEOUT
        assert trio.current_time() - start == pytest.approx(3 * TIMEOUT * 0.9 + TIMEOUT, abs=0.01)

    await run_with(tmp_path, trickle, test)


async def test_a_server_that_stalls_the_handshake_is_a_connect_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    acme = make_side(tmp_path, ORG)
    make_side(tmp_path, A)
    held: list[trio.abc.Stream] = []

    async def silent(host: str, port: int) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        held.append(server)  # never read, never answered
        return client

    rules = RulesHolder.load(write_rules(tmp_path, {A: ENDPOINT}))
    transport = H11PeerTransport(
        ORG, acme.cert_file, acme.key_file, rules, timeout=TIMEOUT, open_tcp=silent
    )
    body, _ = one_transaction()
    start = trio.current_time()
    with pytest.raises(TransportError) as caught:
        await transport.send_transaction(A, new_txn_id(), body, expected=2)
    await transport.aclose()
    assert caught.value.kind is FailureKind.TIMEOUT
    assert trio.current_time() - start == pytest.approx(TIMEOUT, abs=0.01)


async def test_a_request_waits_for_a_free_connection_up_to_the_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With one connection per peer, a second request waits; past the timeout it fails."""

    async def stall(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        assert await read_request(stream, state) is not None
        await trio.sleep_forever()

    async def test(transport: H11PeerTransport, peer: MemoryPeer) -> None:
        body, _ = one_transaction()
        failures: list[tuple[FailureKind, float]] = []

        async def one() -> None:
            try:
                await transport.send_transaction(A, new_txn_id(), body, expected=2)
            except TransportError as exc:
                failures.append((exc.kind, trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        assert [kind for kind, _ in failures] == [FailureKind.TIMEOUT, FailureKind.TIMEOUT]
        assert len(peer.dialled) == 1  # the second never had a connection of its own

    await run_with(tmp_path, stall, test)


# -- pinning ----------------------------------------------------------------------------------


async def test_a_pin_failure_breaks_the_handshake_before_any_byte_of_http(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    acme, globex = make_side(tmp_path, ORG), make_side(tmp_path, A)

    async def never(stream: trio.SSLStream[trio.abc.Stream], state: h11.Connection) -> None:
        raise AssertionError("the server's handshake must not complete")

    peer = MemoryPeer(globex, acme, never)
    other_pin = spki_pin(dev.issue_gateway_cert(globex.ca, A, now=datetime.now(UTC)).cert)
    async with trio.open_nursery() as nursery:
        peer.nursery = nursery
        transport = transport_for(tmp_path, acme, peer, pins={A: other_pin})
        body, _ = one_transaction()
        with pytest.raises(TransportError) as caught:
            await transport.send_transaction(A, new_txn_id(), body, expected=2)
        await transport.aclose()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert caught.value.kind is FailureKind.PIN_MISMATCH
    assert peer.handshakes_failed == 1  # our Finished never left: the server saw no client
    assert peer.plaintext == b""


# -- the words failures get ---------------------------------------------------------------------


def test_lean_client_errors_are_translated_as_httpx_errors_were() -> None:
    from gateway.federation import h11client
    from gateway.federation.transport import translate_error

    refused = h11client.ConnectError("refused")
    refused.__cause__ = ConnectionRefusedError(111, "refused")
    cases = [
        (refused, FailureKind.CONNECT),
        (h11client.ConnectTimeout("slow"), FailureKind.TIMEOUT),
        (h11client.WriteTimeout("slow"), FailureKind.TIMEOUT),
        (h11client.ReadTimeout("slow"), FailureKind.TIMEOUT),
        (h11client.PoolTimeout("busy"), FailureKind.TIMEOUT),
        (h11client.ConnectionLost("garbage", before_answer=False), FailureKind.NETWORK),
        (h11client.AnswerTooLarge("big", status=200), FailureKind.BAD_ANSWER),
        (h11client.RequestInvalid("bad target"), FailureKind.LOCAL),
    ]
    for exc, kind in cases:
        assert translate_error(exc, A).kind is kind


async def test_a_handshake_cut_off_by_the_server_is_a_connect_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    acme = make_side(tmp_path, ORG)
    make_side(tmp_path, A)

    async def hang_up(host: str, port: int) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await server.aclose()
        return client

    rules = RulesHolder.load(write_rules(tmp_path, {A: ENDPOINT}))
    transport = H11PeerTransport(
        ORG, acme.cert_file, acme.key_file, rules, timeout=TIMEOUT, open_tcp=hang_up
    )
    body, _ = one_transaction()
    with pytest.raises(TransportError) as caught:
        await transport.send_transaction(A, new_txn_id(), body, expected=2)
    await transport.aclose()
    assert caught.value.kind is FailureKind.CONNECT
