"""Seal and open envelopes: the client's end-to-end encryption (docs/envelope.md).

This is the one module that calls pynacl for envelope work. A gateway never
imports it: it holds no key that opens an envelope.

Sealing, for ``payload`` from sender S to recipient R:

1. ``frame = u32(len(S)) || S || u32(len(payload)) || payload`` where ``S`` is
   the sender's address in ASCII and ``u32`` is 4-byte big-endian.
2. ``inner = frame`` followed by zero bytes up to :func:`padded_length`
   ``(len(frame))``: a Padmé bucket of at least :data:`MIN_PADDED_BYTES`, so
   the ciphertext's length says little about the payload's.
3. ``ciphertext = crypto_box_seal(inner, R's X25519 public key)`` (a libsodium
   sealed box: 48 bytes longer than ``inner``).
4. ``signature = Ed25519(S's signing key, signing_bytes(envelope))``.

Opening checks in this order, and stops at the first failure: the signature
(with the verify key the caller trusts for ``env.sender``); that ``env.to``
is the recipient whose keys are used; the sealed box; the frame's lengths, its
zero padding and its exact bucket length; that the sender inside equals
``env.sender``. The last check is why the sender is inside at all: without it a
third party could strip a signature and re-sign someone else's ciphertext as
their own.

Every failure raises the same :class:`~gateway.errors.EnvelopeOpenError`, with
no cause attached, so that no caller can turn it into an oracle; which check
failed is logged locally at debug level only.

Version 2 (docs/envelope.md §8) frames and pads the payload the same way, but
encrypts ``inner`` once under a fresh random content key K
(XChaCha20-Poly1305) and wraps K: sealed for the recipient, and, when the
sender's group is under retention, for the org's retention key. The retention
wrap is a deterministic function of K, the envelope id and the retention key
(:func:`retention_wrap`), so a recipient who opened K recomputes it and
compares: a sender cannot archive something else without every recipient
noticing (:class:`~gateway.errors.RetentionWrapMismatch`, raised only after
every other check passed). Each AEAD key here encrypts exactly one message,
so the nonces are fixed zeros, as in age's X25519 recipient stanza.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import struct
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_box_seal,
    crypto_box_seal_open,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from gateway.core.address import Address
from gateway.core.envelope import (
    ENVELOPE_VERSION,
    ENVELOPE_VERSION_V2,
    MAX_CIPHERTEXT_BYTES,
    RETENTION_WRAP_BYTES,
    SIGNATURE_BYTES,
    Envelope,
    RetentionWrap,
    check_envelope,
    new_envelope_id,
    signing_bytes,
)
from gateway.errors import EnvelopeError, EnvelopeOpenError, Reason, RetentionWrapMismatch

if TYPE_CHECKING:  # keys.py imports this module at run time
    from gateway.crypto.keys import PublicKeys, UserKeys

log = logging.getLogger(__name__)

KEY_BYTES = 32  # X25519 secret and public keys, Ed25519 seeds and verify keys
SEALED_BOX_OVERHEAD = 48  # ephemeral public key (32) + Poly1305 tag (16)
MIN_PADDED_BYTES = 256  # smallest bucket: every short message looks the same
MAX_INNER_BYTES = MAX_CIPHERTEXT_BYTES - SEALED_BOX_OVERHEAD
_U32 = struct.Struct(">I")
_FRAME_OVERHEAD = 2 * _U32.size
CONTENT_KEY_BYTES = 32  # XChaCha20-Poly1305 key
AEAD_TAG_BYTES = 16
_ZERO_NONCE = bytes(24)  # every AEAD key here encrypts one message only
RETENTION_EPHEMERAL_DOMAIN = b"gateway-retention-v2-ephemeral\x00"
RETENTION_WRAP_KEY_DOMAIN = b"gateway-retention-v2-wrap-key\x00"


# -- keys ----------------------------------------------------------------------


def generate_secret() -> bytes:
    """32 random bytes: a valid X25519 secret key and a valid Ed25519 seed alike."""
    return secrets.token_bytes(KEY_BYTES)


def derive_public_keys(encryption_secret: bytes, signing_seed: bytes) -> tuple[bytes, bytes]:
    """(X25519 public key, Ed25519 verify key) for the two 32-byte secrets.

    ``ValueError`` if either secret is not 32 bytes.
    """
    if len(encryption_secret) != KEY_BYTES or len(signing_seed) != KEY_BYTES:
        raise ValueError(f"secret keys are {KEY_BYTES} bytes each")
    encryption_public = bytes(PrivateKey(encryption_secret).public_key)
    verify_key = bytes(SigningKey(signing_seed).verify_key)
    return encryption_public, verify_key


# -- padding -------------------------------------------------------------------


def padded_length(frame_length: int) -> int:
    """The bucket a frame of ``frame_length`` bytes is padded to.

    Padmé (Nikitin et al., PETS 2019): keep the top ``floor(log2 E) + 1`` bits
    of the length, where ``E = floor(log2 L)``, and round the rest up. It
    costs at most about 12% and leaks O(log log L) bits of the length. Below
    :data:`MIN_PADDED_BYTES` every frame gets that minimum; the top is clamped
    to :data:`MAX_INNER_BYTES` so a legal frame never makes an illegal
    ciphertext.
    """
    if frame_length < 0 or frame_length > MAX_INNER_BYTES:
        raise ValueError(f"frame length {frame_length} is out of range 0-{MAX_INNER_BYTES}")
    if frame_length <= MIN_PADDED_BYTES:
        return MIN_PADDED_BYTES
    exponent = frame_length.bit_length() - 1  # floor(log2 L)
    low_bits = exponent - exponent.bit_length()  # E - (floor(log2 E) + 1)
    mask = (1 << low_bits) - 1
    return min((frame_length + mask) & ~mask, MAX_INNER_BYTES)


def max_payload_bytes(sender_address: Address) -> int:
    """The largest payload ``sender_address`` can seal within the protocol limit."""
    return MAX_INNER_BYTES - _FRAME_OVERHEAD - len(str(sender_address).encode("ascii"))


def _frame(sender: bytes, payload: bytes) -> bytes:
    frame = _U32.pack(len(sender)) + sender + _U32.pack(len(payload)) + payload
    return frame + bytes(padded_length(len(frame)) - len(frame))


# -- seal ----------------------------------------------------------------------


def seal(
    payload: bytes,
    *,
    sender: UserKeys,
    recipient: PublicKeys,
    created_ms: int,
    expires_ms: int,
    sender_address: Address | None = None,
    recipient_address: Address | None = None,
    envelope_id: str | None = None,
    burn_on_read: bool = False,
) -> Envelope:
    """Encrypt ``payload`` to ``recipient`` and sign it as ``sender``.

    The addresses default to the keys' own; if given, they must equal them.
    Raises ``EnvelopeError`` for a header that would not validate (bad id,
    times, addresses) or a payload over :func:`max_payload_bytes`, and
    ``EnvelopeOpenError`` if the recipient's encryption key is unusable.
    """
    from_address = sender.address if sender_address is None else sender_address
    to_address = recipient.address if recipient_address is None else recipient_address
    if from_address != sender.address:
        raise EnvelopeError(
            f"sender address {from_address} is not the owner of the sender keys ({sender.address})",
            reason=Reason.ENVELOPE_BAD_FROM,
        )
    if to_address != recipient.address:
        raise EnvelopeError(
            f"recipient address {to_address} is not the owner of the recipient keys "
            f"({recipient.address})",
            reason=Reason.ENVELOPE_BAD_TO,
        )
    payload = bytes(payload)
    limit = max_payload_bytes(from_address)
    if len(payload) > limit:
        raise EnvelopeError(
            f"payload of {len(payload)} bytes exceeds the maximum of {limit} bytes",
            reason=Reason.ENVELOPE_TOO_LARGE,
        )
    inner = _frame(str(from_address).encode("ascii"), payload)
    try:
        ciphertext = SealedBox(PublicKey(recipient.encryption_key)).encrypt(inner)
    except CryptoError as exc:
        log.debug("seal for %s failed: recipient encryption key unusable", to_address)
        raise EnvelopeOpenError() from exc
    unsigned = Envelope(
        version=ENVELOPE_VERSION,
        id=new_envelope_id() if envelope_id is None else envelope_id,
        sender=from_address,
        recipient=to_address,
        created=created_ms,
        expires=expires_ms,
        burn_on_read=burn_on_read,
        ciphertext=ciphertext,
        signature=bytes(SIGNATURE_BYTES),
    )
    check_envelope(unsigned)
    signature = SigningKey(sender.signing_seed).sign(signing_bytes(unsigned)).signature
    return replace(unsigned, signature=signature)


def seal_v2(
    payload: bytes,
    *,
    sender: UserKeys,
    recipient: PublicKeys,
    created_ms: int,
    expires_ms: int,
    retention_key_id: str | None = None,
    retention_public_key: bytes | None = None,
    envelope_id: str | None = None,
    burn_on_read: bool = False,
    content_key: bytes | None = None,
) -> Envelope:
    """A version 2 envelope of ``payload`` for ``recipient``, signed as ``sender``.

    With a retention key (its id and X25519 public key, both or neither), the
    content key is wrapped for it too. ``content_key`` is for test vectors
    only: leave it out and a fresh random key is drawn. Errors as :func:`seal`.
    """
    if (retention_key_id is None) != (retention_public_key is None):
        raise ValueError("give both the retention key id and its public key, or neither")
    from_address, to_address = sender.address, recipient.address
    payload = bytes(payload)
    limit = max_payload_bytes(from_address)
    if len(payload) > limit:
        raise EnvelopeError(
            f"payload of {len(payload)} bytes exceeds the maximum of {limit} bytes",
            reason=Reason.ENVELOPE_TOO_LARGE,
        )
    envelope_id = new_envelope_id() if envelope_id is None else envelope_id
    key = secrets.token_bytes(CONTENT_KEY_BYTES) if content_key is None else content_key
    if len(key) != CONTENT_KEY_BYTES:
        raise ValueError(f"a content key is {CONTENT_KEY_BYTES} bytes")
    inner = _frame(str(from_address).encode("ascii"), payload)
    try:
        ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(
            inner, envelope_id.encode("ascii"), _ZERO_NONCE, key
        )
        wrapped_key = crypto_box_seal(key, recipient.encryption_key)
        retention = None
        if retention_key_id is not None and retention_public_key is not None:
            retention = RetentionWrap(
                key_id=retention_key_id,
                public_key=bytes(retention_public_key),
                wrap=retention_wrap(
                    key,
                    envelope_id=envelope_id,
                    key_id=retention_key_id,
                    public_key=retention_public_key,
                ),
            )
    except (CryptoError, UnicodeEncodeError) as exc:
        log.debug("seal for %s failed: an encryption key is unusable", to_address)
        raise EnvelopeOpenError() from exc
    unsigned = Envelope(
        version=ENVELOPE_VERSION_V2,
        id=envelope_id,
        sender=from_address,
        recipient=to_address,
        created=created_ms,
        expires=expires_ms,
        burn_on_read=burn_on_read,
        ciphertext=ciphertext,
        signature=bytes(SIGNATURE_BYTES),
        wrapped_key=wrapped_key,
        retention=retention,
    )
    check_envelope(unsigned)
    signature = SigningKey(sender.signing_seed).sign(signing_bytes(unsigned)).signature
    return replace(unsigned, signature=signature)


# -- retention -------------------------------------------------------------------


def generate_retention_key() -> tuple[bytes, bytes]:
    """(secret, public) X25519 keys for an org's retention key. Run offline."""
    secret = generate_secret()
    return secret, crypto_scalarmult_base(secret)


