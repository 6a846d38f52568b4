"""The envelope: wire form, strict parsing, signing bytes, validation and bounds."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.address import Address
from gateway.core.envelope import (
    ENVELOPE_ID_RE,
    GROUP_NAME_RE,
    MAX_CIPHERTEXT_B64_CHARS,
    MAX_CIPHERTEXT_BYTES,
    MAX_CLOCK_SKEW_MS,
    MAX_ENCODED_ENVELOPE_BYTES,
    MAX_ENVELOPE_TTL_MS,
    MAX_TIME_MS,
    SIGNING_DOMAIN,
    Envelope,
    b64url_decode_canonical,
    b64url_encode,
    check_envelope,
    decode_envelope,
    encode_envelope,
    new_envelope_id,
    signing_bytes,
    validate_envelope,
)
from gateway.errors import EnvelopeError, Reason

ALICE = Address.parse("alice@acme.example")
BOB = Address.parse("bob@globex.example")
T0 = 1_700_000_000_000  # 2023-11-14, in milliseconds
DAY_MS = 86_400_000


def make_envelope(**changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "version": 1,
        "id": b64url_encode(bytes(range(16))),
        "sender": ALICE,
        "recipient": BOB,
        "created": T0,
        "expires": T0 + DAY_MS,
        "burn_on_read": False,
        "ciphertext": bytes(range(200)),
        "signature": bytes(range(64)),
    }
    fields.update(changes)
    return Envelope(**fields)


def good_json(**changes: object) -> dict[str, object]:
    obj = make_envelope().to_json()
    obj.update(changes)
    return obj


def reason_of_json(obj: object) -> Reason:
    with pytest.raises(EnvelopeError) as info:
        Envelope.from_json(obj)
    return info.value.reason


def reason_of_bytes(data: bytes) -> Reason:
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(data)
    return info.value.reason


# -- wire form -------------------------------------------------------------------


def test_to_json_names_and_encodes_every_field() -> None:
    env = make_envelope(group="engineering", burn_on_read=True)
    assert env.to_json() == {
        "v": 1,
        "id": "AAECAwQFBgcICQoLDA0ODw",
        "from": "alice@acme.example",
        "to": "bob@globex.example",
        "created": T0,
        "expires": T0 + DAY_MS,
        "burn_on_read": True,
        "group": "engineering",
        "ciphertext": b64url_encode(bytes(range(200))),
        "signature": b64url_encode(bytes(range(64))),
    }


def test_group_is_omitted_when_absent() -> None:
    assert "group" not in make_envelope().to_json()


def test_encoding_is_compact_sorted_ascii_json() -> None:
    data = encode_envelope(make_envelope(group="eng"))
    assert data == json.dumps(
        json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")
    assert b" " not in data
    assert list(json.loads(data)) == sorted(json.loads(data))


def test_round_trip() -> None:
    for env in (make_envelope(), make_envelope(group="legal", burn_on_read=True)):
        assert decode_envelope(encode_envelope(env)) == env
        assert Envelope.from_json(env.to_json()) == env


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode_envelope(make_envelope())
    assert decode_envelope(bytearray(data)) == make_envelope()
    assert decode_envelope(memoryview(data)) == make_envelope()


def test_decode_accepts_whitespace_and_any_key_order() -> None:
    obj = make_envelope().to_json()
    data = json.dumps(dict(reversed(list(obj.items()))), indent=4).encode()
    assert decode_envelope(data) == make_envelope()


def test_repr_leaves_out_ciphertext_and_signature() -> None:
    text = repr(make_envelope(ciphertext=b"\xab" * 50))
    assert "ciphertext" not in text
    assert "signature" not in text
    assert "alice" in text


def test_size_and_ttl() -> None:
    env = make_envelope()
    assert env.size == 200
    assert env.ttl_ms == DAY_MS


# -- hypothesis: round trips and garbage ------------------------------------------------

_addresses = st.builds(
    Address.of,
    st.from_regex(r"[a-z0-9](?:[a-z0-9._-]{0,10}[a-z0-9])?", fullmatch=True).filter(
        lambda user: ".." not in user
    ),
    st.from_regex(r"[a-z0-9]{1,10}\.[a-z]{2,6}", fullmatch=True),
)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    created = draw(st.integers(min_value=0, max_value=MAX_TIME_MS - 1))
    ttl = draw(st.integers(min_value=1, max_value=MAX_ENVELOPE_TTL_MS))
    return Envelope(
        version=1,
        id=b64url_encode(draw(st.binary(min_size=16, max_size=16))),
        sender=draw(_addresses),
        recipient=draw(_addresses),
        created=created,
        expires=min(created + ttl, MAX_TIME_MS),
        burn_on_read=draw(st.booleans()),
        ciphertext=draw(st.binary(min_size=1, max_size=600)),
        signature=draw(st.binary(min_size=64, max_size=64)),
        group=draw(st.none() | st.from_regex(GROUP_NAME_RE, fullmatch=True)),
    )


@given(envelopes())
def test_hypothesis_round_trip(env: Envelope) -> None:
    data = encode_envelope(env)
    assert len(data) <= MAX_ENCODED_ENVELOPE_BYTES
    decoded = decode_envelope(data)
    assert decoded == env
    # One envelope, one wire form: re-encoding gives the very same bytes.
    assert encode_envelope(decoded) == data
    assert signing_bytes(decoded) == signing_bytes(env)


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_envelope_error(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except EnvelopeError:
        return
    check_envelope(env)


@given(envelopes(), st.data())
def test_truncated_envelopes_raise_only_envelope_error(env: Envelope, data: st.DataObject) -> None:
    encoded = encode_envelope(env)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(EnvelopeError):
        decode_envelope(encoded[:cut])


def test_every_prefix_of_an_envelope_raises_envelope_error() -> None:
    encoded = encode_envelope(make_envelope(group="eng"))
    for cut in range(len(encoded)):
        with pytest.raises(EnvelopeError):
            decode_envelope(encoded[:cut])


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@given(_json_values)
def test_random_json_values_raise_only_envelope_error(value: object) -> None:
    with pytest.raises(EnvelopeError):
        Envelope.from_json(value)


@given(
    st.dictionaries(
        st.sampled_from(["v", "id", "from", "to", "created", "expires", "burn_on_read"])
        | st.sampled_from(["group", "ciphertext", "signature"]),
        _json_values,
    )
)
def test_right_keys_with_random_values_raise_only_envelope_error(obj: dict[str, object]) -> None:
    try:
        env = Envelope.from_json(obj)
    except EnvelopeError:
        return
    check_envelope(env)


@given(st.sampled_from(sorted(good_json(group="eng"))), _json_values)
def test_one_field_replaced_by_garbage_raises_only_envelope_error(key: str, value: object) -> None:
    obj = good_json(group="eng")
    obj[key] = value
    try:
        env = Envelope.from_json(obj)
    except EnvelopeError:
        return
    check_envelope(env)


# -- strict parsing: each way to be wrong, its reason ------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"v": 3}, Reason.ENVELOPE_BAD_VERSION),
        ({"v": 0}, Reason.ENVELOPE_BAD_VERSION),
        ({"v": True}, Reason.ENVELOPE_MALFORMED),  # a boolean is not the integer 1
        ({"v": 1.0}, Reason.ENVELOPE_MALFORMED),
        ({"v": "1"}, Reason.ENVELOPE_MALFORMED),
        ({"id": "AAECAwQFBgcICQoLDA0OD"}, Reason.ENVELOPE_BAD_ID),  # 21 characters
        ({"id": "AAECAwQFBgcICQoLDA0ODwA"}, Reason.ENVELOPE_BAD_ID),  # 23 characters
        ({"id": "AAECAwQFBgcICQoLDA0ODx"}, Reason.ENVELOPE_BAD_ID),  # unused bits set
        ({"id": "AAECAwQFBgcICQoLDA0OD+"}, Reason.ENVELOPE_BAD_ID),
        ({"id": "AAECAwQFBgcICQoLDA0ODw=="}, Reason.ENVELOPE_BAD_ID),
        ({"id": ""}, Reason.ENVELOPE_BAD_ID),
        ({"id": 7}, Reason.ENVELOPE_MALFORMED),
        ({"from": "alice"}, Reason.ENVELOPE_BAD_FROM),
        ({"from": "al ice@acme.example"}, Reason.ENVELOPE_BAD_FROM),
        ({"from": "alice@acme"}, Reason.ENVELOPE_BAD_FROM),
        ({"from": "Alice@acme.example"}, Reason.ENVELOPE_BAD_FROM),  # not in normal form
        ({"from": "alice@acme.example."}, Reason.ENVELOPE_BAD_FROM),
        ({"from": None}, Reason.ENVELOPE_MALFORMED),
        ({"to": "bob@"}, Reason.ENVELOPE_BAD_TO),
        ({"to": "bob@GLOBEX.example"}, Reason.ENVELOPE_BAD_TO),
        ({"to": ["bob@globex.example"]}, Reason.ENVELOPE_MALFORMED),
        ({"created": True}, Reason.ENVELOPE_MALFORMED),
        ({"created": float(T0)}, Reason.ENVELOPE_MALFORMED),
        ({"created": str(T0)}, Reason.ENVELOPE_MALFORMED),
        ({"created": -1}, Reason.ENVELOPE_BAD_TIME),
        ({"expires": T0}, Reason.ENVELOPE_BAD_TIME),  # expires == created
        ({"expires": T0 - 1}, Reason.ENVELOPE_BAD_TIME),
        ({"expires": MAX_TIME_MS + 1}, Reason.ENVELOPE_BAD_TIME),
        ({"expires": T0 + MAX_ENVELOPE_TTL_MS + 1}, Reason.ENVELOPE_BAD_TIME),
        ({"burn_on_read": 0}, Reason.ENVELOPE_MALFORMED),
        ({"burn_on_read": "false"}, Reason.ENVELOPE_MALFORMED),
        ({"group": None}, Reason.ENVELOPE_MALFORMED),  # omit it instead
        ({"group": ""}, Reason.ENVELOPE_BAD_GROUP),
        ({"group": "Engineering"}, Reason.ENVELOPE_BAD_GROUP),
        ({"group": "-eng"}, Reason.ENVELOPE_BAD_GROUP),
        ({"group": "e" * 65}, Reason.ENVELOPE_BAD_GROUP),
        ({"group": "eng\n"}, Reason.ENVELOPE_BAD_GROUP),
        ({"ciphertext": ""}, Reason.ENVELOPE_MALFORMED),
        ({"ciphertext": "AAE="}, Reason.ENVELOPE_MALFORMED),  # padded
        ({"ciphertext": "AAF"}, Reason.ENVELOPE_MALFORMED),  # unused bits set
        ({"ciphertext": "AA+/"}, Reason.ENVELOPE_MALFORMED),  # standard alphabet
        ({"ciphertext": "A"}, Reason.ENVELOPE_MALFORMED),
        ({"ciphertext": b"\x00"}, Reason.ENVELOPE_MALFORMED),
        ({"signature": b64url_encode(bytes(63))}, Reason.ENVELOPE_BAD_SIGNATURE),
        ({"signature": b64url_encode(bytes(65))}, Reason.ENVELOPE_BAD_SIGNATURE),
        ({"signature": "!" * 86}, Reason.ENVELOPE_BAD_SIGNATURE),
        ({"signature": 64}, Reason.ENVELOPE_MALFORMED),
        ({"extra": 1}, Reason.ENVELOPE_MALFORMED),
        ({"From": "alice@acme.example"}, Reason.ENVELOPE_MALFORMED),
    ],
)
def test_each_bad_field_has_its_reason(changes: dict[str, object], reason: Reason) -> None:
    assert reason_of_json(good_json(**changes)) is reason


@pytest.mark.parametrize(
    "missing", ["v", "id", "from", "to", "created", "expires", "burn_on_read", "ciphertext"]
)
def test_missing_field_is_malformed(missing: str) -> None:
    obj = good_json()
    del obj[missing]
    assert reason_of_json(obj) is Reason.ENVELOPE_MALFORMED


def test_missing_signature_is_malformed() -> None:
    obj = good_json()
    del obj["signature"]
    with pytest.raises(EnvelopeError, match="missing field") as info:
        Envelope.from_json(obj)
    assert info.value.reason is Reason.ENVELOPE_MALFORMED


def test_unknown_version_wins_over_unknown_fields() -> None:
    # A future version may add fields; the answer must be "version", not "malformed".
    assert reason_of_json({"v": 3, "shiny": True}) is Reason.ENVELOPE_BAD_VERSION


@pytest.mark.parametrize("value", [None, [], "envelope", 1, True])
def test_non_object_is_malformed(value: object) -> None:
    assert reason_of_json(value) is Reason.ENVELOPE_MALFORMED


def test_messages_name_the_field_and_stay_short() -> None:
    with pytest.raises(EnvelopeError, match="'created'"):
        Envelope.from_json(good_json(created=True))
    with pytest.raises(EnvelopeError, match="'from'"):
        Envelope.from_json(good_json(**{"from": "nobody"}))
    with pytest.raises(EnvelopeError) as info:
        Envelope.from_json(good_json(**{"x" * 10_000: 1}))
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[]",
        b"null",
        b'{"v":1',
        b"[" * 100_000,  # deep nesting: a RecursionError inside json, turned into ours
        b'{"v":NaN}',
        b'{"v":Infinity}',
        b'{"v":' + b"1" * 5000 + b"}",  # longer than Python converts to an int
        b'{"v":1,"v":1}',  # duplicate keys
        '{"v":1,"id":"\udc80"}'.encode("utf-8", "surrogatepass"),
        b'\xef\xbb\xbf{"v":1}',  # a byte-order mark is not JSON
    ],
)
def test_bad_bytes_are_malformed(data: bytes) -> None:
    assert reason_of_bytes(data) is Reason.ENVELOPE_MALFORMED


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope("{}")  # type: ignore[arg-type]


def test_escaped_lone_surrogate_is_an_envelope_error() -> None:
    # Valid JSON that decodes to a string no UTF-8 encoder accepts.
    data = encode_envelope(make_envelope()).replace(b'"from":"alice', b'"from":"\\udc80alice')
    assert b'"\\udc80alice' in data
    assert reason_of_bytes(data) is Reason.ENVELOPE_BAD_FROM


# -- size bounds ----------------------------------------------------------------------


def test_ciphertext_at_the_limit_is_accepted() -> None:
    env = make_envelope(ciphertext=bytes(MAX_CIPHERTEXT_BYTES))
    check_envelope(env)
    assert decode_envelope(encode_envelope(env)) == env


def test_ciphertext_over_the_limit_is_too_large() -> None:
    env = make_envelope(ciphertext=bytes(MAX_CIPHERTEXT_BYTES + 1))
    with pytest.raises(EnvelopeError) as info:
        check_envelope(env)
    assert info.value.reason is Reason.ENVELOPE_TOO_LARGE
    assert reason_of_json(env.to_json()) is Reason.ENVELOPE_TOO_LARGE


def test_size_is_checked_before_base64_is_decoded() -> None:
    # Not base64 at all, but too long: the answer is the size, found without decoding.
    huge = "!" * (MAX_CIPHERTEXT_B64_CHARS + 1)
    assert reason_of_json(good_json(ciphertext=huge)) is Reason.ENVELOPE_TOO_LARGE


def test_encoded_envelope_over_the_limit_is_too_large() -> None:
    data = b" " * (MAX_ENCODED_ENVELOPE_BYTES + 1)
    assert reason_of_bytes(data) is Reason.ENVELOPE_TOO_LARGE


def test_largest_envelope_fits_the_encoded_limit() -> None:
    longest = Address.parse("u" * 64 + "@" + ".".join(["a" * 63] * 3 + ["b" * 61]))
    env = make_envelope(
        sender=longest,
        recipient=longest,
        created=MAX_TIME_MS - MAX_ENVELOPE_TTL_MS,
        expires=MAX_TIME_MS,
        burn_on_read=True,
        group="g" * 64,
        ciphertext=bytes(MAX_CIPHERTEXT_BYTES),
    )
    data = encode_envelope(env)
    assert len(data) <= MAX_ENCODED_ENVELOPE_BYTES
    # A partner that pretty-prints its JSON still fits.
    pretty = json.dumps(env.to_json(), indent=2).encode()
    assert len(pretty) <= MAX_ENCODED_ENVELOPE_BYTES
    assert decode_envelope(pretty) == env


# -- checks on envelopes built in code ------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": 3}, Reason.ENVELOPE_BAD_VERSION),
        ({"version": True}, Reason.ENVELOPE_BAD_VERSION),
        ({"id": "short"}, Reason.ENVELOPE_BAD_ID),
        ({"sender": Address("Alice", "acme.example")}, Reason.ENVELOPE_BAD_FROM),
        ({"sender": Address("alice", "acme")}, Reason.ENVELOPE_BAD_FROM),
        ({"sender": "alice@acme.example"}, Reason.ENVELOPE_BAD_FROM),
        ({"recipient": Address("bob", "globex.example.")}, Reason.ENVELOPE_BAD_TO),
        ({"created": True}, Reason.ENVELOPE_BAD_TIME),
        ({"expires": T0}, Reason.ENVELOPE_BAD_TIME),
        ({"burn_on_read": 1}, Reason.ENVELOPE_MALFORMED),
        ({"group": "Bad Group"}, Reason.ENVELOPE_BAD_GROUP),
        ({"ciphertext": b""}, Reason.ENVELOPE_MALFORMED),
        ({"ciphertext": "text"}, Reason.ENVELOPE_MALFORMED),
        ({"signature": bytes(32)}, Reason.ENVELOPE_BAD_SIGNATURE),
    ],
)
def test_check_envelope_reasons(changes: dict[str, object], reason: Reason) -> None:
    with pytest.raises(EnvelopeError) as info:
        check_envelope(make_envelope(**changes))
    assert info.value.reason is reason


def test_validate_at_creation_and_until_expiry() -> None:
    env = make_envelope()
    validate_envelope(env, now_ms=T0)
    validate_envelope(env, now_ms=T0 + DAY_MS - 1)


def test_expired_at_and_after_expiry() -> None:
    env = make_envelope()
    for now in (T0 + DAY_MS, T0 + 2 * DAY_MS):
        with pytest.raises(EnvelopeError) as info:
            validate_envelope(env, now_ms=now)
        assert info.value.reason is Reason.EXPIRED


def test_clock_skew_bound() -> None:
    env = make_envelope()
    validate_envelope(env, now_ms=T0 - MAX_CLOCK_SKEW_MS)  # exactly at the bound: fine
    with pytest.raises(EnvelopeError) as info:
        validate_envelope(env, now_ms=T0 - MAX_CLOCK_SKEW_MS - 1)
    assert info.value.reason is Reason.ENVELOPE_BAD_TIME


def test_validate_runs_the_structural_checks_too() -> None:
    with pytest.raises(EnvelopeError) as info:
        validate_envelope(make_envelope(id="nope"), now_ms=T0)
    assert info.value.reason is Reason.ENVELOPE_BAD_ID


def test_with_group() -> None:
    env = make_envelope()
    grouped = env.with_group("engineering")
    assert grouped.group == "engineering"
    assert grouped.with_group(None) == env
    with pytest.raises(EnvelopeError) as info:
        env.with_group("not a group")
    assert info.value.reason is Reason.ENVELOPE_BAD_GROUP


# -- ids --------------------------------------------------------------------------------


def test_new_envelope_ids_are_valid_and_distinct() -> None:
    ids = {new_envelope_id() for _ in range(1000)}
    assert len(ids) == 1000
    for envelope_id in ids:
        assert ENVELOPE_ID_RE.fullmatch(envelope_id)
        assert len(b64url_decode_canonical(envelope_id)) == 16


@given(st.binary(min_size=16, max_size=16))
def test_id_regex_accepts_exactly_the_canonical_encodings(raw: bytes) -> None:
    assert ENVELOPE_ID_RE.fullmatch(b64url_encode(raw))


@given(st.from_regex(r"[A-Za-z0-9_-]{22}", fullmatch=True))
def test_id_regex_agrees_with_canonical_decoding(text: str) -> None:
    try:
        b64url_decode_canonical(text)
    except ValueError:
        canonical = False
    else:
        canonical = True
    assert bool(ENVELOPE_ID_RE.fullmatch(text)) is canonical


# -- signing bytes ----------------------------------------------------------------------------


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def test_signing_bytes_follow_the_specification() -> None:
    env = make_envelope(ciphertext=b"\x00\x01\x02", group="eng")
    expected = (
        b"gateway-envelope-v1\x00"
        + _field(b"1")
        + _field(b"AAECAwQFBgcICQoLDA0ODw")
        + _field(b"alice@acme.example")
        + _field(b"bob@globex.example")
        + _field(b"1700000000000")
        + _field(b"1700086400000")
        + _field(b"0")
        + _field(b"\x00\x01\x02")
    )
    assert signing_bytes(env) == expected
    assert expected.startswith(SIGNING_DOMAIN)
    # The test vector printed in docs/envelope.md.
    assert expected.hex() == (
        "676174657761792d656e76656c6f70652d7631000000000131000000164141454341775146"
        "4267634943516f4c4441304f447700000012616c6963654061636d652e6578616d706c6500"
        "000012626f6240676c6f6265782e6578616d706c650000000d31373030303030303030303030"
        "0000000d31373030303836343030303030000000013000000003000102"
    )


def test_signing_bytes_leave_out_group_and_signature() -> None:
    env = make_envelope()
    assert signing_bytes(env) == signing_bytes(env.with_group("eng"))
    assert signing_bytes(env) == signing_bytes(dataclasses.replace(env, signature=bytes(64)))


@pytest.mark.parametrize(
    "changes",
    [
        {"version": 2},
        {"id": new_envelope_id()},
        {"sender": Address.parse("alicia@acme.example")},
        {"recipient": Address.parse("bob@globex.example2")},
        {"created": T0 + 1},
        {"expires": T0 + DAY_MS + 1},
        {"burn_on_read": True},
        {"ciphertext": bytes(range(199))},
    ],
)
def test_every_signed_field_changes_the_signing_bytes(changes: dict[str, object]) -> None:
    assert signing_bytes(make_envelope(**changes)) != signing_bytes(make_envelope())


def test_length_prefixes_keep_field_boundaries() -> None:
    # Moving a character across the '@' changes the bytes even though the
    # concatenated text would be equal.
    one = make_envelope(sender=Address("alice", "acme.example"))
    two = make_envelope(sender=Address("alicea", "cme.example"))
    assert signing_bytes(one) != signing_bytes(two)
    three = make_envelope(ciphertext=b"\x00\x00\x00\x01")
    four = make_envelope(ciphertext=b"\x00\x00\x00\x01\x00")
    assert signing_bytes(three) != signing_bytes(four)
