"""Client API bearer tokens: made here, stored only as their SHA-256.

A token is ``gwt_`` followed by 32 random bytes in unpadded base64url (47
characters in all). ``gateway token issue`` shows it once; the store keeps
``SHA-256(token)`` and the user's address, nothing else, so a copy of the
database opens no account. A request is authenticated by hashing the token it
carries and looking the hash up: the comparison happens on a hash the caller
cannot steer, so its timing says nothing about the token.

The prefix lets secret scanners and humans recognize a leaked token; a header
that does not carry a well-formed token is refused before any lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from gateway.core.address import Address
from gateway.core.encoding import b64url_encode
from gateway.core.rules import CompiledRules
from gateway.errors import AddressError
from gateway.storage.base import Storage

TOKEN_PREFIX = "gwt_"  # noqa: S105 -- a public prefix, not a secret
TOKEN_RANDOM_BYTES = 32
TOKEN_LENGTH = len(TOKEN_PREFIX) + 43  # 32 bytes are 43 characters of unpadded base64url
BEARER_SCHEME = "bearer"  # compared case-insensitively (RFC 9110 11.1)
# 32 bytes in unpadded base64url: the last character carries four bits, so
# its low two bits are zero: one of A E I M Q U Y c g k o s w 0 4 8.
_TOKEN_RE = re.compile(r"gwt_[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")


def new_token() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + b64url_encode(secrets.token_bytes(TOKEN_RANDOM_BYTES))


def is_well_formed(token: str) -> bool:
    return _TOKEN_RE.fullmatch(token) is not None


def token_hash(token: str) -> bytes:
    """What the store keeps of ``token``: its SHA-256."""
    return hashlib.sha256(token.encode("ascii")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The well-formed token of an ``Authorization: Bearer <token>`` value, or ``None``."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    token = credentials.strip()
    if scheme.lower() != BEARER_SCHEME or not is_well_formed(token):
        return None
    return token


def resolve_user(text: str, rules: CompiledRules) -> Address:
    """The address of ``text`` (a user name or a full address of the rules' org).

    ``ValueError`` saying what is wrong: not a user name or address, another
    org's address, or a user who is in no group of the rules.
    """
    address = parse_local_user(text, rules.org)
    if rules.group_of(address.user) is None:
        raise ValueError(f"{address} is in no group of the rules: add them to a group first")
    return address


def parse_local_user(text: str, org: str) -> Address:
    """``text`` (``alice`` or ``alice@org``) as an address of ``org``; ``ValueError`` if not."""
    try:
        address = Address.parse(text) if "@" in text else Address.of(text, org)
    except AddressError as exc:
        raise ValueError(f"{text!r} is not a user name or address: {exc}") from None
    if address.org != org:
        raise ValueError(f"{address} is not a user of {org}")
    return address


async def issue_token(storage: Storage, user: Address, *, at_ms: int) -> str:
    """Make a token for ``user``, store its hash, return it (the only copy)."""
    token = new_token()
    await storage.token_put(str(user), token_hash(token), at_ms=at_ms)
    return token


async def revoke_tokens(storage: Storage, user: Address) -> int:
    """Revoke every token of ``user``; how many there were."""
    return await storage.token_revoke(str(user))


async def authenticate(storage: Storage, authorization: str | None) -> Address | None:
    """The user whose live token the ``Authorization`` header carries, or ``None``."""
    token = bearer_token(authorization)
    if token is None:
        return None
    user = await storage.token_lookup(token_hash(token))
    if user is None:
        return None
    try:
        return Address.parse(user)
    except AddressError:
        return None  # a row no issue_token wrote: refuse rather than guess
