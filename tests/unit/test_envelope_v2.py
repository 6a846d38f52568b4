"""Envelope version 2: one content key, wrapped for the recipient and the retention key.

The test vector of docs/envelope.md §8.6 is checked here from the
specification's own steps (pynacl's primitives called directly), so the module
and the document cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_box_seal_open,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.signing import SigningKey, VerifyKey

from gateway.core.address import Address
from gateway.core.envelope import (
    RETENTION_WRAP_BYTES,
    WRAPPED_KEY_BYTES,
    Envelope,
    RetentionWrap,
    b64url_decode_canonical,
    b64url_encode,
    check_envelope,
    decode_envelope,
    encode_envelope,
    signing_bytes,
)
from gateway.crypto.envelope_crypto import (
    generate_retention_key,
    open_envelope,
    open_retained,
    open_retention_wrap,
    recipient_retention_wrap,
    retention_public_key,
    retention_wrap,
    seal,
    seal_v2,
)
from gateway.crypto.keys import UserKeys
from gateway.errors import EnvelopeError, EnvelopeOpenError, Reason, RetentionWrapMismatch
from gateway.federation.protocol import canonical_envelope_bytes

ALICE = UserKeys(Address.parse("alice@acme.example"), bytes(range(0x80, 0xA0)), bytes(range(32)))
BOB = UserKeys(
    Address.parse("bob@globex.example"), bytes(range(0x20, 0x40)), bytes(range(0xA0, 0xC0))
)
MALLORY = UserKeys.generate(Address.parse("mallory@acme.example"))
RETENTION_SECRET = bytes(range(0x40, 0x60))
RETENTION_KEY = retention_public_key(RETENTION_SECRET)
CONTENT_KEY = bytes(range(0x60, 0x80))
VECTOR_ID = "AAECAwQFBgcICQoLDA0ODw"
VECTOR_PAYLOAD = b"hello, retained world"
T0 = 1_700_000_000_000
DAY_MS = 86_400_000

# docs/envelope.md §8.6, the wire form exactly as written there.
VECTOR_WIRE = (
    b'{"burn_on_read":false,"ciphertext":"lYti9_XXfu4LJCRsSTKNe7KHHRQgDA7b2s2ZJ-BkTnO6pHP4mf_'
    b"VzzIrB7AwFerOpR4nAhZ3BPxvKw967HtmhmN3flPg_8cWV2M4aLGja75CBLonRnxd896C-keftpF7goBr1d5u3"
    b"bf0OQPy-umIsksMoAwUnd8HmWc8WPDZY1Z6YN2htSo5FYf-TB8yG1XYpy0CHsQQeSHfUN3g7ABoRwXHcjoU7w43"
    b"aYeivJxig8Dh3wZAtCWf25qWSS17G87aQMyxfMKPmeXdhwVIOKkTIUZpla2CZNcLJVR-GIdCjvj6j2HXdyh32u-"
    b'Z4Eu3wsVwkaPULlXlj53W95H7LHnTyedSVCVUhK6x228rkxO0s34","created":1700000000000,'
    b'"expires":1700086400000,"from":"alice@acme.example","id":"AAECAwQFBgcICQoLDA0ODw",'
    b'"retention_key":"eaYx7t4b-cmPEgMs3q3Q56B5OY_HhriMyEbsia-FpRo","retention_key_id":"acme-2026",'
    b'"retention_wrap":"swaMfRC4b1Q0AL61xw5SrwGXppa7qWkOYnVyDuN_jHPMvbjxdDEEeI9ifg4fTGDkuvOlWOtyKRw'
    b'EXVg3nlJS9VE6RmAXBsDbrSZIKtbRvFQ","signature":"mi53X6srIB9TEzEW65OLrIb7DsmplMcT-LM8NMM8ov1'
    b'aPFhQsq-V0UAOX6S4BRvFBvcLgCQ6FD85-n2owaedDQ","to":"bob@globex.example","v":2,"wrapped_key":'
    b'"rXowS0nfTw4qXe9Tnx_8gZ9oCSOg0fxLEgOyD1ZrZFlsv0lzRzjdJPWAb-vQtfAfqkE6_9ZA4pYMenTFZdyZqnAgf'
    b'nVxobW0fDCsKEsPPb8"}'
)
VECTOR_RETENTION_KEY = "79a631eede1bf9c98f12032cdeadd0e7a079398fc786b88cc846ec89af85a51a"
VECTOR_WRAP = (
    "b3068c7d10b86f543400beb5c70e52af0197a696bba9690e6275720ee37f8c73"
    "ccbdb8f1743104788f627e0e1f4c60e4baf3a558eb72291c045d58379e5252f5513a46601706c0dbad26482ad6d1bc54"
)
VECTOR_SIGNING_BYTES_SHA256 = "0da7be7e337acbabf7fa7e7efbfa8b6c43c907619502a7c2953e4a32c40d0027"
VECTOR_SIGNATURE = (
    "9a2e775fab2b201f53133116eb938bac86fb0ec9a994c713f8b33c34c33ca2fd"
    "5a3c5850b2af95d1400e5fa4b8051bc506f70b80243a143f39fa7da8c1a79d0d"
)


def lv(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(field)) + field for field in fields)


def b2(data: bytes, key: bytes = b"") -> bytes:
    return blake2b(data, digest_size=32, key=key, encoder=RawEncoder)


def seal_to_bob(payload: bytes = b"secret", **options: Any) -> Envelope:
    options.setdefault("retention_key_id", "acme-2026")
    options.setdefault("retention_public_key", RETENTION_KEY)
    return seal_v2(
        payload,
        sender=ALICE,
        recipient=BOB.public(),
        created_ms=T0,
        expires_ms=T0 + DAY_MS,
        **options,
    )


def open_as_bob(env: Envelope) -> bytes:
    return open_envelope(env, recipient=BOB, sender_verify_key=ALICE.public().verify_key)


def resigned(env: Envelope, **changes: Any) -> Envelope:
    """``env`` changed and signed again by its sender: a cheating sender's envelope."""
    changed = dataclasses.replace(env, **changes)
    signature = SigningKey(ALICE.signing_seed).sign(signing_bytes(changed)).signature
    return dataclasses.replace(changed, signature=signature)


