"""The envelope: one message for one recipient, as it crosses org boundaries.

An envelope is a routing header in the clear plus an opaque ciphertext that
only the recipient's key opens (see :mod:`gateway.crypto.envelope_crypto`).
This module is pure: it parses, encodes, validates and computes the bytes a
sender signs. It never touches a key. docs/envelope.md is the specification
a partner implements; the constants below are its numbers.

Three layers of checking, each a superset of the one before:

* :meth:`Envelope.from_json` / :func:`decode_envelope` accept only a
  well-formed envelope: exact JSON types, no unknown or missing field,
  canonical base64url, every value in range, ``expires > created``. Any other
  input, however broken, raises :class:`~gateway.errors.EnvelopeError` and
  nothing else.
* :func:`validate_envelope` repeats those value checks (for envelopes built in
  code) and adds the checks that need the time: not expired, not created in
  the future beyond :data:`MAX_CLOCK_SKEW_MS`.
* The signature and the ciphertext are checked only by the recipient's
  client: a gateway cannot and does not open an envelope.

The ``group`` field is the sender's security group, asserted by the origin
gateway after the client signed; it is deliberately outside the signature.

Cost (docs/performance.md): a gateway never needs the ciphertext's bytes, only
its size and its text, so an envelope parsed by :meth:`Envelope.from_json`
keeps the ciphertext as the canonical base64url text it arrived in. The text
is checked in C without decoding (:func:`is_canonical_b64url`: the alphabet,
then the unused bits of its last character), and its length gives the exact
byte count; the bytes are decoded on first use of ``env.ciphertext`` (the
recipient's client), and :func:`encode_envelope` writes the text back as it
came, without a JSON encoder scanning it. Every envelope, parsed
or built in code, still has one value and one encoding: equality, hashing and
``dataclasses.replace`` see the bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
import secrets
import struct
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NoReturn, TypeVar, cast

from gateway.errors import AddressError, EnvelopeError, Reason

from .address import Address
from .encoding import b64url_decode_canonical, b64url_encode, is_canonical_b64url, loads_strict

ENVELOPE_VERSION = 1
# Version 2: the payload under one content key, wrapped for the recipient and,
# for a group under retention, for the org's retention key (docs/envelope.md §8).
ENVELOPE_VERSION_V2 = 2
SUPPORTED_ENVELOPE_VERSIONS: Final = (ENVELOPE_VERSION, ENVELOPE_VERSION_V2)

# -- bounds (docs/envelope.md, "Limits") ---------------------------------------
MAX_CIPHERTEXT_BYTES = 1024 * 1024  # hard protocol limit; groups set lower ones
ENVELOPE_ID_BYTES = 16
SIGNATURE_BYTES = 64  # Ed25519
X25519_KEY_BYTES = 32
# A content key sealed for the recipient: libsodium's sealed box of 32 bytes.
WRAPPED_KEY_BYTES = 32 + 48
# The retention wrap: an X25519 public key, then the content key under AEAD.
RETENTION_WRAP_BYTES = 32 + 32 + 16
MAX_TIME_MS = 2**53 - 1  # largest integer every JSON implementation holds exactly
MAX_ENVELOPE_TTL_MS = 366 * 24 * 3600 * 1000  # expires - created, at most
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000  # how far in the future `created` may lie
# Room for everything but the ciphertext in an encoded envelope: two addresses
# of at most 318 characters, the id, the group, times, keys, the base64 of the
# signature, and generous slack for whitespace a partner's encoder may add.
_MAX_HEADER_BYTES = 4096
# Parsed addresses remembered (a batch names the same few again and again);
# at most ~650 bytes each, so the cache stays under a megabyte.
ADDRESS_CACHE_SIZE: Final = 1024


def _b64url_length(n: int) -> int:
    """Characters of unpadded base64url for ``n`` bytes."""
    return (4 * n + 2) // 3


MAX_CIPHERTEXT_B64_CHARS = _b64url_length(MAX_CIPHERTEXT_BYTES)
MAX_ENCODED_ENVELOPE_BYTES = MAX_CIPHERTEXT_B64_CHARS + _MAX_HEADER_BYTES

# 16 bytes in unpadded base64url are 22 characters; the last one carries only
# two bits, so it is one of A Q g w (the other four bits are zero).
ENVELOPE_ID_RE = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
GROUP_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

SIGNING_DOMAIN = b"gateway-envelope-v1\x00"
SIGNING_DOMAIN_V2 = b"gateway-envelope-v2\x00"
# Names an org's retention key in the rules and in every envelope wrapped for it.
RETENTION_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_REQUIRED_FIELDS = frozenset(
    {"v", "id", "from", "to", "created", "expires", "burn_on_read", "ciphertext", "signature"}
)
_OPTIONAL_FIELDS = frozenset({"group"})
_T = TypeVar("_T")
_ALL_FIELDS = _REQUIRED_FIELDS | _OPTIONAL_FIELDS
_RETENTION_FIELDS = frozenset({"retention_key_id", "retention_key", "retention_wrap"})
_REQUIRED_FIELDS_V2 = _REQUIRED_FIELDS | {"wrapped_key"}
_ALL_FIELDS_V2 = _REQUIRED_FIELDS_V2 | _OPTIONAL_FIELDS | _RETENTION_FIELDS


@dataclass(frozen=True, slots=True)
class RetentionWrap:
    """A version 2 envelope's copy of its content key for the org's retention key.

    ``key_id`` names the retention key in the origin org's rules and
    ``public_key`` is that key, so that a recipient can recompute ``wrap``
    from the content key it opened and compare (docs/envelope.md §8).
    """

    key_id: str
    public_key: bytes = dataclasses.field(repr=False)  # X25519, 32 bytes
    wrap: bytes = dataclasses.field(repr=False)  # RETENTION_WRAP_BYTES


@dataclass(frozen=True, slots=True)
class Envelope:
    """One envelope. ``sender``/``recipient`` are the wire fields ``from``/``to``.

    Construction does not validate (a test may build a broken one on purpose);
    :meth:`from_json` and :func:`validate_envelope` do.
    """

    version: int
    id: str
    sender: Address
    recipient: Address
    created: int  # Unix time, milliseconds
    expires: int  # Unix time, milliseconds
    burn_on_read: bool
    ciphertext: bytes = dataclasses.field(repr=False)
    signature: bytes = dataclasses.field(repr=False)
    group: str | None = None  # added by the origin gateway; not signed
    # Version 2 only: the content key sealed for the recipient, and its
    # retention copy when the sender's group is under retention.
    wrapped_key: bytes | None = dataclasses.field(default=None, repr=False)
    retention: RetentionWrap | None = None

    @property
    def size(self) -> int:
        """The size that policy limits (``max_envelope_bytes``) apply to."""
        held = _CIPHERTEXT_SLOT.__get__(self, Envelope)
        return held.size if type(held) is _WireCiphertext else len(held)

    @property
    def ttl_ms(self) -> int:
        return self.expires - self.created

    def with_group(self, group: str | None) -> Envelope:
        """This envelope with the origin gateway's group assertion set (or removed)."""
        if group is not None:
            _check_group(group)
        # Not dataclasses.replace: that would read (so decode) the ciphertext.
        return Envelope(
            version=self.version,
            id=self.id,
            sender=self.sender,
            recipient=self.recipient,
            created=self.created,
            expires=self.expires,
            burn_on_read=self.burn_on_read,
            ciphertext=_CIPHERTEXT_SLOT.__get__(self, Envelope),
            signature=self.signature,
            group=group,
            wrapped_key=self.wrapped_key,
            retention=self.retention,
        )

    def to_json(self) -> dict[str, object]:
        obj: dict[str, object] = {
            "v": self.version,
            "id": self.id,
            "from": str(self.sender),
            "to": str(self.recipient),
            "created": self.created,
            "expires": self.expires,
            "burn_on_read": self.burn_on_read,
        }
        if self.group is not None:
            obj["group"] = self.group
        held = _CIPHERTEXT_SLOT.__get__(self, Envelope)
        obj["ciphertext"] = held.text if type(held) is _WireCiphertext else b64url_encode(held)
        obj["signature"] = b64url_encode(self.signature)
        if self.wrapped_key is not None:
            obj["wrapped_key"] = b64url_encode(self.wrapped_key)
        if self.retention is not None:
            obj["retention_key_id"] = self.retention.key_id
            obj["retention_key"] = b64url_encode(self.retention.public_key)
            obj["retention_wrap"] = b64url_encode(self.retention.wrap)
        return obj

    @classmethod
    def from_json(cls, obj: object) -> Envelope:
        """A well-formed envelope from its JSON object, or ``EnvelopeError``."""
        if not isinstance(obj, dict):
            _fail(f"envelope must be a JSON object, got {_kind(obj)}")
        if "v" not in obj:
            _fail("envelope has no field 'v' (version)")
        version = obj["v"]
        if type(version) is not int:
            _fail(f"envelope field 'v' must be an integer, got {_kind(version)}")
        if version == ENVELOPE_VERSION:
            allowed, required = _ALL_FIELDS, _REQUIRED_FIELDS
        elif version == ENVELOPE_VERSION_V2:
            allowed, required = _ALL_FIELDS_V2, _REQUIRED_FIELDS_V2
        else:
            _fail(
                f"envelope version {_short(version)} is not supported "
                f"(this gateway speaks {', '.join(map(str, SUPPORTED_ENVELOPE_VERSIONS))})",
                Reason.ENVELOPE_BAD_VERSION,
            )
        keys = obj.keys()
        if not keys <= allowed:  # set comparisons in C; the lists only for the message
            unknown = [key for key in obj if key not in allowed]
            names = ", ".join(_short(key) for key in sorted(map(str, unknown))[:5])
            _fail(f"envelope has unknown field(s): {names}")
        if not keys >= required:
            missing = sorted(required - keys)
            _fail(f"envelope is missing field(s): {', '.join(missing)}")

        # The size check comes before any decoding, so a huge ciphertext costs
        # nothing more than having been received.
        ciphertext_text = _get(obj, "ciphertext", str)
        if len(ciphertext_text) > MAX_CIPHERTEXT_B64_CHARS:
            _fail(
                f"envelope ciphertext is larger than {MAX_CIPHERTEXT_BYTES} bytes",
                Reason.ENVELOPE_TOO_LARGE,
            )
        envelope_id = _get(obj, "id", str)
        sender = _parse_address(_get(obj, "from", str), "from", Reason.ENVELOPE_BAD_FROM)
        recipient = _parse_address(_get(obj, "to", str), "to", Reason.ENVELOPE_BAD_TO)
        created = _get(obj, "created", int)
        expires = _get(obj, "expires", int)
        burn_on_read = _get(obj, "burn_on_read", bool)
        group = _get(obj, "group", str) if "group" in obj else None
        if not is_canonical_b64url(ciphertext_text):
            _fail("envelope field 'ciphertext' is not canonical unpadded base64url")
        try:
            signature = b64url_decode_canonical(_get(obj, "signature", str))
        except ValueError:
            _fail(
                "envelope field 'signature' is not canonical unpadded base64url",
                Reason.ENVELOPE_BAD_SIGNATURE,
            )
        env = cls(
            version=version,
            id=envelope_id,
            sender=sender,
            recipient=recipient,
            created=created,
            expires=expires,
            burn_on_read=burn_on_read,
            ciphertext=_WireCiphertext.held(ciphertext_text),
            signature=signature,
            group=group,
            wrapped_key=_get_key(obj, "wrapped_key") if version == ENVELOPE_VERSION_V2 else None,
            retention=_get_retention(obj) if version == ENVELOPE_VERSION_V2 else None,
        )
        # The addresses were parsed into their normal form just above.
        _check_values(env, addresses=False)
        return env


