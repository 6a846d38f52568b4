"""`gateway storage migrate`: an SQLite gateway's whole state, moved into PostgreSQL.

acme.example runs on its SQLite file: envelopes for globex (which is down)
wait in its spool, carol has local mail, alice and carol have tokens. acme is
stopped; its state is migrated into a new PostgreSQL database; acme starts on
it. Then everything carries on as if nothing happened: the old tokens work,
carol reads her mail with the same sequence numbers, and once globex is up
every spooled envelope reaches bob exactly once. The refusals: a target that
is not empty, a gateway that is still running (its WAL file is there), a
config that already uses PostgreSQL, a URL that is not one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from gateway.core.address import Address
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, gateway_command
from gateway.storage.migrate import TABLES
from tests.e2e.test_postgres_storage import sealed, session, start, submit, use_storage
from tests.postgres_for_tests import fresh_database

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme.example", "globex.example"
SPOOLED, LOCAL = 40, 5
DRAIN_TIMEOUT = 60.0


@pytest.fixture
def target() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def migrate(config: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command("storage", "migrate", "-c", str(config), "--to", url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sqlite_counts(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as conn:
        return {
            table.name: conn.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
            for table in TABLES
        }


def postgres_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        counts = {}
        for table in TABLES:
            row = conn.execute(f"SELECT count(*) FROM {table.name}").fetchone()
            assert row is not None
            counts[table.name] = int(row[0])
        return counts


def seqs(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [int(row[0]) for row in conn.execute("SELECT seq FROM mailbox ORDER BY seq")]


async def test_a_stopped_sqlite_gateway_moves_to_postgresql_and_carries_on(
    tmp_path: Path, target: str
) -> None:
    with DevNet(tmp_path) as net:
        acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
        acme.write_rules(
            peers=[globex],
            groups={"engineering": {"members": ["alice", "carol"], "send_to": [GLOBEX]}},
        )
        globex.write_rules(
            peers=[acme], groups={"partners": {"members": ["bob"], "receive_from": [ACME]}}
        )
        proc_a, proc_b = net.process(ACME), net.process(GLOBEX)
        await start(proc_a)
        alice_token, carol_token = acme.issue_token("alice"), acme.issue_token("carol")
        bob_token = globex.issue_token("bob")
        alice = UserKeys.generate(Address.of("alice", ACME))
        for_bob = sealed(alice, Address.of("bob", GLOBEX), SPOOLED, tag=1)
        for_carol = sealed(alice, Address.of("carol", ACME), LOCAL, tag=2)
        await submit(acme, alice_token, for_bob)  # globex is down: they wait in the spool
        await submit(acme, alice_token, for_carol)
        async with session(acme, carol_token) as carol:
            before = [env.id for env in await carol.fetch(limit=100)]
        assert before == [env.id for env in for_carol]

        # Still running: its WAL is there, so the copy is refused.
        database = acme.config().storage.sqlite_path
        assert database is not None
        running = migrate(acme.config_path, target)
        assert running.returncode == 1
        assert "the gateway is running, or did not stop cleanly" in running.stderr

        assert proc_a.stop() == 0
        expected = sqlite_counts(database)
        with contextlib.closing(sqlite3.connect(f"file:{database}?immutable=1", uri=True)) as conn:
            old_seqs = [row[0] for row in conn.execute("SELECT seq FROM mailbox ORDER BY seq")]
        assert expected["spool"] == SPOOLED
        assert expected["mailbox"] == LOCAL
        assert expected["tokens"] == 3 - 1  # alice and carol at acme
        done = migrate(acme.config_path, target)
        assert done.returncode == 0, done.stderr
        assert f"copied {sum(expected.values()):,} row(s)" in done.stdout
        assert "postgresql://postgres@127.0.0.1:5432/gw_test_" in done.stdout
        assert postgres_counts(target) == expected

        # Again into the same database: it is not empty any more, nothing changes.
        again = migrate(acme.config_path, target)
        assert again.returncode == 1
        assert "not empty (spool 40" in again.stderr
        assert postgres_counts(target) == expected

        # acme on PostgreSQL: the same tokens, the same mail, the same cursors.
        use_storage(acme, target)
        await start(proc_a)
        async with session(acme, carol_token) as carol:
            assert [env.id for env in await carol.fetch(limit=100)] == before
        # Sequence numbers came along, and new ones follow the highest.
        assert seqs(target) == old_seqs
        await submit(acme, alice_token, sealed(alice, Address.of("carol", ACME), 1, tag=3))
        assert seqs(target)[:-1] == old_seqs
        assert seqs(target)[-1] > max(old_seqs)
        await start(proc_b)
        seen: dict[str, int] = {}
        with trio.move_on_after(DRAIN_TIMEOUT):
            async with session(globex, bob_token) as bob:
                while len(seen) < SPOOLED:
                    got = await bob.fetch(wait=2, limit=100)
                    for env in got:
                        seen[env.id] = seen.get(env.id, 0) + 1
                    if got:
                        await bob.ack([env.id for env in got])
        assert set(seen) == {env.id for env in for_bob}, proc_a.log_tail()
        assert all(count == 1 for count in seen.values())

        # The refusals that need no database: a config on PostgreSQL, a URL that is not.
        on_postgres = migrate(acme.config_path, target)
        assert on_postgres.returncode == 2
        assert "already uses PostgreSQL" in on_postgres.stderr
        assert proc_a.stop() == 0
        assert proc_b.stop() == 0


def test_a_target_that_is_not_a_postgresql_url_is_a_usage_error(tmp_path: Path) -> None:
    with DevNet(tmp_path) as net:
        acme = net.add_org(ACME)
        done = migrate(acme.config_path, "mysql://root@localhost/db")
        assert done.returncode == 2
        assert "--to: expected a postgresql:// URL, got a URL" in done.stderr
        assert "root" not in done.stderr  # a URL is never echoed: it may hold a password