# -- the test vector ---------------------------------------------------------------


def test_vector_decodes_and_reencodes_to_the_same_bytes() -> None:
    env = decode_envelope(VECTOR_WIRE)
    assert env.version == 2
    assert encode_envelope(env) == VECTOR_WIRE
    assert canonical_envelope_bytes(json.loads(VECTOR_WIRE)) == VECTOR_WIRE
    assert env.retention is not None
    assert env.retention.key_id == "acme-2026"
    assert env.retention.public_key.hex() == VECTOR_RETENTION_KEY == RETENTION_KEY.hex()


def test_vector_ciphertext_follows_the_specification() -> None:
    env = decode_envelope(VECTOR_WIRE)
    sender = b"alice@acme.example"
    frame = lv(sender, VECTOR_PAYLOAD)
    inner = frame + bytes(256 - len(frame))
    expected = crypto_aead_xchacha20poly1305_ietf_encrypt(
        inner, VECTOR_ID.encode(), bytes(24), CONTENT_KEY
    )
    assert env.ciphertext == expected
    assert len(env.ciphertext) == 256 + 16


def test_vector_retention_wrap_follows_the_specification() -> None:
    aad = lv(VECTOR_ID.encode(), b"acme-2026")
    ephemeral = b2(b"gateway-retention-v2-ephemeral\x00" + aad + lv(RETENTION_KEY), key=CONTENT_KEY)
    ephemeral_public = crypto_scalarmult_base(ephemeral)
    shared = crypto_scalarmult(ephemeral, RETENTION_KEY)
    wrap_key = b2(b"gateway-retention-v2-wrap-key\x00" + shared + ephemeral_public + RETENTION_KEY)
    wrap = ephemeral_public + crypto_aead_xchacha20poly1305_ietf_encrypt(
        CONTENT_KEY, aad, bytes(24), wrap_key
    )
    assert wrap.hex() == VECTOR_WRAP
    env = decode_envelope(VECTOR_WIRE)
    assert env.retention is not None
    assert env.retention.wrap == wrap
    assert (
        retention_wrap(
            CONTENT_KEY, envelope_id=VECTOR_ID, key_id="acme-2026", public_key=RETENTION_KEY
        ).hex()
        == VECTOR_WRAP
    )


