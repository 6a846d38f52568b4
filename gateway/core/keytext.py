"""The textual form of an org's Ed25519 signing (verify) key: ``ed25519:<base64url>``.

base64url without padding of the raw 32-byte public key, as everywhere on the
wire. This is what `gateway peer card` prints and a partner pastes under
``peers.<org>.signing_key``.
"""

from __future__ import annotations

import re

from gateway.core.encoding import b64url_decode_canonical, b64url_encode

SIGNING_KEY_PREFIX = "ed25519:"
_KEY_RE = re.compile(r"ed25519:[A-Za-z0-9_-]{43}")
# An org's retention key (docs/retention.md): what `gateway retention keygen` prints.
RETENTION_KEY_PREFIX = "x25519:"
_RETENTION_KEY_RE = re.compile(r"x25519:[A-Za-z0-9_-]{43}")


def format_retention_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    return RETENTION_KEY_PREFIX + b64url_encode(public_key)


def parse_retention_key(text: str) -> bytes:
    """The raw 32-byte key of ``x25519:...``; ``ValueError`` saying what is wrong."""
    if not isinstance(text, str) or not _RETENTION_KEY_RE.fullmatch(text):
        raise ValueError(
            f"invalid retention key {text!r}: expected x25519: and 43 characters of "
            "base64url (see `gateway retention keygen`)"
        )
    try:
        raw = b64url_decode_canonical(text[len(RETENTION_KEY_PREFIX) :])
    except ValueError:
        raise ValueError(f"invalid retention key {text!r}: not canonical base64url") from None
    return raw


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
    try:
        raw = b64url_decode_canonical(text[len(SIGNING_KEY_PREFIX) :])
    except ValueError:
        raise ValueError(f"invalid signing key {text!r}: not canonical base64url") from None
    if len(raw) != 32:
        raise ValueError(f"invalid signing key {text!r}: not 32 bytes")
    return raw
