"""The federation receiver: what a peer's transaction becomes in our mailboxes.

Routes (docs/protocol.md §2): ``PUT /federation/v1/transactions/{txn_id}`` and
``GET /federation/v1/version``, served on the mTLS federation listener, where
``request.peer`` is the org the client certificate proved
(:mod:`gateway.federation.trust`) and nothing else.

Theory of operation
-------------------
One ``PUT``, in this order; every refusal changes nothing:

1. **Who.** The peer must be in the rules *in force now* (a reload may have
   dropped it while its request was on the wire): else ``403 unknown_peer``.
   The rules object read here is the one every decision of the request uses.
2. **Which transaction.** ``txn_id`` must be well formed (``400``). If
   ``(peer, txn_id)`` is recorded, the same body bytes get the recorded answer
   again (``200``), different ones ``409 txn_conflict``, and nothing is
   stored. The record is not read up front: the commit of step 5 reads it
   atomically anyway, so a new transaction (nearly every one) costs one trip
   to the storage, not two. Each refusal of step 3 reads it first, so a
   recorded id still gets its recorded answer or ``409`` whatever the body
   holds (docs/protocol.md §5).
3. **What.** The ``Content-Type`` says the framing: JSON (also when absent)
   or the binary framing (:mod:`.framing`, docs/protocol.md §3a), when this
   receiver takes it (``transaction_types``, listed in the version
   document); anything else is ``415`` (a recorded id still decides first).
   The body must be a transaction in that framing (``400``), its ``origin``
   the peer (``403 origin_mismatch``), its ``destination`` us (``421``).
4. **Each envelope** is judged by :func:`judge_transaction`, a pure function:
   parse error, then the clock (``expired``), then the rules
   (``CompiledRules.decide_inbound``: sender of the origin, recipient ours and
   known, the recipient's group receives from the origin or its asserted
   group, the group's limits). An id seen earlier in the same transaction is
   answered like that earlier slot and stored at most once.
5. **One durable commit.** The accepted envelopes and the whole answer go to
   ``Storage.deliver`` together. It skips envelope ids accepted before (by any
   transaction, across restarts), so a re-sent envelope is answered
   ``accepted`` without a second copy. An envelope whose recipient's mailbox
   has no room (``limits.mailbox_max_envelopes`` / ``mailbox_max_bytes``,
   checked inside the commit) is left out and answered ``mailbox_full``, a
   temporary result: the sender sends it again later. If ``(peer, txn_id)`` is recorded
   (a retry, or a concurrent request that committed first), ``deliver`` says
   so (``replayed``), stores nothing, and this request answers like step 2.
   An accepted envelope of a binary transaction is stored as its record's
   bytes, exactly as they arrived (the decoder checked them canonical); one
   of a JSON transaction, whose bytes are not kept apart by the JSON parser,
   as the canonical bytes of the object it was parsed from
   (:func:`protocol.canonical_envelope_bytes`), which are exactly what
   ``encode_envelope`` would give, and what this gateway's senders sent.
6. **Only then** the ``200`` answer, one result per envelope, in body order;
   mailbox long-polls of the new envelopes' recipients are woken
   (``on_delivered``); outcomes are counted and decisions logged (ids, peer,
   groups, reasons: never a ciphertext).

The recorded answer is ``{envelope id: result}`` (:func:`protocol.result_map`);
:func:`protocol.replay_results` rebuilds the exact answer from it and the
(identical) body, in whichever framing it came (told by its first bytes).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio
from prometheus_client import Counter

from gateway.core.address import normalize_domain
from gateway.core.envelope import Envelope, check_envelope_clock, encode_envelope
from gateway.core.ratelimit import RateLimiter
from gateway.core.rules import CompiledRules, Decision, reason_for_peer
from gateway.errors import AddressError, EnvelopeError, ProtocolError, Reason, StorageFullError
from gateway.federation.framing import decode_any_transaction, decode_framed_transaction
from gateway.federation.protocol import (
    ACCEPTED,
    MAX_TRANSACTION_ENVELOPES,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_TXN_V2,
    TRANSACTION_ROUTE,
    TRANSACTION_TYPES,
    VERSION_PATH,
    EnvelopeResult,
    EnvelopeSlot,
    Transaction,
    body_digest,
    body_hash,
    canonical_envelope_bytes,
    check_txn_id,
    decode_transaction,
    encode_results,
    replay_results,
    result_map,
    version_document,
)
from gateway.federation.trust import RulesSource
from gateway.http import Request, Response, Router, error_response, json_response
from gateway.observability.audit import AuditSink, NoAudit
from gateway.observability.metrics import (
    DELIVERY_LATENCY,
    FEDERATION_ENVELOPES,
    FEDERATION_TRANSACTION_BODIES,
    FEDERATION_TRANSACTION_DURATION,
    FEDERATION_TRANSACTIONS,
    MAILBOX_FULL_REFUSALS,
    POLICY_DENIALS,
    STORAGE_RESERVE_REFUSALS,
    bounded,
)
from gateway.reserve import RETRY_AFTER_SECONDS, Reserve
from gateway.storage.base import (
    Bound,
    DeliverOutcome,
    EnvelopeRecord,
    Storage,
    TxnRecord,
    envelope_record,
)

LOGGER = logging.getLogger("gateway.federation")

DIRECTION = "inbound"
MS_PER_SECOND = 1000
# Result words of gateway_federation_transactions_total besides the refusal reasons.
TXN_RESULT_OK = "ok"
TXN_RESULT_REPLAYED = "replayed"
JSON_CONTENT_TYPE = MEDIA_TYPE_JSON
# gateway_federation_transaction_bodies_total{framing}: the body's Content-Type, short.
FRAMING_LABELS: Final = {MEDIA_TYPE_JSON: "json", MEDIA_TYPE_TXN_V2: "binary_v2"}
MAX_LOGGED_ID = 64  # ids come from the peer: a log shows at most this much of one

OnDelivered = Callable[[Collection[str]], None]

_DURATION = FEDERATION_TRANSACTION_DURATION.labels(DIRECTION)
# Labelled children, made on first use; keys are bounded (peers from the rules x reasons).
_ENVELOPE_COUNTERS: dict[tuple[str, str], Counter] = {}
_TXN_COUNTERS: dict[tuple[str, str], Counter] = {}
_DENIAL_COUNTERS: dict[str, Counter] = {}
_BODY_COUNTERS: dict[tuple[str, str], Counter] = {}


def _ignore_delivered(users: Collection[str]) -> None:
    del users


# -- judging (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one slot of a transaction is answered, and why."""

    envelope_id: str | None
    result: str  # "accepted" or the reason code the peer is answered
    envelope: Envelope | None = None  # the parsed envelope, when there is one
    decision: Decision | None = None  # the rules' decision, when it came to that
    repeat: bool = False  # the id appeared earlier in this transaction: never stored
    # The JSON object the envelope was parsed from: its canonical bytes are stored.
    raw: Mapping[str, object] | None = field(default=None, repr=False, compare=False)
    # The binary framing's record: the envelope's bytes as received, stored as they are.
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def accepted(self) -> bool:
        return self.result == ACCEPTED

    @property
    def reason(self) -> str:
        """The real outcome, for logs, metrics and audit (``result`` is what the peer reads)."""
        decision = self.decision
        if decision is None or decision.allowed or self.repeat:
            return self.result
        return decision.reason.value

    @property
    def to_store(self) -> bool:
        return self.accepted and not self.repeat and self.envelope is not None


