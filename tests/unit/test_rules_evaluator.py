"""The evaluator: every reason code, the rule that decided, and the order of the checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.address import Address
from gateway.core.rules import CompiledRules, Direction, Mark, load_rules
from gateway.errors import Reason

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "federation_rules"
POLICY_REASONS = (
    Reason.ALLOWED,
    Reason.NO_GROUP,
    Reason.PEER_NOT_ALLOWED,
    Reason.UNKNOWN_PEER,
    Reason.RECIPIENT_UNKNOWN,
    Reason.SENDER_NOT_ORIGIN,
    Reason.RECIPIENT_NOT_LOCAL,
    Reason.TOO_LARGE,
    Reason.TTL_OUT_OF_BOUNDS,
    Reason.BURN_ON_READ_REQUIRED,
    Reason.BURN_ON_READ_FORBIDDEN,
)
FILE = "rules.yaml"


def peer_block(org: str) -> str:
    """A peers entry for ``org``, with a real (public) CA certificate from the examples."""
    example = yaml.safe_load((EXAMPLES / "partnership.yaml").read_text())
    entry = example["peers"]["globex.example"]
    pem = "".join(f"      {line}\n" for line in entry["ca_pem"].splitlines())
    return (
        f"  {org}:\n    endpoint: https://gw.{org}\n    ca_pem: |\n{pem}"
        f"    signing_key: {entry['signing_key']}\n"
    )


# Groups first so that their line numbers do not depend on the PEMs below them.
TEXT = f"""\
version: 1
org: acme.example
default: deny
groups:
  engineering:
    members: [alice, bob]
    send_to: [globex.example]
    receive_from: [globex.example/partners, initech.example]
    limits:
      max_envelope_bytes: 1000
      ttl: {{min: 1m, default: 1h, max: 1d}}
  support:
    members: [erin]
    send_to: ["*"]
    receive_from: ["*"]
    limits:
      burn_on_read: required
  legal:
    members: [carol]
    limits:
      burn_on_read: forbidden
