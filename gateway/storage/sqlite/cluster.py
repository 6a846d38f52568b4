"""Nodes and leases on SQLite: the ``node_*`` and ``lease*`` methods of the Storage protocol.

A mixin of :class:`~gateway.storage.sqlite.store.SqliteStorage`. One process
owns an SQLite file, so it takes every lease; the tables exist so that
``gateway nodes`` and ``gateway peers`` read the same on both engines and the
sender runs one code path. Every op runs in the single writer's transaction,
so a claim and a fenced write are serialised by SQLite itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection

from gateway.storage.base import check_ms
from gateway.storage.leases import (
    LEASE_COLUMNS,
    NODE_COLUMNS,
    Lease,
    NodeRecord,
    check_claim,
    check_leave,
    check_renewal,
    decide_claim,
    fence_refused,
    lease_from_row,
    node_from_row,
)
from gateway.storage.sqlite.engine import SqliteEngine


def check_fence(conn: sqlite3.Connection, fence: Lease | None) -> None:
    """Inside a write: raise LeaseLostError unless ``fence`` is still the lease's grant."""
    if fence is None:
        return
    row = conn.execute(
        "SELECT 1 FROM leases WHERE name = ? AND incarnation = ? AND epoch = ?",
        (fence.name, fence.incarnation, fence.epoch),
    ).fetchone()
    if row is None:
        raise fence_refused(fence)


class SqliteCluster:
    engine: SqliteEngine

    async def node_beat(self, record: NodeRecord) -> str | None:
        if not isinstance(record, NodeRecord):
            raise ValueError(f"record must be a NodeRecord, got {type(record).__name__}")

        def op(conn: sqlite3.Connection) -> str | None:
            before = conn.execute(
                "SELECT incarnation FROM nodes WHERE node = ?", (record.node,)
            ).fetchone()
            conn.execute(
                f"INSERT OR REPLACE INTO nodes ({NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    record.node,
                    record.incarnation,
                    record.version,
                    record.rules_sha256,
                    record.started_ms,
                    record.beat_ms,
                ),
            )
            return None if before is None else str(before[0])

        return await self.engine.write(op)

    async def node_leave(self, node: str, incarnation: str, *, at_ms: int) -> None:
        check_leave(node, incarnation, at_ms)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM nodes WHERE node = ? AND incarnation = ?", (node, incarnation)
            )
            conn.execute(
                "UPDATE leases SET until_ms = ? WHERE incarnation = ? AND until_ms > ?",
                (at_ms, incarnation, at_ms),
            )

        await self.engine.write(op)

    async def nodes_forget(self, *, beat_before_ms: int) -> int:
        check_ms("beat_before_ms", beat_before_ms)

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM nodes WHERE beat_ms < ?", (beat_before_ms,)).rowcount

        return await self.engine.write(op)

    async def nodes_list(self) -> list[NodeRecord]:
        def op(conn: sqlite3.Connection) -> list[NodeRecord]:
            rows = conn.execute(
                f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY node"  # noqa: S608
            ).fetchall()
            return [node_from_row(row) for row in rows]

        return await self.engine.read(op)

    async def lease_claim(
        self,
        name: str,
        *,
        node: str,
        incarnation: str,
        at_ms: int,
        until_ms: int,
        take_from: str | None = None,
    ) -> Lease | None:
        check_claim(name, node, incarnation, at_ms, until_ms)

        def op(conn: sqlite3.Connection) -> Lease | None:
            row = conn.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases WHERE name = ?",  # noqa: S608
                (name,),
            ).fetchone()
            lease = decide_claim(
                None if row is None else lease_from_row(row),
                name=name,
                node=node,
                incarnation=incarnation,
                at_ms=at_ms,
                until_ms=until_ms,
                take_from=take_from,
            )
            if lease is not None:
                conn.execute(
                    f"INSERT OR REPLACE INTO leases ({LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (name, node, incarnation, lease.epoch, lease.since_ms, lease.until_ms),
                )
            return lease

        return await self.engine.write(op)

    async def leases_renew(
        self, names: Collection[str], *, node: str, incarnation: str, at_ms: int, until_ms: int
    ) -> list[Lease]:
        wanted = check_renewal(names, node, incarnation, at_ms, until_ms)
        if not wanted:
            return []

        def op(conn: sqlite3.Connection) -> list[Lease]:
            renewed = []
            for name in wanted:
                row = conn.execute(
                    f"UPDATE leases SET until_ms = MAX(until_ms, ?) "  # noqa: S608
                    f"WHERE name = ? AND incarnation = ? RETURNING {LEASE_COLUMNS}",
                    (until_ms, name, incarnation),
                ).fetchone()
                if row is not None:
                    renewed.append(lease_from_row(row))
            return renewed

        return await self.engine.write(op)

    async def lease_release(self, lease: Lease, *, at_ms: int) -> bool:
        if not isinstance(lease, Lease):
            raise ValueError(f"lease must be a Lease, got {type(lease).__name__}")
        check_ms("at_ms", at_ms)

        def op(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE leases SET until_ms = MIN(until_ms, ?) WHERE name = ? "
                    "AND incarnation = ? AND epoch = ?",
                    (at_ms, lease.name, lease.incarnation, lease.epoch),
                ).rowcount
                > 0
            )

        return await self.engine.write(op)

    async def leases_list(self) -> list[Lease]:
        def op(conn: sqlite3.Connection) -> list[Lease]:
            rows = conn.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases ORDER BY name"  # noqa: S608
            ).fetchall()
            return [lease_from_row(row) for row in rows]

        return await self.engine.read(op)
