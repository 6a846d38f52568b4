"""News that a peer is up: the listener's hearing hook and the greeting at start."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from gateway.federation.liveness import greet_peers, hearing
from gateway.federation.protocol import VERSION_PATH
from gateway.federation.transport import FailureKind, TransportError
from gateway.http.messages import Request, Response


def request(peer: str | None) -> Request:
    return Request(
        method="GET",
        path=VERSION_PATH,
        query={},
        headers=[],
        body=b"",
        peer=peer,
        remote=("127.0.0.1", 5000),
        listener="federation",
    )


async def test_every_request_from_an_identified_peer_is_heard_before_it_is_handled() -> None:
    heard: list[str] = []
    handled: list[tuple[str | None, list[str]]] = []

    async def handler(req: Request) -> Response:
        handled.append((req.peer, list(heard)))
        return Response(404, [], b"")

    wrapped = hearing(handler, heard.append)
    answer = await wrapped(request("globex.example"))
    assert answer.status == 404  # whatever the answer: the peer reached us
    await wrapped(request(None))  # no identity (no client certificate): no news
    assert heard == ["globex.example"]
    assert handled == [("globex.example", ["globex.example"]), (None, ["globex.example"])]


class FakeGetter:
    """Peers that answer 200, answer something else, fail, or never answer."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.at_once = 0
        self.most_at_once = 0

    async def get(self, peer: str, path: str, *, max_bytes: int) -> tuple[int, bytes]:
        self.asked.append((peer, path))
        assert max_bytes > 0
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            await trio.sleep(1)
            if peer.startswith("down"):
                raise TransportError(f"{peer}: connection refused", kind=FailureKind.CONNECT)
            if peer.startswith("hangs"):
                await trio.sleep_forever()
            if peer.startswith("bug"):
                raise RuntimeError("a bug in the transport")
            return (503 if peer.startswith("busy") else 200), b"{}"
        finally:
            self.at_once -= 1


async def test_greeting_asks_each_peer_once_and_survives_every_failure(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    getter = FakeGetter()
    peers = ["up.example", "down.example", "busy.example", "hangs.example", "bug.example"]
    start = trio.current_time()
    with caplog.at_level(logging.INFO, logger="gateway.federation.liveness"):
        answered = await greet_peers(getter, peers, seconds_each=10.0)
    assert trio.current_time() - start == pytest.approx(10.0)  # the hanging one, cut off
    assert answered == {
        "up.example": True,
        "down.example": False,
        "busy.example": False,
        "hangs.example": False,
        "bug.example": False,
    }
    assert sorted(getter.asked) == sorted((peer, VERSION_PATH) for peer in peers)
    text = caplog.text
    assert "down.example: not greeted: down.example: connection refused" in text
    assert "busy.example: greeted, answered HTTP 503" in text
    assert "hangs.example: not greeted: no answer within 10.0s" in text
    assert "bug.example: greeting failed unexpectedly" in text
    assert "greeted 1 of 5 peer(s)" in text


async def test_greeting_asks_a_few_peers_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    getter = FakeGetter()
    peers = [f"up{n}.example" for n in range(20)]
    answered = await greet_peers(getter, peers, concurrency=3)
    assert all(answered.values())
    assert len(answered) == 20
    assert getter.most_at_once == 3


async def test_no_peers_no_greeting(autojump_clock: trio.testing.MockClock) -> None:
    getter = FakeGetter()
    assert await greet_peers(getter, []) == {}
    assert getter.asked == []
