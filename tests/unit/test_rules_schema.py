"""federation_rules/schema.json means what the loader means: both accept the examples,
both reject each invalid file. Checks the schema cannot express are loader-only, below."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.core.rules import load_rules
from gateway.errors import RulesError

EXAMPLES = Path(__file__).resolve().parents[2] / "federation_rules"
SCHEMA = json.loads((EXAMPLES / "schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
BASE = (EXAMPLES / "partnership.yaml").read_text()


def schema_accepts(text: str) -> bool:
    return VALIDATOR.is_valid(yaml.safe_load(text))


def loader_accepts(text: str) -> bool:
    try:
        load_rules(text, filename="rules.yaml")
    except RulesError:
        return False
    return True


def edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def test_the_schema_is_a_valid_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_there_are_examples_of_each_kind() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {
        "partnership.yaml",
        "segmented.yaml",
        "open-to-all.yaml",
        "receive-from-group.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_both_accept_every_example(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=./schema.json")
    assert schema_accepts(text)
    assert loader_accepts(text)


MINIMAL = "version: 1\norg: acme.example\ndefault: deny\n"
SIGNING_KEY_LINE = next(line for line in BASE.splitlines() if "signing_key:" in line)
PIN_LINE = next(line for line in BASE.splitlines() if "pins:" in line)

# Each of these breaks a rule that the schema and the loader both state.
INVALID = {
    "missing-org": edit("org: acme.example\n", ""),
    "missing-groups": BASE[: BASE.index("groups:")],
    "version-2": edit("version: 1", "version: 2"),
    "default-allow": edit("default: deny ", "default: allow "),
    "unknown-root-key": edit("version: 1\n", "version: 1\ncolour: blue\n"),
    "unknown-group-key": edit("    members: [dave]", "    members: [dave]\n    sendto: []"),
    "unknown-peer-key": edit(SIGNING_KEY_LINE, SIGNING_KEY_LINE + "\n    colour: blue"),
    "unknown-limit-key": edit("burn_on_read: optional", "burn_on_read: optional\n      x: 1"),
    "unknown-ttl-key": edit("{min: 1m, default: 1d, max: 7d}", "{min: 1m, mid: 1d, max: 7d}"),
    "bad-org": edit("org: acme.example", "org: acme"),
    "bad-peer-name": edit("  globex.example:\n", "  globex_example:\n"),
    "bad-group-name": edit("  sales:\n", "  Sales:\n"),
    "members-not-list": edit("members: [dave]", "members: dave"),
    "missing-members": edit("    members: [dave]\n", "    send_to: []\n"),
    "bad-user": edit("members: [dave]", "members: [da..ve]"),
    "user-not-string": edit("members: [dave]", "members: [42]"),
    "duplicate-member": edit("members: [dave]", "members: [dave, dave]"),
    "send-to-bad-domain": edit("send_to: [globex.example]", "send_to: [globex]"),
    "send-to-group": edit("send_to: [globex.example]", "send_to: [globex.example/partners]"),
    "wildcard-not-alone": edit("send_to: [globex.example]", 'send_to: ["*", globex.example]'),
    "receive-bad-group": edit("receive_from: [globex.example]", "receive_from: [globex.example/P]"),
    "receive-wildcard-not-alone": edit(
        "receive_from: [globex.example]", 'receive_from: [globex.example, "*"]'
    ),
    "max-bytes-zero": edit("max_envelope_bytes: 65536", "max_envelope_bytes: 0"),
    "max-bytes-over-cap": edit("max_envelope_bytes: 65536", "max_envelope_bytes: 1048577"),
    "max-bytes-string": edit("max_envelope_bytes: 65536", "max_envelope_bytes: '65536'"),
    "max-bytes-bool": edit("max_envelope_bytes: 65536", "max_envelope_bytes: true"),
    "bad-duration": edit("{min: 1m, default: 1d, max: 7d}", "{min: 1 m, default: 1d, max: 7d}"),
    "duration-number": edit("{min: 1m, default: 1d, max: 7d}", "{min: 60, default: 1d, max: 7d}"),
    "bad-burn": edit("burn_on_read: optional", "burn_on_read: yes"),
    "http-endpoint": edit("https://gw.globex.example:8443", "http://gw.globex.example:8443"),
    "endpoint-query": edit("https://gw.globex.example:8443", "https://gw.globex.example/?a=1"),
    "no-ca": BASE[: BASE.index("    ca_pem: |")] + BASE[BASE.index("    # Optional: SPKI") :],
    "ca-and-ca-pem": edit("    ca_pem: |\n", "    ca: globex-ca.pem\n    ca_pem: |\n"),
    "ca-pem-not-pem": BASE[: BASE.index("    ca_pem: |")]
    + "    ca_pem: hello\n"
    + BASE[BASE.index("    # Optional: SPKI") :],
    "bad-pin": edit(PIN_LINE, '    pins: ["sha256/abc"]'),
    "pins-not-list": edit(PIN_LINE, f"    pins: {PIN_LINE.split('[')[1].rstrip(']')}"),
    "bad-signing-key": edit(SIGNING_KEY_LINE, "    signing_key: ed25519:short"),
    "missing-signing-key": edit(SIGNING_KEY_LINE + "\n", ""),
    "missing-endpoint": edit("    endpoint: https://gw.globex.example:8443\n", ""),
    "endpoints-empty": edit("endpoint: https://gw.globex.example:8443", "endpoint: []"),
    "endpoints-bad-url": edit(
        "endpoint: https://gw.globex.example:8443",
        "endpoint: [https://gw1.globex.example, http://gw2.globex.example]",
    ),
    "endpoints-duplicate": edit(
        "endpoint: https://gw.globex.example:8443",
        "endpoint: [https://gw1.globex.example, https://gw1.globex.example]",
    ),
    "endpoints-too-many": edit(
        "endpoint: https://gw.globex.example:8443",
        "endpoint: [" + ", ".join(f"https://gw{n}.globex.example" for n in range(9)) + "]",
    ),
    "groups-not-mapping": MINIMAL + "groups: []\n",
    "peers-null": MINIMAL + "peers:\ngroups: {}\n",
    "group-null": MINIMAL + "groups:\n  staff:\n",
    "members-from-no-value": edit("members: [dave]", "members_from: {claim: groups}"),
    "members-from-unknown-key": edit("members: [dave]", "members_from: {value: a, colour: b}"),
    "members-from-empty-list": edit("members: [dave]", "members_from: []"),
    "requires-empty": edit("members: [dave]", "members: [dave]\n    requires: {}"),
    "requires-unknown-key": edit("members: [dave]", "members: [dave]\n    requires: {mfa: yes}"),
}


def test_both_accept_several_endpoints_for_a_peer() -> None:
    text = edit(
        "endpoint: https://gw.globex.example:8443",
        "endpoint: [https://gw1.globex.example:8443, https://gw2.globex.example:8443]",
    )
    assert schema_accepts(text)
    assert loader_accepts(text)


def test_both_accept_members_from_and_requires() -> None:
    for change in (
        "members_from: {claim: groups, value: sales}",
        "members: [dave]\n    members_from: [{value: sales}, {claim: roles, value: Sales Team}]",
        "members: [dave]\n    requires: {acr: urn:example:mfa}",
        "members_from: {value: sales}\n    requires: {amr: [otp, hwk], acr: [mfa]}",
    ):
        text = edit("members: [dave]", change)
        assert schema_accepts(text), change
        assert loader_accepts(text), change


def test_both_accept_the_smallest_file() -> None:
    text = MINIMAL + "groups: {}\n"
    assert schema_accepts(text)
    assert loader_accepts(text)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_both_reject_each_invalid_file(name: str) -> None:
    text = INVALID[name]
    assert not schema_accepts(text), f"the schema accepts {name}"
    assert not loader_accepts(text), f"the loader accepts {name}"


# Loader-only: cross-references and meanings a JSON Schema cannot state. The schema
# accepts these files (so editors do not complain); `gateway rules check` refuses them.
LOADER_ONLY = {
    "undefined-peer": edit("send_to: [globex.example]", "send_to: [initech.example]"),
    "user-in-two-groups": edit("members: [dave]", "members: [dave, alice]"),
    "ttl-min-above-max": edit("{min: 1m, default: 1d, max: 7d}", "{min: 8d, default: 8d, max: 7d}"),
    "ttl-default-outside": edit(
        "{min: 1m, default: 1d, max: 7d}", "{min: 1m, default: 8d, max: 7d}"
    ),
    "ttl-zero": edit("{min: 1m, default: 1d, max: 7d}", "{min: 0s, default: 1d, max: 7d}"),
    "peer-is-own-org": edit("  globex.example:\n", "  acme.example:\n"),
    "ca-not-parsable": edit("      MIIB", "      XXXX"),
    "members-differ-only-in-case": edit("members: [dave]", "members: [dave, Dave]"),
    "duplicate-yaml-key": edit("  sales:\n", "  engineering:\n"),
    "claim-value-in-two-groups": edit("members: [dave]", "members_from: {value: eng}").replace(
        "members: [alice", "members_from: {value: eng}\n    members: [alice", 1
    ),
}


@pytest.mark.parametrize("name", sorted(LOADER_ONLY))
def test_loader_only_checks(name: str) -> None:
    text = LOADER_ONLY[name]
    assert not loader_accepts(text), f"the loader accepts {name}"
    if name != "duplicate-yaml-key":  # yaml.safe_load itself silently keeps the last key
        assert schema_accepts(text), f"the schema rejects {name}: move it to INVALID"
