"""The retention archive on both engines: chained appends, reads, deletion after keep, holds.

Each contract test runs on SQLite and PostgreSQL (``engine_store``, tests/conftest.py);
the PostgreSQL-only tests below share one database between two stores, as two nodes do.
"""

from __future__ import annotations

import io
import itertools
import sqlite3
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from prometheus_client import REGISTRY

from gateway.archive_sweeper import sweep_archive
from gateway.cli.retention import _write_export
from gateway.core.archive import ZERO_HASH, ArchiveItem, check_chain, read_export
from gateway.crypto.key_records import org_verify_key
from gateway.crypto.retention_keys import export_signature_verifies
from gateway.storage.archive import MAX_RECORDS_PER_READ
from gateway.storage.postgres import open_postgres_storage

T0 = 1_800_000_000_000
SEED = bytes(range(32))


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


DAY_MS = 86_400_000


def item(n: int, *, sender: str = "alice@acme.example", keep_days: int = 30) -> ArchiveItem:
    return ArchiveItem(
        envelope_id=f"id{n:020d}",
        group="finance",
        direction="outbound",
        sender=sender,
        recipient="bob@globex.example",
        key_id="acme-2026",
        delete_after_ms=T0 + keep_days * DAY_MS,
        envelope=b'{"v":2,"n":%d}' % n,
    )


async def test_appends_are_chained_in_order_and_retries_archive_nothing_twice(
    engine_store: Any,
) -> None:
    archive = engine_store.archive
    assert await archive.append([item(1), item(2)], at_ms=T0) == [
        item(1).envelope_id,
        item(2).envelope_id,
    ]
    assert await archive.append([item(2), item(3)], at_ms=T0 + 1) == [item(3).envelope_id]
    records = await archive.records(from_ms=0, to_ms=T0 + DAY_MS)
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev == ZERO_HASH
    assert records[1].prev == records[0].hash
    assert records[2].prev == records[1].hash
    assert check_chain(records) == []
    assert records[2].envelope == item(3).envelope
    assert records[2].archived_ms == T0 + 1
    stats = await archive.stats()
    assert (stats.records, stats.oldest_archived_ms, stats.holds) == (3, T0, 0)
    assert stats.bytes == sum(len(item(n).envelope) for n in (1, 2, 3))