def _judge_slot(slot: EnvelopeSlot, origin: str, rules: CompiledRules, now_ms: int) -> Verdict:
    envelope = slot.envelope
    if envelope is None:
        return Verdict(slot.envelope_id, (slot.error or Reason.ENVELOPE_MALFORMED).value)
    try:
        # A slot's envelope comes from Envelope.from_json (decode_transaction),
        # which made every check but the clock's.
        check_envelope_clock(envelope, now_ms=now_ms)
    except EnvelopeError as exc:
        return Verdict(envelope.id, exc.reason.value, envelope)
    decision = rules.decide_inbound(
        origin,
        envelope.sender,
        envelope.recipient,
        asserted_group=envelope.group,
        size=envelope.size,
        ttl_seconds=envelope.ttl_ms // MS_PER_SECOND,
        burn_on_read=envelope.burn_on_read,
    )
    decision = rules.decide_recipient_retention(
        decision, envelope.recipient, version=envelope.version
    )
    # A refusal is answered with reason_for_peer: a recipient the peer may not reach
    # reads as one who does not exist. Verdict.reason keeps the real one for us.
    result = ACCEPTED if decision.allowed else reason_for_peer(decision).value
    return Verdict(envelope.id, result, envelope, decision, raw=slot.raw, data=slot.data)


