"""Key records and org signing keys: publish and look up, for an authenticated caller.

Key records: ``PUT /v1/keys`` signs the caller's public keys with the org
signing key and stores the record; ``GET /v1/keys/{address}`` serves ours
from the store and a peer's through ``remote_key_lookup``, checked against the
signing key the rules pin for that peer before it is passed on.
``GET /v1/orgs/{org}`` tells a client which org key to check records with:
ours (from the org signing seed), or the ``signing_key`` our rules pin for a
peer; the admin who pins partner keys is the client's trust anchor.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from gateway.clientapi.caller import Caller
from gateway.clientapi.limits import MAX_KEYS_BODY_BYTES
from gateway.clientapi.request_parsing import json_body, normal_address, normal_domain
from gateway.core.address import Address
from gateway.core.keytext import format_signing_key
from gateway.crypto.key_records import parse_verified_key_record, sign_key_record
from gateway.crypto.keys import PublicKeys
from gateway.errors import GatewayError, KeyRecordError, Reason
from gateway.http import Request, Response, error_response, json_response
from gateway.http.messages import JSON_CONTENT_TYPE
from gateway.storage.base import Storage

log = logging.getLogger("gateway.clientapi")


class KeyDirectory:
    """``PUT /v1/keys``, ``GET /v1/keys/{address}`` and ``GET /v1/orgs/{org}``."""

    def __init__(
        self,
        *,
        org: str,
        storage: Storage,
        org_signing_seed: bytes,
        org_verify_key: bytes,
        clock_ms: Callable[[], int],
        remote_key_lookup: Callable[[Address], Awaitable[bytes | None]],
    ) -> None:
        self._org = org
        self._storage = storage
        self._seed = org_signing_seed
        self._org_verify_key = org_verify_key
        self._clock_ms = clock_ms
        self._remote_key_lookup = remote_key_lookup

    # -- key records ------------------------------------------------------------------------
    async def put_keys(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Response:
        if len(request.body) > MAX_KEYS_BODY_BYTES:
            return error_response(413, Reason.BODY_TOO_LARGE)
        public = PublicKeys.from_json(json_body(request.body, "public keys"))
        if public.address != caller.address:
            return json_response(
                403,
                {
                    "error": Reason.FORBIDDEN.value,
                    "message": f"a token of {caller.user} may publish only its own keys",
                },
            )
        now_ms = self._clock_ms()
        record = sign_key_record(public, org_signing_seed=self._seed, issued_ms=now_ms)
        data = record.encode()
        await self._storage.user_keys_put(caller.user, data, at_ms=now_ms)
        log.info("published key record of %s", caller.user)
        return Response(200, [("content-type", JSON_CONTENT_TYPE)], data)

    async def get_keys(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Response:
        address = normal_address(params["address"])  # AddressError: 400 with its reason
        if address.org == self._org:
            if caller.rules.group_of(address.user) is None:
                return error_response(404, Reason.NOT_FOUND)
            data = await self._storage.user_keys_get(str(address))
            if data is None:
                return error_response(404, Reason.NOT_FOUND)
            return Response(200, [("content-type", JSON_CONTENT_TYPE)], data)
        peer = caller.rules.peer(address.org)
        if peer is None:
            return error_response(404, Reason.UNKNOWN_PEER)
        try:
            found = await self._remote_key_lookup(address)
        except GatewayError as exc:
            log.info("key lookup of %s at %s failed: %s", address, peer.org, exc.reason)
            return error_response(502, Reason.PEER_UNAVAILABLE)
        if found is None:
            return error_response(404, Reason.NOT_FOUND)
        try:
            record = parse_verified_key_record(
                found,  # bounded by MAX_KEY_RECORD_BYTES there
                org_verify_key=peer.signing_key,
                expected_address=address,
            )
        except KeyRecordError:
            log.warning(
                "peer %s served a key record for %s that does not verify", peer.org, address
            )
            return error_response(502, Reason.KEY_RECORD_INVALID)
        return Response(200, [("content-type", JSON_CONTENT_TYPE)], record.encode())

    # -- org signing keys -------------------------------------------------------------------
    async def get_org(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Response:
        """The org key a client checks key records against: ours, or a peer's pinned one."""
        org = normal_domain(params["org"])  # AddressError: 400 with its reason
        if org == self._org:
            key = self._org_verify_key
        else:
            peer = caller.rules.peer(org)
            if peer is None:
                return error_response(404, Reason.UNKNOWN_PEER)
            key = peer.signing_key
        return json_response(200, {"org": org, "signing_key": format_signing_key(key)})
