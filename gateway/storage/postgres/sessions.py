"""Sign-in sessions on PostgreSQL: the ``session_*`` methods of the Storage protocol.

The same rows and semantics as :mod:`gateway.storage.sqlite.sessions`: one row
per session, found by the hash of its session token or of its refresh token
(each ``UNIQUE``, so two nodes can never hold one token for two sessions);
lists are JSON arrays. A mixin of
:class:`~gateway.storage.postgres.store.PostgresStorage`, which gives it
``engine``.
"""

from __future__ import annotations

import json

from gateway.storage._shared import _session_record, _session_values
from gateway.storage.base import (
    MAX_SESSION_ID_LENGTH,
    MAX_TOKEN_HASH_BYTES,
    SessionRecord,
    check_bytes,
    check_ms,
    check_text,
)
from gateway.storage.postgres.engine import Connection, PostgresEngine

_COLUMNS = (
    "session_id, user_address, provider, access_hash, access_expires_ms, refresh_hash, "
    "refresh_expires_ms, created_ms, idp_refresh_token, idp_groups, acr, amr"
)
_UPSERT = (
    f"INSERT INTO sessions ({_COLUMNS}) "  # noqa: S608 -- constant columns
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (session_id) DO UPDATE SET "
    + ", ".join(
        f"{column} = excluded.{column}"
        for column in _COLUMNS.replace(" ", "").split(",")
        if column != "session_id"
    )
)


class PostgresSessions:
    engine: PostgresEngine

    async def session_put(self, record: SessionRecord) -> None:
        values = _session_values(record)

        def op(conn: Connection) -> None:
            conn.execute(_UPSERT, values)

        await self.engine.write(op)

    async def _session_by(self, column: str, value: bytes) -> SessionRecord | None:
        check_bytes(column, value, MAX_TOKEN_HASH_BYTES)
        sql = f"SELECT {_COLUMNS} FROM sessions WHERE {column} = %s"  # noqa: S608 -- our names

        def op(conn: Connection) -> SessionRecord | None:
            row = conn.execute(sql, (value,)).fetchone()
            return None if row is None else _session_record(row)

        return await self.engine.read(op)

    async def session_by_access(self, access_hash: bytes) -> SessionRecord | None:
        return await self._session_by("access_hash", access_hash)

    async def session_by_refresh(self, refresh_hash: bytes) -> SessionRecord | None:
        return await self._session_by("refresh_hash", refresh_hash)

    async def session_delete(self, session_id: str) -> bool:
        check_text("session_id", session_id, MAX_SESSION_ID_LENGTH)

        def op(conn: Connection) -> bool:
            cursor = conn.execute("DELETE FROM sessions WHERE session_id = %s", (session_id,))
            return cursor.rowcount > 0

        return await self.engine.write(op)

    async def session_delete_ended(self, *, before_ms: int) -> int:
        check_ms("before_ms", before_ms)

        def op(conn: Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM sessions WHERE refresh_expires_ms < %s", (before_ms,)
            )
            return cursor.rowcount

        return await self.engine.write(op)

    async def session_groups(self) -> list[tuple[str, str, tuple[str, ...]]]:
        def op(conn: Connection) -> list[tuple[str, str, tuple[str, ...]]]:
            rows = conn.execute(
                "SELECT user_address, provider, idp_groups FROM sessions ORDER BY access_expires_ms"
            ).fetchall()
            return [(str(row[0]), str(row[1]), tuple(json.loads(row[2]))) for row in rows]

        return await self.engine.read(op)
