"""Durations as admins write them: ``90s``, ``15m``, ``12h``, ``1d``, ``2w``.

One integer and one unit, no spaces, no fractions, no compound forms. The
value is returned in whole seconds.
"""

from __future__ import annotations

import re

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


def format_duration(seconds: int) -> str:
    """The shortest exact form: 86400 -> ``1d``, 90 -> ``90s``."""
    if seconds < 0:
        raise ValueError("negative duration")
    for unit, size in sorted(_UNITS.items(), key=lambda kv: -kv[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
