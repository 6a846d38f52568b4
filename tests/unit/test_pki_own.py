"""Our own certificate pair: checked before use, and hot-reloaded by CertificateHolder.

``check_own_certificate`` is pure; the holder reads real files under
``tmp_path`` (a worker thread), with no network.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.errors import PKIError
from gateway.pki.own import check_own_certificate
from gateway.tls_runtime import CertificateHolder
from tests.chains_for_tests import Node

ORG = "acme.example"
NOW = datetime.now(UTC)


def reloads(name: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_certificate_reloads_total", {"certificate": name, "result": result}
    )
    return value or 0.0


def not_after(name: str) -> float | None:
    return REGISTRY.get_sample_value(
        "gateway_certificate_not_after_timestamp_seconds", {"certificate": name}
    )


@pytest.fixture(scope="module")
def root() -> Node:
    return Node.root("acme root")


def check(leaf: Node, *, key: Node | None = None, cas: tuple[Node, ...] = (), present=None):  # type: ignore[no-untyped-def]
    presented = leaf.chain()[1:] if present is None else present
    return check_own_certificate(
        leaf.pem + b"".join(node.pem for node in presented),
        (key or leaf).key_pem,
        cert_source="gw.pem",
        key_source="gw.key",
        now=NOW,
        org=ORG,
        cas=tuple(node.cert for node in cas),
    )


def test_a_good_pair_with_its_intermediate(root: Node) -> None:
    issuing = root.ca("acme issuing")
    leaf = issuing.leaf(ORG)
    own = check(leaf, cas=(root,))
    assert own.leaf == leaf.cert
    assert own.intermediates == (issuing.cert,)
    assert (
        own.not_after
        == min(leaf.cert.not_valid_after_utc, issuing.cert.not_valid_after_utc).timestamp()
    )
    assert "acme.example" in own.describe()
    assert "PRIVATE" not in repr(own)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other_key", "gw.key: is not the private key of the certificate in gw.pem"),
        ("expired", "gw.pem: not valid now"),
        ("other_org", "gw.pem: names globex.example, not this org acme.example"),
        ("other_ca", "gw.pem: does not chain to the org CA"),
        ("missing_intermediate", "gw.pem: does not chain to the org CA"),
        ("no_san", "gw.pem: certificate has no subjectAltName"),
    ],
)
def test_bad_pairs_say_what_is_wrong(root: Node, case: str, message: str) -> None:
    issuing = root.ca("acme issuing")
    good = issuing.leaf(ORG)

    def attempt() -> None:
        if case == "other_key":
            check(good, key=issuing.leaf(ORG), cas=(root,))
        elif case == "expired":
            old = issuing.leaf(
                ORG, not_before=NOW - timedelta(days=9), not_after=NOW - timedelta(1)
            )
            check(old, cas=(root,))
        elif case == "other_org":
            check(issuing.leaf("globex.example"), cas=(root,))
        elif case == "other_ca":
            check(Node.root("stranger").leaf(ORG), cas=(root,))
        elif case == "missing_intermediate":
            check(good, cas=(root,), present=[])
        else:
            check(issuing.leaf(), cas=(root,))

    with pytest.raises(PKIError) as caught:
        attempt()
    assert caught.value.message.startswith(message)


def test_garbage_files(root: Node) -> None:
    leaf = root.leaf(ORG)
    with pytest.raises(PKIError, match=r"gw\.pem: (not a PEM certificate|holds no PEM)"):
        check_own_certificate(
            b"junk", leaf.key_pem, cert_source="gw.pem", key_source="gw.key", now=NOW
        )
    with pytest.raises(PKIError, match=r"^gw\.key: not an unencrypted PEM private key$"):
        check_own_certificate(leaf.pem, b"junk", cert_source="gw.pem", key_source="gw.key", now=NOW)


def write_pair(directory: Path, leaf: Node, *, key: Node | None = None) -> None:
    (directory / "gw.pem").write_bytes(leaf.pem + b"".join(n.pem for n in leaf.chain()[1:]))
    (directory / "gw.key").write_bytes((key or leaf).key_pem)
    (directory / "gw.key").chmod(0o600)  # the gateway refuses a key others may read


async def test_holder_swaps_a_good_pair_and_keeps_the_old_for_a_bad_one(
    tmp_path: Path, root: Node
) -> None:
    (tmp_path / "ca.pem").write_bytes(root.pem)
    issuing = root.ca("acme issuing")
    first = issuing.leaf(ORG)
    write_pair(tmp_path, first)
    holder = CertificateHolder(
        "federation", tmp_path / "gw.pem", tmp_path / "gw.key", org=ORG, ca_file=tmp_path / "ca.pem"
    )
    seen = []
    holder.subscribe(seen.append)
    assert holder.current.leaf == first.cert
    assert not_after("federation") == holder.current.not_after

    # Half-written: a new key beside the old certificate. Kept, counted, nobody told.
    second = issuing.leaf(ORG, not_after=NOW + timedelta(days=20))
    failures = reloads("federation", "failure")
    (tmp_path / "gw.key").write_bytes(second.key_pem)
    record = await holder.reload(trigger="file", only_if_changed=True)
    assert record is not None
    assert not record.ok
    assert "is not the private key" in record.summary
    assert reloads("federation", "failure") == failures + 1
    assert holder.current.leaf == first.cert
    assert seen == []
    assert not_after("federation") == first.cert.not_valid_after_utc.timestamp()
    # Nothing changed since that attempt: no second count.
    assert await holder.reload(trigger="file", only_if_changed=True) is None

    # The certificate lands: swapped, subscribers told, gauge follows.
    write_pair(tmp_path, second)
    record = await holder.reload(trigger="file", only_if_changed=True)
    assert record is not None
    assert record.ok
    assert holder.current.leaf == second.cert
    assert [own.leaf for own in seen] == [second.cert]
    assert not_after("federation") == pytest.approx(holder.current.not_after)

    # A certificate of another org, a file gone, a CA file that lost our CA: all kept.
    for breakage in ("other_org", "gone", "ca"):
        if breakage == "other_org":
            write_pair(tmp_path, issuing.leaf("globex.example"))
        elif breakage == "gone":
            (tmp_path / "gw.pem").unlink()
        else:
            write_pair(tmp_path, second)
            (tmp_path / "ca.pem").write_bytes(Node.root("stranger").pem)
        record = await holder.reload(trigger="sighup")
        assert record is not None, breakage
        assert not record.ok, breakage
        assert holder.current.leaf == second.cert
    assert [own.leaf for own in seen] == [second.cert]


def test_holder_refuses_to_start_on_a_bad_pair(tmp_path: Path, root: Node) -> None:
    (tmp_path / "ca.pem").write_bytes(root.pem)
    write_pair(tmp_path, root.leaf(ORG), key=root.leaf(ORG))
    with pytest.raises(PKIError, match="is not the private key"):
        CertificateHolder(
            "federation",
            tmp_path / "gw.pem",
            tmp_path / "gw.key",
            org=ORG,
            ca_file=tmp_path / "ca.pem",
        )
