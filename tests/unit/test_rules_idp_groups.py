"""Groups whose members come from the IdP (`members_from`) and sign-in strength (`requires`).

The rules side (loader, evaluator) and :func:`gateway.oidc.sessions.admit`,
which turns them into a sign-in decision with a reason the client shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.rules import ClaimMatch, CompiledRules, SignInRequirement, load_rules
from gateway.errors import Reason, RulesError, SignInError
from gateway.oidc.sessions import admit

RULES = """\
version: 1
org: acme.example
default: deny
groups:
  engineering:
    members: [alice, bob]
    members_from: {claim: groups, value: engineering}
  legal:
    members_from: [{value: legal}, {claim: roles, value: Counsel}]
  secure:
    members: [erin]
    members_from: {value: secure}
    requires: {acr: urn:example:mfa, amr: [otp, hwk]}
"""


def compiled(text: str = RULES) -> CompiledRules:
    return CompiledRules(load_rules(text, filename="rules.yaml"))


def issues(text: str) -> list[str]:
    with pytest.raises(RulesError) as caught:
        load_rules(text, filename="rules.yaml")
    return caught.value.issues


def test_the_model() -> None:
    rules = compiled()
    legal = rules.group("legal")
    assert legal is not None
    assert legal.members == ()
    assert legal.members_from == (ClaimMatch("groups", "legal"), ClaimMatch("roles", "Counsel"))
    secure = rules.group("secure")
    assert secure is not None
    assert secure.requires == SignInRequirement(acr=("urn:example:mfa",), amr=("otp", "hwk"))
    assert str(secure.requires) == "acr urn:example:mfa, or amr containing otp or hwk"


def test_groups_for() -> None:
    rules = compiled()
    assert [g.name for g in rules.groups_for("carol", {"groups": frozenset({"legal"})})] == [
        "legal"
    ]
    assert [g.name for g in rules.groups_for("carol", {"roles": frozenset({"Counsel"})})] == [
        "legal"
    ]
    assert rules.groups_for("carol", {"groups": frozenset({"sales"})}) == ()
    # alice is named in engineering and has its claim too: one group
    both = rules.groups_for("alice", {"groups": frozenset({"engineering"})})
    assert [g.name for g in both] == ["engineering"]
    conflict = rules.groups_for("alice", {"groups": frozenset({"legal"})})
    assert [g.name for g in conflict] == ["engineering", "legal"]


def test_admit_reasons() -> None:
    rules = compiled()
    no_mfa: tuple[str, ...] = ("pwd",)
    legal = admit(rules, "carol", claims={"groups": frozenset({"legal"})}, acr=None, amr=no_mfa)
    assert legal.name == "legal"

    with pytest.raises(SignInError) as none:
        admit(rules, "zed", claims={"groups": frozenset({"sales"})}, acr=None, amr=())
    assert none.value.reason is Reason.NO_GROUP
    assert "IdP claims groups: ['sales'] match none" in none.value.message

    with pytest.raises(SignInError) as two:
        admit(rules, "alice", claims={"groups": frozenset({"legal"})}, acr=None, amr=())
    assert two.value.reason is Reason.GROUP_CONFLICT
    assert "engineering (named in members)" in two.value.message
    assert "legal (IdP claim groups=legal)" in two.value.message

    with pytest.raises(SignInError) as weak:
        admit(rules, "erin", claims={}, acr="urn:example:pwd", amr=no_mfa)
    assert weak.value.reason is Reason.MFA_REQUIRED
    assert "group secure requires a stronger sign-in" in weak.value.message
    assert "acr urn:example:pwd" in weak.value.message
    assert admit(rules, "erin", claims={}, acr="urn:example:mfa", amr=no_mfa).name == "secure"
    assert admit(rules, "erin", claims={}, acr=None, amr=("pwd", "hwk")).name == "secure"


def test_a_group_needs_members_or_members_from() -> None:
    text = RULES.replace("    members_from: [{value: legal}, {claim: roles, value: Counsel}]\n", "")
    text = text.replace("  legal:\n", "  legal:\n    send_to: []\n")
    assert any("needs members" in issue for issue in issues(text))


def test_one_claim_value_gives_members_to_one_group() -> None:
    text = RULES.replace("{value: secure}", "{value: legal}")
    found = issues(text)
    assert any(
        "groups=legal already gives members to group legal" in issue
        and "rules.yaml:" in issue
        and "groups.secure.members_from" in issue
        for issue in found
    ), found


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("{claim: groups, value: engineering}", "{claim: groups}", "missing"),
        ("{claim: groups, value: engineering}", "{value: ''}", "the claim's value"),
        ("{claim: groups, value: engineering}", "{value: [a]}", "the claim's value"),
        ("{claim: groups, value: engineering}", "[]", "matches no one"),
        ("{acr: urn:example:mfa, amr: [otp, hwk]}", "{}", "name the acr values"),
        ("{acr: urn:example:mfa, amr: [otp, hwk]}", "{mfa: true}", "unknown key"),
        ("{acr: urn:example:mfa, amr: [otp, hwk]}", "{amr: []}", "a list of amr values"),
    ],
)
def test_mistakes_are_reported_where_they_are(old: str, new: str, says: str) -> None:
    found = issues(RULES.replace(old, new))
    assert any(says in issue for issue in found), found


class Directory:
    def __init__(self, claims: dict[str, dict[str, frozenset[str]]]) -> None:
        self.claims = claims

    def claims_of(self, user: str) -> dict[str, frozenset[str]]:
        return self.claims.get(user, {})


PEERED = RULES.replace(
    "  legal:\n",
    "  partners:\n    members_from: {value: partners}\n"
    "    send_to: [globex.example]\n    receive_from: [globex.example]\n  legal:\n",
) + (
    "peers:\n  globex.example:\n    endpoint: https://gw.globex.example:8443\n"
    "    ca_pem: |\n{pem}    signing_key: {key}\n"
)


def _peered() -> str:
    from nacl.signing import SigningKey

    from gateway.core.keytext import format_signing_key
    from tests.certs_for_tests import CertAuthority

    pem = "".join(
        f"      {line}\n" for line in CertAuthority.create().cert_pem.decode().splitlines()
    )
    key = format_signing_key(SigningKey.generate().verify_key.encode())
    return PEERED.replace("{pem}", pem).replace("{key}", key)


def test_claim_members_send_and_receive_as_their_group() -> None:
    from gateway.core.address import Address

    directory = Directory(
        {
            "carol": {"groups": frozenset({"legal"})},
            "pat": {"groups": frozenset({"partners"})},
            "mixed": {"groups": frozenset({"legal", "partners"})},
        }
    )
    rules = CompiledRules(load_rules(_peered(), filename="rules.yaml"), idp_members=directory)
    bob_globex = Address.parse("bob@globex.example")
    carol, pat = Address.parse("carol@acme.example"), Address.parse("pat@acme.example")
    group = rules.group_of("carol")
    assert group is not None
    assert group.name == "legal"
    # carol (legal, from the claim) stays segmented, as a named member would
    out = rules.decide_outbound(carol, bob_globex, size=10, ttl_seconds=3600, burn_on_read=False)
    assert (out.allowed, out.reason, out.group) == (False, Reason.PEER_NOT_ALLOWED, "legal")
    inbound = rules.decide_inbound(
        "globex.example",
        bob_globex,
        carol,
        asserted_group=None,
        size=10,
        ttl_seconds=3600,
        burn_on_read=False,
    )
    assert (inbound.allowed, inbound.reason) == (False, Reason.PEER_NOT_ALLOWED)
    # pat's group comes from the claim too, and reaches globex both ways
    assert rules.decide_outbound(
        pat, bob_globex, size=10, ttl_seconds=3600, burn_on_read=False
    ).allowed
    assert rules.decide_inbound(
        "globex.example",
        bob_globex,
        pat,
        asserted_group=None,
        size=10,
        ttl_seconds=3600,
        burn_on_read=False,
    ).allowed
    assert rules.visible_to("pat", "globex.example")
    assert not rules.visible_to("carol", "globex.example")
    # two claim groups: no group (the sign-in refused it already); unknown users: none
    assert rules.group_of("mixed") is None
    assert rules.group_of("nobody") is None


EXPLAINED = """\
version: 1
org: acme.example
default: deny
groups:
  engineering:
    members: [alice]
    members_from: {value: engineering}
  legal:
    members_from: {claim: groups, value: legal}
  secure:
    members_from: {value: secure}
    requires: {acr: urn:example:mfa}
"""


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--from", "carol@acme.example", "--claim", "groups=legal"], 0, "group legal"),
        (["--from", "carol@acme.example"], 1, "reason: no_group"),
        (["--from", "alice@acme.example", "--claim", "groups=legal"], 1, "reason: group_conflict"),
        (["--from", "erin@acme.example", "--claim", "groups=secure"], 0, "requires acr urn:"),
        (
            ["--from", "erin@acme.example", "--claim", "groups=secure", "--amr", "pwd"],
            1,
            "reason: mfa_required",
        ),
        (
            ["--from", "erin@acme.example", "--claim", "groups=secure", "--acr", "urn:example:mfa"],
            0,
            "allowed",
        ),
    ],
)
def test_rules_explain_understands_idp_claims_and_strength(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    says: str,
) -> None:
    from gateway.cli.main import main

    path = tmp_path / "rules.yaml"
    path.write_text(EXPLAINED)
    assert main(["rules", "explain", str(path), "--to", "alice@acme.example", *args]) == code
    assert says in capsys.readouterr().out
    assert main(["rules", "check", str(path)]) == 0
    assert "3 groups (3 with members from IdP claims), 1 member" in capsys.readouterr().out
