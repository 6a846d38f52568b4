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

A submission goes through, in order: parse (``400`` with the envelope's reason
code), ``from`` must be the token's user (``403 sender_mismatch``), the clock
checks of :func:`~gateway.core.envelope.validate_envelope` (``400``, e.g.
``expired``), then the outbound rule, the sender group's limits and its
retention (``403`` with the reason code and the rule's ``file:line``; a group
under outbound retention sends only version 2 envelopes with a retention copy
for a key of the rules). A refused
envelope is answered at once and nothing is stored. An allowed one gets the
sender's group asserted (encoded from the submitted JSON object itself, see
:func:`~gateway.core.envelope.encode_validated`) and is written durably: into the
recipient's mailbox for a local recipient (status ``delivered``; the
recipient's long-polls are woken), or into the spool lane of the recipient's
org (status ``queued``; ``on_spooled(peer)`` wakes that lane's sender). Only
after that write returned is the client told ``202``.

A batch runs every envelope through the same checks and writes all allowed
ones with at most two storage calls (one for local recipients, one for the
spool), which the store commits as groups: that is the throughput path.

Idempotency: the store refuses an envelope id it has seen. An id the caller
already submitted is answered again with its current status and stored
nothing; an id someone else's envelope holds is ``409 envelope_id_conflict``
(and says nothing about that envelope).

Long-poll (``GET /v1/mailbox?wait=S``): a :class:`~.mailbox_wait.MailboxWatch`
is taken *before* the mailbox is read, so an arrival between the read and the
wait is not missed; an empty read then waits for a wakeup or the deadline and
reads again. What it read is answered as JSON or in the binary batch framing,
as the request's ``Accept`` chooses (:mod:`.fetch_answer`; ``406`` before any
wait when it allows neither): the same stored bytes either way.

