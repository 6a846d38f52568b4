"""Delivery status ``queued`` is read from the spool itself (no status row per envelope).

The promises are those of :mod:`gateway.storage.base`: an envelope spooled is
``queued`` from the commit that spooled it, with the spool time; the status
that replaces it is written in the commit that removes it from the spool; an
id already spooled or with a status is never spooled again. A database
written before (a ``queued`` row beside the spool entry) reads the same.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage import (
    STATUS_DELIVERED,
    STATUS_EXPIRED,
    STATUS_FORWARDED,
    STATUS_PURGED,
    STATUS_QUEUED,
    EnvelopeRecord,
    SpoolItem,
)
from gateway.storage.sqlite import SqliteStorage, open_sqlite_storage

GLOBEX = "globex.example"
ALICE = "alice@acme.example"
FAR = 10**12


def spool_item(envelope_id: str, *, expires_ms: int = FAR, sender: str = ALICE) -> SpoolItem:
    return SpoolItem(
        envelope_id=envelope_id,
        peer=GLOBEX,
        sender=sender,
        recipient=f"bob@{GLOBEX}",
        created_ms=1,
        expires_ms=expires_ms,
        burn_on_read=False,
        data=f"data of {envelope_id}".encode(),
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[SqliteStorage]:
    async with open_sqlite_storage(db_path) as opened:
        yield opened


@pytest.fixture
def store(engine_store: SqliteStorage) -> SqliteStorage:
    """Each engine in turn (tests/conftest.py)."""
    return engine_store


def status_rows(db_path: Path) -> dict[str, str]:
    with sqlite3.connect(db_path) as conn:
        return dict(conn.execute("SELECT envelope_id, status FROM statuses").fetchall())


async def test_spooled_is_queued_at_its_spool_time_without_a_status_row(
    sqlite_store: SqliteStorage, db_path: Path
) -> None:
    assert await sqlite_store.spool_put([spool_item("e1")], at_ms=10) == ["e1"]
    status = await sqlite_store.status_get("e1")
    assert status is not None
    assert (status.envelope_id, status.sender, status.status, status.at_ms) == (
        "e1",
        ALICE,
        STATUS_QUEUED,
        10,
    )
    assert status_rows(db_path) == {}
    assert await sqlite_store.status_get("never") is None


async def test_each_way_out_of_the_spool_writes_its_status(store: SqliteStorage) -> None:
    await store.spool_put(
        [spool_item("answered"), spool_item("purged"), spool_item("expired", expires_ms=50)],
        at_ms=10,
    )
    assert await store.spool_complete(GLOBEX, {"answered": STATUS_FORWARDED}, at_ms=20) == 1
    assert [e.envelope_id for e in await store.spool_expire(60)] == ["expired"]
    assert await store.spool_purge(peer=GLOBEX, at_ms=70) == 1
    found = {i: await store.status_get(i) for i in ("answered", "expired", "purged")}
    assert {i: (s.status, s.at_ms) for i, s in found.items() if s is not None} == {
        "answered": (STATUS_FORWARDED, 20),
        "expired": (STATUS_EXPIRED, 60),
        "purged": (STATUS_PURGED, 70),
    }


async def test_an_id_spooled_or_with_a_status_is_not_spooled_again(store: SqliteStorage) -> None:
    assert await store.spool_put([spool_item("e1"), spool_item("e1")], at_ms=1) == ["e1"]
    assert await store.spool_put([spool_item("e1")], at_ms=2) == []  # still spooled
    await store.spool_complete(GLOBEX, {"e1": STATUS_FORWARDED}, at_ms=3)
    assert await store.spool_put([spool_item("e1")], at_ms=4) == []  # answered
    local = EnvelopeRecord(
        envelope_id="local",
        sender=ALICE,
        recipient="carol@acme.example",
        created_ms=1,
        expires_ms=FAR,
        burn_on_read=False,
        data=b"x",
    )
    await store.mailbox_put_local([local], at_ms=5)
    assert await store.spool_put([spool_item("local")], at_ms=6) == []  # delivered locally
    assert (await store.status_get("local")).status == STATUS_DELIVERED  # type: ignore[union-attr]
    assert [e.envelope_id for e in await store.spool_take(GLOBEX, max_items=9, max_bytes=99)] == []


async def test_a_queued_status_stays_readable_through_prunes(store: SqliteStorage) -> None:
    await store.spool_put([spool_item("waiting")], at_ms=10)
    await store.prune(seen_before_ms=FAR, statuses_before_ms=FAR, txns_before_ms=FAR)
    status = await store.status_get("waiting")
    assert status is not None
    assert (status.status, status.at_ms) == (STATUS_QUEUED, 10)


async def test_a_database_with_queued_rows_reads_the_same(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:
        await store.spool_put([spool_item("old")], at_ms=10)
    # What spool_put wrote before: a `queued` row beside the spool entry.
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO statuses (envelope_id, sender, status, at_ms) VALUES (?, ?, ?, ?)",
            ("old", ALICE, STATUS_QUEUED, 10),
        )
    async with open_sqlite_storage(db_path) as store:
        assert await store.spool_put([spool_item("old")], at_ms=11) == []
        assert (await store.status_get("old")).status == STATUS_QUEUED  # type: ignore[union-attr]
        assert await store.spool_complete(GLOBEX, {"old": STATUS_FORWARDED}, at_ms=12) == 1
        status = await store.status_get("old")
        assert status is not None
        assert (status.status, status.at_ms) == (STATUS_FORWARDED, 12)
    assert status_rows(db_path) == {"old": STATUS_FORWARDED}
