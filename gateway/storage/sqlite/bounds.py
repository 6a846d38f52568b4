"""Lane and mailbox bounds, checked inside the write that would pass them.

The ``spool_lanes`` and ``mailbox_counts`` tables hold each lane's and each
mailbox's depth and bytes, kept by the store's ops in the same transaction as
the rows they count. A write that adds envelopes reads those counters for the
keys it touches and adds what it brings. :func:`check_bound` (all or
nothing: the client API's writes) raises :class:`~gateway.errors.CapacityError`
naming every key that would pass its bound, and the engine rolls that op back
alone, so nothing of the call is stored; :func:`fit_bound` (one answer per
envelope: the receiver's commit) says which items fit.
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


def _counts(conn: sqlite3.Connection, kind: Reason, key: str) -> tuple[int, int]:
    row = conn.execute(_KINDS[kind][0], (key,)).fetchone()
    return (int(row[0]), int(row[1])) if row is not None else (0, 0)


def fit_bound(
    conn: sqlite3.Connection,
    kind: Reason,
    adding: Iterable[tuple[str, int]],
    bound: Bound | None,
) -> list[bool]:
    """Whether each of ``adding`` (key, size) fits, taking them in order.

    Per key, an item fits if it and the items of that key that fit before it
    stay within ``bound``; one that does not fit takes no room, so a smaller
    one after it may still fit. For the receiver, which answers each
    envelope on its own (``mailbox_full`` for those that do not fit).
    """
    items = list(adding)
    if bound is None:
        return [True] * len(items)
    used: dict[str, tuple[int, int]] = {}
    fits: list[bool] = []
    for key, size in items:
        if key not in used:
            used[key] = _counts(conn, kind, key)
        depth, total = used[key]
        room = bound.room_for(depth, total, 1, size)
        if room:
            used[key] = (depth + 1, total + size)
        fits.append(room)
    return fits


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
    what = _KINDS[kind][1]
    counts: dict[str, list[int]] = {}
    for key, size in adding:
        pair = counts.setdefault(key, [0, 0])
        pair[0] += 1
        pair[1] += size
    full: set[str] = set()
    for key, (more, more_bytes) in counts.items():
        depth, size = _counts(conn, kind, key)
        if not bound.room_for(depth, size, more, more_bytes):
            full.add(key)
    if full:
        # Peers may be named in the message; users are counted, never named in logs.
        named = ", ".join(sorted(full)) if kind is Reason.LANE_FULL else f"{len(full)} user(s)"
        raise CapacityError(f"{what} full for {named}", reason=kind, full=frozenset(full))
