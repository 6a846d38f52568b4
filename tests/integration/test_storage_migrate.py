"""The SQLite to PostgreSQL copy: all or nothing, checked, and never merged into data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.core.archive import check_chain
from gateway.errors import StorageError
from gateway.storage import migrate as migrate_module
from gateway.storage.migrate import TABLES, migrate_sqlite_to_postgres
from gateway.storage.postgres import open_postgres_storage
from gateway.storage.sqlite import open_sqlite_storage
from tests.integration.test_retention_archive import DAY_MS, T0
from tests.integration.test_retention_archive import item as archive_item
from tests.integration.test_storage_sqlite import GLOBEX, mail, spool_item
from tests.postgres_for_tests import fresh_database


@pytest.fixture
def target() -> Iterator[str]:
    with fresh_database() as url:
        yield url


async def filled(path: Path) -> Path:
    async with open_sqlite_storage(path) as store:
        await store.spool_put([spool_item(f"s{n}") for n in range(30)], at_ms=1)
        await store.spool_defer(GLOBEX, ["s3"], at_ms=1, delay_ms=30_000, max_delay_ms=60_000)
        await store.mailbox_put_local([mail(f"m{n}") for n in range(7)], at_ms=1)
    return path


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            t.name: int(conn.execute(f"SELECT count(*) FROM {t.name}").fetchone()[0])  # type: ignore[index]
            for t in TABLES
        }


async def test_everything_is_copied_and_the_counters_rebuilt(tmp_path: Path, target: str) -> None:
    source = await filled(tmp_path / "gateway.sqlite3")
    said: list[str] = []
    report = migrate_sqlite_to_postgres(source, target, progress=said.append)
    assert report.rows["spool"] == 30
    assert report.rows["spool_deferred"] == 1
    assert report.rows["mailbox"] == 7
    assert report.rows["statuses"] == 7  # local deliveries; a spooled one is "queued" by its row
    assert counts(target) == report.rows
    assert said[0] == "spool: 30 row(s)"
    with psycopg.connect(target) as conn:
        lanes = conn.execute("SELECT peer, depth FROM spool_lanes WHERE depth > 0").fetchall()
    assert lanes == [(GLOBEX, 30)]


async def test_a_failure_half_way_keeps_nothing(
    tmp_path: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await filled(tmp_path / "gateway.sqlite3")
    real = migrate_module._count
    asked: list[str] = []

    def miscounted(conn: object, table: str) -> int:
        count = real(conn, table)  # type: ignore[arg-type]
        if isinstance(conn, psycopg.Connection):
            asked.append(table)
            if table == "statuses" and asked.count(table) == 2:  # after its copy
                return count + 1
        return count

    monkeypatch.setattr(migrate_module, "_count", miscounted)
    with pytest.raises(
        StorageError, match="statuses: 7 rows in the source, 7 copied, 8 in the target"
    ):
        migrate_sqlite_to_postgres(source, target)
    assert set(counts(target).values()) == {0}  # the spool and mailbox copies went too


async def test_a_database_of_an_older_schema_is_refused(tmp_path: Path, target: str) -> None:
    import contextlib
    import sqlite3

    source = await filled(tmp_path / "gateway.sqlite3")
    with contextlib.closing(sqlite3.connect(source)) as conn:
        conn.execute("DELETE FROM schema_version WHERE version > 1")
        conn.commit()
    with pytest.raises(StorageError, match="schema version 1, this gateway's is"):
        migrate_sqlite_to_postgres(source, target)


def test_a_missing_source_is_refused(tmp_path: Path, target: str) -> None:
    with pytest.raises(StorageError, match="no such SQLite database"):
        migrate_sqlite_to_postgres(tmp_path / "nothing.sqlite3", target)


async def test_the_retention_archive_and_holds_are_copied_and_the_chain_goes_on(
    tmp_path: Path, target: str
) -> None:
    source = await filled(tmp_path / "gateway.sqlite3")
    async with open_sqlite_storage(source) as store:
        await store.archive.append([archive_item(n, keep_days=1) for n in range(5)], at_ms=T0)
        await store.archive.append([archive_item(5), archive_item(6)], at_ms=T0 + 1)
        await store.archive.hold_add("carol@acme.example", at_ms=T0, note="case 42")
        # Records past their keep are deleted: SQLite's seq goes on past the newest left.
        await store.archive.append([archive_item(7, keep_days=1)], at_ms=T0 + 2)
        assert await store.archive.expire(now_ms=T0 + DAY_MS + 10) == 6
        before = await store.archive.records(from_ms=0, to_ms=T0 + 3)
    assert [r.seq for r in before] == [6, 7]

    report = migrate_sqlite_to_postgres(source, target)
    assert report.rows["retention_archive"] == 2
    assert report.rows["retention_holds"] == 1
    assert counts(target) == report.rows
    async with open_postgres_storage(target) as pg:
        after = await pg.archive.records(from_ms=0, to_ms=T0 + 3)
        assert after == before
        [hold] = await pg.archive.holds()
        assert (hold.user, hold.note) == ("carol@acme.example", "case 42")
        # The next record follows the last seq SQLite handed out (8), chained to the newest.
        await pg.archive.append([archive_item(9)], at_ms=T0 + 3)
        records = await pg.archive.records(from_ms=0, to_ms=T0 + 4)
    assert [r.seq for r in records] == [6, 7, 9]
    assert records[-1].prev == before[-1].hash
    assert check_chain(records) == []


async def test_large_envelopes_in_segment_files_are_copied_inline(
    tmp_path: Path, target: str
) -> None:
    big_spooled, big_mailed = os.urandom(70_000), os.urandom(40_000)
    source = tmp_path / "gateway.sqlite3"
    async with open_sqlite_storage(source) as store:
        await store.spool_put([spool_item("small"), spool_item("big", data=big_spooled)], at_ms=1)
        await store.mailbox_put_local([mail("m-big", data=big_mailed)], at_ms=1)
    assert any(Path(str(source) + ".segments").iterdir())  # the bytes are in a segment

    report = migrate_sqlite_to_postgres(source, target)
    assert (report.rows["spool"], report.rows["mailbox"]) == (2, 1)
    async with open_postgres_storage(target) as pg:
        taken = await pg.spool_take(GLOBEX, max_items=5, max_bytes=2**30)
        assert [(e.envelope_id, e.data) for e in taken] == [
            ("small", b"data of small"),
            ("big", big_spooled),
        ]
        [fetched] = await pg.mailbox_fetch("bob@acme.example", limit=5)
        assert fetched.data == big_mailed


async def test_a_row_whose_segment_is_missing_stops_the_copy(tmp_path: Path, target: str) -> None:
    source = tmp_path / "gateway.sqlite3"
    async with open_sqlite_storage(source) as store:
        await store.mailbox_put_local([mail("m-big", data=os.urandom(40_000))], at_ms=1)
    for segment in Path(str(source) + ".segments").iterdir():
        segment.unlink()
    with pytest.raises(StorageError, match="missing from segment"):
        migrate_sqlite_to_postgres(source, target)
    assert set(counts(target).values()) == {0}
