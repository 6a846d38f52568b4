"""The rules loader: a valid file becomes Rules; every kind of error names its line and column."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.core.rules import BurnOnRead, Mark, PeerRef, load_rules
from gateway.core.rules.loader import MAX_REPORTED_ISSUES
from gateway.core.rules.model import DEFAULT_TTL, Limits, TtlBounds
from gateway.errors import RulesError

FILE = "conf/acme.yaml"
PIN = "sha256/" + base64.b64encode(bytes(range(32))).decode()
KEY = "ed25519:" + base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")


def mint_pem(org: str, *, ca: bool) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, org)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """The files the fake read_file serves, by the path the loader asks for."""
    return {
        "conf/certs/globex-ca.pem": mint_pem("globex CA", ca=True).encode(),
        "conf/certs/initech-ca.pem": mint_pem("initech CA", ca=True).encode(),
        "conf/certs/leaf.pem": mint_pem("a leaf", ca=False).encode(),
    }


# Line numbers matter: the tests below point into this text.
VALID = f"""\
version: 1
org: acme.example
default: deny
peers:
  globex.example:
    endpoint: https://gw.globex.example:8443
    ca: certs/globex-ca.pem
    pins: ["{PIN}"]
    signing_key: {KEY}
  initech.example:
    endpoint: https://gw.initech.example
    ca: certs/initech-ca.pem
    signing_key: {KEY}
groups:
  engineering:
    members: [alice, bob]
    send_to: [globex.example]
    receive_from: [globex.example/partners, initech.example]
    limits:
      max_envelope_bytes: 65536
      ttl: {{min: 1m, default: 1d, max: 7d}}
      burn_on_read: optional
  legal:
    members: [carol]
