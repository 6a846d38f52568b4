"""Sign-in sessions on SQLite: the ``session_*`` methods of the Storage protocol.

A mixin of :class:`~gateway.storage.sqlite.store.SqliteStorage` (which gives it
``engine``), kept apart so the store module stays one job. Lookups by a token
hash are one row by a unique index, read without a thread hop like
``token_lookup``; writes go through the engine's group commit.
"""

from __future__ import annotations

import json
import sqlite3

from gateway.storage._shared import _session_record, _session_values
from gateway.storage.base import (
    MAX_SESSION_ID_LENGTH,
    MAX_TOKEN_HASH_BYTES,
    SessionRecord,
    check_bytes,
    check_ms,
    check_text,
)
from gateway.storage.sqlite.engine import SqliteEngine

_COLUMNS = (
    "session_id, user, provider, access_hash, access_expires_ms, refresh_hash, "
    "refresh_expires_ms, created_ms, idp_refresh_token, idp_groups, acr, amr"
)


class SqliteSessions:
    engine: SqliteEngine

    async def session_put(self, record: SessionRecord) -> None:
        values = _session_values(record)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT OR REPLACE INTO sessions ({_COLUMNS}) "  # noqa: S608 -- constant columns
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )

        await self.engine.write(op)

    async def _session_by(self, column: str, value: bytes) -> SessionRecord | None:
        check_bytes(column, value, MAX_TOKEN_HASH_BYTES)

        def op(conn: sqlite3.Connection) -> SessionRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE {column} = ?",  # noqa: S608 -- our names
                (value,),
            ).fetchone()
            return None if row is None else _session_record(row)

        return await self.engine.read_small(op)

    async def session_by_access(self, access_hash: bytes) -> SessionRecord | None:
        return await self._session_by("access_hash", access_hash)

    async def session_by_refresh(self, refresh_hash: bytes) -> SessionRecord | None:
        return await self._session_by("refresh_hash", refresh_hash)

    async def session_delete(self, session_id: str) -> bool:
        check_text("session_id", session_id, MAX_SESSION_ID_LENGTH)

        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            return cursor.rowcount > 0

        return await self.engine.write(op)

    async def session_delete_ended(self, *, before_ms: int) -> int:
        check_ms("before_ms", before_ms)

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM sessions WHERE refresh_expires_ms < ?", (before_ms,)
            ).rowcount

        return await self.engine.write(op)

    async def session_groups(self) -> list[tuple[str, str, tuple[str, ...]]]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, str, tuple[str, ...]]]:
            rows = conn.execute(
                "SELECT user, provider, idp_groups FROM sessions ORDER BY access_expires_ms"
            ).fetchall()
            return [(row[0], row[1], tuple(json.loads(row[2]))) for row in rows]

        return await self.engine.read(op)
