"""The retention archive on SQLite: appends chained in the writer's order, deletions in chunks.

Each append is one op of the writer's group commit: it reads the newest row's
hash, chains each new record to it (:func:`gateway.core.archive.record_hash`)
and inserts them, so the chain follows the order of commits whatever the
number of writers. An envelope already archived in that direction is left
as it is (a client's retry), and its id is not returned.

Deletion (:meth:`SqliteArchive.expire`) takes rows whose ``delete_after_ms``
has passed, oldest first, at most :data:`DELETE_CHUNK` per commit, and never
one whose sender or recipient a hold names. Holds are one small table.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Final

from gateway.core.archive import ZERO_HASH, ArchiveItem, ArchiveRecord, record_hash
from gateway.storage.archive import (
    DELETE_CHUNK,
    MAX_NOTE_LENGTH,
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
from gateway.storage.sqlite.engine import SqliteEngine

__all__ = [
    "DELETE_CHUNK",
    "MAX_NOTE_LENGTH",
    "MAX_RECORDS_PER_READ",
    "ArchiveStats",
    "Hold",
    "SqliteArchive",
]

_DELETE_EXPIRED: Final = (
    "DELETE FROM retention_archive WHERE seq IN (SELECT seq FROM retention_archive "
    "WHERE delete_after_ms <= ? AND sender NOT IN (SELECT user FROM retention_holds) "
    "AND recipient NOT IN (SELECT user FROM retention_holds) ORDER BY seq LIMIT ?)"
)


class SqliteArchive:
    """The archive's methods on a :class:`SqliteEngine` the storage shares."""

    def __init__(self, engine: SqliteEngine) -> None:
        self.engine = engine

    async def append(self, items: Sequence[ArchiveItem], *, at_ms: int) -> list[str]:
        """Archive ``items`` durably, chained; the ids newly archived."""
        items = check_append(items, at_ms)

        def op(conn: sqlite3.Connection) -> list[str]:
            row = conn.execute(
                "SELECT seq, hash FROM retention_archive ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            (seq,) = conn.execute(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence "
                "WHERE name = 'retention_archive'), 0)"
            ).fetchone()
            prev = bytes(row[1]) if row is not None else ZERO_HASH
            archived = []
            for item in items:
                if conn.execute(
                    "SELECT 1 FROM retention_archive WHERE envelope_id = ? AND direction = ?",
                    (item.envelope_id, item.direction),
                ).fetchone():
                    continue
                seq += 1
                digest = record_hash(seq, item, archived_ms=at_ms, prev=prev)
                conn.execute(
                    "INSERT INTO retention_archive (seq, envelope_id, direction, grp, sender, "
                    "recipient, key_id, archived_ms, delete_after_ms, size, prev, hash, wrap, "
                    "sender_key, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    ),
                )
                prev = digest
                archived.append(item.envelope_id)
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
        where = "archived_ms >= ? AND archived_ms < ? AND seq > ?"
        args: list[object] = [from_ms, to_ms, after_seq]
        if user is not None:
            where += " AND (sender = ? OR recipient = ?)"
            args += [user, user]

        sql = (
            f"SELECT {RECORD_COLUMNS} FROM retention_archive "  # noqa: S608 -- constants only
            f"WHERE {where} ORDER BY seq LIMIT ?"
        )

        def op(conn: sqlite3.Connection) -> list[ArchiveRecord]:
            rows = conn.execute(sql, (*args, limit)).fetchall()
            return [archive_record(row) for row in rows]

        return await self.engine.read(op)

    async def expire(self, *, now_ms: int) -> int:
        """Delete records past their ``delete_after_ms`` that no hold keeps; how many."""
        check_ms("now_ms", now_ms)

        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(_DELETE_EXPIRED, (now_ms, DELETE_CHUNK))
            return cursor.rowcount

        total = 0
        while True:
            deleted = await self.engine.write(op)
            total += deleted
            if deleted < DELETE_CHUNK:
                return total

    async def hold_add(self, user: str, *, at_ms: int, note: str = "") -> bool:
        """Hold ``user``'s records past their deletion time; False if already held."""
        check_hold(user, at_ms, note)

        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO retention_holds (user, added_ms, note) VALUES (?, ?, ?)",
                (user, at_ms, note),
            )
            return cursor.rowcount == 1

        return await self.engine.write(op)

    async def hold_remove(self, user: str) -> bool:
        check_text("user", user, MAX_USER_LENGTH)

        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM retention_holds WHERE user = ?", (user,)).rowcount == 1

        return await self.engine.write(op)

    async def holds(self) -> list[Hold]:
        def op(conn: sqlite3.Connection) -> list[Hold]:
            rows = conn.execute(
                "SELECT user, added_ms, note FROM retention_holds ORDER BY user"
            ).fetchall()
            return [Hold(user, added_ms, note) for user, added_ms, note in rows]

        return await self.engine.read(op)

    async def stats(self) -> ArchiveStats:
        def op(conn: sqlite3.Connection) -> ArchiveStats:
            records, size, oldest = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(archived_ms) FROM retention_archive"
            ).fetchone()
            (holds,) = conn.execute("SELECT COUNT(*) FROM retention_holds").fetchone()
            return ArchiveStats(records, size, oldest, holds)

        return await self.engine.read(op)
