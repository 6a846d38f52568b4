"""The binary client batch (docs/client-api.md, "The binary batch"): vector, bounds, garbage.

Pure: bytes in, records or a ``ProtocolError`` out. The vector is the one
docs/client-api.md prints, read from the document so the two cannot drift.
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
from gateway.core.batchframe import (
    HEADER_BYTES,
    MAGIC,
    decode_answer,
    decode_batch,
    encode_batch,
)
from gateway.core.envelope import (
    Envelope,
    decode_envelope,
    encode_envelope,
    encode_validated,
    new_envelope_id,
    signing_bytes,
    with_group_member,
)
from gateway.core.records import decode_envelope_record_json, decode_record_json
from gateway.errors import ProtocolError

CLIENT_API_MD = Path(__file__).resolve().parents[2] / "docs" / "client-api.md"
MAX = 256


def vector_envelope() -> bytes:
    """envelope.md §4's test envelope, signed with its seed, no group."""
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
    return encode_envelope(signed)


def documented_vector() -> bytes:
    text = CLIENT_API_MD.read_text()
    section = text[text.index("#### The binary batch") :]
    found = re.search(r"\*\*Test vector\.\*\*.*?\n```\n([0-9a-f\n]+)```", section, re.DOTALL)
    assert found is not None
    return bytes.fromhex(found.group(1).replace("\n", ""))


def documented_answer() -> bytes:
    text = CLIENT_API_MD.read_text()
    section = text[text.index("#### The binary answer") :]
    found = re.search(r"\*\*Example\.\*\*.*?\n```\n([0-9a-f\n]+)```", section, re.DOTALL)
    assert found is not None
    return bytes.fromhex(found.group(1).replace("\n", ""))


def envelope(size: int = 100, group: str | None = None) -> Envelope:
    return Envelope(
        version=1,
        id=new_envelope_id(),
        sender=Address.parse("alice@acme.example"),
        recipient=Address.parse("bob@globex.example"),
        created=1_700_000_000_000,
        expires=1_700_086_400_000,
        burn_on_read=False,
        ciphertext=b"\x01" * size,
        signature=b"\x02" * 64,
        group=group,
    )


def header(count: int) -> bytes:
    return MAGIC + b"\x01\x00" + struct.pack(">I", count)


