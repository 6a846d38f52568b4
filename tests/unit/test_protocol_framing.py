"""The binary transaction framing (docs/protocol.md §3a): vectors, bounds, garbage.

Pure: bytes in, a transaction or a ``ProtocolError`` out. The vectors here are
the ones docs/protocol.md prints; a test reads them from the document, so the
two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.address import Address
from gateway.core.envelope import (
    MAX_ENCODED_ENVELOPE_BYTES,
    Envelope,
    encode_envelope,
    new_envelope_id,
    signing_bytes,
)
from gateway.crypto.envelope_crypto import generate_retention_key, seal_v2
from gateway.crypto.keys import UserKeys
from gateway.errors import ProtocolError, Reason
from gateway.federation.framing import (
    MAGIC,
    MIN_FRAME_BYTES,
    decode_any_transaction,
    decode_framed_transaction,
    encode_framed_transaction,
    is_framed,
)
from gateway.federation.protocol import (
    MAX_TRANSACTION_ENVELOPES,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_TXN_V2,
    EnvelopeResult,
    encode_transaction,
    parse_version_document,
    replay_results,
    result_map,
    version_document,
)
from gateway.federation.receiver import mailbox_record

ACME, GLOBEX = "acme.example", "globex.example"
NOW = 1_700_000_000_000
DAY = 86_400_000
PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def envelope(*, size: int = 100, group: str | None = "engineering", version: int = 1) -> Envelope:
    return Envelope(
        version=version,
        id=new_envelope_id(),
        sender=Address.parse("alice@acme.example"),
        recipient=Address.parse("bob@globex.example"),
        created=NOW,
        expires=NOW + DAY,
        burn_on_read=False,
        ciphertext=b"\x01" * size,
        signature=b"\x02" * 64,
        group=group,
        wrapped_key=b"\x03" * 80 if version == 2 else None,
    )


def frame(*records: bytes, origin: str = ACME, destination: str = GLOBEX) -> bytes:
    return encode_framed_transaction(origin, destination, list(records))


def header(count: int, *, origin: bytes = ACME.encode(), destination: bytes = GLOBEX.encode()):
    return (
        MAGIC
        + bytes((2, 0, len(origin)))
        + origin
        + bytes((len(destination),))
        + destination
        + struct.pack(">I", count)
    )


def record(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


# -- the test vectors of docs/protocol.md §3a ------------------------------------------


def vector_envelope() -> bytes:
    """envelope.md §4's test envelope, signed with its seed, group ``engineering``."""
    env = Envelope(
        version=1,
        id="AAECAwQFBgcICQoLDA0ODw",
        sender=Address.parse("alice@acme.example"),
        recipient=Address.parse("bob@globex.example"),
        created=1_700_000_000_000,
        expires=1_700_086_400_000,
        burn_on_read=False,
        ciphertext=b"\x00\x01\x02",
        signature=b"\x00" * 64,
    )
    seed = nacl.signing.SigningKey(bytes(range(32)))
    signed = dataclasses.replace(env, signature=seed.sign(signing_bytes(env)).signature)
    return encode_envelope(signed.with_group("engineering"))


def documented_vectors() -> dict[str, bytes]:
    """The hex blocks of protocol.md §3a, by the name in the line before each."""
    text = PROTOCOL_MD.read_text()
    found = re.findall(r"Vector ([A-Z]),.*?\n```\n([0-9a-f\n]+)```", text, re.DOTALL)
    return {name: bytes.fromhex(block.replace("\n", "")) for name, block in found}


def test_the_documented_vectors_are_what_the_codec_writes_and_reads() -> None:
    vectors = documented_vectors()
    assert set(vectors) == {"A", "B"}
    empty, one = vectors["A"], vectors["B"]
    assert empty == frame()
    assert len(empty) == 38
    assert one == frame(vector_envelope())
    assert len(one) == 345
    assert hashlib.sha256(one).hexdigest() in PROTOCOL_MD.read_text()
    txn = decode_framed_transaction(one)
    assert (txn.origin, txn.destination) == (ACME, GLOBEX)
    [slot] = txn.slots
    assert slot.envelope_id == "AAECAwQFBgcICQoLDA0ODw"
    assert slot.data == vector_envelope()
    assert decode_framed_transaction(empty).slots == ()


# -- round trips: the bytes stored are the bytes sent -------------------------------------


@given(
    st.lists(
        st.builds(
            envelope,
            size=st.integers(1, 400),
            group=st.none() | st.sampled_from(["engineering", "a-b_c"]),
            version=st.sampled_from([1, 2]),
        ),
        max_size=6,
    )
)
def test_round_trip_keeps_every_envelope_and_its_exact_bytes(sent: list[Envelope]) -> None:
    records = [encode_envelope(env) for env in sent]
    txn = decode_framed_transaction(frame(*records))
    assert [slot.envelope for slot in txn.slots] == sent
    assert [slot.data for slot in txn.slots] == records
    assert all(slot.error is None for slot in txn.slots)
    # The JSON framing of the same envelopes holds the same envelopes.
    assert decode_any_transaction(encode_transaction(ACME, GLOBEX, sent)).slots == txn.slots