def judge_transaction(txn: Transaction, rules: CompiledRules, *, now_ms: int) -> list[Verdict]:
    """One verdict per slot of ``txn``, in order (docs/protocol.md §4).

    The caller has checked that ``txn.origin`` is the proven peer and
    ``txn.destination`` is us. An id that appears again is answered like its
    first appearance, whatever the later slot holds, and is never stored again.
    """
    verdicts: list[Verdict] = []
    first: dict[str, Verdict] = {}
    for slot in txn.slots:
        earlier = first.get(slot.envelope_id) if slot.envelope_id is not None else None
        if earlier is not None:
            verdicts.append(Verdict(slot.envelope_id, earlier.result, repeat=True))
            continue
        verdict = _judge_slot(slot, txn.origin, rules, now_ms)
        if verdict.envelope_id is not None:
            first[verdict.envelope_id] = verdict
        verdicts.append(verdict)
    return verdicts


def _mailbox_full(verdicts: Sequence[Verdict], full: Collection[str]) -> list[Verdict]:
    """The verdicts once the commit left ``full`` out for want of mailbox room."""
    return [
        dataclasses.replace(verdict, result=Reason.MAILBOX_FULL.value)
        if verdict.accepted and verdict.envelope_id in full
        else verdict
        for verdict in verdicts
    ]


def mailbox_record(
    envelope: Envelope,
    *,
    raw: Mapping[str, object] | None = None,
    data: bytes | None = None,
) -> EnvelopeRecord:
    """An accepted envelope as the store keeps it (canonical bytes, group included).

    With ``data`` (the binary framing's record, checked canonical when it was
    decoded), those bytes exactly as they arrived. Else, with ``raw``, the
    JSON object ``envelope`` was parsed from, the bytes are written from it
    instead of encoding the envelope again: the same bytes
    (:func:`protocol.canonical_envelope_bytes`).
    """
    if data is None:
        data = encode_envelope(envelope) if raw is None else canonical_envelope_bytes(raw)
    return envelope_record(envelope, data)


# -- counting ------------------------------------------------------------------------


def _count_envelopes(peer: str, outcome: str, count: int) -> None:
    child = _ENVELOPE_COUNTERS.get((peer, outcome))
    if child is None:
        child = FEDERATION_ENVELOPES.labels(DIRECTION, peer, outcome)
        _ENVELOPE_COUNTERS[(peer, outcome)] = child
    child.inc(count)


def _count_transaction(peer: str, result: str) -> None:
    child = _TXN_COUNTERS.get((peer, result))
    if child is None:
        child = FEDERATION_TRANSACTIONS.labels(DIRECTION, peer, result)
        _TXN_COUNTERS[(peer, result)] = child
    child.inc()


def _count_body(peer: str, rules: CompiledRules, media_type: str) -> None:
    key = (peer, media_type)
    child = _BODY_COUNTERS.get(key)
    if child is None:
        child = FEDERATION_TRANSACTION_BODIES.labels(
            DIRECTION, bounded(peer, rules.peers), FRAMING_LABELS[media_type]
        )
        _BODY_COUNTERS[key] = child
    child.inc()


def _count_denial(reason: str) -> None:
    child = _DENIAL_COUNTERS.get(reason)
    if child is None:
        child = POLICY_DENIALS.labels(DIRECTION, reason)
        _DENIAL_COUNTERS[reason] = child
    child.inc()


# -- the receiver --------------------------------------------------------------------


