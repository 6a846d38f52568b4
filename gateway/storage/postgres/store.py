"""The :class:`~gateway.storage.base.Storage` interface on PostgreSQL.

Each method checks its arguments (``ValueError`` before anything reaches the
server), then hands the engine one op: a plain function of a connection that
runs either as one write transaction (every write method is one op, so it is
all-or-nothing, and it may run twice, see :mod:`.engine`) or as a read
outside any transaction, where every read is one statement (one snapshot).

Idempotency holds across nodes because the database enforces it (unique
keys, ``ON CONFLICT``), and bounds hold because a writer locks the counter
rows it adds to, sorted, before it reads them (:mod:`.writes`). The tables
are in :mod:`gateway.storage.postgres.schema`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

import trio

from gateway.core.address import MAX_DOMAIN_LENGTH
from gateway.errors import Reason
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
from gateway.storage.arrivals import ArrivalSink
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
from gateway.storage.postgres.archive import PostgresArchive
from gateway.storage.postgres.arrivals import announce_spooled, watch_arrivals
from gateway.storage.postgres.cluster import PostgresCluster, check_fence
from gateway.storage.postgres.engine import POOL_SIZE, Connection, PostgresEngine, describe
from gateway.storage.postgres.engine import open_postgres_engine as _open_engine
from gateway.storage.postgres.schema import migrate
from gateway.storage.postgres.sessions import PostgresSessions
from gateway.storage.postgres.writes import (
    check_bound,
    present,
    set_statuses,
    store_in_mailboxes,
)

DELETE_CHUNK: Final = 1_000  # rows per commit for purges and prunes
_TRUNCATED: Final = " [truncated]"
_PROBE_VERSION: Final = -1  # check_writable's transient row; real versions start at 1

_SPOOL_COLUMNS = (
    "seq, envelope_id, peer, sender, recipient, created_ms, expires_ms, spooled_ms, "
    "burn_on_read, data"
)
_SPOOL_SUMMARY_COLUMNS = (
    "seq, envelope_id, peer, sender, recipient, created_ms, expires_ms, spooled_ms, size"
)
_MAILBOX_COLUMNS = (
    "seq, envelope_id, recipient, sender, created_ms, expires_ms, stored_ms, burn_on_read, data"
)
_TXN_SELECT = "SELECT body_hash, results, at_ms FROM transactions WHERE origin = %s AND txn_id = %s"


class _Replayed(Exception):
    """Another writer recorded the same transaction first: roll back, answer from it."""


class PostgresStorage(PostgresSessions, PostgresCluster):
    """:class:`~gateway.storage.base.Storage` on one PostgreSQL database.

    Build it with :func:`open_postgres_storage`.
    """

    def __init__(self, engine: PostgresEngine) -> None:
        self.engine = engine
        # The retention archive shares the pool (its own module).
        self.archive = PostgresArchive(engine)

    @property
    def commits(self) -> int:
        """Write transactions committed so far by this process."""
        return self.engine.commits

    # -- spool -------------------------------------------------------------------
    async def spool_put(
        self, items: Sequence[SpoolItem], *, at_ms: int, bound: Bound | None = None
    ) -> list[str]:
        _records("spool_put items", items, SpoolItem)
        check_ms("at_ms", at_ms)
        items = list(items)

        def op(conn: Connection) -> list[str]:
            ids = [item.envelope_id for item in items]
            known = present(conn, "statuses", ids) | present(conn, "spool", ids)
            fresh = _first_unseen(items, known)
            # Locks the lanes' counters even without a bound: sequence numbers
            # of one lane are then handed out in commit order.
            check_bound(conn, Reason.LANE_FULL, [(i.peer, i.size) for i in fresh], bound)
            if not fresh:
                return []
            rows = conn.execute(
                "INSERT INTO spool (envelope_id, peer, sender, recipient, created_ms, "
                "expires_ms, spooled_ms, size, burn_on_read, data) "
                "SELECT e, p, s, r, c, x, %s, z, b, d FROM unnest(%b::text[], %b::text[], "
                "%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::int[], "
                "%b::boolean[], %b::bytea[]) WITH ORDINALITY AS t(e, p, s, r, c, x, z, b, d, n) "
                "ORDER BY n ON CONFLICT (envelope_id) DO NOTHING RETURNING envelope_id",
                (
                    at_ms,
                    [i.envelope_id for i in fresh],
                    [i.peer for i in fresh],
                    [i.sender for i in fresh],
                    [i.recipient for i in fresh],
                    [i.created_ms for i in fresh],
                    [i.expires_ms for i in fresh],
                    [i.size for i in fresh],
                    [i.burn_on_read for i in fresh],
                    [i.data for i in fresh],
                ),
            ).fetchall()
            inserted = {row[0] for row in rows}
            return [item.envelope_id for item in fresh if item.envelope_id in inserted]

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
        due = -1 if now_ms is None else check_ms("now_ms", now_ms)

        def op(conn: Connection) -> list[SpoolEntry]:
            taken: list[SpoolEntry] = []
            total = 0
            rows = conn.execute(
                f"SELECT {_SPOOL_COLUMNS} FROM spool "  # noqa: S608
                "WHERE peer = %s AND seq > %s AND (%s < 0 OR NOT EXISTS ("
                "SELECT 1 FROM spool_deferred d "
                "WHERE d.envelope_id = spool.envelope_id AND d.not_before_ms > %s)) "
                "ORDER BY seq LIMIT %s",
                (peer, after_seq, due, due, max_items),
            )
            for row in rows:
                entry = _spool_entry(row)
                if taken and total + entry.size > max_bytes:
                    break
                taken.append(entry)
                total += entry.size
            return taken

        return await self.engine.read(op)

    async def spool_complete(
        self, peer: str, results: Mapping[str, str], *, at_ms: int, fence: Lease | None = None
    ) -> int:
        _peer(peer)
        pairs = _statuses(results)
        check_ms("at_ms", at_ms)
        if not pairs:
            return 0

        def op(conn: Connection) -> int:
            check_fence(conn, fence)
            # Removal and statuses in one statement: the sender comes from the row removed.
            cur = conn.execute(
                "WITH r AS (SELECT * FROM unnest(%b::text[], %b::text[]) AS r(id, status)), "
                "gone AS (DELETE FROM spool s USING r WHERE s.envelope_id = r.id "
                "AND s.peer = %s RETURNING s.envelope_id, s.sender, r.status) "
                "INSERT INTO statuses (envelope_id, sender, status, at_ms) "
                "SELECT envelope_id, sender, status, %s FROM gone "
                "ON CONFLICT (envelope_id) DO UPDATE SET status = excluded.status, "
                "at_ms = excluded.at_ms",
                ([e for e, _ in pairs], [s for _, s in pairs], peer, at_ms),
            )
            return cur.rowcount

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
        if not ids:
            return 0

        def op(conn: Connection) -> int:
            check_fence(conn, fence)
            return conn.execute(
                "INSERT INTO spool_deferred (envelope_id, not_before_ms, deferrals) "
                "SELECT DISTINCT envelope_id, %s::bigint, 1 FROM spool "
                "WHERE envelope_id = ANY(%s) AND peer = %s "
                "ON CONFLICT (envelope_id) DO UPDATE SET "
                "deferrals = spool_deferred.deferrals + 1, "
                "not_before_ms = %s::bigint + LEAST(%s::numeric, "
                "%s::numeric * power(2::numeric, LEAST(spool_deferred.deferrals, 30)))::bigint",
                (at_ms + first, ids, peer, at_ms, max_delay_ms, delay_ms),
            ).rowcount

        return await self.engine.write(op)

    async def spool_expire(
        self, now_ms: int, *, limit: int = EXPIRE_BATCH
    ) -> list[ExpiredEnvelope]:
        check_ms("now_ms", now_ms)
        check_count("limit", limit, maximum=MAX_ITEMS_PER_CALL)

        def op(conn: Connection) -> list[ExpiredEnvelope]:
            # SKIP LOCKED: two sweepers (two nodes) take different rows.
            rows = conn.execute(
                "WITH gone AS (DELETE FROM spool WHERE seq IN (SELECT seq FROM spool "
                "WHERE expires_ms <= %s ORDER BY expires_ms LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING envelope_id, sender, recipient, peer), "
                "status AS (INSERT INTO statuses (envelope_id, sender, status, at_ms) "
                "SELECT envelope_id, sender, %s, %s FROM gone "
                "ON CONFLICT (envelope_id) DO UPDATE SET status = excluded.status, "
                "at_ms = excluded.at_ms) "
                "SELECT envelope_id, sender, recipient, peer FROM gone",
                (now_ms, limit, STATUS_EXPIRED, now_ms),
            ).fetchall()
            return [
                ExpiredEnvelope(envelope_id=e, sender=s, recipient=r, peer=p) for e, s, r, p in rows
            ]

        return await self.engine.write(op)

    async def spool_stats(self) -> dict[str, LaneStats]:
        def op(conn: Connection) -> dict[str, LaneStats]:
            rows = conn.execute(
                "SELECT l.peer, l.depth, l.bytes, h.created_ms, h.spooled_ms FROM spool_lanes l "
                "CROSS JOIN LATERAL (SELECT created_ms, spooled_ms FROM spool "
                "WHERE spool.peer = l.peer ORDER BY seq LIMIT 1) h "
                "WHERE l.depth > 0 ORDER BY l.peer"
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
        def op(conn: Connection) -> list[str]:
            rows = conn.execute(
                "SELECT peer FROM spool_lanes WHERE depth > 0 ORDER BY peer"
            ).fetchall()
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

        def op(conn: Connection) -> list[SpoolSummary]:
            rows = conn.execute(
                f"SELECT {_SPOOL_SUMMARY_COLUMNS} FROM spool "  # noqa: S608
                "WHERE (%s::text IS NULL OR peer = %s) AND seq > %s ORDER BY seq LIMIT %s",
                (peer, peer, after, limit),
            ).fetchall()
            return [_spool_summary(row) for row in rows]

        return await self.engine.read(op)

    async def spool_retry(self, peer: str | None = None) -> int:
        if peer is not None:
            _peer(peer)

        def op(conn: Connection) -> int:
            cur = conn.execute(
                "UPDATE peer_states SET failures = 0, backoff_until_ms = 0 "
                "WHERE %s::text IS NULL OR peer = %s",
                (peer, peer),
            )
            changed = cur.rowcount
            # Envelopes waiting out a temporary answer (mailbox_full) go at once too.
            conn.execute(
                "DELETE FROM spool_deferred d USING spool s "
                "WHERE s.envelope_id = d.envelope_id AND (%s::text IS NULL OR s.peer = %s)",
                (peer, peer),
            )
            return changed

        return await self.engine.write(op)

    async def spool_purge(
        self, *, peer: str | None = None, created_before_ms: int | None = None, at_ms: int
    ) -> int:
        if peer is not None:
            _peer(peer)
        before = (
            None if created_before_ms is None else check_ms("created_before_ms", created_before_ms)
        )
        check_ms("at_ms", at_ms)

        def op(conn: Connection) -> int:
            cur = conn.execute(
                "WITH gone AS (DELETE FROM spool WHERE seq IN (SELECT seq FROM spool "
                "WHERE (%s::text IS NULL OR peer = %s) AND (%s::bigint IS NULL OR created_ms < %s) "
                "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING envelope_id, sender) "
                "INSERT INTO statuses (envelope_id, sender, status, at_ms) "
                "SELECT envelope_id, sender, %s, %s FROM gone "
                "ON CONFLICT (envelope_id) DO UPDATE SET status = excluded.status, "
                "at_ms = excluded.at_ms",
                (peer, peer, before, before, DELETE_CHUNK, STATUS_PURGED, at_ms),
            )
            return cur.rowcount

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

        def op(conn: Connection) -> DeliverOutcome:
            row = conn.execute(_TXN_SELECT, (origin, txn_id)).fetchone()
            if row is not None:
                replayed = _txn_record(origin, txn_id, row)
                return DeliverOutcome(stored=(), recipients=frozenset(), replayed=replayed)
            stored, recipients, full = store_in_mailboxes(
                conn, entries, at_ms, bound=bound, each=True, notify_as=self.engine.instance_id
            )
            answer = results_json
            if full:
                # The recorded answer is the one given: a replay reads mailbox_full too.
                answer = json.dumps(
                    dict(results) | dict.fromkeys(full, Reason.MAILBOX_FULL.value),
                    separators=(",", ":"),
                )
            recorded = conn.execute(
                "INSERT INTO transactions (origin, txn_id, body_hash, results, at_ms) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (origin, txn_id) DO NOTHING "
                "RETURNING 1",
                (origin, txn_id, body_hash, answer, at_ms),
            ).fetchone()
            if recorded is None:
                # Another node committed this transaction while we worked on it.
                raise _Replayed
            return DeliverOutcome(
                stored=tuple(e.envelope_id for e in stored),
                recipients=frozenset(recipients),
                mailbox_full=frozenset(full),
            )

        try:
            return await self.engine.write(op)
        except _Replayed:
            replayed = await self.txn_lookup(origin, txn_id)
            assert replayed is not None  # committed before our insert saw it
            return DeliverOutcome(stored=(), recipients=frozenset(), replayed=replayed)

    async def txn_lookup(self, origin: str, txn_id: str) -> TxnRecord | None:
        check_text("origin", origin, MAX_DOMAIN_LENGTH)
        check_text("txn_id", txn_id, MAX_TXN_ID_LENGTH)

        def op(conn: Connection) -> TxnRecord | None:
            row = conn.execute(_TXN_SELECT, (origin, txn_id)).fetchone()
            return None if row is None else _txn_record(origin, txn_id, row)

        return await self.engine.read(op)

    async def mailbox_put_local(
        self, entries: Sequence[EnvelopeRecord], *, at_ms: int, bound: Bound | None = None
    ) -> DeliverOutcome:
        _records("mailbox_put_local entries", entries, EnvelopeRecord)
        check_ms("at_ms", at_ms)
        entries = list(entries)

        def op(conn: Connection) -> DeliverOutcome:
            stored, recipients, _ = store_in_mailboxes(
                conn, entries, at_ms, bound=bound, notify_as=self.engine.instance_id
            )
            set_statuses(conn, [(e.envelope_id, e.sender, STATUS_DELIVERED, at_ms) for e in stored])
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
        not_expired = -1 if now_ms is None else check_ms("now_ms", now_ms)

        def op(conn: Connection) -> list[MailboxEntry]:
            rows = conn.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailbox "  # noqa: S608
                "WHERE recipient = %s AND seq > %s AND expires_ms > %s ORDER BY seq LIMIT %s",
                (user, after_seq, not_expired, limit),
            ).fetchall()
            return [_mailbox_entry(row) for row in rows]

        return await self.engine.read(op)

    async def mailbox_ack(self, user: str, envelope_ids: Collection[str]) -> int:
        _user(user)
        ids = _ids("mailbox_ack", envelope_ids)
        if not ids:
            return 0

        def op(conn: Connection) -> int:
            return conn.execute(
                "DELETE FROM mailbox WHERE recipient = %s AND envelope_id = ANY(%s)", (user, ids)
            ).rowcount

        return await self.engine.write(op)

    async def mailbox_expire(
        self, now_ms: int, *, limit: int = EXPIRE_BATCH
    ) -> list[ExpiredEnvelope]:
        check_ms("now_ms", now_ms)
        check_count("limit", limit, maximum=MAX_ITEMS_PER_CALL)

        def op(conn: Connection) -> list[ExpiredEnvelope]:
            rows = conn.execute(
                "DELETE FROM mailbox WHERE seq IN (SELECT seq FROM mailbox WHERE expires_ms <= %s "
                "ORDER BY expires_ms LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING envelope_id, sender, recipient",
                (now_ms, limit),
            ).fetchall()
            return [
                ExpiredEnvelope(envelope_id=e, sender=s, recipient=r, peer=None) for e, s, r in rows
            ]

        return await self.engine.write(op)

    async def mailbox_depth(self, user: str) -> MailboxDepth:
        _user(user)

        def op(conn: Connection) -> MailboxDepth:
            row = conn.execute(
                "SELECT depth, bytes FROM mailbox_counts WHERE recipient = %s", (user,)
            ).fetchone()
            if row is None:
                return MailboxDepth(envelopes=0, bytes=0)
            return MailboxDepth(envelopes=int(row[0]), bytes=int(row[1]))

        return await self.engine.read(op)

    async def mailbox_stats(self) -> dict[str, MailboxDepth]:
        def op(conn: Connection) -> dict[str, MailboxDepth]:
            rows = conn.execute(
                "SELECT recipient, depth, bytes FROM mailbox_counts WHERE depth > 0"
            ).fetchall()
            return {
                recipient: MailboxDepth(envelopes=int(depth), bytes=int(size))
                for recipient, depth, size in rows
            }

        return await self.engine.read(op)

    async def watch_arrivals(
        self,
        sink: ArrivalSink,
        *,
        on_lost: Callable[[], None] | None = None,
        spooled: Callable[[Iterable[str] | None], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Wake ``sink``'s waiters for arrivals other nodes commit, until cancelled.

        See :mod:`gateway.storage.postgres.arrivals` (``LISTEN`` on a connection of its own).
        """
        await watch_arrivals(
            self.engine, sink, on_lost=on_lost, spooled=spooled, task_status=task_status
        )

    async def announce_spooled(self, peers: Collection[str]) -> None:
        """Tell other nodes' senders that envelopes for ``peers`` were spooled."""
        await announce_spooled(self.engine, peers)

    # -- delivery statuses ---------------------------------------------------------
    async def status_set(self, envelope_id: str, sender: str, status: str, *, at_ms: int) -> None:
        check_text("envelope_id", envelope_id, MAX_ENVELOPE_ID_LENGTH)
        _user(sender)
        check_status(status)
        check_ms("at_ms", at_ms)

        def op(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO statuses (envelope_id, sender, status, at_ms) "
                "VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (envelope_id) DO UPDATE SET status = excluded.status, "
                "at_ms = excluded.at_ms",
                (envelope_id, sender, status, at_ms),
            )

        await self.engine.write(op)

    async def status_get(self, envelope_id: str) -> DeliveryStatus | None:
        check_text("envelope_id", envelope_id, MAX_ENVELOPE_ID_LENGTH)

        def op(conn: Connection) -> DeliveryStatus | None:
            # One statement, one snapshot: a spool entry and the status row that
            # replaces it are committed together, so one of them is seen.
            row = conn.execute(
                "(SELECT sender, status, at_ms, 0 AS o FROM statuses WHERE envelope_id = %s) "
                "UNION ALL (SELECT sender, %s, spooled_ms, 1 FROM spool WHERE envelope_id = %s) "
                "ORDER BY o LIMIT 1",
                (envelope_id, STATUS_QUEUED, envelope_id),
            ).fetchone()
            if row is None:
                return None
            return DeliveryStatus(
                envelope_id=envelope_id, sender=row[0], status=row[1], at_ms=int(row[2])
            )

        return await self.engine.read(op)

    # -- peers -----------------------------------------------------------------------
    async def peer_state_get(self, peer: str) -> PeerState | None:
        _peer(peer)

        def op(conn: Connection) -> PeerState | None:
            row = conn.execute(
                "SELECT peer, failures, backoff_until_ms, last_success_ms, last_error "
                "FROM peer_states WHERE peer = %s",
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

        def op(conn: Connection) -> None:
            check_fence(conn, fence)
            conn.execute(
                "INSERT INTO peer_states (peer, failures, backoff_until_ms, last_success_ms, "
                "last_error) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (peer) DO UPDATE SET "
                "failures = excluded.failures, backoff_until_ms = excluded.backoff_until_ms, "
                "last_success_ms = excluded.last_success_ms, last_error = excluded.last_error",
                (state.peer, state.failures, state.backoff_until_ms, state.last_success_ms, error),
            )

        await self.engine.write(op)

    async def peer_states(self) -> list[PeerState]:
        def op(conn: Connection) -> list[PeerState]:
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

        def op(conn: Connection) -> None:
            # A second row for one hash is refused by the primary key: a hash
            # collision must never let one token open two accounts.
            conn.execute(
                "INSERT INTO tokens (token_hash, user_address, created_ms) VALUES (%s, %s, %s)",
                (token_hash, user, at_ms),
            )

        await self.engine.write(op)

    async def token_lookup(self, token_hash: bytes) -> str | None:
        check_bytes("token_hash", token_hash, MAX_TOKEN_HASH_BYTES)

        def op(conn: Connection) -> str | None:
            row = conn.execute(
                "SELECT user_address FROM tokens WHERE token_hash = %s", (token_hash,)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self.engine.read(op)

    async def token_revoke(self, user: str) -> int:
        _user(user)

        def op(conn: Connection) -> int:
            return conn.execute("DELETE FROM tokens WHERE user_address = %s", (user,)).rowcount

        return await self.engine.write(op)

    async def user_keys_put(self, user: str, record: bytes, *, at_ms: int) -> None:
        _user(user)
        check_bytes("record", record)
        check_ms("at_ms", at_ms)

        def op(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO user_keys (user_address, record, updated_ms) VALUES (%s, %s, %s) "
                "ON CONFLICT (user_address) DO UPDATE SET record = excluded.record, "
                "updated_ms = excluded.updated_ms",
                (user, record, at_ms),
            )

        await self.engine.write(op)

    async def user_keys_get(self, user: str) -> bytes | None:
        _user(user)

        def op(conn: Connection) -> bytes | None:
            row = conn.execute(
                "SELECT record FROM user_keys WHERE user_address = %s", (user,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self.engine.read(op)

    # -- housekeeping ----------------------------------------------------------------
    async def reusable_bytes(self) -> int:
        """Always 0: the disk reserve (:mod:`gateway.reserve`) is SQLite's alone.

        The database server's disk is not ours to watch: a full one answers
        SQLSTATE 53100, which is a :class:`~gateway.errors.StorageFullError`.
        """
        return 0

    async def check_writable(self) -> None:
        def op(conn: Connection) -> None:
            # A row written and removed again: the transaction gets an id and its
            # commit flushes the WAL (synchronous_commit), yet changes nothing.
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_ms) "
                "VALUES (%s, 'check_writable', 0) ON CONFLICT (version) DO NOTHING",
                (_PROBE_VERSION,),
            )
            conn.execute("DELETE FROM schema_version WHERE version = %s", (_PROBE_VERSION,))

        await self.engine.write(op, cancellable=True)

    async def prune(
        self, *, seen_before_ms: int, statuses_before_ms: int, txns_before_ms: int
    ) -> PruneCounts:
        check_ms("seen_before_ms", seen_before_ms)
        check_ms("statuses_before_ms", statuses_before_ms)
        check_ms("txns_before_ms", txns_before_ms)
        seen = await self._delete_chunks(
            "DELETE FROM seen_envelopes WHERE envelope_id IN (SELECT envelope_id "
            "FROM seen_envelopes WHERE expires_ms < %s LIMIT %s)",
            seen_before_ms,
        )
        # A status whose envelope still waits in the spool stays readable.
        statuses = await self._delete_chunks(
            "DELETE FROM statuses WHERE envelope_id IN (SELECT envelope_id FROM statuses t "
            "WHERE at_ms < %s AND NOT EXISTS (SELECT 1 FROM spool s "
            "WHERE s.envelope_id = t.envelope_id) LIMIT %s)",
            statuses_before_ms,
        )
        txns = await self._delete_chunks(
            "DELETE FROM transactions WHERE (origin, txn_id) IN (SELECT origin, txn_id "
            "FROM transactions WHERE at_ms < %s LIMIT %s)",
            txns_before_ms,
        )
        return PruneCounts(seen=seen, statuses=statuses, txns=txns)

    async def _delete_chunks(self, sql: str, before_ms: int) -> int:
        def op(conn: Connection) -> int:
            return conn.execute(sql.encode(), (before_ms, DELETE_CHUNK)).rowcount

        total = 0
        while (count := await self.engine.write(op)) > 0:
            total += count
            if count < DELETE_CHUNK:
                break
        return total

    async def scrub(self) -> bool:
        """Nothing to do that would help: PostgreSQL cannot overwrite deleted rows.

        A deleted row stays in its page as a dead tuple until VACUUM reuses the
        space, and in the WAL until its segment is recycled; docs/storage.md says
        what remains and what an operator can do. Returns True (nothing pending).
        """
        return True


@asynccontextmanager
async def open_postgres_storage(
    url: str, *, pool_size: int = POOL_SIZE
) -> AsyncIterator[PostgresStorage]:
    """Connect to the database at ``url`` (migrating it as needed) and open a pool.

    ``async with open_postgres_storage(url) as store: ...``. Raises
    :class:`~gateway.errors.StorageError` with one clear line if the URL is
    wrong, the server cannot be reached, or the schema is newer than this
    gateway's.
    """
    name = describe(url)

    def setup(conn: Connection) -> None:
        migrate(conn, name=name)

    async with _open_engine(url, setup=setup, pool_size=pool_size) as engine:
        yield PostgresStorage(engine)
