"""Envelope submission, one at a time or in batches: the checks, the limits, the answers.

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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Final

from prometheus_client import Counter

from gateway.clientapi.batch_body import BATCH_FORMATS, batch_media_type, element_item, record_item
from gateway.clientapi.caller import Caller
from gateway.clientapi.limits import MAX_BATCH_ENVELOPES, MS_PER_SECOND
from gateway.clientapi.mailbox_wait import MailboxWaiters
from gateway.clientapi.outcomes import Allowed, Outcome, Refused, Stored, Submitted
from gateway.clientapi.request_parsing import object_body
from gateway.clientapi.retention import RetentionDesk
from gateway.clientapi.storing import SubmissionStore
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, decode_batch
from gateway.core.envelope import (
    Envelope,
    check_envelope_clock,
    decode_envelope,
    encode_envelope,
    encode_validated,
    with_group_member,
)
from gateway.core.ratelimit import RateLimiter
from gateway.core.rules import Decision
from gateway.errors import EnvelopeError, ProtocolError, Reason, StorageFullError
from gateway.http import Request, Response, json_response
from gateway.observability.audit import AuditSink
from gateway.observability.metrics import (
    CLIENTAPI_BATCH_BODIES,
    CLIENTAPI_LOCAL_DELIVERIES,
    CLIENTAPI_SUBMISSIONS,
    POLICY_DENIALS,
    STORAGE_RESERVE_REFUSALS,
)
from gateway.reserve import Reserve
from gateway.storage.base import (
    STATUS_DELIVERED,
    STATUS_QUEUED,
    EnvelopeRecord,
    SpoolItem,
    Storage,
    envelope_record,
    spool_item,
)

log = logging.getLogger("gateway.clientapi")

#: Seconds a client is asked to wait before submitting to a full lane or mailbox again.
FULL_RETRY_AFTER_SECONDS: Final = 30
RETRY_LATER: Final = [("retry-after", str(FULL_RETRY_AFTER_SECONDS))]
FULL_MESSAGES: Final = {
    Reason.LANE_FULL: "the spool for this peer is full; try again later",
    Reason.MAILBOX_FULL: "the recipient's mailbox is full; try again later",
    Reason.INSUFFICIENT_STORAGE: "the gateway is short of disk space; try again later",
}
# The status of each: a full lane or mailbox is 503; a full disk, 507 Insufficient Storage.
FULL_STATUS: Final = {
    Reason.LANE_FULL: 503,
    Reason.MAILBOX_FULL: 503,
    Reason.INSUFFICIENT_STORAGE: 507,
}
RESULT_ACCEPTED: Final = "accepted"  # the submissions counter's label for a stored envelope


def _ttl_seconds(env: Envelope) -> int:
    # Whole seconds, rounded down, exactly as the federation receiver computes it:
    # what the origin accepts, a peer with the same bounds accepts too.
    return env.ttl_ms // MS_PER_SECOND


class Submissions:
    """``POST /v1/envelopes`` and ``POST /v1/envelopes/batch``, for an authenticated caller."""

    def __init__(
        self,
        *,
        org: str,
        storage: Storage,
        store: SubmissionStore,
        waiters: MailboxWaiters,
        clock_ms: Callable[[], int],
        on_spooled: Callable[[str], None],
        audit: AuditSink,
        retention: RetentionDesk,
        submit_rate: RateLimiter | None,
        reserve: Reserve | None,
    ) -> None:
        self._org = org
        self._storage = storage
        self._store = store
        self._waiters = waiters
        self._clock_ms = clock_ms
        self._on_spooled = on_spooled
        self._audit = audit
        self._retention = retention
        self._submit_rate = submit_rate  # per user, charged one token per envelope
        self._reserve = reserve
        self._submissions: dict[str, Counter] = {}
        self._denials: dict[tuple[str, str], Counter] = {}

    async def post_envelope(self, request: Request, caller: Caller) -> Response:
        limited = self._rate_limited(caller, 1) or await self._short_of_space(
            caller, 1, len(request.body)
        )
        if limited is not None:
            return limited
        item: Submitted | Refused
        try:
            item = Submitted(decode_envelope(request.body))
        except EnvelopeError as exc:
            item = Refused(None, 400, exc.reason, exc.message)
        (outcome,) = await self._submit(caller, [item])
        if isinstance(outcome, Refused):
            headers = RETRY_LATER if outcome.reason in FULL_MESSAGES else None
            return json_response(outcome.status, outcome.to_json(with_id=False), headers=headers)
        return json_response(202, {"id": outcome.envelope_id, "status": outcome.status})

    async def post_batch(self, request: Request, caller: Caller) -> Response:
        media_type = batch_media_type(request.header("content-type"))
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
            body = object_body(request.body, "batch", {"envelopes"})
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
            [record_item(index, record) for index, record in enumerate(records, 1)]
            if records is not None
            else [element_item(obj) for obj in elements]
        )
        outcomes = await self._submit(caller, items)
        results = [
            {"id": o.envelope_id, "status": o.status}
            if isinstance(o, Stored)
            else o.to_json(with_id=True)
            for o in outcomes
        ]
        later = any(isinstance(o, Refused) and o.reason in FULL_MESSAGES for o in outcomes)
        return json_response(200, {"results": results}, headers=RETRY_LATER if later else None)

    async def _submit(self, caller: Caller, items: list[Submitted | Refused]) -> list[Outcome]:
        """Check every item, write the allowed ones (at most two commits), answer each."""
        now_ms = self._clock_ms()
        verdicts = [
            item if isinstance(item, Refused) else self._check(caller, item, now_ms)
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
            if isinstance(verdict, Allowed) and verdict.env.id not in full:
                if verdict.peer is None:
                    local.append(envelope_record(verdict.env, verdict.data))
                else:
                    spool.append(spool_item(verdict.env, verdict.data, verdict.peer))
        if local:
            try:
                outcome = await self._store.put_local(local, now_ms, full)
            except StorageFullError as exc:
                self._store.disk_full(exc, local, full)
            else:
                stored.update(dict.fromkeys(outcome.stored, STATUS_DELIVERED))
                CLIENTAPI_LOCAL_DELIVERIES.inc(len(outcome.stored))
                self._waiters.notify(outcome.recipients)
        if spool:
            try:
                spooled = await self._store.put_spool(spool, now_ms, full)
            except StorageFullError as exc:
                self._store.disk_full(exc, spool, full)
            else:
                stored.update(dict.fromkeys(spooled, STATUS_QUEUED))
                spooled_now = set(spooled)
                for peer in sorted({i.peer for i in spool if i.envelope_id in spooled_now}):
                    self._wake_sender(peer)

        outcomes: list[Outcome] = []
        for verdict in verdicts:
            result: Outcome
            if isinstance(verdict, Allowed):
                status = stored.get(verdict.env.id)
                no_room = full.get(verdict.env.id)
                if no_room is not None:
                    result = Refused(
                        verdict.env.id, FULL_STATUS[no_room], no_room, FULL_MESSAGES[no_room]
                    )
                elif status is None:
                    result = await self._resubmitted(caller, verdict.env)
                else:
                    result = Stored(verdict.env.id, status)
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
            if isinstance(verdict, Refused) and verdict.decision is not None:
                await self._audit_denial(caller, verdict.envelope_id, verdict.decision)
        return outcomes

    async def _archive_retained(
        self,
        caller: Caller,
        verdicts: Sequence[Allowed | Refused],
        now_ms: int,
        full: dict[str, Reason],
    ) -> None:
        """Archive the allowed envelopes of a group under outbound retention, first."""
        sent = [(v.env, v.data) for v in verdicts if isinstance(v, Allowed)]
        try:
            await self._retention.archive_sent(
                group=caller.group, rules=caller.rules, sent=sent, now_ms=now_ms
            )
        except StorageFullError as exc:
            self._store.disk_full(exc, [envelope_record(env, data) for env, data in sent], full)

    async def _audit_denial(
        self, caller: Caller, envelope_id: str | None, decision: Decision
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

    def _check(self, caller: Caller, item: Submitted, now_ms: int) -> Allowed | Refused:
        env = item.env
        if env.sender != caller.address:
            return Refused(
                env.id,
                403,
                Reason.SENDER_MISMATCH,
                f"envelope 'from' {env.sender} is not the token's user {caller.user}",
            )
        try:
            # from_json made every check that needs no clock.
            check_envelope_clock(env, now_ms=now_ms)
        except EnvelopeError as exc:
            return Refused(env.id, 400, exc.reason, exc.message)
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
            self.count_denial(decision.direction.value, decision.reason)
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
            return Refused(env.id, 403, decision.reason, rule=decision.rule, decision=decision)
        peer = None if env.recipient.org == self._org else env.recipient.org
        group = caller.group.name
        if item.data is not None:  # the record as received, its group put in
            data = with_group_member(item.data, env.group, group)
        elif item.raw is not None:
            data = encode_validated(item.raw, group)
        else:
            data = encode_envelope(env.with_group(group))
        return Allowed(env, peer, data)

    def _rate_limited(self, caller: Caller, count: int) -> Response | None:
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

    async def _short_of_space(self, caller: Caller, count: int, size: int) -> Response | None:
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
                "message": FULL_MESSAGES[Reason.INSUFFICIENT_STORAGE],
            },
            headers=RETRY_LATER,
        )

    def _submitted(self, label: str) -> Counter:
        """The cached child of gateway_clientapi_submissions_total for ``label``."""
        child = self._submissions.get(label)
        if child is None:
            child = self._submissions[label] = CLIENTAPI_SUBMISSIONS.labels(label)
        return child

    async def _resubmitted(self, caller: Caller, env: Envelope) -> Outcome:
        """The answer for an allowed envelope the store had seen before."""
        known = await self._storage.status_get(env.id)
        if known is not None and known.sender == caller.user:
            return Stored(env.id, known.status)
        return Refused(
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

    def _count(self, result: Outcome) -> None:
        if isinstance(result, Stored):
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

    def count_denial(self, direction: str, reason: Reason) -> None:
        key = (direction, reason.value)
        child = self._denials.get(key)
        if child is None:
            child = self._denials[key] = POLICY_DENIALS.labels(direction, reason.value)
        child.inc()
