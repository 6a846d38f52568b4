"""End to end: a gateway whose data dir is a real 25 MB tmpfs fills it up, and recovers.

Two real ``gateway run`` processes (acme, globex). In each test one of them
keeps its database on a tmpfs mounted for the test, with a storage reserve
(``limits.storage_min_free_bytes``) of 8 MiB. Deleting needs room too (each
deleted page's zeroes go through the WAL), so the transactions and
acknowledgements here stay under 1 MiB each, well inside the reserve, as
docs/operations.md says to size it:

* **The spool side.** globex is down; alice submits until acme's disk is at
  its reserve. Submissions get ``507 insufficient_storage`` (never a 500 or a
  traceback), ``/readyz`` says why, the refusals are counted, and a local
  user still reads and acknowledges her mail. Then globex starts: acme's lane
  drains, which frees pages in acme's database, and acme takes submissions
  again by itself. Every envelope acme accepted reaches bob, once, and acme's
  database passes SQLite's integrity check.
* **The mailbox side.** bob does not read; acme sends until globex's disk is
  at its reserve, and globex answers its transactions ``503
  insufficient_storage``. bob then reads and acknowledges, globex takes the
  rest by itself when acme tries again (after ``Retry-After``), and bob gets
  every envelope, once.

Mounting a tmpfs needs root, which is how this project's machines and CI run
the suite; outside Linux the test is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import yaml

from gateway.client.api import ClientAPIError, ClientSession
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.envelope_crypto import seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess
from gateway.reserve import RESUME_FACTOR
from tests.e2e.traffic import metric_value

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs mounts need Linux"),
]

ACME, GLOBEX = "acme.example", "globex.example"
TMPFS_SIZE = "25m"
RESERVE = 8 * 1024 * 1024
PAYLOAD = 30_000  # bytes of plaintext: about 41 KB stored per envelope
BATCH = 16
READ_LIMIT = 24  # envelopes bob fetches and acknowledges at once: about 1 MB
MAX_BATCHES = 100  # 65 MB: far more than the tmpfs holds; the loop always ends
DEADLINE = 120.0  # seconds for anything to drain


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/e2e/test_disk_full.py mounts a tmpfs: run the suite as root")


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """A 25 MB tmpfs at ``path`` (mode 0700) for the duration of the block."""
    path.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
        check=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False, timeout=30)


def keep_data_on(org: DevOrg, data_dir: Path) -> None:
    """gateway.yaml: the data dir on ``data_dir``, the reserve, 1 MiB transactions."""
    config = yaml.safe_load(org.config_path.read_text())
    config["data_dir"] = str(data_dir)
    config["limits"]["storage_min_free_bytes"] = RESERVE
    config["limits"]["max_transaction_bytes"] = 1024 * 1024
    config["limits"]["backoff_max"] = "5s"
    org.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def two_orgs(net: DevNet) -> tuple[DevOrg, DevOrg]:
    acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
    acme.write_rules(
        peers=[globex],
        groups={"engineering": {"members": ["alice", "carol"], "send_to": [GLOBEX]}},
    )
    globex.write_rules(
        peers=[acme], groups={"partners": {"members": ["bob"], "receive_from": [ACME]}}
    )
    return acme, globex


def session(org: DevOrg, token: str) -> ClientSession:
    return ClientSession(org.client_url, token, ca_file=org.ca_file, timeout=30.0)


def letters(count: int, to: str) -> list[Envelope]:
    alice = UserKeys.generate(Address.of("alice", ACME))
    recipient = UserKeys.generate(Address.parse(to)).public()
    now = time.time_ns() // 1_000_000
    return [
        seal(
            n.to_bytes(4, "big") + os.urandom(PAYLOAD),
            sender=alice,
            recipient=recipient,
            created_ms=now,
            expires_ms=now + 3_600_000,
        )
        for n in range(count)
    ]


def readyz(org: DevOrg) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(org.metrics_url + "/readyz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def reserve_confirmed(org: DevOrg) -> bool:
    """Whether ``org`` still refuses after two samples of its free space."""
    await trio.sleep(1.2)
    return readyz(org)[0] == 503


async def wait_ready_again(org: DevOrg) -> None:
    with trio.fail_after(DEADLINE):
        while readyz(org)[0] != 200:
            await trio.sleep(0.2)


async def read_all(org: DevOrg, token: str, expected: set[str]) -> dict[str, int]:
    """bob reads and acknowledges until he holds ``expected``; how often each id came."""
    seen: dict[str, int] = {}
    with trio.move_on_after(DEADLINE):
        async with session(org, token) as bob:
            while not expected <= set(seen):
                got = await bob.fetch(wait=2, limit=READ_LIMIT)
                for env in got:
                    seen[env.id] = seen.get(env.id, 0) + 1
                if got:
                    await bob.ack([env.id for env in got])
            # Anything stored twice would come again after its first acknowledgement.
            for env in await bob.fetch(wait=1, limit=READ_LIMIT):
                seen[env.id] = seen.get(env.id, 0) + 1
    return seen


def assert_no_traceback(proc: GatewayProcess) -> None:
    log = proc.log_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log, proc.log_tail(60)
    assert "internal_error" not in log, proc.log_tail(60)


def integrity(database: Path) -> str:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        (result,) = conn.execute("PRAGMA integrity_check").fetchone()
    return str(result)


async def test_a_full_spool_disk_refuses_with_507_and_recovers_by_itself(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "acme-data") as data, DevNet(tmp_path) as net:
        acme, globex = two_orgs(net)
        keep_data_on(acme, data)
        proc_a = net.start(ACME)
        proc_b = net.process(GLOBEX)
        alice_token, carol_token = acme.issue_token("alice"), acme.issue_token("carol")
        bob_token = globex.issue_token("bob")
        for_carol = letters(2, f"carol@{ACME}")
        for_bob = letters(BATCH * MAX_BATCHES, f"bob@{GLOBEX}")

        accepted: set[str] = set()
        refusals: list[tuple[int, str]] = []
        async with session(acme, alice_token) as alice:
            assert all(a.ok for a in await alice.submit_batch(for_carol))
            for start in range(0, len(for_bob), BATCH):
                batch = for_bob[start : start + BATCH]
                try:
                    answers = await alice.submit_batch(batch)
                except ClientAPIError as exc:
                    refusals.append((exc.status, exc.code))
                    answers = []
                accepted |= {a.envelope_id for a in answers if a.ok and a.envelope_id}
                refusals += [(200, a.error) for a in answers if a.error is not None]
                # Refused between two samples on an estimate: go on until a sample
                # confirms the reserve is reached (it says so on /readyz).
                if refusals and await reserve_confirmed(acme):
                    break
        # The whole batch refused with 507 (the reserve), or some of its envelopes
        # (a write that found the disk full): never anything else.
        assert refusals, "the tmpfs never filled up"
        assert {code for _, code in refusals} == {"insufficient_storage"}, refusals
        assert {status for status, _ in refusals} <= {507, 200}
        assert len(accepted) > 100  # most of the 25 MB went into the spool first

        # While it is short: /readyz says why, the refusals are counted, and what
        # frees space (a user reading her mail) still works.
        status, body = readyz(acme)
        assert status == 503
        assert body["failing"] == ["disk"]
        assert "at the reserve of 8.0 MiB" in str(body["why"])
        metrics = proc_a.metrics()
        assert metric_value(metrics, "gateway_storage_reserve_refusals_total", path="client") > 0
        # Closed by a sample below the reserve, or by a request the estimate
        # (WRITE_AMPLIFICATION) would have taken below it: then the samples may
        # stay a little above it (large envelopes in segment files take less
        # than the estimate), and the reserve stays closed up to RESUME_FACTOR.
        assert metric_value(metrics, "gateway_storage_available_bytes") < RESERVE * RESUME_FACTOR
        async with session(acme, carol_token) as carol:
            got = await carol.fetch(limit=10)
            assert {env.id for env in got} == {env.id for env in for_carol}
            assert await carol.ack([env.id for env in got]) == 2

        # globex comes up: acme's lane drains, its database gets its pages back, and it
        # takes new envelopes again by itself.
        proc_b.start()
        await trio.to_thread.run_sync(proc_b.wait_ready)
        seen = await read_all(globex, bob_token, accepted)
        assert set(seen) == accepted, f"{len(accepted - set(seen))} lost:\n{proc_a.log_tail()}"
        assert all(count == 1 for count in seen.values())
        await wait_ready_again(acme)
        async with session(acme, alice_token) as alice:
            later = letters(BATCH, f"bob@{GLOBEX}")
            assert all(a.ok for a in await alice.submit_batch(later))

        assert_no_traceback(proc_a)
        assert proc_a.stop() == 0
        assert proc_b.stop() == 0
        assert integrity(data / "gateway.sqlite3") == "ok"


async def test_a_full_mailbox_disk_holds_peers_off_with_503_and_recovers(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "globex-data") as data, DevNet(tmp_path) as net:
        acme, globex = two_orgs(net)
        keep_data_on(globex, data)
        proc_b = net.start(GLOBEX)
        proc_a = net.start(ACME)
        alice_token, bob_token = acme.issue_token("alice"), globex.issue_token("bob")
        # About 26 MB for bob, more than globex's tmpfs holds; acme spools on its own disk.
        sent = letters(40 * BATCH, f"bob@{GLOBEX}")
        async with session(acme, alice_token) as alice:
            for start in range(0, len(sent), BATCH):
                assert all(a.ok for a in await alice.submit_batch(sent[start : start + BATCH]))

        # bob does not read: globex fills up to its reserve and holds acme off.
        with trio.fail_after(DEADLINE):
            while readyz(globex)[0] == 200:
                await trio.sleep(0.2)
        status, body = readyz(globex)
        assert (status, body["failing"]) == (503, ["disk"])
        with trio.fail_after(DEADLINE):
            while (
                metric_value(
                    proc_b.metrics(), "gateway_storage_reserve_refusals_total", path="federation"
                )
                == 0
            ):
                await trio.sleep(0.2)
        assert (
            metric_value(
                proc_a.metrics(),
                "gateway_federation_transactions_total",
                direction="outbound",
                peer=GLOBEX,
                result="http_503",
            )
            > 0
        )

        # bob reads and acknowledges: globex has room again, takes the rest when acme
        # tries again, and bob has every envelope, once.
        seen = await read_all(globex, bob_token, {env.id for env in sent})
        assert set(seen) == {env.id for env in sent}, proc_b.log_tail()
        assert all(count == 1 for count in seen.values())
        await wait_ready_again(globex)

        assert_no_traceback(proc_b)
        assert proc_a.stop() == 0
        assert proc_b.stop() == 0
        assert integrity(data / "gateway.sqlite3") == "ok"
