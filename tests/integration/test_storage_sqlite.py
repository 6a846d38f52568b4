"""The SQLite storage engine on real files: spool, mailboxes, dedup, durability, group commit."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from gateway.errors import StorageError, StorageFullError
from gateway.storage import (
    STATUS_DELIVERED,
    STATUS_EXPIRED,
    STATUS_FORWARDED,
    STATUS_PURGED,
    STATUS_QUEUED,
    EnvelopeRecord,
    PeerState,
    SpoolItem,
    rejected_status,
)
from gateway.storage.base import MAX_LAST_ERROR_LENGTH, SessionRecord
from gateway.storage.sqlite import (
    LATEST_VERSION,
    MIGRATIONS,
    Migration,
    SqliteStorage,
    migrate,
    open_sqlite_storage,
)
from gateway.storage.sqlite import engine as engine_module
from gateway.storage.sqlite.engine import _storage_error
from gateway.storage.sqlite.store import SMALL_READ_ROWS

GLOBEX = "globex.example"
INITECH = "initech.example"
ALICE = "alice@acme.example"
BOB = "bob@acme.example"
CAROL = "carol@acme.example"
HASH = b"\x01" * 32
FAR = 10**12  # an expiry nothing in these tests reaches


def spool_item(
    envelope_id: str,
    *,
    peer: str = GLOBEX,
    data: bytes | None = None,
    created_ms: int = 1_000,
    expires_ms: int = FAR,
) -> SpoolItem:
    return SpoolItem(
        envelope_id=envelope_id,
        peer=peer,
        sender=ALICE,
        recipient=f"bob@{peer}",
        created_ms=created_ms,
        expires_ms=expires_ms,
        burn_on_read=False,
        data=data if data is not None else f"data of {envelope_id}".encode(),
    )


def mail(
    envelope_id: str,
    *,
    recipient: str = BOB,
    sender: str = "dave@globex.example",
    data: bytes | None = None,
    expires_ms: int = FAR,
    burn_on_read: bool = False,
) -> EnvelopeRecord:
    return EnvelopeRecord(
        envelope_id=envelope_id,
        sender=sender,
        recipient=recipient,
        created_ms=1_000,
        expires_ms=expires_ms,
        burn_on_read=burn_on_read,
        data=data if data is not None else f"data of {envelope_id}".encode(),
    )


def accepted(*entries: EnvelopeRecord) -> dict[str, str]:
    return {e.envelope_id: "accepted" for e in entries}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[SqliteStorage]:
    async with open_sqlite_storage(db_path) as opened:
        yield opened


@pytest.fixture
def store(engine_store: SqliteStorage) -> SqliteStorage:
    """The contract tests run on each engine (tests/conftest.py); the others on SQLite."""
    return engine_store


async def put_one(store: SqliteStorage, envelope_id: str) -> None:
    await store.spool_put([spool_item(envelope_id)], at_ms=1)


class WriterGate:
    """Holds the writer thread inside one op, so the next ops pile up into one batch."""

    def __init__(self, store: SqliteStorage) -> None:
        self.store = store
        self.entered = threading.Event()
        self.release = threading.Event()

    def _op(self, conn: sqlite3.Connection) -> None:
        self.entered.set()
        assert self.release.wait(timeout=30), "test never released the writer"

    async def hold(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.store.engine.write, self._op)
        await trio.to_thread.run_sync(self.entered.wait, 30)


# -- spool ---------------------------------------------------------------------------
async def test_spool_take_is_ordered_bounded_and_does_not_remove(store: SqliteStorage) -> None:
    items = [spool_item(f"e{i}", data=bytes(100)) for i in range(10)]
    assert await store.spool_put(items, at_ms=5_000) == [f"e{i}" for i in range(10)]

    first = await store.spool_take(GLOBEX, max_items=3, max_bytes=10_000)
    assert [e.envelope_id for e in first] == ["e0", "e1", "e2"]
    assert [e.seq for e in first] == sorted(e.seq for e in first)
    assert first[0].data == bytes(100)
    assert first[0].spooled_ms == 5_000
    assert first[0].size == 100

    by_bytes = await store.spool_take(GLOBEX, max_items=10, max_bytes=250)
    assert [e.envelope_id for e in by_bytes] == ["e0", "e1"]  # a third would make 300 bytes

    # Not removed: the same head comes back until the peer answers.
    again = await store.spool_take(GLOBEX, max_items=3, max_bytes=10_000)
    assert again == first


async def test_spool_take_returns_an_oversized_head_alone(store: SqliteStorage) -> None:
    await store.spool_put([spool_item("big", data=bytes(5_000)), spool_item("small")], at_ms=1)
    taken = await store.spool_take(GLOBEX, max_items=10, max_bytes=1_000)
    assert [e.envelope_id for e in taken] == ["big"]


async def test_lanes_are_independent(store: SqliteStorage) -> None:
    await store.spool_put(
        [
            spool_item("g1", created_ms=10),
            spool_item("i1", peer=INITECH, created_ms=20),
            spool_item("g2", created_ms=30),
            spool_item("i2", peer=INITECH, created_ms=40),
        ],
        at_ms=100,
    )
    assert [
        e.envelope_id for e in await store.spool_take(GLOBEX, max_items=9, max_bytes=9_999)
    ] == [
        "g1",
        "g2",
    ]
    assert await store.spool_peers() == [GLOBEX, INITECH]
    stats = await store.spool_stats()
    assert stats[GLOBEX].depth == 2
    assert stats[INITECH].depth == 2
    assert stats[GLOBEX].bytes == len(b"data of g1") + len(b"data of g2")
    assert stats[GLOBEX].oldest_created_ms == 10
    assert stats[INITECH].oldest_created_ms == 20

    assert await store.spool_complete(GLOBEX, {"g1": STATUS_FORWARDED}, at_ms=200) == 1
    # An answer naming another lane's envelope touches nothing.
    assert await store.spool_complete(GLOBEX, {"i1": STATUS_FORWARDED}, at_ms=200) == 0
    stats = await store.spool_stats()
    assert stats[GLOBEX].depth == 1
    assert stats[GLOBEX].oldest_created_ms == 30
    assert stats[INITECH].depth == 2
    taken = await store.spool_take(INITECH, max_items=9, max_bytes=9_999)
    assert [e.envelope_id for e in taken] == ["i1", "i2"]

    await store.spool_complete(GLOBEX, {"g2": STATUS_FORWARDED}, at_ms=300)
    assert await store.spool_peers() == [INITECH]
    assert GLOBEX not in await store.spool_stats()


async def test_an_envelope_id_is_not_spooled_twice(store: SqliteStorage) -> None:
    assert await store.spool_put([spool_item("e1"), spool_item("e1")], at_ms=1) == ["e1"]
    assert await store.spool_put([spool_item("e1"), spool_item("e2")], at_ms=2) == ["e2"]
    await store.spool_complete(GLOBEX, {"e1": STATUS_FORWARDED}, at_ms=3)
    # Answered already: a client's retry must not send it again.
    assert await store.spool_put([spool_item("e1")], at_ms=4) == []
    taken = await store.spool_take(GLOBEX, max_items=9, max_bytes=9_999)
    assert [e.envelope_id for e in taken] == ["e2"]
    status = await store.status_get("e1")
    assert status is not None
    assert status.status == STATUS_FORWARDED
    assert status.at_ms == 3


async def test_spool_complete_records_each_status(store: SqliteStorage) -> None:
    await store.spool_put([spool_item("ok"), spool_item("no")], at_ms=1)
    assert (await store.status_get("ok")) is not None
    assert (await store.status_get("ok")).status == STATUS_QUEUED  # type: ignore[union-attr]
    removed = await store.spool_complete(
        GLOBEX,
        {"ok": STATUS_FORWARDED, "no": rejected_status("recipient_unknown")},
        at_ms=7,
    )
    assert removed == 2
    no = await store.status_get("no")
    assert no is not None
    assert (no.sender, no.status, no.at_ms) == (ALICE, "rejected:recipient_unknown", 7)
    assert await store.spool_take(GLOBEX, max_items=9, max_bytes=9_999) == []
    with pytest.raises(ValueError, match="status"):
        await store.spool_complete(GLOBEX, {"x": "maybe"}, at_ms=8)


async def test_spool_expire_removes_and_records_expired(store: SqliteStorage) -> None:
    await store.spool_put(
        [
            spool_item("old1", expires_ms=100),
            spool_item("old2", peer=INITECH, expires_ms=200),
            spool_item("old3", expires_ms=300),
            spool_item("fresh", expires_ms=10_000),
        ],
        at_ms=1,
    )
    first = await store.spool_expire(300, limit=2)
    assert [(e.envelope_id, e.peer) for e in first] == [("old1", GLOBEX), ("old2", INITECH)]
    rest = await store.spool_expire(300)
    assert [e.envelope_id for e in rest] == ["old3"]
    assert await store.spool_expire(300) == []
    for envelope_id in ("old1", "old2", "old3"):
        status = await store.status_get(envelope_id)
        assert status is not None
        assert status.status == STATUS_EXPIRED
        assert status.at_ms == 300
    taken = await store.spool_take(GLOBEX, max_items=9, max_bytes=9_999)
    assert [e.envelope_id for e in taken] == ["fresh"]


async def test_spool_admin_list_retry_and_purge(store: SqliteStorage) -> None:
    await store.spool_put(
        [
            spool_item("g1", created_ms=10),
            spool_item("g2", created_ms=20),
            spool_item("i1", peer=INITECH, created_ms=30),
        ],
        at_ms=50,
    )
    listed = await store.spool_list()
    assert [s.envelope_id for s in listed] == ["g1", "g2", "i1"]
    assert listed[0].size == len(b"data of g1")
    assert listed[0].spooled_ms == 50
    assert [s.envelope_id for s in await store.spool_list(peer=INITECH)] == ["i1"]
    after = await store.spool_list(after_seq=listed[0].seq, limit=1)
    assert [s.envelope_id for s in after] == ["g2"]

    await store.peer_state_put(PeerState(peer=GLOBEX, failures=5, backoff_until_ms=99_999))
    await store.peer_state_put(PeerState(peer=INITECH, failures=2, backoff_until_ms=88_888))
    assert await store.spool_retry(GLOBEX) == 1
    globex = await store.peer_state_get(GLOBEX)
    assert globex is not None
    assert (globex.failures, globex.backoff_until_ms) == (0, 0)
    initech = await store.peer_state_get(INITECH)
    assert initech is not None
    assert initech.failures == 2
    assert await store.spool_retry() == 2

    assert await store.spool_purge(created_before_ms=15, at_ms=60) == 1  # g1
    assert await store.spool_purge(peer=INITECH, at_ms=61) == 1
    assert [s.envelope_id for s in await store.spool_list()] == ["g2"]
    purged = await store.status_get("i1")
    assert purged is not None
    assert purged.status == STATUS_PURGED
    assert purged.at_ms == 61
    assert await store.spool_purge(at_ms=62) == 1
    assert await store.spool_list() == []


async def test_spool_purge_goes_in_chunks(store: SqliteStorage) -> None:
    from gateway.storage.sqlite import store as store_module

    count = store_module.DELETE_CHUNK + 5
    await store.spool_put([spool_item(f"e{i}") for i in range(count)], at_ms=1)
    before = store.commits
    assert await store.spool_purge(peer=GLOBEX, at_ms=2) == count
    assert store.commits - before == 2
    assert await store.spool_stats() == {}


# -- mailboxes and transactions ------------------------------------------------------
async def test_deliver_stores_and_records_the_transaction(store: SqliteStorage) -> None:
    one, two, three = mail("m1"), mail("m2", recipient=CAROL), mail("m3")
    results = {**accepted(one, two, three), "bad": "recipient_unknown"}
    outcome = await store.deliver(GLOBEX, "txn-1", HASH, results, [one, two, three], at_ms=500)
    assert outcome.stored == ("m1", "m2", "m3")
    assert outcome.recipients == {BOB, CAROL}
    assert outcome.replayed is None

    record = await store.txn_lookup(GLOBEX, "txn-1")
    assert record is not None
    assert record.body_hash == HASH
    assert record.at_ms == 500
    assert list(record.results.items()) == list(results.items())  # same answer, same order
    assert await store.txn_lookup(INITECH, "txn-1") is None

    bob = await store.mailbox_fetch(BOB, limit=10)
    assert [e.envelope_id for e in bob] == ["m1", "m3"]
    assert bob[0].data == b"data of m1"
    assert bob[0].stored_ms == 500
    assert (await store.mailbox_depth(BOB)).envelopes == 2
    assert (await store.mailbox_depth(CAROL)).bytes == len(b"data of m2")

    # The same transaction again: nothing stored, the recorded answer returned.
    again = await store.deliver(GLOBEX, "txn-1", b"\x02" * 32, {}, [], at_ms=600)
    assert again.stored == ()
    assert again.recipients == frozenset()
    assert again.replayed == record
    assert (await store.mailbox_depth(BOB)).envelopes == 2


async def test_deliver_refuses_to_store_an_entry_not_answered_accepted(
    store: SqliteStorage,
) -> None:
    entry = mail("m1")
    with pytest.raises(ValueError, match="m1"):
        await store.deliver(GLOBEX, "t", HASH, {"m1": "too_large"}, [entry], at_ms=1)
    assert await store.txn_lookup(GLOBEX, "t") is None


async def test_envelope_ids_are_deduplicated_across_close_and_reopen(open_store: Any) -> None:
    async with open_store() as store:
        first = mail("m1", data=b"first copy")
        await store.deliver(GLOBEX, "txn-1", HASH, accepted(first), [first], at_ms=1)
        fetched = await store.mailbox_fetch(BOB, limit=10)
        assert await store.mailbox_ack(BOB, [e.envelope_id for e in fetched]) == 1

    async with open_store() as store:
        # The sender retries in a new transaction after a crash: answered, not stored.
        retry = mail("m1", data=b"second copy")
        outcome = await store.deliver(GLOBEX, "txn-2", HASH, accepted(retry), [retry], at_ms=2)
        assert outcome.stored == ()
        assert outcome.recipients == frozenset()
        assert await store.mailbox_fetch(BOB, limit=10) == []
        assert await store.txn_lookup(GLOBEX, "txn-1") is not None
        # Nor does the local path store it.
        local = await store.mailbox_put_local([retry], at_ms=3)
        assert local.stored == ()


async def test_mailbox_fetch_cursor_ack_and_expiry(store: SqliteStorage) -> None:
    entries = [mail(f"m{i}", expires_ms=1_000 * (i + 1)) for i in range(5)]
    await store.deliver(GLOBEX, "t1", HASH, accepted(*entries), entries, at_ms=1)
    page1 = await store.mailbox_fetch(BOB, limit=2)
    assert [e.envelope_id for e in page1] == ["m0", "m1"]
    page2 = await store.mailbox_fetch(BOB, limit=2, after=page1[-1].seq)
    assert [e.envelope_id for e in page2] == ["m2", "m3"]
    # Already expired but not yet swept: never handed out.
    live = await store.mailbox_fetch(BOB, limit=10, now_ms=2_000)
    assert [e.envelope_id for e in live] == ["m2", "m3", "m4"]

    # Ack only deletes the user's own envelopes.
    assert await store.mailbox_ack(CAROL, ["m4"]) == 0
    assert await store.mailbox_ack(BOB, ["m4", "nope"]) == 1

    expired = await store.mailbox_expire(2_000)
    assert [(e.envelope_id, e.recipient, e.peer) for e in expired] == [
        ("m0", BOB, None),
        ("m1", BOB, None),
    ]
    assert [e.envelope_id for e in await store.mailbox_fetch(BOB, limit=10)] == ["m2", "m3"]
    depth = await store.mailbox_depth(BOB)
    assert depth.envelopes == 2
    assert depth.bytes == 2 * len(b"data of m2")

    # A newer arrival after the newest was deleted still shows up past the cursor.
    last = (await store.mailbox_fetch(BOB, limit=10))[-1]
    await store.mailbox_ack(BOB, ["m2", "m3"])
    late = mail("late")
    await store.deliver(GLOBEX, "t2", HASH, accepted(late), [late], at_ms=3)
    assert [e.envelope_id for e in await store.mailbox_fetch(BOB, limit=5, after=last.seq)] == [
        "late"
    ]


async def test_mailbox_put_local_delivers_once_and_records_status(store: SqliteStorage) -> None:
    entry = mail("local-1", sender=ALICE, burn_on_read=True)
    outcome = await store.mailbox_put_local([entry, entry], at_ms=10)
    assert outcome.stored == ("local-1",)
    assert outcome.recipients == {BOB}
    status = await store.status_get("local-1")
    assert status is not None
    assert (status.sender, status.status) == (ALICE, STATUS_DELIVERED)
    [fetched] = await store.mailbox_fetch(BOB, limit=5)
    assert fetched.burn_on_read is True
    assert (await store.mailbox_put_local([entry], at_ms=11)).stored == ()


# -- secure delete -------------------------------------------------------------------
def _file_bytes(db_path: Path) -> bytes:
    """The database, its WAL and every segment file beside it."""
    content = b""
    for suffix in ("", "-wal"):
        part = Path(str(db_path) + suffix)
        if part.exists():
            content += part.read_bytes()
    segments = Path(str(db_path) + ".segments")
    if segments.is_dir():
        for part in sorted(segments.iterdir()):
            content += part.read_bytes()
    return content


async def test_deleted_envelopes_are_gone_from_the_file_bytes(db_path: Path) -> None:
    def canary(name: str, size: int) -> bytes:
        marker = f"CANARY-{name}-".encode()
        return (marker * (size // len(marker) + 1))[:size]

    kept, kept_big = canary("kept", 200), canary("kept-big", 30_000)
    acked_small, acked_big = canary("acked-small", 300), canary("acked-big", 20_000)
    expired_mail, spooled_done, spooled_expired = (
        canary("mail-expired", 500),
        canary("spool-done", 700),
        canary("spool-expired", 9_000),
    )
    async with open_sqlite_storage(db_path) as store:
        filler = [mail(f"f{i}", data=os.urandom(300)) for i in range(50)]
        entries = [
            mail("kept", data=kept),
            mail("kept-big", data=kept_big),
            mail("acked-small", data=acked_small, burn_on_read=True),
            mail("acked-big", data=acked_big),
            mail("expired", data=expired_mail, expires_ms=100),
            *filler,
        ]
        await store.deliver(GLOBEX, "t", HASH, accepted(*entries), entries, at_ms=1)
        await store.spool_put(
            [
                spool_item("s-done", data=spooled_done),
                spool_item("s-expired", data=spooled_expired, expires_ms=100),
            ],
            at_ms=1,
        )
        # Some of it reaches the main file before the deletes, as in real life.
        assert await store.scrub()
        everything = _file_bytes(db_path)
        for present in (
            kept,
            kept_big,
            acked_small,
            acked_big,
            expired_mail,
            spooled_done,
            spooled_expired,
        ):
            assert present[:64] in everything

        assert await store.mailbox_ack(BOB, ["acked-small", "acked-big"]) == 2
        assert len(await store.mailbox_expire(100)) == 1
        assert await store.spool_complete(GLOBEX, {"s-done": STATUS_FORWARDED}, at_ms=2) == 1
        assert len(await store.spool_expire(100)) == 1
        assert await store.scrub()

        assert Path(str(db_path) + "-wal").stat().st_size == 0
        after = _file_bytes(db_path)
        assert kept[:64] in after  # the search does find what is still stored
        assert kept_big[:64] in after  # in a segment file
        for gone in (acked_small, acked_big, expired_mail, spooled_done, spooled_expired):
            name = gone[:24]
            assert name not in after, f"{name!r} is still in the database files"
    assert kept[:64] in db_path.read_bytes()


# -- group commit and the writer -----------------------------------------------------
async def test_concurrent_writes_share_commits(sqlite_store: SqliteStorage) -> None:
    before = sqlite_store.commits

    async def put(i: int) -> None:
        await sqlite_store.spool_put([spool_item(f"e{i}")], at_ms=1)

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(put, i)
    assert len(await sqlite_store.spool_list(limit=1_000)) == 200
    assert sqlite_store.commits - before < 50


async def test_waiting_writes_commit_together(sqlite_store: SqliteStorage) -> None:
    before = sqlite_store.commits
    gate = WriterGate(sqlite_store)
    async with trio.open_nursery() as nursery:
        await gate.hold(nursery)
        for i in range(100):
            nursery.start_soon(put_one, sqlite_store, f"e{i}")
        await trio.testing.wait_all_tasks_blocked()
        gate.release.set()
    # One commit for the gate's op, one for all hundred puts that waited behind it.
    assert sqlite_store.commits - before == 2
    assert len(await sqlite_store.spool_list()) == 100


async def test_a_failing_op_fails_alone_and_its_batch_commits(sqlite_store: SqliteStorage) -> None:
    await sqlite_store.token_put(ALICE, b"taken", at_ms=1)
    before = sqlite_store.commits
    gate = WriterGate(sqlite_store)
    failures: dict[str, BaseException] = {}

    async def expect_failure(name: str, fn: Any, *args: object) -> None:
        try:
            await (fn(*args, at_ms=2) if fn == sqlite_store.token_put else fn(*args))
        except (StorageError, ValueError) as exc:
            failures[name] = exc

    def write_then_raise(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO tokens (token_hash, user, created_ms) VALUES (x'99', 'x', 1)")
        raise ValueError("changed my mind")

    async with trio.open_nursery() as nursery:
        await gate.hold(nursery)
        for i in range(5):
            nursery.start_soon(put_one, sqlite_store, f"a{i}")
        nursery.start_soon(expect_failure, "duplicate", sqlite_store.token_put, BOB, b"taken")
        nursery.start_soon(expect_failure, "raised", sqlite_store.engine.write, write_then_raise)
        for i in range(5):
            nursery.start_soon(put_one, sqlite_store, f"b{i}")
        await trio.testing.wait_all_tasks_blocked()
        gate.release.set()

    assert sqlite_store.commits - before == 2  # the failures shared the batch, and it committed
    assert isinstance(failures["duplicate"], StorageError)
    assert isinstance(failures["duplicate"].__cause__, sqlite3.IntegrityError)
    assert isinstance(failures["raised"], ValueError)
    assert len(await sqlite_store.spool_list()) == 10
    assert await sqlite_store.token_lookup(b"taken") == ALICE
    assert await sqlite_store.token_lookup(b"\x99") is None  # rolled back with its op


async def test_a_failing_op_alone_is_rolled_back_and_the_writer_goes_on(
    sqlite_store: SqliteStorage,
) -> None:
    def write_then_raise(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO tokens (token_hash, user, created_ms) VALUES (x'99', 'x', 1)")
        raise ValueError("changed my mind")

    with pytest.raises(ValueError, match="changed my mind"):
        await sqlite_store.engine.write(write_then_raise)
    assert await sqlite_store.token_lookup(b"\x99") is None
    assert await sqlite_store.spool_put([spool_item("e1")], at_ms=1) == ["e1"]
    assert [s.envelope_id for s in await sqlite_store.spool_list()] == ["e1"]


async def test_batch_operations_keep_per_envelope_answers(store: SqliteStorage) -> None:
    # One statement per batch must still answer per envelope: repeats within
    # a call, ids known from before, ids of another lane.
    await store.spool_put([spool_item("x1", peer=INITECH)], at_ms=1)
    await store.status_set("old", ALICE, STATUS_DELIVERED, at_ms=1)
    items = [spool_item(i) for i in ("a", "b", "a", "old", "x1", "c")]
    assert await store.spool_put(items, at_ms=2) == ["a", "b", "c"]
    lane = await store.spool_take(GLOBEX, max_items=9, max_bytes=9_999)
    assert [(e.envelope_id, e.peer) for e in lane] == [("a", GLOBEX), ("b", GLOBEX), ("c", GLOBEX)]
    removed = await store.spool_complete(
        GLOBEX, {"a": STATUS_FORWARDED, "x1": STATUS_FORWARDED, "gone": STATUS_FORWARDED}, at_ms=3
    )
    assert removed == 1  # x1 waits in another lane, "gone" in none
    assert (await store.status_get("x1")).status == STATUS_QUEUED  # type: ignore[union-attr]
    assert await store.status_get("gone") is None

    first, again = mail("m1", data=b"first"), mail("m1", data=b"again")
    other = mail("m2", recipient=CAROL)
    out = await store.deliver(
        GLOBEX, "t1", HASH, accepted(first, other), [first, again, other], at_ms=4
    )
    assert out.stored == ("m1", "m2")
    assert out.recipients == {BOB, CAROL}
    assert [e.data for e in await store.mailbox_fetch(BOB, limit=9)] == [b"first"]
    # A mailbox row whose dedup row was pruned early is still not doubled.
    await store.prune(seen_before_ms=FAR + 1, statuses_before_ms=0, txns_before_ms=0)
    out = await store.deliver(GLOBEX, "t2", HASH, accepted(first), [first], at_ms=5)
    assert out.stored == ()
    assert await store.mailbox_ack(BOB, ["m1", "m1", "m2", "nope"]) == 1  # m2 is Carol's
    assert (await store.mailbox_depth(CAROL)).envelopes == 1


async def test_check_writable_commits_a_real_write_and_changes_nothing(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:
        assert await store.scrub()  # the WAL is empty now
        wal = db_path.with_name(db_path.name + "-wal")
        before = store.commits
        await store.check_writable()
        assert store.commits - before == 1
        assert wal.stat().st_size > 0  # a page went to the WAL (and was synced)
    with sqlite3.connect(db_path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
    assert versions == [m.version for m in MIGRATIONS]


async def test_check_writable_fails_when_the_database_takes_no_writes(
    sqlite_store: SqliteStorage, db_path: Path
) -> None:
    def short_wait(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 20")

    await sqlite_store.engine.write_alone(short_wait)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StorageError, match="locked"):
            await sqlite_store.check_writable()
        other.execute("ROLLBACK")
    finally:
        other.close()
    await sqlite_store.check_writable()  # and recovers with the database


async def test_check_writable_on_a_closed_store(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:
        await store.check_writable()
    with pytest.raises(StorageError, match="closed"):
        await store.check_writable()


async def test_check_writable_can_be_abandoned_while_the_writer_is_stuck(
    sqlite_store: SqliteStorage,
) -> None:
    gate = WriterGate(sqlite_store)
    scope = trio.CancelScope()
    gave_up: list[bool] = []

    async def probe() -> None:
        with scope:
            await sqlite_store.check_writable()
        gave_up.append(scope.cancelled_caught)

    async with trio.open_nursery() as nursery:
        await gate.hold(nursery)
        nursery.start_soon(probe)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert gave_up == [True]  # returned while the writer is still held
        gate.release.set()
    await sqlite_store.check_writable()


async def test_a_closed_store_refuses_work(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:
        pass
    with pytest.raises(StorageError, match="closed"):
        await store.spool_put([spool_item("e1")], at_ms=1)
    with pytest.raises(StorageError, match="closed"):
        await store.spool_peers()


async def test_a_cancelled_writer_still_gets_its_write(sqlite_store: SqliteStorage) -> None:
    gate = WriterGate(sqlite_store)
    scope = trio.CancelScope()
    returned: list[bool] = []

    async def put_then_note() -> None:
        with scope:
            await put_one(sqlite_store, "e1")
            returned.append(True)

    async with trio.open_nursery() as nursery:
        await gate.hold(nursery)
        nursery.start_soon(put_then_note)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # the write is queued: the caller waits for it, shielded
        await trio.testing.wait_all_tasks_blocked()
        gate.release.set()
    assert returned == [True]
    assert [s.envelope_id for s in await sqlite_store.spool_list()] == ["e1"]


# -- opening, schema, files -----------------------------------------------------------
async def test_database_file_is_private(db_path: Path) -> None:
    async with open_sqlite_storage(db_path):
        for suffix in ("", "-wal"):
            mode = stat.S_IMODE(Path(str(db_path) + suffix).stat().st_mode)
            assert mode == 0o600, f"{suffix or 'db'} has mode {mode:o}"


async def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        async with open_sqlite_storage(tmp_path / "nope" / "gateway.db"):
            pass


async def test_a_database_from_a_newer_gateway_is_refused(db_path: Path) -> None:
    async with open_sqlite_storage(db_path):
        pass
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(
            "INSERT INTO schema_version (version, description, applied_ms) VALUES (?, 'x', 0)",
            (LATEST_VERSION + 1,),
        )
    conn.close()
    with pytest.raises(StorageError, match=f"version {LATEST_VERSION + 1} is newer"):
        async with open_sqlite_storage(db_path):
            pass


def test_migrations_apply_in_order_and_all_or_nothing(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        assert migrate(conn) == LATEST_VERSION
        assert migrate(conn) == LATEST_VERSION  # nothing left to do

        broken = (
            *MIGRATIONS,
            Migration(LATEST_VERSION + 1, "good", "CREATE TABLE extra (x INTEGER);"),
            Migration(LATEST_VERSION + 2, "bad", "CREATE TABLE extra2 (y INTEGER);\nNOT SQL;"),
        )
        with pytest.raises(StorageError, match="migration failed"):
            migrate(conn, broken)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "extra" not in tables
        assert "extra2" not in tables
        (version,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        assert version == LATEST_VERSION

        fixed = (*broken[:-1], Migration(LATEST_VERSION + 2, "ok", "CREATE TABLE extra2 (y);"))
        assert migrate(conn, fixed) == LATEST_VERSION + 2
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
        assert versions == list(range(1, LATEST_VERSION + 3))
    finally:
        conn.close()


# -- statuses, peers, tokens, keys, pruning ----------------------------------------------
async def test_statuses(store: SqliteStorage) -> None:
    assert await store.status_get("e1") is None
    await store.status_set("e1", ALICE, STATUS_QUEUED, at_ms=1)
    await store.status_set("e1", ALICE, rejected_status("peer_not_allowed"), at_ms=2)
    status = await store.status_get("e1")
    assert status is not None
    assert (status.sender, status.status, status.at_ms) == (ALICE, "rejected:peer_not_allowed", 2)
    for bad in ("", "rejected:", "lost", "rejected:has space"):
        with pytest.raises(ValueError, match="status"):
            await store.status_set("e1", ALICE, bad, at_ms=3)


async def test_peer_state_survives_a_restart(open_store: Any) -> None:
    long_error = "connect failed: " + "x" * 2_000
    async with open_store() as store:
        assert await store.peer_state_get(GLOBEX) is None
        await store.peer_state_put(
            PeerState(
                peer=GLOBEX,
                failures=3,
                backoff_until_ms=123_456,
                last_success_ms=1_000,
                last_error=long_error,
            )
        )
        await store.peer_state_put(PeerState(peer=INITECH, last_success_ms=5))
    async with open_store() as store:
        state = await store.peer_state_get(GLOBEX)
        assert state is not None
        assert (state.failures, state.backoff_until_ms, state.last_success_ms) == (
            3,
            123_456,
            1_000,
        )
        assert state.last_error is not None
        assert len(state.last_error) == MAX_LAST_ERROR_LENGTH
        assert state.last_error.startswith("connect failed: xxx")
        assert state.last_error.endswith("[truncated]")
        assert [s.peer for s in await store.peer_states()] == [GLOBEX, INITECH]


async def test_tokens_and_user_keys(store: SqliteStorage) -> None:
    await store.token_put(ALICE, b"h1", at_ms=1)
    await store.token_put(ALICE, b"h2", at_ms=2)
    await store.token_put(BOB, b"h3", at_ms=3)
    assert await store.token_lookup(b"h2") == ALICE
    assert await store.token_lookup(b"h9") is None
    assert await store.token_revoke(ALICE) == 2
    assert await store.token_lookup(b"h1") is None
    assert await store.token_lookup(b"h3") == BOB
    with pytest.raises(ValueError, match="token_hash"):
        await store.token_put(ALICE, b"", at_ms=4)

    assert await store.user_keys_get(ALICE) is None
    await store.user_keys_put(ALICE, b"record-1", at_ms=1)
    await store.user_keys_put(ALICE, b"record-2", at_ms=2)
    assert await store.user_keys_get(ALICE) == b"record-2"


async def test_prune_forgets_old_bookkeeping_but_not_waiting_statuses(
    store: SqliteStorage,
) -> None:
    old, new = mail("old", expires_ms=100), mail("new", expires_ms=10_000)
    await store.deliver(GLOBEX, "t-old", HASH, accepted(old), [old], at_ms=10)
    await store.deliver(GLOBEX, "t-new", HASH, accepted(new), [new], at_ms=5_000)
    await store.mailbox_ack(BOB, ["old", "new"])
    await store.spool_put([spool_item("waiting")], at_ms=10)  # status 'queued' at 10
    await store.status_set("done", ALICE, STATUS_FORWARDED, at_ms=10)

    counts = await store.prune(seen_before_ms=1_000, statuses_before_ms=1_000, txns_before_ms=1_000)
    assert (counts.seen, counts.statuses, counts.txns) == (1, 1, 1)
    assert await store.status_get("done") is None
    assert await store.status_get("waiting") is not None  # still in the spool
    assert await store.txn_lookup(GLOBEX, "t-old") is None
    assert await store.txn_lookup(GLOBEX, "t-new") is not None
    # "new" is still remembered: a retry is answered without a second copy.
    retry = await store.deliver(GLOBEX, "t-3", HASH, accepted(new), [new], at_ms=6_000)
    assert retry.stored == ()


async def test_bad_arguments_are_refused_before_anything_is_written(store: SqliteStorage) -> None:
    before = store.commits
    with pytest.raises(ValueError, match="max_items"):
        await store.spool_take(GLOBEX, max_items=0, max_bytes=10)
    with pytest.raises(ValueError, match="SpoolItem"):
        await store.spool_put([mail("m1")], at_ms=1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="collection"):
        await store.mailbox_ack(BOB, "m1")
    with pytest.raises(ValueError, match="at_ms"):
        await store.spool_put([spool_item("e1")], at_ms=-1)
    assert store.commits == before


# -- durability before acknowledgement ---------------------------------------------------
_WRITER_SCRIPT = """
import sys
import trio
from gateway.storage import SpoolItem
from gateway.storage.sqlite import open_sqlite_storage