def retention_public_key(secret: bytes) -> bytes:
    """The X25519 public key of a retention secret key."""
    if len(secret) != KEY_BYTES:
        raise ValueError(f"a retention secret key is {KEY_BYTES} bytes")
    return crypto_scalarmult_base(secret)


def _lv(*fields: bytes) -> bytes:
    return b"".join(_U32.pack(len(field)) + field for field in fields)


def _blake2b_256(data: bytes, *, key: bytes = b"") -> bytes:
    return blake2b(data, digest_size=32, key=key, encoder=RawEncoder)


def _retention_wrap_key(shared: bytes, ephemeral_public: bytes, public_key: bytes) -> bytes:
    return _blake2b_256(RETENTION_WRAP_KEY_DOMAIN + shared + ephemeral_public + public_key)


def retention_wrap(
    content_key: bytes, *, envelope_id: str, key_id: str, public_key: bytes
) -> bytes:
    """The content key wrapped for a retention key: a function of its inputs alone.

    ``e = BLAKE2b-256(key=K, DOMAIN || lv(id) || lv(key_id) || lv(public_key))``;
    ``E = X25519(e, base)``; ``W = BLAKE2b-256(DOMAIN' || X25519(e, public_key) || E ||
    public_key)``; the wrap is ``E || XChaCha20-Poly1305(W, nonce 0, aad = lv(id) ||
    lv(key_id), K)`` (docs/envelope.md §8.3). ``CryptoError`` for an unusable key.
    """
    if len(content_key) != CONTENT_KEY_BYTES or len(public_key) != KEY_BYTES:
        raise ValueError("a content key and a retention public key are 32 bytes each")
    aad = _lv(envelope_id.encode("ascii"), key_id.encode("ascii"))
    ephemeral_secret = _blake2b_256(
        RETENTION_EPHEMERAL_DOMAIN + aad + _lv(public_key), key=content_key
    )
    ephemeral_public = crypto_scalarmult_base(ephemeral_secret)
    shared = crypto_scalarmult(ephemeral_secret, public_key)  # all-zero: CryptoError
    wrap_key = _retention_wrap_key(shared, ephemeral_public, public_key)
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(content_key, aad, _ZERO_NONCE, wrap_key)
    return ephemeral_public + sealed


