"""``gateway client`` through the console script against two real gateway processes.

alice@acme.example and bob@globex.example generate keys, publish them and
exchange a message; the JSON line of ``recv`` and the status of ``status``
are checked. Then the two refusals the client owes its user: a key record
that does not verify against the org key it trusts, and a contact whose keys
changed (refused until ``--accept-new-key``).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.core.envelope import ENVELOPE_ID_RE
from gateway.core.keytext import format_signing_key
from gateway.devnet import DevNet, DevOrg

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(sys.executable).parent / "gateway")
ACME, GLOBEX = "acme.example", "globex.example"
ALICE, BOB = f"alice@{ACME}", f"bob@{GLOBEX}"
COMMAND_TIMEOUT = 60
STATUS_ATTEMPTS = 50


@dataclass
class Net:
    acme: DevOrg
    globex: DevOrg
    tokens: dict[str, str]
    home: Path

    def env(self, user: str, keys: str | None = None) -> dict[str, str]:
        org = self.acme if user == "alice" else self.globex
        return {
            "GATEWAY_URL": org.client_url,
            "GATEWAY_TOKEN": self.tokens[user],
            "GATEWAY_KEYS": str(self.home / (keys or f"{user}.json")),
            "GATEWAY_CA": str(org.ca_file),
        }

    def client(
        self, user: str, *args: str, keys: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GATEWAY, "client", *args],
            env={**os.environ, **self.env(user, keys)},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def ok(self, user: str, *args: str, keys: str | None = None) -> str:
        done = self.client(user, *args, keys=keys)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    base = tmp_path_factory.mktemp("cli-client")
    with DevNet(base) as dev:
        acme, globex = dev.add_org(ACME), dev.add_org(GLOBEX)
        acme.write_rules(
            peers=[globex],
            groups={
                "engineering": {"members": ["alice"], "send_to": [GLOBEX], "receive_from": [GLOBEX]}
            },
        )
        globex.write_rules(
            peers=[acme],
            groups={"partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]}},
        )
        dev.start(ACME)
        dev.start(GLOBEX)
        home = base / "home"
        home.mkdir(mode=0o700)
        tokens = {"alice": acme.issue_token("alice"), "bob": globex.issue_token("bob")}
        net = Net(acme, globex, tokens, home)
        for user, address in (("alice", ALICE), ("bob", BOB)):
            public = json.loads(net.ok(user, "keygen", "--user", address))
            assert public["address"] == address
            assert stat.S_IMODE((home / f"{user}.json").stat().st_mode) == 0o600
            assert "published the keys of" in net.ok(user, "publish")
        yield net


def recv_lines(net: Net, user: str, *, keys: str | None = None) -> list[dict[str, object]]:
    out = net.ok(user, "recv", "--wait", "20", keys=keys)
    return [json.loads(line) for line in out.splitlines()]


def test_send_recv_and_status_through_two_gateways(net: Net) -> None:
    envelope_id = net.ok("alice", "send", "--to", BOB, "hello bob, über mTLS").strip()
    assert ENVELOPE_ID_RE.fullmatch(envelope_id)
    contacts = net.home / "alice.contacts.json"
    assert stat.S_IMODE(contacts.stat().st_mode) == 0o600
    assert BOB in json.loads(contacts.read_text())["contacts"]

    [line] = recv_lines(net, "bob")
    assert set(line) == {"id", "from", "sent", "text"}
    assert (line["id"], line["from"], line["text"]) == (envelope_id, ALICE, "hello bob, über mTLS")
    assert isinstance(line["sent"], str)
    assert line["sent"].endswith("Z")

    for _ in range(STATUS_ATTEMPTS):  # forwarded once globex answered the transaction
        status = json.loads(net.ok("alice", "status", envelope_id))
        if status["status"] == "forwarded":
            break
    assert status["id"] == envelope_id
    assert status["status"] == "forwarded"

    # Acknowledged by recv: a second recv finds nothing.
    assert net.ok("bob", "recv") == ""

    # The answer, burn-on-read, with an explicit TTL.
    reply = net.ok("bob", "send", "--to", ALICE, "--ttl", "1h", "--burn-on-read", "hi").strip()
    [line] = recv_lines(net, "alice")
    assert (line["id"], line["from"], line["text"]) == (reply, BOB, "hi")


def test_a_record_not_signed_by_the_trusted_org_key_is_refused(net: Net) -> None:
    wrong = format_signing_key(bytes(range(32)))
    done = net.client("alice", "send", "--to", BOB, "--org-key", f"{GLOBEX}={wrong}", "secret")
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"the key record of {BOB} is NOT signed by {GLOBEX}" in done.stderr
    assert "the key you pinned" in done.stderr
    # The right key, pinned by hand, works like the rules' key.
    right = net.globex.card().split("signing_key:")[1].split()[0]
    net.ok("alice", "send", "--to", BOB, "--org-key", f"{GLOBEX}={right}", "pinned")
    assert [line["text"] for line in recv_lines(net, "bob")] == ["pinned"]


def test_a_changed_key_is_refused_until_accepted(net: Net) -> None:
    net.ok("alice", "send", "--to", BOB, "before")  # alice knows bob's first keys
    assert [line["text"] for line in recv_lines(net, "bob")] == ["before"]

    # bob sets up a new device: new keys, published in place of the old ones.
    net.ok("bob", "keygen", "--user", BOB, keys="bob-new.json")
    net.ok("bob", "publish", keys="bob-new.json")

    refused = net.client("alice", "send", "--to", BOB, "after")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert f"the keys of {BOB} have CHANGED" in refused.stderr
    assert "--accept-new-key" in refused.stderr
    again = net.client("alice", "send", "--to", BOB, "after")
    assert again.returncode == 1, "a refusal must not be remembered as acceptance"

    envelope_id = net.ok("alice", "send", "--to", BOB, "--accept-new-key", "after").strip()
    [line] = recv_lines(net, "bob", keys="bob-new.json")
    assert (line["id"], line["text"]) == (envelope_id, "after")
    net.ok("alice", "send", "--to", BOB, "and again")  # the new keys are the known ones now
    assert [line["text"] for line in recv_lines(net, "bob", keys="bob-new.json")] == ["and again"]


def test_missing_settings_are_usage_errors(net: Net) -> None:
    done = subprocess.run(
        [GATEWAY, "client", "status", "AAAAAAAAAAAAAAAAAAAAAA"],
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert "give --server or set GATEWAY_URL" in done.stderr
