"""Signed key records: a user's public keys, vouched for by the user's org.

A gateway publishes each of its users' public keys as a record signed with
the org signing key (Ed25519); partners pin that org key in their rules
(``peers.<org>.signing_key``) and a client checks the signature before it
trusts a key (docs/client-api.md, "Key records")::

    {"v": 1, "address": "alice@acme.example", "org": "acme.example",
     "issued": 1700000000000, "encryption_key": B64, "verify_key": B64,
     "signature": B64}

The signature covers a domain-separated byte string, built like the
envelope's signing bytes: the prefix ``gateway-key-record-v1`` and a NUL, then
``v``, ``address``, ``org``, ``issued`` (decimal ASCII), the raw encryption key
and the raw verify key, each as a 4-byte big-endian length and its bytes.

Verification parses strictly (exact fields and JSON types, canonical
base64url, normal-form address) and checks, in order: the version, that the
record names the expected address, that ``org`` is that address's org, the
signature. Every failure raises the same detail-free
:class:`~gateway.errors.KeyRecordError`; which check failed goes to the local
debug log only, so the answer is no oracle.

Besides :mod:`gateway.crypto.envelope_crypto`, this is the one module that
calls pynacl: the gateway signs here, clients verify here, and the retention
archive checks here which sender key verifies an envelope
(:func:`envelope_signed_by`).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from typing import NoReturn

from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from gateway.core.address import Address
from gateway.core.encoding import b64url_decode_canonical, b64url_encode, loads_strict
from gateway.core.envelope import MAX_TIME_MS, Envelope, signing_bytes
from gateway.crypto.keys import PublicKeys
from gateway.errors import AddressError, KeyRecordError

log = logging.getLogger(__name__)

KEY_RECORD_VERSION = 1
KEY_BYTES = 32  # X25519 public key, Ed25519 verify key and seed
SIGNATURE_BYTES = 64
MAX_KEY_RECORD_BYTES = 4096  # a real record is about 400 bytes
SIGNING_DOMAIN = b"gateway-key-record-v1\x00"

_FIELDS = frozenset({"v", "address", "org", "issued", "encryption_key", "verify_key", "signature"})
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A user's public keys with the org's signature over them."""

    address: Address
    encryption_key: bytes
    verify_key: bytes
    issued_ms: int  # when the org signed it, Unix milliseconds
    signature: bytes = field(repr=False)
    version: int = KEY_RECORD_VERSION

    @property
    def org(self) -> str:
        return self.address.org

    @property
    def public_keys(self) -> PublicKeys:
        return PublicKeys(self.address, self.encryption_key, self.verify_key)

    def to_json(self) -> dict[str, object]:
        return {
            "v": self.version,
            "address": str(self.address),
            "org": self.org,
            "issued": self.issued_ms,
            "encryption_key": b64url_encode(self.encryption_key),
            "verify_key": b64url_encode(self.verify_key),
            "signature": b64url_encode(self.signature),
        }

    def encode(self) -> bytes:
        """Compact JSON with sorted keys: the form stored and served."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode("ascii")


def key_record_signing_bytes(
    *, version: int, address: Address, issued_ms: int, encryption_key: bytes, verify_key: bytes
) -> bytes:
    """The bytes the org signing key signs (see the module docstring)."""
    fields = (
        str(version).encode("ascii"),
        str(address).encode("ascii"),
        address.org.encode("ascii"),
        str(issued_ms).encode("ascii"),
        encryption_key,
        verify_key,
    )
    parts = [SIGNING_DOMAIN]
    for value in fields:
        parts.append(_U32.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def org_verify_key(org_signing_seed: bytes) -> bytes:
    """The 32-byte Ed25519 verify key of an org signing seed (what `peer card` prints)."""
    _check_length("org_signing_seed", org_signing_seed, KEY_BYTES)
    return bytes(SigningKey(org_signing_seed).verify_key)


def sign_key_record(
    public_keys: PublicKeys, *, org_signing_seed: bytes, issued_ms: int
) -> KeyRecord:
    """Sign ``public_keys`` with the org's 32-byte Ed25519 seed.

    The caller makes sure the address is one of its org's users; ``ValueError``
    for arguments that break this function's own rules.
    """
    _check_length("org_signing_seed", org_signing_seed, KEY_BYTES)
    _check_length("encryption_key", public_keys.encryption_key, KEY_BYTES)
    _check_length("verify_key", public_keys.verify_key, KEY_BYTES)
    if type(issued_ms) is not int or not 0 <= issued_ms <= MAX_TIME_MS:
        raise ValueError(f"issued_ms must be an integer from 0 to {MAX_TIME_MS}")
    message = key_record_signing_bytes(
        version=KEY_RECORD_VERSION,
        address=public_keys.address,
        issued_ms=issued_ms,
        encryption_key=public_keys.encryption_key,
        verify_key=public_keys.verify_key,
    )
    signature = SigningKey(org_signing_seed).sign(message).signature
    return KeyRecord(
        address=public_keys.address,
        encryption_key=public_keys.encryption_key,
        verify_key=public_keys.verify_key,
        issued_ms=issued_ms,
        signature=bytes(signature),
    )


def verify_key_record(
    data: bytes | object, *, org_verify_key: bytes, expected_address: Address
) -> PublicKeys:
    """The public keys of a record signed by the org key; :class:`KeyRecordError` otherwise.

    ``data`` is the record's JSON bytes, or the already-parsed JSON object.
    """
    return parse_verified_key_record(
        data, org_verify_key=org_verify_key, expected_address=expected_address
    ).public_keys


def parse_verified_key_record(
    data: bytes | object, *, org_verify_key: bytes, expected_address: Address
) -> KeyRecord:
    """Like :func:`verify_key_record`, but the whole record (with ``issued_ms``)."""
    _check_length("org_verify_key", org_verify_key, KEY_BYTES)
    obj = _load(data) if isinstance(data, bytes | bytearray | memoryview) else data
    record = _parse(obj)
    if record.version != KEY_RECORD_VERSION:
        _fail("unsupported version")
    if record.address != expected_address:
        _fail("names another address")
    message = key_record_signing_bytes(
        version=record.version,
        address=record.address,
        issued_ms=record.issued_ms,
        encryption_key=record.encryption_key,
        verify_key=record.verify_key,
    )
    try:
        VerifyKey(org_verify_key).verify(message, record.signature)
    except (CryptoError, ValueError, TypeError):
        _fail("bad signature")
    return record


def envelope_signed_by(env: Envelope, verify_key: bytes) -> bool:
    """Whether ``env``'s signature verifies with ``verify_key`` (a key record's).

    For the retention archive, which records the sender's key that verified an
    envelope, and for ``gateway retention open``, which checks it again
    offline; a client opening an envelope checks it in
    :func:`gateway.crypto.envelope_crypto.open_envelope`.
    """
    try:
        VerifyKey(verify_key).verify(signing_bytes(env), env.signature)
    except (CryptoError, ValueError, TypeError, AttributeError):
        return False
    return True


# -- parsing ---------------------------------------------------------------------


def _load(data: bytes | bytearray | memoryview) -> object:
    if len(data) > MAX_KEY_RECORD_BYTES:
        _fail(f"larger than {MAX_KEY_RECORD_BYTES} bytes")
    try:
        return loads_strict(data)
    except ValueError:
        _fail("not JSON")


def _parse(obj: object) -> KeyRecord:
    if not isinstance(obj, dict) or set(obj) != _FIELDS:
        _fail("not an object with exactly the record's fields")
    version, issued = obj["v"], obj["issued"]
    if type(version) is not int:
        _fail("v is not an integer")
    if type(issued) is not int or not 0 <= issued <= MAX_TIME_MS:
        _fail("issued is not a time")
    address_text, org = obj["address"], obj["org"]
    if not isinstance(address_text, str) or not isinstance(org, str):
        _fail("address or org is not a string")
    try:
        address = Address.parse(address_text)
    except AddressError:
        _fail("address does not parse")
    if str(address) != address_text or org != address.org:
        _fail("address not in normal form, or org is not the address's org")
    return KeyRecord(
        address=address,
        encryption_key=_b64(obj["encryption_key"], KEY_BYTES, "encryption_key"),
        verify_key=_b64(obj["verify_key"], KEY_BYTES, "verify_key"),
        issued_ms=issued,
        signature=_b64(obj["signature"], SIGNATURE_BYTES, "signature"),
        version=version,
    )


def _b64(value: object, length: int, name: str) -> bytes:
    if not isinstance(value, str):
        _fail(f"{name} is not a string")
    try:
        raw = b64url_decode_canonical(value)
    except ValueError:
        _fail(f"{name} is not canonical base64url")
    if len(raw) != length:
        _fail(f"{name} is not {length} bytes")
    return raw


def _check_length(name: str, value: object, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise ValueError(f"{name} must be {length} bytes")


def _fail(step: str) -> NoReturn:
    # The reason stays here, at debug level: callers and remote parties see one error.
    log.debug("key record refused: %s", step)
    raise KeyRecordError() from None