"""


def load(text: str, files: dict[str, bytes]) -> object:
    def read_file(path: str) -> bytes:
        try:
            return files[path]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", path) from None

    return load_rules(text, filename=FILE, read_file=read_file)


def issues(text: str, files: dict[str, bytes]) -> list[str]:
    with pytest.raises(RulesError) as info:
        load(text, files)
    return info.value.issues


def edit(old: str, new: str, text: str = VALID) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_valid_file_loads_into_the_model(files: dict[str, bytes]) -> None:
    rules = load(VALID, files)
    assert rules.org == "acme.example"  # type: ignore[attr-defined]
    assert rules.summary() == "2 groups, 3 members, 2 peers"  # type: ignore[attr-defined]
    globex = rules.peers["globex.example"]  # type: ignore[attr-defined]
    assert globex.endpoint == "https://gw.globex.example:8443"
    assert globex.pins == (PIN,)
    assert globex.signing_key == bytes(range(32))
    assert globex.ca_file == "conf/certs/globex-ca.pem"
    assert globex.ca_pem.encode() == files["conf/certs/globex-ca.pem"]
    assert rules.ca_files == ("conf/certs/globex-ca.pem", "conf/certs/initech-ca.pem")  # type: ignore[attr-defined]
    engineering = rules.groups["engineering"]  # type: ignore[attr-defined]
    assert engineering.members == ("alice", "bob")
    assert engineering.send_to == (PeerRef("globex.example"),)
    assert engineering.send_to[0].mark == Mark(FILE, 17, "groups.engineering.send_to[0]")
    assert engineering.receive_from == (
        PeerRef("globex.example", "partners"),
        PeerRef("initech.example"),
    )
    assert engineering.limits == Limits(65536, TtlBounds(60, 86400, 7 * 86400), BurnOnRead.OPTIONAL)
    assert engineering.mark == Mark(FILE, 15, "groups.engineering")
    legal = rules.groups["legal"]  # type: ignore[attr-defined]
    assert legal.send_to == legal.receive_from == ()
    assert legal.limits == Limits()  # the defaults
    assert legal.limits.ttl == DEFAULT_TTL
    assert rules.default_mark == Mark(FILE, 3, "default")  # type: ignore[attr-defined]


def test_names_are_folded_to_lower_case(files: dict[str, bytes]) -> None:
    text = edit("members: [carol]", "members: [Carol]")
    text = edit("send_to: [globex.example]", "send_to: [GLOBEX.example]", text)
    rules = load(text, files)
    assert rules.groups["legal"].members == ("carol",)  # type: ignore[attr-defined]
    assert rules.groups["engineering"].send_to == (PeerRef("globex.example"),)  # type: ignore[attr-defined]


def test_inline_ca_pem_is_accepted(files: dict[str, bytes]) -> None:
    pem = files["conf/certs/globex-ca.pem"].decode()
    block = "ca_pem: |\n" + "".join(f"      {line}\n" for line in pem.splitlines())
    text = edit("ca: certs/globex-ca.pem\n", block)
    rules = load(text, files)
    assert rules.peers["globex.example"].ca_file is None  # type: ignore[attr-defined]
    assert rules.peers["globex.example"].ca_pem == pem  # type: ignore[attr-defined]


def test_layout_and_comments_do_not_change_equality(files: dict[str, bytes]) -> None:
    moved = "# a comment\n\n" + VALID.replace(
        "members: [alice, bob]", "members:\n      - alice\n      - bob"
    )
    assert load(moved, files) == load(VALID, files)


# -- each kind of error, at its exact line and column -------------------------------------
ERROR_CASES = [
    pytest.param(
        edit("    send_to: [globex.example]", "    sendto: [globex.example]"),
        "conf/acme.yaml:17:5: groups.engineering.sendto: unknown key 'sendto'; "
        "did you mean 'send_to'?",
        id="unknown-key-with-suggestion",
    ),
    pytest.param(
        edit("default: deny\n", "default: deny\ncolour: blue\n"),
        "conf/acme.yaml:4:1: colour: unknown key 'colour'; "
        "known keys: version, org, default, retention, peers, groups",
        id="unknown-key-without-suggestion",
    ),
    pytest.param(
        edit("members: [carol]", "members: carol"),
        "conf/acme.yaml:24:14: groups.legal.members: expected members (a list), got string 'carol'",
        id="wrong-type-list",
    ),
    pytest.param(
        edit("max_envelope_bytes: 65536", "max_envelope_bytes: lots"),
        "conf/acme.yaml:20:27: groups.engineering.limits.max_envelope_bytes: expected an "
        "integer, got string 'lots'",
        id="wrong-type-integer",
    ),
    pytest.param(
        edit("members: [carol]", "members: [carol, 42]"),
        "conf/acme.yaml:24:22: groups.legal.members[1]: expected a user name (a string), "
        "got integer 42; quote it",
        id="wrong-type-member",
    ),
    pytest.param(
        edit("send_to: [globex.example]", "send_to: [globex.example, umbrella.example]"),
        "conf/acme.yaml:17:31: groups.engineering.send_to[1]: peer umbrella.example is not "
        "defined in peers",
        id="undefined-peer",
    ),
    pytest.param(
        edit("[globex.example/partners, ", "[globex.exampel/partners, "),
        "conf/acme.yaml:18:20: groups.engineering.receive_from[0]: peer globex.exampel is not "
        "defined in peers; did you mean globex.example?",
        id="undefined-peer-in-peer-group",
    ),
    pytest.param(
        edit("members: [carol]", "members: [carol, bob]"),
        "conf/acme.yaml:24:22: groups.legal.members[1]: user 'bob' is already in group "
        "engineering (line 16); a user is in one group at most",
        id="user-in-two-groups",
    ),
    pytest.param(
        edit("members: [alice, bob]", "members: [alice, bob, Alice]"),
        "conf/acme.yaml:16:27: groups.engineering.members[2]: duplicate member 'alice' "
        "(first at line 16, column 15)",
        id="duplicate-member",
    ),
    pytest.param(
        edit("org: acme.example", "org: acme_example"),
        "conf/acme.yaml:2:6: org: invalid org domain: domain 'acme_example' needs at least two "
        "labels (like acme.example)",
        id="invalid-org-domain",
    ),
    pytest.param(
        edit("  initech.example:\n", "  initech..example:\n"),
        "conf/acme.yaml:10:3: peers.initech..example: invalid peer org domain: domain "
        "'initech..example' has an invalid label ''",
        id="invalid-peer-domain",
    ),
    pytest.param(
        edit("members: [carol]", "members: [carol, jo..e]"),
        "conf/acme.yaml:24:22: groups.legal.members[1]: user name 'jo..e' is not 1-64 of "
        "a-z 0-9 . _ - starting and ending with a letter or digit",
        id="invalid-user-name",
    ),
    pytest.param(
        edit("{min: 1m, default: 1d, max: 7d}", "{min: 8d, default: 9d, max: 7d}"),
        "conf/acme.yaml:21:18: groups.engineering.limits.ttl.min: min 8d is above max 7d",
        id="ttl-min-above-max",
    ),
    pytest.param(
        edit("{min: 1m, default: 1d, max: 7d}", "{min: 1m, default: 8d, max: 7d}"),
        "conf/acme.yaml:21:31: groups.engineering.limits.ttl.default: default 8d is outside "
        "[min 1m, max 7d]",
        id="ttl-default-outside",
    ),
    pytest.param(
        edit("{min: 1m, default: 1d, max: 7d}", "{max: 1h}"),
        "conf/acme.yaml:21:18: groups.engineering.limits.ttl.max: default 1d (implied) is "
        "outside [min 1m (implied), max 1h]",
        id="ttl-default-implied-outside",
    ),
    pytest.param(
        edit("{min: 1m, default: 1d, max: 7d}", "{min: 1m, default: 1 day, max: 7d}"),
        "conf/acme.yaml:21:31: groups.engineering.limits.ttl.default: invalid duration "
        "'1 day': write a whole number and one unit of s, m, h, d, w (like 90s, 15m, 1d)",
        id="bad-duration",
    ),
    pytest.param(
        edit("{min: 1m, default: 1d, max: 7d}", "{min: 0s, default: 1d, max: 7d}"),
        "conf/acme.yaml:21:18: groups.engineering.limits.ttl.min: 0s is out of range 1s-365d",
        id="ttl-out-of-range",
    ),
    pytest.param(
        edit("ca: certs/initech-ca.pem", "ca: certs/missing.pem"),
        "conf/acme.yaml:12:9: peers.initech.example.ca: cannot read the CA file "
        "conf/certs/missing.pem: No such file or directory",
        id="ca-file-missing",
    ),
    pytest.param(
        edit("ca: certs/initech-ca.pem", "ca: certs/leaf.pem"),
        "conf/acme.yaml:12:9: peers.initech.example.ca: conf/certs/leaf.pem: is not a CA "
        "certificate (basicConstraints CA:TRUE missing)",
        id="ca-not-a-ca",
    ),
    pytest.param(
        edit("    ca: certs/initech-ca.pem\n", "    ca_pem: hello\n"),
        "conf/acme.yaml:12:13: peers.initech.example.ca_pem: inline PEM: not a PEM "
        "certificate (...",
        id="ca-pem-not-pem",
    ),
    pytest.param(
        edit("    ca: certs/initech-ca.pem\n", ""),
        "conf/acme.yaml:10:3: peers.initech.example.ca: missing the peer's CA certificate: "
        "give ca (a file) or ca_pem (inline PEM)",
        id="ca-missing",
    ),
    pytest.param(
        edit("    ca: certs/initech-ca.pem\n", "    ca: certs/initech-ca.pem\n    ca_pem: x\n"),
        "conf/acme.yaml:13:5: peers.initech.example.ca_pem: give either ca (a file) or ca_pem "
        "(inline), not both",
        id="ca-and-ca-pem",
    ),
    pytest.param(
        edit(f'pins: ["{PIN}"]', 'pins: ["sha256/abc"]'),
        "conf/acme.yaml:8:12: peers.globex.example.pins[0]: invalid pin 'sha256/abc': expected "
        "sha256/ and 44 characters of base64 (see `gateway pki show`)",
        id="malformed-pin",
    ),
    pytest.param(
        edit(f"signing_key: {KEY}\n  initech", "signing_key: ed25519:short\n  initech"),
        "conf/acme.yaml:9:18: peers.globex.example.signing_key: invalid signing key "
        "'ed25519:short': expected ed25519: and 43 characters of base64url (see `gateway peer "
        "card`)",
        id="malformed-signing-key",
    ),
    pytest.param(
        edit("default: deny", "default: allow"),
        "conf/acme.yaml:3:10: default: got string 'allow'; the only value is deny: the rules "
        "list what is allowed and everything else is denied",
        id="default-not-deny",
    ),
    pytest.param(
        edit("  initech.example:\n", "  ACME.example:\n"),
        "conf/acme.yaml:10:3: peers.ACME.example: acme.example is this org itself; a peer is "
        "another org's gateway",
        id="peer-is-own-org",
    ),
    pytest.param(
        edit("  legal:\n", "  engineering:\n"),
        "conf/acme.yaml:23:3: groups.engineering: duplicate key 'engineering' (first at line "
        "15, column 3); YAML would silently keep only the last one",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        edit("version: 1", "version: 2"),
        "conf/acme.yaml:1:10: version: unsupported version integer 2; this gateway reads version 1",
        id="version",
    ),
    pytest.param(
        edit("org: acme.example\n", ""),
        "conf/acme.yaml:1:1: org: missing required key 'org'",
        id="missing-required-key",
    ),
    pytest.param(
        edit("  legal:\n", "  Legal:\n"),
        "conf/acme.yaml:23:3: groups.Legal: invalid group name 'Legal': 1-64 of a-z 0-9 _ -, "
        "starting with a letter or digit",
        id="invalid-group-name",
    ),
    pytest.param(
        edit("burn_on_read: optional", "burn_on_read: sometimes"),
        "conf/acme.yaml:22:21: groups.engineering.limits.burn_on_read: expected one of "
        "optional, required, forbidden; got string 'sometimes'",
        id="burn-on-read-value",
    ),
    pytest.param(
        edit("max_envelope_bytes: 65536", "max_envelope_bytes: 2000000"),
        "conf/acme.yaml:20:27: groups.engineering.limits.max_envelope_bytes: 2000000 is out of "
        "range 1-1048576 (the protocol's hard cap is 1 MiB)",
        id="max-envelope-bytes-cap",
    ),
    pytest.param(
        edit("send_to: [globex.example]", 'send_to: [globex.example, "*"]'),
        'conf/acme.yaml:17:31: groups.engineering.send_to[1]: "*" already means every peer; '
        "list it alone in send_to",
        id="wildcard-not-alone",
    ),
    pytest.param(
        edit("send_to: [globex.example]", "send_to: [globex.example/partners]"),
        "conf/acme.yaml:17:15: groups.engineering.send_to[0]: send_to names peers only "
        "('globex.example/partners' names a group): the origin cannot know a remote user's "
        "group",
        id="send-to-group",
    ),
    pytest.param(
        edit("send_to: [globex.example]", "send_to: [globex.example, globex.example]"),
        "conf/acme.yaml:17:31: groups.engineering.send_to[1]: globex.example is listed twice "
        "(first at line 17)",
        id="duplicate-send-to",
    ),
    pytest.param(
        edit("send_to: [globex.example]", "send_to: [acme.example]"),
        "conf/acme.yaml:17:15: groups.engineering.send_to[0]: acme.example is this org: users "
        "of the org reach each other without a rule",
        id="send-to-own-org",
    ),
    pytest.param(
        edit("endpoint: https://gw.initech.example", "endpoint: http://gw.initech.example"),
        "conf/acme.yaml:11:15: peers.initech.example.endpoint: invalid endpoint "
        "'http://gw.initech.example': expected https://HOST[:PORT][/PATH] (no user, query or "
        "fragment)",
        id="endpoint-not-https",
    ),
    pytest.param(
        edit(
            "endpoint: https://gw.initech.example",
            "endpoint: [https://a.initech.example, ftp://b.initech.example]",
        ),
        "conf/acme.yaml:11:43: peers.initech.example.endpoint[1]: invalid endpoint "
        "'ftp://b.initech.example': expected https://HOST[:PORT][/PATH] (no user, query or "
        "fragment)",
        id="endpoint-list-with-a-bad-url",
    ),
    pytest.param(
        edit(
            "endpoint: https://gw.initech.example",
            "endpoint: [https://a.initech.example, https://a.initech.example/]",
        ),
        "conf/acme.yaml:11:43: peers.initech.example.endpoint[1]: duplicate endpoint "
        "'https://a.initech.example/'",
        id="endpoint-list-duplicate",
    ),
    pytest.param(
        edit("endpoint: https://gw.initech.example", "endpoint: []"),
        "conf/acme.yaml:11:15: peers.initech.example.endpoint: give 1 to 8 endpoint URLs, got 0",
        id="endpoint-list-empty",
    ),
    pytest.param(
        edit("  legal:\n    members: [carol]\n", "  legal:\n    <<: {members: [carol]}\n"),
        "conf/acme.yaml:24:5: groups.legal: merge keys (<<) are not supported; write the keys out",
        id="merge-key",
    ),
    pytest.param(
        edit("members: [carol]", "members: !!set {carol}"),
        "conf/acme.yaml:24:14: groups.legal.members: the tag tag:yaml.org,2002:set is not "
        "supported; write a plain mapping",
        id="unsupported-tag",
    ),
    pytest.param(
        edit("members: [carol]", "members: [carol"),
        "conf/acme.yaml:25:1: (yaml): did not find expected ',' or ']' (while parsing a flow "
        "sequence)",
        id="yaml-syntax",
    ),
    pytest.param(
        "- just\n- a list\n",
        "conf/acme.yaml:1:1: (document): expected the rules (a mapping with version, org, "
        "default, peers and groups), got a list",
        id="root-not-a-mapping",
    ),
    pytest.param(
        "# nothing but a comment\n",
        "conf/acme.yaml:1:1: (document): expected the rules (a mapping with version, org, "
        "default, peers and groups), got null",
        id="empty-file",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_each_error_kind_names_line_and_column(
    text: str, expected: str, files: dict[str, bytes]
) -> None:
    found = issues(text, files)
    if expected.endswith("(..."):  # the rest is the library's own wording
        assert any(issue.startswith(expected[:-3]) for issue in found), found
    else:
        assert expected in found


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES[:5])
def test_an_error_is_the_only_issue_when_alone(
    text: str, expected: str, files: dict[str, bytes]
) -> None:
    assert issues(text, files) == [expected]


def test_five_errors_are_all_reported_in_file_order(files: dict[str, bytes]) -> None:
    text = edit("default: deny", "default: allow")
    text = edit(f'pins: ["{PIN}"]', 'pins: ["sha256/abc"]', text)
    text = edit("    send_to: [globex.example]", "    sendto: [globex.example]", text)
    text = edit("{min: 1m, default: 1d, max: 7d}", "{min: 8d, default: 9d, max: 7d}", text)
    text = edit("members: [carol]", "members: [carol, bob]", text)
    found = issues(text, files)
    assert [line.split(": ")[0] for line in found] == [
        "conf/acme.yaml:3:10",
        "conf/acme.yaml:8:12",
        "conf/acme.yaml:17:5",
        "conf/acme.yaml:21:18",
        "conf/acme.yaml:24:22",
    ]
    assert [line.split(": ")[1] for line in found] == [
        "default",
        "peers.globex.example.pins[0]",
        "groups.engineering.sendto",
        "groups.engineering.limits.ttl.min",
        "groups.legal.members[1]",
    ]
    error = RulesError(found)
    assert str(error) == found[0] + " (and 4 more)"


def test_issues_are_bounded(files: dict[str, bytes]) -> None:
    many = ", ".join(f"u{i}..x" for i in range(MAX_REPORTED_ISSUES + 5))
    found = issues(edit("members: [carol]", f"members: [{many}]"), files)
    assert len(found) == MAX_REPORTED_ISSUES + 1
    assert found[-1].endswith("(document): 5 more issues not shown")


def test_ca_path_without_a_reader_is_an_error() -> None:
    with pytest.raises(RulesError) as info:
        load_rules(VALID, filename=FILE)
    assert info.value.issues == [
        "conf/acme.yaml:7:9: peers.globex.example.ca: CA files cannot be read here; use ca_pem",
        "conf/acme.yaml:12:9: peers.initech.example.ca: CA files cannot be read here; use ca_pem",
    ]


def test_a_bad_peer_name_is_not_reported_again_where_it_is_used(files: dict[str, bytes]) -> None:
    text = edit("  globex.example:\n", "  globex_example:\n")
    text = edit("send_to: [globex.example]", "send_to: [globex_example]", text)
    found = issues(text, files)
    assert found == [
        "conf/acme.yaml:5:3: peers.globex_example: invalid peer org domain: domain "
        "'globex_example' needs at least two labels (like acme.example)",
        "conf/acme.yaml:18:20: groups.engineering.receive_from[0]: peer globex.example is not "
        "defined in peers",
    ]


def test_not_utf8_is_reported_with_its_place(files: dict[str, bytes]) -> None:
    with pytest.raises(RulesError) as info:
        load_rules(b"version: 1\norg: \xff\n", filename=FILE)
    assert info.value.issues == ["conf/acme.yaml:2:6: (document): the file is not UTF-8 text"]


def test_a_peer_ca_file_may_hold_a_bundle_of_cas(files: dict[str, bytes]) -> None:
    """Old and new CA side by side, during the peer's CA rollover: both are its anchors."""
    bundle = files["conf/certs/globex-ca.pem"] + files["conf/certs/initech-ca.pem"]
    rules = load(VALID, {**files, "conf/certs/globex-ca.pem": bundle})
    globex = rules.peers["globex.example"]  # type: ignore[attr-defined]
    assert globex.ca_pem.encode() == bundle
    single = load(VALID, files).peers["globex.example"]  # type: ignore[attr-defined]
    assert globex.ca_sha256 != single.ca_sha256  # a changed bundle is a change of trust
    leaf_in_bundle = {**files, "conf/certs/globex-ca.pem": bundle + files["conf/certs/leaf.pem"]}
    assert issues(VALID, leaf_in_bundle) == [
        "conf/acme.yaml:7:9: peers.globex.example.ca: conf/certs/globex-ca.pem: certificate 3: "
        "is not a CA certificate (basicConstraints CA:TRUE missing)"
    ]


def test_a_peer_may_list_several_endpoints(files: dict[str, bytes]) -> None:
    text = edit(
        "endpoint: https://gw.initech.example",
        "endpoint:\n      - https://gw1.initech.example:8443\n"
        "      - https://gw2.initech.example:8443",
    )
    initech = load(text, files).peers["initech.example"]  # type: ignore[attr-defined]
    assert initech.endpoints == (
        "https://gw1.initech.example:8443",
        "https://gw2.initech.example:8443",
    )
    assert initech.endpoint == "https://gw1.initech.example:8443"
    single = load(VALID, files).peers["initech.example"]  # type: ignore[attr-defined]
    assert single.endpoints == ("https://gw.initech.example",)