async def test_a_tampered_row_breaks_the_chain(
    storage_engine: str,
    open_store: Callable[[], AbstractAsyncContextManager[Any]],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    async with open_store() as store:
        await store.archive.append([item(1), item(2), item(3)], at_ms=T0)
    tamper = "UPDATE retention_archive SET recipient = 'eve@evil.example' WHERE seq = 2"
    if storage_engine == "sqlite":
        with sqlite3.connect(tmp_path / "gateway.db") as conn:
            conn.execute(tamper)
    else:
        with psycopg.connect(request.getfixturevalue("postgres_url"), autocommit=True) as pg:
            pg.execute(tamper)
    async with open_store() as store:
        records = await store.archive.records(from_ms=0, to_ms=T0 + 1)
    assert check_chain(records) == ["record 2: its hash does not match its content"]


async def test_reads_by_time_and_user(engine_store: Any) -> None:
    store = engine_store
    await store.archive.append([item(1)], at_ms=T0)
    await store.archive.append([item(2, sender="carol@acme.example")], at_ms=T0 + DAY_MS)
    later = await store.archive.records(from_ms=T0 + 1, to_ms=T0 + 2 * DAY_MS)
    assert [r.seq for r in later] == [2]
    carol = await store.archive.records(from_ms=0, to_ms=T0 + 2 * DAY_MS, user="carol@acme.example")
    assert [r.seq for r in carol] == [2]
    bob = await store.archive.records(from_ms=0, to_ms=T0 + 2 * DAY_MS, user="bob@globex.example")
    assert [r.seq for r in bob] == [1, 2]
    with pytest.raises(ValueError, match="limit"):
        await store.archive.records(from_ms=0, to_ms=1, limit=0)


async def test_deletion_after_keep_spares_held_users_and_leaves_a_verifiable_rest(
    engine_store: Any,
) -> None:
    archive = engine_store.archive
    await archive.append(
        [
            item(1, keep_days=1),
            item(2, keep_days=1, sender="carol@acme.example"),
            item(3, keep_days=30),
        ],
        at_ms=T0,
    )
    assert await archive.hold_add("carol@acme.example", at_ms=T0, note="case 42")
    assert not await archive.hold_add("carol@acme.example", at_ms=T0)
    assert await archive.expire(now_ms=T0 + DAY_MS - 1) == 0
    assert await archive.expire(now_ms=T0 + DAY_MS) == 1  # alice's; carol's is held
    left = await archive.records(from_ms=0, to_ms=T0 + 1)
    assert [r.seq for r in left] == [2, 3]
    assert check_chain(left) == []
    [hold] = await archive.holds()
    assert (hold.user, hold.note) == ("carol@acme.example", "case 42")
    assert await archive.hold_remove("carol@acme.example")
    assert not await archive.hold_remove("carol@acme.example")
    assert await archive.expire(now_ms=T0 + DAY_MS) == 1
    assert [r.seq for r in await archive.records(from_ms=0, to_ms=T0 + 1)] == [3]
    # The sequence never reuses a number: a new record follows the newest one.
    await archive.append([item(4)], at_ms=T0 + 2)
    records = await archive.records(from_ms=0, to_ms=T0 + 3)
    assert [r.seq for r in records] == [3, 4]
    assert check_chain(records) == []


async def test_bad_items_are_refused_before_anything_is_written(engine_store: Any) -> None:
    store = engine_store
    bad = ArchiveItem("x", "g", "sideways", "a@b.example", "c@d.example", "k", T0, b"{}")
    with pytest.raises(ValueError, match="direction"):
        await store.archive.append([item(1), bad], at_ms=T0)
    assert (await store.archive.stats()).records == 0


async def test_the_sweeper_deletes_scrubs_and_shows_the_archive(engine_store: Any) -> None:
    store = engine_store
    await store.archive.append([item(1, keep_days=1), item(2, keep_days=30)], at_ms=T0)
    await store.archive.hold_add("carol@acme.example", at_ms=T0)
    scrubbed: list[bool] = []

    async def scrub() -> bool:
        scrubbed.append(await store.scrub())
        return scrubbed[-1]

    deleted_before = sample("gateway_retention_archive_deleted_total")
    assert await sweep_archive(store.archive, now_ms=T0 + DAY_MS, scrub=scrub) == 1
    assert scrubbed == [True]
    assert sample("gateway_retention_archive_deleted_total") == deleted_before + 1
    assert sample("gateway_retention_archive_records") == 1
    assert sample("gateway_retention_holds") == 1
    assert sample("gateway_retention_archive_oldest_age_seconds") == DAY_MS / 1000
    assert await sweep_archive(store.archive, now_ms=T0 + DAY_MS, scrub=scrub) == 0
    assert scrubbed == [True]  # nothing deleted, nothing to scrub


async def test_an_export_streams_every_page_and_verifies(engine_store: Any) -> None:
    count = MAX_RECORDS_PER_READ + 5
    archive = engine_store.archive
    for first in range(0, count, 500):
        batch = [item(n) for n in range(first, min(first + 500, count))]
        await archive.append(batch, at_ms=T0)
    out = io.BytesIO()
    written = await _write_export(
        archive, out, {"org": "acme.example"}, start=0, end=T0 + 1, user=None, seed=SEED
    )
    assert written == count
    export = read_export(out.getvalue())
    assert len(export.records) == count
    assert export.body_sha256 == export.claimed_sha256
    assert export_signature_verifies(org_verify_key(SEED), export.body_sha256, export.signature)
    assert check_chain(list(export.records)) == []


# -- PostgreSQL: several nodes on one database ----------------------------------------------


async def test_two_nodes_appending_at_once_make_one_valid_chain(postgres_url: str) -> None:
    """Two stores (two pools: as two gateway processes) append concurrently to one archive."""
    per_task, tasks = 40, 4
    async with (
        open_postgres_storage(postgres_url, pool_size=4) as node_a,
        open_postgres_storage(postgres_url, pool_size=4) as node_b,
    ):
        archived: list[str] = []

        async def append_from(store: Any, first: int) -> None:
            for n in range(first, first + per_task, 2):
                # Each envelope is offered by both nodes (a retry landing on the other node).
                archived.extend(await store.archive.append([item(n), item(n + 1)], at_ms=T0 + n))
                archived.extend(await store.archive.append([item(n + 1)], at_ms=T0 + n))

        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(append_from, node_a, task * per_task)
                nursery.start_soon(append_from, node_b, task * per_task)
        records = await node_b.archive.records(from_ms=0, to_ms=T0 + DAY_MS)
    total = per_task * tasks
    assert sorted(archived) == sorted(item(n).envelope_id for n in range(total))
    assert [r.seq for r in records] == list(range(1, total + 1))
    assert records[0].prev == ZERO_HASH
    assert check_chain(records) == []
    assert all(b.prev == a.hash for a, b in itertools.pairwise(records))


async def test_two_nodes_sweeping_at_once_delete_each_record_once(postgres_url: str) -> None:
    count = 2_500  # several chunks each
    async with (
        open_postgres_storage(postgres_url, pool_size=2) as node_a,
        open_postgres_storage(postgres_url, pool_size=2) as node_b,
    ):
        for first in range(0, count, 500):
            batch = [item(n, keep_days=1) for n in range(first, first + 500)]
            await node_a.archive.append(batch, at_ms=T0)
        await node_a.archive.append([item(count, keep_days=30)], at_ms=T0)
        deleted: list[int] = []

        async def sweep(store: Any) -> None:
            deleted.append(await store.archive.expire(now_ms=T0 + DAY_MS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep, node_a)
            nursery.start_soon(sweep, node_b)
        assert sum(deleted) == count
        assert await node_b.archive.expire(now_ms=T0 + DAY_MS) == 0
        [left] = await node_b.archive.records(from_ms=0, to_ms=T0 + 1)
        assert left.seq == count + 1
        # The head keeps the last seq: the next record follows it, never reusing one.
        await node_b.archive.append([item(count + 1)], at_ms=T0 + 1)
        records = await node_a.archive.records(from_ms=0, to_ms=T0 + 2)
        assert [r.seq for r in records] == [count + 1, count + 2]
        assert check_chain(records) == []
