"""The PostgreSQL engine's write helpers: bounds under row locks, mailbox inserts.

A write that adds envelopes to lanes or mailboxes first locks their counter
rows (``spool_lanes``, ``mailbox_counts``), sorted, with an upsert that
returns the current counts, and holds them to its commit: the bound is
checked against counts no other writer (thread or node) can change
meanwhile, and ``seq`` values within one lane or mailbox are handed out in
commit order. :func:`check_bound` (all or nothing: spool_put,
mailbox_put_local) raises :class:`~gateway.errors.CapacityError`, which
rolls the whole transaction back; :func:`fit_bound` (one answer per
envelope: the receiver's commit) says which items fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from gateway.errors import CapacityError, Reason
from gateway.storage._shared import _first_unseen
from gateway.storage.base import Bound, EnvelopeRecord
from gateway.storage.postgres.arrivals import notify_arrivals
from gateway.storage.postgres.engine import Connection

SET_STATUSES = (
    "INSERT INTO statuses (envelope_id, sender, status, at_ms) "
    "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[]) "
    "ON CONFLICT (envelope_id) DO UPDATE SET status = excluded.status, "
    "at_ms = excluded.at_ms"
)

# The counter rows of the keys a write adds to, created if absent and locked
# until the commit; sorted, so two writers never wait for each other in a cycle.
LOCK_COUNTS: Final = {
    Reason.LANE_FULL: (
        "INSERT INTO spool_lanes (peer, depth, bytes) "
        "SELECT k, 0, 0 FROM unnest(%b::text[]) AS k ORDER BY k "
        "ON CONFLICT (peer) DO UPDATE SET depth = spool_lanes.depth "
        "RETURNING peer, depth, bytes"
    ),
    Reason.MAILBOX_FULL: (
        "INSERT INTO mailbox_counts (recipient, depth, bytes) "
        "SELECT k, 0, 0 FROM unnest(%b::text[]) AS k ORDER BY k "
        "ON CONFLICT (recipient) DO UPDATE SET depth = mailbox_counts.depth "
        "RETURNING recipient, depth, bytes"
    ),
}


def present(conn: Connection, table: str, ids: Sequence[str]) -> set[str]:
    if not ids:
        return set()
    sql = f"SELECT envelope_id FROM {table} WHERE envelope_id = ANY(%s)"  # noqa: S608
    return {row[0] for row in conn.execute(sql.encode(), (list(ids),))}


def lock_counts(conn: Connection, kind: Reason, keys: Iterable[str]) -> dict[str, tuple[int, int]]:
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    rows = conn.execute(LOCK_COUNTS[kind], (wanted,)).fetchall()
    return {key: (int(depth), int(size)) for key, depth, size in rows}


def check_bound(
    conn: Connection, kind: Reason, adding: Sequence[tuple[str, int]], bound: Bound | None
) -> None:
    """Lock the counters of ``adding`` (key, size); raise ``CapacityError`` if any would pass."""
    counts = lock_counts(conn, kind, (key for key, _size in adding))
    if bound is None:
        return
    more: dict[str, list[int]] = {}
    for key, size in adding:
        pair = more.setdefault(key, [0, 0])
        pair[0] += 1
        pair[1] += size
    full = {
        key
        for key, (count, size) in more.items()
        if not bound.room_for(*counts.get(key, (0, 0)), count, size)
    }
    if full:
        what = "spool lane" if kind is Reason.LANE_FULL else "mailbox"
        named = ", ".join(sorted(full)) if kind is Reason.LANE_FULL else f"{len(full)} user(s)"
        raise CapacityError(f"{what} full for {named}", reason=kind, full=frozenset(full))


def fit_bound(
    conn: Connection, adding: Sequence[tuple[str, int]], bound: Bound | None
) -> list[bool]:
    """Lock the mailbox counters of ``adding``; whether each item fits, in order."""
    used = lock_counts(conn, Reason.MAILBOX_FULL, (key for key, _size in adding))
    if bound is None:
        return [True] * len(adding)
    fits: list[bool] = []
    for key, size in adding:
        depth, total = used.get(key, (0, 0))
        room = bound.room_for(depth, total, 1, size)
        if room:
            used[key] = (depth + 1, total + size)
        fits.append(room)
    return fits


def store_in_mailboxes(
    conn: Connection,
    entries: Sequence[EnvelopeRecord],
    at_ms: int,
    *,
    bound: Bound | None = None,
    each: bool = False,
    notify_as: str,
) -> tuple[list[EnvelopeRecord], set[str], list[str]]:
    """As the SQLite engine's: store entries never seen; return those stored, their
    recipients, and the ids left out because their mailbox was full.

    The seen ids are claimed with ``ON CONFLICT DO NOTHING``: an id another
    node claimed meanwhile is skipped here, never stored twice. The recipients
    are notified (:mod:`.arrivals`) as engine ``notify_as``, at the commit.
    """
    ids = [entry.envelope_id for entry in entries]
    fresh = _first_unseen(entries, present(conn, "seen_envelopes", ids))
    held = present(conn, "mailbox", [entry.envelope_id for entry in fresh])
    stored = [entry for entry in fresh if entry.envelope_id not in held]
    left_out: list[str] = []
    adding = [(e.recipient, e.size) for e in stored]
    if each:
        fits = fit_bound(conn, adding, bound)
        if not all(fits):
            left_out = [e.envelope_id for e, fit in zip(stored, fits, strict=True) if not fit]
            stored = [e for e, fit in zip(stored, fits, strict=True) if fit]
            out = set(left_out)
            fresh = [e for e in fresh if e.envelope_id not in out]
    else:
        check_bound(conn, Reason.MAILBOX_FULL, adding, bound)
    if fresh:
        claimed = {
            row[0]
            for row in conn.execute(
                "INSERT INTO seen_envelopes (envelope_id, expires_ms) "
                "SELECT * FROM unnest(%b::text[], %b::bigint[]) "
                "ON CONFLICT (envelope_id) DO NOTHING RETURNING envelope_id",
                ([e.envelope_id for e in fresh], [e.expires_ms for e in fresh]),
            )
        }
        stored = [e for e in stored if e.envelope_id in claimed]
    if stored:
        conn.execute(
            "INSERT INTO mailbox (envelope_id, recipient, sender, created_ms, expires_ms, "
            "stored_ms, size, burn_on_read, data) "
            "SELECT e, r, s, c, x, %s, z, b, d FROM unnest(%b::text[], %b::text[], %b::text[], "
            "%b::bigint[], %b::bigint[], %b::int[], %b::boolean[], %b::bytea[]) "
            "WITH ORDINALITY AS t(e, r, s, c, x, z, b, d, n) ORDER BY n",
            (
                at_ms,
                [e.envelope_id for e in stored],
                [e.recipient for e in stored],
                [e.sender for e in stored],
                [e.created_ms for e in stored],
                [e.expires_ms for e in stored],
                [e.size for e in stored],
                [e.burn_on_read for e in stored],
                [e.data for e in stored],
            ),
        )
    recipients = {entry.recipient for entry in stored}
    notify_arrivals(conn, notify_as, recipients)
    return stored, recipients, left_out


def set_statuses(conn: Connection, rows: Sequence[tuple[str, str, str, int]]) -> None:
    if rows:
        conn.execute(SET_STATUSES, [list(column) for column in zip(*rows, strict=True)])
