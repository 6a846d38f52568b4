"""The :class:`~gateway.storage.base.Storage` interface on SQLite.

Each method checks its arguments (``ValueError`` before anything is queued),
then hands the engine one op: a plain function of a connection that runs
either in the writer's next group commit (every write method is exactly one
op, so it is all-or-nothing) or on a reader connection. The SQL lives here;
the threads, transactions and error translation live in
:mod:`gateway.storage.sqlite.engine`; the tables in
:mod:`gateway.storage.sqlite.schema`.

Unbounded deletes (purges, prunes) run as several ops of at most
:data:`DELETE_CHUNK` rows each, so no single commit holds the write lock for
long while the gateway keeps serving.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeVar

from gateway.core.address import MAX_DOMAIN_LENGTH
from gateway.errors import Reason, StorageError
from gateway.storage._shared import (
    _first_unseen,
    _ids,
    _mailbox_entry,
    _peer,
    _peer_state,
    _records,
    _spool_entry,
    _spool_summary,
    _statuses,
    _txn_record,
    _txn_results,
    _user,
)
from gateway.storage.base import (
    EXPIRE_BATCH,
    LIST_LIMIT,
    MAX_BODY_HASH_BYTES,
    MAX_ENVELOPE_ID_LENGTH,
    MAX_ITEMS_PER_CALL,
    MAX_LAST_ERROR_LENGTH,
    MAX_TOKEN_HASH_BYTES,
    MAX_TXN_ID_LENGTH,
    STATUS_DELIVERED,
    STATUS_EXPIRED,
    STATUS_PURGED,
    STATUS_QUEUED,
    Bound,
    DeliverOutcome,
    DeliveryStatus,
    EnvelopeRecord,
    ExpiredEnvelope,
    LaneStats,
    MailboxDepth,
    MailboxEntry,
    PeerState,
    PruneCounts,
    SpoolEntry,
    SpoolItem,
    SpoolSummary,
    TxnRecord,
    check_bytes,
    check_count,
    check_ms,
    check_status,
    check_text,
)
from gateway.storage.leases import Lease
from gateway.storage.sqlite.archive import SqliteArchive
from gateway.storage.sqlite.bounds import check_bound, fit_bound
from gateway.storage.sqlite.cluster import SqliteCluster, check_fence
from gateway.storage.sqlite.engine import READER_THREADS, SqliteEngine, open_sqlite_engine
from gateway.storage.sqlite.schema import migrate
from gateway.storage.sqlite.segments import (
    REF_COLUMNS,
    SEGMENT_ROLL_BYTES,
    SEGMENT_THRESHOLD_BYTES,
    SegmentStore,
)
from gateway.storage.sqlite.sessions import SqliteSessions

DELETE_CHUNK: Final = 1_000  # rows per commit for purges and prunes
_TRUNCATED: Final = " [truncated]"
_PROBE_VERSION: Final = -1  # check_writable's transient row; real versions start at 1

# Rows a read may fetch on the trio thread (engine.read_small) before it goes to a
# reader thread: four 1 KiB envelopes take ~20 µs; four of the largest (1 MiB) a
# few ms, the price of a copy the thread would make too.
SMALL_READ_ROWS: Final = 4

# Envelope reads end with the bytes and where they are (SegmentStore.resolve).
_SPOOL_COLUMNS = (
    "seq, envelope_id, peer, sender, recipient, created_ms, expires_ms, spooled_ms, "
    f"burn_on_read, data, {REF_COLUMNS}"
)
_SPOOL_SUMMARY_COLUMNS = (
    "seq, envelope_id, peer, sender, recipient, created_ms, expires_ms, spooled_ms, size"
)
_MAILBOX_COLUMNS = (
    "seq, envelope_id, recipient, sender, created_ms, expires_ms, stored_ms, burn_on_read, data, "
    + REF_COLUMNS
)
_SET_STATUS = (
    "INSERT INTO statuses (envelope_id, sender, status, at_ms) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (envelope_id) DO UPDATE SET status = excluded.status, at_ms = excluded.at_ms"
)

# "Which of these ids does this table hold?": one statement for a whole batch.
_AMONG = "IN (SELECT value FROM json_each(?))"
_STATUS_AMONG = f"SELECT envelope_id FROM statuses WHERE envelope_id {_AMONG}"  # noqa: S608
_SPOOLED_AMONG = f"SELECT envelope_id FROM spool WHERE envelope_id {_AMONG}"  # noqa: S608
_SEEN_AMONG = f"SELECT envelope_id FROM seen_envelopes WHERE envelope_id {_AMONG}"  # noqa: S608
_MAILBOX_AMONG = f"SELECT envelope_id FROM mailbox WHERE envelope_id {_AMONG}"  # noqa: S608

_SPOOL_TAKE = (
    f"SELECT {_SPOOL_COLUMNS} FROM spool WHERE peer = ? AND seq > ? "  # noqa: S608
    "ORDER BY seq LIMIT ?"
)
# The same, leaving out envelopes deferred past now (a usually empty side table).
_SPOOL_TAKE_DUE = (
    f"SELECT {_SPOOL_COLUMNS} FROM spool WHERE peer = ? AND seq > ? "  # noqa: S608
    "AND NOT EXISTS (SELECT 1 FROM spool_deferred d "
    "WHERE d.envelope_id = spool.envelope_id AND d.not_before_ms > ?) "
    "ORDER BY seq LIMIT ?"
)
# Defer a spooled envelope: the first time by ``delay``, then twice as long each
# time, up to ``max_delay``. Only an id still in the peer's lane matches.
_DEFER = (
    "INSERT INTO spool_deferred (envelope_id, not_before_ms, deferrals) "
    "SELECT envelope_id, ?, 1 FROM spool WHERE envelope_id = ? AND peer = ? "
    "ON CONFLICT (envelope_id) DO UPDATE SET deferrals = deferrals + 1, "
    "not_before_ms = ? + MIN(?, ? * (1 << MIN(deferrals, 30)))"
)

# Remove a batch of ids from one lane or mailbox (a repeated id counts once),
# returning what the counters need (and, for a lane, each sender, for the
# envelope's status row). The unary ``+`` keeps the planner on the envelope_id
# index: without it SQLite walks the whole lane or mailbox by its (peer, seq)
# index, a million rows for a backlog.
_SPOOL_COMPLETE = (
    f"DELETE FROM spool WHERE +peer = ? AND envelope_id {_AMONG} "  # noqa: S608
    "RETURNING envelope_id, sender, size"
)
_MAILBOX_REMOVE = (
    f"DELETE FROM mailbox WHERE +recipient = ? AND envelope_id {_AMONG} RETURNING size"  # noqa: S608
)

_E = TypeVar("_E")

_TXN_SELECT = "SELECT body_hash, results, at_ms FROM transactions WHERE origin = ? AND txn_id = ?"


# -- ops shared by several methods -------------------------------------------------
def _ids_json(ids: Sequence[str]) -> str:
    """Ids as one JSON array: a batch is one bound value, so one cached statement
    (``IN (SELECT value FROM json_each(?))``) serves every batch size."""
    return json.dumps(ids, separators=(",", ":"))


def _present(conn: sqlite3.Connection, sql: str, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` the one-column query ``sql`` (bound to their JSON array) finds."""
    if not ids:
        return set()
    return {row[0] for row in conn.execute(sql, (_ids_json(ids),))}


