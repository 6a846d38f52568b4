"""Canaries: no payload, ciphertext, token or private key in logs, metrics or the audit log.

Two real `gateway run` processes (acme.example logging JSON lines at debug,
globex.example readable text at debug, set in each gateway.yaml's `log:`
section). Every message carries a unique canary string as its plaintext,
sealed for real; the client tokens are the real issued ones. The flow holds
allowed envelopes (alice -> bob, alice -> dave), an outbound denial (carol's
group reaches no one), an inbound denial (erin's group may send, but globex
receives only from acme's engineering), a reload by SIGHUP, and bob fetching
and acknowledging. Then every process log, both /metrics outputs and both
audit logs are searched for each canary: the plaintexts, the tokens, the
first characters of every ciphertext, and every base64 line of the PEM
bodies of both orgs' private keys (pki/*.key, keys/org-signing.key).

So that the search is not vacuous, the test also checks that the logs hold
the decisions (JSON and text events naming the denied envelopes), that the
audit logs recorded both denials and the reload with the new rules' SHA-256,
and that `gateway audit verify` accepts both audit logs.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio

from gateway.client.api import ClientSession
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.envelope_crypto import seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "acme.example", "globex.example"
ALLOWED = 5  # alice -> bob
LOCAL = 2  # alice -> dave
TIMEOUT = 60.0  # for arrivals and audit records; generous for a slow machine
POLL = 0.2
MIN_KEY_LINE = 16  # shorter base64 lines could occur by chance
_SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]


def set_log(org: DevOrg, fmt: str) -> None:
    text = org.config_path.read_text()
    assert "\nlog:" not in text
    org.config_path.write_text(text + f"log: {{format: {fmt}, level: debug}}\n")


def canary(tag: str) -> str:
    return f"CANARY-{tag}-{uuid.uuid4().hex}"


def sealed(sender: UserKeys, recipient: Address, texts: list[str]) -> list[Envelope]:
    keys = UserKeys.generate(recipient).public()
    now = time.time_ns() // 1_000_000
    return [
        seal(
            text.encode(),
            sender=sender,
            recipient=keys,
            created_ms=now,
            expires_ms=now + 3_600_000,
        )
        for text in texts
    ]


def key_lines(directory: Path) -> list[str]:
    """The base64 lines of every private key PEM of an org's setup."""
    lines: list[str] = []
    for path in [*directory.glob("pki/*.key"), directory / "keys" / "org-signing.key"]:
        for line in path.read_text().splitlines():
            if not line.startswith("-----") and len(line.strip()) >= MIN_KEY_LINE:
                lines.append(line.strip())
    return lines


def metrics_text(proc: GatewayProcess) -> str:
    return proc.metrics()


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


async def wait_until(what: str, check: object, proc: GatewayProcess) -> None:
    assert callable(check)
    deadline = trio.current_time() + TIMEOUT
    while not await trio.to_thread.run_sync(check):
        if trio.current_time() > deadline:
            raise AssertionError(f"{what} did not happen in {TIMEOUT} s:\n{proc.log_tail()}")
        await trio.sleep(POLL)


def audit_records(org: DevOrg) -> list[dict[str, object]]:
    path = org.directory / "data" / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def session(org: DevOrg, token: str) -> ClientSession:
    return ClientSession(org.client_url, token, ca_file=org.ca_file, timeout=10.0)


async def start(proc: GatewayProcess) -> None:
    proc.start()
    await trio.to_thread.run_sync(proc.wait_ready)