def record(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


GOOD = encode_envelope(envelope())


def test_the_documented_vector_is_what_the_codec_writes_and_reads() -> None:
    body = documented_vector()
    assert len(body) == 295
    assert body == encode_batch([vector_envelope()])
    assert hashlib.sha256(body).hexdigest() in CLIENT_API_MD.read_text()
    assert decode_batch(body, max_envelopes=MAX) == [vector_envelope()]


def test_records_come_back_as_they_went_in() -> None:
    records = [GOOD, b"not json", b"", encode_envelope(envelope(5000))]
    assert decode_batch(encode_batch(records), max_envelopes=MAX) == records
    assert len(encode_batch(records)) == HEADER_BYTES + sum(4 + len(r) for r in records)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "shorter than the 10-byte header"),
        (header(1)[:9], "shorter than the 10-byte header"),
        (b"GWTX" + header(1)[4:] + record(GOOD), "magic bytes 'GWBT' (offset 0)"),
        (b'{"envelopes": []}', "magic bytes"),
        (
            MAGIC + b"\x02\x00" + struct.pack(">I", 1) + record(GOOD),
            "framing version 2 at offset 4",
        ),
        (MAGIC + b"\x01\x01" + struct.pack(">I", 1) + record(GOOD), "flags at offset 5"),
        (header(0), "count at offset 6 is 0"),
        (header(MAX + 1) + record(GOOD) * (MAX + 1), f"count at offset 6 is {MAX + 1}"),
        (header(2**32 - 1), "1 to 256"),
        (header(2), "2 envelopes cannot fit in the 0 bytes left at offset 10"),
        (header(2) + record(GOOD) + b"\x00\x00\x00", "ends inside the length of envelope #2"),
        (
            header(1) + struct.pack(">I", len(GOOD) + 1) + GOOD,
            f"envelope #1's length {len(GOOD) + 1} (at offset 10) runs past the end",
        ),
        (header(1) + struct.pack(">I", 2**32 - 1), "runs past the end"),
        (header(1) + record(GOOD) + b"\x00", "1 byte(s) follow the last envelope (from offset"),
    ],
)
def test_a_frame_that_is_not_sound_is_a_protocol_error_naming_where(
    body: bytes, message: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_batch(body, max_envelopes=MAX)
    assert message in info.value.message
    assert info.value.message.startswith("binary batch: ")


def test_the_group_is_spliced_into_the_record_as_received() -> None:
    for group_before in (None, "old-group"):
        env = envelope(group=group_before)
        data = encode_envelope(env)
        spliced = with_group_member(data, group_before, "engineering")
        assert spliced == encode_envelope(env.with_group("engineering"))
        assert decode_envelope(spliced).group == "engineering"
        assert with_group_member(spliced, "engineering", None) == encode_envelope(
            env.with_group(None)
        )
    assert with_group_member(GOOD, None, None) is GOOD


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_records_or_a_protocol_error(body: bytes) -> None:
    try:
        records = decode_batch(body, max_envelopes=MAX)
    except ProtocolError:
        return
    assert 1 <= len(records) <= MAX


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_a_valid_frame_damaged_anywhere_gives_records_or_a_protocol_error(
    where: int, value: int
) -> None:
    body = bytearray(encode_batch([GOOD, json.dumps({"x": 1}).encode()]))
    body[where % len(body)] = value
    try:
        records = decode_batch(bytes(body), max_envelopes=MAX)
    except ProtocolError:
        return
    assert 1 <= len(records) <= MAX


@pytest.mark.parametrize(
    "data",
    [
        GOOD,
        encode_envelope(envelope(group="engineering")),
        encode_envelope(dataclasses.replace(envelope(), burn_on_read=True)),
        json.dumps(envelope().to_json(), sort_keys=True).encode(),  # whitespace: parsed whole
        GOOD.replace(b'"ciphertext":"', b'"ciphertext":"\\u0041', 1),  # an escape: parsed whole
        GOOD[:-1] + b',"ciphertext":"AAAA"}',  # a key twice: the last one, as JSON reads it
        GOOD[:-1] + b',"ciphertext":""}',
        b'{"burn_on_read":true,"ciphertext":"abc',  # no end: not JSON
        b'{"burn_on_read":true,"ciphertext":"\xff"}',  # not ASCII
        b"[1, 2]",
    ],
)
def test_the_envelope_record_reading_gives_what_json_gives(data: bytes) -> None:
    try:
        expected: object = decode_record_json(data)
    except ValueError:
        with pytest.raises(ValueError):  # noqa: PT011  # JSON's, codec or decode error alike
            decode_envelope_record_json(data)
        return
    got = decode_envelope_record_json(data)
    if data == GOOD[:-1] + b',"ciphertext":""}':
        # The one way the two readings differ: a key twice, which the canonical check refuses.
        assert got != expected
        assert encode_validated(got, None) != data  # type: ignore[arg-type]
        return
    assert got == expected


# -- the mailbox's binary answer: the same framing, 0 records allowed ------------------------
def test_the_documented_answer_is_the_vector_envelope_as_stored_with_its_group() -> None:
    body = documented_answer()
    stored = with_group_member(vector_envelope(), None, "engineering")
    assert len(stored) == 303
    assert len(body) == 317
    assert body == encode_batch([stored])
    assert hashlib.sha256(body).hexdigest() in CLIENT_API_MD.read_text()
    assert decode_answer(body, max_envelopes=1) == [stored]


def test_an_empty_answer_is_the_header_alone_and_no_submitted_batch() -> None:
    empty = encode_batch([])
    assert empty == header(0) == bytes.fromhex("47574254010000000000")
    assert decode_answer(empty, max_envelopes=1) == []
    with pytest.raises(ProtocolError, match="count at offset 6 is 0; a batch holds 1 to 256"):
        decode_batch(empty, max_envelopes=MAX)


def test_an_answer_holds_at_most_the_limit_asked_for() -> None:
    body = encode_batch([GOOD] * 3)
    assert decode_answer(body, max_envelopes=3) == [GOOD] * 3
    with pytest.raises(ProtocolError, match="count at offset 6 is 3; an answer holds 0 to 2"):
        decode_answer(body, max_envelopes=2)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (header(0)[:9], "shorter than the 10-byte header"),
        (b'{"envelopes":[]}', "magic bytes"),
        (MAGIC + b"\x02\x00" + struct.pack(">I", 0), "framing version 2 at offset 4"),
        (header(0) + b"\x00", "1 byte(s) follow the last envelope"),
        (header(1), "1 envelopes cannot fit in the 0 bytes left at offset 10"),
    ],
)
def test_an_answer_that_is_not_sound_is_a_protocol_error(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_answer(body, max_envelopes=MAX)
    assert message in info.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_an_answer_or_a_protocol_error(body: bytes) -> None:
    try:
        records = decode_answer(body, max_envelopes=MAX)
    except ProtocolError:
        return
    assert 0 <= len(records) <= MAX