Retention: ``GET /v1/me`` tells a client under outbound retention which key
to wrap for; ``POST /v1/reports/retention-mismatch`` is how a client reports
envelopes it refused because their retention copy did not match (an envelope
in the caller's mailbox only): each is counted and audited
(``retention_mismatch``), with the sender as the envelope names it.

Key records: ``PUT /v1/keys`` signs the caller's public keys with the org
signing key and stores the record; ``GET /v1/keys/{address}`` serves ours
from the store and a peer's through ``remote_key_lookup``, checked against the
signing key the rules pin for that peer before it is passed on.
``GET /v1/orgs/{org}`` tells a client which org key to check records with:
ours (from the org signing seed), or the ``signing_key`` our rules pin for a
peer; the admin who pins partner keys is the client's trust anchor.

Nothing here logs a token or a ciphertext: decisions are logged with the
envelope id, the group and the reason.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

import trio
from prometheus_client import Counter

from gateway.clientapi.fetch_answer import (
    ANSWER_FORMATS,
    accept_field,
    answer_media_type,
    mailbox_answer,
    not_acceptable,
)
from gateway.clientapi.mailbox_wait import MailboxWaiters, TooManyWatches
from gateway.clientapi.retention import (
    ArchiveSink,
    RetentionDesk,
    SenderKeyBook,
    parse_ack,
    parse_report,
)
from gateway.clientapi.signin import signin_error_response
from gateway.clientapi.tokens import authenticate, is_well_formed
from gateway.core.address import Address, normalize_domain
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, decode_batch
from gateway.core.encoding import loads_strict
from gateway.core.envelope import (
    ENVELOPE_ID_RE,
    MAX_ENCODED_ENVELOPE_BYTES,
    Envelope,
    check_envelope_clock,
    decode_envelope,
    encode_envelope,
    encode_validated,
    with_group_member,
)
from gateway.core.keytext import format_retention_key, format_signing_key
from gateway.core.ratelimit import RateLimiter
from gateway.core.records import decode_envelope_record_json
from gateway.core.rules import CompiledRules, Decision, Group, Mark
from gateway.crypto.key_records import (
    KEY_BYTES,
    org_verify_key,
    parse_verified_key_record,
    sign_key_record,
)
from gateway.crypto.keys import PublicKeys
from gateway.errors import (
    AddressError,
    CapacityError,
    EnvelopeError,
    GatewayError,
    KeyRecordError,
    ProtocolError,
    Reason,
    SignInError,
    StorageFullError,
)
from gateway.http import Request, Response, Router, error_response, json_response
from gateway.http.messages import JSON_CONTENT_TYPE
from gateway.observability.audit import AuditSink, NoAudit
from gateway.observability.metrics import (
    CLIENTAPI_BATCH_BODIES,
    CLIENTAPI_LOCAL_DELIVERIES,
    CLIENTAPI_MAILBOX_ANSWERS,
    CLIENTAPI_SUBMISSIONS,
    MAILBOX_FULL_REFUSALS,
    POLICY_DENIALS,
    SPOOL_FULL_REFUSALS,
    STORAGE_RESERVE_REFUSALS,
)
from gateway.oidc.sessions import SessionService, is_session_token
from gateway.reserve import Reserve
from gateway.storage.base import (
    STATUS_DELIVERED,
    STATUS_QUEUED,
    Bound,
    DeliverOutcome,
    EnvelopeRecord,
    SpoolItem,
    Storage,
    envelope_record,
    spool_item,
)

log = logging.getLogger("gateway.clientapi")

#: Seconds a client is asked to wait before submitting to a full lane or mailbox again.
FULL_RETRY_AFTER_SECONDS: Final = 30
_RETRY_LATER: Final = [("retry-after", str(FULL_RETRY_AFTER_SECONDS))]
_FULL_MESSAGES: Final = {
    Reason.LANE_FULL: "the spool for this peer is full; try again later",
    Reason.MAILBOX_FULL: "the recipient's mailbox is full; try again later",
    Reason.INSUFFICIENT_STORAGE: "the gateway is short of disk space; try again later",
}
# The status of each: a full lane or mailbox is 503; a full disk, 507 Insufficient Storage.
_FULL_STATUS: Final = {
    Reason.LANE_FULL: 503,
    Reason.MAILBOX_FULL: 503,
    Reason.INSUFFICIENT_STORAGE: 507,
}

# -- bounds (docs/client-api.md, "Limits") ---------------------------------------
MAX_BATCH_ENVELOPES: Final = 256  # envelopes in one POST /v1/envelopes/batch
MAX_WAIT_SECONDS: Final = 60  # longest long-poll a client may ask for
DEFAULT_WAIT_SECONDS: Final = 0
MAX_FETCH_LIMIT: Final = 500  # envelopes in one mailbox answer
DEFAULT_FETCH_LIMIT: Final = 100
MAX_ACK_IDS: Final = 500  # ids in one POST /v1/mailbox/ack
MAX_KEYS_BODY_BYTES: Final = 16 * 1024  # PUT /v1/keys body; real ones are ~150 bytes
MS_PER_SECOND: Final = 1000

_MAILBOX_QUERY: Final = frozenset({"wait", "limit"})  # the one endpoint that takes a query
RESULT_ACCEPTED: Final = "accepted"  # the submissions counter's label for a stored envelope
WWW_AUTHENTICATE: Final = ("www-authenticate", 'Bearer realm="gateway"')
#: A batch body's media type -> its label in gateway_clientapi_batch_bodies_total.
BATCH_FORMATS: Final = {JSON_CONTENT_TYPE: "json", MEDIA_TYPE_BATCH_V1: "binary_v1"}
_MAX_SHOWN_ID: Final = 64  # a refused element's claimed id is answered up to this length

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


# -- the outcome of one submitted envelope ----------------------------------------
@dataclass(frozen=True, slots=True)
class _Refused:
    envelope_id: str | None
    status: int  # HTTP status of a single submission
    reason: Reason
    message: str | None = None  # for the client about its own input; never a policy detail
    rule: Mark | None = None
    decision: Decision | None = None  # the rules' refusal, for the audit log

    def to_json(self, *, with_id: bool) -> dict[str, object]:
        body: dict[str, object] = {"id": self.envelope_id} if with_id else {}
        body["error"] = self.reason.value
        if self.rule is not None:
            body["rule"] = _rule_text(self.rule)
        if self.message is not None:
            body["message"] = self.message
        return body


@dataclass(frozen=True, slots=True)
class _Allowed:
    env: Envelope  # as submitted
    peer: str | None  # the recipient's org; None for a local recipient
    data: bytes  # its stored form: encode_envelope() with the sender's group asserted


@dataclass(frozen=True, slots=True)
class _Stored:
    envelope_id: str
    status: str


_Outcome = _Refused | _Stored


@dataclass(frozen=True, slots=True)
class _Submitted:
    """A well-formed envelope and, from a batch, the JSON object it was parsed from.

    ``data``: from a binary batch, the record as received, which is the
    canonical encoding of ``raw`` (checked): what is stored, group put in.
    """

    env: Envelope
    raw: dict[str, object] | None = None
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Caller:
    address: Address
    group: Group
    rules: CompiledRules  # the rules read for this request, used throughout it

    @property
    def user(self) -> str:
        return str(self.address)


def _rule_text(mark: Mark) -> str:
    # The file's name only: clients need not learn the gateway's directory layout.
    return f"{os.path.basename(mark.file)}:{mark.line}"


def _ttl_seconds(env: Envelope) -> int:
    # Whole seconds, rounded down, exactly as the federation receiver computes it:
    # what the origin accepts, a peer with the same bounds accepts too.
    return env.ttl_ms // MS_PER_SECOND


_Item = TypeVar("_Item", EnvelopeRecord, SpoolItem)
_Written = TypeVar("_Written")


async def _store_what_fits(
    items: list[_Item],
    key_of: Callable[[_Item], str],
    write: Callable[[list[_Item]], Awaitable[_Written]],
    reason: Reason,
    full: dict[str, Reason],
    refused: Callable[[frozenset[str], list[_Item]], None],
) -> _Written | None:
    """``write(items)``, leaving out the items of every key the bound says is full.

    The bound is checked inside the write, and a full key refuses the whole
    call: the items of the keys named full are marked ``reason`` in ``full``,
    ``refused(keys, items)`` counts them, and the rest is written again. Each
    round leaves out at least one more key, so it ends; ``None`` when nothing
    was left to write.
    """
    while items:
        try:
            return await write(items)
        except CapacityError as exc:
            dropped = [item for item in items if key_of(item) in exc.full]
            if not dropped:  # the store named no key of ours: never loop on it
                raise
            for item in dropped:
                full[item.envelope_id] = reason
            refused(exc.full, dropped)
            items = [item for item in items if key_of(item) not in exc.full]
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
        self._seed = org_signing_seed
        self._org_verify_key = org_verify_key(org_signing_seed)
        self._waiters = waiters
        self._clock_ms = clock_ms
        self._on_spooled = on_spooled
        self._remote_key_lookup = remote_key_lookup
        self._max_wait = max_wait_seconds
        self._audit: AuditSink = audit if audit is not None else NoAudit()
        self._lane_bound = lane_bound
        self._mailbox_bound = mailbox_bound
        self._reserve = reserve
        # archive None: retention is enforced, nothing is archived here
        self._retention = RetentionDesk(
            org=org,
            mailboxes=storage,
            archive=archive,
            audit=self._audit,
            clock_ms=clock_ms,
            sender_keys=SenderKeyBook(
                org=org,
                org_verify_key=self._org_verify_key,
                directory=storage,
                remote=remote_key_lookup,
            ),
        )
        self._submit_rate = submit_rate  # per user, charged one token per envelope
        self._sessions = sessions
        self._admin_tokens = admin_tokens
        self._submissions: dict[str, Counter] = {}
        self._denials: dict[tuple[str, str], Counter] = {}
        self._answers = {
            media_type: CLIENTAPI_MAILBOX_ANSWERS.labels(label)
            for media_type, label in ANSWER_FORMATS.items()
        }

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
    ) -> _Caller | Response:
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

    async def _identify(self, request: Request) -> _Caller | Response:
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
            return _Caller(user, session_group, session_rules)
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
        return _Caller(address, group, rules)

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

    # -- submissions -------------------------------------------------------------------
    async def post_envelope(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        limited = self._rate_limited(caller, 1) or await self._short_of_space(
            caller, 1, len(request.body)
        )
        if limited is not None:
            return limited
        item: _Submitted | _Refused
        try:
            item = _Submitted(decode_envelope(request.body))
        except EnvelopeError as exc:
            item = _Refused(None, 400, exc.reason, exc.message)
        (outcome,) = await self._submit(caller, [item])
        if isinstance(outcome, _Refused):
            headers = _RETRY_LATER if outcome.reason in _FULL_MESSAGES else None
            return json_response(outcome.status, outcome.to_json(with_id=False), headers=headers)
        return json_response(202, {"id": outcome.envelope_id, "status": outcome.status})

    async def post_batch(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        media_type = _batch_media_type(request.header("content-type"))
        if media_type is None:
            return json_response(
                415,
                {
                    "error": Reason.UNSUPPORTED_MEDIA_TYPE.value,
                    "message": "a batch is application/json or " + MEDIA_TYPE_BATCH_V1,
                },
            )
        CLIENTAPI_BATCH_BODIES.labels(BATCH_FORMATS[media_type]).inc()
        records: list[bytes] | None = None
        elements: list[object] = []
        if media_type == MEDIA_TYPE_BATCH_V1:
            records = decode_batch(request.body, max_envelopes=MAX_BATCH_ENVELOPES)
        else:
            body = _object_body(request.body, "batch", {"envelopes"})
            envelopes = body["envelopes"]
            if not isinstance(envelopes, list) or not 1 <= len(envelopes) <= MAX_BATCH_ENVELOPES:
                raise ProtocolError(
                    f"batch field 'envelopes' must be a list of 1 to {MAX_BATCH_ENVELOPES} "
                    "envelopes"
                )
            elements = envelopes
        count = len(records) if records is not None else len(elements)
        limited = self._rate_limited(caller, count) or await self._short_of_space(
            caller, count, len(request.body)
        )
        if limited is not None:
            return limited
        items = (
            [_record_item(index, record) for index, record in enumerate(records, 1)]
            if records is not None
            else [_element_item(obj) for obj in elements]
        )
        outcomes = await self._submit(caller, items)
        results = [
            {"id": o.envelope_id, "status": o.status}
            if isinstance(o, _Stored)
            else o.to_json(with_id=True)
            for o in outcomes
        ]
        later = any(isinstance(o, _Refused) and o.reason in _FULL_MESSAGES for o in outcomes)
        return json_response(200, {"results": results}, headers=_RETRY_LATER if later else None)

    async def _submit(self, caller: _Caller, items: list[_Submitted | _Refused]) -> list[_Outcome]:
        """Check every item, write the allowed ones (at most two commits), answer each."""
        now_ms = self._clock_ms()
        verdicts = [
            item if isinstance(item, _Refused) else self._check(caller, item, now_ms)
            for item in items
        ]
        stored: dict[str, str] = {}
        full: dict[str, Reason] = {}  # envelope id -> lane_full / mailbox_full
        # Archived first, durably: an envelope of a group under retention is never
        # stored (so never delivered) unless its archive copy is.
        await self._archive_retained(caller, verdicts, now_ms, full)
        local: list[EnvelopeRecord] = []
        spool: list[SpoolItem] = []
        for verdict in verdicts:
            if isinstance(verdict, _Allowed) and verdict.env.id not in full:
                if verdict.peer is None:
                    local.append(envelope_record(verdict.env, verdict.data))
                else:
                    spool.append(spool_item(verdict.env, verdict.data, verdict.peer))
        if local:
            try:
                outcome = await self._put_local(local, now_ms, full)
            except StorageFullError as exc:
                self._disk_full(exc, local, full)
            else:
                stored.update(dict.fromkeys(outcome.stored, STATUS_DELIVERED))
                CLIENTAPI_LOCAL_DELIVERIES.inc(len(outcome.stored))
                self._waiters.notify(outcome.recipients)
        if spool:
            try:
                spooled = await self._put_spool(spool, now_ms, full)
            except StorageFullError as exc:
                self._disk_full(exc, spool, full)
            else:
                stored.update(dict.fromkeys(spooled, STATUS_QUEUED))
                spooled_now = set(spooled)
                for peer in sorted({i.peer for i in spool if i.envelope_id in spooled_now}):
                    self._wake_sender(peer)

        outcomes: list[_Outcome] = []
        for verdict in verdicts:
            result: _Outcome
            if isinstance(verdict, _Allowed):
                status = stored.get(verdict.env.id)
                no_room = full.get(verdict.env.id)
                if no_room is not None:
                    result = _Refused(
                        verdict.env.id, _FULL_STATUS[no_room], no_room, _FULL_MESSAGES[no_room]
                    )
                elif status is None:
                    result = await self._resubmitted(caller, verdict.env)
                else:
                    result = _Stored(verdict.env.id, status)
                    log.debug(
                        "accepted envelope %s of group %s for %s: %s",
                        verdict.env.id,
                        caller.group.name,
                        verdict.peer or "local delivery",
                        status,
                        extra={
                            "event": "envelope_accepted",
                            "direction": "outbound",
                            "envelope_id": verdict.env.id,
                            "group": caller.group.name,
                            "peer": verdict.peer,
                            "status": status,
                        },
                    )
            else:
                result = verdict
            self._count(result)
            outcomes.append(result)
        for verdict in verdicts:
            if isinstance(verdict, _Refused) and verdict.decision is not None:
                await self._audit_denial(caller, verdict.envelope_id, verdict.decision)
        return outcomes

    async def _archive_retained(
        self,
        caller: _Caller,
        verdicts: Sequence[_Allowed | _Refused],
        now_ms: int,
        full: dict[str, Reason],
    ) -> None:
        """Archive the allowed envelopes of a group under outbound retention, first."""
        sent = [(v.env, v.data) for v in verdicts if isinstance(v, _Allowed)]
        try:
            await self._retention.archive_sent(
                group=caller.group, rules=caller.rules, sent=sent, now_ms=now_ms
            )
        except StorageFullError as exc:
            self._disk_full(exc, [envelope_record(env, data) for env, data in sent], full)

    async def _audit_denial(
        self, caller: _Caller, envelope_id: str | None, decision: Decision
    ) -> None:
        """The audit record of one refusal by the rules (waits for room: never dropped)."""
        rule = decision.rule
        await self._audit.record(
            "policy_denial",
            direction=decision.direction.value,
            envelope_id=envelope_id,
            user=caller.user,
            group=decision.group,
            peer=decision.peer,
            reason=decision.reason.value,
            rule=f"{rule.file}:{rule.line}" if rule is not None else None,
            detail=decision.detail,
        )

    def _check(self, caller: _Caller, item: _Submitted, now_ms: int) -> _Allowed | _Refused:
        env = item.env
        if env.sender != caller.address:
            return _Refused(
                env.id,
                403,
                Reason.SENDER_MISMATCH,
                f"envelope 'from' {env.sender} is not the token's user {caller.user}",
            )
        try:
            # from_json made every check that needs no clock.
            check_envelope_clock(env, now_ms=now_ms)
        except EnvelopeError as exc:
            return _Refused(env.id, 400, exc.reason, exc.message)
        decision = caller.rules.decide_outbound(
            env.sender,
            env.recipient,
            size=env.size,
            ttl_seconds=_ttl_seconds(env),
            burn_on_read=env.burn_on_read,
        )
        # The sender group's retention, last: what the archive must get (docs/retention.md).
        decision = caller.rules.decide_retention(decision, env.retention)
        decision = caller.rules.decide_recipient_retention(
            decision, env.recipient, version=env.version
        )
        if not decision.allowed:
            self._count_denial(decision.direction.value, decision.reason)
            log.info(
                "refused envelope %s of group %s: %s (%s)",
                env.id,
                decision.group,
                decision.reason,
                decision.detail,
                extra={
                    "event": "envelope_rejected",
                    "direction": decision.direction.value,
                    "envelope_id": env.id,
                    "group": decision.group,
                    "peer": decision.peer,
                    "reason": decision.reason.value,
                    "rule": str(decision.rule) if decision.rule is not None else None,
                },
            )
            return _Refused(env.id, 403, decision.reason, rule=decision.rule, decision=decision)
        peer = None if env.recipient.org == self._org else env.recipient.org
        group = caller.group.name
        if item.data is not None:  # the record as received, its group put in
            data = with_group_member(item.data, env.group, group)
        elif item.raw is not None:
            data = encode_validated(item.raw, group)
        else:
            data = encode_envelope(env.with_group(group))
        return _Allowed(env, peer, data)

    def _rate_limited(self, caller: _Caller, count: int) -> Response | None:
        """``429 rate_limited`` with Retry-After if ``caller`` may not submit ``count`` now."""
        if self._submit_rate is None:
            return None
        wait = self._submit_rate.take(caller.user, self._clock_ms() / 1000, count)
        if wait <= 0:
            return None
        self._submitted(Reason.RATE_LIMITED.value).inc(count)
        log.info(
            "refused %d envelope(s) from %s: submission rate spent, retry in %.1f s",
            count,
            caller.user,
            wait,
            extra={"event": "rate_limited", "user": caller.user, "envelopes": count},
        )
        return json_response(
            429,
            {"error": Reason.RATE_LIMITED.value, "message": "too many envelopes; slow down"},
            headers=[("retry-after", str(max(1, math.ceil(wait))))],
        )

    async def _short_of_space(self, caller: _Caller, count: int, size: int) -> Response | None:
        """``507 insufficient_storage`` with Retry-After if ``size`` bytes pass the reserve."""
        why = await self._reserve.admit(size) if self._reserve is not None else None
        if why is None:
            return None
        self._submitted(Reason.INSUFFICIENT_STORAGE.value).inc(count)
        STORAGE_RESERVE_REFUSALS.labels("client").inc(count)
        log.warning(
            "refused %d envelope(s) from %s: %s",
            count,
            caller.user,
            why,
            extra={"event": "insufficient_storage", "user": caller.user, "envelopes": count},
        )
        return json_response(
            507,
            {
                "error": Reason.INSUFFICIENT_STORAGE.value,
                "message": _FULL_MESSAGES[Reason.INSUFFICIENT_STORAGE],
            },
            headers=_RETRY_LATER,
        )

    def _disk_full(
        self, exc: StorageFullError, items: Sequence[EnvelopeRecord], full: dict[str, Reason]
    ) -> None:
        """A write found no room on the disk: its envelopes are refused, nothing was stored."""
        for item in items:
            full.setdefault(item.envelope_id, Reason.INSUFFICIENT_STORAGE)
        STORAGE_RESERVE_REFUSALS.labels("client").inc(len(items))
        if self._reserve is not None:
            self._reserve.note_full()
        log.error("refused %d envelope(s): %s", len(items), exc.message)

    def _submitted(self, label: str) -> Counter:
        """The cached child of gateway_clientapi_submissions_total for ``label``."""
        child = self._submissions.get(label)
        if child is None:
            child = self._submissions[label] = CLIENTAPI_SUBMISSIONS.labels(label)
        return child

    async def _put_local(
        self, entries: list[EnvelopeRecord], now_ms: int, full: dict[str, Reason]
    ) -> DeliverOutcome:
        """Store local deliveries; entries for full mailboxes go into ``full`` instead."""

        async def write(batch: list[EnvelopeRecord]) -> DeliverOutcome:
            return await self._storage.mailbox_put_local(
                batch, at_ms=now_ms, bound=self._mailbox_bound
            )

        def refused(_recipients: frozenset[str], dropped: list[EnvelopeRecord]) -> None:
            MAILBOX_FULL_REFUSALS.labels("local").inc(len(dropped))

        outcome = await _store_what_fits(
            entries, lambda e: e.recipient, write, Reason.MAILBOX_FULL, full, refused
        )
        return outcome if outcome is not None else DeliverOutcome(stored=(), recipients=frozenset())

    async def _put_spool(
        self, items: list[SpoolItem], now_ms: int, full: dict[str, Reason]
    ) -> list[str]:
        """Spool ``items``; items for full lanes go into ``full`` instead."""

        async def write(batch: list[SpoolItem]) -> list[str]:
            return await self._storage.spool_put(batch, at_ms=now_ms, bound=self._lane_bound)

        def refused(peers: frozenset[str], dropped: list[SpoolItem]) -> None:
            for peer in peers:
                SPOOL_FULL_REFUSALS.labels(peer).inc(sum(1 for i in dropped if i.peer == peer))
            log.warning(
                "spool lane full for %s: submissions to it are refused (503) until it drains",
                ", ".join(sorted(peers)),
                extra={"event": "lane_full", "peers": sorted(peers)},
            )

        spooled = await _store_what_fits(
            items, lambda i: i.peer, write, Reason.LANE_FULL, full, refused
        )
        return spooled if spooled is not None else []

    async def _resubmitted(self, caller: _Caller, env: Envelope) -> _Outcome:
        """The answer for an allowed envelope the store had seen before."""
        known = await self._storage.status_get(env.id)
        if known is not None and known.sender == caller.user:
            return _Stored(env.id, known.status)
        return _Refused(
            env.id,
            409,
            Reason.ENVELOPE_ID_CONFLICT,
            "this envelope id is already used; submit with a fresh id",
        )

    def _wake_sender(self, peer: str) -> None:
        try:
            self._on_spooled(peer)
        except Exception:
            # The envelopes are durable already: a failing listener delays them, loses none.
            log.exception("on_spooled(%s) failed", peer)

    def _count(self, result: _Outcome) -> None:
        if isinstance(result, _Stored):
            label = RESULT_ACCEPTED
        else:
            label = result.reason.value
            if result.rule is None:  # policy refusals were logged with their detail
                log.info(
                    "refused envelope %s: %s",
                    result.envelope_id,
                    result.reason,
                    extra={
                        "event": "envelope_rejected",
                        "direction": "outbound",
                        "envelope_id": result.envelope_id,
                        "reason": result.reason.value,
                    },
                )
        self._submitted(label).inc()

    def _count_denial(self, direction: str, reason: Reason) -> None:
        key = (direction, reason.value)
        child = self._denials.get(key)
        if child is None:
            child = self._denials[key] = POLICY_DENIALS.labels(direction, reason.value)
        child.inc()

    # -- mailbox -----------------------------------------------------------------------
    async def get_mailbox(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request, query=_MAILBOX_QUERY)
        if isinstance(caller, Response):
            return caller
        media_type = answer_media_type(accept_field(request))
        if media_type is None:  # before any wait: the answer could not be read anyway
            return not_acceptable()
        # Any wait the protocol allows is taken; a gateway whose limits.long_poll_max is
        # shorter holds the poll that long at most (an empty answer is always possible).
        asked = _int_query(request, "wait", DEFAULT_WAIT_SECONDS, 0, MAX_WAIT_SECONDS)
        wait = min(asked, self._max_wait)
        limit = _int_query(request, "limit", DEFAULT_FETCH_LIMIT, 1, MAX_FETCH_LIMIT)
        deadline = trio.current_time() + wait
        while True:
            try:
                with self._waiters.watch(caller.user) as watch:
                    # Watch first, read second: an arrival in between still wakes us.
                    entries = await self._storage.mailbox_fetch(
                        caller.user, limit=limit, now_ms=self._clock_ms()
                    )
                    if entries or wait == 0 or self._waiters.closed:
                        break
                    if not await watch.wait_until(deadline):
                        break
            except TooManyWatches:
                return error_response(429, Reason.TOO_MANY_CONNECTIONS)
        self._answers[media_type].inc()
        return mailbox_answer(media_type, [entry.data for entry in entries])

    async def post_ack(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        ack = parse_ack(request.body)
        unique = list(dict.fromkeys(ack.ids))
        if caller.group.retention.inbound and unique:
            kept = await self._retention.retain_acknowledged(
                user=caller.user, group=caller.group, rules=caller.rules, ack=ack, ids=unique
            )
            if isinstance(kept, str):
                self._count_denial("inbound", Reason.RETENTION_REQUIRED)
                return json_response(
                    403, {"error": Reason.RETENTION_REQUIRED.value, "message": kept}
                )
            unique = kept
        deleted = await self._storage.mailbox_ack(caller.user, unique) if unique else 0
        return json_response(200, {"deleted": deleted})

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

    # -- key records ------------------------------------------------------------------------
    async def put_keys(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        if len(request.body) > MAX_KEYS_BODY_BYTES:
            return error_response(413, Reason.BODY_TOO_LARGE)
        public = PublicKeys.from_json(_json_body(request.body, "public keys"))
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

    async def get_keys(self, request: Request, params: Mapping[str, str]) -> Response:
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        address = _normal_address(params["address"])  # AddressError: 400 with its reason
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
    async def get_org(self, request: Request, params: Mapping[str, str]) -> Response:
        """The org key a client checks key records against: ours, or a peer's pinned one."""
        caller = await self._caller(request)
        if isinstance(caller, Response):
            return caller
        org = _normal_domain(params["org"])  # AddressError: 400 with its reason
        if org == self._org:
            key = self._org_verify_key
        else:
            peer = caller.rules.peer(org)
            if peer is None:
                return error_response(404, Reason.UNKNOWN_PEER)
            key = peer.signing_key
        return json_response(200, {"org": org, "signing_key": format_signing_key(key)})


# -- batch elements ---------------------------------------------------------------------
def _batch_media_type(content_type: str | None) -> str | None:
    """The batch format of a body with this Content-Type; None for one not taken (415).

    No Content-Type, or ``application/json`` with any parameters, is JSON (as
    before the binary batch existed).
    """
    if content_type is None:
        return JSON_CONTENT_TYPE
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type if media_type in BATCH_FORMATS else None


def _element_item(obj: object) -> _Submitted | _Refused:
    """One element of a batch, a JSON value: the envelope it is, or its refusal."""
    try:
        env = Envelope.from_json(obj)
    except EnvelopeError as exc:
        claimed = obj.get("id") if isinstance(obj, dict) else None
        shown = claimed if isinstance(claimed, str) and len(claimed) <= _MAX_SHOWN_ID else None
        return _Refused(shown, 400, exc.reason, exc.message)
    # from_json accepts only a dict; the object is kept to encode from.
    return _Submitted(env, obj if isinstance(obj, dict) else None)


def _record_item(index: int, data: bytes) -> _Submitted | _Refused:
    """Record ``#index`` of a binary batch: judged as the JSON element it holds, once.

    A record must be its envelope's canonical encoding (docs/envelope.md §1),
    so that the bytes received are the bytes kept: compared, then stored.
    """
    if len(data) > MAX_ENCODED_ENVELOPE_BYTES:  # not parsed
        return _Refused(
            None,
            400,
            Reason.ENVELOPE_TOO_LARGE,
            f"record #{index} is {len(data)} bytes; at most {MAX_ENCODED_ENVELOPE_BYTES}",
        )
    try:
        obj = decode_envelope_record_json(data)
    except ValueError:
        return _Refused(
            None, 400, Reason.ENVELOPE_MALFORMED, f"record #{index} is not JSON in ASCII"
        )
    item = _element_item(obj)
    if isinstance(item, _Refused) or item.raw is None:
        return item
    if encode_validated(item.raw, item.env.group) != data:
        return _Refused(
            item.env.id,
            400,
            Reason.ENVELOPE_MALFORMED,
            f"record #{index} is not its envelope's canonical encoding (docs/envelope.md §1)",
        )
    return _Submitted(item.env, item.raw, data)


# -- request bodies and queries ---------------------------------------------------------
def _json_body(body: bytes, what: str) -> object:
    """The body as strict JSON (no duplicate keys, no NaN); ``ProtocolError`` otherwise."""
    try:
        return loads_strict(body)
    except ValueError:
        raise ProtocolError(f"{what}: request body is not JSON") from None


def _object_body(body: bytes, what: str, fields: set[str]) -> dict[str, object]:
    obj = _json_body(body, what)
    if not isinstance(obj, dict) or set(obj) != fields:
        names = ", ".join(repr(name) for name in sorted(fields))
        raise ProtocolError(f"{what}: body must be a JSON object with exactly {names}")
    return obj


def _normal_address(text: str) -> Address:
    """``text`` as an address, which it must spell in its normal form; ``AddressError``.

    One resource has one URL: ``Alice@ACME.example`` is refused (saying what to
    use), not folded, exactly as an envelope's ``from`` and ``to`` are.
    """
    address = Address.parse(text)
    if str(address) != text:
        raise AddressError(
            f"address {text[:80]!r} is not in normal form (use {address})",
            reason=Reason.ADDRESS_MALFORMED,
        )
    return address


def _normal_domain(text: str) -> str:
    """``text`` as an org domain, which it must spell in its normal form; ``AddressError``."""
    org = normalize_domain(text)
    if org != text:
        raise AddressError(
            f"domain {text[:80]!r} is not in normal form (use {org})",
            reason=Reason.ADDRESS_BAD_DOMAIN,
        )
    return org


def _int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    values = request.query.get(name)
    if not values:
        return default
    text = values[0]
    if len(values) > 1 or not text.isascii() or not text.isdigit() or len(text) > len(str(high)):
        raise ProtocolError(f"query parameter {name!r} must be one whole number {low}-{high}")
    value = int(text)
    if not low <= value <= high:
        raise ProtocolError(f"query parameter {name!r} must be within {low}-{high}, got {value}")
    return value
