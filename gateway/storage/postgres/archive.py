"""The retention archive on PostgreSQL: one hash chain for every node sharing the database.

Theory of operation
-------------------
The same records, holds and semantics as
:mod:`gateway.storage.sqlite.archive` (the contract tests run on both). What
differs is that several gateway nodes append at once, from several
processes, and the chain must stay **one** chain: each record names the hash
of the one before it and takes the next seq.

* **Appends are serialised on one row.** ``retention_archive_head`` holds the
  last seq handed out. An append's transaction first locks that row (an
  upsert that returns it: so a head lost to a ``TRUNCATE`` or never written
  is made again, and two first appends still queue), then reads the newest
  record's hash, chains its items after it, inserts them and moves the head.
  A second append, on any node, waits on the row lock until the first
  commits, then reads what it wrote: the chain follows commit order, and a
  seq is never handed out twice nor reused after deletion. An envelope
  already archived in that direction (a client's retry, on any node) is
  skipped under the same lock, so the check is exact; ``UNIQUE (envelope_id,
  direction)`` backs it.
* **Deletion is safe on every node at once.** The archive sweeper runs on
  each node (no lease): :meth:`PostgresArchive.expire` deletes in chunks
  whose rows it selects ``FOR UPDATE SKIP LOCKED``, so two nodes sweeping
  together delete disjoint rows, each record goes exactly once, and each
  node counts only its own deletions (the sum over nodes is the truth).
  Deletion never takes the head lock: appends do not wait for it.
* **A hold protects from the moment it is added.** Each deletion chunk first
  takes ``retention_holds`` in ``SHARE`` mode, which waits for a hold being
  added (and makes it wait), so a chunk either sees the new hold or
  committed before it was added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from gateway.core.archive import ZERO_HASH, ArchiveItem, ArchiveRecord, record_hash
from gateway.storage.archive import (
    DELETE_CHUNK,
    MAX_RECORDS_PER_READ,
    RECORD_COLUMNS,
    ArchiveStats,
    Hold,
    archive_record,
    check_append,
    check_hold,
    check_read,
)
from gateway.storage.base import MAX_USER_LENGTH, check_ms, check_text
from gateway.storage.postgres.engine import Connection, PostgresEngine

# A head row that is missing (emptied by hand) is made again after the newest record.
_LOCK_HEAD: Final = (
    "INSERT INTO retention_archive_head (one, seq) "
    "VALUES (true, (SELECT COALESCE(max(seq), 0) FROM retention_archive)) "
    "ON CONFLICT (one) DO UPDATE SET seq = retention_archive_head.seq RETURNING seq"
)
_INSERT: Final = (
    "INSERT INTO retention_archive (seq, envelope_id, direction, grp, sender, recipient, "
    "key_id, archived_ms, delete_after_ms, size, prev, hash, wrap, sender_key, envelope) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_DELETE_EXPIRED: Final = (
    "DELETE FROM retention_archive WHERE seq IN (SELECT seq FROM retention_archive a "
    "WHERE delete_after_ms <= %s AND NOT EXISTS (SELECT 1 FROM retention_holds h "
    "WHERE h.user_address IN (a.sender, a.recipient)) "
    "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED)"
)


class PostgresArchive:
    """The archive's methods on the :class:`PostgresEngine` the storage shares."""

    def __init__(self, engine: PostgresEngine) -> None:
        self.engine = engine

    async def append(self, items: Sequence[ArchiveItem], *, at_ms: int) -> list[str]:
        """Archive ``items`` durably, chained; the ids newly archived."""
        items = check_append(items, at_ms)
        if not items:
            return []

        def op(conn: Connection) -> list[str]:
            row = conn.execute(_LOCK_HEAD).fetchone()  # held to the commit: appends queue here
            seq = int(row[0]) if row is not None else 0
            newest = conn.execute(
                "SELECT hash FROM retention_archive ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            prev = bytes(newest[0]) if newest is not None else ZERO_HASH
            seen = {
                (str(envelope_id), str(direction))
                for envelope_id, direction in conn.execute(
                    "SELECT envelope_id, direction FROM retention_archive "
                    "WHERE envelope_id = ANY(%s)",
                    (sorted({item.envelope_id for item in items}),),
                ).fetchall()
            }
            rows = []
            archived = []
            for item in items:
                if (item.envelope_id, item.direction) in seen:
                    continue
                seen.add((item.envelope_id, item.direction))
                seq += 1
                digest = record_hash(seq, item, archived_ms=at_ms, prev=prev)
                rows.append(
                    (
                        seq,
                        item.envelope_id,
                        item.direction,
                        item.group,
                        item.sender,
                        item.recipient,
                        item.key_id,
                        at_ms,
                        item.delete_after_ms,
                        len(item.envelope),
                        prev,
                        digest,
                        item.wrap,
                        item.sender_key,
                        item.envelope,
                    )
                )
                prev = digest
                archived.append(item.envelope_id)
            if rows:
                with conn.cursor() as cursor:
                    cursor.executemany(_INSERT, rows)
                conn.execute("UPDATE retention_archive_head SET seq = %s", (seq,))
            return archived

        return await self.engine.write(op)

    async def records(
        self,
        *,
        from_ms: int,
        to_ms: int,
        user: str | None = None,
        after_seq: int = 0,
        limit: int = MAX_RECORDS_PER_READ,
    ) -> list[ArchiveRecord]:
        """Records archived in ``[from_ms, to_ms)``, by seq, after ``after_seq``; of ``user``."""
        check_read(from_ms=from_ms, to_ms=to_ms, user=user, limit=limit)
        where = "archived_ms >= %s AND archived_ms < %s AND seq > %s"
        args: list[object] = [from_ms, to_ms, after_seq]
        if user is not None:
            where += " AND (sender = %s OR recipient = %s)"
            args += [user, user]
        sql = (
            f"SELECT {RECORD_COLUMNS} FROM retention_archive "  # noqa: S608 -- constants only
            f"WHERE {where} ORDER BY seq LIMIT %s"
        )

        def op(conn: Connection) -> list[ArchiveRecord]:
            return [archive_record(row) for row in conn.execute(sql, (*args, limit)).fetchall()]

        return await self.engine.read(op)

    async def expire(self, *, now_ms: int) -> int:
        """Delete records past their ``delete_after_ms`` that no hold keeps; how many.

        Idempotent and safe on several nodes at once (the module docstring):
        rows another node is deleting are skipped, never deleted twice.
        """
        check_ms("now_ms", now_ms)

        def op(conn: Connection) -> int:
            conn.execute("LOCK TABLE retention_holds IN SHARE MODE")
            return conn.execute(_DELETE_EXPIRED, (now_ms, DELETE_CHUNK)).rowcount

        total = 0
        while True:
            deleted = await self.engine.write(op)
            total += deleted
            if deleted < DELETE_CHUNK:
                return total

    async def hold_add(self, user: str, *, at_ms: int, note: str = "") -> bool:
        """Hold ``user``'s records past their deletion time; False if already held."""
        check_hold(user, at_ms, note)

        def op(conn: Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO retention_holds (user_address, added_ms, note) VALUES (%s, %s, %s) "
                "ON CONFLICT (user_address) DO NOTHING",
                (user, at_ms, note),
            )
            return cursor.rowcount == 1

        return await self.engine.write(op)

    async def hold_remove(self, user: str) -> bool:
        check_text("user", user, MAX_USER_LENGTH)

        def op(conn: Connection) -> bool:
            cursor = conn.execute("DELETE FROM retention_holds WHERE user_address = %s", (user,))
            return cursor.rowcount == 1

        return await self.engine.write(op)

    async def holds(self) -> list[Hold]:
        def op(conn: Connection) -> list[Hold]:
            rows = conn.execute(
                "SELECT user_address, added_ms, note FROM retention_holds "
                'ORDER BY user_address COLLATE "C"'
            ).fetchall()
            return [Hold(str(user), int(added), str(note)) for user, added, note in rows]

        return await self.engine.read(op)

    async def stats(self) -> ArchiveStats:
        def op(conn: Connection) -> ArchiveStats:
            row = conn.execute(
                "SELECT count(*), COALESCE(sum(size), 0), min(archived_ms), "
                "(SELECT count(*) FROM retention_holds) FROM retention_archive"
            ).fetchone()
            assert row is not None  # an aggregate always answers one row
            records, size, oldest, holds = row
            return ArchiveStats(
                int(records), int(size), None if oldest is None else int(oldest), int(holds)
            )

        return await self.engine.read(op)