async def writer(store, lane):
    i = 0
    while True:
        envelope_id = f"{lane}-{i}"
        await store.spool_put([SpoolItem(
            envelope_id=envelope_id, peer="globex.example", sender="alice@acme.example",
            recipient="bob@globex.example", created_ms=1, expires_ms=10**12,
            burn_on_read=False, data=b"payload " * 64)], at_ms=1)
        print(envelope_id, flush=True)
        i += 1

async def main(path):
    async with open_sqlite_storage(path) as store:
        async with trio.open_nursery() as nursery:
            for lane in range(8):
                nursery.start_soon(writer, store, f"w{lane}")

trio.run(main, sys.argv[1])
"""


def test_every_acknowledged_write_survives_sigkill(db_path: Path) -> None:
    acknowledged: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) >= 300:
                os.kill(proc.pid, signal.SIGKILL)
                break
        # Lines already printed before the kill count as acknowledged too.
        acknowledged.extend(line.strip() for line in proc.stdout)
        proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert len(acknowledged) >= 300

    async def stored_ids() -> set[str]:
        async with open_sqlite_storage(db_path) as store:
            found: set[str] = set()
            after = 0
            while page := await store.spool_list(after_seq=after):
                found.update(s.envelope_id for s in page)
                after = page[-1].seq
            return found

    stored = trio.run(stored_ids)
    missing = [envelope_id for envelope_id in acknowledged if envelope_id not in stored]
    assert missing == []


# -- small reads on the trio thread ----------------------------------------------------
async def test_takes_and_fetches_past_the_small_read_are_whole_and_in_order(
    store: SqliteStorage,
) -> None:
    count = 3 * SMALL_READ_ROWS + 1
    items = [spool_item(f"e{i}", data=bytes(100)) for i in range(count)]
    await store.spool_put(items, at_ms=1)
    ids = [f"e{i}" for i in range(count)]
    for most in (1, SMALL_READ_ROWS - 1, SMALL_READ_ROWS, SMALL_READ_ROWS + 1, count, count + 5):
        taken = await store.spool_take(GLOBEX, max_items=most, max_bytes=10**6)
        assert [e.envelope_id for e in taken] == ids[:most]
    # The byte bound cuts the take wherever it falls, small read or not.
    taken = await store.spool_take(GLOBEX, max_items=count, max_bytes=100 * SMALL_READ_ROWS + 150)
    assert [e.envelope_id for e in taken] == ids[: SMALL_READ_ROWS + 1]
    # after_seq: what follows a transaction in flight.
    head = await store.spool_take(GLOBEX, max_items=2, max_bytes=10**6)
    rest = await store.spool_take(GLOBEX, max_items=count, max_bytes=10**6, after_seq=head[-1].seq)
    assert [e.envelope_id for e in rest] == ids[2:]

    entries = [mail(f"m{i}") for i in range(count)]
    await store.deliver(GLOBEX, "t1", HASH, accepted(*entries), entries, at_ms=1)
    names = [f"m{i}" for i in range(count)]
    for limit in (1, SMALL_READ_ROWS, SMALL_READ_ROWS + 1, count, count + 5):
        fetched = await store.mailbox_fetch(BOB, limit=limit)
        assert [e.envelope_id for e in fetched] == names[:limit]


async def test_a_small_read_that_meets_a_lock_goes_to_a_reader_thread(
    sqlite_store: SqliteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine_module._run_read
    where: list[str] = []

    def run_read(conn: sqlite3.Connection, fn: Any) -> Any:
        where.append(threading.current_thread().name)
        if threading.current_thread() is threading.main_thread():
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # as SQLite sets it
            raise busy
        return real(conn, fn)

    monkeypatch.setattr(engine_module, "_run_read", run_read)
    assert await sqlite_store.engine.read_small(
        lambda conn: conn.execute("SELECT 7").fetchone()
    ) == (7,)
    assert where[0] == threading.main_thread().name
    assert where[1].startswith("gateway-storage-reader-")


async def test_a_small_read_that_fails_otherwise_is_a_storage_error(
    sqlite_store: SqliteStorage,
) -> None:
    with pytest.raises(StorageError, match="no such table"):
        await sqlite_store.engine.read_small(lambda conn: conn.execute("SELECT * FROM nope"))
    # The connection is still good for the next one.
    assert await sqlite_store.engine.read_small(
        lambda conn: conn.execute("SELECT 1").fetchone()
    ) == (1,)


async def test_a_small_read_on_a_closed_engine_is_refused(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:
        assert await store.token_lookup(b"\x01" * 32) is None  # opens the inline connection
    with pytest.raises(StorageError, match="closed"):
        await store.engine.read_small(lambda conn: None)


def test_a_full_disk_is_a_storage_full_error_and_other_errors_are_not() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # SQLITE_FULL
    other = sqlite3.OperationalError("disk I/O error")
    other.sqlite_errorcode = 10  # SQLITE_IOERR
    assert isinstance(_storage_error("gw.db", full), StorageFullError)
    error = _storage_error("gw.db", other)
    assert type(error) is StorageError
    assert error.message == "storage gw.db: OperationalError: disk I/O error"


# -- sign-in sessions ---------------------------------------------------------------
def _session(session_id: str = "s1", **changes: object) -> SessionRecord:
    values: dict[str, object] = {
        "session_id": session_id,
        "user": ALICE,
        "provider": "corp",
        "access_hash": b"a" * 32,
        "access_expires_ms": 1_000,
        "refresh_hash": b"r" * 32,
        "refresh_expires_ms": 5_000,
        "created_ms": 1,
        "idp_refresh_token": "idp-rt",
        "idp_groups": ("legal", "staff"),
        "acr": "mfa",
        "amr": ("pwd", "otp"),
    }
    values.update(changes)
    return SessionRecord(**values)  # type: ignore[arg-type]


async def test_sessions_put_find_refresh_delete(store: SqliteStorage) -> None:
    record = _session()
    await store.session_put(record)
    assert await store.session_by_access(b"a" * 32) == record
    assert await store.session_by_refresh(b"r" * 32) == record
    # a refresh replaces both hashes in one write: the old ones find nothing
    renewed = _session(access_hash=b"b" * 32, refresh_hash=b"s" * 32, access_expires_ms=2_000)
    await store.session_put(renewed)
    assert await store.session_by_access(b"a" * 32) is None
    assert await store.session_by_refresh(b"r" * 32) is None
    assert await store.session_by_access(b"b" * 32) == renewed
    await store.session_put(
        _session(
            "s2",
            access_hash=b"c" * 32,
            refresh_hash=b"t" * 32,
            refresh_expires_ms=9_000,
            idp_refresh_token=None,
        )
    )
    assert await store.session_delete_ended(before_ms=6_000) == 1
    assert await store.session_by_access(b"b" * 32) is None
    found = await store.session_by_access(b"c" * 32)
    assert found is not None
    assert found.idp_refresh_token is None
    assert await store.session_delete("s2") is True
    assert await store.session_delete("s2") is False


def test_session_records_are_bounded() -> None:
    with pytest.raises(ValueError, match="idp_groups"):
        _session(idp_groups=tuple(f"g{i}" for i in range(300)))
    with pytest.raises(ValueError, match="access_hash"):
        _session(access_hash=b"x" * 65)


async def test_lane_and_mailbox_counters_match_the_rows_after_every_op(
    sqlite_store: SqliteStorage,
) -> None:
    """The counters are kept by the ops (no row triggers since migration 7): after
    each insert or delete of every kind they equal what the rows add up to, and a
    lane or mailbox that empties leaves no counter row."""
    store = sqlite_store

    def check() -> None:
        conn = sqlite3.connect(store.engine.path)
        try:
            for table, counters, key in (
                ("spool", "spool_lanes", "peer"),
                ("mailbox", "mailbox_counts", "recipient"),
            ):
                rows = conn.execute(
                    f"SELECT {key}, count(*), sum(size) FROM {table} GROUP BY {key} ORDER BY {key}"
                ).fetchall()
                kept = conn.execute(
                    f"SELECT {key}, depth, bytes FROM {counters} ORDER BY {key}"
                ).fetchall()
                assert kept == rows, (table, kept, rows)
        finally:
            conn.close()

    await store.spool_put(
        [
            spool_item("a1", data=b"x" * 10),
            spool_item("a2", data=b"x" * 20),
            spool_item("a3", peer=INITECH, data=b"x" * 30, expires_ms=500),
            spool_item("a4", data=b"x" * 40, expires_ms=500),
            spool_item("a5", peer=INITECH, data=b"x" * 50, created_ms=10),
        ],
        at_ms=1,
    )
    check()
    # A repeated id, an unknown one and one of another lane change nothing extra.
    assert (
        await store.spool_complete(
            GLOBEX, {"a1": "forwarded", "nope": "forwarded", "a5": "forwarded"}, at_ms=2
        )
        == 1
    )
    check()
    assert [e.envelope_id for e in await store.spool_expire(600)] == ["a3", "a4"]
    check()
    assert await store.spool_purge(peer=INITECH, at_ms=3) == 1
    check()
    assert await store.spool_complete(GLOBEX, {"a2": "forwarded"}, at_ms=4) == 1
    check()
    assert await store.spool_stats() == {}

    first = [mail("m1", data=b"y" * 11), mail("m2", recipient=CAROL, data=b"y" * 22)]
    await store.deliver(GLOBEX, "t1", HASH, accepted(*first), first, at_ms=5)
    check()
    await store.mailbox_put_local(
        [mail("m3", data=b"y" * 33), mail("m4", recipient=CAROL, expires_ms=500)], at_ms=6
    )
    check()
    assert await store.mailbox_ack(BOB, ["m1", "m1", "m2", "nope"]) == 1  # m2 is carol's
    check()
    assert [e.envelope_id for e in await store.mailbox_expire(600)] == ["m4"]
    check()
    assert await store.mailbox_ack(CAROL, ["m2"]) == 1
    assert await store.mailbox_ack(BOB, ["m3"]) == 1
    check()
    assert (await store.mailbox_depth(BOB)).envelopes == 0
