"""The federated key directory: ``GET /federation/v1/keys/{user}``, both ends.

Server side (:class:`KeyDirectory`): a peer asks for one of our users' key
records. The answer is the record exactly as stored when the user published
it (``PUT /v1/keys``), signed by our org signing key; the asking gateway and
its client check that signature against the key their rules pin for us, so
this endpoint needs to be no more trusted than the wire. It answers only a
peer that the mTLS layer proved (``request.peer``) and that the rules in
force name: anyone else gets ``403 unknown_peer``. A user who is in no group
of our rules, whose group does not receive from the asking peer (nor from
any of its groups: ``CompiledRules.visible_to``), or who never published
keys, is ``404 recipient_unknown``: the same status, code and body for all
three, and the same work (one storage read each, its answer discarded when
the user is not visible), so a peer cannot tell which of our users exist,
are segmented away from it, or have not published (docs/security.md).

Client side (:func:`fetch_remote_keys`): our gateway asks a peer, over the
peer's persistent mTLS client of the sender's transport (same SNI, same pins
checked in the handshake), and reads at most :data:`MAX_KEY_ANSWER_BYTES`.
``200`` is the record's bytes (still unverified: the caller checks the
signature), ``404`` is ``None``, anything else a
:class:`~gateway.federation.transport.TransportError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final, Protocol

from gateway.core.address import normalize_user
from gateway.crypto.key_records import MAX_KEY_RECORD_BYTES
from gateway.errors import AddressError, Reason
from gateway.federation.protocol import KEYS_PATH
from gateway.federation.transport import FailureKind, TransportError
from gateway.federation.trust import RulesSource
from gateway.http import Request, Response, Router, error_response
from gateway.http.messages import JSON_CONTENT_TYPE

LOGGER = logging.getLogger("gateway.federation.keys")

KEYS_ROUTE: Final = KEYS_PATH + "{user}"
#: A key record is at most MAX_KEY_RECORD_BYTES; an error body is far smaller.
MAX_KEY_ANSWER_BYTES: Final = MAX_KEY_RECORD_BYTES
_OK: Final = 200
_NOT_FOUND: Final = 404


class KeyStore(Protocol):
    """What the directory needs of :class:`~gateway.storage.base.Storage`."""

    async def user_keys_get(self, user: str) -> bytes | None: ...


class PeerGetter(Protocol):
    """What :func:`fetch_remote_keys` needs of the transport (H11PeerTransport is one)."""

    async def get(self, peer: str, path: str, *, max_bytes: int) -> tuple[int, bytes]: ...


class KeyDirectory:
    """The federation listener's key handler; see the module docstring."""

    def __init__(self, *, org: str, rules: RulesSource, storage: KeyStore) -> None:
        self.org = org
        self._rules = rules
        self._storage = storage

    def add_routes(self, router: Router) -> None:
        router.add("GET", KEYS_ROUTE, self.get_keys)

    async def get_keys(self, request: Request, params: Mapping[str, str]) -> Response:
        rules = self._rules.current  # one snapshot for the whole request
        peer = request.peer
        if peer is None or rules.peer(peer) is None:
            LOGGER.warning(
                "refused a key lookup from %s: not a peer in the rules in force",
                peer or "an unidentified client",
            )
            return error_response(403, Reason.UNKNOWN_PEER)
        try:
            user = normalize_user(params["user"])
        except AddressError as exc:
            return error_response(400, exc.reason)
        # Read first, whoever the user is: a user the peer may not see costs the
        # same storage read as one it may, so the answer's timing tells nothing.
        record = await self._storage.user_keys_get(f"{user}@{self.org}")
        if not rules.visible_to(user, peer):
            why = "is in no group" if rules.group_of(user) is None else "is segmented from it"
            LOGGER.info("key lookup from %s: %s %s: answered recipient_unknown", peer, user, why)
            return error_response(_NOT_FOUND, Reason.RECIPIENT_UNKNOWN)
        if record is None:
            LOGGER.info("key lookup from %s: %s has published no keys", peer, user)
            return error_response(_NOT_FOUND, Reason.RECIPIENT_UNKNOWN)
        LOGGER.debug("key lookup from %s: served the record of %s", peer, user)
        return Response(_OK, [("content-type", JSON_CONTENT_TYPE)], record)


async def fetch_remote_keys(transport: PeerGetter, peer: str, user: str) -> bytes | None:
    """The key record bytes of ``user@peer`` as the peer serves them, or ``None`` (404).

    The record is *not* verified here: check it against the peer's pinned
    signing key. ``TransportError`` if the peer could not be asked or gave
    another answer.
    """
    status, body = await transport.get(
        peer, KEYS_PATH + normalize_user(user), max_bytes=MAX_KEY_ANSWER_BYTES
    )
    if status == _OK:
        return body
    if status == _NOT_FOUND:
        return None
    if 500 <= status <= 599:
        kind = FailureKind.HTTP_5XX
    elif 400 <= status <= 499:
        kind = FailureKind.HTTP_4XX
    else:
        kind = FailureKind.HTTP_OTHER
    raise TransportError(f"{peer}: key lookup answered HTTP {status}", kind=kind, status=status)
