"""Retention in the rules: the org's keys, each group's retention, and what explain and diff say."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.cli.rules import explain, render_decision
from gateway.core.address import Address
from gateway.core.durations import format_period, parse_period
from gateway.core.envelope import RetentionWrap
from gateway.core.keytext import format_retention_key, parse_retention_key
from gateway.core.rules import CompiledRules, diff_rules, format_diff, load_rules
from gateway.core.rules.model import GroupRetention
from gateway.errors import Reason, RulesError

EXAMPLES = Path(__file__).resolve().parents[2] / "federation_rules"
EXAMPLE = (EXAMPLES / "retention.yaml").read_text()
VALIDATOR = jsonschema.Draft202012Validator(json.loads((EXAMPLES / "schema.json").read_text()))
KEY_2026 = "x25519:eaYx7t4b-cmPEgMs3q3Q56B5OY_HhriMyEbsia-FpRo"
KEY_2025 = "x25519:OS0XSjizsb6vrx_oJIcIQcX6UxvG6v22QCwSRmRIjBw"
ALICE = Address.parse("alice@acme.example")
CAROL = Address.parse("carol@acme.example")
BOB = Address.parse("bob@globex.example")

# Line numbers matter: the tests below point into this text.
BASE = f"""\
version: 1
org: acme.example
default: deny
retention:
  key: {{id: acme-2026, public_key: "{KEY_2026}"}}
  previous:
    - {{id: acme-2025, public_key: "{KEY_2025}"}}
groups:
  finance:
    members: [alice]
    retention: {{outbound: required, inbound: off, keep: 7y}}
  engineering:
    members: [carol]
