"""Nodes and leases on PostgreSQL: the ``node_*`` and ``lease*`` methods of the Storage protocol.

A mixin of :class:`~gateway.storage.postgres.store.PostgresStorage`. Several
nodes share these rows, so every decision is made on a locked row:

* A claim makes sure the lease's row exists (``INSERT ... ON CONFLICT DO
  NOTHING``, so two nodes claiming a new name at once end with one row), locks
  it ``FOR UPDATE``, decides (:func:`~gateway.storage.leases.decide_claim`)
  and writes, in one transaction: two claimants are serialised by the lock.
* A fenced write (:func:`check_fence`) reads the lease row ``FOR SHARE`` in
  its own transaction: a claim by another node (which needs ``FOR UPDATE``)
  either commits before it, and the fence then fails, or waits for it to
  commit. A lane can therefore never record answers after its lease was
  granted to another node.
* A beat records the node's clock offset from the database server's
  (``clock_timestamp()``), shown by ``gateway nodes``: leases trust the
  nodes' clocks to agree.
"""

from __future__ import annotations

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
from gateway.storage.postgres.engine import Connection, PostgresEngine

_DB_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


def check_fence(conn: Connection, fence: Lease | None) -> None:
    """Inside a write: raise LeaseLostError unless ``fence`` is still the lease's grant."""
    if fence is None:
        return
    row = conn.execute(
        "SELECT 1 FROM leases WHERE name = %s AND incarnation = %s AND epoch = %s FOR SHARE",
        (fence.name, fence.incarnation, fence.epoch),
    ).fetchone()
    if row is None:
        raise fence_refused(fence)


class PostgresCluster:
    engine: PostgresEngine

    async def node_beat(self, record: NodeRecord) -> str | None:
        if not isinstance(record, NodeRecord):
            raise ValueError(f"record must be a NodeRecord, got {type(record).__name__}")

        def op(conn: Connection) -> str | None:
            before = conn.execute(
                "SELECT incarnation FROM nodes WHERE node = %s FOR UPDATE", (record.node,)
            ).fetchone()
            conn.execute(
                f"INSERT INTO nodes ({NODE_COLUMNS}, skew_ms) "  # noqa: S608 -- constant columns
                f"VALUES (%s, %s, %s, %s, %s, %s, %s - {_DB_NOW_MS}) "
                "ON CONFLICT (node) DO UPDATE SET incarnation = excluded.incarnation, "
                "version = excluded.version, rules_sha256 = excluded.rules_sha256, "
                "started_ms = excluded.started_ms, beat_ms = excluded.beat_ms, "
                "skew_ms = excluded.skew_ms",
                (
                    record.node,
                    record.incarnation,
                    record.version,
                    record.rules_sha256,
                    record.started_ms,
                    record.beat_ms,
                    record.beat_ms,
                ),
            )
            return None if before is None else str(before[0])

        return await self.engine.write(op)

    async def node_leave(self, node: str, incarnation: str, *, at_ms: int) -> None:
        check_leave(node, incarnation, at_ms)

        def op(conn: Connection) -> None:
            conn.execute(
                "DELETE FROM nodes WHERE node = %s AND incarnation = %s", (node, incarnation)
            )
            conn.execute(
                "UPDATE leases SET until_ms = %s WHERE incarnation = %s AND until_ms > %s",
                (at_ms, incarnation, at_ms),
            )

        await self.engine.write(op)

    async def nodes_forget(self, *, beat_before_ms: int) -> int:
        check_ms("beat_before_ms", beat_before_ms)

        def op(conn: Connection) -> int:
            return conn.execute("DELETE FROM nodes WHERE beat_ms < %s", (beat_before_ms,)).rowcount

        return await self.engine.write(op)

    async def nodes_list(self) -> list[NodeRecord]:
        def op(conn: Connection) -> list[NodeRecord]:
            rows = conn.execute(
                f"SELECT {NODE_COLUMNS}, skew_ms FROM nodes ORDER BY node"  # noqa: S608
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

        def op(conn: Connection) -> Lease | None:
            conn.execute(
                f"INSERT INTO leases ({LEASE_COLUMNS}) VALUES (%s, '', '', 0, 0, 0) "  # noqa: S608
                "ON CONFLICT (name) DO NOTHING",
                (name,),
            )
            row = conn.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases WHERE name = %s FOR UPDATE",  # noqa: S608
                (name,),
            ).fetchone()
            assert row is not None  # made just above, and leases are never deleted
            lease = decide_claim(
                lease_from_row(row),
                name=name,
                node=node,
                incarnation=incarnation,
                at_ms=at_ms,
                until_ms=until_ms,
                take_from=take_from,
            )
            if lease is not None:
                conn.execute(
                    "UPDATE leases SET node = %s, incarnation = %s, epoch = %s, since_ms = %s, "
                    "until_ms = %s WHERE name = %s",
                    (node, incarnation, lease.epoch, lease.since_ms, lease.until_ms, name),
                )
            return lease

        return await self.engine.write(op)

    async def leases_renew(
        self, names: Collection[str], *, node: str, incarnation: str, at_ms: int, until_ms: int
    ) -> list[Lease]:
        wanted = check_renewal(names, node, incarnation, at_ms, until_ms)
        if not wanted:
            return []

        def op(conn: Connection) -> list[Lease]:
            rows = conn.execute(
                "UPDATE leases SET until_ms = GREATEST(until_ms, %s) "  # noqa: S608
                f"WHERE name = ANY(%s) AND incarnation = %s RETURNING {LEASE_COLUMNS}",
                (until_ms, wanted, incarnation),
            ).fetchall()
            return sorted((lease_from_row(row) for row in rows), key=lambda lease: lease.name)

        return await self.engine.write(op)

    async def lease_release(self, lease: Lease, *, at_ms: int) -> bool:
        if not isinstance(lease, Lease):
            raise ValueError(f"lease must be a Lease, got {type(lease).__name__}")
        check_ms("at_ms", at_ms)

        def op(conn: Connection) -> bool:
            cur = conn.execute(
                "UPDATE leases SET until_ms = LEAST(until_ms, %s) WHERE name = %s "
                "AND incarnation = %s AND epoch = %s",
                (at_ms, lease.name, lease.incarnation, lease.epoch),
            )
            return cur.rowcount > 0

        return await self.engine.write(op)

    async def leases_list(self) -> list[Lease]:
        def op(conn: Connection) -> list[Lease]:
            rows = conn.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases WHERE node <> '' ORDER BY name"  # noqa: S608
            ).fetchall()
            return [lease_from_row(row) for row in rows]

        return await self.engine.read(op)