def test_vector_signing_bytes_and_signature() -> None:
    env = decode_envelope(VECTOR_WIRE)
    assert env.retention is not None
    assert env.wrapped_key is not None
    expected = b"gateway-envelope-v2\x00" + lv(
        b"2",
        VECTOR_ID.encode(),
        b"alice@acme.example",
        b"bob@globex.example",
        b"1700000000000",
        b"1700086400000",
        b"0",
        env.ciphertext,
        env.wrapped_key,
        b"acme-2026",
        env.retention.public_key,
        env.retention.wrap,
    )
    assert signing_bytes(env) == expected
    assert hashlib.sha256(expected).hexdigest() == VECTOR_SIGNING_BYTES_SHA256
    assert env.signature.hex() == VECTOR_SIGNATURE
    VerifyKey(ALICE.public().verify_key).verify(expected, env.signature)


def test_vector_opens_for_the_recipient_and_the_retention_key() -> None:
    env = decode_envelope(VECTOR_WIRE)
    assert env.wrapped_key is not None
    assert (
        crypto_box_seal_open(env.wrapped_key, BOB.public().encryption_key, BOB.encryption_secret)
        == CONTENT_KEY
    )
    assert open_as_bob(env) == VECTOR_PAYLOAD
    assert open_retained(env, retention_secret=RETENTION_SECRET) == VECTOR_PAYLOAD


def test_sealing_the_vector_again_gives_its_deterministic_parts() -> None:
    env = seal_to_bob(VECTOR_PAYLOAD, envelope_id=VECTOR_ID, content_key=CONTENT_KEY)
    vector = decode_envelope(VECTOR_WIRE)
    assert env.ciphertext == vector.ciphertext
    assert env.retention == vector.retention
    assert env.wrapped_key != vector.wrapped_key  # a sealed box is randomized


# -- round trips ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=3000),
    retained=st.booleans(),
    burn=st.booleans(),
    group=st.none() | st.sampled_from(["engineering", "legal"]),
)
def test_hypothesis_seal_encode_decode_open(
    payload: bytes, retained: bool, burn: bool, group: str | None
) -> None:
    options: dict[str, Any] = {"burn_on_read": burn}
    if not retained:
        options.update(retention_key_id=None, retention_public_key=None)
    env = seal_to_bob(payload, **options).with_group(group)
    data = encode_envelope(env)
    assert data == json.dumps(env.to_json(), sort_keys=True, separators=(",", ":")).encode()
    decoded = decode_envelope(data)
    assert decoded == env
    assert encode_envelope(decoded) == data
    assert canonical_envelope_bytes(json.loads(data)) == data
    assert open_as_bob(decoded) == payload
    if retained:
        assert open_retained(decoded, retention_secret=RETENTION_SECRET) == payload
    else:
        assert decoded.retention is None
        with pytest.raises(EnvelopeOpenError):
            open_retained(decoded, retention_secret=RETENTION_SECRET)


def test_padding_is_as_in_version_1() -> None:
    for payload in (b"", b"x" * 150, b"y" * 1000):
        v1 = seal(payload, sender=ALICE, recipient=BOB.public(), created_ms=T0, expires_ms=T0 + 1)
        v2 = seal_to_bob(payload)
        assert len(v2.ciphertext) == len(v1.ciphertext) - 48 + 16


