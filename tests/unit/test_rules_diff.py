"""rules diff: changes in effect only, every kind of change, in a stable order."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.rules import Rules, diff_rules, format_diff, load_rules
from gateway.core.rules.diff import inbound_reach, outbound_reach

EXAMPLES = Path(__file__).resolve().parents[2] / "federation_rules"


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def load(text: str) -> Rules:
    return load_rules(text, filename="rules.yaml")


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_a_file_does_not_differ_from_itself(name: str) -> None:
    diff = diff_rules(load(example(name)), load(example(name)))
    assert not diff.changed
    assert format_diff(diff) == []


def test_layout_comments_and_order_are_no_change() -> None:
    base = example("partnership.yaml")
    moved = edit(base, "members: [alice, bob]", "members:   [bob, alice]   # reordered")
    moved = "# a new comment\n" + moved
    assert format_diff(diff_rules(load(base), load(moved))) == []


def test_wildcard_equal_to_the_full_list_is_no_change() -> None:
    base = example("open-to-all.yaml")
    listed = edit(base, 'send_to: ["*"]', "send_to: [initech.example, globex.example]")
    assert format_diff(diff_rules(load(base), load(listed))) == []


def test_every_kind_of_change() -> None:
    old = example("partnership.yaml")
    new = edit(old, "members: [alice, bob]", "members: [alice, zoe]")
    new = edit(new, "members: [dave]", "members: [dave, bob]")
    new = edit(new, "receive_from: [globex.example]", "receive_from: [globex.example/partners]")
    new = edit(new, "max_envelope_bytes: 65536", "max_envelope_bytes: 1024")
    new = edit(new, "ttl: {min: 1m, default: 1d, max: 7d}", "ttl: {min: 1m, default: 2h, max: 7d}")
    new = edit(
        new, "endpoint: https://gw.globex.example:8443", "endpoint: https://gw2.globex.example"
    )
    new = edit(new, "  sales:\n", "  sales:\n    send_to: [globex.example]\n")
    assert format_diff(diff_rules(load(old), load(new))) == [
        "~ peer globex.example: endpoint https://gw.globex.example:8443 -> "
        "https://gw2.globex.example",
        "- inbound engineering <- globex.example",
        "+ inbound engineering <- globex.example/partners",
        "+ outbound sales -> globex.example",
        "~ member bob: engineering -> sales",
        "+ member zoe: engineering",
        "~ limits engineering: max_envelope_bytes 65536 -> 1024",
        "~ limits engineering: ttl.default 1d -> 2h",
    ]


def test_peers_added_removed_and_reach_through_the_wildcard() -> None:
    old = load(example("open-to-all.yaml"))
    partnership = load(example("partnership.yaml"))
    # the same org; globex stays, initech goes
    diff = diff_rules(old, partnership)
    lines = format_diff(diff)
    assert "- peer initech.example" in lines
    assert diff.peers_removed == ("initech.example",)
    assert "- outbound support -> initech.example" in lines
    assert "- inbound support <- initech.example" in lines
    assert "- group support" in lines
    assert "+ group sales" in lines
    assert "- outbound engineering -> initech.example" in lines
    assert "+ outbound engineering -> globex.example" in lines
    back = format_diff(diff_rules(partnership, old))
    assert "+ peer initech.example" in back
    assert "+ outbound support -> initech.example" in back


def test_ca_pins_and_signing_key_changes() -> None:
    old = example("partnership.yaml")
    other = load(example("open-to-all.yaml")).peers["initech.example"]
    new_pem = "".join(f"      {line}\n" for line in other.ca_pem.splitlines())
    start = old.index("    ca_pem: |\n") + len("    ca_pem: |\n")
    end = old.index("    # Optional: SPKI pins")
    new = old[:start] + new_pem + old[end:]
    new = edit(new, "pins: [", "pins: []\n    # was: [")
    key_line = next(line for line in old.splitlines() if "signing_key:" in line)
    new = edit(new, key_line, f"    signing_key: ed25519:{'A' * 43}")
    before, after = load(old), load(new)
    lines = format_diff(diff_rules(before, after))
    fp_old = before.peers["globex.example"].ca_sha256[:16]
    fp_new = other.ca_sha256[:16]
    assert lines == [
        f"~ peer globex.example: ca sha256:{fp_old} -> sha256:{fp_new}",
        f"~ peer globex.example: pins [{before.peers['globex.example'].pins[0]}] -> []",
        "~ peer globex.example: signing_key (old key) -> (new key)",
    ]


def test_org_change_and_burn_on_read() -> None:
    old = example("segmented.yaml")
    new = edit(old, "org: acme.example", "org: acme2.example")
    new = edit(new, "burn_on_read: forbidden", "burn_on_read: required")
    assert format_diff(diff_rules(load(old), load(new))) == [
        "~ org acme.example -> acme2.example",
        "~ limits legal: burn_on_read forbidden -> required",
    ]


def test_reach_helpers() -> None:
    rules = load(example("receive-from-group.yaml"))
    research = rules.groups["research"]
    peers = frozenset(rules.peers)
    assert outbound_reach(research, peers) == {"globex.example"}
    assert inbound_reach(research, peers) == {"globex.example/partners"}
    both = edit(
        example("receive-from-group.yaml"),
        "receive_from: [globex.example/partners]",
        "receive_from: [globex.example/partners, globex.example]",
    )
    # the whole peer includes its groups
    assert inbound_reach(load(both).groups["research"], peers) == {"globex.example"}