def open_retention_wrap(wrap: RetentionWrap, *, envelope_id: str, secret: bytes) -> bytes:
    """The content key inside a retention wrap, checked by recomputing the wrap from it.

    For the compliance officer's offline tool, which holds the retention
    secret key. ``EnvelopeOpenError`` if it does not open, or if the wrap is
    not the one its own content key gives.
    """
    content_key = _unwrap_retention(wrap, envelope_id=envelope_id, secret=secret)
    if content_key is None:
        log.debug("retention wrap of envelope %.40r could not be opened", envelope_id)
        raise EnvelopeOpenError()
    return content_key


def _unwrap_retention(wrap: RetentionWrap, *, envelope_id: str, secret: bytes) -> bytes | None:
    if len(secret) != KEY_BYTES or len(wrap.wrap) != RETENTION_WRAP_BYTES:
        return None
    try:
        public_key = retention_public_key(secret)
        ephemeral_public, sealed = wrap.wrap[:KEY_BYTES], wrap.wrap[KEY_BYTES:]
        shared = crypto_scalarmult(secret, ephemeral_public)
        wrap_key = _retention_wrap_key(shared, ephemeral_public, public_key)
        aad = _lv(envelope_id.encode("ascii"), wrap.key_id.encode("ascii"))
        content_key = crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, _ZERO_NONCE, wrap_key)
        honest = hmac.compare_digest(
            retention_wrap(
                content_key, envelope_id=envelope_id, key_id=wrap.key_id, public_key=public_key
            ),
            wrap.wrap,
        )
    except (CryptoError, ValueError, TypeError):
        return None
    return content_key if honest and public_key == wrap.public_key else None