# Depth and bytes per lane and per mailbox (docs/storage.md): every op that
# inserts or deletes spool or mailbox rows moves them here, in its own
# transaction, one statement per lane or mailbox it touched.
_COUNTER_SQL: Final = {
    table: (
        f"INSERT INTO {table} ({key}, depth, bytes) VALUES (?, ?, ?) "  # noqa: S608 -- ours
        f"ON CONFLICT ({key}) DO UPDATE SET depth = depth + excluded.depth, "
        "bytes = bytes + excluded.bytes",
        f"DELETE FROM {table} WHERE {key} = ? AND depth <= 0",  # noqa: S608 -- ours
    )
    for table, key in (("spool_lanes", "peer"), ("mailbox_counts", "recipient"))
}


def _counted(
    conn: sqlite3.Connection, table: str, changes: Iterable[tuple[str, int]], sign: int
) -> None:
    """Add (``sign`` 1) or take away (-1) one envelope of ``size`` per ``(key, size)``."""
    totals: dict[str, list[int]] = {}
    for key, size in changes:
        total = totals.get(key)
        if total is None:
            totals[key] = [1, size]
        else:
            total[0] += 1
            total[1] += size
    if not totals:
        return
    upsert, drop_empty = _COUNTER_SQL[table]
    conn.executemany(upsert, [(key, sign * n, sign * size) for key, (n, size) in totals.items()])
    if sign < 0:
        conn.executemany(drop_empty, [(key,) for key in totals])


async def _small_first(
    engine: SqliteEngine,
    op: Callable[[sqlite3.Connection, int], tuple[list[_E], bool]],
    limit: int,
) -> list[_E]:
    """``op(conn, limit)``'s rows, read on the trio thread when they are few.

    ``op(conn, n)`` reads at most ``n`` rows and tells whether they are all it
    would read with any larger ``n``. It first runs with at most
    :data:`SMALL_READ_ROWS` on the trio thread (``engine.read_small``); only if
    that was not the whole read does it run again, with ``limit``, on a reader
    thread.
    """
    small = min(limit, SMALL_READ_ROWS)
    rows, whole = await engine.read_small(lambda conn: op(conn, small))
    if whole or small == limit:
        return rows
    rows, _whole = await engine.read(lambda conn: op(conn, limit))
    return rows


def _placed(
    segments: SegmentStore, data: bytes
) -> tuple[bytes, str | None, int | None, int | None]:
    """``(data, segment, seg_offset, seg_length)`` of a row: a large envelope's bytes
    go to the current segment, a small one's stay in the row."""
    if len(data) < segments.threshold:
        return data, None, None, None
    return (b"", *segments.append(data))


