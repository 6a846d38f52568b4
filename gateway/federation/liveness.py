"""News that a peer is up: heard on every request from it, and a greeting at start.

A lane that failed to reach a peer backs off (exponential, full jitter, up to
``limits.backoff_max``), so after a peer's outage the first retry may come
long after the peer is back. Two cheap signals end that wait early (after
Synapse, which wakes a destination's queue when that server contacts it):

* **Heard.** :func:`hearing` wraps the federation listener's handler: every
  request from an authenticated peer (the mTLS identity, never a header)
  calls ``on_heard(peer)`` before it is handled, whatever it asks and
  whatever the answer. The sender's :meth:`~gateway.federation.sender.Sender.heard_from`
  then ends that peer's backoff, if it followed a failure to reach the
  peer, at most once per ``backoff_initial`` (a backoff after an error
  answer or a ``Retry-After`` stands: that peer was up).
* **Greeting.** :func:`greet_peers` runs once when the gateway starts: a
  ``GET /federation/v1/version`` to each peer of the rules, a few at a time,
  each within a deadline. A peer that backed off from us while we were down
  hears from us at once and sends what it holds for us. A peer that cannot
  be reached is logged and left alone: its lane tries when it has envelopes.

Both are hints, never authority: a greeting changes nothing at the peer but
the time of a retry it would make anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Final

import trio

from gateway.federation.keys import PeerGetter
from gateway.federation.protocol import VERSION_PATH
from gateway.federation.transport import TransportError
from gateway.http.messages import Handler, Request, Response

LOGGER = logging.getLogger("gateway.federation.liveness")

GREETING_CONCURRENCY: Final = 8  # peers greeted at once
GREETING_TIMEOUT: Final = 10.0  # seconds for one peer's greeting, connection included
MAX_VERSION_ANSWER_BYTES: Final = 4096

OnHeard = Callable[[str], None]


def hearing(handler: Handler, on_heard: OnHeard) -> Handler:
    """``handler``, calling ``on_heard(peer)`` first for each request from an identified peer."""

    async def heard(request: Request) -> Response:
        if request.peer is not None:
            on_heard(request.peer)
        return await handler(request)

    return heard


async def greet_peers(
    transport: PeerGetter,
    peers: Collection[str],
    *,
    seconds_each: float = GREETING_TIMEOUT,
    concurrency: int = GREETING_CONCURRENCY,
) -> dict[str, bool]:
    """``GET /federation/v1/version`` once to each of ``peers``; which answered 200.

    Never raises for a peer's failure: each is logged (our own words, not the
    peer's) and the others go on.
    """
    limiter = trio.CapacityLimiter(concurrency)
    answered: dict[str, bool] = {}

    async def greet(peer: str) -> None:
        async with limiter:
            answered[peer] = await _greet(transport, peer, seconds_each)

    async with trio.open_nursery() as nursery:
        for peer in sorted(peers):
            nursery.start_soon(greet, peer)
    greeted = sum(answered.values())
    LOGGER.info("greeted %d of %d peer(s)", greeted, len(answered))
    return answered


async def _greet(transport: PeerGetter, peer: str, seconds: float) -> bool:
    with trio.move_on_after(seconds) as timer:
        try:
            status, _body = await transport.get(
                peer, VERSION_PATH, max_bytes=MAX_VERSION_ANSWER_BYTES
            )
        except TransportError as exc:
            LOGGER.info("%s: not greeted: %s", peer, exc.message)
            return False
        except Exception:  # a bug of ours must not stop the start of the gateway
            LOGGER.exception("%s: greeting failed unexpectedly", peer)
            return False
    if timer.cancelled_caught:
        LOGGER.info("%s: not greeted: no answer within %ss", peer, seconds)
        return False
    if status != 200:
        LOGGER.info("%s: greeted, answered HTTP %d", peer, status)
        return False
    LOGGER.debug("%s: greeted", peer)
    return True
