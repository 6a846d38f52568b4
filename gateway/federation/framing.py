"""The binary transaction framing, ``application/vnd.gateway.txn.v2`` (pure; no I/O).

docs/protocol.md §3a is the normative text, with test vectors; this module is
its executable form. A body is

    magic "GWTX" | framing version 0x02 | flags 0x00
    | u8 len | origin | u8 len | destination | u32 count
    | count x (u32 len | envelope bytes)

big-endian, nothing before or after. Each record is one envelope's encoding
(docs/envelope.md §1) in its canonical form, exactly the bytes the origin
gateway stores for it, group included. The frame exists so that those bytes
travel and are stored as they are: a receiver parses each record once (strict
JSON, :meth:`Envelope.from_json`), checks that it is canonical, and keeps the
record's bytes for the mailbox, never an encoding of its own
(:attr:`EnvelopeSlot.data`). The ciphertext inside stays base64url: the
envelope's format is the client's, and this is only the transaction's.

Two levels of refusal, as in the JSON framing (:mod:`.protocol`):

* a frame that is not sound (short, wrong magic, version or flags, an org not
  in normal form, a count over the bound, a length that runs past the end,
  bytes after the last record) raises :class:`~gateway.errors.ProtocolError`
  (``400``, nothing stored). Every length is checked against what is left of
  the body before anything is sliced or a list is sized by it, so a lying
  length costs nothing;
* a record that is not a valid envelope in canonical form costs only its own
  slot, with the reason a JSON transaction would give it
  (``envelope_too_large`` for a record over :data:`MAX_ENCODED_ENVELOPE_BYTES`,
  which is not parsed; ``envelope_malformed`` for one that is not an object,
  or is a valid envelope written in another form: whitespace, another key
  order, escapes, a key twice). Its id is answered when the record parsed.

Because records are delimited by their lengths, a broken record cannot shift
the slots after it: the answer's position names the envelope even where its
``id`` is ``null`` (the sender relies on that, see :mod:`.sender`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NoReturn

from gateway.core.address import normalize_domain
from gateway.core.envelope import MAX_ENCODED_ENVELOPE_BYTES, Envelope, encode_validated
from gateway.core.records import (
    LENGTH_BYTES,
    decode_envelope_record_json,
    frame_records,
    pack_u32,
    split_records,
    unpack_u32,
)
from gateway.errors import AddressError, EnvelopeError, ProtocolError, Reason
from gateway.federation.protocol import (
    MAX_RESULT_ID_LENGTH,
    MAX_TRANSACTION_ENVELOPES,
    EnvelopeSlot,
    Transaction,
    decode_transaction,
)

MAGIC: Final = b"GWTX"
FRAMING_VERSION: Final = 2
FLAGS: Final = 0  # reserved: a receiver refuses any other value
MAX_ORG_LENGTH: Final = 253  # a DNS name
#: magic, version, flags, then each org as a length and at least one byte, then the count
MIN_FRAME_BYTES: Final = len(MAGIC) + 2 + 1 + 1 + 1 + 1 + LENGTH_BYTES


def _org_field(org: str, what: str) -> bytes:
    data = org.encode("ascii")
    if not 0 < len(data) <= MAX_ORG_LENGTH:
        raise ValueError(f"{what} must be 1-{MAX_ORG_LENGTH} ASCII bytes")
    return bytes((len(data),)) + data


def encode_framed_transaction(origin: str, destination: str, records: Sequence[bytes]) -> bytes:
    """A binary transaction body around envelopes that are already encoded.

    ``records`` are canonical envelope encodings (as the spool keeps them);
    they go in as they are. ``ValueError`` for an org that cannot be framed
    or more records than the protocol allows.
    """
    if len(records) > MAX_TRANSACTION_ENVELOPES:
        raise ValueError(f"at most {MAX_TRANSACTION_ENVELOPES} envelopes go in one transaction")
    parts = [
        MAGIC,
        bytes((FRAMING_VERSION, FLAGS)),
        _org_field(origin, "origin"),
        _org_field(destination, "destination"),
        pack_u32(len(records)),
    ]
    parts += frame_records(records)
    return b"".join(parts)


def _refuse(message: str) -> NoReturn:
    raise ProtocolError(f"binary transaction: {message}")


def _read_org(body: bytes, offset: int, what: str) -> tuple[str, int]:
    if offset >= len(body):
        _refuse(f"the body ends before the {what}")
    length = body[offset]
    offset += 1
    if length == 0:
        _refuse(f"the {what} is empty")
    if length > len(body) - offset:
        _refuse(f"the {what}'s length {length} runs past the end of the body")
    raw = body[offset : offset + length]
    try:
        text = raw.decode("ascii")
        if normalize_domain(text) != text:
            _refuse(f"the {what} is not a lower-case domain in normal form")
    except (UnicodeDecodeError, AddressError):
        _refuse(f"the {what} is not a domain")
    return text, offset + length


def _record_slot(data: bytes) -> EnvelopeSlot:
    """One record's slot: the envelope and its bytes as received, or why it is refused."""
    if len(data) > MAX_ENCODED_ENVELOPE_BYTES:
        return EnvelopeSlot(None, None, Reason.ENVELOPE_TOO_LARGE)
    try:
        # The canonical form is ASCII, so nothing else is read further (its id
        # included). Parsed in C, the ciphertext not scanned as JSON text;
        # duplicate keys are caught by the canonical form below, which has
        # each key once.
        raw = decode_envelope_record_json(data)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return EnvelopeSlot(None, None, Reason.ENVELOPE_MALFORMED)
    if type(raw) is not dict:
        return EnvelopeSlot(None, None, Reason.ENVELOPE_MALFORMED)
    raw_id = raw.get("id")
    envelope_id = (
        raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_RESULT_ID_LENGTH else None
    )
    try:
        envelope = Envelope.from_json(raw)
    except EnvelopeError as exc:
        return EnvelopeSlot(envelope_id, None, exc.reason)
    # One envelope, one wire form: the record must be the canonical encoding of
    # what it holds (docs/envelope.md §1). Compared, not stored: what is stored
    # is ``data``, the bytes that came. This also bounds the stored size by the
    # envelope's values: no whitespace padding up to the encoded-size cap.
    if encode_validated(raw, envelope.group) != data:
        return EnvelopeSlot(envelope.id, None, Reason.ENVELOPE_MALFORMED)
    return EnvelopeSlot(envelope.id, envelope, None, raw, data)


