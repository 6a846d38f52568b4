"""What each peer speaks: envelope versions and transaction framings, from its version document.

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

**Transaction framings.** The same document lists the Content-Types of
transaction bodies the peer takes (``transaction_types``; none listed: JSON
only). A lane asks :meth:`PeerVersions.transaction_types` before each batch
(answered from memory but for the first of each hour) and sends the binary
framing only to a peer that lists it; when it is not known, JSON, which every
peer takes. A peer that lists it but refuses a binary body (``415``, or the
``400`` of a receiver that ignores Content-Type) is told to
:meth:`PeerVersions.refused`: the lane sends it JSON for
:data:`VERSIONS_TTL_SECONDS`, whatever its document says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol, runtime_checkable

import trio

from gateway.errors import ProtocolError
from gateway.federation.keys import PeerGetter
from gateway.federation.protocol import (
    MEDIA_TYPE_JSON,
    VERSION_PATH,
    PeerVersion,
    parse_version_document,
)
from gateway.federation.transport import TransportError

LOGGER = logging.getLogger("gateway.federation.versions")

VERSIONS_TTL_SECONDS: Final = 3600.0  # how long a peer's answer is trusted
FAILED_TTL_SECONDS: Final = 60.0  # how long "could not ask" stands before asking again
ASK_TIMEOUT_SECONDS: Final = 10.0
MAX_VERSION_ANSWER_BYTES: Final = 4096
MAX_REMEMBERED_PEERS: Final = 100_000  # bounded like the rules' peers; far above any real count


JSON_ONLY: Final = frozenset({MEDIA_TYPE_JSON})


class EnvelopeVersionSource(Protocol):
    """What a lane asks before sending version 2 envelopes (a fake stands in for tests)."""

    async def envelope_versions(self, peer: str) -> frozenset[int] | None:
        """The versions ``peer`` speaks, or ``None`` when that is not known now."""
        ...


@runtime_checkable
class TransactionTypeSource(Protocol):
    """What a lane asks before framing a transaction (:class:`PeerVersions` is one)."""

    async def transaction_types(self, peer: str) -> frozenset[str]:
        """The transaction Content-Types to use with ``peer`` (JSON alone when not known)."""
        ...

    def refused(self, peer: str, media_type: str) -> None:
        """``peer`` refused a body of ``media_type``: do not offer it again for a while."""
        ...


class PeerVersions:
    """Peers' version documents (envelope versions, transaction types), asked and remembered."""

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
        # peer -> (document or None for "could not ask", trio time it stops standing)
        self._known: dict[str, tuple[PeerVersion | None, float]] = {}
        # peer -> (media types it refused, trio time that stops standing)
        self._refused: dict[str, tuple[frozenset[str], float]] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def envelope_versions(self, peer: str) -> frozenset[int] | None:
        document = await self._document(peer)
        return None if document is None else document.envelope_versions

    async def transaction_types(self, peer: str) -> frozenset[str]:
        document = await self._document(peer)
        if document is None:
            return JSON_ONLY
        refused = self._refused.get(peer)
        if refused is not None:
            if refused[1] > self._now():
                return (document.transaction_types - refused[0]) | JSON_ONLY
            del self._refused[peer]
        return document.transaction_types

    def refused(self, peer: str, media_type: str) -> None:
        if media_type == MEDIA_TYPE_JSON:
            return  # every peer takes JSON: never stop offering it
        if len(self._refused) >= MAX_REMEMBERED_PEERS and peer not in self._refused:
            self._refused.clear()
        earlier = self._refused.get(peer)
        types = frozenset({media_type}) | (earlier[0] if earlier is not None else frozenset())
        self._refused[peer] = (types, self._now() + self._ttl)
        LOGGER.info(
            "%s refused a transaction body of type %s: sending it JSON for %.0fs",
            peer,
            media_type,
            self._ttl,
        )

    async def _document(self, peer: str) -> PeerVersion | None:
        known = self._known.get(peer)
        if known is not None and known[1] > self._now():
            return known[0]
        lock = self._locks.setdefault(peer, trio.Lock())
        async with lock:  # one question per peer at a time; the others read its answer
            known = self._known.get(peer)
            if known is not None and known[1] > self._now():
                return known[0]
            document = await self._ask(peer)
            if len(self._known) >= MAX_REMEMBERED_PEERS and peer not in self._known:
                self._known.clear()
            ttl = self._ttl if document is not None else self._failed_ttl
            self._known[peer] = (document, self._now() + ttl)
            return document

    async def _ask(self, peer: str) -> PeerVersion | None:
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
            document = parse_version_document(body)
        except ProtocolError as exc:
            LOGGER.info("%s: envelope versions not known: %s", peer, exc.message)
            return None
        LOGGER.debug(
            "%s speaks envelope versions %s, transaction types %s",
            peer,
            sorted(document.envelope_versions),
            ", ".join(sorted(document.transaction_types)),
        )
        return document
