"""The peer identity check with intermediates, without a network (pure).

Hierarchies are minted with cryptography (:mod:`tests.chains_for_tests`); the
checks are :func:`chain_to_anchor` and :func:`verify_peer_certificate`.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import PeerAuthError, PKIError, Reason
from gateway.pki.certs import bundle_sha256, load_ca_bundle_pem
from gateway.pki.identity import (
    MAX_INTERMEDIATES,
    MAX_PRESENTED_CERTIFICATES,
    PeerTrust,
    chain_to_anchor,
    verify_peer_certificate,
)
from tests.chains_for_tests import Node

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def globex() -> Node:
    return Node.root("globex root")


@pytest.fixture(scope="module")
def initech() -> Node:
    return Node.root("initech root")


def trust(**roots: Node) -> dict[str, PeerTrust]:
    return {
        f"{name}.example": PeerTrust(org=f"{name}.example", cas=(root.cert,))
        for name, root in roots.items()
    }


def check(leaf: Node, present: list[Node], peers: dict[str, PeerTrust]) -> str:
    return verify_peer_certificate(
        leaf.der, peers, now=NOW, intermediates=[node.der for node in present]
    )


def refused(leaf: Node, present: list[Node], peers: dict[str, PeerTrust]) -> Reason:
    with pytest.raises(PeerAuthError) as caught:
        check(leaf, present, peers)
    return caught.value.reason


def test_path_through_intermediates_to_the_peers_root(globex: Node, initech: Node) -> None:
    issuing = globex.ca("globex issuing")
    team = issuing.ca("globex team")
    leaf = team.leaf("globex.example")
    path = chain_to_anchor(leaf.cert, [issuing.cert, team.cert], [globex.cert], now=NOW)
    assert path == (leaf.cert, team.cert, issuing.cert, globex.cert)
    assert check(leaf, [issuing, team], trust(globex=globex, initech=initech)) == "globex.example"
    # The root presented too, as many servers do: ignored, the anchor is ours.
    assert check(leaf, [team, issuing, globex], trust(globex=globex)) == "globex.example"


def test_another_partners_hierarchy_never_vouches_for_an_org(globex: Node, initech: Node) -> None:
    peers = trust(globex=globex, initech=initech)
    globex_issuing = globex.ca("globex issuing")
    initech_issuing = initech.ca("initech issuing")
    forged = globex_issuing.leaf("initech.example")
    assert refused(forged, [globex_issuing], peers) is Reason.CERT_WRONG_CA
    assert refused(forged, [globex_issuing, initech_issuing], peers) is Reason.CERT_WRONG_CA
    # globex's root itself issuing for initech, directly: the same.
    assert refused(globex.leaf("initech.example"), [], peers) is Reason.CERT_WRONG_CA
    # An intermediate that copies initech's issuing CA's name but has globex's key.
    lookalike = globex.ca("initech issuing")
    assert refused(lookalike.leaf("initech.example"), [lookalike], peers) is Reason.CERT_WRONG_CA


def test_missing_intermediate(globex: Node) -> None:
    leaf = globex.ca("globex issuing").leaf("globex.example")
    assert refused(leaf, [], trust(globex=globex)) is Reason.CERT_WRONG_CA


def test_leaf_signed_by_a_non_ca(globex: Node) -> None:
    issuing = globex.ca("globex issuing")
    not_a_ca = issuing.leaf("globex.example")
    leaf = not_a_ca.leaf("globex.example")
    assert refused(leaf, [not_a_ca, issuing], trust(globex=globex)) is Reason.CERT_UNTRUSTED


def test_intermediate_without_key_cert_sign(globex: Node) -> None:
    issuing = globex.ca("globex issuing", cert_sign=False)
    leaf = issuing.leaf("globex.example")
    assert refused(leaf, [issuing], trust(globex=globex)) is Reason.CERT_UNTRUSTED


def test_path_length_constraints(globex: Node) -> None:
    # The root allows no intermediate at all.
    strict = Node.root("strict root", path_length=0)
    issuing = strict.ca("strict issuing")
    assert refused(issuing.leaf("strict.example"), [issuing], trust(strict=strict)) is (
        Reason.CERT_UNTRUSTED
    )
    assert check(strict.leaf("strict.example"), [], trust(strict=strict)) == "strict.example"
    # An intermediate with pathlen 0 may issue leaves, not another CA.
    issuing = globex.ca("globex issuing", path_length=0)
    team = issuing.ca("globex team")
    assert check(issuing.leaf("globex.example"), [issuing], trust(globex=globex))
    assert refused(team.leaf("globex.example"), [team, issuing], trust(globex=globex)) is (
        Reason.CERT_UNTRUSTED
    )


def test_expired_or_not_yet_valid_intermediate(globex: Node) -> None:
    expired = globex.ca(
        "globex old", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )
    leaf = expired.leaf("globex.example", not_before=NOW - timedelta(days=2))
    assert refused(leaf, [expired], trust(globex=globex)) is Reason.CERT_EXPIRED
    future = globex.ca("globex next", not_before=NOW + timedelta(days=1))
    assert refused(future.leaf("globex.example"), [future], trust(globex=globex)) is (
        Reason.CERT_EXPIRED
    )
    # A valid renewal of the same intermediate (same name and key) beside the expired one.
    renewed = globex._issue(  # same subject, new validity: a cross-renewal
        expired.cert.subject,
        ca=True,
        path_length=None,
        names=(),
        cert_sign=True,
        not_before=None,
        not_after=None,
    )
    renewed_leaf = renewed.leaf("globex.example")
    assert check(renewed_leaf, [expired, renewed], trust(globex=globex)) == "globex.example"


def test_expired_leaf_under_a_good_chain(globex: Node) -> None:
    issuing = globex.ca("globex issuing")
    leaf = issuing.leaf(
        "globex.example", not_before=NOW - timedelta(days=9), not_after=NOW - timedelta(days=1)
    )
    assert refused(leaf, [issuing], trust(globex=globex)) is Reason.CERT_EXPIRED


def test_bounds_on_presented_certificates_and_depth(globex: Node) -> None:
    chain = [globex]
    for depth in range(MAX_INTERMEDIATES + 1):
        chain.append(chain[-1].ca(f"level {depth}"))
    too_deep = chain[-1].leaf("globex.example")
    assert refused(too_deep, chain[1:], trust(globex=globex)) is Reason.CERT_WRONG_CA
    just_deep_enough = chain[-2].leaf("globex.example")
    assert check(just_deep_enough, chain[1:-1], trust(globex=globex)) == "globex.example"
    issuing = globex.ca("globex issuing")
    noise = [issuing] * MAX_PRESENTED_CERTIFICATES
    assert refused(issuing.leaf("globex.example"), noise, trust(globex=globex)) is (
        Reason.CERT_UNTRUSTED
    )


def test_a_self_signed_certificate_in_the_presented_chain_is_no_loop(globex: Node) -> None:
    other = Node.root("globex root")  # the same name as globex's root, another key
    leaf = other.leaf("globex.example")
    assert refused(leaf, [other, other], trust(globex=globex)) is Reason.CERT_WRONG_CA


def test_garbage_intermediate_is_refused(globex: Node) -> None:
    leaf = globex.leaf("globex.example")
    with pytest.raises(PeerAuthError) as caught:
        verify_peer_certificate(leaf.der, trust(globex=globex), now=NOW, intermediates=[b"junk"])
    assert caught.value.reason is Reason.CERT_UNTRUSTED


def test_peer_with_two_cas(globex: Node) -> None:
    new = Node.root("globex root 2")
    peers = {
        "globex.example": PeerTrust.from_pem("globex.example", globex.pem + new.pem, source="test")
    }
    assert check(globex.leaf("globex.example"), [], peers) == "globex.example"
    issuing = new.ca("globex issuing 2")
    assert check(issuing.leaf("globex.example"), [issuing], peers) == "globex.example"


def test_ca_bundle_rules(globex: Node, initech: Node) -> None:
    assert load_ca_bundle_pem(globex.pem + initech.pem, source="b") == (globex.cert, initech.cert)
    assert bundle_sha256([globex.cert]) == hashlib.sha256(globex.der).hexdigest()
    with pytest.raises(PKIError, match="twice"):
        load_ca_bundle_pem(globex.pem + globex.pem, source="b")
    with pytest.raises(PKIError, match="certificate 2: is not a CA"):
        load_ca_bundle_pem(globex.pem + globex.leaf("x.example").pem, source="b")
    with pytest.raises(PKIError, match="at most"):
        load_ca_bundle_pem(b"".join(Node.root(f"r{i}").pem for i in range(9)), source="b")
    with pytest.raises(ValueError, match="at least one CA"):
        PeerTrust(org="globex.example", cas=())
