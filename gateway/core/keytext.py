"""The textual form of an org's Ed25519 signing (verify) key: ``ed25519:<base64url>``.

base64url without padding of the raw 32-byte public key, as everywhere on the
wire. This is what `gateway peer card` prints and a partner pastes under
``peers.<org>.signing_key``.
"""

from __future__ import annotations

import base64
import binascii
import re

SIGNING_KEY_PREFIX = "ed25519:"
_KEY_RE = re.compile(r"ed25519:[A-Za-z0-9_-]{43}")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded (or padded) base64url; ``ValueError`` on anything else."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1:
        raise ValueError("not base64url: impossible length")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def format_signing_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return SIGNING_KEY_PREFIX + b64url_encode(public_key)


def parse_signing_key(text: str) -> bytes:
    """The raw 32-byte key of ``ed25519:...``; ``ValueError`` saying what is wrong."""
    if not isinstance(text, str) or not _KEY_RE.fullmatch(text):
        raise ValueError(
            f"invalid signing key {text!r}: expected ed25519: and 43 characters of "
            "base64url (see `gateway peer card`)"
        )
    raw = b64url_decode(text[len(SIGNING_KEY_PREFIX) :])
    if len(raw) != 32:
        raise ValueError(f"invalid signing key {text!r}: not 32 bytes")
    return raw
