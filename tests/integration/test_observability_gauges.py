"""The state gauges: spool and mailboxes from a real SQLite store, certificates from
real files and real rules, refreshed on the refresher's period and on rules reloads.

Values are read back from the process's registry, as ``/metrics`` would render them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from gateway.core.keytext import format_signing_key
from gateway.federation.sweeper import SpoolGauges
from gateway.observability.certs import (
    FEDERATION,
    ORG_CA,
    CertificateGauges,
    earliest_not_after,
    read_own_not_after,
)
from gateway.observability.gauges import (
    GAUGE_REFRESH_INTERVAL,
    MailboxGauges,
    refresh_gauges,
    run_gauge_refresher,
)
from gateway.pki import dev
from gateway.rules_runtime import RulesHolder
from gateway.storage.base import EnvelopeRecord, LaneStats, MailboxDepth, SpoolItem, Storage
from gateway.storage.sqlite import open_sqlite_storage
from tests.certs_for_tests import CertAuthority

ORG, GLOBEX, INITECH = "acme.example", "globex.example", "initech.example"
NOW_MS = 1_800_000_000_000
HOUR_MS = 3_600_000


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def ca_expiring_in(days: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ca {days}")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_rules(path: Path, peers: dict[str, Path]) -> None:
    key = format_signing_key(dev.signing_public_key_raw(dev.generate_signing_key()))
    lines = ["version: 1", f"org: {ORG}", "default: deny", "peers:" if peers else "peers: {}"]
    for org, ca_file in peers.items():
        lines += [
            f"  {org}:",
            f"    endpoint: https://gw.{org}:8443",
            f"    ca: {ca_file}",
            f"    signing_key: {key}",
        ]
    lines += [
        "groups:",
        "  engineering:",
        "    members: [alice, bob]",
        "  legal:",
        "    members: [carol]",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def peer_cas(tmp_path: Path) -> dict[str, tuple[Path, x509.Certificate]]:
    found = {}
    for org, days in ((GLOBEX, 10), (INITECH, 200)):
        cert = ca_expiring_in(days)
        path = tmp_path / f"{org}-ca.pem"
        path.write_bytes(pem(cert))
        found[org] = (path, cert)
    return found


def record(n: int, recipient: str, size: int) -> EnvelopeRecord:
    return EnvelopeRecord(
        envelope_id=f"env{n:04d}",
        sender=f"zed@{GLOBEX}",
        recipient=recipient,
        created_ms=NOW_MS,
        expires_ms=NOW_MS + 24 * HOUR_MS,
        burn_on_read=False,
        data=bytes(size),
    )


def spool_item(n: int, peer: str) -> SpoolItem:
    return SpoolItem(
        envelope_id=f"out{n:04d}",
        sender=f"alice@{ORG}",
        recipient=f"bob@{peer}",
        created_ms=NOW_MS,
        expires_ms=NOW_MS + 24 * HOUR_MS,
        burn_on_read=False,
        data=bytes(100),
        peer=peer,
    )


async def fill(store: Storage) -> None:
    await store.mailbox_put_local(
        [
            record(1, f"alice@{ORG}", 100),
            record(2, f"alice@{ORG}", 50),
            record(3, f"bob@{ORG}", 10),
            record(4, f"carol@{ORG}", 7),
            record(5, f"mallory@{ORG}", 1),  # in no group: counted under "other"
        ],
        at_ms=NOW_MS,
    )
    await store.spool_put([spool_item(1, GLOBEX), spool_item(2, GLOBEX)], at_ms=NOW_MS)
    await store.spool_put([spool_item(3, "gone.example")], at_ms=NOW_MS + HOUR_MS)


async def test_mailbox_and_spool_gauges_follow_the_store(
    tmp_path: Path, peer_cas: dict[str, tuple[Path, x509.Certificate]]
) -> None:
    rules_file = tmp_path / "rules.yaml"
    write_rules(rules_file, {GLOBEX: peer_cas[GLOBEX][0]})
    holder = RulesHolder.load(rules_file)
    async with open_sqlite_storage(tmp_path / "gw.sqlite3") as store:
        await fill(store)
        spool, mailboxes = SpoolGauges(), MailboxGauges()
        await refresh_gauges(
            store, holder.current, now_ms=NOW_MS + 2 * HOUR_MS, spool=spool, mailboxes=mailboxes
        )
        assert sample("gateway_mailbox_envelopes", group="engineering") == 3
        assert sample("gateway_mailbox_bytes", group="engineering") == 160
        assert sample("gateway_mailbox_envelopes", group="legal") == 1
        assert sample("gateway_mailbox_envelopes", group="other") == 1
        assert sample("gateway_spool_envelopes", peer=GLOBEX) == 2
        assert sample("gateway_spool_oldest_age_seconds", peer=GLOBEX) == 2 * 3600
        # A lane of an org the rules do not name is reported as "other", never by its name.
        assert sample("gateway_spool_envelopes", peer="other") == 1
        assert sample("gateway_spool_envelopes", peer="gone.example") is None

        # Emptied mailboxes show 0 (their group stays known); labels never name a user.
        await store.mailbox_ack(f"carol@{ORG}", ["env0004"])
        await store.mailbox_ack(f"mallory@{ORG}", ["env0005"])
        await refresh_gauges(
            store, holder.current, now_ms=NOW_MS + 2 * HOUR_MS, spool=spool, mailboxes=mailboxes
        )
        assert sample("gateway_mailbox_envelopes", group="legal") == 0
        assert sample("gateway_mailbox_envelopes", group="other") is None
        rendered = [
            s.labels.get("group", "")
            for metric in REGISTRY.collect()
            if metric.name == "gateway_mailbox_envelopes"
            for s in metric.samples
        ]
        assert not any("@" in label or label in {"alice", "bob"} for label in rendered)


class TimedStorage:
    """Mailbox and spool stats from memory, noting the (virtual) time of every read."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, MailboxDepth] = {}
        self.reads: list[float] = []

    async def spool_stats(self) -> dict[str, LaneStats]:
        return {}

    async def mailbox_stats(self) -> dict[str, MailboxDepth]:
        self.reads.append(trio.current_time())
        return dict(self.mailboxes)