"""


def load(text: str):  # type: ignore[no-untyped-def]
    return load_rules(text, filename="r.yaml")


def issues(text: str) -> list[str]:
    with pytest.raises(RulesError) as info:
        load(text)
    return list(info.value.issues)


def edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


# -- loading ---------------------------------------------------------------------


def test_the_example_loads_and_the_schema_accepts_it() -> None:
    rules = load_rules(EXAMPLE, filename="retention.yaml")
    assert rules.retention is not None
    assert rules.retention.key.id == "acme-2026"
    assert [key.id for key in rules.retention.previous] == ["acme-2025"]
    finance = rules.groups["finance"].retention
    assert (finance.outbound, finance.inbound, finance.keep) == (True, True, 7 * 365 * 86400)
    assert rules.groups["engineering"].retention == GroupRetention()
    assert VALIDATOR.is_valid(yaml.safe_load(EXAMPLE))


def test_base_loads_with_marks() -> None:
    rules = load(BASE)
    assert rules.retention is not None
    assert rules.retention.key.public_key == parse_retention_key(KEY_2026)
    assert rules.retention.mark is not None
    assert rules.retention.mark.line == 4
    finance = rules.groups["finance"].retention
    assert finance.outbound
    assert not finance.inbound  # `off` is read as YAML false and means off
    assert finance.mark is not None
    assert finance.mark.line == 11
    assert rules.retention.accepts("acme-2025", parse_retention_key(KEY_2025))
    assert not rules.retention.accepts("acme-2025", parse_retention_key(KEY_2026))
    assert not rules.retention.accepts("acme-2027", parse_retention_key(KEY_2026))


def test_layout_does_not_change_equality() -> None:
    flowing = load(BASE)
    block = load(
        edit(
            "    retention: {outbound: required, inbound: off, keep: 7y}\n",
            "    retention:\n      outbound: required\n      keep: 7y\n",
        )
    )
    assert flowing == block


INVALID = {
    "unknown org key": (
        edit("  previous:\n", "  previuos:\n"),
        "r.yaml:6:3: retention.previuos: unknown key 'previuos'; did you mean 'previous'?",
    ),
    "no current key": (
        edit(f'  key: {{id: acme-2026, public_key: "{KEY_2026}"}}\n', ""),
        "r.yaml:4:1: retention.key: missing required key 'key'",
    ),
    "bad key id": (
        edit("id: acme-2026", "id: -acme"),
        "r.yaml:5:13: retention.key.id: invalid retention key id '-acme'",
    ),
    "bad public key": (
        edit(KEY_2025, "x25519:short"),
        "r.yaml:7:35: retention.previous[0].public_key: invalid retention key 'x25519:short'",
    ),
    "an ed25519 key": (
        edit(KEY_2026, "ed25519:" + KEY_2026.removeprefix("x25519:")),
        "r.yaml:5:36: retention.key.public_key: invalid retention key",
    ),
    "id used twice": (
        edit("id: acme-2025", "id: acme-2026"),
        "r.yaml:7:12: retention.previous[0].id: retention key id 'acme-2026' is used twice "
        "(first at line 5)",
    ),
    "previous not a list": (
        edit(f'    - {{id: acme-2025, public_key: "{KEY_2025}"}}\n', "    7\n").replace(
            "  previous:\n    7", "  previous: 7"
        ),
        "r.yaml:6:13: retention.previous: expected the previous retention keys (a list), "
        "got integer 7",
    ),
    "bad direction": (
        edit("outbound: required", "outbound: always"),
        "r.yaml:11:27: groups.finance.retention.outbound: expected one of required, off; "
        "got string 'always'",
    ),
    "keep missing": (
        edit(", keep: 7y", ""),
        "r.yaml:11:5: groups.finance.retention.keep: missing required key 'keep'",
    ),
    "keep in hours": (
        edit("keep: 7y", "keep: 7h"),
        "r.yaml:11:57: groups.finance.retention.keep: invalid period '7h'",
    ),
    "keep too long": (
        edit("keep: 7y", "keep: 101y"),
        "r.yaml:11:57: groups.finance.retention.keep: 101y is out of range 1d-100y",
    ),
    "keep without a direction": (
        edit("outbound: required", "outbound: off"),
        "r.yaml:11:52: groups.finance.retention.keep: keep without outbound or inbound",
    ),
    "unknown group key": (
        edit("inbound: off", "inbound: off, archive: yes"),
        "r.yaml:11:51: groups.finance.retention.archive: unknown key 'archive'",
    ),
    "no org section": (
        "".join(
            line
            for line in BASE.splitlines(keepends=True)
            if not line.startswith(("retention:", "  key:", "  previous:", "    - {id"))
        ),
        "r.yaml:7:5: groups.finance.retention: retention is required here, but the rules have "
        "no org-level retention: section",
    ),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_errors_name_line_column_and_key(name: str) -> None:
    text, expected = INVALID[name]
    found = issues(text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


@pytest.mark.parametrize("name", sorted(INVALID))
def test_the_schema_refuses_what_the_loader_refuses(name: str) -> None:
    text, _ = INVALID[name]
    if name in {"id used twice", "keep too long", "keep without a direction", "no org section"}:
        return  # loader-only checks (docs/rules.md)
    assert not VALIDATOR.is_valid(yaml.safe_load(text))


def test_the_schema_accepts_base() -> None:
    assert VALIDATOR.is_valid(yaml.safe_load(BASE))


def test_periods_and_key_text() -> None:
    assert parse_period("7y") == 7 * 365 * 86400
    assert parse_period("12w") == 12 * 7 * 86400
    assert format_period(parse_period("90d")) == "90d"
    assert format_period(parse_period("14d")) == "2w"
    for bad in ("7", "1.5y", "7 y", "-1d", "7m", ""):
        with pytest.raises(ValueError, match="invalid period"):
            parse_period(bad)
    raw = parse_retention_key(KEY_2026)
    assert format_retention_key(raw) == KEY_2026
    with pytest.raises(ValueError, match="canonical"):
        parse_retention_key(KEY_2026[:-1] + "B")  # non-zero unused bits


# -- deciding ----------------------------------------------------------------------


def wrap(key_id: str, key: str) -> RetentionWrap:
    return RetentionWrap(key_id, parse_retention_key(key), bytes(80))


@pytest.fixture(scope="module")
def compiled() -> CompiledRules:
    return CompiledRules(load_rules(EXAMPLE, filename="retention.yaml"))


def outbound(compiled: CompiledRules, sender: Address, recipient: Address = BOB):  # type: ignore[no-untyped-def]
    return compiled.decide_outbound(sender, recipient, size=10, ttl_seconds=3600, burn_on_read=True)


def test_a_retained_group_needs_a_copy_for_a_known_key(compiled: CompiledRules) -> None:
    allowed = outbound(compiled, ALICE)
    assert allowed.allowed
    assert compiled.decide_retention(allowed, wrap("acme-2026", KEY_2026)) is allowed
    assert compiled.decide_retention(allowed, wrap("acme-2025", KEY_2025)) is allowed
    missing = compiled.decide_retention(allowed, None)
    assert not missing.allowed
    assert missing.reason is Reason.RETENTION_REQUIRED
    assert missing.rule is not None
    assert missing.rule.path == "groups.finance.retention"
    for bad in (wrap("acme-2027", KEY_2026), wrap("acme-2026", KEY_2025)):
        refused = compiled.decide_retention(allowed, bad)
        assert refused.reason is Reason.RETENTION_KEY_UNKNOWN
        assert refused.rule is not None
        assert refused.rule.path == "retention"


def test_local_delivery_is_retained_too(compiled: CompiledRules) -> None:
    local = outbound(compiled, ALICE, CAROL)
    assert local.allowed
    assert compiled.decide_retention(local, None).reason is Reason.RETENTION_REQUIRED


def test_other_groups_and_denials_are_untouched(compiled: CompiledRules) -> None:
    carol = outbound(compiled, CAROL)
    assert compiled.decide_retention(carol, None) is carol
    denied = outbound(compiled, ALICE, Address.parse("x@initech.example"))
    assert compiled.decide_retention(denied, None) is denied
    inbound = compiled.decide_inbound(
        "globex.example",
        BOB,
        ALICE,
        asserted_group=None,
        size=1,
        ttl_seconds=60,
        burn_on_read=False,
    )
    assert compiled.decide_retention(inbound, None) is inbound


def test_explain_says_what_retention_does(compiled: CompiledRules) -> None:
    decision = explain(compiled, ALICE, BOB, burn_on_read=True)
    assert decision.allowed
    note = compiled.retention_note(decision)
    assert note is not None
    lines = render_decision(decision, ALICE, BOB, note)
    assert lines[-1].startswith("retention: group finance is under outbound retention")
    assert "acme-2026" in lines[-1]
    assert "kept 7y, whatever burn-on-read and the TTL say" in lines[-1]
    refused = explain(compiled, ALICE, BOB, with_retention=False)
    assert refused.reason is Reason.RETENTION_REQUIRED
    assert compiled.retention_note(explain(compiled, CAROL, BOB)) is None
    inbound = explain(compiled, BOB, ALICE)
    inbound_note = compiled.retention_note(inbound)
    assert inbound_note is not None
    assert "inbound retention" in inbound_note


# -- diff ------------------------------------------------------------------------------


def test_diff_shows_retention_changes() -> None:
    old = load(BASE)
    rotated = load(
        BASE.replace("id: acme-2026", "id: acme-2027")
        .replace("inbound: off", "inbound: required")
        .replace("keep: 7y", "keep: 10y")
    )
    lines = format_diff(diff_rules(old, rotated))
    assert lines == [
        "~ retention org: key acme-2026 -> acme-2027",
        "~ retention finance: inbound off -> required",
        "~ retention finance: keep 7y -> 10y",
    ]
    assert not diff_rules(old, old).changed
    rekeyed = load(BASE.replace(KEY_2026, KEY_2025).replace(f'"{KEY_2025}"}}\n', '"x"}\n', 0))
    assert format_diff(diff_rules(old, rekeyed)) == [
        "~ retention org: key acme-2026 -> acme-2026 (another public key)"
    ]


def test_a_recipient_under_inbound_retention_receives_version_2_only(
    compiled: CompiledRules,
) -> None:
    # finance (alice) is under inbound retention in the example; engineering (carol) is not.
    inbound = compiled.decide_inbound(
        "globex.example",
        BOB,
        ALICE,
        asserted_group=None,
        size=1,
        ttl_seconds=60,
        burn_on_read=False,
    )
    assert compiled.decide_recipient_retention(inbound, ALICE, version=2) is inbound
    refused = compiled.decide_recipient_retention(inbound, ALICE, version=1)
    assert refused.reason is Reason.RETENTION_REQUIRED
    assert refused.rule is not None
    assert refused.rule.path == "groups.finance.retention"
    local = outbound(compiled, CAROL, ALICE)
    assert compiled.decide_recipient_retention(local, ALICE, version=1).reason is (
        Reason.RETENTION_REQUIRED
    )
    to_carol = outbound(compiled, ALICE, CAROL)
    assert compiled.decide_recipient_retention(to_carol, CAROL, version=1) is to_carol
    assert compiled.decide_recipient_retention(to_carol, BOB, version=1) is to_carol


def test_explain_asks_about_version_1_envelopes(compiled: CompiledRules) -> None:
    assert explain(compiled, ALICE, BOB, envelope_version=1).reason is Reason.RETENTION_REQUIRED
    assert explain(compiled, BOB, ALICE, envelope_version=1).reason is Reason.RETENTION_REQUIRED
    assert explain(compiled, BOB, ALICE).allowed
    # carol's group is under no retention: version 1 goes both ways.
    assert explain(compiled, CAROL, BOB, envelope_version=1).allowed
    assert explain(compiled, BOB, CAROL, envelope_version=1).allowed