def open_retained(
    env: Envelope, *, retention_secret: bytes, wrap: RetentionWrap | None = None
) -> bytes:
    """The payload of a retained version 2 envelope, opened with the retention secret key.

    ``wrap`` is the retention copy to use: by default the envelope's own (an
    outbound record); for an inbound record, the one the recipient's client
    made. Checks the frame as :func:`open_envelope` does, not the sender's
    signature (the caller checks that with a verify key it trusts).
    ``EnvelopeOpenError``.
    """
    wrap = env.retention if wrap is None else wrap
    if env.version != ENVELOPE_VERSION_V2 or wrap is None:
        _fail(env, "no retention copy")
    content_key = open_retention_wrap(wrap, envelope_id=env.id, secret=retention_secret)
    inner = _decrypt_content(env, content_key)
    if inner is None:
        _fail(env, "content")
    return _unframe(env, inner)


def recipient_retention_wrap(
    env: Envelope, *, recipient: UserKeys, key_id: str, public_key: bytes
) -> bytes:
    """The retention copy a recipient under inbound retention acknowledges ``env`` with.

    The recipient's own org's retention key (``key_id``, ``public_key``) wraps
    the content key the recipient opens from ``wrapped_key``, by the same
    deterministic function as a sender's copy (:func:`retention_wrap`). Only a
    version 2 envelope has a content key; ``EnvelopeOpenError`` otherwise, or
    if it does not open. Call it for envelopes :func:`open_envelope` opened.
    """
    if env.version != ENVELOPE_VERSION_V2 or env.recipient != recipient.address:
        _fail(env, "no content key for these keys")
    content_key = _unwrap_for_recipient(env, recipient)
    if content_key is None:
        _fail(env, "wrapped key")
    try:
        return retention_wrap(content_key, envelope_id=env.id, key_id=key_id, public_key=public_key)
    except (CryptoError, ValueError) as exc:
        log.debug("envelope %.40r: retention key unusable", env.id)
        raise EnvelopeOpenError() from exc


# -- open ----------------------------------------------------------------------