class _WireCiphertext:
    """A ciphertext in its canonical base64url text, decoded on first use.

    Made only by :meth:`Envelope.from_json` after the text was checked
    canonical, so ``size`` is exact and decoding cannot fail.
    """

    __slots__ = ("_raw", "size", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.size = len(text) * 3 // 4  # 6 bits a character, trailing bits unused
        self._raw: bytes | None = None

    @classmethod
    def held(cls, text: str) -> bytes:
        """One to put in an ``Envelope``'s ``ciphertext`` (typed as what reading it gives)."""
        return cast(bytes, cls(text))

    def raw(self) -> bytes:
        if self._raw is None:
            # Written by this gateway into a frozen envelope's slot: a cache, not state.
            self._raw = base64.urlsafe_b64decode(self.text + "=" * (-len(self.text) % 4))
        return self._raw


class _CiphertextField:
    """``Envelope.ciphertext``: always bytes to a reader, whatever the slot holds.

    It replaces the slot's own descriptor on the class (and uses it to reach
    the slot), so the dataclass machinery, ``__eq__``, ``__hash__`` and
    ``dataclasses.replace`` included, works unchanged and sees bytes.
    """

    def __init__(self, slot: types.MemberDescriptorType) -> None:
        self._slot = slot

    def __get__(self, obj: Envelope | None, owner: type | None = None) -> object:
        if obj is None:
            return self
        held = self._slot.__get__(obj, owner)
        return held.raw() if type(held) is _WireCiphertext else held

    def __set__(self, obj: Envelope, value: object) -> None:
        self._slot.__set__(obj, value)


_CIPHERTEXT_SLOT: Final = cast(types.MemberDescriptorType, Envelope.__dict__["ciphertext"])
setattr(Envelope, "ciphertext", _CiphertextField(_CIPHERTEXT_SLOT))  # noqa: B010 -- see above


# -- encoding ------------------------------------------------------------------


# One encoder, built once: json.dumps with options builds a new one per call.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def encode_envelope(env: Envelope) -> bytes:
    """Compact JSON with sorted keys: the one encoding this gateway writes."""
    held = _CIPHERTEXT_SLOT.__get__(env, Envelope)
    if type(held) is _WireCiphertext:
        ciphertext = held.text  # only from_json and with_group make these, from checked values
    else:
        try:
            check_envelope(env)
        except EnvelopeError:
            # A broken envelope (a test builds them on purpose): let JSON escape what it must.
            return _CANONICAL_JSON(env.to_json()).encode("ascii")
        ciphertext = b64url_encode(held)
    return _encode_checked(
        version=env.version,
        envelope_id=env.id,
        sender=str(env.sender),
        recipient=str(env.recipient),
        created=env.created,
        expires=env.expires,
        burn_on_read=env.burn_on_read,
        group=env.group,
        ciphertext=ciphertext,
        signature=b64url_encode(env.signature),
        **_v2_members(env.to_json() if env.version != ENVELOPE_VERSION else {}),
    )


def encode_validated(raw: Mapping[str, object], group: str | None) -> bytes:
    """``encode_envelope(Envelope.from_json(raw).with_group(group))``, from ``raw`` itself.

    Only for a ``raw`` that :meth:`Envelope.from_json` accepted, unchanged since:
    that accepts only the exact ``to_json()`` of its envelope (known keys,
    strict types, addresses in normal form, canonical base64url), so its values
    are written as they are, with no second encoding. ``group`` replaces the one
    in ``raw`` (``None`` removes it) and is checked.
    """
    if group is not None:
        _check_group(group)
    return _encode_checked(
        version=cast(int, raw["v"]),
        envelope_id=cast(str, raw["id"]),
        sender=cast(str, raw["from"]),
        recipient=cast(str, raw["to"]),
        created=cast(int, raw["created"]),
        expires=cast(int, raw["expires"]),
        burn_on_read=cast(bool, raw["burn_on_read"]),
        group=group,
        ciphertext=cast(str, raw["ciphertext"]),
        signature=cast(str, raw["signature"]),
        **_v2_members(raw),
    )


def with_group_member(data: bytes, old: str | None, new: str | None) -> bytes:
    """The canonical encoding ``data`` (whose group is ``old``) with group ``new`` instead.

    Only for ``data`` known to be canonical (it equals :func:`encode_validated`
    of its own values): its strings hold no quote, so the first ``,"id":"`` is
    the ``id`` key, which ``group`` precedes. The bytes around the member are
    kept as they are: a splice, not a second encoding. Searched from the end:
    only the signature and the recipient (and version 2's retention members)
    follow, never the ciphertext.
    """
    if old == new:
        return data
    member = _group_member(new)
    if old is None:
        at = data.rindex(b',"id":"') + 1
        return data[:at] + member + data[at:]
    current = _group_member(old)
    at = data.rindex(current)
    return data[:at] + member + data[at + len(current) :]


@functools.lru_cache(maxsize=256)  # groups come from the rules: a few names
def _group_member(group: str | None) -> bytes:
    """The canonical encoding's ``group`` member and its comma (checked), or nothing."""
    if group is None:
        return b""
    _check_group(group)
    return b'"group":"' + group.encode("ascii") + b'",'


def _v2_members(raw: Mapping[str, object]) -> dict[str, str]:
    """The members only version 2 has, as :func:`_encode_checked` takes them.

    The values are checked base64url and key ids: no character JSON escapes.
    """
    if "wrapped_key" not in raw:
        return {}
    retention = "".join(
        f'"{name}":"{raw[name]}",' for name in sorted(_RETENTION_FIELDS) if name in raw
    )
    return {"retention_members": retention, "wrapped_key": cast(str, raw["wrapped_key"])}


def _encode_checked(
    *,
    version: int,
    envelope_id: str,
    sender: str,
    recipient: str,
    created: int,
    expires: int,
    burn_on_read: bool,
    group: str | None,
    ciphertext: str,
    signature: str,
    retention_members: str = "",
    wrapped_key: str | None = None,
) -> bytes:
    """The canonical encoding of checked values, written directly.

    Byte for byte what ``json.dumps(to_json(), sort_keys=True,
    separators=(",", ":"))`` gives, because every string of a checked envelope
    (addresses in normal form, base64url, the id and group patterns) is
    printable ASCII without quote or backslash, so JSON writes it as it is, and
    JSON writes an integer as ``str()`` does. The keys are in sorted order.
    The JSON encoder, which would scan every character of a ciphertext of up
    to a megabyte for escapes, is not needed.
    """
    group_member = "" if group is None else f'"group":"{group}",'
    # Version 2's retention members sort between "id" and "signature", its
    # wrapped key last (see _v2_members).
    wrapped_member = "" if wrapped_key is None else f',"wrapped_key":"{wrapped_key}"'
    return (
        f'{{"burn_on_read":{"true" if burn_on_read else "false"},'
        f'"ciphertext":"{ciphertext}","created":{created},"expires":{expires},'
        f'"from":"{sender}",{group_member}"id":"{envelope_id}",{retention_members}'
        f'"signature":"{signature}","to":"{recipient}","v":{version}{wrapped_member}}}'
    ).encode("ascii")


def decode_envelope(data: bytes | bytearray | memoryview) -> Envelope:
    """An envelope from any bytes, or ``EnvelopeError``; never another exception."""
    if not isinstance(data, bytes | bytearray | memoryview):
        _fail(f"envelope must be bytes, got {_kind(data)}")
    if len(data) > MAX_ENCODED_ENVELOPE_BYTES:
        _fail(
            f"encoded envelope is larger than {MAX_ENCODED_ENVELOPE_BYTES} bytes",
            Reason.ENVELOPE_TOO_LARGE,
        )
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        _fail("envelope is not UTF-8")
    try:
        obj = loads_strict(text)
    except ValueError:
        _fail("envelope is not valid JSON")
    return Envelope.from_json(obj)


def new_envelope_id() -> str:
    """A fresh random envelope id: 16 random bytes, base64url (22 characters)."""
    return b64url_encode(secrets.token_bytes(ENVELOPE_ID_BYTES))


# -- signing -------------------------------------------------------------------


def signing_bytes(env: Envelope) -> bytes:
    """The bytes the sender's Ed25519 key signs (docs/envelope.md, "Signature").

    The domain prefix, then v, id, from, to, created, expires, burn_on_read and
    the ciphertext, each as a 4-byte big-endian length and its bytes. ``group``
    and ``signature`` are not covered.
    """
    if env.version == ENVELOPE_VERSION_V2:
        return _signing_bytes_v2(env)
    fields = (
        str(env.version).encode(),
        env.id.encode(),
        str(env.sender).encode(),
        str(env.recipient).encode(),
        str(env.created).encode(),
        str(env.expires).encode(),
        b"1" if env.burn_on_read else b"0",
        bytes(env.ciphertext),
    )
    parts = [SIGNING_DOMAIN]
    for field in fields:
        parts.append(struct.pack(">I", len(field)))
        parts.append(field)
    return b"".join(parts)


def _signing_bytes_v2(env: Envelope) -> bytes:
    """Version 2: v1's fields under its own prefix, then every wrapped key.

    The wrapped key, then the retention key id, key and wrap; each of the
    three is empty when the envelope has no retention copy (a key id is never
    empty, so absent and present cannot be confused).
    """
    retention = env.retention
    fields = (
        str(env.version).encode(),
        env.id.encode(),
        str(env.sender).encode(),
        str(env.recipient).encode(),
        str(env.created).encode(),
        str(env.expires).encode(),
        b"1" if env.burn_on_read else b"0",
        bytes(env.ciphertext),
        bytes(env.wrapped_key or b""),
        b"" if retention is None else retention.key_id.encode(),
        b"" if retention is None else bytes(retention.public_key),
        b"" if retention is None else bytes(retention.wrap),
    )
    parts = [SIGNING_DOMAIN_V2]
    for field in fields:
        parts.append(struct.pack(">I", len(field)))
        parts.append(field)
    return b"".join(parts)


# -- validation ----------------------------------------------------------------


def check_envelope(env: Envelope) -> None:
    """Every check that needs no clock; ``EnvelopeError`` with the reason of the first failure."""
    _check_values(env, addresses=True)


def _check_values(env: Envelope, *, addresses: bool) -> None:
    if type(env.version) is not int or env.version not in SUPPORTED_ENVELOPE_VERSIONS:
        _fail(
            f"envelope version {_short(env.version)} is not supported",
            Reason.ENVELOPE_BAD_VERSION,
        )
    if not isinstance(env.id, str) or not ENVELOPE_ID_RE.fullmatch(env.id):
        _fail(
            f"envelope id {_short(env.id)} is not 16 bytes of unpadded base64url (22 characters)",
            Reason.ENVELOPE_BAD_ID,
        )
    if addresses:
        _check_address(env.sender, "from", Reason.ENVELOPE_BAD_FROM)
        _check_address(env.recipient, "to", Reason.ENVELOPE_BAD_TO)
    for name, value in (("created", env.created), ("expires", env.expires)):
        if type(value) is not int or not 0 <= value <= MAX_TIME_MS:
            _fail(
                f"envelope field {name!r} must be a Unix time in milliseconds "
                f"from 0 to {MAX_TIME_MS}",
                Reason.ENVELOPE_BAD_TIME,
            )
    if env.expires <= env.created:
        _fail("envelope expires at or before it was created", Reason.ENVELOPE_BAD_TIME)
    if env.expires - env.created > MAX_ENVELOPE_TTL_MS:
        _fail(
            f"envelope lifetime exceeds the protocol maximum of {MAX_ENVELOPE_TTL_MS} ms",
            Reason.ENVELOPE_BAD_TIME,
        )
    if type(env.burn_on_read) is not bool:
        _fail("envelope field 'burn_on_read' must be true or false")
    if env.group is not None:
        _check_group(env.group)
    held = _CIPHERTEXT_SLOT.__get__(env, Envelope)
    if type(held) is not _WireCiphertext and not isinstance(held, bytes):
        _fail("envelope ciphertext must be non-empty bytes")
    if not env.size:
        _fail("envelope ciphertext must be non-empty bytes")
    if env.size > MAX_CIPHERTEXT_BYTES:
        _fail(
            f"envelope ciphertext of {env.size} bytes exceeds the protocol "
            f"limit of {MAX_CIPHERTEXT_BYTES}",
            Reason.ENVELOPE_TOO_LARGE,
        )
    if not isinstance(env.signature, bytes) or len(env.signature) != SIGNATURE_BYTES:
        _fail(f"envelope signature must be {SIGNATURE_BYTES} bytes", Reason.ENVELOPE_BAD_SIGNATURE)
    _check_key_wraps(env)


def _check_key_wraps(env: Envelope) -> None:
    if env.version == ENVELOPE_VERSION:
        if env.wrapped_key is not None or env.retention is not None:
            _fail("a version 1 envelope has no wrapped keys")
        return
    wrapped = env.wrapped_key
    if not isinstance(wrapped, bytes) or len(wrapped) != WRAPPED_KEY_BYTES:
        _fail(f"envelope field 'wrapped_key' must be {WRAPPED_KEY_BYTES} bytes")
    retention = env.retention
    if retention is None:
        return
    if not isinstance(retention, RetentionWrap):
        _fail("envelope retention copy is malformed", Reason.ENVELOPE_BAD_RETENTION)
    _check_retention_key_id(retention.key_id)
    if not isinstance(retention.public_key, bytes) or len(retention.public_key) != X25519_KEY_BYTES:
        _fail(
            f"envelope field 'retention_key' must be {X25519_KEY_BYTES} bytes",
            Reason.ENVELOPE_BAD_RETENTION,
        )
    if not isinstance(retention.wrap, bytes) or len(retention.wrap) != RETENTION_WRAP_BYTES:
        _fail(
            f"envelope field 'retention_wrap' must be {RETENTION_WRAP_BYTES} bytes",
            Reason.ENVELOPE_BAD_RETENTION,
        )


def _check_retention_key_id(key_id: object) -> None:
    if not isinstance(key_id, str) or not RETENTION_KEY_ID_RE.fullmatch(key_id):
        _fail(
            f"retention key id {_short(key_id)} must be 1-64 of A-Z a-z 0-9 . _ - starting "
            "with a letter or digit",
            Reason.ENVELOPE_BAD_RETENTION,
        )


def validate_envelope(env: Envelope, *, now_ms: int) -> None:
    """:func:`check_envelope`, then the clock: ``EXPIRED`` or ``ENVELOPE_BAD_TIME``."""
    check_envelope(env)
    check_envelope_clock(env, now_ms=now_ms)


def check_envelope_clock(env: Envelope, *, now_ms: int) -> None:
    """The checks of :func:`validate_envelope` that need the time, alone.

    For an envelope :meth:`Envelope.from_json` (or :func:`decode_envelope`)
    returned, which made every other check already.
    """
    if env.created > now_ms + MAX_CLOCK_SKEW_MS:
        _fail(
            f"envelope was created {env.created - now_ms} ms in the future "
            f"(more than the allowed clock skew of {MAX_CLOCK_SKEW_MS} ms)",
            Reason.ENVELOPE_BAD_TIME,
        )
    if env.expires <= now_ms:
        _fail("envelope has expired", Reason.EXPIRED)


# -- helpers -------------------------------------------------------------------


def _fail(message: str, reason: Reason = Reason.ENVELOPE_MALFORMED) -> NoReturn:
    raise EnvelopeError(message, reason=reason)


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: object, limit: int = 40) -> str:
    """``repr`` of remote input, cut so an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(obj: dict[str, object], key: str, kind: type[_T]) -> _T:
    value = obj[key]
    # `type() is`, not isinstance: JSON true is not the integer 1 here.
    if type(value) is not kind:
        wanted = {int: "an integer", bool: "a boolean", str: "a string"}[kind]
        _fail(f"envelope field {key!r} must be {wanted}, got {_kind(value)}")
    return value


def _get_key(obj: dict[str, object], key: str, reason: Reason = Reason.ENVELOPE_MALFORMED) -> bytes:
    try:
        return b64url_decode_canonical(_get(obj, key, str))
    except ValueError:
        _fail(f"envelope field {key!r} is not canonical unpadded base64url", reason)


def _get_retention(obj: dict[str, object]) -> RetentionWrap | None:
    present = _RETENTION_FIELDS & obj.keys()
    if not present:
        return None
    if present != _RETENTION_FIELDS:
        _fail(
            f"envelope has {', '.join(sorted(present))} without "
            f"{', '.join(sorted(_RETENTION_FIELDS - present))}",
            Reason.ENVELOPE_BAD_RETENTION,
        )
    key_id = _get(obj, "retention_key_id", str)
    _check_retention_key_id(key_id)
    return RetentionWrap(
        key_id=key_id,
        public_key=_get_key(obj, "retention_key", Reason.ENVELOPE_BAD_RETENTION),
        wrap=_get_key(obj, "retention_wrap", Reason.ENVELOPE_BAD_RETENTION),
    )


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _cached_parse(text: str) -> Address:
    # A pure function of its argument; errors are raised, so never cached.
    return Address.parse(text)


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _is_normal(user: str, org: str) -> bool:
    return Address.of(user, org) == Address(user, org)


def _parse_address(text: str, field: str, reason: Reason) -> Address:
    try:
        address = _cached_parse(text)
    except AddressError as exc:
        raise EnvelopeError(f"envelope field {field!r}: {exc}", reason=reason) from exc
    # One envelope has one wire form: `Bob@Globex.example.` is refused, not folded.
    if str(address) != text:
        _fail(f"envelope field {field!r}: address is not in normal form (use {address})", reason)
    return address


def _check_address(address: object, field: str, reason: Reason) -> None:
    if not isinstance(address, Address):
        _fail(f"envelope field {field!r} must be an address", reason)
    if type(address.user) is not str or type(address.org) is not str:
        _fail(f"envelope field {field!r} must be an address", reason)
    try:
        normal = _is_normal(address.user, address.org)
    except AddressError as exc:
        raise EnvelopeError(f"envelope field {field!r}: {exc}", reason=reason) from exc
    if not normal:
        _fail(f"envelope field {field!r}: address is not in its normal form", reason)


def _check_group(group: object) -> None:
    if not isinstance(group, str) or not GROUP_NAME_RE.fullmatch(group):
        _fail(
            f"envelope group {_short(group)} must be 1-64 of a-z 0-9 _ - starting "
            "with a letter or digit",
            Reason.ENVELOPE_BAD_GROUP,
        )


def envelope_version_of(data: bytes) -> int:
    """The version of an envelope in this gateway's canonical encoding, read from its end.

    Canonical JSON sorts the keys, so a version 1 envelope ends in ``"v":1}``
    and a version 2 one in its ``wrapped_key`` member (docs/envelope.md §8.1).
    Only for bytes this gateway wrote (the spool): what does not end as a
    version 1 envelope is taken as version 2.
    """
    return ENVELOPE_VERSION if data.endswith(b',"v":1}') else ENVELOPE_VERSION_V2
