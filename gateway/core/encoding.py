"""The two text encodings every part of the wire uses, in their strict forms.

* **base64url** (RFC 4648 §5) without padding, in its one canonical form:
  what :func:`b64url_encode` writes. Padding and non-zero unused trailing bits
  are refused, so one byte string has exactly one text form (a signature or a
  key cannot be re-spelled).
* **strict JSON**: :func:`loads_strict` refuses a key written twice in one
  object (``json`` silently keeps the last) and ``NaN``/``Infinity`` (not
  JSON), so what one party parsed is what the other meant.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import NoReturn

_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The last character of a canonical text whose length is 2 or 3 (mod 4) carries
# only 4 or 2 bits of data; the rest must be zero.
_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def is_canonical_b64url(text: str) -> bool:
    """Whether ``text`` is what :func:`b64url_encode` writes for some bytes.

    Two passes in C (no decoding): ASCII, then nothing left once the alphabet
    is deleted; then the last character's unused bits must be zero.
    """
    tail = len(text) % 4
    if tail == 1 or not text.isascii() or text.encode("ascii").translate(None, _B64URL_ALPHABET):
        return False
    return tail == 0 or text[-1] in _CANONICAL_LAST[tail]


def b64url_decode_canonical(text: str) -> bytes:
    """Decode canonical unpadded base64url; ``ValueError`` for any other text."""
    if not isinstance(text, str) or not is_canonical_b64url(text):
        raise ValueError("not canonical unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:  # not reached: the checks admit only valid text
        raise ValueError("not base64url") from exc


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: bytes | bytearray | memoryview | str) -> object:
    """Parse strict JSON (UTF-8 when given bytes); ``ValueError`` for anything else.

    Deep nesting (``RecursionError`` in ``json``) and bad UTF-8 are reported as
    ``ValueError`` too, so callers translate one exception type.
    """
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