def open_envelope(env: Envelope, *, recipient: UserKeys, sender_verify_key: bytes) -> bytes:
    """The payload of ``env``, or ``EnvelopeOpenError`` (always the same one).

    ``sender_verify_key`` is the Ed25519 key the caller trusts for
    ``env.sender`` (from a key record signed by the sender's org). Expiry is
    not checked here: that needs a clock, see
    :func:`gateway.core.envelope.validate_envelope`.
    """
    if not _signature_verifies(env, sender_verify_key):
        _fail(env, "signature")
    if env.recipient != recipient.address:
        _fail(env, "not addressed to these keys")
    if env.version == ENVELOPE_VERSION_V2:
        return _open_v2(env, recipient)
    inner = _decrypt(env, recipient.encryption_secret)
    if inner is None:
        _fail(env, "sealed box")
    return _unframe(env, inner)


def _open_v2(env: Envelope, recipient: UserKeys) -> bytes:
    content_key = _unwrap_for_recipient(env, recipient)
    if content_key is None:
        _fail(env, "wrapped key")
    inner = _decrypt_content(env, content_key)
    if inner is None:
        _fail(env, "content")
    payload = _unframe(env, inner)
    retention = env.retention
    if retention is not None and not _retention_wrap_matches(env, retention, content_key):
        # Signed by the sender and opened: only that sender learns anything here.
        log.warning("envelope %.40r: the retention copy does not match its content key", env.id)
        raise RetentionWrapMismatch()
    return payload


def _unwrap_for_recipient(env: Envelope, recipient: UserKeys) -> bytes | None:
    try:
        public = bytes(PrivateKey(recipient.encryption_secret).public_key)
        content_key = crypto_box_seal_open(
            bytes(env.wrapped_key or b""), public, recipient.encryption_secret
        )
    except (CryptoError, ValueError, TypeError):
        return None
    return content_key if len(content_key) == CONTENT_KEY_BYTES else None


def _decrypt_content(env: Envelope, content_key: bytes) -> bytes | None:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(
            bytes(env.ciphertext), env.id.encode("ascii"), _ZERO_NONCE, content_key
        )
    except (CryptoError, ValueError, TypeError):
        return None


def _retention_wrap_matches(env: Envelope, retention: RetentionWrap, content_key: bytes) -> bool:
    try:
        expected = retention_wrap(
            content_key,
            envelope_id=env.id,
            key_id=retention.key_id,
            public_key=retention.public_key,
        )
    except (CryptoError, ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, bytes(retention.wrap))


def _signature_verifies(env: Envelope, verify_key: bytes) -> bool:
    try:
        VerifyKey(verify_key).verify(signing_bytes(env), env.signature)
    except (CryptoError, ValueError, TypeError, AttributeError):
        # ValueError includes UnicodeEncodeError from a header holding lone
        # surrogates; TypeError and AttributeError a header of the wrong types.
        return False
    return True


def _decrypt(env: Envelope, encryption_secret: bytes) -> bytes | None:
    try:
        return SealedBox(PrivateKey(encryption_secret)).decrypt(bytes(env.ciphertext))
    except (CryptoError, ValueError, TypeError):
        return None


def _unframe(env: Envelope, inner: bytes) -> bytes:
    if len(inner) < _FRAME_OVERHEAD:
        _fail(env, "frame too short")
    (sender_length,) = _U32.unpack_from(inner, 0)
    payload_offset = _U32.size + sender_length + _U32.size
    if payload_offset > len(inner):
        _fail(env, "sender length")
    sender = inner[_U32.size : _U32.size + sender_length]
    (payload_length,) = _U32.unpack_from(inner, _U32.size + sender_length)
    frame_end = payload_offset + payload_length
    if frame_end > len(inner):
        _fail(env, "payload length")
    if frame_end > MAX_INNER_BYTES or len(inner) != padded_length(frame_end):
        _fail(env, "padding length")
    if inner[frame_end:] != bytes(len(inner) - frame_end):
        _fail(env, "padding not zero")
    if sender != str(env.sender).encode("utf-8"):
        _fail(env, "inner sender differs from header")
    return inner[payload_offset:frame_end]


def _fail(env: Envelope, step: str) -> NoReturn:
    # Never called inside an `except` block, so the error carries no context
    # that would tell which check failed. The id is the only header field
    # logged: it names the envelope and is random, so it says nothing about
    # the conversation.
    log.debug("envelope %.40r could not be opened: %s", getattr(env, "id", None), step)
    raise EnvelopeOpenError()