def _store_in_mailboxes(
    conn: sqlite3.Connection,
    segments: SegmentStore,
    entries: Sequence[EnvelopeRecord],
    at_ms: int,
    *,
    bound: Bound | None = None,
    each: bool = False,
) -> tuple[list[EnvelopeRecord], set[str], list[str]]:
    """Insert entries whose ids were never seen; return those stored, their recipients,
    and the ids left out because their mailbox was full.

    With ``bound``, a mailbox the new entries would take past it raises
    :class:`CapacityError` (nothing stored), or with ``each`` leaves out just
    the entries that do not fit (:func:`fit_bound`); those are not marked
    seen, so the same envelope may come again and be stored once there is room.

    Set-based: one lookup of the batch's known ids, then one ``executemany``
    per table. Inside the write transaction nothing else writes, so the ids
    found absent stay absent until the inserts (which would fail loudly, not
    skip silently, if that ever changed).
    """
    ids = [entry.envelope_id for entry in entries]
    fresh = _first_unseen(entries, _present(conn, _SEEN_AMONG, ids))
    # A mailbox row whose seen row was pruned early must still not double.
    held = _present(conn, _MAILBOX_AMONG, [entry.envelope_id for entry in fresh])
    stored = [entry for entry in fresh if entry.envelope_id not in held] if held else fresh
    left_out: list[str] = []
    if each:
        fits = fit_bound(conn, Reason.MAILBOX_FULL, ((e.recipient, e.size) for e in stored), bound)
        if not all(fits):
            left_out = [e.envelope_id for e, fit in zip(stored, fits, strict=True) if not fit]
            stored = [e for e, fit in zip(stored, fits, strict=True) if fit]
            out = set(left_out)
            fresh = [e for e in fresh if e.envelope_id not in out]
    else:
        check_bound(conn, Reason.MAILBOX_FULL, ((e.recipient, e.size) for e in stored), bound)
    conn.executemany(
        "INSERT INTO seen_envelopes (envelope_id, expires_ms) VALUES (?, ?)",
        [(entry.envelope_id, entry.expires_ms) for entry in fresh],
    )
    conn.executemany(
        "INSERT INTO mailbox (envelope_id, recipient, sender, created_ms, expires_ms, "
        "stored_ms, size, burn_on_read, data, segment, seg_offset, seg_length) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                entry.envelope_id,
                entry.recipient,
                entry.sender,
                entry.created_ms,
                entry.expires_ms,
                at_ms,
                entry.size,
                int(entry.burn_on_read),
                *_placed(segments, entry.data),
            )
            for entry in stored
        ],
    )
    _counted(conn, "mailbox_counts", ((e.recipient, e.size) for e in stored), 1)
    return stored, {entry.recipient for entry in stored}, left_out


def _delete_chunked_sql(table: str, key: str, where: str) -> str:
    return (
        f"DELETE FROM {table} WHERE {key} IN "  # noqa: S608 -- names are ours, values bound
        f"(SELECT {key} FROM {table} WHERE {where} LIMIT ?)"
    )


