"""What a request's ``Accept`` field says of one media type (RFC 9110 §12.5.1; pure).

A handler that can answer in more than one format asks :func:`acceptance`
about each and chooses; this module only reads the field. The reading, kept
small on purpose:

* no field (or one with no media range in it) accepts anything: the caller
  keeps its old default;
* each media range is ``type/subtype``, ``type/*`` or ``*/*`` (any case),
  then parameters; ``q`` (0 to 1, at most three decimals) is its weight, 1
  when absent, and 0 means "not acceptable". Other parameters are ignored,
  so ``application/json; charset=utf-8`` is ``application/json``;
* for a media type, the most specific range that matches it decides
  (``type/subtype`` over ``type/*`` over ``*/*``); of several equally
  specific ones, the highest ``q``;
* a range that is not ``type/subtype``, or whose ``q`` is not a qvalue, is
  skipped as if it were not there.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

_NAME: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110's token
_MEDIA_RANGE_RE: Final = re.compile(rf"({_NAME})/({_NAME})")
_QVALUE_RE: Final = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")

# Specificity of a range that matches: the higher, the more it decides.
_ANY, _TYPE, _EXACT = 1, 2, 3


@dataclass(frozen=True, slots=True)
class Acceptance:
    """How much the field accepts one media type.

    ``quality``: the weight of the range that decided (0: not acceptable).
    ``named``: that range was the media type itself, not ``type/*`` or ``*/*``.
    """

    quality: float
    named: bool


_NO_FIELD: Final = Acceptance(1.0, named=False)
_NOT_LISTED: Final = Acceptance(0.0, named=False)


@dataclass(frozen=True, slots=True)
class _Range:
    type: str  # lower case; "*" for any
    subtype: str
    quality: float


def acceptance(accept: str | None, media_type: str) -> Acceptance:
    """What ``accept`` (the field's value, repeated fields joined by commas) says of ``media_type``.

    ``media_type`` is ``type/subtype`` in lower case, without parameters.
    """
    ranges = _parse(accept) if accept is not None else ()
    if not ranges:
        return _NO_FIELD
    wanted_type, _, wanted_subtype = media_type.partition("/")
    best, best_quality = 0, 0.0
    for each in ranges:
        if each.type == wanted_type and each.subtype == wanted_subtype:
            specificity = _EXACT
        elif each.type == wanted_type and each.subtype == "*":
            specificity = _TYPE
        elif each.type == "*" and each.subtype == "*":
            specificity = _ANY
        else:
            continue
        if specificity > best or (specificity == best and each.quality > best_quality):
            best, best_quality = specificity, each.quality
    if best == 0:
        return _NOT_LISTED
    return Acceptance(best_quality, named=best == _EXACT)


@functools.lru_cache(maxsize=64)  # a client fleet sends a few distinct fields, again and again
def _parse(accept: str) -> tuple[_Range, ...]:
    ranges: list[_Range] = []
    for element in accept.split(","):
        media_range, *parameters = element.split(";")
        found = _MEDIA_RANGE_RE.fullmatch(media_range.strip())
        if found is None:
            continue
        type_, subtype = found.group(1).lower(), found.group(2).lower()
        if type_ == "*" and subtype != "*":
            continue  # "*/json" is no media range
        quality: float | None = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                text = value.strip()
                quality = float(text) if _QVALUE_RE.fullmatch(text) else None
                break  # what follows q is accept-ext: ignored
        if quality is not None:
            ranges.append(_Range(type_, subtype, quality))
    return tuple(ranges)
