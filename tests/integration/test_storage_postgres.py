"""The PostgreSQL engine on the real server: what the contract tests cannot show.

The shared promises run on both engines in test_storage_sqlite.py,
test_storage_bounds.py and test_storage_statuses.py. Here: several stores
(as several nodes would) on one database keep the idempotency and bound
promises because the database enforces them; schema versions; durable
commits; and the one-line errors for a wrong URL or a server that is not
there.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio

from gateway.errors import CapacityError, StorageError, StorageFullError
from gateway.storage.base import Bound
from gateway.storage.postgres import (
    LATEST_VERSION,
    PostgresStorage,
    describe,
    open_postgres_storage,
)
from gateway.storage.postgres.engine import POOL_TIMEOUT_S, storage_error
from tests.integration.test_storage_sqlite import BOB, GLOBEX, HASH, accepted, mail, spool_item
from tests.postgres_for_tests import bring_back, cut_off, fresh_database


async def test_two_nodes_recording_one_transaction_store_it_once(postgres_url: str) -> None:
    entries = [mail(f"m{i}") for i in range(20)]
    outcomes = []
    async with (
        open_postgres_storage(postgres_url) as one,
        open_postgres_storage(postgres_url) as two,
    ):

        async def deliver(store: PostgresStorage) -> None:
            outcomes.append(
                await store.deliver(GLOBEX, "txn-1", HASH, accepted(*entries), entries, at_ms=1)
            )

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(deliver, one)
                nursery.start_soon(deliver, two)
        stored = [o for o in outcomes if o.replayed is None]
        assert len(stored) == 1
        assert len(stored[0].stored) == 20
        replays = [o.replayed for o in outcomes if o.replayed is not None]
        assert [r.txn_id for r in replays] == ["txn-1"] * 7
        assert len(await one.mailbox_fetch(BOB, limit=100)) == 20


async def test_one_envelope_in_two_transactions_at_once_is_stored_once(postgres_url: str) -> None:
    entry = mail("same")
    async with (
        open_postgres_storage(postgres_url) as one,
        open_postgres_storage(postgres_url) as two,
    ):
        results: list[tuple[str, ...]] = []

        async def deliver(store: PostgresStorage, txn: str) -> None:
            outcome = await store.deliver(GLOBEX, txn, HASH, accepted(entry), [entry], at_ms=1)
            results.append(outcome.stored)

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(deliver, one if i % 2 else two, f"txn-{i}")
        assert sorted(results) == [(), (), (), (), (), ("same",)]
        assert [e.envelope_id for e in await two.mailbox_fetch(BOB, limit=10)] == ["same"]
        # Spooling is idempotent across nodes too.
        spooled: list[str] = []
        async with trio.open_nursery() as nursery:
            for store in (one, two, one, two):

                async def put(store: PostgresStorage = store) -> None:
                    spooled.extend(await store.spool_put([spool_item("out-1")], at_ms=1))

                nursery.start_soon(put)
        assert spooled == ["out-1"]


async def test_writers_on_two_nodes_never_overshoot_a_bound(postgres_url: str) -> None:
    lane = Bound(max_envelopes=7, max_bytes=10**6)
    mailbox = Bound(max_envelopes=5, max_bytes=10**6)
    async with (
        open_postgres_storage(postgres_url) as one,
        open_postgres_storage(postgres_url) as two,
    ):
        spooled: list[str] = []
        full = 0

        async def put(store: PostgresStorage, i: int) -> None:
            nonlocal full
            try:
                spooled.extend(await store.spool_put([spool_item(f"e{i}")], at_ms=1, bound=lane))
            except CapacityError:
                full += 1

        fitted: list[str] = []

        async def deliver(store: PostgresStorage, i: int) -> None:
            entry = mail(f"m{i}")
            outcome = await store.deliver(
                GLOBEX, f"t{i}", HASH, accepted(entry), [entry], at_ms=1, bound=mailbox
            )
            fitted.extend(outcome.stored)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(put, one if i % 2 else two, i)
                nursery.start_soon(deliver, two if i % 2 else one, i)
        assert (len(spooled), full) == (7, 13)
        assert (await one.spool_stats())[GLOBEX].depth == 7
        assert len(fitted) == 5
        assert (await two.mailbox_depth(BOB)).envelopes == 5


async def test_a_mailbox_cursor_never_skips_an_arrival_from_another_node(
    postgres_url: str,
) -> None:
    async with (
        open_postgres_storage(postgres_url) as one,
        open_postgres_storage(postgres_url) as two,
    ):
        seen: list[str] = []
        done = False

        async def reader() -> None:
            after = 0
            while True:
                finished = done
                for entry in await one.mailbox_fetch(BOB, limit=100, after=after):
                    seen.append(entry.envelope_id)
                    after = entry.seq
                if finished:
                    return
                await trio.sleep(0)

        async def writer(store: PostgresStorage, prefix: str) -> None:
            for i in range(25):
                await store.mailbox_put_local([mail(f"{prefix}{i}")], at_ms=1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with trio.open_nursery() as writers:
                writers.start_soon(writer, one, "a")
                writers.start_soon(writer, two, "b")
            done = True
        assert sorted(seen) == sorted([f"a{i}" for i in range(25)] + [f"b{i}" for i in range(25)])


async def test_commits_are_durable_on_the_server(postgres_url: str) -> None:
    async with open_postgres_storage(postgres_url) as store:
        setting = await store.engine.read(
            lambda conn: conn.execute("SHOW synchronous_commit").fetchone()
        )
        assert setting == ("on",)
        await store.check_writable()
        assert await store.reusable_bytes() == 0
        assert await store.scrub() is True


async def test_a_database_from_a_newer_gateway_is_refused() -> None:
    with fresh_database() as url:
        async with open_postgres_storage(url):
            pass
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_ms) "
                "VALUES (%s, 'from the future', 0)",
                (LATEST_VERSION + 1,),
            )
        with pytest.raises(StorageError, match=f"version {LATEST_VERSION + 1} is newer"):
            async with open_postgres_storage(url):
                pass


async def test_nodes_starting_at_once_migrate_once() -> None:
    with fresh_database() as url:
        opened = 0

        async def open_one() -> None:
            nonlocal opened
            async with open_postgres_storage(url, pool_size=1):
                opened += 1

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(open_one)
        assert opened == 3
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert rows == [(v,) for v in range(1, LATEST_VERSION + 1)]


async def test_a_server_that_is_not_there_is_one_clear_line() -> None:
    url = "postgresql://gw:s3cret-password@127.0.0.1:1/gateway"
    with pytest.raises(StorageError) as error:
        async with open_postgres_storage(url):
            pass
    message = str(error.value)
    assert message.startswith("storage postgresql://gw@127.0.0.1:1/gateway: cannot connect: ")
    assert "\n" not in message
    assert "s3cret" not in message


async def test_a_wrong_database_or_url_is_one_clear_line(postgres_url: str) -> None:
    wrong_db = postgres_url.rsplit("/", 1)[0] + "/gw_missing_database"
    with pytest.raises(StorageError, match=r"cannot connect: .*does not exist") as error:
        async with open_postgres_storage(wrong_db):
            pass
    assert "\n" not in str(error.value)
    with pytest.raises(StorageError, match="URL is not valid") as error:
        async with open_postgres_storage("postgresql://u:pw@host:notaport:/x?bad=1"):
            pass
    assert "pw" not in str(error.value)


def test_errors_are_translated_at_the_edge() -> None:
    assert describe("postgresql://u:secret@db.example:6543/gw") == (
        "postgresql://u@db.example:6543/gw"
    )
    full = psycopg.errors.DiskFull("could not extend file: No space left on device")
    assert isinstance(storage_error("x", full), StorageFullError)
    other = psycopg.OperationalError("server closed the connection unexpectedly\nmore")
    error = storage_error("x", other)
    assert type(error) is StorageError
    assert str(error) == "storage x: OperationalError: server closed the connection unexpectedly"


async def test_a_database_that_goes_away_fails_calls_and_recovers_by_itself() -> None:
    with fresh_database() as url:
        async with open_postgres_storage(url) as store:
            await store.spool_put([spool_item("before")], at_ms=1)
            await trio.to_thread.run_sync(cut_off, url)
            started = trio.current_time()
            with pytest.raises(StorageError):
                await store.spool_put([spool_item("during")], at_ms=1)
            with pytest.raises(StorageError):
                await store.check_writable()
            assert trio.current_time() - started < 2 * POOL_TIMEOUT_S + 2
            await trio.to_thread.run_sync(bring_back, url)
            with trio.fail_after(60):
                while True:
                    try:
                        await store.check_writable()
                        break
                    except StorageError:
                        await trio.sleep(0.5)
            assert await store.spool_put([spool_item("after")], at_ms=1) == ["after"]
            assert [s.envelope_id for s in await store.spool_list()] == ["before", "after"]


async def test_a_connection_lost_mid_transaction_never_reports_success(postgres_url: str) -> None:
    async with open_postgres_storage(postgres_url) as store:

        def lose_the_connection(conn: Any) -> None:
            conn.execute(
                "INSERT INTO statuses (envelope_id, sender, status, at_ms) "
                "VALUES ('lost', 'alice@acme.example', 'forwarded', 1)"
            )
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(StorageError) as error:
            await store.engine.write(lose_the_connection)
        assert "\n" not in str(error.value)
        assert await store.status_get("lost") is None
        # The pool replaced the broken connection: the next write just works.
        await store.status_set("kept", "alice@acme.example", "forwarded", at_ms=1)
        assert await store.status_get("kept") is not None
