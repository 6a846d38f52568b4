"""What envelope versions each peer speaks, learned before sending it a version 2 envelope.

Theory of operation
-------------------
A gateway from before envelope version 2 answers each version 2 envelope
``envelope_bad_version`` (docs/protocol.md §4); the sender would learn it only
after sending the bytes. So before a lane sends a transaction holding version
2 envelopes, it asks :class:`PeerVersions` what that peer speaks, which reads
``envelope_versions`` from the peer's ``GET /federation/v1/version`` (a peer
whose document lacks the field speaks version 1 only) and keeps the answer for
:data:`VERSIONS_TTL_SECONDS`, so a peer that upgrades is noticed within that
time. Envelopes of a version the peer does not list leave the lane unsent,
``rejected:envelope_bad_version``, a delivery status their sender can read.

A question that cannot be answered (the peer is down, answers an error or a
malformed document) is remembered as unknown for :data:`FAILED_TTL_SECONDS`
and the lane sends anyway: the peer's own answer per envelope is the
authority, and this is only a way not to send what it would refuse. Time is
trio's clock, so tests drive it with ``autojump_clock``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol

import trio

from gateway.errors import ProtocolError
from gateway.federation.keys import PeerGetter
from gateway.federation.protocol import VERSION_PATH, parse_envelope_versions
from gateway.federation.transport import TransportError

LOGGER = logging.getLogger("gateway.federation.versions")

VERSIONS_TTL_SECONDS: Final = 3600.0  # how long a peer's answer is trusted
FAILED_TTL_SECONDS: Final = 60.0  # how long "could not ask" stands before asking again
ASK_TIMEOUT_SECONDS: Final = 10.0
MAX_VERSION_ANSWER_BYTES: Final = 4096
MAX_REMEMBERED_PEERS: Final = 100_000  # bounded like the rules' peers; far above any real count


class EnvelopeVersionSource(Protocol):
    """What a lane asks before sending version 2 envelopes (a fake stands in for tests)."""

    async def envelope_versions(self, peer: str) -> frozenset[int] | None:
        """The versions ``peer`` speaks, or ``None`` when that is not known now."""
        ...


class PeerVersions:
    """Peers' envelope versions, asked through ``transport`` and remembered a while."""

    def __init__(
        self,
        transport: PeerGetter,
        *,
        ttl: float = VERSIONS_TTL_SECONDS,
        failed_ttl: float = FAILED_TTL_SECONDS,
        timeout: float = ASK_TIMEOUT_SECONDS,
        now: Callable[[], float] = trio.current_time,
    ) -> None:
        self._transport = transport
        self._ttl = ttl
        self._failed_ttl = failed_ttl
        self._timeout = timeout
        self._now = now
        # peer -> (versions or None for "could not ask", trio time it stops standing)
        self._known: dict[str, tuple[frozenset[int] | None, float]] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def envelope_versions(self, peer: str) -> frozenset[int] | None:
        known = self._known.get(peer)
        if known is not None and known[1] > self._now():
            return known[0]
        lock = self._locks.setdefault(peer, trio.Lock())
        async with lock:  # one question per peer at a time; the others read its answer
            known = self._known.get(peer)
            if known is not None and known[1] > self._now():
                return known[0]
            versions = await self._ask(peer)
            if len(self._known) >= MAX_REMEMBERED_PEERS and peer not in self._known:
                self._known.clear()
            ttl = self._ttl if versions is not None else self._failed_ttl
            self._known[peer] = (versions, self._now() + ttl)
            return versions

    async def _ask(self, peer: str) -> frozenset[int] | None:
        status, body = 0, b""
        with trio.move_on_after(self._timeout) as timer:
            try:
                status, body = await self._transport.get(
                    peer, VERSION_PATH, max_bytes=MAX_VERSION_ANSWER_BYTES
                )
            except TransportError as exc:
                LOGGER.info("%s: envelope versions not known: %s", peer, exc.message)
                return None
        if timer.cancelled_caught:
            LOGGER.info("%s: envelope versions not known: no answer in %ss", peer, self._timeout)
            return None
        if status != 200:
            LOGGER.info("%s: envelope versions not known: HTTP %d", peer, status)
            return None
        try:
            versions = parse_envelope_versions(body)
        except ProtocolError as exc:
            LOGGER.info("%s: envelope versions not known: %s", peer, exc.message)
            return None
        LOGGER.debug("%s speaks envelope versions %s", peer, sorted(versions))
        return versions