def test_fresh_content_keys_and_ids() -> None:
    first, second = seal_to_bob(b"same"), seal_to_bob(b"same")
    assert first.id != second.id
    assert first.ciphertext != second.ciphertext
    assert first.retention is not None
    assert second.retention is not None
    assert first.retention.wrap != second.retention.wrap


def test_version_1_still_opens() -> None:
    env = seal(b"old", sender=ALICE, recipient=BOB.public(), created_ms=T0, expires_ms=T0 + 1)
    assert decode_envelope(encode_envelope(env)) == env
    assert open_as_bob(env) == b"old"


# -- honest retention, checked by the recipient -------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        bytes(RETENTION_WRAP_BYTES),
        bytes(range(RETENTION_WRAP_BYTES)),
    ],
)
def test_a_cheating_sender_is_caught_by_the_recipient(wrap: bytes) -> None:
    env = seal_to_bob(b"the truth")
    assert env.retention is not None
    cheat = resigned(env, retention=dataclasses.replace(env.retention, wrap=wrap))
    with pytest.raises(RetentionWrapMismatch) as info:
        open_as_bob(cheat)
    assert info.value.reason is Reason.RETENTION_WRAP_MISMATCH
    assert "retained" in str(info.value)


def test_a_wrap_for_another_message_is_caught() -> None:
    env, other = seal_to_bob(b"the truth"), seal_to_bob(b"something else")
    assert other.retention is not None
    cheat = resigned(env, retention=other.retention)
    with pytest.raises(RetentionWrapMismatch):
        open_as_bob(cheat)


def test_a_wrap_for_another_key_than_it_names_is_caught() -> None:
    _, other_key = generate_retention_key()
    env = seal_to_bob(b"the truth")
    assert env.retention is not None
    # The wrap is honest for RETENTION_KEY, but the envelope names other_key.
    cheat = resigned(env, retention=dataclasses.replace(env.retention, public_key=other_key))
    with pytest.raises(RetentionWrapMismatch):
        open_as_bob(cheat)


def test_a_mismatch_is_reported_only_after_the_signature() -> None:
    env = seal_to_bob(b"the truth")
    assert env.retention is not None
    unsigned = dataclasses.replace(
        env, retention=dataclasses.replace(env.retention, wrap=bytes(RETENTION_WRAP_BYTES))
    )
    with pytest.raises(EnvelopeOpenError) as info:
        open_as_bob(unsigned)
    assert type(info.value) is EnvelopeOpenError


def _byte_flips(data: bytes, step: int = 1) -> list[bytes]:
    flips = []
    for index in range(0, len(data), step):
        for bit in range(8):
            changed = bytearray(data)
            changed[index] ^= 1 << bit
            flips.append(bytes(changed))
    return flips


def _assert_plain_open_failure(env: Envelope) -> None:
    with pytest.raises(EnvelopeOpenError) as info:
        open_as_bob(env)
    assert type(info.value) is EnvelopeOpenError
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert str(info.value) == "envelope could not be opened"


def test_every_bit_flip_of_a_wrapped_key_fails_the_same_way() -> None:
    env = seal_to_bob()
    assert env.wrapped_key is not None
    assert env.retention is not None
    for wrapped in _byte_flips(env.wrapped_key):
        _assert_plain_open_failure(dataclasses.replace(env, wrapped_key=wrapped))
    for wrap in _byte_flips(env.retention.wrap, step=7):
        changed = dataclasses.replace(env.retention, wrap=wrap)
        _assert_plain_open_failure(dataclasses.replace(env, retention=changed))
    _assert_plain_open_failure(dataclasses.replace(env, retention=None))
    _assert_plain_open_failure(
        dataclasses.replace(env, retention=dataclasses.replace(env.retention, key_id="acme-2027"))
    )