class Receiver:
    """The federation listener's handlers; see the module docstring."""

    def __init__(
        self,
        *,
        org: str,
        rules: RulesSource,
        storage: Storage,
        clock_ms: Callable[[], int],
        max_envelopes: int = MAX_TRANSACTION_ENVELOPES,
        transaction_types: Sequence[str] = TRANSACTION_TYPES,
        on_delivered: OnDelivered = _ignore_delivered,
        audit: AuditSink | None = None,
        inbound_rate: RateLimiter | None = None,
        mailbox_bound: Bound | None = None,
        reserve: Reserve | None = None,
    ) -> None:
        try:
            self.org = normalize_domain(org)
        except AddressError as exc:
            raise ValueError(f"receiver org: {exc}") from exc
        if isinstance(max_envelopes, bool) or not 1 <= max_envelopes <= MAX_TRANSACTION_ENVELOPES:
            raise ValueError(
                f"max_envelopes must be within 1..{MAX_TRANSACTION_ENVELOPES}, got {max_envelopes}"
            )
        unknown = set(transaction_types) - set(TRANSACTION_TYPES)
        if MEDIA_TYPE_JSON not in transaction_types or unknown:
            raise ValueError(
                f"transaction_types must include {MEDIA_TYPE_JSON} and be among "
                f"{', '.join(TRANSACTION_TYPES)}"
            )
        # The bodies taken, by Content-Type; JSON always (docs/protocol.md §3a).
        self._transaction_types = tuple(transaction_types)
        self._rules = rules
        self._storage = storage
        self._clock_ms = clock_ms
        self._max_envelopes = max_envelopes
        self._on_delivered = on_delivered
        self._audit: AuditSink = audit if audit is not None else NoAudit()
        self._inbound_rate = inbound_rate  # per peer, one token per envelope
        self._mailbox_bound = mailbox_bound  # per recipient: a full one is answered mailbox_full
        self._reserve = reserve  # below it, transactions wait (503 insufficient_storage)

    def add_routes(self, router: Router) -> None:
        router.add("PUT", TRANSACTION_ROUTE, self.put_transaction)
        router.add("GET", VERSION_PATH, self.get_version)

    # -- GET /federation/v1/version ---------------------------------------------------

    async def get_version(self, request: Request, params: Mapping[str, str]) -> Response:
        if request.peer is None or self._rules.current.peer(request.peer) is None:
            return error_response(403, Reason.UNKNOWN_PEER)
        return json_response(200, version_document(self._transaction_types))

    # -- PUT /federation/v1/transactions/{txn_id} -------------------------------------

    async def put_transaction(self, request: Request, params: Mapping[str, str]) -> Response:
        started = trio.current_time()
        rules = self._rules.current  # one snapshot for the whole request
        peer = request.peer
        peer_label = bounded(peer or "", rules.peers)
        try:
            response, result = await self._transaction(request, params["txn_id"], rules, peer)
        except Exception:
            _count_transaction(peer_label, Reason.INTERNAL.value)
            raise  # the HTTP layer logs it and answers 500
        finally:
            _DURATION.observe(trio.current_time() - started)
        _count_transaction(peer_label, result)
        return response

    async def _transaction(
        self, request: Request, txn_id: str, rules: CompiledRules, peer: str | None
    ) -> tuple[Response, str]:
        """The answer and the word it is counted under."""
        if peer is None or rules.peer(peer) is None:
            LOGGER.warning(
                "refused a transaction from %s: not a peer in the rules in force",
                peer or "an unidentified client",
                extra=_refusal(peer, txn_id, Reason.UNKNOWN_PEER.value),
            )
            return error_response(403, Reason.UNKNOWN_PEER), Reason.UNKNOWN_PEER.value
        try:
            check_txn_id(txn_id)
        except ProtocolError as exc:
            return self._protocol_error(peer, txn_id, exc)
        digest = body_hash(request.body)
        media_type = self._media_type(request.header("content-type"))
        if media_type is None:
            # Not a body we take. A recorded id still decides first (§5): the same
            # bytes are the same transaction, whatever Content-Type came with them.
            recorded = await self._recorded_if_any(request.body, digest, peer, txn_id)
            return recorded or self._unsupported(peer, txn_id, request.header("content-type"))
        _count_body(peer, rules, media_type)
        try:
            if media_type == MEDIA_TYPE_TXN_V2:
                txn = decode_framed_transaction(request.body, max_envelopes=self._max_envelopes)
            else:
                txn = decode_transaction(request.body, max_envelopes=self._max_envelopes)
        except ProtocolError as exc:
            recorded = await self._recorded_if_any(request.body, digest, peer, txn_id)
            return recorded or self._protocol_error(peer, txn_id, exc)
        if txn.origin != peer or txn.destination != self.org:
            recorded = await self._recorded_if_any(request.body, digest, peer, txn_id)
            if recorded is not None:
                return recorded
        if txn.origin != peer:
            LOGGER.warning(
                "refused transaction %s from %s: its origin says %s",
                txn_id,
                peer,
                txn.origin,
                extra=_refusal(peer, txn_id, Reason.ORIGIN_MISMATCH.value),
            )
            return error_response(403, Reason.ORIGIN_MISMATCH), Reason.ORIGIN_MISMATCH.value
        if txn.destination != self.org:
            LOGGER.warning(
                "refused transaction %s from %s: addressed to %s, not %s",
                txn_id,
                peer,
                txn.destination,
                self.org,
                extra=_refusal(peer, txn_id, Reason.DESTINATION_MISMATCH.value),
            )
            return (
                error_response(421, Reason.DESTINATION_MISMATCH),
                Reason.DESTINATION_MISMATCH.value,
            )

        now_ms = self._clock_ms()
        limited = self._rate_limited(peer, txn_id, len(txn.slots), now_ms)
        if limited is not None:
            return limited, Reason.RATE_LIMITED.value
        why = await self._reserve.admit(len(request.body)) if self._reserve is not None else None
        if why is not None:
            return self._short_of_space(peer, txn_id, len(txn.slots), why)
        verdicts = judge_transaction(txn, rules, now_ms=now_ms)
        results = [EnvelopeResult(v.envelope_id, v.result) for v in verdicts]
        entries = [
            mailbox_record(v.envelope, raw=v.raw, data=v.data)
            for v in verdicts
            if v.to_store and v.envelope
        ]
        try:
            outcome = await self._storage.deliver(
                peer,
                txn_id,
                digest,
                result_map(results),
                entries,
                at_ms=now_ms,
                bound=self._mailbox_bound,
            )
        except StorageFullError as exc:
            if self._reserve is not None:
                self._reserve.note_full()
            return self._short_of_space(peer, txn_id, len(txn.slots), exc.message)
        if outcome.replayed is not None:
            # A retry, or a concurrent copy that committed first: answer as first answered.
            return self._recorded_answer(request.body, digest, outcome.replayed, txn)
        if outcome.mailbox_full:
            # Accepted by the rules, but the recipient's mailbox had no room: a
            # temporary answer (protocol.md §4b), as the commit recorded it.
            verdicts = _mailbox_full(verdicts, outcome.mailbox_full)
            results = [EnvelopeResult(v.envelope_id, v.result) for v in verdicts]
            MAILBOX_FULL_REFUSALS.labels("federation").inc(len(outcome.mailbox_full))
        self._after_commit(peer, txn_id, verdicts, outcome, rules, now_ms)
        await self._audit_denials(peer, txn_id, verdicts)
        return _results_response(results), TXN_RESULT_OK

    def _media_type(self, content_type: str | None) -> str | None:
        """The transaction type of a body with this Content-Type, or None if not taken.

        No Content-Type, or ``application/json`` with any parameters, is JSON
        (as before the binary framing existed).
        """
        if content_type is None:
            return MEDIA_TYPE_JSON
        media_type = content_type.partition(";")[0].strip().lower()
        return media_type if media_type in self._transaction_types else None

    def _unsupported(
        self, peer: str, txn_id: str, content_type: str | None
    ) -> tuple[Response, str]:
        reason = Reason.UNSUPPORTED_MEDIA_TYPE
        LOGGER.info(
            "refused transaction %.64r from %s: Content-Type %.80r is not one we take",
            txn_id,
            peer,
            content_type,
            extra=_refusal(peer, txn_id, reason.value),
        )
        body = {"error": reason.value, "accepted": list(self._transaction_types)}
        return json_response(415, body), reason.value

    def _rate_limited(self, peer: str, txn_id: str, count: int, now_ms: int) -> Response | None:
        """``429`` with Retry-After if ``peer`` may not send ``count`` envelopes now.

        Checked before anything is judged or stored: the sender keeps the
        transaction and sends it again after Retry-After (protocol.md §5).
        """
        if self._inbound_rate is None:
            return None
        wait = self._inbound_rate.take(peer, now_ms / MS_PER_SECOND, count)
        if wait <= 0:
            return None
        LOGGER.warning(
            "refused transaction %s from %s: %d envelope(s) over its inbound rate, retry in %.1f s",
            txn_id,
            peer,
            count,
            wait,
            extra=_refusal(peer, txn_id, Reason.RATE_LIMITED.value),
        )
        return error_response(
            429, Reason.RATE_LIMITED, headers=[("retry-after", str(max(1, math.ceil(wait))))]
        )

    def _short_of_space(self, peer: str, txn_id: str, count: int, why: str) -> tuple[Response, str]:
        """``503 insufficient_storage`` with Retry-After: nothing judged, stored or recorded.

        The sender keeps the transaction and sends it again after Retry-After
        (protocol.md §5), by which time acknowledgements or expiry may have
        made room.
        """
        STORAGE_RESERVE_REFUSALS.labels("federation").inc(count)
        LOGGER.warning(
            "refused transaction %s from %s (%d envelope(s)): %s",
            txn_id,
            peer,
            count,
            why,
            extra=_refusal(peer, txn_id, Reason.INSUFFICIENT_STORAGE.value),
        )
        response = error_response(
            503,
            Reason.INSUFFICIENT_STORAGE,
            headers=[("retry-after", str(RETRY_AFTER_SECONDS))],
        )
        return response, Reason.INSUFFICIENT_STORAGE.value

    async def _audit_denials(self, peer: str, txn_id: str, verdicts: Sequence[Verdict]) -> None:
        """One audit record per envelope the rules refused (waits for room: never dropped)."""
        for verdict in verdicts:
            decision = verdict.decision
            if decision is None or decision.allowed or verdict.repeat:
                continue
            envelope = verdict.envelope
            rule = decision.rule
            await self._audit.record(
                "policy_denial",
                direction=DIRECTION,
                envelope_id=verdict.envelope_id,
                txn_id=txn_id,
                peer=peer,
                group=decision.group,
                asserted_group=envelope.group if envelope is not None else None,
                sender=str(envelope.sender) if envelope is not None else None,
                recipient=str(envelope.recipient) if envelope is not None else None,
                reason=verdict.reason,
                answered=verdict.result,
                rule=f"{rule.file}:{rule.line}" if rule is not None else None,
                detail=decision.detail,
            )

    def _protocol_error(self, peer: str, txn_id: str, exc: ProtocolError) -> tuple[Response, str]:
        LOGGER.info(
            "refused transaction %.64r from %s: %s",
            txn_id,
            peer,
            exc.message,
            extra=_refusal(peer, txn_id, exc.reason.value),
        )
        body = {"error": exc.reason.value, "message": exc.message}
        return json_response(400, body), exc.reason.value

    async def _recorded_if_any(
        self, body: bytes, digest: bytes, peer: str, txn_id: str
    ) -> tuple[Response, str] | None:
        """The answer a recorded ``(peer, txn_id)`` gets (before any refusal), or None."""
        record = await self._storage.txn_lookup(peer, txn_id)
        return None if record is None else self._recorded_answer(body, digest, record)

    def _recorded_answer(
        self, body: bytes, digest: bytes, record: TxnRecord, txn: Transaction | None = None
    ) -> tuple[Response, str]:
        if record.body_hash != digest:
            LOGGER.warning(
                "refused transaction %s from %s: its id was used for another body (sha256 %s now)",
                record.txn_id,
                record.origin,
                body_digest(body),
                extra=_refusal(record.origin, record.txn_id, Reason.TXN_CONFLICT.value),
            )
            return error_response(409, Reason.TXN_CONFLICT), Reason.TXN_CONFLICT.value
        try:
            if txn is None:
                # The body was a transaction when first answered; bounds of today do not apply.
                txn = decode_any_transaction(body, max_envelopes=MAX_TRANSACTION_ENVELOPES)
            results = replay_results(txn, record.results)
        except (ProtocolError, ValueError):
            LOGGER.exception(
                "transaction %s from %s: the recorded answer does not fit its body",
                record.txn_id,
                record.origin,
            )
            return error_response(500, Reason.INTERNAL), Reason.INTERNAL.value
        LOGGER.info(
            "transaction %s from %s again: answered as on first receipt",
            record.txn_id,
            record.origin,
        )
        return _results_response(results), TXN_RESULT_REPLAYED

    def _after_commit(
        self,
        peer: str,
        txn_id: str,
        verdicts: Sequence[Verdict],
        outcome: DeliverOutcome,
        rules: CompiledRules,
        now_ms: int,
    ) -> None:
        """Count, log and wake: everything that follows the durable commit."""
        peer_label = bounded(peer, rules.peers)
        stored = frozenset(outcome.stored)
        for result, count in collections.Counter(v.reason for v in verdicts).items():
            _count_envelopes(peer_label, result, count)
        # An accepted envelope is logged at DEBUG: skip building its fields when that is off.
        log_accepted = LOGGER.isEnabledFor(logging.DEBUG)
        accepted = 0
        for verdict in verdicts:
            if verdict.accepted:
                accepted += 1
            elif verdict.decision is not None and not verdict.repeat:
                _count_denial(verdict.reason)
            if log_accepted or verdict.repeat or not verdict.accepted:
                _log_verdict(peer, verdict, stored)
            envelope = verdict.envelope
            if envelope is not None and verdict.to_store and envelope.id in stored:
                DELIVERY_LATENCY.observe(max(0, now_ms - envelope.created) / MS_PER_SECOND)
        LOGGER.info(
            "transaction %s from %s: %d envelope(s), %d accepted (%d new), %d rejected",
            txn_id,
            peer,
            len(verdicts),
            accepted,
            len(stored),
            len(verdicts) - accepted,
            extra={
                "event": "transaction_received",
                "txn_id": txn_id,
                "peer": peer,
                "envelopes": len(verdicts),
                "accepted": accepted,
                "rejected": len(verdicts) - accepted,
            },
        )
        if outcome.recipients:
            try:
                self._on_delivered(outcome.recipients)
            except Exception:
                LOGGER.exception("waking the mailboxes of transaction %s failed", txn_id)


