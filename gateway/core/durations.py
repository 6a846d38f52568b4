"""Durations as admins write them: ``90s``, ``15m``, ``12h``, ``1d``, ``2w``.

One integer and one unit, no spaces, no fractions, no compound forms. The
value is returned in whole seconds.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([0-9]{1,9})([smhdw])")


def parse_duration(text: str) -> int:
    """Parse ``text`` into seconds; raise ``ValueError`` saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string like 90s, 15m, 1d; got {text!r}")
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: write a whole number and one unit of "
            "s, m, h, d, w (like 90s, 15m, 1d)"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


# Retention periods are long: days, weeks or years (a year is 365 days).
_PERIOD_UNITS = {"d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_PERIOD_RE = re.compile(r"([0-9]{1,6})([dwy])")


def parse_period(text: str) -> int:
    """A retention period (``30d``, ``12w``, ``7y``) in seconds; ``ValueError`` if not one."""
    match = _PERIOD_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid period {text!r}: write a whole number and one unit of d, w, y "
            "(like 90d, 7y; a year is 365 days)"
        )
    return int(match.group(1)) * _PERIOD_UNITS[match.group(2)]


def format_period(seconds: int) -> str:
    """The shortest exact form of a period: ``7y``, ``90d``."""
    for unit, size in sorted(_PERIOD_UNITS.items(), key=lambda kv: -kv[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return format_duration(seconds)


def format_duration(seconds: int) -> str:
    """The shortest exact form: 86400 -> ``1d``, 90 -> ``90s``."""
    if seconds < 0:
        raise ValueError("negative duration")
    for unit, size in sorted(_UNITS.items(), key=lambda kv: -kv[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_time_ms(ms: int) -> str:
    """Unix milliseconds as ISO 8601 UTC with milliseconds: ``2024-05-01T12:00:00.000Z``."""
    seconds, millis = divmod(ms, 1000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"