def test_every_bit_flip_of_the_ciphertext_fails_the_same_way() -> None:
    env = seal_to_bob(b"")
    for ciphertext in _byte_flips(env.ciphertext, step=5):
        _assert_plain_open_failure(dataclasses.replace(env, ciphertext=ciphertext))


def test_a_resigned_content_of_another_sender_fails() -> None:
    # Mallory re-signs Alice's v2 envelope as her own: the sender inside says alice.
    env = seal_to_bob(b"alice's words")
    stolen = dataclasses.replace(env, sender=MALLORY.address)
    stolen = dataclasses.replace(
        stolen, signature=SigningKey(MALLORY.signing_seed).sign(signing_bytes(stolen)).signature
    )
    with pytest.raises(EnvelopeOpenError) as info:
        open_envelope(stolen, recipient=BOB, sender_verify_key=MALLORY.public().verify_key)
    assert type(info.value) is EnvelopeOpenError


def test_the_wrong_recipient_fails() -> None:
    env = seal_to_bob()
    with pytest.raises(EnvelopeOpenError):
        open_envelope(env, recipient=MALLORY, sender_verify_key=ALICE.public().verify_key)


# -- the retention key's side -------------------------------------------------------


def test_another_retention_secret_does_not_open() -> None:
    other_secret, _ = generate_retention_key()
    env = seal_to_bob()
    with pytest.raises(EnvelopeOpenError):
        open_retained(env, retention_secret=other_secret)
    with pytest.raises(EnvelopeOpenError):
        open_retained(env, retention_secret=b"short")


def test_a_dishonest_wrap_does_not_open_for_the_officer_either() -> None:
    env = seal_to_bob()
    assert env.retention is not None
    key = open_retention_wrap(env.retention, envelope_id=env.id, secret=RETENTION_SECRET)
    # The wrap of another id (a copy moved to this envelope) fails its AEAD.
    with pytest.raises(EnvelopeOpenError):
        open_retention_wrap(env.retention, envelope_id=VECTOR_ID, secret=RETENTION_SECRET)
    assert len(key) == 32


def test_seal_needs_both_retention_parts() -> None:
    with pytest.raises(ValueError, match="both"):
        seal_to_bob(retention_public_key=None)


# -- strict wire form ----------------------------------------------------------------


def v2_json(**changes: object) -> dict[str, object]:
    obj = json.loads(VECTOR_WIRE)
    obj.update(changes)
    return {key: value for key, value in obj.items() if value is not None}


def reason_of(obj: object) -> Reason:
    with pytest.raises(EnvelopeError) as info:
        Envelope.from_json(obj)
    return info.value.reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"v": 3}, Reason.ENVELOPE_BAD_VERSION),
        ({"wrapped_key": None}, Reason.ENVELOPE_MALFORMED),
        ({"wrapped_key": "AAAA"}, Reason.ENVELOPE_MALFORMED),
        ({"wrapped_key": "AAA="}, Reason.ENVELOPE_MALFORMED),
        ({"wrapped_key": 5}, Reason.ENVELOPE_MALFORMED),
        ({"retention_wrap": None}, Reason.ENVELOPE_BAD_RETENTION),
        ({"retention_key": None, "retention_wrap": None}, Reason.ENVELOPE_BAD_RETENTION),
        ({"retention_key_id": ""}, Reason.ENVELOPE_BAD_RETENTION),
        ({"retention_key_id": "-lead"}, Reason.ENVELOPE_BAD_RETENTION),
        ({"retention_key_id": "x" * 65}, Reason.ENVELOPE_BAD_RETENTION),
        ({"retention_key_id": 7}, Reason.ENVELOPE_MALFORMED),
        ({"retention_key": "AAAA"}, Reason.ENVELOPE_BAD_RETENTION),
        ({"retention_wrap": b64url_encode(bytes(79))}, Reason.ENVELOPE_BAD_RETENTION),
        ({"retention_wrap": "not base64!"}, Reason.ENVELOPE_BAD_RETENTION),
        ({"shiny": True}, Reason.ENVELOPE_MALFORMED),
    ],
)
def test_strict_v2_fields(changes: dict[str, object], reason: Reason) -> None:
    assert reason_of(v2_json(**changes)) is reason


