"""The envelope's cheap paths give exactly what the plain definitions give.

A parsed envelope keeps its ciphertext as the wire text (decoded on first
use), canonical base64url is recognised without decoding, and the canonical
encoding is written directly. Each is checked here against the definition it
replaces: decode and re-encode, ``json.dumps(to_json(), sort_keys=True)``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import envelope as envelope_module
from gateway.core.address import Address
from gateway.core.envelope import (
    ADDRESS_CACHE_SIZE,
    GROUP_NAME_RE,
    MAX_CIPHERTEXT_BYTES,
    MAX_ENVELOPE_TTL_MS,
    MAX_TIME_MS,
    Envelope,
    b64url_decode_canonical,
    b64url_encode,
    check_envelope_clock,
    decode_envelope,
    encode_envelope,
    encode_validated,
    is_canonical_b64url,
    signing_bytes,
    validate_envelope,
)
from gateway.errors import EnvelopeError, Reason

T0 = 1_700_000_000_000
DAY_MS = 86_400_000
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def plain_json(env: Envelope) -> bytes:
    """The definition of the canonical encoding (docs/envelope.md)."""
    return json.dumps(env.to_json(), sort_keys=True, separators=(",", ":")).encode("ascii")


def reference_is_canonical(text: str) -> bool:
    """The definition: it decodes, and encoding the bytes gives the text back."""
    if any(ch not in ALPHABET for ch in text) or len(text) % 4 == 1:
        return False
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == text


# Unusual but valid: dots, dashes, underscores, digits, many labels, xn-- labels,
# the longest user name.
_users = st.one_of(
    st.from_regex(r"[a-z0-9](?:[a-z0-9._-]{0,20}[a-z0-9])?", fullmatch=True).filter(
        lambda user: ".." not in user
    ),
    st.just("a" * 64),
    st.just("0.0_-9"),
)
_orgs = st.one_of(
    st.from_regex(r"(?:[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?\.){1,4}[a-z]{2,6}", fullmatch=True),
    st.just("xn--bcher-kva.example"),
    st.just("a-1.b--2.c3.example"),
)
_addresses = st.builds(Address.of, _users, _orgs)


@st.composite
def envelopes(draw: st.DrawFn, *, max_ciphertext: int = 300) -> Envelope:
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
        ciphertext=draw(st.binary(min_size=1, max_size=max_ciphertext)),
        signature=draw(st.binary(min_size=64, max_size=64)),
        group=draw(st.none() | st.from_regex(GROUP_NAME_RE, fullmatch=True)),
    )


_groups = st.none() | st.from_regex(GROUP_NAME_RE, fullmatch=True)


def make(**changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "version": 1,
        "id": b64url_encode(bytes(range(16))),
        "sender": Address.parse("alice@acme.example"),
        "recipient": Address.parse("bob@globex.example"),
        "created": T0,
        "expires": T0 + DAY_MS,
        "burn_on_read": False,
        "ciphertext": bytes(range(200)),
        "signature": bytes(range(64)),
    }
    fields.update(changes)
    return Envelope(**fields)


# -- canonical base64url without decoding ---------------------------------------------


@settings(max_examples=500)
@given(st.text(alphabet=ALPHABET, max_size=13))
def test_canonical_check_agrees_with_decode_and_reencode(text: str) -> None:
    assert is_canonical_b64url(text) is reference_is_canonical(text)


@given(st.text(max_size=12))
def test_canonical_check_refuses_what_is_not_the_alphabet(text: str) -> None:
    assert is_canonical_b64url(text) is reference_is_canonical(text)


@pytest.mark.parametrize("text", ["AA==", "AAA=", "+/8", "ab/c", "é", "AB\x00", " AAA", "A"])
def test_padding_other_alphabets_and_stray_characters_are_refused(text: str) -> None:
    assert not is_canonical_b64url(text)
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode_canonical(text)


@given(st.binary(max_size=40))
def test_every_encoding_is_canonical_and_decodes_back(raw: bytes) -> None:
    text = b64url_encode(raw)
    assert is_canonical_b64url(text)
    assert b64url_decode_canonical(text) == raw


@pytest.mark.parametrize(
    ("tail", "good", "bad"), [(2, "AQgw", "BRhx"), (3, "AEIMQUYcgkosw048", "BF")]
)
def test_unused_trailing_bits_must_be_zero(tail: int, good: str, bad: str) -> None:
    for last in good:
        assert is_canonical_b64url("AAAA" + "A" * (tail - 1) + last)
    for last in bad:
        text = "AAAA" + "A" * (tail - 1) + last
        assert not is_canonical_b64url(text)
        with pytest.raises(EnvelopeError) as info:
            Envelope.from_json({**make().to_json(), "ciphertext": text})
        assert info.value.reason is Reason.ENVELOPE_MALFORMED


# -- the ciphertext kept as its wire text ----------------------------------------------


@given(envelopes())
def test_parsed_envelope_equals_the_built_one_and_reads_as_bytes(env: Envelope) -> None:
    parsed = decode_envelope(encode_envelope(env))
    assert parsed.size == len(env.ciphertext)  # from the text's length alone
    assert isinstance(parsed.ciphertext, bytes)
    assert parsed.ciphertext == env.ciphertext
    assert parsed == env
    assert hash(parsed) == hash(env)
    assert signing_bytes(parsed) == signing_bytes(env)


def test_size_of_the_largest_ciphertext_is_exact_without_decoding() -> None:
    for size in (1, 2, 3, MAX_CIPHERTEXT_BYTES - 1, MAX_CIPHERTEXT_BYTES):
        parsed = Envelope.from_json(make(ciphertext=b"\xff" * size).to_json())
        assert parsed.size == size
    assert parsed.ciphertext == b"\xff" * MAX_CIPHERTEXT_BYTES


def test_replace_on_a_parsed_envelope_never_keeps_a_stale_text() -> None:
    parsed = Envelope.from_json(make().to_json())
    other = dataclasses.replace(parsed, ciphertext=b"other bytes")
    assert other.ciphertext == b"other bytes"
    assert other.size == len(b"other bytes")
    assert other.to_json()["ciphertext"] == b64url_encode(b"other bytes")
    assert encode_envelope(other) == plain_json(make(ciphertext=b"other bytes"))
    # Replacing another field keeps the ciphertext's value.
    moved = dataclasses.replace(parsed, created=T0 + 1)
    assert moved.ciphertext == make().ciphertext
    assert encode_envelope(moved) == plain_json(make(created=T0 + 1))


def test_with_group_keeps_the_wire_text_and_checks_the_group() -> None:
    parsed = Envelope.from_json(make().to_json())
    grouped = parsed.with_group("engineering")
    assert grouped.group == "engineering"
    assert grouped.ciphertext == make().ciphertext
    assert encode_envelope(grouped) == plain_json(make(group="engineering"))
    with pytest.raises(EnvelopeError) as info:
        parsed.with_group("Not A Group")
    assert info.value.reason is Reason.ENVELOPE_BAD_GROUP


def test_ciphertext_cannot_be_assigned() -> None:
    parsed = Envelope.from_json(make().to_json())
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.ciphertext = b"x"  # type: ignore[misc]


# -- the canonical encoding, written directly ------------------------------------------


@settings(max_examples=300)
@given(envelopes())
def test_encode_envelope_is_the_plain_definition(env: Envelope) -> None:
    data = encode_envelope(env)
    assert data == plain_json(env)
    parsed = decode_envelope(data)
    assert encode_envelope(parsed) == data
    assert encode_envelope(parsed.with_group(None)) == plain_json(
        dataclasses.replace(env, group=None)
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"id": 'quote"and\\backslash'},
        {"sender": Address("Alice", "ACME.example")},
        {"version": 2},
        {"expires": T0},
        {"group": "Bad Group"},
        {"ciphertext": b""},
        {"signature": b"short"},
    ],
)
def test_broken_envelopes_are_still_encoded_as_json_escapes_them(changes: dict[str, Any]) -> None:
    env = make(**changes)
    assert encode_envelope(env) == plain_json(env)
    json.loads(encode_envelope(env))


@settings(max_examples=300)
@given(envelopes(), _groups, st.booleans())
def test_encode_validated_is_byte_identical(env: Envelope, group: str | None, spaced: bool) -> None:
    # What a client submits: any key order and spacing, parsed as the API parses it.
    text = json.dumps(env.to_json(), indent=1 if spaced else None)
    raw = json.loads(text)
    parsed = Envelope.from_json(raw)
    expected = encode_envelope(parsed.with_group(group))
    assert encode_validated(raw, group) == expected
    assert expected == plain_json(dataclasses.replace(env, group=group))
    assert raw == json.loads(text)  # raw itself is left as it was


def test_encode_validated_replaces_or_drops_the_submitted_group() -> None:
    raw = make(group="claimed").to_json()
    Envelope.from_json(raw)
    assert encode_validated(raw, None) == plain_json(make())
    assert encode_validated(raw, "engineering") == plain_json(make(group="engineering"))
    with pytest.raises(EnvelopeError):
        encode_validated(raw, "Bad Group")


def test_large_envelope_encodings_agree() -> None:
    env = make(ciphertext=bytes(range(256)) * 300, burn_on_read=True, group="g")
    raw = json.loads(plain_json(env))
    parsed = Envelope.from_json(raw)
    assert encode_envelope(parsed) == plain_json(env)
    assert encode_validated(raw, "g") == plain_json(env)


# -- clock checks alone, and remembered addresses -----------------------------------------


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (T0, None),
        (T0 + DAY_MS - 1, None),
        (T0 + DAY_MS, Reason.EXPIRED),
        (T0 - 5 * 60 * 1000, None),
        (T0 - 5 * 60 * 1000 - 1, Reason.ENVELOPE_BAD_TIME),
    ],
)
def test_clock_checks_alone_match_validate(now: int, reason: Reason | None) -> None:
    env = Envelope.from_json(make().to_json())
    outcomes = []
    for check in (check_envelope_clock, validate_envelope):
        try:
            check(env, now_ms=now)
        except EnvelopeError as exc:
            outcomes.append(exc.reason)
        else:
            outcomes.append(None)
    assert outcomes == [reason, reason]


def test_remembered_addresses_still_refuse_every_bad_one() -> None:
    good = make().to_json()
    for _ in range(3):  # the second and third parse come from the cache
        assert Envelope.from_json(good).sender == Address.parse("alice@acme.example")
    for bad, reason in (
        ("Alice@acme.example", Reason.ENVELOPE_BAD_FROM),  # valid, not in normal form
        ("alice@acme", Reason.ENVELOPE_BAD_FROM),
        ("alice..x@acme.example", Reason.ENVELOPE_BAD_FROM),
    ):
        for _ in range(2):
            with pytest.raises(EnvelopeError) as info:
                Envelope.from_json({**good, "from": bad})
            assert info.value.reason is reason
    with pytest.raises(EnvelopeError) as info:
        validate_envelope(make(sender=Address("Alice", "acme.example")), now_ms=T0)
    assert info.value.reason is Reason.ENVELOPE_BAD_FROM


def test_address_cache_is_bounded() -> None:
    for n in range(ADDRESS_CACHE_SIZE + 10):
        Envelope.from_json({**make().to_json(), "to": f"user{n}@globex.example"})
    assert envelope_module._cached_parse.cache_info().currsize <= ADDRESS_CACHE_SIZE
