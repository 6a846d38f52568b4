"""The client API's handlers: what the org's own clients call (docs/client-api.md).

Theory of operation
-------------------
Every request first proves a user: ``Authorization: Bearer <token>`` is hashed
and looked up: a session token (``gws_``) of a sign-in through OpenID Connect
(:mod:`gateway.oidc.sessions`: expired, ``401 session_expired``; a group that
now requires a stronger sign-in, ``403 mfa_required``), or an admin-issued
token (``gwt_``, :mod:`gateway.clientapi.tokens`; refused with
``401 admin_tokens_disabled`` when ``oidc.admin_tokens`` is false). No,
unknown or revoked token: ``401 unauthorized``. A token whose user the rules in force no longer name
(removed from every group): ``403 no_group``, on every endpoint, so removing a
user from the rules cuts them off without revoking anything. The rules are
read once per request (``rules.current``), so one request sees one version.

The endpoints' families each live in their own module, which
:class:`ClientAPI` wires together and hands the authenticated caller
(:class:`~.caller.Caller`): submission (:mod:`.submission`, storing in
:mod:`.storing`, batch bodies in :mod:`.batch_body`, outcomes in
:mod:`.outcomes`), the mailbox (:mod:`.mailbox`), key records and org keys
(:mod:`.keys`); bounds are in :mod:`.limits`, request parsing in
:mod:`.request_parsing`. ``GET /v1/me``, delivery statuses and
retention-mismatch reports are answered here.

Retention: ``GET /v1/me`` tells a client under outbound retention which key
to wrap for; ``POST /v1/reports/retention-mismatch`` is how a client reports
envelopes it refused because their retention copy did not match (an envelope
in the caller's mailbox only): each is counted and audited
(``retention_mismatch``), with the sender as the envelope names it.

Nothing here logs a token or a ciphertext: decisions are logged with the
envelope id, the group and the reason.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Protocol

from gateway.clientapi.batch_body import BATCH_FORMATS
from gateway.clientapi.caller import Caller
from gateway.clientapi.keys import KeyDirectory
from gateway.clientapi.limits import (
    DEFAULT_FETCH_LIMIT,
    DEFAULT_WAIT_SECONDS,
    MAX_ACK_IDS,
    MAX_BATCH_ENVELOPES,
    MAX_FETCH_LIMIT,
    MAX_KEYS_BODY_BYTES,
    MAX_WAIT_SECONDS,
    MS_PER_SECOND,
)
from gateway.clientapi.mailbox import MAILBOX_QUERY, Mailbox
from gateway.clientapi.mailbox_wait import MailboxWaiters
from gateway.clientapi.retention import ArchiveSink, RetentionDesk, SenderKeyBook, parse_report
from gateway.clientapi.signin import signin_error_response
from gateway.clientapi.storing import SubmissionStore
from gateway.clientapi.submission import FULL_RETRY_AFTER_SECONDS, RESULT_ACCEPTED, Submissions
from gateway.clientapi.tokens import authenticate, is_well_formed
from gateway.core.address import Address
from gateway.core.envelope import ENVELOPE_ID_RE
from gateway.core.keytext import format_retention_key
from gateway.core.ratelimit import RateLimiter
from gateway.core.rules import CompiledRules
from gateway.crypto.key_records import KEY_BYTES, org_verify_key
from gateway.errors import ProtocolError, Reason, SignInError
from gateway.http import Request, Response, Router, error_response, json_response
from gateway.observability.audit import AuditSink, NoAudit
from gateway.oidc.sessions import SessionService, is_session_token
from gateway.reserve import Reserve
from gateway.storage.base import Bound, Storage

__all__ = [  # the bounds and names importers took from here before the split, too
    "BATCH_FORMATS",
    "DEFAULT_FETCH_LIMIT",
    "DEFAULT_WAIT_SECONDS",
    "FULL_RETRY_AFTER_SECONDS",
    "MAX_ACK_IDS",
    "MAX_BATCH_ENVELOPES",
    "MAX_FETCH_LIMIT",
    "MAX_KEYS_BODY_BYTES",
    "MAX_WAIT_SECONDS",
    "MS_PER_SECOND",
    "RESULT_ACCEPTED",
    "WWW_AUTHENTICATE",
    "ClientAPI",
    "ClockMs",
    "OnSpooled",
    "RemoteKeyLookup",
    "RulesSource",
    "no_remote_key_lookup",
    "wall_clock_ms",
]

WWW_AUTHENTICATE: Final = ("www-authenticate", 'Bearer realm="gateway"')

ClockMs = Callable[[], int]
OnSpooled = Callable[[str], None]
RemoteKeyLookup = Callable[[Address], Awaitable[bytes | None]]


class RulesSource(Protocol):
    """What the client API needs of :class:`~gateway.rules_runtime.RulesHolder`."""

    @property
    def current(self) -> CompiledRules: ...


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _no_spool_listener(peer: str) -> None:
    """The default ``on_spooled``: nobody to wake (tests, a gateway without a sender)."""


async def no_remote_key_lookup(address: Address) -> bytes | None:
    """The default ``remote_key_lookup``: peers' keys are not looked up."""
    return None