def test_version_1_refuses_version_2_fields_and_back() -> None:
    v1 = seal(b"x", sender=ALICE, recipient=BOB.public(), created_ms=T0, expires_ms=T0 + 1)
    obj = v1.to_json()
    assert reason_of({**obj, "wrapped_key": b64url_encode(bytes(80))}) is Reason.ENVELOPE_MALFORMED
    assert reason_of({**obj, "v": 2}) is Reason.ENVELOPE_MALFORMED  # no wrapped_key
    with pytest.raises(EnvelopeError):
        check_envelope(dataclasses.replace(v1, wrapped_key=bytes(WRAPPED_KEY_BYTES)))
    v2 = decode_envelope(VECTOR_WIRE)
    with pytest.raises(EnvelopeError):
        check_envelope(dataclasses.replace(v2, wrapped_key=None))
    with pytest.raises(EnvelopeError) as info:
        check_envelope(
            dataclasses.replace(v2, retention=RetentionWrap("acme-2026", bytes(31), bytes(80)))
        )
    assert info.value.reason is Reason.ENVELOPE_BAD_RETENTION


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@given(st.sampled_from(sorted(json.loads(VECTOR_WIRE))), _json_values)
def test_one_v2_field_replaced_by_garbage_raises_only_envelope_error(
    key: str, value: object
) -> None:
    obj = json.loads(VECTOR_WIRE)
    obj[key] = value
    try:
        env = Envelope.from_json(obj)
    except EnvelopeError:
        return
    check_envelope(env)
    assert encode_envelope(env) == canonical_envelope_bytes(obj)


@settings(max_examples=200)
@given(st.data())
def test_truncated_v2_wire_forms_raise_only_envelope_error(data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(VECTOR_WIRE) - 1))
    with pytest.raises(EnvelopeError):
        decode_envelope(VECTOR_WIRE[:cut])


def test_every_bit_flip_of_the_v2_wire_form_is_caught() -> None:
    for data in _byte_flips(VECTOR_WIRE, step=3):
        try:
            decoded = decode_envelope(data)
        except EnvelopeError:
            continue
        if decoded.group is not None or decoded == decode_envelope(VECTOR_WIRE):
            continue
        with pytest.raises(EnvelopeOpenError):
            open_as_bob(decoded)


def test_retention_key_fixture_matches_the_vector() -> None:
    assert b64url_decode_canonical("eaYx7t4b-cmPEgMs3q3Q56B5OY_HhriMyEbsia-FpRo") == RETENTION_KEY


def test_a_recipient_wraps_the_content_key_for_its_own_org() -> None:
    globex_secret, globex_key = generate_retention_key()
    env = seal_to_bob(b"read at globex")
    wrap = recipient_retention_wrap(env, recipient=BOB, key_id="globex-1", public_key=globex_key)
    assert wrap == retention_wrap(
        open_retention_wrap(env.retention, envelope_id=env.id, secret=RETENTION_SECRET)
        if env.retention is not None
        else b"",
        envelope_id=env.id,
        key_id="globex-1",
        public_key=globex_key,
    )
    copy = RetentionWrap("globex-1", globex_key, wrap)
    assert open_retained(env, retention_secret=globex_secret, wrap=copy) == b"read at globex"
    with pytest.raises(EnvelopeOpenError):
        recipient_retention_wrap(env, recipient=MALLORY, key_id="g", public_key=globex_key)
    v1 = seal(b"x", sender=ALICE, recipient=BOB.public(), created_ms=T0, expires_ms=T0 + 1)
    with pytest.raises(EnvelopeOpenError):
        recipient_retention_wrap(v1, recipient=BOB, key_id="g", public_key=globex_key)