class SqliteStorage(SqliteSessions, SqliteCluster):
    """:class:`~gateway.storage.base.Storage` on one SQLite file.

    Build it with :func:`open_sqlite_storage`.
    """

    def __init__(self, engine: SqliteEngine, segments: SegmentStore) -> None:
        self.engine = engine
        self.segments = segments  # large envelopes' bytes (written by the engine's writer)
        # The retention archive shares the file and the writer (its own module).
        self.archive = SqliteArchive(engine)

    @property
    def commits(self) -> int:
        """Write transactions committed so far (group commit makes this << writes)."""
        return self.engine.commits

    # -- spool -------------------------------------------------------------------
    async def spool_put(
        self, items: Sequence[SpoolItem], *, at_ms: int, bound: Bound | None = None
    ) -> list[str]:
        _records("spool_put items", items, SpoolItem)
        check_ms("at_ms", at_ms)
        items = list(items)
        segments = self.segments

        def op(conn: sqlite3.Connection) -> list[str]:
            # "Seen on the sending side" is: in the spool (status `queued`,
            # read from the spool row itself), or with a status row (answered,
            # expired, purged or delivered locally), which the spool entry's
            # removal writes in the same commit.
            ids = [item.envelope_id for item in items]
            known = _present(conn, _STATUS_AMONG, ids) | _present(conn, _SPOOLED_AMONG, ids)
            fresh = _first_unseen(items, known)
            check_bound(conn, Reason.LANE_FULL, ((i.peer, i.size) for i in fresh), bound)
            # executemany keeps the order, so lane order is still item order.
            conn.executemany(
                "INSERT INTO spool (envelope_id, peer, sender, recipient, created_ms, "
                "expires_ms, spooled_ms, size, burn_on_read, data, segment, seg_offset, "
                "seg_length) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        item.envelope_id,
                        item.peer,
                        item.sender,
                        item.recipient,
                        item.created_ms,
                        item.expires_ms,
                        at_ms,
                        item.size,
                        int(item.burn_on_read),
                        *_placed(segments, item.data),
                    )
                    for item in fresh
                ],
            )
            _counted(conn, "spool_lanes", ((item.peer, item.size) for item in fresh), 1)
            return [item.envelope_id for item in fresh]

        return await self.engine.write(op)

    async def spool_take(
        self,
        peer: str,
        *,
        max_items: int,
        max_bytes: int,
        after_seq: int = 0,
        now_ms: int | None = None,
    ) -> list[SpoolEntry]:
        _peer(peer)
        check_count("max_items", max_items, maximum=MAX_ITEMS_PER_CALL)
        check_count("max_bytes", max_bytes, maximum=2**40)
        check_ms("after_seq", after_seq)
        sql, args = _SPOOL_TAKE, [peer, after_seq]
        if now_ms is not None:
            sql, args = _SPOOL_TAKE_DUE, [peer, after_seq, check_ms("now_ms", now_ms)]

        segments = self.segments

        def op(conn: sqlite3.Connection, limit: int) -> tuple[list[SpoolEntry], bool]:
            """The take with at most ``limit`` rows, and whether it is the whole take."""
            epoch = segments.epoch  # before the snapshot begins
            rows: list[tuple[object, ...]] = []
            total = 0
            whole = False
            cur = conn.execute(sql, (*args, limit))
            try:
                for row in cur:
                    size = len(row[-4]) if row[-3] is None else row[-1]
                    if rows and total + size > max_bytes:
                        whole = True  # the byte bound ends it, whatever the limit
                        break
                    rows.append(row)
                    total += size
                else:
                    whole = len(rows) < limit
            finally:
                cur.close()
            return [_spool_entry(r) for r in segments.resolve(conn, "spool", rows, epoch)], whole

        # A lane that is keeping up holds a few envelopes; a backlog, more.
        return await _small_first(self.engine, op, max_items)

    async def spool_complete(
        self, peer: str, results: Mapping[str, str], *, at_ms: int, fence: Lease | None = None
    ) -> int:
        _peer(peer)
        pairs = _statuses(results)
        check_ms("at_ms", at_ms)

        def op(conn: sqlite3.Connection) -> int:
            check_fence(conn, fence)
            # The removal tells each envelope's sender, for its status row; only
            # ids still in this peer's lane match.
            status_of = dict(pairs)
            removed = conn.execute(_SPOOL_COMPLETE, (peer, _ids_json(list(status_of)))).fetchall()
            conn.executemany(
                _SET_STATUS,
                [
                    (envelope_id, sender, status_of[envelope_id], at_ms)
                    for envelope_id, sender, _ in removed
                ],
            )
            _counted(conn, "spool_lanes", ((peer, size) for _, _, size in removed), -1)
            return len(removed)

        return await self.engine.write(op)

    async def spool_defer(
        self,
        peer: str,
        envelope_ids: Collection[str],
        *,
        at_ms: int,
        delay_ms: int,
        max_delay_ms: int,
        fence: Lease | None = None,
    ) -> int:
        _peer(peer)
        ids = _ids("spool_defer ids", envelope_ids)
        check_ms("at_ms", at_ms)
        check_count("delay_ms", delay_ms, maximum=2**40)
        check_count("max_delay_ms", max_delay_ms, maximum=2**40)
        first = min(delay_ms, max_delay_ms)

        def op(conn: sqlite3.Connection) -> int:
            check_fence(conn, fence)
            return conn.executemany(
                _DEFER,
                [(at_ms + first, e, peer, at_ms, max_delay_ms, delay_ms) for e in ids],
            ).rowcount

        return await self.engine.write(op)

    async def spool_expire(
        self, now_ms: int, *, limit: int = EXPIRE_BATCH
    ) -> list[ExpiredEnvelope]:
        check_ms("now_ms", now_ms)
        check_count("limit", limit, maximum=MAX_ITEMS_PER_CALL)

        def op(conn: sqlite3.Connection) -> list[ExpiredEnvelope]:
            rows = conn.execute(
                "DELETE FROM spool WHERE seq IN (SELECT seq FROM spool WHERE expires_ms <= ? "
                "ORDER BY expires_ms LIMIT ?) RETURNING envelope_id, sender, recipient, peer, size",
                (now_ms, limit),
            ).fetchall()
            _counted(conn, "spool_lanes", ((row[3], row[4]) for row in rows), -1)
            conn.executemany(
                _SET_STATUS, [(row[0], row[1], STATUS_EXPIRED, now_ms) for row in rows]
            )
            return [
                ExpiredEnvelope(envelope_id=e, sender=s, recipient=r, peer=p)
                for e, s, r, p, _size in rows
            ]

        return await self.engine.write(op)

    async def spool_stats(self) -> dict[str, LaneStats]:
        def op(conn: sqlite3.Connection) -> dict[str, LaneStats]:
            rows = conn.execute(
                "SELECT l.peer, l.depth, l.bytes, h.created_ms, h.spooled_ms FROM spool_lanes l "
                "JOIN spool h ON h.seq = (SELECT MIN(seq) FROM spool WHERE peer = l.peer) "
                "ORDER BY l.peer"
            ).fetchall()
            return {
                peer: LaneStats(
                    peer=peer,
                    depth=depth,
                    bytes=size,
                    oldest_created_ms=created,
                    oldest_spooled_ms=spooled,
                )
                for peer, depth, size, created, spooled in rows
            }

        return await self.engine.read(op)

    async def spool_peers(self) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT peer FROM spool_lanes ORDER BY peer").fetchall()
            return [row[0] for row in rows]

        return await self.engine.read(op)

    async def spool_list(
        self, *, peer: str | None = None, limit: int = LIST_LIMIT, after_seq: int | None = None
    ) -> list[SpoolSummary]:
        if peer is not None:
            _peer(peer)
        check_count("limit", limit, maximum=LIST_LIMIT)
        after = (
            0
            if after_seq is None
            else check_count("after_seq", after_seq, minimum=0, maximum=2**62)
        )
        where, args = ("peer = ? AND seq > ?", (peer, after)) if peer else ("seq > ?", (after,))

        def op(conn: sqlite3.Connection) -> list[SpoolSummary]:
            rows = conn.execute(
                f"SELECT {_SPOOL_SUMMARY_COLUMNS} FROM spool WHERE {where} "  # noqa: S608
                "ORDER BY seq LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [_spool_summary(row) for row in rows]

        return await self.engine.read(op)

    async def spool_retry(self, peer: str | None = None) -> int:
        if peer is not None:
            _peer(peer)

        def op(conn: sqlite3.Connection) -> int:
            sql = "UPDATE peer_states SET failures = 0, backoff_until_ms = 0"
            cur = conn.execute(sql + " WHERE peer = ?", (peer,)) if peer else conn.execute(sql)
            # Envelopes waiting out a temporary answer (mailbox_full) go at once too.
            if peer:
                conn.execute(
                    "DELETE FROM spool_deferred WHERE envelope_id IN "
                    "(SELECT envelope_id FROM spool WHERE peer = ?)",
                    (peer,),
                )
            else:
                conn.execute("DELETE FROM spool_deferred")
            return cur.rowcount

        return await self.engine.write(op)

    async def spool_purge(
        self, *, peer: str | None = None, created_before_ms: int | None = None, at_ms: int
    ) -> int:
        conditions: list[str] = []
        args: list[object] = []
        if peer is not None:
            conditions.append("peer = ?")
            args.append(_peer(peer))
        if created_before_ms is not None:
            conditions.append("created_ms < ?")
            args.append(check_ms("created_before_ms", created_before_ms))
        check_ms("at_ms", at_ms)
        sql = (
            "DELETE FROM spool WHERE seq IN (SELECT seq FROM spool WHERE "  # noqa: S608
            + (" AND ".join(conditions) or "1")
            + " ORDER BY seq LIMIT ?) RETURNING envelope_id, sender, peer, size"
        )

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(sql, (*args, DELETE_CHUNK)).fetchall()
            _counted(conn, "spool_lanes", ((p, size) for _e, _s, p, size in rows), -1)
            conn.executemany(_SET_STATUS, [(e, s, STATUS_PURGED, at_ms) for e, s, _p, _z in rows])
            return len(rows)

        total = 0
        while (count := await self.engine.write(op)) > 0:
            total += count
            if count < DELETE_CHUNK:
                break
        return total

    # -- mailboxes and transactions --------------------------------------------
    async def deliver(
        self,
        origin: str,
        txn_id: str,
        body_hash: bytes,
        results: Mapping[str, str],
        entries: Sequence[EnvelopeRecord],
        *,
        at_ms: int,
        bound: Bound | None = None,
    ) -> DeliverOutcome:
        check_text("origin", origin, MAX_DOMAIN_LENGTH)
        check_text("txn_id", txn_id, MAX_TXN_ID_LENGTH)
        check_bytes("body_hash", body_hash, MAX_BODY_HASH_BYTES)
        _records("deliver entries", entries, EnvelopeRecord)
        results_json = _txn_results(results, entries)
        check_ms("at_ms", at_ms)
        entries = list(entries)

        def op(conn: sqlite3.Connection) -> DeliverOutcome:
            row = conn.execute(
                _TXN_SELECT,
                (origin, txn_id),
            ).fetchone()
            if row is not None:
                replayed = _txn_record(origin, txn_id, row)
                return DeliverOutcome(stored=(), recipients=frozenset(), replayed=replayed)
            stored, recipients, full = _store_in_mailboxes(
                conn, self.segments, entries, at_ms, bound=bound, each=True
            )
            answer = results_json
            if full:
                # The recorded answer is the one given: a replay reads mailbox_full too.
                answer = json.dumps(
                    dict(results) | dict.fromkeys(full, Reason.MAILBOX_FULL.value),
                    separators=(",", ":"),
                )
            conn.execute(
                "INSERT INTO transactions (origin, txn_id, body_hash, results, at_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (origin, txn_id, body_hash, answer, at_ms),
            )
            return DeliverOutcome(
                stored=tuple(e.envelope_id for e in stored),
                recipients=frozenset(recipients),
                mailbox_full=frozenset(full),
            )

        return await self.engine.write(op)

    async def txn_lookup(self, origin: str, txn_id: str) -> TxnRecord | None:
        check_text("origin", origin, MAX_DOMAIN_LENGTH)
        check_text("txn_id", txn_id, MAX_TXN_ID_LENGTH)

        def op(conn: sqlite3.Connection) -> TxnRecord | None:
            row = conn.execute(
                _TXN_SELECT,
                (origin, txn_id),
            ).fetchone()
            return None if row is None else _txn_record(origin, txn_id, row)

        return await self.engine.read(op)

    async def mailbox_put_local(
        self, entries: Sequence[EnvelopeRecord], *, at_ms: int, bound: Bound | None = None
    ) -> DeliverOutcome:
        _records("mailbox_put_local entries", entries, EnvelopeRecord)
        check_ms("at_ms", at_ms)
        entries = list(entries)

        def op(conn: sqlite3.Connection) -> DeliverOutcome:
            stored, recipients, _ = _store_in_mailboxes(
                conn, self.segments, entries, at_ms, bound=bound
            )
            conn.executemany(
                _SET_STATUS, [(e.envelope_id, e.sender, STATUS_DELIVERED, at_ms) for e in stored]
            )
            return DeliverOutcome(
                stored=tuple(e.envelope_id for e in stored), recipients=frozenset(recipients)
            )

        return await self.engine.write(op)

    async def mailbox_fetch(
        self, user: str, *, limit: int, after: int | None = None, now_ms: int | None = None
    ) -> list[MailboxEntry]:
        _user(user)
        check_count("limit", limit, maximum=LIST_LIMIT)
        after_seq = 0 if after is None else check_count("after", after, minimum=0, maximum=2**62)
        # Expired-but-not-yet-swept envelopes are never handed out.
        not_expired = -1 if now_ms is None else check_ms("now_ms", now_ms)

        segments = self.segments

        def op(conn: sqlite3.Connection, rows_at_most: int) -> tuple[list[MailboxEntry], bool]:
            epoch = segments.epoch  # before the snapshot begins
            rows = conn.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailbox "  # noqa: S608
                "WHERE recipient = ? AND seq > ? AND expires_ms > ? ORDER BY seq LIMIT ?",
                (user, after_seq, not_expired, rows_at_most),
            ).fetchall()
            whole = len(rows) < rows_at_most
            return [
                _mailbox_entry(r) for r in segments.resolve(conn, "mailbox", rows, epoch)
            ], whole

        # A mailbox read as it fills holds a few envelopes; a fuller one, more.
        return await _small_first(self.engine, op, limit)

    async def mailbox_ack(self, user: str, envelope_ids: Collection[str]) -> int:
        _user(user)
        ids = _ids("mailbox_ack", envelope_ids)

        def op(conn: sqlite3.Connection) -> int:
            sizes = conn.execute(_MAILBOX_REMOVE, (user, _ids_json(ids))).fetchall()
            _counted(conn, "mailbox_counts", ((user, size) for (size,) in sizes), -1)
            return len(sizes)

        return await self.engine.write(op)

    async def mailbox_expire(
        self, now_ms: int, *, limit: int = EXPIRE_BATCH
    ) -> list[ExpiredEnvelope]:
        check_ms("now_ms", now_ms)
        check_count("limit", limit, maximum=MAX_ITEMS_PER_CALL)

        def op(conn: sqlite3.Connection) -> list[ExpiredEnvelope]:
            rows = conn.execute(
                "DELETE FROM mailbox WHERE seq IN (SELECT seq FROM mailbox WHERE expires_ms <= ? "
                "ORDER BY expires_ms LIMIT ?) RETURNING envelope_id, sender, recipient, size",
                (now_ms, limit),
            ).fetchall()
            _counted(conn, "mailbox_counts", ((row[2], row[3]) for row in rows), -1)
            return [
                ExpiredEnvelope(envelope_id=e, sender=s, recipient=r, peer=None)
                for e, s, r, _size in rows
            ]

        return await self.engine.write(op)

    async def mailbox_depth(self, user: str) -> MailboxDepth:
        _user(user)

        def op(conn: sqlite3.Connection) -> MailboxDepth:
            row = conn.execute(
                "SELECT depth, bytes FROM mailbox_counts WHERE recipient = ?", (user,)
            ).fetchone()
            return (
                MailboxDepth(envelopes=row[0], bytes=row[1])
                if row
                else MailboxDepth(envelopes=0, bytes=0)
            )

        return await self.engine.read(op)

    async def mailbox_stats(self) -> dict[str, MailboxDepth]:
        def op(conn: sqlite3.Connection) -> dict[str, MailboxDepth]:
            # One row per non-empty mailbox (the trigger deletes emptied ones).
            rows = conn.execute("SELECT recipient, depth, bytes FROM mailbox_counts").fetchall()
            return {
                recipient: MailboxDepth(envelopes=depth, bytes=size)
                for recipient, depth, size in rows
            }

        return await self.engine.read(op)

    # -- delivery statuses ---------------------------------------------------------
    async def status_set(self, envelope_id: str, sender: str, status: str, *, at_ms: int) -> None:
        check_text("envelope_id", envelope_id, MAX_ENVELOPE_ID_LENGTH)
        _user(sender)
        check_status(status)
        check_ms("at_ms", at_ms)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_SET_STATUS, (envelope_id, sender, status, at_ms))

        await self.engine.write(op)

    async def status_get(self, envelope_id: str) -> DeliveryStatus | None:
        check_text("envelope_id", envelope_id, MAX_ENVELOPE_ID_LENGTH)

        def op(conn: sqlite3.Connection) -> DeliveryStatus | None:
            # One read transaction: a spool entry and the status row that
            # replaces it are committed together, so one of them is seen.
            row = conn.execute(
                "SELECT sender, status, at_ms FROM statuses WHERE envelope_id = ?", (envelope_id,)
            ).fetchone()
            if row is None:
                # Spooled and not answered yet: `queued` since it was spooled.
                # (Databases written before this kept a `queued` row instead.)
                row = conn.execute(
                    "SELECT sender, ?, spooled_ms FROM spool WHERE envelope_id = ?",
                    (STATUS_QUEUED, envelope_id),
                ).fetchone()
            if row is None:
                return None
            return DeliveryStatus(
                envelope_id=envelope_id, sender=row[0], status=row[1], at_ms=row[2]
            )

        return await self.engine.read(op)

    # -- peers -----------------------------------------------------------------------
    async def peer_state_get(self, peer: str) -> PeerState | None:
        _peer(peer)

        def op(conn: sqlite3.Connection) -> PeerState | None:
            row = conn.execute(
                "SELECT peer, failures, backoff_until_ms, last_success_ms, last_error "
                "FROM peer_states WHERE peer = ?",
                (peer,),
            ).fetchone()
            return None if row is None else _peer_state(row)

        return await self.engine.read(op)

    async def peer_state_put(self, state: PeerState, *, fence: Lease | None = None) -> None:
        if not isinstance(state, PeerState):
            raise ValueError(f"state must be a PeerState, got {type(state).__name__}")
        error = state.last_error
        if error is not None and len(error) > MAX_LAST_ERROR_LENGTH:
            error = error[: MAX_LAST_ERROR_LENGTH - len(_TRUNCATED)] + _TRUNCATED

        def op(conn: sqlite3.Connection) -> None:
            check_fence(conn, fence)
            conn.execute(
                "INSERT INTO peer_states (peer, failures, backoff_until_ms, last_success_ms, "
                "last_error) VALUES (?, ?, ?, ?, ?) ON CONFLICT (peer) DO UPDATE SET "
                "failures = excluded.failures, backoff_until_ms = excluded.backoff_until_ms, "
                "last_success_ms = excluded.last_success_ms, last_error = excluded.last_error",
                (state.peer, state.failures, state.backoff_until_ms, state.last_success_ms, error),
            )

        await self.engine.write(op)

    async def peer_states(self) -> list[PeerState]:
        def op(conn: sqlite3.Connection) -> list[PeerState]:
            rows = conn.execute(
                "SELECT peer, failures, backoff_until_ms, last_success_ms, last_error "
                "FROM peer_states ORDER BY peer"
            ).fetchall()
            return [_peer_state(row) for row in rows]

        return await self.engine.read(op)

    # -- client tokens and user keys -------------------------------------------------
    async def token_put(self, user: str, token_hash: bytes, *, at_ms: int) -> None:
        _user(user)
        check_bytes("token_hash", token_hash, MAX_TOKEN_HASH_BYTES)
        check_ms("at_ms", at_ms)

        def op(conn: sqlite3.Connection) -> None:
            # A second row for one hash is refused by the primary key: a hash
            # collision must never let one token open two accounts.
            conn.execute(
                "INSERT INTO tokens (token_hash, user, created_ms) VALUES (?, ?, ?)",
                (token_hash, user, at_ms),
            )

        await self.engine.write(op)

    async def token_lookup(self, token_hash: bytes) -> str | None:
        check_bytes("token_hash", token_hash, MAX_TOKEN_HASH_BYTES)

        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT user FROM tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            return None if row is None else str(row[0])

        # One row by its primary key, on every client request: no thread hop.
        return await self.engine.read_small(op)

    async def token_revoke(self, user: str) -> int:
        _user(user)

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM tokens WHERE user = ?", (user,)).rowcount

        return await self.engine.write(op)

    async def user_keys_put(self, user: str, record: bytes, *, at_ms: int) -> None:
        _user(user)
        check_bytes("record", record)
        check_ms("at_ms", at_ms)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO user_keys (user, record, updated_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET record = excluded.record, "
                "updated_ms = excluded.updated_ms",
                (user, record, at_ms),
            )

        await self.engine.write(op)

    async def user_keys_get(self, user: str) -> bytes | None:
        _user(user)

        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT record FROM user_keys WHERE user = ?", (user,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self.engine.read(op)

    # -- housekeeping ----------------------------------------------------------------
    async def reusable_bytes(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            (pages,) = conn.execute("PRAGMA freelist_count").fetchone()
            (size,) = conn.execute("PRAGMA page_size").fetchone()
            return int(pages) * int(size)

        return await self.engine.read(op)

    def segment_stats(self) -> tuple[int, int, int]:
        """(segment files with live envelopes, their envelopes, their bytes), from memory."""
        return self.segments.stats()

    def segment_missing(self) -> int:
        """Envelopes found without their bytes in a segment file, still stored (from memory)."""
        return self.segments.missing()

    async def check_writable(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # A row written and removed again: the page really changes, so the
            # commit appends to the WAL and syncs it (an empty transaction, or
            # a row rewritten with its own values, proves only the lock), yet
            # no reader ever sees the row and nothing is left of it.
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_ms) VALUES (?, ?, 0)",
                (_PROBE_VERSION, "check_writable"),
            )
            conn.execute("DELETE FROM schema_version WHERE version = ?", (_PROBE_VERSION,))

        await self.engine.write(op, cancellable=True)

    async def prune(
        self, *, seen_before_ms: int, statuses_before_ms: int, txns_before_ms: int
    ) -> PruneCounts:
        check_ms("seen_before_ms", seen_before_ms)
        check_ms("statuses_before_ms", statuses_before_ms)
        check_ms("txns_before_ms", txns_before_ms)
        seen = await self._delete_chunks(
            _delete_chunked_sql("seen_envelopes", "envelope_id", "expires_ms < ?"),
            seen_before_ms,
        )
        # A status whose envelope still waits in the spool stays readable.
        statuses = await self._delete_chunks(
            _delete_chunked_sql(
                "statuses",
                "envelope_id",
                "at_ms < ? AND envelope_id NOT IN (SELECT envelope_id FROM spool)",
            ),
            statuses_before_ms,
        )
        txns = await self._delete_chunks(
            "DELETE FROM transactions WHERE (origin, txn_id) IN (SELECT origin, txn_id "
            "FROM transactions WHERE at_ms < ? LIMIT ?)",
            txns_before_ms,
        )
        return PruneCounts(seen=seen, statuses=statuses, txns=txns)

    async def _delete_chunks(self, sql: str, before_ms: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, (before_ms, DELETE_CHUNK)).rowcount

        total = 0
        while (count := await self.engine.write(op)) > 0:
            total += count
            if count < DELETE_CHUNK:
                break
        return total

    async def scrub(self) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            # TRUNCATE: copy every WAL frame into the file (where deletes have
            # already overwritten the bytes) and cut the WAL to zero length,
            # so no old page image with a deleted envelope survives in it.
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            # Deleted envelopes' segment ranges were zeroed at their commit; make
            # the zeros reach the disk too.
            self.segments.sync_zeros()
            return bool(busy == 0)

        return await self.engine.write_alone(op)


