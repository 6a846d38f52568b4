"""Addresses, durations and the text forms of keys: the small parsers of the core."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.address import (
    MAX_ADDRESS_LENGTH,
    MAX_DOMAIN_LENGTH,
    MAX_USER_LENGTH,
    Address,
    is_valid_domain,
    normalize_domain,
    normalize_user,
)
from gateway.core.durations import format_duration, parse_duration
from gateway.core.encoding import b64url_decode_canonical as b64url_decode
from gateway.core.encoding import b64url_encode, loads_strict
from gateway.core.keytext import format_signing_key, parse_signing_key
from gateway.errors import AddressError, Reason

LABEL_63 = "a" * 63
# 63 + 1 + 63 + 1 + 63 + 1 + 61 = 253 characters: the longest domain.
LONGEST_DOMAIN = ".".join([LABEL_63, LABEL_63, LABEL_63, "b" * 61])
assert len(LONGEST_DOMAIN) == MAX_DOMAIN_LENGTH


# -- addresses: valid ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "user", "org"),
    [
        ("alice@acme.example", "alice", "acme.example"),
        ("a@b.co", "a", "b.co"),
        ("first.last@acme.example", "first.last", "acme.example"),
        ("x_y-z.0@sub.acme.example", "x_y-z.0", "sub.acme.example"),
        ("007@acme.example", "007", "acme.example"),
        ("bob@xn--bcher-kva.example", "bob", "xn--bcher-kva.example"),
        ("bob@a-b.c-d.example", "bob", "a-b.c-d.example"),
        ("bob@acme.example2", "bob", "acme.example2"),
        ("u" * MAX_USER_LENGTH + "@acme.example", "u" * MAX_USER_LENGTH, "acme.example"),
        ("bob@" + LONGEST_DOMAIN, "bob", LONGEST_DOMAIN),
    ],
)
def test_valid_addresses_parse(text: str, user: str, org: str) -> None:
    address = Address.parse(text)
    assert (address.user, address.org) == (user, org)
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("Alice@ACME.example", "alice@acme.example"),
        ("ALICE@Acme.Example", "alice@acme.example"),
        ("alice@acme.example.", "alice@acme.example"),
        ("Alice@ACME.EXAMPLE.", "alice@acme.example"),
    ],
)
def test_case_is_folded_and_one_trailing_dot_dropped(text: str, canonical: str) -> None:
    assert str(Address.parse(text)) == canonical
    assert Address.parse(text) == Address.parse(canonical)


def test_longest_address_with_trailing_dot_is_accepted() -> None:
    text = "u" * MAX_USER_LENGTH + "@" + LONGEST_DOMAIN + "."
    assert len(text) == MAX_ADDRESS_LENGTH + 1
    assert str(Address.parse(text)) == text[:-1]


def test_of_normalizes_like_parse() -> None:
    assert Address.of("Bob", "Globex.Example.") == Address.parse("bob@globex.example")


def test_addresses_order_and_hash() -> None:
    a, b = Address.parse("alice@acme.example"), Address.parse("bob@acme.example")
    assert sorted([b, a]) == [a, b]
    assert len({a, Address.parse("ALICE@acme.example")}) == 1


# -- addresses: invalid, each with its reason -----------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", Reason.ADDRESS_MALFORMED),
        ("alice", Reason.ADDRESS_MALFORMED),
        ("@acme.example", Reason.ADDRESS_MALFORMED),
        ("a@b@acme.example", Reason.ADDRESS_MALFORMED),
        ("u" * 66 + "@" + LONGEST_DOMAIN, Reason.ADDRESS_MALFORMED),  # 320 characters
        ("alice@", Reason.ADDRESS_BAD_DOMAIN),
        (".alice@acme.example", Reason.ADDRESS_BAD_USER),
        ("alice.@acme.example", Reason.ADDRESS_BAD_USER),
        ("al..ice@acme.example", Reason.ADDRESS_BAD_USER),
        ("-alice@acme.example", Reason.ADDRESS_BAD_USER),
        ("_alice@acme.example", Reason.ADDRESS_BAD_USER),
        ("al ice@acme.example", Reason.ADDRESS_BAD_USER),
        ("al+ice@acme.example", Reason.ADDRESS_BAD_USER),
        ("alice\n@acme.example", Reason.ADDRESS_BAD_USER),
        ("älice@acme.example", Reason.ADDRESS_BAD_USER),
        ("u" * (MAX_USER_LENGTH + 1) + "@acme.example", Reason.ADDRESS_BAD_USER),
        ("alice@acme", Reason.ADDRESS_BAD_DOMAIN),  # one label
        ("alice@.acme.example", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@acme..example", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@acme.example..", Reason.ADDRESS_BAD_DOMAIN),  # only one dot is dropped
        ("alice@-acme.example", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@acme-.example", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@acme_corp.example", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@acme.example:443", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@10.0.0.1", Reason.ADDRESS_BAD_DOMAIN),  # an IP address
        ("alice@[10.0.0.1]", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@bücher.example", Reason.ADDRESS_BAD_DOMAIN),  # write xn-- instead
        ("alice@acme.example\n", Reason.ADDRESS_BAD_DOMAIN),
        ("alice@" + "a" * 64 + ".example", Reason.ADDRESS_BAD_DOMAIN),  # label > 63
        ("alice@" + LONGEST_DOMAIN + "b", Reason.ADDRESS_BAD_DOMAIN),  # 254 characters
    ],
)
def test_invalid_addresses_say_which_part(text: str, reason: Reason) -> None:
    with pytest.raises(AddressError) as info:
        Address.parse(text)
    assert info.value.reason is reason
    assert str(info.value)  # a message a person can read


def test_non_string_is_malformed() -> None:
    with pytest.raises(AddressError) as info:
        Address.parse(42)  # type: ignore[arg-type]
    assert info.value.reason is Reason.ADDRESS_MALFORMED


def test_normalize_helpers() -> None:
    assert normalize_user("Carol") == "carol"
    assert normalize_domain("Initech.Example.") == "initech.example"
    assert is_valid_domain("acme.example")
    assert not is_valid_domain("acme")
    assert not is_valid_domain("")
    with pytest.raises(AddressError) as info:
        normalize_user("")
    assert info.value.reason is Reason.ADDRESS_BAD_USER
    with pytest.raises(AddressError) as info:
        normalize_domain(".")
    assert info.value.reason is Reason.ADDRESS_BAD_DOMAIN


# -- addresses: hypothesis ----------------------------------------------------------

_USER_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
users = st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(_USER_CHARS),
    st.text(alphabet=_USER_CHARS + "_-", max_size=20),
    st.sampled_from(_USER_CHARS),
)
labels = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
domains = st.builds(
    lambda first, rest, tld: ".".join([first, *rest, tld]),
    labels,
    st.lists(labels, max_size=3),
    st.from_regex(r"[a-zA-Z][a-zA-Z0-9]{1,5}", fullmatch=True),
)


@given(users, domains)
def test_generated_addresses_round_trip(user: str, domain: str) -> None:
    address = Address.parse(f"{user}@{domain}")
    assert address.user == user.lower()
    assert address.org == domain.lower()
    assert Address.parse(str(address)) == address
    assert str(Address.parse(str(address))) == str(address)


_ADDRESS_REASONS = {Reason.ADDRESS_MALFORMED, Reason.ADDRESS_BAD_USER, Reason.ADDRESS_BAD_DOMAIN}


def _parse_or_reason(text: str) -> Address | Reason:
    try:
        return Address.parse(text)
    except AddressError as exc:
        return exc.reason


@given(st.text(max_size=400))
def test_garbage_text_raises_only_address_error(text: str) -> None:
    result = _parse_or_reason(text)
    if isinstance(result, Reason):
        assert result in _ADDRESS_REASONS
    else:
        # Whatever parses is normalized and parses to itself.
        assert Address.parse(str(result)) == result
        assert str(result) == str(result).lower()
        assert str(result).isascii()


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_non_text_raises_only_address_error(value: object) -> None:
    with pytest.raises(AddressError):
        Address.parse(value)  # type: ignore[arg-type]


# -- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0),
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("1d", 86400),
        ("2w", 1209600),
        (" 1d ", 86400),
        ("999999999s", 999999999),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "1", "d", "1.5d", "-1d", "1 d", "1D", "1d2h", "1y", "1000000000s", "\u0661d", "1d\x00"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_parse_duration_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="string"):
        parse_duration(60)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (90, "90s"),
        (60, "1m"),
        (3600, "1h"),
        (86400, "1d"),
        (604800, "1w"),
        (90000, "25h"),
    ],
)
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_duration_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_duration(-1)


# Below 10**9 seconds every count fits the 9 digits parse_duration reads.
@given(st.integers(min_value=0, max_value=10**9 - 1))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.text(max_size=30))
def test_garbage_durations_raise_only_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert seconds >= 0


# -- key text --------------------------------------------------------------------


@given(st.binary(max_size=100))
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert b64url_decode(text) == data


@given(st.text(max_size=60))
def test_b64url_garbage_raises_only_value_error(text: str) -> None:
    try:
        raw = b64url_decode(text)
    except ValueError:
        return
    assert b64url_decode(b64url_encode(raw)) == raw


@pytest.mark.parametrize(
    "text", ["A", "AAAAA", "AA+A", "AA/A", "A A", "AB=C", "Ä", "AA==", "AB", "AAB"]
)
def test_b64url_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(text)


@pytest.mark.parametrize(
    "text",
    ['{"a": 1, "a": 2}', '{"a": NaN}', "[Infinity]", "-Infinity", "[" * 100_000, b"\xff"],
)
def test_strict_json_refuses_with_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError, match=r"JSON|duplicate key|utf-8"):
        loads_strict(text)


def test_strict_json_accepts_json() -> None:
    assert loads_strict(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}


def test_signing_key_text_round_trip() -> None:
    raw = bytes(range(32))
    text = format_signing_key(raw)
    assert text.startswith("ed25519:")
    assert len(text) == len("ed25519:") + 43
    assert parse_signing_key(text) == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ed25519:",
        "ed448:" + "A" * 43,
        "ed25519:" + "A" * 42,
        "ed25519:" + "A" * 44,
        "ed25519:" + "A" * 42 + "+",
        "ED25519:" + "A" * 43,
    ],
)
def test_signing_key_text_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="signing key"):
        parse_signing_key(text)


def test_format_signing_key_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        format_signing_key(b"\x00" * 31)


@given(st.text(max_size=60))
def test_signing_key_garbage_raises_only_value_error(text: str) -> None:
    try:
        raw = parse_signing_key(text)
    except ValueError:
        return
    assert len(raw) == 32
