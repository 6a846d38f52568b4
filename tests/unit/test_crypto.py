"""E2EE client crypto: seal/open, padding, tamper resistance, user keys and their file."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PublicKey, SealedBox
from nacl.signing import SigningKey

from gateway.core.address import Address
from gateway.core.envelope import (
    MAX_CIPHERTEXT_BYTES,
    Envelope,
    b64url_encode,
    decode_envelope,
    encode_envelope,
    signing_bytes,
)
from gateway.crypto.envelope_crypto import (
    MAX_INNER_BYTES,
    MIN_PADDED_BYTES,
    SEALED_BOX_OVERHEAD,
    max_payload_bytes,
    open_envelope,
    padded_length,
    seal,
)
from gateway.crypto.keys import KEY_FILE_MODE, MAX_KEY_FILE_BYTES, PublicKeys, UserKeys
from gateway.errors import EnvelopeError, EnvelopeOpenError, PKIError, ProtocolError, Reason

T0 = 1_700_000_000_000
DAY_MS = 86_400_000
OPEN_FAILED = "envelope could not be opened"

ALICE = UserKeys.generate(Address.parse("alice@acme.example"))
BOB = UserKeys.generate(Address.parse("bob@globex.example"))
MALLORY = UserKeys.generate(Address.parse("mallory@evil.example"))


def seal_to_bob(payload: bytes, **options: Any) -> Envelope:
    return seal(
        payload,
        sender=ALICE,
        recipient=BOB.public(),
        created_ms=T0,
        expires_ms=T0 + DAY_MS,
        **options,
    )


def open_as_bob(env: Envelope, *, verify_key: bytes | None = None) -> bytes:
    key = ALICE.public().verify_key if verify_key is None else verify_key
    return open_envelope(env, recipient=BOB, sender_verify_key=key)


def assert_open_fails(
    env: Envelope, *, recipient: UserKeys = BOB, verify_key: bytes | None = None
) -> None:
    key = ALICE.public().verify_key if verify_key is None else verify_key
    with pytest.raises(EnvelopeOpenError) as info:
        open_envelope(env, recipient=recipient, sender_verify_key=key)
    error = info.value
    assert type(error) is EnvelopeOpenError
    assert str(error) == OPEN_FAILED
    assert error.reason is Reason.ENVELOPE_OPEN_FAILED
    # Nothing attached says which check failed.
    assert error.__cause__ is None
    assert error.__context__ is None


def sign_as(keys: UserKeys, env: Envelope) -> Envelope:
    """``env`` re-signed with ``keys``: a valid signature over a chosen header."""
    signature = SigningKey(keys.signing_seed).sign(signing_bytes(env)).signature
    return dataclasses.replace(env, signature=signature)


def frame_per_spec(sender: bytes, payload: bytes) -> bytes:
    """The inner plaintext, written from docs/envelope.md rather than from the code."""
    frame = struct.pack(">I", len(sender)) + sender + struct.pack(">I", len(payload)) + payload
    return frame + b"\x00" * (padded_length(len(frame)) - len(frame))


def with_inner(inner: bytes, *, sender: UserKeys = ALICE) -> Envelope:
    """An envelope to Bob whose sealed box holds ``inner``, validly signed by ``sender``."""
    ciphertext = SealedBox(PublicKey(BOB.public().encryption_key)).encrypt(inner)
    env = dataclasses.replace(
        seal_to_bob(b""), sender=sender.address, ciphertext=ciphertext, signature=bytes(64)
    )
    return sign_as(sender, env)


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 64 * 1024])
def test_seal_open_round_trip(size: int) -> None:
    payload = os.urandom(size)
    env = seal_to_bob(payload)
    assert open_as_bob(env) == payload
    # And through the wire form, as a gateway would carry it.
    assert open_as_bob(decode_envelope(encode_envelope(env))) == payload


def test_sealed_envelope_carries_the_header_asked_for() -> None:
    env = seal(
        b"hi",
        sender=ALICE,
        recipient=BOB.public(),
        sender_address=ALICE.address,
        recipient_address=BOB.address,
        envelope_id="AAECAwQFBgcICQoLDA0ODw",
        created_ms=T0,
        expires_ms=T0 + 60_000,
        burn_on_read=True,
    )
    assert (env.version, env.id, env.sender, env.recipient) == (
        1,
        "AAECAwQFBgcICQoLDA0ODw",
        ALICE.address,
        BOB.address,
    )
    assert (env.created, env.expires, env.burn_on_read, env.group) == (T0, T0 + 60_000, True, None)
    assert len(env.signature) == 64


def test_random_ids_and_fresh_ciphertexts() -> None:
    one, two = seal_to_bob(b"same"), seal_to_bob(b"same")
    assert one.id != two.id
    assert one.ciphertext != two.ciphertext


def test_group_is_not_signed() -> None:
    # The origin gateway adds the group after the client signed.
    env = seal_to_bob(b"payload").with_group("engineering")
    assert open_as_bob(env) == b"payload"


def test_signature_checks_with_an_independent_ed25519() -> None:
    env = seal_to_bob(b"payload")
    Ed25519PublicKey.from_public_bytes(ALICE.public().verify_key).verify(
        env.signature, signing_bytes(env)
    )


def test_signature_test_vector() -> None:
    # docs/envelope.md: the signing bytes of the example, signed with seed 00..1f.
    env = Envelope(
        version=1,
        id="AAECAwQFBgcICQoLDA0ODw",
        sender=Address.parse("alice@acme.example"),
        recipient=Address.parse("bob@globex.example"),
        created=1_700_000_000_000,
        expires=1_700_086_400_000,
        burn_on_read=False,
        ciphertext=b"\x00\x01\x02",
        signature=b"",
    )
    keys = UserKeys(env.sender, bytes(range(32, 64)), bytes(range(32)))
    assert keys.public().verify_key.hex() == (
        "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    )
    signature = SigningKey(keys.signing_seed).sign(signing_bytes(env)).signature
    assert signature.hex() == (
        "557776f814bf54f62ff5422ef34543ad59a66d94a95c527865fc7bb7e4e77e46"
        "2fb53c7c8a9416b9823997909cbcbe9f61694dd335f226532fd9a1a31cffeb01"
    )


def test_a_frame_built_from_the_specification_opens() -> None:
    env = with_inner(frame_per_spec(b"alice@acme.example", b"from the spec"))
    assert open_as_bob(env) == b"from the spec"


# -- padding ---------------------------------------------------------------------------------


def test_short_payloads_give_equal_ciphertext_lengths() -> None:
    short, longer = seal_to_bob(b"x" * 10), seal_to_bob(b"y" * 200)
    assert len(short.ciphertext) == len(longer.ciphertext)
    assert len(short.ciphertext) == MIN_PADDED_BYTES + SEALED_BOX_OVERHEAD


def test_ciphertext_length_is_the_bucket_plus_the_box() -> None:
    sender = len(str(ALICE.address))
    for size in (0, 300, 1000, 5000, 64 * 1024, 300_000):
        env = seal_to_bob(bytes(size))
        frame = 4 + sender + 4 + size
        assert len(env.ciphertext) == padded_length(frame) + SEALED_BOX_OVERHEAD


@pytest.mark.parametrize(
    ("frame", "bucket"),
    [
        (0, 256),
        (256, 256),
        (257, 272),  # E=8, keep 4 bits: multiples of 16
        (300, 304),
        (513, 544),  # E=9: multiples of 32
        (1000, 1024),
        (5000, 5120),  # E=12: multiples of 256
        (65544, 67584),  # E=16: multiples of 2048
        (MAX_INNER_BYTES, MAX_INNER_BYTES),  # clamped at the top
    ],
)
def test_padme_buckets(frame: int, bucket: int) -> None:
    assert padded_length(frame) == bucket


@given(st.integers(min_value=0, max_value=MAX_INNER_BYTES))
def test_buckets_are_large_enough_bounded_and_stable(frame: int) -> None:
    bucket = padded_length(frame)
    assert frame <= bucket <= MAX_INNER_BYTES
    assert bucket in (MIN_PADDED_BYTES, MAX_INNER_BYTES) or bucket <= frame * 1.125
    assert padded_length(bucket) == bucket  # a bucket is its own bucket


@given(st.integers(min_value=0, max_value=MAX_INNER_BYTES - 1))
def test_buckets_are_monotone(frame: int) -> None:
    assert padded_length(frame) <= padded_length(frame + 1)


@pytest.mark.parametrize("frame", [-1, MAX_INNER_BYTES + 1])
def test_bucket_of_impossible_length(frame: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        padded_length(frame)


def test_largest_payload_fits_the_protocol_limit() -> None:
    limit = max_payload_bytes(ALICE.address)
    env = seal_to_bob(bytes(limit))
    assert len(env.ciphertext) == MAX_CIPHERTEXT_BYTES
    assert open_as_bob(decode_envelope(encode_envelope(env))) == bytes(limit)
    with pytest.raises(EnvelopeError) as info:
        seal_to_bob(bytes(limit + 1))
    assert info.value.reason is Reason.ENVELOPE_TOO_LARGE


# -- tampering: every failure is the same failure --------------------------------------------


def _flip_text(text: str, index: int, bit: int) -> str:
    raw = bytearray(text.encode())
    raw[index] ^= 1 << bit
    return raw.decode("latin-1")


def _header_variants(env: Envelope) -> list[Envelope]:
    """``env`` with one bit flipped, for every bit of every signed header field."""
    variants = []
    replace = dataclasses.replace
    for bit in range(8):
        variants.append(replace(env, version=env.version ^ (1 << bit)))
    for index in range(len(env.id)):
        for bit in range(8):
            variants.append(replace(env, id=_flip_text(env.id, index, bit)))
    for name in ("sender", "recipient"):
        address: Address = getattr(env, name)
        for index in range(len(address.user)):
            for bit in range(8):
                flipped = Address(_flip_text(address.user, index, bit), address.org)
                variants.append(replace(env, **{name: flipped}))
        for index in range(len(address.org)):
            for bit in range(8):
                flipped = Address(address.user, _flip_text(address.org, index, bit))
                variants.append(replace(env, **{name: flipped}))
    for name in ("created", "expires"):
        for bit in range(64):
            variants.append(replace(env, **{name: getattr(env, name) ^ (1 << bit)}))
    variants.append(replace(env, burn_on_read=not env.burn_on_read))
    return variants


def _byte_flips(data: bytes) -> list[bytes]:
    flips = []
    for index in range(len(data)):
        for bit in range(8):
            changed = bytearray(data)
            changed[index] ^= 1 << bit
            flips.append(bytes(changed))
    return flips


def test_every_header_bit_flip_fails_the_same_way() -> None:
    env = seal_to_bob(b"secret")
    variants = _header_variants(env)
    assert len(variants) > 500
    for variant in variants:
        assert variant != env
        assert_open_fails(variant)


def test_every_ciphertext_bit_flip_fails_the_same_way() -> None:
    env = seal_to_bob(b"")
    assert len(env.ciphertext) == 304
    for ciphertext in _byte_flips(env.ciphertext):
        assert_open_fails(dataclasses.replace(env, ciphertext=ciphertext))


def test_every_signature_bit_flip_fails_the_same_way() -> None:
    env = seal_to_bob(b"secret")
    for signature in _byte_flips(env.signature):
        assert_open_fails(dataclasses.replace(env, signature=signature))


def test_truncated_or_extended_parts_fail_the_same_way() -> None:
    env = seal_to_bob(b"secret")
    replace = dataclasses.replace
    for changed in (
        replace(env, ciphertext=env.ciphertext[:-1]),
        replace(env, ciphertext=env.ciphertext + b"\x00"),
        replace(env, ciphertext=b""),
        replace(env, signature=env.signature[:-1]),
        replace(env, signature=env.signature + b"\x00"),
        replace(env, signature=b""),
    ):
        assert_open_fails(changed)


def test_every_bit_flip_of_the_wire_form_is_caught() -> None:
    # What a gateway carries: a flip is refused by the decoder, or by open().
    env = seal_to_bob(b"")
    for data in _byte_flips(encode_envelope(env)):
        try:
            decoded = decode_envelope(data)
        except EnvelopeError:
            continue
        assert_open_fails(decoded)


def test_wrong_recipient_key_fails_the_same_way() -> None:
    env = seal_to_bob(b"for bob only")
    # Mallory's keys, whatever address they claim.
    assert_open_fails(env, recipient=MALLORY)
    assert_open_fails(
        env,
        recipient=UserKeys(BOB.address, MALLORY.encryption_secret, MALLORY.signing_seed),
    )


def test_wrong_sender_key_fails_the_same_way() -> None:
    env = seal_to_bob(b"from alice")
    assert_open_fails(env, verify_key=MALLORY.public().verify_key)
    assert_open_fails(env, verify_key=BOB.public().verify_key)
    assert_open_fails(env, verify_key=bytes(32))
    assert_open_fails(env, verify_key=b"short")


def test_forged_signature_with_the_wrong_key_fails() -> None:
    env = sign_as(MALLORY, seal_to_bob(b"from alice"))
    assert_open_fails(env)


def test_resigned_ciphertext_of_someone_else_fails() -> None:
    # Mallory takes Alice's ciphertext, puts her own name on it and signs it
    # validly: the sender sealed inside still says Alice.
    stolen = dataclasses.replace(seal_to_bob(b"alice's words"), sender=MALLORY.address)
    env = sign_as(MALLORY, stolen)
    assert_open_fails(env, verify_key=MALLORY.public().verify_key)


def test_resigned_flipped_ciphertext_fails() -> None:
    env = seal_to_bob(b"secret")
    flipped = bytearray(env.ciphertext)
    flipped[100] ^= 1
    assert_open_fails(sign_as(ALICE, dataclasses.replace(env, ciphertext=bytes(flipped))))


def test_envelope_addressed_to_someone_else_fails() -> None:
    env = sign_as(ALICE, dataclasses.replace(seal_to_bob(b"x"), recipient=MALLORY.address))
    assert_open_fails(env)


def _bad_inner_frames() -> dict[str, bytes]:
    alice = b"alice@acme.example"
    good = frame_per_spec(alice, b"payload")
    used = 4 + len(alice) + 4 + len(b"payload")
    return {
        "nonzero padding": good[:-1] + b"\x01",
        "padding one byte short": good[:-1],
        "padding one bucket too long": good + bytes(16),
        "no padding": good[:used],
        "payload length past the end": good[: 4 + len(alice)]
        + struct.pack(">I", 10**6)
        + good[used:],
        "sender length past the end": struct.pack(">I", 2**32 - 1) + good[4:],
        "frame too short": b"\x00" * 7,
        "empty": b"",
        "other sender inside": frame_per_spec(b"bob@globex.example", b"payload"),
        "sender in other case": frame_per_spec(b"Alice@acme.example", b"payload"),
    }


@pytest.mark.parametrize("name", sorted(_bad_inner_frames()))
def test_validly_signed_bad_frames_fail_the_same_way(name: str) -> None:
    assert_open_fails(with_inner(_bad_inner_frames()[name]))


def test_open_failure_is_logged_locally_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    env = seal_to_bob(b"top secret payload")
    with caplog.at_level(logging.DEBUG, logger="gateway.crypto.envelope_crypto"):
        assert_open_fails(env, verify_key=MALLORY.public().verify_key)
    assert "signature" in caplog.text
    assert env.id in caplog.text
    assert "top secret" not in caplog.text


# -- seal's own errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"sender_address": Address.parse("eve@acme.example")}, Reason.ENVELOPE_BAD_FROM),
        ({"recipient_address": Address.parse("carol@globex.example")}, Reason.ENVELOPE_BAD_TO),
        ({"envelope_id": "not-an-id"}, Reason.ENVELOPE_BAD_ID),
        ({"expires_ms": T0}, Reason.ENVELOPE_BAD_TIME),
        ({"created_ms": -5}, Reason.ENVELOPE_BAD_TIME),
    ],
)
def test_seal_refuses_a_bad_header(options: dict[str, Any], reason: Reason) -> None:
    fields: dict[str, Any] = {"created_ms": T0, "expires_ms": T0 + DAY_MS, **options}
    with pytest.raises(EnvelopeError) as info:
        seal(b"x", sender=ALICE, recipient=BOB.public(), **fields)
    assert info.value.reason is reason


def test_seal_to_an_unusable_key_fails() -> None:
    broken = PublicKeys(BOB.address, bytes(32), BOB.public().verify_key)  # a low-order point
    with pytest.raises(EnvelopeOpenError):
        seal(b"x", sender=ALICE, recipient=broken, created_ms=T0, expires_ms=T0 + DAY_MS)


# -- keys ------------------------------------------------------------------------------------------


def test_generated_keys() -> None:
    keys = UserKeys.generate(Address.parse("carol@acme.example"))
    public = keys.public()
    assert public.address == keys.address
    assert len(public.encryption_key) == len(public.verify_key) == 32
    assert public == keys.public()
    assert public != UserKeys.generate(keys.address).public()


def test_secrets_stay_out_of_repr() -> None:
    text = repr(ALICE)
    assert ALICE.encryption_secret.hex() not in text
    assert repr(ALICE.encryption_secret) not in text
    assert repr(ALICE.signing_seed) not in text
    assert "alice" in text


def test_public_keys_json_round_trip() -> None:
    public = ALICE.public()
    obj = json.loads(json.dumps(public.to_json()))
    assert set(obj) == {"address", "encryption_key", "verify_key"}
    assert obj["verify_key"] == b64url_encode(public.verify_key)
    assert PublicKeys.from_json(obj) == public


@pytest.mark.parametrize(
    "changes",
    [
        {"address": "Alice@acme.example"},
        {"address": "not an address"},
        {"address": 7},
        {"encryption_key": b64url_encode(bytes(31))},
        {"verify_key": b64url_encode(bytes(33))},
        {"verify_key": "!!"},
        {"verify_key": None},
        {"extra": "field"},
    ],
)
def test_public_keys_from_json_is_strict(changes: dict[str, object]) -> None:
    obj = {**ALICE.public().to_json(), **changes}
    with pytest.raises(ProtocolError) as info:
        PublicKeys.from_json(obj)
    assert info.value.reason is Reason.KEY_RECORD_MALFORMED


def test_public_keys_from_json_missing_field() -> None:
    obj = ALICE.public().to_json()
    del obj["encryption_key"]
    with pytest.raises(ProtocolError, match="encryption_key"):
        PublicKeys.from_json(obj)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=50),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(["address", "encryption_key", "verify_key"]) | st.text(max_size=5),
                children,
                max_size=4,
            )
        ),
        max_leaves=10,
    )
)
def test_public_keys_garbage_raises_only_protocol_error(value: object) -> None:
    with pytest.raises(ProtocolError):
        PublicKeys.from_json(value)


# -- the key file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_key_file_is_0600_and_loads_back(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "alice.keys"
    old_umask = os.umask(umask)  # neither a wide nor a narrow umask changes the mode
    try:
        ALICE.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == KEY_FILE_MODE == 0o600
    loaded = UserKeys.load(path)
    assert loaded == ALICE
    assert loaded.public() == ALICE.public()
    assert [p.name for p in tmp_path.iterdir()] == ["alice.keys"]  # no temporary left


def test_key_file_content(tmp_path: Path) -> None:
    path = tmp_path / "alice.keys"
    ALICE.save(path)
    obj = json.loads(path.read_text())
    assert obj == {
        "v": 1,
        "kind": "gateway-user-keys",
        "address": "alice@acme.example",
        "encryption_secret": b64url_encode(ALICE.encryption_secret),
        "signing_seed": b64url_encode(ALICE.signing_seed),
        "encryption_key": b64url_encode(ALICE.public().encryption_key),
        "verify_key": b64url_encode(ALICE.public().verify_key),
    }


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "alice.keys"
    ALICE.save(path)
    before = path.read_bytes()
    with pytest.raises(PKIError, match="refusing to overwrite"):
        BOB.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["alice.keys"]


def test_save_overwrites_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    ALICE.save(path)
    path.chmod(0o600)
    BOB.save(path, overwrite=True)
    assert UserKeys.load(path) == BOB
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_into_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="cannot write key file"):
        ALICE.save(tmp_path / "no" / "such" / "dir" / "keys")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602, 0o620])
def test_load_refuses_a_file_others_may_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys"
    ALICE.save(path)
    path.chmod(mode)
    with pytest.raises(PKIError, match="chmod 600") as info:
        UserKeys.load(path)
    assert f"{mode:04o}" in str(info.value)
    assert str(path) in str(info.value)


def test_load_accepts_owner_read_only(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    ALICE.save(path)
    path.chmod(0o400)
    assert UserKeys.load(path) == ALICE


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="no such key file"):
        UserKeys.load(tmp_path / "absent")


def test_load_a_directory(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(PKIError, match="not a regular file"):
        UserKeys.load(directory)


def _write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 10_000, "not JSON"),
        (b'{"v": 1}', "missing field"),
    ],
)
def test_load_garbage(tmp_path: Path, content: bytes, message: str) -> None:
    path = _write_private(tmp_path / "keys", content)
    with pytest.raises(PKIError, match=message):
        UserKeys.load(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"v": 2}, "expected v 1"),
        ({"v": True}, "expected v 1"),
        ({"kind": "something-else"}, "kind"),
        ({"signing_seed": b64url_encode(bytes(31))}, "signing_seed"),
        ({"encryption_secret": "not base64!"}, "encryption_secret"),
        ({"verify_key": b64url_encode(bytes(32))}, "do not match"),
        ({"address": "ALICE@acme.example"}, "normal form"),
        ({"comment": "hello"}, "unknown field"),
    ],
)
def test_load_damaged_file(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    obj = {**ALICE.to_file_json(), **changes}
    path = _write_private(tmp_path / "keys", json.dumps(obj).encode())
    with pytest.raises(PKIError, match=message) as info:
        UserKeys.load(path)
    assert str(path) in str(info.value)


def test_load_refuses_an_oversized_file(tmp_path: Path) -> None:
    path = _write_private(tmp_path / "keys", b" " * (MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(PKIError, match="too large"):
        UserKeys.load(path)
