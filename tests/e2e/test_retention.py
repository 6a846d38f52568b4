"""Retention end to end through real processes (docs/retention.md).

alice@acme.example is in a group under outbound retention; she writes to
bob@globex.example with the reference client. The compliance officer made the
retention key offline (``gateway retention keygen``); acme's admin exports the
archive (``gateway retention export``) and the officer opens it offline
(``gateway retention open``): the message is there, its sender's signature
verified against the key the gateway archived with it. No file of either
gateway, nor the export, holds the text. Then the key is rotated: new messages
are wrapped for the new key, and the old archive still opens with the old key
only. Every test runs twice: with both gateways on SQLite, and with both on
PostgreSQL (a database each), where the archive, its export and holds live in
the database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import yaml
from nacl.signing import SigningKey

from gateway.client.api import ClientAPIError, ClientSession
from gateway.core.envelope import Envelope, signing_bytes
from gateway.core.keytext import parse_retention_key
from gateway.crypto.envelope_crypto import seal_v2
from gateway.crypto.keys import UserKeys
from gateway.demo import find_plaintext
from gateway.devnet import DevNet, DevOrg
from tests.e2e.traffic import metric_value
from tests.postgres_for_tests import fresh_database

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(sys.executable).parent / "gateway")
ACME, GLOBEX = "acme.example", "globex.example"
ALICE, BOB = f"alice@{ACME}", f"bob@{GLOBEX}"
TIMEOUT = 60
FIRST = "the Q3 numbers, for the record"
SECOND = "after the rotation, still on the record"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GATEWAY, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    done = run(*args, env=env)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


@dataclass
class Net:
    dev: DevNet
    acme: DevOrg
    globex: DevOrg
    officer: Path
    home: Path
    tokens: dict[str, str]

    def client(self, user: str, *args: str) -> str:
        org = self.acme if user == "alice" else self.globex
        env = {
            "GATEWAY_URL": org.client_url,
            "GATEWAY_TOKEN": self.tokens[user],
            "GATEWAY_KEYS": str(self.home / f"{user}.json"),
            "GATEWAY_CA": str(org.ca_file),
        }
        return ok("client", *args, env=env)


def keygen(officer: Path, key_id: str) -> dict[str, str]:
    """The officer's keygen; the `retention.key` entry it prints, parsed."""
    out = ok("retention", "keygen", "--id", key_id, "--out", str(officer / f"{key_id}.key"))
    assert stat.S_IMODE((officer / f"{key_id}.key").stat().st_mode) == 0o600
    entry: dict[str, str] = yaml.safe_load(out)["retention"]["key"]
    assert entry["id"] == key_id
    return entry


def acme_rules(acme: DevOrg, globex: DevOrg, retention: dict[str, object]) -> None:
    acme.write_rules(
        peers=[globex],
        groups={
            "finance": {
                "members": ["alice"],
                "send_to": [GLOBEX],
                "receive_from": [GLOBEX],
                "retention": {"outbound": "required", "keep": "30d"},
            }
        },
        retention=retention,
    )


