"""Lane and mailbox bounds, checked inside the write that would pass them.

The ``spool_lanes`` and ``mailbox_counts`` tables hold each lane's and each
mailbox's depth and bytes, kept by triggers in the same transaction as the
rows they count. A write that adds envelopes reads those counters for the
keys it touches, adds what it brings, and raises
:class:`~gateway.errors.CapacityError` naming every key that would pass its
bound; the engine rolls that op back alone, so nothing of the call is stored.
Since the single writer thread runs every write, no two writers can both see
room for the last slot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Final

from gateway.errors import CapacityError, Reason
from gateway.storage.base import Bound

# What is bounded: the counter table's query, the reason, and what a key is.
_KINDS: Final = {
    Reason.LANE_FULL: ("SELECT depth, bytes FROM spool_lanes WHERE peer = ?", "spool lane"),
    Reason.MAILBOX_FULL: (
        "SELECT depth, bytes FROM mailbox_counts WHERE recipient = ?",
        "mailbox",
    ),
}


def check_bound(
    conn: sqlite3.Connection,
    kind: Reason,
    adding: Iterable[tuple[str, int]],
    bound: Bound | None,
) -> None:
    """Raise ``CapacityError(kind)`` if any key of ``adding`` (key, size) would pass ``bound``.

    ``kind`` is ``lane_full`` (keys are peers) or ``mailbox_full`` (keys are users).
    """
    if bound is None:
        return
    sql, what = _KINDS[kind]
    counts: dict[str, list[int]] = {}
    for key, size in adding:
        pair = counts.setdefault(key, [0, 0])
        pair[0] += 1
        pair[1] += size
    full: set[str] = set()
    for key, (more, more_bytes) in counts.items():
        row = conn.execute(sql, (key,)).fetchone()
        depth, size = (int(row[0]), int(row[1])) if row is not None else (0, 0)
        if not bound.room_for(depth, size, more, more_bytes):
            full.add(key)
    if full:
        # Peers may be named in the message; users are counted, never named in logs.
        named = ", ".join(sorted(full)) if kind is Reason.LANE_FULL else f"{len(full)} user(s)"
        raise CapacityError(f"{what} full for {named}", reason=kind, full=frozenset(full))