def test_the_mailbox_keeps_the_record_as_it_came() -> None:
    data = encode_envelope(envelope())
    [slot] = decode_framed_transaction(frame(data)).slots
    assert slot.envelope is not None
    stored = mailbox_record(slot.envelope, raw=slot.raw, data=slot.data)
    assert stored.data is slot.data  # not a copy made by encoding again


def test_a_version_2_envelope_with_its_retention_copy_travels_as_it_was_sealed() -> None:
    alice = UserKeys.generate(Address.parse("alice@acme.example"))
    bob = UserKeys.generate(Address.parse("bob@globex.example"))
    _secret, public = generate_retention_key()
    sealed = seal_v2(
        b"kept for the record",
        sender=alice,
        recipient=bob.public(),
        created_ms=NOW,
        expires_ms=NOW + DAY,
        retention_key_id="acme-2026",
        retention_public_key=public,
    ).with_group("legal")
    data = encode_envelope(sealed)
    [slot] = decode_framed_transaction(frame(data)).slots
    assert slot.envelope == sealed
    assert slot.envelope is not None
    assert slot.envelope.retention is not None
    assert slot.data == data


# -- a frame that is not sound: 400, nothing judged -----------------------------------------


GOOD = encode_envelope(envelope())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "shorter than any frame"),
        (MAGIC + b"\x02\x00", "shorter than any frame"),
        (b"{" + frame()[1:], "magic"),
        (b"GWTY" + frame()[4:], "magic"),
        (frame()[:4] + b"\x01" + frame()[5:], "framing version 1"),
        (frame()[:4] + b"\x03" + frame()[5:], "framing version 3"),
        (frame()[:5] + b"\x01" + frame()[6:], "flags must be 0"),
        (header(0, origin=b""), "origin is empty"),
        (header(0, origin=b"ACME.example"), "normal form"),
        (header(0, origin=b"acme.example."), "normal form"),
        (header(0, origin=b"acme"), "not a domain"),
        (header(0, origin="äcme.example".encode()), "not a domain"),
        (header(0, destination=b"x" * 250 + b".com"), "not a domain"),
        (header(0)[:6] + b"\xff" + header(0)[7:], "origin's length 255 runs past the end"),
        (header(0)[:-1], "ends before the envelope count"),
        (header(1), "cannot fit"),
        (header(2) + record(GOOD), "the body ends inside the length of envelope #2"),
        (header(MAX_TRANSACTION_ENVELOPES + 1) + b"\x00" * 4, "at most 1000"),
        (header(2**32 - 1), "at most 1000"),
        (header(1) + struct.pack(">I", len(GOOD) + 1) + GOOD, "runs past the end"),
        (header(1) + struct.pack(">I", 2**32 - 1), "runs past the end"),
        (header(2) + record(GOOD) + b"\x00\x00\x00", "ends inside the length of envelope #2"),
        (frame(GOOD) + b"\x00", "1 byte(s) follow the last envelope"),
        (frame() + record(GOOD), "follow the last envelope"),
    ],
)
def test_a_frame_that_is_not_sound_is_a_protocol_error(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_framed_transaction(body)
    assert message in info.value.message
    assert info.value.reason is Reason.PROTOCOL


def test_the_receiver_may_bound_the_count_lower() -> None:
    body = frame(GOOD, GOOD, GOOD)
    assert len(decode_framed_transaction(body, max_envelopes=3).slots) == 3
    with pytest.raises(ProtocolError, match="at most 2"):
        decode_framed_transaction(body, max_envelopes=2)
    assert len(header(0, origin=b"a", destination=b"b")) == MIN_FRAME_BYTES


def test_the_encoder_refuses_what_cannot_be_framed() -> None:
    with pytest.raises(ValueError, match="at most 1000"):
        encode_framed_transaction(ACME, GLOBEX, [GOOD] * 1001)
    with pytest.raises(ValueError, match="origin"):
        encode_framed_transaction("", GLOBEX, [])
    with pytest.raises(ValueError, match="destination"):
        encode_framed_transaction(ACME, "x" * 254, [])


# -- a broken record costs only its own slot ---------------------------------------------------


def _reordered(data: bytes) -> bytes:
    obj = json.loads(data)
    return json.dumps(dict(reversed(obj.items())), separators=(",", ":")).encode()


def _escaped(data: bytes) -> bytes:
    return data.replace(b'"from":"alice', b'"from":"\\u0061lice', 1)


@pytest.mark.parametrize(
    ("data", "reason", "has_id"),
    [
        (b"", Reason.ENVELOPE_MALFORMED, False),
        (b"not json", Reason.ENVELOPE_MALFORMED, False),
        (b"\xff\xfe", Reason.ENVELOPE_MALFORMED, False),
        (b"[1, 2]", Reason.ENVELOPE_MALFORMED, False),
        (b'{"v": NaN}', Reason.ENVELOPE_MALFORMED, False),
        (b"[" * 50_000 + b"]" * 50_000, Reason.ENVELOPE_MALFORMED, False),
        (GOOD.replace(b'"v":1', b'"v":3'), Reason.ENVELOPE_BAD_VERSION, True),
        (GOOD.replace(b'"to":"bob@', b'"to":"Bob@'), Reason.ENVELOPE_BAD_TO, True),
        (GOOD.replace(b'"group":"engineering"', b'"group":"Eng"'), Reason.ENVELOPE_BAD_GROUP, True),
        # Valid envelopes, but not in the one canonical form (docs/envelope.md §1):
        (GOOD.replace(b",", b", "), Reason.ENVELOPE_MALFORMED, True),
        (GOOD + b"\n", Reason.ENVELOPE_MALFORMED, True),
        (_reordered(GOOD), Reason.ENVELOPE_MALFORMED, True),
        (_escaped(GOOD), Reason.ENVELOPE_MALFORMED, True),
        (GOOD[:-1] + b',"v":1}', Reason.ENVELOPE_MALFORMED, True),  # a key twice
        # The ciphertext, which is read without the JSON scanner (records.py),
        # twice, escaped, or not ended:
        (
            GOOD.replace(b'"ciphertext":', b'"ciphertext":"AQ","ciphertext":', 1),
            Reason.ENVELOPE_MALFORMED,
            True,
        ),
        (
            GOOD.replace(b'"ciphertext":"AQ', b'"ciphertext":"\\u0041Q', 1),
            Reason.ENVELOPE_MALFORMED,
            True,
        ),
        (GOOD[: GOOD.index(b'"ciphertext":"') + 20], Reason.ENVELOPE_MALFORMED, False),
        (b" " * (MAX_ENCODED_ENVELOPE_BYTES + 1), Reason.ENVELOPE_TOO_LARGE, False),
    ],
)
def test_a_bad_record_costs_only_its_own_slot(data: bytes, reason: Reason, has_id: bool) -> None:
    before, after = encode_envelope(envelope()), encode_envelope(envelope())
    txn = decode_framed_transaction(frame(before, data, after), max_envelopes=3)
    first, bad, last = txn.slots
    assert first.data == before
    assert last.data == after
    assert (bad.envelope, bad.error, bad.data) == (None, reason, None)
    assert (bad.envelope_id is not None) is has_id


def test_a_repeated_id_and_replay_work_as_in_json() -> None:
    data = encode_envelope(envelope())
    body = frame(data, b"garbage", data)
    txn = decode_framed_transaction(body)
    ids = [slot.envelope_id for slot in txn.slots]
    assert ids[0] == ids[2] is not None
    assert ids[1] is None
    answered = [
        EnvelopeResult(ids[0], "accepted"),
        EnvelopeResult(None, "envelope_malformed"),
        EnvelopeResult(ids[0], "accepted"),
    ]
    assert replay_results(decode_any_transaction(body), result_map(answered)) == answered


# -- garbage: only a transaction or a ProtocolError ----------------------------------------------


def _decodes_or_refuses(body: bytes) -> None:
    try:
        txn = decode_framed_transaction(body)
    except ProtocolError:
        return
    for slot in txn.slots:
        assert (slot.envelope is None) == (slot.error is not None)
        if slot.data is not None:
            assert slot.data in body


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    _decodes_or_refuses(data)
    _decodes_or_refuses(MAGIC + b"\x02\x00" + data)


VALID = frame(encode_envelope(envelope()), encode_envelope(envelope(version=2, size=30)))


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4),
    st.integers(0, len(VALID)),
)
def test_a_valid_frame_damaged_anywhere_decodes_or_raises_protocol_error(
    flips: list[tuple[int, int]], cut: int
) -> None:
    body = bytearray(VALID)
    for index, value in flips:
        body[index] = value
    _decodes_or_refuses(bytes(body))
    _decodes_or_refuses(bytes(body[:cut]))