class ClientAPI:
    """The client API's handlers; :meth:`add_routes` puts them on a router."""

    def __init__(
        self,
        *,
        org: str,
        rules: RulesSource,
        storage: Storage,
        org_signing_seed: bytes,
        waiters: MailboxWaiters,
        clock_ms: ClockMs = wall_clock_ms,
        on_spooled: OnSpooled = _no_spool_listener,
        remote_key_lookup: RemoteKeyLookup = no_remote_key_lookup,
        max_wait_seconds: float = MAX_WAIT_SECONDS,
        audit: AuditSink | None = None,
        lane_bound: Bound | None = None,
        mailbox_bound: Bound | None = None,
        submit_rate: RateLimiter | None = None,
        reserve: Reserve | None = None,
        archive: ArchiveSink | None = None,
        sessions: SessionService | None = None,
        admin_tokens: bool = True,
    ) -> None:
        if not isinstance(org_signing_seed, bytes) or len(org_signing_seed) != KEY_BYTES:
            raise ValueError(f"org_signing_seed must be {KEY_BYTES} bytes")
        if not 0 < max_wait_seconds <= MAX_WAIT_SECONDS:
            raise ValueError(f"max_wait_seconds must be within (0, {MAX_WAIT_SECONDS}]")
        self._org = org
        self._rules = rules
        self._storage = storage
        org_verify = org_verify_key(org_signing_seed)
        audit_sink: AuditSink = audit if audit is not None else NoAudit()
        # archive None: retention is enforced, nothing is archived here
        self._retention = RetentionDesk(
            org=org,
            mailboxes=storage,
            archive=archive,
            audit=audit_sink,
            clock_ms=clock_ms,
            sender_keys=SenderKeyBook(
                org=org,
                org_verify_key=org_verify,
                directory=storage,
                remote=remote_key_lookup,
            ),
        )
        self._sessions = sessions
        self._admin_tokens = admin_tokens
        self._submissions = Submissions(
            org=org,
            storage=storage,
            store=SubmissionStore(
                storage=storage,
                lane_bound=lane_bound,
                mailbox_bound=mailbox_bound,
                reserve=reserve,
            ),
            waiters=waiters,
            clock_ms=clock_ms,
            on_spooled=on_spooled,
            audit=audit_sink,
            retention=self._retention,
            submit_rate=submit_rate,
            reserve=reserve,
        )
        self._mailbox = Mailbox(
            storage=storage,
            waiters=waiters,
            clock_ms=clock_ms,
            max_wait_seconds=max_wait_seconds,
            retention=self._retention,
            count_denial=self._submissions.count_denial,
        )
        self._keys = KeyDirectory(
            org=org,
            storage=storage,
            org_signing_seed=org_signing_seed,
            org_verify_key=org_verify,
            clock_ms=clock_ms,
            remote_key_lookup=remote_key_lookup,
        )

    def add_routes(self, router: Router) -> None:
        router.add("GET", "/v1/me", self.get_me)
        router.add("POST", "/v1/envelopes", self.post_envelope)
        router.add("POST", "/v1/envelopes/batch", self.post_batch)
        router.add("GET", "/v1/mailbox", self.get_mailbox)
        router.add("POST", "/v1/mailbox/ack", self.post_ack)
        router.add("GET", "/v1/status/{envelope_id}", self.get_status)
        router.add("PUT", "/v1/keys", self.put_keys)
        router.add("GET", "/v1/keys/{address}", self.get_keys)
        router.add("GET", "/v1/orgs/{org}", self.get_org)
        router.add("POST", "/v1/reports/retention-mismatch", self.post_retention_mismatch)

    # -- authentication ------------------------------------------------------------
    async def _caller(
        self, request: Request, *, query: frozenset[str] = frozenset()
    ) -> Caller | Response:
        """The authenticated caller, or the refusal to answer; ``query``: the parameters taken.

        A query parameter the endpoint does not take is ``400 protocol_error``
        (after the token is checked): a misspelt ``limt=5`` is the client's
        bug to hear about, not to be silently ignored.
        """
        caller = await self._identify(request)
        if isinstance(caller, Response):
            return caller
        unknown = request.query.keys() - query
        if unknown:
            names = ", ".join(repr(name[:40]) for name in sorted(unknown)[:5])
            taken = ", ".join(sorted(query)) or "none"
            raise ProtocolError(f"unknown query parameter(s) {names}; this endpoint takes {taken}")
        return caller

    async def _identify(self, request: Request) -> Caller | Response:
        """Who the bearer token names: a sign-in session, or an admin-issued token."""
        authorization = request.header("authorization")
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and is_session_token(credentials):
            if self._sessions is None:
                return error_response(401, Reason.UNAUTHORIZED, headers=[WWW_AUTHENTICATE])
            session_rules = self._rules.current
            try:
                user, session_group = await self._sessions.authenticate(credentials, session_rules)
            except SignInError as exc:
                return signin_error_response(exc)
            return Caller(user, session_group, session_rules)
        if not self._admin_tokens and is_well_formed(credentials):
            return signin_error_response(
                SignInError(
                    "admin-issued tokens are turned off here: sign in with `gateway client login`",
                    reason=Reason.ADMIN_TOKENS_DISABLED,
                )
            )
        address = await authenticate(self._storage, authorization)
        if address is None or address.org != self._org:
            return error_response(401, Reason.UNAUTHORIZED, headers=[WWW_AUTHENTICATE])
        rules = self._rules.current
        group = rules.group_of(address.user)
        if group is None:
            return error_response(403, Reason.NO_GROUP)
        return Caller(address, group, rules)

    # -- GET /v1/me ------------------------------------------------------------------
    async def get_me(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        limits = caller.group.limits
        body: dict[str, object] = {
            "address": caller.user,
            "group": caller.group.name,
            "limits": {
                "max_envelope_bytes": limits.max_envelope_bytes,
                "ttl": {
                    "min": limits.ttl.min,
                    "default": limits.ttl.default,
                    "max": limits.ttl.max,
                },
                "burn_on_read": limits.burn_on_read.value,
            },
        }
        retention = caller.group.retention
        org_retention = caller.rules.rules.retention
        if retention.active and org_retention is not None:
            key = org_retention.key
            body["retention"] = {
                "outbound": retention.outbound,
                "inbound": retention.inbound,
                "key": {"id": key.id, "public_key": format_retention_key(key.public_key)},
            }
        return json_response(200, body)

    # -- submissions (.submission) -------------------------------------------------------
    async def post_envelope(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        return await self._submissions.post_envelope(request, caller)

    async def post_batch(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        return await self._submissions.post_batch(request, caller)

    # -- mailbox (.mailbox) ------------------------------------------------------------------
    async def get_mailbox(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request, query=MAILBOX_QUERY)
        if isinstance(caller, Response):
            return caller
        return await self._mailbox.get_mailbox(request, caller)

    async def post_ack(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        return await self._mailbox.post_ack(request, caller)

    # -- retention ---------------------------------------------------------------------------
    async def post_retention_mismatch(
        self, request: Request, params: Mapping[str, str]
    ) -> Response:
        """A client refused these envelopes of its mailbox: their retention copy did not match."""
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        recorded = await self._retention.record_mismatches(
            user=caller.user,
            group=caller.group.name,
            peers=caller.rules.peers,
            ids=parse_report(request.body),
        )
        return json_response(200, {"recorded": recorded})

    # -- delivery statuses -----------------------------------------------------------------
    async def get_status(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        envelope_id = params["envelope_id"]
        if not ENVELOPE_ID_RE.fullmatch(envelope_id):
            raise ProtocolError(
                "not an envelope id (22 characters of base64url)", reason=Reason.ENVELOPE_BAD_ID
            )
        known = await self._storage.status_get(envelope_id)
        # Someone else's envelope looks exactly like no envelope.
        if known is None or known.sender != caller.user:
            return error_response(404, Reason.NOT_FOUND)
        return json_response(
            200, {"id": known.envelope_id, "status": known.status, "at": known.at_ms}
        )

    # -- key records and org signing keys (.keys) ------------------------------------------
    async def put_keys(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        return await self._keys.put_keys(request, params, caller)

    async def get_keys(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        return await self._keys.get_keys(request, params, caller)

    async def get_org(self, request: Request, params: Mapping[str, str]) -> Response:
        """The org key a client checks key records against: ours, or a peer's pinned one."""
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        return await self._keys.get_org(request, params, caller)
