"""`gateway storage backup`: a running SQLite gateway backed up, then restored, and carrying on.

acme.example runs on its SQLite file: large and small envelopes for globex
(which is down) wait in its spool, carol has local mail and has acknowledged
some of it. While acme runs and alice keeps submitting to carol, the backup is
taken. acme is stopped, its database and segment files are replaced by the
backup's, and it starts again: carol reads the mail she had not acknowledged,
byte for byte, and once globex is up every spooled envelope reaches bob
exactly once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trio

from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.envelope_crypto import seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, gateway_command
from tests.e2e.test_postgres_storage import session, start, submit

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme.example", "globex.example"
DRAIN_TIMEOUT = 60.0
LARGE = 8_000  # plaintext bytes: the envelope is past the 4 KiB segment threshold


def sealed(sender: UserKeys, recipient: Address, count: int, *, size: int) -> list[Envelope]:
    keys = UserKeys.generate(recipient).public()
    now = time.time_ns() // 1_000_000
    return [
        seal(
            i.to_bytes(4, "big") * (size // 4),
            sender=sender,
            recipient=keys,
            created_ms=now,
            expires_ms=now + 3_600_000,
        )
        for i in range(count)
    ]


async def test_a_running_gateway_is_backed_up_restored_and_carries_on(tmp_path: Path) -> None:
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
        bob, carol = Address.of("bob", GLOBEX), Address.of("carol", ACME)
        for_bob = sealed(alice, bob, 20, size=LARGE) + sealed(alice, bob, 10, size=100)
        for_carol = sealed(alice, carol, 12, size=LARGE) + sealed(alice, carol, 4, size=100)
        await submit(acme, alice_token, for_bob)  # globex is down: they wait in the spool
        await submit(acme, alice_token, for_carol)
        acked = [env.id for env in for_carol[::3]]
        async with session(acme, carol_token) as client:
            await client.ack(acked)
        unread = {env.id: env.ciphertext for env in for_carol if env.id not in acked}

        # The backup, while alice keeps writing to carol.
        backup = tmp_path / "backup"
        done: subprocess.CompletedProcess[str] | None = None

        async def take_backup() -> None:
            nonlocal done
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    gateway_command(
                        "storage", "backup", "-c", str(acme.config_path), "--json", str(backup)
                    ),
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_backup)
            for _ in range(5):
                await submit(acme, alice_token, sealed(alice, carol, 4, size=LARGE))
        assert done is not None
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        # The spooled large envelopes and carol's unacknowledged ones, at least.
        assert summary["segment_rows"] >= 20 + 8, summary
        assert summary["unreadable"] == 0
        assert sorted(p.name for p in backup.iterdir()) == [
            "gateway.sqlite3",
            "gateway.sqlite3.segments",
        ]

        # Restore: stop, put the backup in place, start.
        assert proc_a.stop() == 0
        database = acme.config().storage.sqlite_path
        assert database is not None
        segments = database.with_name(database.name + ".segments")
        for stale in (
            database.with_name(database.name + "-wal"),
            database.with_name(database.name + "-shm"),
        ):
            stale.unlink(missing_ok=True)
        database.unlink()
        shutil.rmtree(segments)
        shutil.copy2(backup / "gateway.sqlite3", database)
        shutil.copytree(backup / "gateway.sqlite3.segments", segments)
        await start(proc_a)

        async with session(acme, carol_token) as client:
            got = {env.id: env.ciphertext for env in await client.fetch(limit=100)}
        assert {i: got.get(i) for i in unread} == unread
        assert not set(got) & set(acked)

        await start(proc_b)
        seen: dict[str, int] = {}
        with trio.move_on_after(DRAIN_TIMEOUT):
            async with session(globex, bob_token) as client:
                while len(seen) < len(for_bob):
                    envelopes = await client.fetch(wait=2, limit=100)
                    for env in envelopes:
                        seen[env.id] = seen.get(env.id, 0) + 1
                    if envelopes:
                        await client.ack([env.id for env in envelopes])
        assert set(seen) == {env.id for env in for_bob}, proc_a.log_tail()
        assert all(count == 1 for count in seen.values())
        assert proc_a.stop() == 0
        assert proc_b.stop() == 0