def test_json_bodies_never_look_framed() -> None:
    assert is_framed(frame())
    assert not is_framed(encode_transaction(ACME, GLOBEX, []))


# -- the version document -----------------------------------------------------------------------


def test_the_version_document_lists_the_transaction_types() -> None:
    ours = json.dumps(version_document()).encode()
    assert parse_version_document(ours).transaction_types == {MEDIA_TYPE_JSON, MEDIA_TYPE_TXN_V2}
    only_json = json.dumps(version_document([MEDIA_TYPE_JSON])).encode()
    assert parse_version_document(only_json).transaction_types == {MEDIA_TYPE_JSON}
    old = json.dumps({"versions": ["v1"], "envelope_versions": [1, 2]}).encode()
    assert parse_version_document(old).transaction_types == {MEDIA_TYPE_JSON}
    shouting = json.dumps({"transaction_types": ["Application/VND.gateway.txn.V2"]}).encode()
    assert parse_version_document(shouting).transaction_types == {MEDIA_TYPE_TXN_V2}


@pytest.mark.parametrize(
    "types", [[], "application/json", [1], ["x" * 300], ["a"] * 17, None, {"a": 1}]
)
def test_a_malformed_transaction_types_list_is_refused(types: object) -> None:
    with pytest.raises(ProtocolError, match="transaction_types"):
        parse_version_document(json.dumps({"transaction_types": types}).encode())
