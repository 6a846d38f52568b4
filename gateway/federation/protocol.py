"""The federation wire format: transactions and their answers (pure; no I/O).

A transaction is one ``PUT /federation/v1/transactions/{txn_id}`` whose body is

    {"origin": "acme.example", "destination": "globex.example",
     "envelopes": [<envelope JSON, see docs/envelope.md>, ...]}

and whose answer (200) is

    {"results": [{"id": "<envelope id or null>", "result": "accepted" | "<reason>"}, ...]}

with exactly one result per envelope, in the order sent. docs/protocol.md is
the normative text; this module is its executable form. The binary framing of
the same transaction (``application/vnd.gateway.txn.v2``, §3a) is in
:mod:`gateway.federation.framing`; the answer is this JSON for both.

Two levels of refusal:

* a body that is not a transaction (not UTF-8 JSON, ``NaN``, a duplicate key
  in the transaction object, an unknown field, a bad org, too many envelopes)
  raises :class:`~gateway.errors.ProtocolError` and is answered ``400`` whole;
* a malformed envelope inside a well-formed transaction costs only its own
  slot: :class:`EnvelopeSlot` carries its reason code (a duplicate key inside
  an envelope object is ``envelope_malformed``, as docs/envelope.md says).

The hot path avoids Python-level work per envelope where the bytes are
already right: a sender splices the canonical envelope bytes its spool holds
into a body (:func:`splice_transaction`, checked in C by
:func:`spliced_body_holds`), a receiver stores the canonical bytes of an
accepted envelope by writing out the values of the JSON object it parsed
(:func:`canonical_envelope_bytes`), and answers are joined from pieces
(:func:`encode_results`). Each gives exactly the bytes the slow, obvious
encoding gives; the tests prove it.

Idempotency needs the answer to a transaction to be recomputable from what the
receiver stores: the SHA-256 of the body (:func:`body_hash`) and one result per
envelope id (:func:`result_map`). A slot without a readable id gets its parse
error, which the same body bytes always reproduce, and an id that appears
twice in one transaction is answered like its first appearance. So
:func:`replay_results` rebuilds the exact answer from the body and the record.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn

from gateway import __version__
from gateway.core.address import normalize_domain
from gateway.core.envelope import (
    ENVELOPE_VERSION,
    SUPPORTED_ENVELOPE_VERSIONS,
    Envelope,
    encode_envelope,
    encode_validated,
)
from gateway.errors import AddressError, EnvelopeError, ProtocolError, Reason

PROTOCOL_VERSION = "v1"
SUPPORTED_VERSIONS = (PROTOCOL_VERSION,)
SERVER_NAME = f"federation-gateway/{__version__}"
TRANSACTIONS_PATH = "/federation/v1/transactions/"
TRANSACTION_ROUTE = TRANSACTIONS_PATH + "{txn_id}"
KEYS_PATH = "/federation/v1/keys/"
VERSION_PATH = "/federation/v1/version"

#: The Content-Type of a transaction body: version 1 is JSON (§3); the binary
#: framing (§3a, :mod:`gateway.federation.framing`) carries each envelope's
#: encoded bytes as they are. The version document lists those a receiver takes.
MEDIA_TYPE_JSON: Final = "application/json"
MEDIA_TYPE_TXN_V2: Final = "application/vnd.gateway.txn.v2"
TRANSACTION_TYPES: Final = (MEDIA_TYPE_JSON, MEDIA_TYPE_TXN_V2)
MAX_TRANSACTION_TYPES: Final = 16  # listed in one version document, at most
MAX_MEDIA_TYPE_LENGTH: Final = 127  # RFC 6838: type and subtype names are at most 127 each

#: A transaction id: 1-64 characters of base64url's alphabet.
TXN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Hard protocol bound on envelopes per transaction (a receiver may set it lower).
MAX_TRANSACTION_ENVELOPES = 1000
#: The longest envelope id echoed in a result; longer ones are answered ``null``.
MAX_RESULT_ID_LENGTH = 64
#: A result word: ``accepted`` or a reason code (a partner may send codes we do not know).
RESULT_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
ACCEPTED = "accepted"
#: Results that are not final: the sender keeps the envelope and sends it again
#: later, in a new transaction, until it is answered otherwise or expires (§4b).
TEMPORARY_RESULTS = frozenset({"mailbox_full"})

_TRANSACTION_FIELDS = frozenset({"origin", "destination", "envelopes"})


@dataclass(frozen=True, slots=True)
class EnvelopeSlot:
    """One envelope position of a transaction: the envelope, or why it could not be read.

    ``raw`` is the JSON object the envelope was parsed from (set with
    ``envelope``): :func:`canonical_envelope_bytes` turns it into the bytes
    to store without encoding the envelope again. ``data``, set by the binary
    framing only, is the envelope's encoded bytes exactly as they arrived: the
    bytes to store.
    """

    envelope_id: str | None
    envelope: Envelope | None
    error: Reason | None
    raw: Mapping[str, object] | None = field(default=None, repr=False, compare=False)
    data: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Transaction:
    origin: str
    destination: str
    slots: tuple[EnvelopeSlot, ...]


@dataclass(frozen=True, slots=True)
class EnvelopeResult:
    envelope_id: str | None
    result: str  # "accepted" or a Reason value

    @property
    def accepted(self) -> bool:
        return self.result == ACCEPTED

    def to_json(self) -> dict[str, object]:
        return {"id": self.envelope_id, "result": self.result}


# -- strict JSON -------------------------------------------------------------------


class _DuplicateKeys(dict[str, object]):
    """A JSON object in which some key appeared twice (the last value kept).

    Marked rather than refused on sight, so that the caller decides what it
    costs: the whole transaction at the top level, one slot inside an envelope.
    """


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    return _DuplicateKeys(obj) if len(obj) != len(pairs) else obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _loads(body: bytes, what: str) -> object:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8") from exc
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, NaN/Infinity, integers too long to convert;
        # RecursionError: absurdly deep nesting.
        raise ProtocolError(f"{what} is not JSON") from exc


# -- transactions ------------------------------------------------------------------


def check_txn_id(txn_id: str) -> str:
    """``txn_id`` if it is 1-64 characters of ``A-Z a-z 0-9 _ -``; else ``ProtocolError``."""
    if not isinstance(txn_id, str) or not TXN_ID_RE.fullmatch(txn_id):
        raise ProtocolError("transaction id must be 1-64 characters of A-Z a-z 0-9 _ -")
    return txn_id


def body_hash(body: bytes) -> bytes:
    """What makes a retry "the same transaction": the SHA-256 of the exact body bytes."""
    return hashlib.sha256(body).digest()


def body_digest(body: bytes) -> str:
    """:func:`body_hash` in hex, for logs."""
    return hashlib.sha256(body).hexdigest()


def _parse_domain(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"transaction field {field!r} must be a string")
    try:
        return normalize_domain(value)
    except AddressError as exc:
        raise ProtocolError(f"transaction field {field!r}: {exc}") from exc


def _slot(raw: object) -> EnvelopeSlot:
    raw_id = raw.get("id") if isinstance(raw, dict) else None
    envelope_id = (
        raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_RESULT_ID_LENGTH else None
    )
    if isinstance(raw, _DuplicateKeys):
        return EnvelopeSlot(envelope_id, None, Reason.ENVELOPE_MALFORMED)
    try:
        envelope = Envelope.from_json(raw)
    except EnvelopeError as exc:
        return EnvelopeSlot(envelope_id, None, exc.reason)
    # from_json accepts only a JSON object; the check is for the type checker.
    return EnvelopeSlot(envelope.id, envelope, None, raw if isinstance(raw, dict) else None)


def decode_transaction(
    body: bytes, *, max_envelopes: int = MAX_TRANSACTION_ENVELOPES
) -> Transaction:
    """Parse a transaction body; ``ProtocolError`` (answered 400) when it is not one."""
    obj = _loads(body, "transaction body")
    if not isinstance(obj, dict):
        raise ProtocolError("transaction body must be a JSON object")
    if isinstance(obj, _DuplicateKeys):
        raise ProtocolError("transaction object has a duplicate key")
    unknown = set(obj) - _TRANSACTION_FIELDS
    if unknown:
        names = ", ".join(repr(name[:40]) for name in sorted(unknown)[:5])
        raise ProtocolError(f"transaction has unknown field(s): {names}")
    missing = sorted(_TRANSACTION_FIELDS - set(obj))
    if missing:
        raise ProtocolError(f"transaction is missing field(s): {', '.join(missing)}")
    origin = _parse_domain(obj["origin"], "origin")
    destination = _parse_domain(obj["destination"], "destination")
    envelopes = obj["envelopes"]
    if not isinstance(envelopes, list):
        raise ProtocolError("transaction field 'envelopes' must be a list")
    limit = min(max_envelopes, MAX_TRANSACTION_ENVELOPES)
    if len(envelopes) > limit:
        raise ProtocolError(
            f"transaction holds {len(envelopes)} envelopes; at most {limit} are accepted"
        )
    return Transaction(origin, destination, tuple(_slot(raw) for raw in envelopes))


_COMPACT = json.JSONEncoder(separators=(",", ":")).encode  # what json.dumps(..., separators) does


def splice_transaction(origin: str, destination: str, envelopes: Sequence[bytes]) -> bytes:
    """The body of a transaction around envelopes that are already encoded.

    ``envelopes`` are canonical encodings (:func:`~gateway.core.envelope.encode_envelope`,
    as the spool keeps them); they are joined as they are, with no decoding:
    ``{"origin":...,"destination":...,"envelopes":[e1,e2,...]}``, compact.
    Only safe for bytes this gateway wrote: :func:`spliced_body_holds` checks
    that the result is the transaction it should be.
    """
    head = _COMPACT({"origin": origin, "destination": destination})
    return b"".join((head[:-1].encode("ascii"), b',"envelopes":[', b",".join(envelopes), b"]}"))


def encode_transaction(origin: str, destination: str, envelopes: Sequence[Envelope]) -> bytes:
    """The body of a transaction: compact JSON, envelopes in the order given, each canonical."""
    return splice_transaction(origin, destination, [encode_envelope(env) for env in envelopes])


def spliced_body_holds(body: bytes, ids: Sequence[str]) -> bool:
    """Whether ``body`` is a transaction of exactly these envelope ids, in order.

    The cheap check (JSON parsed in C, one look at each envelope's ``id``)
    that spliced bytes did not break the body: a damaged spool entry must
    never turn a whole transaction into a ``400`` that holds up the lane. It
    does not validate the envelopes: a receiver answers a bad one in its own
    slot.
    """
    try:
        obj = json.loads(body, object_pairs_hook=_object, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    if type(obj) is not dict or obj.keys() != _TRANSACTION_FIELDS:
        return False  # _DuplicateKeys is a subclass: refused too
    envelopes = obj["envelopes"]
    if type(envelopes) is not list or len(envelopes) != len(ids):
        return False
    return all(
        type(item) is dict and item.get("id") == envelope_id
        for item, envelope_id in zip(envelopes, ids, strict=True)
    )


def canonical_envelope_bytes(raw: Mapping[str, object]) -> bytes:
    """The canonical encoding of an envelope, from the JSON object it was parsed from.

    Equal to ``encode_envelope(Envelope.from_json(raw))`` whenever
    ``from_json`` accepts ``raw``: it accepts only objects that are exactly
    the ``to_json()`` of their envelope (known fields, strict types, addresses
    in normal form, canonical base64url; docs/envelope.md), so its values are
    written as they are (:func:`~gateway.core.envelope.encode_validated`):
    no second encoding, and the ciphertext is copied, not scanned for
    characters to escape (a JSON dump of a 64 KiB envelope spends ~100 µs on
    that scan).
    """
    group = raw.get("group")
    return encode_validated(raw, group if isinstance(group, str) else None)


# -- answers -----------------------------------------------------------------------


def result_map(results: Sequence[EnvelopeResult]) -> dict[str, str]:
    """Envelope id -> result, in body order, for the receiver's record.

    Slots without an id are left out (the body reproduces their answer); a
    repeated id keeps its first result, which is what it was answered.
    """
    recorded: dict[str, str] = {}
    for item in results:
        if item.envelope_id is not None:
            recorded.setdefault(item.envelope_id, item.result)
    return recorded


def replay_results(txn: Transaction, recorded: Mapping[str, str]) -> list[EnvelopeResult]:
    """The answer once given to ``txn``, rebuilt from its recorded :func:`result_map`.

    ``ValueError`` if the record does not fit the transaction (it belongs to
    another body, or was damaged): the caller must not guess an answer.
    """
    results: list[EnvelopeResult] = []
    for slot in txn.slots:
        if slot.envelope_id is not None:
            found = recorded.get(slot.envelope_id)
            if found is None:
                raise ValueError(f"recorded answer has no result for {slot.envelope_id!r}")
            results.append(EnvelopeResult(slot.envelope_id, found))
        elif slot.error is not None:
            results.append(EnvelopeResult(None, slot.error.value))
        else:  # a parsed envelope always has an id; this would be a codec bug
            raise ValueError("an envelope slot has neither an id nor an error")
    return results


_PLAIN_TEXT = re.compile(r"[A-Za-z0-9_-]{1,64}")  # JSON-encodes as itself in quotes


def encode_results(results: Sequence[EnvelopeResult]) -> bytes:
    """The answer's body: ``{"results":[{"id":...,"result":...},...]}``, compact.

    Joined from pieces (ids and words that need no escaping go in as they
    are): the same bytes as ``json.dumps`` with compact separators, faster.
    """
    parts = []
    for item in results:
        envelope_id, result = item.envelope_id, item.result
        if envelope_id is not None and _PLAIN_TEXT.fullmatch(envelope_id):
            id_text = f'"{envelope_id}"'
        else:
            id_text = _COMPACT(envelope_id)
        if _PLAIN_TEXT.fullmatch(result):
            parts.append(f'{{"id":{id_text},"result":"{result}"}}')
        else:
            parts.append(f'{{"id":{id_text},"result":{_COMPACT(result)}}}')
    return f'{{"results":[{",".join(parts)}]}}'.encode()


def decode_results(
    body: bytes, *, expected: int, ids: Sequence[str | None] | None = None
) -> list[EnvelopeResult]:
    """Parse a receiver's answer; ``ProtocolError`` unless it has exactly ``expected`` results.

    With ``ids`` (the envelope ids as sent, in order), each result's ``id``
    must be that id or ``null``: an answer that is about other envelopes is
    refused whole rather than applied to the wrong ones. Every ``result`` must
    look like a reason code (``[a-z][a-z0-9_]{0,63}``), so it can be recorded
    as ``rejected:<result>`` even when this gateway does not know the code.
    """
    if ids is not None and len(ids) != expected:
        raise ValueError(f"{len(ids)} ids given for {expected} expected results")
    obj = _loads(body, "transaction answer")
    results = obj.get("results") if isinstance(obj, dict) else None
    if not isinstance(results, list) or len(results) != expected:
        raise ProtocolError(f"transaction answer must hold exactly {expected} results")
    parsed: list[EnvelopeResult] = []
    for index, item in enumerate(results):
        if not isinstance(item, dict):
            raise ProtocolError(f"transaction result #{index + 1} must be an object")
        envelope_id, result = item.get("id"), item.get("result")
        if not isinstance(result, str) or not RESULT_RE.fullmatch(result):
            raise ProtocolError(f"transaction result #{index + 1} has no valid 'result' word")
        if not (envelope_id is None or isinstance(envelope_id, str)):
            raise ProtocolError(f"transaction result #{index + 1} has an 'id' of the wrong type")
        if ids is not None and envelope_id is not None and envelope_id != ids[index]:
            raise ProtocolError(f"transaction result #{index + 1} is for another envelope")
        parsed.append(EnvelopeResult(envelope_id, result))
    return parsed


# -- version -----------------------------------------------------------------------


def version_document(
    transaction_types: Sequence[str] = TRANSACTION_TYPES,
) -> dict[str, object]:
    """The body of ``GET /federation/v1/version``.

    ``envelope_versions`` lists the envelope versions (docs/envelope.md) this
    gateway accepts; a sender sends a peer only envelopes of a version it lists,
    and reads a document without the field as ``[1]``. ``transaction_types``
    lists the Content-Types of transaction bodies it accepts (a receiver may
    take fewer than this implementation speaks); a document without the field
    means JSON only.
    """
    return {
        "versions": list(SUPPORTED_VERSIONS),
        "envelope_versions": list(SUPPORTED_ENVELOPE_VERSIONS),
        "transaction_types": list(transaction_types),
        "server": SERVER_NAME,
    }


MAX_ENVELOPE_VERSIONS: Final = 16  # listed in one version document, at most


@dataclass(frozen=True, slots=True)
class PeerVersion:
    """What a peer's version document says it accepts."""

    envelope_versions: frozenset[int]
    transaction_types: frozenset[str]


def parse_version_document(body: bytes) -> PeerVersion:
    """A peer's ``GET /federation/v1/version`` answer; ``ProtocolError`` if malformed.

    A document without ``envelope_versions`` is a gateway from before version
    2 existed: it speaks version 1 only. One without ``transaction_types`` is a
    gateway from before the binary framing: it takes JSON only. Media types
    this gateway does not know are kept (and never used).
    """
    obj = _loads(body, "version document")
    if type(obj) is not dict:
        raise ProtocolError("version document must be an object")
    envelope_versions: frozenset[int] = frozenset({ENVELOPE_VERSION})
    if "envelope_versions" in obj:
        listed = obj["envelope_versions"]
        if (
            type(listed) is not list
            or not 0 < len(listed) <= MAX_ENVELOPE_VERSIONS
            or any(type(item) is not int or not 0 < item < 2**16 for item in listed)
        ):
            raise ProtocolError("version document: envelope_versions must list small integers")
        envelope_versions = frozenset(listed)
    transaction_types: frozenset[str] = frozenset({MEDIA_TYPE_JSON})
    if "transaction_types" in obj:
        types = obj["transaction_types"]
        if (
            type(types) is not list
            or not 0 < len(types) <= MAX_TRANSACTION_TYPES
            or any(
                type(item) is not str or not 0 < len(item) <= 2 * MAX_MEDIA_TYPE_LENGTH + 1
                for item in types
            )
        ):
            raise ProtocolError("version document: transaction_types must list media types")
        transaction_types = frozenset(item.lower() for item in types)
    return PeerVersion(envelope_versions, transaction_types)


def parse_envelope_versions(body: bytes) -> frozenset[int]:
    """The envelope versions a peer's version document lists; ``ProtocolError`` if malformed."""
    return parse_version_document(body).envelope_versions