async def test_no_secret_or_payload_in_logs_metrics_or_audit(tmp_path: Path) -> None:
    with DevNet(tmp_path) as net:
        acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
        acme_groups = {
            "engineering": {"members": ["alice", "dave"], "send_to": [GLOBEX]},
            "sales": {"members": ["erin"], "send_to": [GLOBEX]},
            "legal": {"members": ["carol"]},
        }
        acme.write_rules(peers=[globex], groups=acme_groups)
        globex.write_rules(
            peers=[acme],
            groups={"partners": {"members": ["bob"], "receive_from": [f"{ACME}/engineering"]}},
        )
        set_log(acme, "json")
        set_log(globex, "text")
        proc_acme, proc_globex = net.process(ACME), net.process(GLOBEX)
        await start(proc_acme)
        await start(proc_globex)
        tokens = {user: acme.issue_token(user) for user in ("alice", "carol", "erin")} | {
            "bob": globex.issue_token("bob")
        }

        alice = UserKeys.generate(Address.of("alice", ACME))
        carol = UserKeys.generate(Address.of("carol", ACME))
        erin = UserKeys.generate(Address.of("erin", ACME))
        to_bob_texts = [canary("allowed") for _ in range(ALLOWED)]
        local_texts = [canary("local") for _ in range(LOCAL)]
        carol_text, erin_text = canary("outbound-denied"), canary("inbound-denied")
        to_bob = sealed(alice, Address.of("bob", GLOBEX), to_bob_texts)
        to_dave = sealed(alice, Address.of("dave", ACME), local_texts)
        (from_carol,) = sealed(carol, Address.of("bob", GLOBEX), [carol_text])
        (from_erin,) = sealed(erin, Address.of("bob", GLOBEX), [erin_text])

        async with session(acme, tokens["alice"]) as client:
            answers = await client.submit_batch([*to_bob, *to_dave])
            assert all(a.ok for a in answers), answers
        async with session(acme, tokens["carol"]) as client:
            (denied,) = await client.submit_batch([from_carol])
            assert denied.error == "peer_not_allowed", denied
        async with session(acme, tokens["erin"]) as client:
            (queued,) = await client.submit_batch([from_erin])
            assert queued.ok, queued  # acme lets sales send; globex refuses

        # A reload by SIGHUP, with content that really changed.
        acme.write_rules(peers=[globex], groups={**acme_groups, "support": {"members": ["frank"]}})
        new_sha256 = hashlib.sha256(acme.rules_path.read_bytes()).hexdigest()
        assert proc_acme.process is not None
        proc_acme.process.send_signal(signal.SIGHUP)

        await wait_until(
            "globex accepting alice's envelopes and refusing erin's",
            lambda: (
                metric_value(
                    metrics_text(proc_globex),
                    "gateway_federation_envelopes_total",
                    direction="inbound",
                    outcome="accepted",
                )
                >= ALLOWED
                and metric_value(
                    metrics_text(proc_globex), "gateway_policy_denials_total", direction="inbound"
                )
                >= 1
            ),
            proc_globex,
        )
        async with session(globex, tokens["bob"]) as client:
            got = await client.fetch(wait=5, limit=100)
            assert {env.id for env in got} == {env.id for env in to_bob}
            await client.ack([env.id for env in got])
        await wait_until(
            "acme's audit log recording the SIGHUP reload",
            lambda: any(
                r["kind"] == "rules_reload" and r.get("trigger") == "sighup"
                for r in audit_records(acme)
            ),
            proc_acme,
        )
        metrics = {org: metrics_text(proc) for org, proc in net.processes.items()}
        assert proc_acme.stop() == 0
        assert proc_globex.stop() == 0

        # -- the search ------------------------------------------------------------------
        canaries = {
            **{f"plaintext {t}": t for t in [*to_bob_texts, *local_texts, carol_text, erin_text]},
            **{f"token of {user}": token for user, token in tokens.items()},
            **{
                f"ciphertext of {env.id}": str(env.to_json()["ciphertext"])[:40]
                for env in [*to_bob, *to_dave, from_carol, from_erin]
            },
            **{
                f"private key line of {org.org}": line
                for org in (acme, globex)
                for line in key_lines(org.directory)
            },
        }
        assert len(canaries) > ALLOWED + LOCAL + 2 + 4 + 10
        outputs = {
            "acme log": proc_acme.log_path.read_text(),
            "globex log": proc_globex.log_path.read_text(),
            "acme /metrics": metrics[ACME],
            "globex /metrics": metrics[GLOBEX],
            "acme audit log": (acme.directory / "data" / "audit.log").read_text(),
            "globex audit log": (globex.directory / "data" / "audit.log").read_text(),
        }
        leaks = [
            f"{what} found in {where}"
            for where, text in outputs.items()
            for what, secret in canaries.items()
            if secret in text
        ]
        assert not leaks, leaks
        # Plaintexts share a prefix: not even that reaches any output.
        assert not any("CANARY-" in text for text in outputs.values())

        # -- not vacuous: the decisions are there --------------------------------------
        json_events = [
            json.loads(line) for line in outputs["acme log"].splitlines() if line.startswith("{")
        ]
        assert json_events, outputs["acme log"][:2000]
        assert all("ts" in e and "level" in e for e in json_events)
        assert any(
            e.get("event") == "envelope_rejected"
            and e.get("envelope_id") == from_carol.id
            and e.get("reason") == "peer_not_allowed"
            and e.get("group") == "legal"
            for e in json_events
        )
        assert any(
            e.get("event") == "envelope_accepted" and e.get("envelope_id") == to_bob[0].id
            for e in json_events
        )
        assert any(
            e.get("event") == "rules_reload" and e.get("sha256") == new_sha256 for e in json_events
        )
        assert any(e.get("event") == "transaction_sent" for e in json_events)
        assert re.search(
            rf"event=envelope_rejected .*envelope_id={from_erin.id}", outputs["globex log"]
        ), outputs["globex log"][-3000:]

        acme_audit, globex_audit = audit_records(acme), audit_records(globex)
        assert any(
            r["kind"] == "policy_denial"
            and r["direction"] == "outbound"
            and r["envelope_id"] == from_carol.id
            and r["reason"] == "peer_not_allowed"
            and r["user"] == f"carol@{ACME}"
            for r in acme_audit
        ), acme_audit
        assert any(
            r["kind"] == "rules_reload"
            and r["trigger"] == "sighup"
            and r["result"] == "success"
            and r["sha256"] == new_sha256
            for r in acme_audit
        ), acme_audit
        assert [r["kind"] for r in acme_audit].count("token_issued") == 3
        assert any(
            r["kind"] == "policy_denial"
            and r["direction"] == "inbound"
            and r["envelope_id"] == from_erin.id
            and r["peer"] == ACME
            and r["asserted_group"] == "sales"
            for r in globex_audit
        ), globex_audit
        for org in (acme, globex):
            verify = subprocess.run(
                [*GATEWAY, "audit", "verify", str(org.directory / "data" / "audit.log")],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert verify.returncode == 0, verify.stdout + verify.stderr
            assert verify.stdout.startswith("intact: ")