@asynccontextmanager
async def open_sqlite_storage(
    path: str | os.PathLike[str],
    *,
    readers: int = READER_THREADS,
    segment_threshold: int = SEGMENT_THRESHOLD_BYTES,
    segment_roll_bytes: int = SEGMENT_ROLL_BYTES,
) -> AsyncIterator[SqliteStorage]:
    """Open (creating and migrating as needed) the SQLite file at ``path``.

    ``async with open_sqlite_storage(path) as store: ...``: the writer and
    reader threads run for the body of the block and are closed on exit.
    Raises :class:`~gateway.errors.StorageError` if the file cannot be opened
    or was written by a newer gateway.
    """
    name = os.fspath(path)
    segments = SegmentStore(name, threshold=segment_threshold, roll_bytes=segment_roll_bytes)

    def setup(conn: sqlite3.Connection) -> None:
        migrate(conn, path=name)
        segments.install(conn)
        conn.execute("BEGIN IMMEDIATE")  # no other process commits while we recover
        try:
            segments.recover(conn)
        except OSError as exc:
            raise StorageError(f"storage {name}: segment files: {exc}") from exc
        finally:
            conn.execute("ROLLBACK")

    async with open_sqlite_engine(path, setup=setup, readers=readers, hooks=segments) as engine:
        yield SqliteStorage(engine, segments)