async def test_the_refresher_runs_on_its_period(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rules_file = tmp_path / "rules.yaml"
    write_rules(rules_file, {})
    holder = RulesHolder.load(rules_file)
    own_ca = CertAuthority.create("acme CA")
    own = {ORG_CA: own_ca.write(tmp_path, "org-ca")}
    store = TimedStorage()
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(
            lambda *, task_status: run_gauge_refresher(
                store,
                holder,
                clock_ms=lambda: NOW_MS,
                own_certificates=own,
                certificates=CertificateGauges(),
                task_status=task_status,
            )
        )
        # Started: the first refresh is done, and the own CA's expiry is shown.
        assert sample("gateway_mailbox_envelopes", group="legal") == 0
        not_after = own_ca.cert.not_valid_after_utc.timestamp()
        assert sample("gateway_certificate_not_after_timestamp_seconds", certificate=ORG_CA) == (
            not_after
        )
        store.mailboxes[f"carol@{ORG}"] = MailboxDepth(envelopes=4, bytes=40)
        await trio.sleep(GAUGE_REFRESH_INTERVAL / 2)
        assert sample("gateway_mailbox_envelopes", group="legal") == 0  # not yet
        await trio.sleep(GAUGE_REFRESH_INTERVAL * 3)
        assert sample("gateway_mailbox_envelopes", group="legal") == 4
        nursery.cancel_scope.cancel()
    periods = [round((t - started) / GAUGE_REFRESH_INTERVAL, 6) for t in store.reads]
    assert periods == [0, 1, 2, 3]


async def test_peer_ca_expiry_follows_rules_reloads(
    tmp_path: Path, peer_cas: dict[str, tuple[Path, x509.Certificate]]
) -> None:
    rules_file = tmp_path / "rules.yaml"
    write_rules(rules_file, {GLOBEX: peer_cas[GLOBEX][0]})
    holder = RulesHolder.load(rules_file)
    gauges = CertificateGauges()
    unsubscribe = gauges.follow(holder)
    globex_not_after = peer_cas[GLOBEX][1].not_valid_after_utc.timestamp()
    initech_not_after = peer_cas[INITECH][1].not_valid_after_utc.timestamp()
    name = "gateway_certificate_not_after_timestamp_seconds"
    assert sample(name, certificate=GLOBEX) == globex_not_after
    assert sample(name, certificate=INITECH) is None

    write_rules(rules_file, {INITECH: peer_cas[INITECH][0]})  # globex out, initech in
    await holder.reload()
    assert sample(name, certificate=INITECH) == initech_not_after
    assert sample(name, certificate=GLOBEX) is None  # no stale series left to alert on

    unsubscribe()
    write_rules(rules_file, {GLOBEX: peer_cas[GLOBEX][0]})
    await holder.reload()
    assert sample(name, certificate=GLOBEX) is None  # unsubscribed: no longer followed
    gauges.show_peers(holder.current)  # leave the registry as the rules say


def test_a_chain_reports_its_earliest_expiry(tmp_path: Path) -> None:
    early, late = ca_expiring_in(5), ca_expiring_in(50)
    assert earliest_not_after(pem(late) + pem(early), source="chain") == (
        early.not_valid_after_utc.timestamp()
    )


def test_an_unreadable_own_certificate_keeps_its_last_value_and_is_counted(
    tmp_path: Path,
) -> None:
    cert_file = tmp_path / "federation.pem"
    cert = ca_expiring_in(30)
    cert_file.write_bytes(pem(cert))
    gauges = CertificateGauges()
    gauges.show_own(read_own_not_after({FEDERATION: cert_file}))
    name = "gateway_certificate_not_after_timestamp_seconds"
    assert sample(name, certificate=FEDERATION) == cert.not_valid_after_utc.timestamp()
    errors_before = sample("gateway_certificate_read_errors_total", certificate=FEDERATION) or 0

    cert_file.write_bytes(b"not a certificate")
    found = read_own_not_after({FEDERATION: cert_file})
    assert found == {FEDERATION: None}
    gauges.show_own(found)
    assert sample(name, certificate=FEDERATION) == cert.not_valid_after_utc.timestamp()
    assert sample("gateway_certificate_read_errors_total", certificate=FEDERATION) == (
        errors_before + 1
    )


def test_own_certificate_names_are_a_closed_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of"):
        read_own_not_after({"alice@acme.example": tmp_path / "x.pem"})
