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
"""

from __future__ import annotations

import logging
import secrets
import struct
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from gateway.core.address import Address
from gateway.core.envelope import (
    ENVELOPE_VERSION,
    MAX_CIPHERTEXT_BYTES,
    SIGNATURE_BYTES,
    Envelope,
    check_envelope,
    new_envelope_id,
    signing_bytes,
)
from gateway.errors import EnvelopeError, EnvelopeOpenError, Reason

if TYPE_CHECKING:  # keys.py imports this module at run time
    from gateway.crypto.keys import PublicKeys, UserKeys

log = logging.getLogger(__name__)

KEY_BYTES = 32  # X25519 secret and public keys, Ed25519 seeds and verify keys
SEALED_BOX_OVERHEAD = 48  # ephemeral public key (32) + Poly1305 tag (16)
MIN_PADDED_BYTES = 256  # smallest bucket: every short message looks the same
MAX_INNER_BYTES = MAX_CIPHERTEXT_BYTES - SEALED_BOX_OVERHEAD
_U32 = struct.Struct(">I")
_FRAME_OVERHEAD = 2 * _U32.size


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
    inner = _decrypt(env, recipient.encryption_secret)
    if inner is None:
        _fail(env, "sealed box")
    return _unframe(env, inner)


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