def _refusal(peer: str | None, txn_id: str, reason: str) -> dict[str, object]:
    """The ``extra=`` fields of a refused transaction's log event."""
    return {
        "event": "transaction_refused",
        "peer": peer,
        "txn_id": txn_id[:MAX_LOGGED_ID],
        "reason": reason,
    }


def _results_response(results: Sequence[EnvelopeResult]) -> Response:
    return Response(200, [("content-type", JSON_CONTENT_TYPE)], encode_results(results))


def _log_verdict(peer: str, verdict: Verdict, stored: frozenset[str]) -> None:
    envelope = verdict.envelope
    asserted = envelope.group if envelope is not None else None
    decision = verdict.decision
    local_group = decision.group if decision is not None else None
    if verdict.repeat:
        LOGGER.info(
            "inbound envelope %.64r from %s repeated in its transaction: answered %s",
            verdict.envelope_id,
            peer,
            verdict.result,
            extra=_verdict_fields(peer, verdict, "envelope_repeated"),
        )
    elif verdict.accepted:
        LOGGER.debug(
            "inbound envelope %s from %s (group %s) to group %s: accepted%s",
            verdict.envelope_id,
            peer,
            asserted or "-",
            local_group or "-",
            "" if verdict.envelope_id in stored else " (already delivered)",
            extra=_verdict_fields(peer, verdict, "envelope_accepted"),
        )
    else:
        rule = decision.rule if decision is not None else None
        LOGGER.info(
            "inbound envelope %.64r from %s (group %s) to group %s rejected: %s%s%s",
            verdict.envelope_id,
            peer,
            asserted or "-",
            local_group or "-",
            verdict.result,
            f" by {rule}" if rule is not None else "",
            f": {decision.detail}" if decision is not None else "",
            extra=_verdict_fields(peer, verdict, "envelope_rejected"),
        )


def _verdict_fields(peer: str, verdict: Verdict, event: str) -> dict[str, object]:
    """The ``extra=`` fields of one inbound envelope's log event: ids, never content."""
    envelope, decision = verdict.envelope, verdict.decision
    rule = decision.rule if decision is not None else None
    return {
        "event": event,
        "direction": DIRECTION,
        "envelope_id": (verdict.envelope_id or "")[:MAX_LOGGED_ID] or None,
        "peer": peer,
        "group": decision.group if decision is not None else None,
        "asserted_group": envelope.group if envelope is not None else None,
        "reason": None if verdict.accepted else verdict.result,
        "rule": str(rule) if rule is not None else None,
    }
