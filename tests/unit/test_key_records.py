"""Signed key records: the signing bytes, a round trip, and refusal of every tampering.

The signature is checked with ``cryptography``'s Ed25519, an implementation
independent of the pynacl the module uses, and the signing bytes are rebuilt
here by hand from the format in docs/client-api.md.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.address import Address
from gateway.core.encoding import b64url_encode
from gateway.crypto.key_records import (
    MAX_KEY_RECORD_BYTES,
    key_record_signing_bytes,
    org_verify_key,
    parse_verified_key_record,
    sign_key_record,
    verify_key_record,
)
from gateway.crypto.keys import PublicKeys
from gateway.errors import KeyRecordError, Reason, RemoteError

ALICE = Address.parse("alice@acme.example")
ORG_SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
ISSUED = 1_700_000_000_000
KEYS = PublicKeys(ALICE, encryption_key=b"\x11" * 32, verify_key=b"\x22" * 32)


def verify_key_of(seed: bytes) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def signed() -> bytes:
    return sign_key_record(KEYS, org_signing_seed=ORG_SEED, issued_ms=ISSUED).encode()


def verify(data: bytes | object, *, key: bytes | None = None, expected: Address = ALICE) -> object:
    return verify_key_record(
        data, org_verify_key=key or verify_key_of(ORG_SEED), expected_address=expected
    )


def field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def test_signing_bytes_follow_the_documented_layout() -> None:
    expected = (
        b"gateway-key-record-v1\x00"
        + field(b"1")
        + field(b"alice@acme.example")
        + field(b"acme.example")
        + field(b"1700000000000")
        + field(b"\x11" * 32)
        + field(b"\x22" * 32)
    )
    assert (
        key_record_signing_bytes(
            version=1,
            address=ALICE,
            issued_ms=ISSUED,
            encryption_key=b"\x11" * 32,
            verify_key=b"\x22" * 32,
        )
        == expected
    )


def test_a_signed_record_has_the_documented_fields_and_an_independently_valid_signature() -> None:
    obj = json.loads(signed())
    assert set(obj) == {
        "v",
        "address",
        "org",
        "issued",
        "encryption_key",
        "verify_key",
        "signature",
    }
    assert obj["v"] == 1
    assert obj["address"] == "alice@acme.example"
    assert obj["org"] == "acme.example"
    assert obj["issued"] == ISSUED
    assert obj["encryption_key"] == b64url_encode(b"\x11" * 32)
    assert obj["verify_key"] == b64url_encode(b"\x22" * 32)
    signature = obj["signature"]
    raw = base64.urlsafe_b64decode(signature + "==")
    public = Ed25519PrivateKey.from_private_bytes(ORG_SEED).public_key()
    message = key_record_signing_bytes(
        version=1,
        address=ALICE,
        issued_ms=ISSUED,
        encryption_key=b"\x11" * 32,
        verify_key=b"\x22" * 32,
    )
    public.verify(raw, message)  # raises InvalidSignature if it were wrong


def test_org_verify_key_matches_cryptography() -> None:
    assert org_verify_key(ORG_SEED) == verify_key_of(ORG_SEED)


def test_round_trip_from_bytes_and_from_a_parsed_object() -> None:
    data = signed()
    assert verify(data) == KEYS
    assert verify(json.loads(data)) == KEYS
    record = parse_verified_key_record(
        data, org_verify_key=verify_key_of(ORG_SEED), expected_address=ALICE
    )
    assert record.issued_ms == ISSUED
    assert record.encode() == data


def _tampered(**changes: object) -> dict[str, object]:
    obj: dict[str, object] = json.loads(signed())
    obj.update(changes)
    return obj


TAMPERINGS: dict[str, object] = {
    "address": _tampered(address="mallory@acme.example"),
    "org": _tampered(org="globex.example"),
    "issued": _tampered(issued=ISSUED + 1),
    "encryption_key": _tampered(encryption_key=b64url_encode(b"\x33" * 32)),
    "verify_key": _tampered(verify_key=b64url_encode(b"\x33" * 32)),
    "signature": _tampered(signature=b64url_encode(b"\x00" * 64)),
    "version": _tampered(v=2),
    "version as text": _tampered(v="1"),
    "issued as float": _tampered(issued=float(ISSUED)),
    "short key": _tampered(verify_key=b64url_encode(b"\x22" * 31)),
    "padded base64": _tampered(verify_key=b64url_encode(b"\x22" * 32) + "="),
    "address not normal": _tampered(address="Alice@acme.example"),
    "extra field": _tampered(group="engineering"),
    "missing field": {k: v for k, v in json.loads(signed()).items() if k != "issued"},
    "not an object": [1, 2, 3],
    "null": None,
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_every_tampering_gives_the_same_detail_free_error(case: str) -> None:
    with pytest.raises(KeyRecordError) as caught:
        verify(TAMPERINGS[case])
    assert caught.value.reason is Reason.KEY_RECORD_INVALID
    assert str(caught.value) == "key record is not valid"
    assert isinstance(caught.value, RemoteError)
    assert caught.value.__cause__ is None


def test_a_record_signed_by_another_org_key_is_refused() -> None:
    data = sign_key_record(KEYS, org_signing_seed=OTHER_SEED, issued_ms=ISSUED).encode()
    with pytest.raises(KeyRecordError):
        verify(data)
    assert verify(data, key=verify_key_of(OTHER_SEED)) == KEYS


def test_a_genuine_record_for_another_address_is_refused() -> None:
    with pytest.raises(KeyRecordError):
        verify(signed(), expected=Address.parse("bob@acme.example"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b'{"v":1,"v":1}',
        b"[" * 10_000,
        b"NaN",
        b" " * (MAX_KEY_RECORD_BYTES + 1),
    ],
)
def test_garbage_bytes_are_refused_with_the_same_error(data: bytes) -> None:
    with pytest.raises(KeyRecordError):
        verify(data)


def test_duplicate_keys_are_refused_even_when_the_last_value_is_genuine() -> None:
    data = signed()
    doubled = data[:-1] + b',"issued":' + str(ISSUED).encode() + b"}"
    with pytest.raises(KeyRecordError):
        verify(doubled)


@settings(max_examples=300)
@given(st.data())
def test_any_single_byte_change_is_refused(data: st.DataObject) -> None:
    original = signed()
    index = data.draw(st.integers(0, len(original) - 1))
    replacement = data.draw(st.integers(0, 255).filter(lambda b: b != original[index]))
    mutated = original[:index] + bytes([replacement]) + original[index + 1 :]
    with pytest.raises(KeyRecordError):
        verify(mutated)


@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_key_record_error(data: bytes) -> None:
    with pytest.raises(KeyRecordError):
        verify(data)


def test_signing_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="org_signing_seed"):
        sign_key_record(KEYS, org_signing_seed=b"short", issued_ms=ISSUED)
    with pytest.raises(ValueError, match="issued_ms"):
        sign_key_record(KEYS, org_signing_seed=ORG_SEED, issued_ms=-1)
    with pytest.raises(ValueError, match="org_verify_key"):
        verify(signed(), key=b"short")
