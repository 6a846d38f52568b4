"""A receiver refuses version 1 for a recipient under inbound retention (protocol.md §6)."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from datetime import UTC, datetime

from gateway.core.keytext import format_retention_key
from gateway.core.rules import CompiledRules, load_rules
from gateway.federation.protocol import decode_transaction, encode_transaction
from gateway.federation.receiver import judge_transaction
from gateway.pki import dev
from tests.unit.test_federation_protocol import ACME, GLOBEX, NOW, envelope


def rules() -> CompiledRules:
    pem = textwrap.indent(dev.issue_ca(GLOBEX, now=datetime.now(UTC)).cert_pem().decode(), " " * 8)
    key = format_retention_key(os.urandom(32))
    return CompiledRules(
        load_rules(
            f"""\
version: 1
org: acme.example
default: deny
retention:
  key: {{id: acme-1, public_key: "{key}"}}
peers:
  globex.example:
    endpoint: https://gw.globex.example
    signing_key: ed25519:{"A" * 43}
    ca_pem: |
{pem}
groups:
  legal:
    members: [bob]
    receive_from: [globex.example]
    retention: {{inbound: required, keep: 7y}}
  engineering:
    members: [carol]
    receive_from: [globex.example]
""",
            filename="acme.yaml",
        )
    )


def test_version_1_is_refused_for_a_recipient_under_inbound_retention_only() -> None:
    v1 = envelope()
    v2 = dataclasses.replace(envelope(), version=2, wrapped_key=os.urandom(80))
    to_carol = envelope(recipient="carol@acme.example")
    txn = decode_transaction(encode_transaction(GLOBEX, ACME, [v1, v2, to_carol]))
    verdicts = judge_transaction(txn, rules(), now_ms=NOW)
    assert [v.result for v in verdicts] == ["retention_required", "accepted", "accepted"]
    assert verdicts[0].decision is not None
    assert verdicts[0].decision.rule is not None
    assert verdicts[0].decision.rule.path == "groups.legal.retention"
