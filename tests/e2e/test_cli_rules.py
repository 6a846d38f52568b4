"""`gateway rules check|explain|diff`, run as the real console script on the shipped examples."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

COMMAND_TIMEOUT = 60  # seconds; generous, so that a hang fails instead of blocking
_SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]
EXAMPLES = Path(__file__).resolve().parents[2] / "federation_rules"


def gateway(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of the examples, so that the tests can edit them and name them shortly."""
    target = tmp_path / "rules"
    shutil.copytree(EXAMPLES, target)
    return target


def line_of(path: Path, text: str, *, after: str | None = None) -> int:
    """The 1-based line of ``text`` in ``path`` (after the line holding ``after``)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines) if i >= start and text in line) + 1


# -- check -----------------------------------------------------------------------------
def test_check_accepts_every_example(examples: Path) -> None:
    names = sorted(p.name for p in examples.glob("*.yaml"))
    result = gateway("rules", "check", *names, cwd=examples)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "open-to-all.yaml: ok: 2 groups, 3 members, 2 peers",
        "partnership.yaml: ok: 2 groups, 3 members, 1 peer",
        "receive-from-group.yaml: ok: 1 group, 2 members, 1 peer",
        "retention.yaml: ok: 2 groups, 3 members, 1 peer",
        "segmented.yaml: ok: 2 groups, 3 members, 1 peer",
    ]
    assert result.stderr == ""


def test_check_lists_every_error_and_exits_1(examples: Path) -> None:
    path = examples / "partnership.yaml"
    text = path.read_text()
    text = text.replace("default: deny ", "default: allow ")
    text = text.replace("    send_to: [globex.example]", "    sendto: [globex.example]")
    text = text.replace("{min: 1m, default: 1d, max: 7d}", "{min: 1m, default: 1d, max: 7x}")
    text = text.replace("members: [dave]", "members: [dave, alice]")
    text = text.replace("burn_on_read: optional ", "burn_on_read: never ")
    (examples / "broken.yaml").write_text(text)
    result = gateway("rules", "check", "broken.yaml", "segmented.yaml", cwd=examples)
    assert result.returncode == 1
    default_line = line_of(path, "default: deny")
    send_line = line_of(path, "send_to: [globex.example]")
    ttl_line = line_of(path, "ttl: {min: 1m")
    burn_line = line_of(path, "burn_on_read: optional")
    members_line = line_of(path, "members: [dave]")
    assert result.stdout.splitlines() == [
        f"broken.yaml:{default_line}:10: default: got string 'allow'; the only value is deny: "
        "the rules list what is allowed and everything else is denied",
        f"broken.yaml:{send_line}:5: groups.engineering.sendto: unknown key 'sendto'; did you "
        "mean 'send_to'?",
        f"broken.yaml:{ttl_line}:40: groups.engineering.limits.ttl.max: invalid duration '7x': "
        "write a whole number and one unit of s, m, h, d, w (like 90s, 15m, 1d)",
        f"broken.yaml:{burn_line}:21: groups.engineering.limits.burn_on_read: expected one of "
        "optional, required, forbidden; got string 'never'",
        f"broken.yaml:{members_line}:21: groups.sales.members[1]: user 'alice' is already in "
        f"group engineering (line {line_of(path, 'members: [alice, bob]')}); a user is in one "
        "group at most",
        "segmented.yaml: ok: 2 groups, 3 members, 1 peer",
    ]


def test_check_of_a_missing_file_is_a_usage_error(examples: Path) -> None:
    result = gateway("rules", "check", "partnership.yaml", "nowhere.yaml", cwd=examples)
    assert result.returncode == 2
    assert result.stdout == "partnership.yaml: ok: 2 groups, 3 members, 1 peer\n"
    assert "nowhere.yaml" in result.stderr
    assert "No such file" in result.stderr


def test_usage_errors_exit_2(examples: Path) -> None:
    assert gateway("rules", cwd=examples).returncode == 2
    assert gateway("rules", "check", cwd=examples).returncode == 2
    assert gateway("rules", "diff", "partnership.yaml", cwd=examples).returncode == 2


# -- explain ---------------------------------------------------------------------------
def test_explain_allowed_outbound(examples: Path) -> None:
    result = gateway(
        "rules", "explain", "partnership.yaml",
        "--from", "alice@acme.example", "--to", "bob@globex.example",
        cwd=examples,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = line_of(examples / "partnership.yaml", "send_to: [globex.example]")
    assert result.stdout.splitlines() == [
        "allowed: alice@acme.example -> bob@globex.example (outbound, group engineering)",
        "reason: allowed",
        f"rule: partnership.yaml:{line} (groups.engineering.send_to[0])",
        "detail: group engineering may send to globex.example",
    ]


def test_explain_denied_segmented_group(examples: Path) -> None:
    result = gateway(
        "rules", "explain", "segmented.yaml",
        "--from", "carol@acme.example", "--to", "bob@globex.example",
        cwd=examples,
    )  # fmt: skip
    assert result.returncode == 1
    line = line_of(examples / "segmented.yaml", "  legal:")
    assert result.stdout.splitlines() == [
        "denied: carol@acme.example -> bob@globex.example (outbound, group legal)",
        "reason: peer_not_allowed",
        f"rule: segmented.yaml:{line} (groups.legal)",
        "detail: group legal has no send_to entry for globex.example",
    ]


def test_explain_local_and_unknown_users(examples: Path) -> None:
    local = gateway(
        "rules", "explain", "segmented.yaml",
        "--from", "carol@acme.example", "--to", "alice@acme.example",
        cwd=examples,
    )  # fmt: skip
    assert local.returncode == 0
    assert local.stdout.splitlines()[0] == (
        "allowed: carol@acme.example -> alice@acme.example (local, group legal)"
    )
    nobody = gateway(
        "rules", "explain", "segmented.yaml",
        "--from", "zed@acme.example", "--to", "bob@globex.example",
        cwd=examples,
    )  # fmt: skip
    assert nobody.returncode == 1
    default_line = line_of(examples / "segmented.yaml", "default: deny")
    assert nobody.stdout.splitlines()[1:3] == [
        "reason: no_group",
        f"rule: segmented.yaml:{default_line} (default)",
    ]


def test_explain_inbound_from_a_peer_group(examples: Path) -> None:
    args = ("rules", "explain", "receive-from-group.yaml", "--from", "x@globex.example",
            "--to", "grace@acme.example")  # fmt: skip
    path = examples / "receive-from-group.yaml"
    allowed = gateway(*args, "--group", "partners", "--burn-on-read", cwd=examples)
    assert allowed.returncode == 0, allowed.stdout
    receive_line = line_of(path, "receive_from: [globex.example/partners]")
    assert allowed.stdout.splitlines()[:3] == [
        "allowed: x@globex.example -> grace@acme.example (inbound, group research)",
        "reason: allowed",
        f"rule: receive-from-group.yaml:{receive_line} (groups.research.receive_from[0])",
    ]
    other_group = gateway(*args, "--group", "sales", "--burn-on-read", cwd=examples)
    assert other_group.returncode == 1
    assert other_group.stdout.splitlines()[1] == "reason: peer_not_allowed"
    # The admin reads the real reason, and what the peer is told instead.
    assert other_group.stdout.splitlines()[-1].startswith("peer reads: recipient_unknown (")
    as_json = gateway(*args, "--group", "sales", "--burn-on-read", "--json", cwd=examples)
    decision = json.loads(as_json.stdout)
    assert (decision["reason"], decision["peer_reads"]) == ("peer_not_allowed", "recipient_unknown")
    no_burn = gateway(*args, "--group", "partners", cwd=examples)
    assert no_burn.returncode == 1
    burn_line = line_of(path, "burn_on_read: required")
    assert no_burn.stdout.splitlines()[1:3] == [
        "reason: burn_on_read_required",
        f"rule: receive-from-group.yaml:{burn_line} (groups.research.limits.burn_on_read)",
    ]


def test_explain_limits_and_json(examples: Path) -> None:
    args = ("rules", "explain", "partnership.yaml", "--from", "alice@acme.example",
            "--to", "bob@globex.example")  # fmt: skip
    too_large = gateway(*args, "--size", "70000", "--json", cwd=examples)
    assert too_large.returncode == 1
    line = line_of(examples / "partnership.yaml", "max_envelope_bytes: 65536")
    assert json.loads(too_large.stdout) == {
        "allowed": False,
        "reason": "too_large",
        "direction": "outbound",
        "from": "alice@acme.example",
        "to": "bob@globex.example",
        "group": "engineering",
        "peer": "globex.example",
        "rule": {
            "file": "partnership.yaml",
            "line": line,
            "path": "groups.engineering.limits.max_envelope_bytes",
        },
        "detail": "70000 bytes is over max_envelope_bytes 65536 of group engineering",
    }
    ttl = gateway(*args, "--ttl", "8d", cwd=examples)
    assert ttl.returncode == 1
    assert ttl.stdout.splitlines()[1] == "reason: ttl_out_of_bounds"
    assert gateway(*args, "--ttl", "7d", "--size", "65536", cwd=examples).returncode == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--from", "a@x.example", "--to", "b@y.example"), "neither a@x.example nor b@y.example"),
        (("--from", "not an address", "--to", "b@acme.example"), "not of the form user@org"),
        (("--from", "alice@acme.example", "--to", "b@globex.example", "--group", "g"), "--group"),
        (("--from", "alice@acme.example", "--to", "b@globex.example", "--ttl", "soon"), "--ttl"),
        (("--from", "alice@acme.example", "--to", "b@globex.example", "--size", "-1"), "--size"),
    ],
)
def test_explain_errors_exit_2(examples: Path, extra: tuple[str, ...], message: str) -> None:
    result = gateway("rules", "explain", "partnership.yaml", *extra, cwd=examples)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_explain_of_invalid_rules_exits_2_with_the_issues(examples: Path) -> None:
    (examples / "bad.yaml").write_text("version: 1\norg: acme.example\ndefault: deny\n")
    result = gateway(
        "rules", "explain", "bad.yaml", "--from", "a@acme.example", "--to", "b@acme.example",
        cwd=examples,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == "bad.yaml:1:1: groups: missing required key 'groups'\n"


# -- diff ------------------------------------------------------------------------------
def test_diff_of_equal_rules_is_silent_and_exits_0(examples: Path) -> None:
    text = (examples / "partnership.yaml").read_text()
    (examples / "reformatted.yaml").write_text(
        "# reworded\n" + text.replace("[alice, bob]", "[bob, alice]")
    )
    result = gateway("rules", "diff", "partnership.yaml", "reformatted.yaml", cwd=examples)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_diff_lists_changes_and_exits_1(examples: Path) -> None:
    text = (examples / "partnership.yaml").read_text()
    text = text.replace("members: [alice, bob]", "members: [alice]")
    text = text.replace("members: [dave]", 'members: [dave, bob]\n    send_to: ["*"]')
    text = text.replace("burn_on_read: optional ", "burn_on_read: required ")
    (examples / "new.yaml").write_text(text)
    result = gateway("rules", "diff", "partnership.yaml", "new.yaml", cwd=examples)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "+ outbound sales -> globex.example",
        "~ member bob: engineering -> sales",
        "~ limits engineering: burn_on_read optional -> required",
    ]


def test_diff_between_examples(examples: Path) -> None:
    result = gateway("rules", "diff", "segmented.yaml", "open-to-all.yaml", cwd=examples)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "+ peer initech.example" in lines
    assert "- group legal" in lines
    assert "+ group support" in lines
    assert "- inbound engineering <- globex.example" in lines
    assert "- outbound engineering -> globex.example" in lines
    assert "+ outbound engineering -> initech.example" in lines
    assert "+ inbound support <- initech.example" in lines


def test_diff_errors_exit_2(examples: Path) -> None:
    missing = gateway("rules", "diff", "partnership.yaml", "nowhere.yaml", cwd=examples)
    assert missing.returncode == 2
    assert "nowhere.yaml" in missing.stderr
    (examples / "bad.yaml").write_text("version: 1\n")
    invalid = gateway("rules", "diff", "bad.yaml", "partnership.yaml", cwd=examples)
    assert invalid.returncode == 2
    assert invalid.stdout.splitlines() == [
        "bad.yaml:1:1: org: missing required key 'org'",
        "bad.yaml:1:1: default: missing required key 'default'",
        "bad.yaml:1:1: groups: missing required key 'groups'",
    ]


# -- with the rest of the product ------------------------------------------------------------
def test_init_rules_and_a_pasted_peer_card_check(tmp_path: Path) -> None:
    for org in ("acme.example", "globex.example"):
        result = gateway("init", "--org", org, "--dir", tmp_path / org)
        assert result.returncode == 0, result.stderr
    rules = tmp_path / "acme.example" / "rules.yaml"
    checked = gateway("rules", "check", rules)
    assert checked.returncode == 0, checked.stdout
    card = gateway("peer", "card", "--dir", tmp_path / "globex.example")
    assert card.returncode == 0, card.stderr
    pasted = "peers:\n" + "".join(f"  {line}\n" for line in card.stdout.splitlines())
    text = rules.read_text().replace("peers: {}\n", pasted)
    text = text.replace(
        "members: [alice, bob]", "members: [alice, bob]\n    send_to: [globex.example]"
    )
    rules.write_text(text)
    checked = gateway("rules", "check", rules)
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.endswith("ok: 1 group, 2 members, 1 peer\n")
    explained = gateway(
        "rules", "explain", rules, "--from", "alice@acme.example", "--to", "x@globex.example"
    )
    assert explained.returncode == 0, explained.stdout