peers:
{peer_block("globex.example")}{peer_block("initech.example")}{peer_block("umbrella.example")}"""


@pytest.fixture(scope="module")
def rules() -> CompiledRules:
    return CompiledRules(load_rules(TEXT, filename=FILE))


def a(text: str) -> Address:
    return Address.parse(text)


def out(rules: CompiledRules, sender: str, recipient: str, **kw: object) -> object:
    options: dict[str, object] = {"size": 100, "ttl_seconds": 3600, "burn_on_read": False}
    options.update(kw)
    return rules.decide_outbound(a(sender), a(recipient), **options)  # type: ignore[arg-type]


def into(rules: CompiledRules, sender: str, recipient: str, **kw: object) -> object:
    options: dict[str, object] = {
        "asserted_group": None,
        "size": 100,
        "ttl_seconds": 3600,
        "burn_on_read": True,
    }
    options.update(kw)
    origin = str(options.pop("origin", a(sender).org))
    return rules.decide_inbound(origin, a(sender), a(recipient), **options)  # type: ignore[arg-type]


def check(
    decision: object, allowed: bool, reason: Reason, line: int | None, path: str = ""
) -> None:
    assert decision.allowed is allowed  # type: ignore[attr-defined]
    assert decision.reason is reason  # type: ignore[attr-defined]
    expected = None if line is None else Mark(FILE, line, path)
    assert decision.rule == expected  # type: ignore[attr-defined]


# -- outbound --------------------------------------------------------------------------
def test_outbound_allowed_by_a_send_to_entry(rules: CompiledRules) -> None:
    decision = out(rules, "alice@acme.example", "bob@globex.example")
    check(decision, True, Reason.ALLOWED, 7, "groups.engineering.send_to[0]")
    assert decision.direction is Direction.OUTBOUND  # type: ignore[attr-defined]
    assert decision.direction == "outbound"  # type: ignore[attr-defined]
    assert decision.group == "engineering"  # type: ignore[attr-defined]
    assert decision.peer == "globex.example"  # type: ignore[attr-defined]


def test_outbound_allowed_decisions_are_prepared_once(rules: CompiledRules) -> None:
    first = out(rules, "alice@acme.example", "x@globex.example")
    assert out(rules, "bob@acme.example", "y@globex.example") is first


def test_outbound_wildcard_reaches_every_peer_and_only_peers(rules: CompiledRules) -> None:
    for peer in ("globex.example", "initech.example", "umbrella.example"):
        decision = out(rules, "erin@acme.example", f"bob@{peer}", burn_on_read=True)
        check(decision, True, Reason.ALLOWED, 14, "groups.support.send_to[0]")
        assert decision.peer == peer  # type: ignore[attr-defined]
    check(
        out(rules, "erin@acme.example", "bob@stranger.example", burn_on_read=True),
        False,
        Reason.UNKNOWN_PEER,
        3,
        "default",
    )


def test_outbound_denials(rules: CompiledRules) -> None:
    check(
        out(rules, "alice@acme.example", "bob@initech.example"),
        False,
        Reason.PEER_NOT_ALLOWED,
        7,
        "groups.engineering.send_to",
    )
    check(
        out(rules, "carol@acme.example", "bob@globex.example"),
        False,
        Reason.PEER_NOT_ALLOWED,
        18,
        "groups.legal",
    )
    check(
        out(rules, "zed@acme.example", "bob@globex.example"), False, Reason.NO_GROUP, 3, "default"
    )
    check(
        out(rules, "alice@globex.example", "bob@globex.example"),
        False,
        Reason.SENDER_NOT_ORIGIN,
        None,
    )
    check(
        out(rules, "alice@acme.example", "bob@stranger.example"),
        False,
        Reason.UNKNOWN_PEER,
        3,
        "default",
    )


def test_outbound_limits_of_the_sender_group(rules: CompiledRules) -> None:
    limits = "groups.engineering.limits"
    check(
        out(rules, "alice@acme.example", "bob@globex.example", size=1001),
        False,
        Reason.TOO_LARGE,
        10,
        f"{limits}.max_envelope_bytes",
    )
    assert out(rules, "alice@acme.example", "bob@globex.example", size=1000).allowed  # type: ignore[attr-defined]
    for ttl in (59, 86401, 0, -5):
        check(
            out(rules, "alice@acme.example", "bob@globex.example", ttl_seconds=ttl),
            False,
            Reason.TTL_OUT_OF_BOUNDS,
            11,
            f"{limits}.ttl",
        )
    for ttl in (60, 86400):
        assert out(rules, "alice@acme.example", "b@globex.example", ttl_seconds=ttl).allowed  # type: ignore[attr-defined]
    check(
        out(rules, "erin@acme.example", "bob@globex.example", burn_on_read=False),
        False,
        Reason.BURN_ON_READ_REQUIRED,
        17,
        "groups.support.limits.burn_on_read",
    )
    check(
        out(rules, "carol@acme.example", "erin@acme.example", burn_on_read=True),
        False,
        Reason.BURN_ON_READ_FORBIDDEN,
        21,
        "groups.legal.limits.burn_on_read",
    )


def test_default_limits_point_at_the_group(rules: CompiledRules) -> None:
    decision = out(rules, "erin@acme.example", "bob@globex.example", size=70000, burn_on_read=True)
    check(decision, False, Reason.TOO_LARGE, 12, "groups.support (default limits)")
    assert decision.detail == (  # type: ignore[attr-defined]
        "70000 bytes is over max_envelope_bytes 65536 of group support"
    )


def test_policy_is_checked_before_limits(rules: CompiledRules) -> None:
    decision = out(rules, "alice@acme.example", "bob@initech.example", size=10**6)
    assert decision.reason is Reason.PEER_NOT_ALLOWED  # type: ignore[attr-defined]


# -- local -----------------------------------------------------------------------------
def test_local_delivery_between_users_in_the_rules(rules: CompiledRules) -> None:
    decision = out(rules, "carol@acme.example", "alice@acme.example")
    check(decision, True, Reason.ALLOWED, 18, "groups.legal")
    assert decision.direction is Direction.LOCAL  # type: ignore[attr-defined]
    check(
        out(rules, "carol@acme.example", "zed@acme.example"),
        False,
        Reason.RECIPIENT_UNKNOWN,
        3,
        "default",
    )
    # the sender's group limits apply
    check(
        out(rules, "alice@acme.example", "carol@acme.example", size=5000),
        False,
        Reason.TOO_LARGE,
        10,
        "groups.engineering.limits.max_envelope_bytes",
    )


# -- inbound ---------------------------------------------------------------------------
def test_inbound_by_whole_peer_and_by_asserted_group(rules: CompiledRules) -> None:
    check(
        into(rules, "x@initech.example", "alice@acme.example", burn_on_read=False),
        True,
        Reason.ALLOWED,
        8,
        "groups.engineering.receive_from[1]",
    )
    check(
        into(
            rules,
            "x@globex.example",
            "alice@acme.example",
            asserted_group="partners",
            burn_on_read=False,
        ),
        True,
        Reason.ALLOWED,
        8,
        "groups.engineering.receive_from[0]",
    )
    for group in (None, "sales"):
        decision = into(
            rules,
            "x@globex.example",
            "alice@acme.example",
            asserted_group=group,
            burn_on_read=False,
        )
        check(decision, False, Reason.PEER_NOT_ALLOWED, 8, "groups.engineering.receive_from")
        assert decision.direction is Direction.INBOUND  # type: ignore[attr-defined]
        assert decision.group == "engineering"  # type: ignore[attr-defined]


def test_inbound_wildcard_and_segmented_group(rules: CompiledRules) -> None:
    check(
        into(rules, "x@umbrella.example", "erin@acme.example"),
        True,
        Reason.ALLOWED,
        15,
        "groups.support.receive_from[0]",
    )
    check(
        into(rules, "x@globex.example", "carol@acme.example", burn_on_read=False),
        False,
        Reason.PEER_NOT_ALLOWED,
        18,
        "groups.legal",
    )


def test_inbound_denials_in_order(rules: CompiledRules) -> None:
    check(
        into(rules, "x@stranger.example", "erin@acme.example"),
        False,
        Reason.UNKNOWN_PEER,
        3,
        "default",
    )
    check(
        into(rules, "x@initech.example", "erin@acme.example", origin="globex.example"),
        False,
        Reason.SENDER_NOT_ORIGIN,
        None,
    )
    check(
        into(rules, "x@globex.example", "erin@initech.example"),
        False,
        Reason.RECIPIENT_NOT_LOCAL,
        None,
    )
    check(
        into(rules, "x@globex.example", "zed@acme.example"),
        False,
        Reason.RECIPIENT_UNKNOWN,
        3,
        "default",
    )


def test_inbound_limits_are_the_recipient_group_s(rules: CompiledRules) -> None:
    check(
        into(rules, "x@initech.example", "alice@acme.example", size=1001, burn_on_read=False),
        False,
        Reason.TOO_LARGE,
        10,
        "groups.engineering.limits.max_envelope_bytes",
    )
    check(
        into(rules, "x@initech.example", "erin@acme.example", burn_on_read=False),
        False,
        Reason.BURN_ON_READ_REQUIRED,
        17,
        "groups.support.limits.burn_on_read",
    )


# -- lookups ---------------------------------------------------------------------------
def test_lookups(rules: CompiledRules) -> None:
    group = rules.group_of("alice")
    assert group is not None
    assert group.name == "engineering"
    assert rules.group_of("zed") is None
    assert rules.peer("globex.example") is not None
    assert rules.peer("stranger.example") is None
    assert set(rules.peers) == {"globex.example", "initech.example", "umbrella.example"}
    assert rules.default_ttl("engineering") == 3600
    assert rules.default_ttl("legal") == 86400
    with pytest.raises(KeyError):
        rules.default_ttl("nobody")


USERS = st.sampled_from(["alice", "bob", "carol", "erin", "zed"])
ORGS = st.sampled_from(
    ["acme.example", "globex.example", "initech.example", "umbrella.example", "x.example"]
)


@given(
    USERS,
    ORGS,
    USERS,
    ORGS,
    st.sampled_from([None, "partners", "sales"]),
    st.integers(0, 2**21),
    st.integers(-10, 10**7),
    st.booleans(),
)
def test_decisions_are_total_and_consistent(
    rules: CompiledRules,
    sender_user: str,
    sender_org: str,
    recipient_user: str,
    recipient_org: str,
    group: str | None,
    size: int,
    ttl: int,
    burn: bool,
) -> None:
    sender, recipient = Address(sender_user, sender_org), Address(recipient_user, recipient_org)
    outbound = rules.decide_outbound(
        sender, recipient, size=size, ttl_seconds=ttl, burn_on_read=burn
    )
    inbound = rules.decide_inbound(
        sender_org,
        sender,
        recipient,
        asserted_group=group,
        size=size,
        ttl_seconds=ttl,
        burn_on_read=burn,
    )
    for decision in (outbound, inbound):
        assert decision.reason in POLICY_REASONS
        assert decision.allowed is (decision.reason is Reason.ALLOWED)
        assert decision.detail
        if decision.allowed:
            limits = rules.rules.groups[decision.group].limits  # type: ignore[index]
            assert size <= limits.max_envelope_bytes
            assert limits.ttl.min <= ttl <= limits.ttl.max
    if outbound.allowed:
        assert sender_org == "acme.example"
        assert rules.group_of(sender_user) is not None
    if inbound.allowed:
        assert recipient_org == "acme.example"
        assert sender_org != "acme.example"
        assert rules.group_of(recipient_user) is not None


def test_every_policy_reason_is_documented() -> None:
    guide = (ROOT / "docs" / "rules.md").read_text()
    for reason in (*POLICY_REASONS, Reason.RULES):
        assert f"| `{reason.value}` |" in guide, reason