def use_postgres(org: DevOrg, url: str) -> None:
    text = org.config_path.read_text()
    assert "\nstorage: sqlite" in text
    org.config_path.write_text(text.replace("\nstorage: sqlite", f"\nstorage: {url}"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def net(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Net]:
    base = tmp_path_factory.mktemp("retention")
    officer = base / "officer"
    officer.mkdir(mode=0o700)
    key_2026 = keygen(officer, "acme-2026")
    globex_key = keygen(officer, "globex-2026")  # globex's own officer, in real life
    with ExitStack() as databases, DevNet(base) as dev:  # the databases go last
        acme, globex = dev.add_org(ACME), dev.add_org(GLOBEX)
        if request.param == "postgresql":
            for org in (acme, globex):
                use_postgres(org, databases.enter_context(fresh_database()))
        acme_rules(acme, globex, {"key": key_2026})
        globex.write_rules(
            peers=[acme],
            groups={
                "partners": {
                    "members": ["bob"],
                    "send_to": [ACME],
                    "receive_from": [ACME],
                    "retention": {"inbound": "required", "keep": "30d"},
                }
            },
            retention={"key": globex_key},
        )
        dev.start(ACME)
        dev.start(GLOBEX)
        home = base / "home"
        home.mkdir(mode=0o700)
        tokens = {"alice": acme.issue_token("alice"), "bob": globex.issue_token("bob")}
        net = Net(dev, acme, globex, officer, home, tokens)
        for user, address in (("alice", ALICE), ("bob", BOB)):
            net.client(user, "keygen", "--user", address)
            net.client(user, "publish")
        yield net


def export_and_open(
    net: Net, name: str, *keys: str, org: DevOrg | None = None
) -> subprocess.CompletedProcess[str]:
    export = net.officer / f"{name}.jsonl"
    config = (org or net.acme).config_path
    ok("retention", "export", "-c", str(config), "--out", str(export))
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    key_args = [arg for key in keys for arg in ("--key", str(net.officer / f"{key}.key"))]
    return run("retention", "open", str(export), *key_args)


def test_the_archive_holds_what_alice_wrote_and_only_the_officer_reads_it(net: Net) -> None:
    envelope_id = net.client("alice", "send", "--to", BOB, FIRST).strip()
    [line] = [json.loads(x) for x in net.client("bob", "recv", "--wait", "20").splitlines()]
    assert (line["id"], line["text"]) == (envelope_id, FIRST)

    opened = export_and_open(net, "first", "acme-2026")
    assert opened.returncode == 0, opened.stderr
    [message] = [json.loads(x) for x in opened.stdout.splitlines()]
    assert message["id"] == envelope_id
    assert (message["from"], message["to"], message["text"]) == (ALICE, BOB, FIRST)
    assert (message["group"], message["direction"], message["key_id"]) == (
        "finance",
        "outbound",
        "acme-2026",
    )
    # alice's signature, checked offline against the key record acme archived with it.
    assert message["sender_signature"] == "verified"

    # globex archived what bob read: he acknowledged it with a copy for globex's key.
    at_globex = export_and_open(net, "globex-first", "globex-2026", org=net.globex)
    assert at_globex.returncode == 0, at_globex.stderr
    [received] = [json.loads(x) for x in at_globex.stdout.splitlines()]
    assert (received["id"], received["text"], received["direction"]) == (
        envelope_id,
        FIRST,
        "inbound",
    )
    assert (received["group"], received["key_id"]) == ("partners", "globex-2026")
    # globex archived alice's key record as acme served it, signed by acme's org key.
    assert received["sender_signature"] == "verified"

    # Neither gateway's files (databases, WAL, logs, audit), nor the export, hold the text.
    report = find_plaintext(
        [
            net.acme.directory,
            net.globex.directory,
            net.dev.base / f"{ACME}.log",
            net.dev.base / f"{GLOBEX}.log",
            net.officer / "first.jsonl",
            net.officer / "globex-first.jsonl",
        ],
        [FIRST],
    )
    assert report.files > 5
    assert report.hits == ()

    # A tampered export is refused, and says why.
    tampered = net.officer / "tampered.jsonl"
    data = (net.officer / "first.jsonl").read_bytes().replace(b'"finance"', b'"finan\\u0063e"')
    tampered.write_bytes(data)
    refused = run("retention", "open", str(tampered), "--key", str(net.officer / "acme-2026.key"))
    assert refused.returncode == 1
    assert "does not match the file" in refused.stderr


def test_after_a_rotation_old_archives_open_with_the_old_key(net: Net) -> None:
    key_2027 = keygen(net.officer, "acme-2027")
    key_2026 = yaml.safe_load(net.acme.rules_path.read_text())["retention"]["key"]
    acme_rules(net.acme, net.globex, {"key": key_2027, "previous": [key_2026]})
    process = net.dev.processes[ACME].process
    assert process is not None
    process.send_signal(signal.SIGHUP)  # reload now rather than at the next look
    deadline = time.monotonic() + 30
    while True:  # the client learns the new key from GET /v1/me once the reload landed
        second = net.client("alice", "send", "--to", BOB, SECOND).strip()
        opened = export_and_open(net, f"rotated-{second}", "acme-2026", "acme-2027")
        assert opened.returncode == 0, opened.stderr
        messages = {m["id"]: m for m in map(json.loads, opened.stdout.splitlines())}
        if messages[second]["key_id"] == "acme-2027" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert messages[second]["key_id"] == "acme-2027"
    assert messages[second]["text"] == SECOND
    assert any(m["text"] == FIRST and m["key_id"] == "acme-2026" for m in messages.values())

    # With the new key alone, the new message opens and the old one does not.
    only_new = export_and_open(net, "only-new", "acme-2027")
    assert only_new.returncode == 1
    assert "no key file given for key id acme-2026" in only_new.stderr
    texts = {json.loads(x)["text"] for x in only_new.stdout.splitlines()}
    assert SECOND in texts
    assert FIRST not in texts


def test_legal_holds_are_listed_and_audited(net: Net) -> None:
    config = str(net.acme.config_path)
    assert "held" in ok("retention", "hold", "add", ALICE, "--note", "case 42", "-c", config)
    assert "already held" in ok("retention", "hold", "add", ALICE, "-c", config)
    [hold] = [
        json.loads(x) for x in ok("retention", "hold", "ls", "--json", "-c", config).splitlines()
    ]
    assert (hold["user"], hold["note"]) == (ALICE, "case 42")
    assert "hold removed" in ok("retention", "hold", "remove", ALICE, "-c", config)
    assert run("retention", "hold", "remove", ALICE, "-c", config).returncode == 1
    assert ok("retention", "hold", "ls", "-c", config) == ""
    audit = net.acme.config().audit_path.read_text()
    kinds = [json.loads(line)["kind"] for line in audit.splitlines()]
    assert kinds.count("retention_hold_added") == 1
    assert kinds.count("retention_hold_removed") == 1
    assert "retention_export" in kinds


def submit_as_alice(net: Net, envelope: Envelope) -> ClientAPIError | None:
    async def submit() -> ClientAPIError | None:
        session = ClientSession(net.acme.client_url, net.tokens["alice"], ca_file=net.acme.ca_file)
        async with session:
            try:
                await session.submit(envelope)
            except ClientAPIError as exc:
                return exc
        return None

    return trio.run(submit)


def test_a_cheating_sender_is_caught_by_the_recipient_and_a_missing_copy_by_the_origin(
    net: Net,
) -> None:
    alice = UserKeys.load(net.home / "alice.json")
    bob = UserKeys.load(net.home / "bob.json").public()
    now = int(time.time() * 1000)
    key_2026 = yaml.safe_load(net.acme.rules_path.read_text())["retention"]["key"]
    honest = seal_v2(
        b"kept out of the archive",
        sender=alice,
        recipient=bob,
        created_ms=now,
        expires_ms=now + 3_600_000,
        retention_key_id=key_2026["id"],
        retention_public_key=parse_retention_key(key_2026["public_key"]),
    )
    # A client that wraps random bytes instead of the content key, and signs it all.
    assert honest.retention is not None
    cheat = dataclasses.replace(
        honest, retention=dataclasses.replace(honest.retention, wrap=os.urandom(80))
    )
    cheat = dataclasses.replace(
        cheat, signature=SigningKey(alice.signing_seed).sign(signing_bytes(cheat)).signature
    )
    assert submit_as_alice(net, cheat) is None  # acme cannot tell: only bob's client can

    done = run(
        "client",
        "recv",
        "--wait",
        "20",
        env={
            "GATEWAY_URL": net.globex.client_url,
            "GATEWAY_TOKEN": net.tokens["bob"],
            "GATEWAY_KEYS": str(net.home / "bob.json"),
            "GATEWAY_CA": str(net.globex.ca_file),
        },
    )
    assert done.returncode != 0
    # Not shown (what else bob had waiting, from the tests before, is).
    assert cheat.id not in done.stdout
    assert "kept out of the archive" not in done.stdout
    assert f"envelope {cheat.id} from {ALICE}: REFUSED" in done.stderr
    assert "did not retain it honestly" in done.stderr
    metrics = urllib.request.urlopen(f"{net.globex.metrics_url}/metrics", timeout=10).read()
    assert (
        metric_value(
            metrics.decode(),
            "gateway_clientapi_retention_mismatch_reports_total",
            origin=ACME,
        )
        == 1
    )
    audit = [json.loads(line) for line in net.globex.config().audit_path.read_text().splitlines()]
    [report] = [r for r in audit if r["kind"] == "retention_mismatch"]
    assert (report["envelope_id"], report["sender"]) == (cheat.id, ALICE)

    # No retention copy at all, or a copy for a key the rules do not name: refused at acme.
    bare = seal_v2(
        b"no copy", sender=alice, recipient=bob, created_ms=now, expires_ms=now + 3_600_000
    )
    refused = submit_as_alice(net, bare)
    assert refused is not None
    assert (refused.status, refused.code) == (403, "retention_required")
    stranger = seal_v2(
        b"wrong key",
        sender=alice,
        recipient=bob,
        created_ms=now,
        expires_ms=now + 3_600_000,
        retention_key_id="acme-1999",
        retention_public_key=os.urandom(32),
    )
    refused = submit_as_alice(net, stranger)
    assert refused is not None
    assert (refused.status, refused.code) == (403, "retention_key_unknown")