def decode_framed_transaction(
    body: bytes, *, max_envelopes: int = MAX_TRANSACTION_ENVELOPES
) -> Transaction:
    """Parse a binary transaction body; ``ProtocolError`` (answered 400) when it is not one."""
    if len(body) < MIN_FRAME_BYTES:
        _refuse(f"{len(body)} bytes is shorter than any frame ({MIN_FRAME_BYTES})")
    if body[: len(MAGIC)] != MAGIC:
        _refuse("it does not begin with the magic bytes 'GWTX'")
    offset = len(MAGIC)
    version, flags = body[offset], body[offset + 1]
    if version != FRAMING_VERSION:
        _refuse(f"framing version {version} is not spoken here (only {FRAMING_VERSION})")
    if flags != FLAGS:
        _refuse(f"flags must be 0, got {flags}")
    origin, offset = _read_org(body, offset + 2, "origin")
    destination, offset = _read_org(body, offset, "destination")
    if len(body) - offset < LENGTH_BYTES:
        _refuse("the body ends before the envelope count")
    (count,) = unpack_u32(body, offset)
    offset += LENGTH_BYTES
    limit = min(max_envelopes, MAX_TRANSACTION_ENVELOPES)
    if count > limit:
        _refuse(f"it holds {count} envelopes; at most {limit} are accepted")
    records = split_records(body, offset, count, _refuse)
    slots = tuple(_record_slot(record) for record in records)
    return Transaction(origin, destination, slots)


def is_framed(body: bytes) -> bool:
    """Whether ``body`` begins like a binary transaction (JSON never begins with ``G``)."""
    return body[: len(MAGIC)] == MAGIC


def decode_any_transaction(
    body: bytes, *, max_envelopes: int = MAX_TRANSACTION_ENVELOPES
) -> Transaction:
    """A recorded body again, in whichever framing it came (told apart by its first bytes).

    For answering a retry from the record: a body is "the same" by its bytes
    alone (docs/protocol.md §5), whatever Content-Type came with it.
    """
    if is_framed(body):
        return decode_framed_transaction(body, max_envelopes=max_envelopes)
    return decode_transaction(body, max_envelopes=max_envelopes)
