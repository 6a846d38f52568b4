"""Archive records, exports and the retention key file, without a gateway."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.archive import (
    ZERO_HASH,
    ArchiveItem,
    ArchiveRecord,
    check_chain,
    export_lines,
    parse_sender_key,
    read_export,
    record_hash,
    sender_key_blob,
    trailer_line,
)
from gateway.crypto.key_records import org_verify_key
from gateway.crypto.retention_keys import (
    RetentionKeyPair,
    export_signature_verifies,
    sign_export,
)
from gateway.errors import PKIError

SEED = bytes(range(32))


def chain(n: int) -> list[ArchiveRecord]:
    records, prev = [], ZERO_HASH
    for seq in range(1, n + 1):
        item = ArchiveItem(
            f"id{seq}",
            "finance",
            "outbound",
            "a@acme.example",
            "b@globex.example",
            "k1",
            10_000,
            b'{"v":2,"id":"x%d"}' % seq,
        )
        digest = record_hash(seq, item, archived_ms=1000 + seq, prev=prev)
        records.append(
            ArchiveRecord(
                seq,
                item.envelope_id,
                item.group,
                item.direction,
                item.sender,
                item.recipient,
                item.key_id,
                1000 + seq,
                item.delete_after_ms,
                item.envelope,
                prev,
                digest,
            )
        )
        prev = digest
    return records


def export_of(records: list[ArchiveRecord]) -> bytes:
    lines = list(export_lines({"org": "acme.example"}, records))
    body = b"".join(lines)
    digest = hashlib.sha256(body).digest()
    return body + trailer_line(
        count=len(records),
        body_sha256=digest,
        signature=sign_export(SEED, digest),
        org_key="ed25519:x",
    )


def test_an_export_reads_back_and_verifies() -> None:
    records = chain(3)
    export = read_export(export_of(records))
    assert export.records == tuple(records)
    assert export.body_sha256 == export.claimed_sha256
    assert export_signature_verifies(org_verify_key(SEED), export.body_sha256, export.signature)
    assert not export_signature_verifies(bytes(32), export.body_sha256, export.signature)
    assert check_chain(list(export.records)) == []


def test_a_changed_or_cut_export_is_caught() -> None:
    data = export_of(chain(3))
    changed = read_export(data.replace(b"b@globex.example", b"c@globex.example", 1))
    assert changed.body_sha256 != changed.claimed_sha256
    assert check_chain(list(changed.records)) == ["record 1: its hash does not match its content"]
    with pytest.raises(ValueError, match=r"cut short|trailer"):
        read_export(data[: data.rindex(b'{"count"')])
    with pytest.raises(ValueError, match="not an export"):
        read_export(b"hello\n")


def test_a_record_out_of_its_chain_is_caught() -> None:
    records = chain(3)
    swapped = [records[0], dataclasses.replace(records[1], prev=bytes(32)), records[2]]
    problems = check_chain(swapped)
    assert "record 2: its hash does not match its content" in problems
    assert "record 2: does not follow record 1" in problems


def test_the_key_file_is_private_and_checked(tmp_path: Path) -> None:
    pair = RetentionKeyPair.generate("acme-2026")
    path = tmp_path / "k.key"
    pair.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert RetentionKeyPair.load(path) == pair
    assert pair.secret.hex() not in repr(pair)
    with pytest.raises(PKIError, match="exists"):
        pair.save(path)
    os.chmod(path, 0o644)
    with pytest.raises(PKIError):
        RetentionKeyPair.load(path)
    os.chmod(path, 0o600)
    path.write_text(path.read_text().replace('"acme-2026"', '"-bad"'))
    with pytest.raises(PKIError, match="bad id"):
        RetentionKeyPair.load(path)
    with pytest.raises(ValueError, match="invalid retention key id"):
        RetentionKeyPair.generate("not ok")


@given(st.binary(max_size=3000))
def test_random_bytes_are_no_export(data: bytes) -> None:
    try:
        export = read_export(data)
    except ValueError:
        return
    assert export.header["kind"] == "gateway-retention-export"


@settings(max_examples=200)
@given(st.data())
def test_a_cut_or_flipped_export_is_refused_or_fails_a_check(data: st.DataObject) -> None:
    good = export_of(chain(2))
    original = read_export(good)
    position = data.draw(st.integers(min_value=0, max_value=len(good) - 1))
    flipped = bytearray(good)
    flipped[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    for changed in (bytes(flipped), good[:position]):
        try:
            export = read_export(changed)
        except ValueError:
            continue
        if (
            export.body_sha256 == export.claimed_sha256
            and export_signature_verifies(
                org_verify_key(SEED), export.claimed_sha256, export.signature
            )
            and check_chain(list(export.records)) == []
        ):
            # Undetected only if it changed nothing that counts (the case of a hex digit
            # in the trailer, say; its org_key text is what `open --org-key` checks).
            assert export.header == original.header
            assert export.records == original.records
            assert export.claimed_sha256 == original.claimed_sha256


def test_a_sender_key_is_hashed_and_records_without_one_keep_the_v1_hash() -> None:
    records = chain(2)
    # A record without a sender key hashes exactly as version 1 did: old chains verify.
    record = records[0]
    v1 = hashlib.sha256(b"gateway-retention-archive-v1\x00")
    for field in (
        b"1",
        record.envelope_id.encode(),
        b"finance",
        b"outbound",
        b"a@acme.example",
        b"b@globex.example",
        b"k1",
        str(record.archived_ms).encode(),
        b"10000",
        b"",
        record.envelope,
    ):
        v1.update(len(field).to_bytes(4, "big") + field)
    v1.update(ZERO_HASH)
    assert record.hash == v1.digest()
    # A recorded sender key is covered: adding, changing or dropping one breaks the chain.
    blob = sender_key_blob(org_key="ed25519:x", record=b'{"v":1}')
    keyed = dataclasses.replace(record, sender_key=blob)
    keyed = dataclasses.replace(keyed, hash=keyed.expected_hash())
    assert keyed.hash != record.hash
    assert check_chain([keyed]) == []
    swapped = dataclasses.replace(keyed, sender_key=blob.replace(b"x", b"y"))
    assert check_chain([swapped]) == ["record 1: its hash does not match its content"]
    assert check_chain([dataclasses.replace(keyed, sender_key=b"")]) != []
    assert parse_sender_key(blob) == ("ed25519:x", {"v": 1})
    with pytest.raises(ValueError, match="not"):
        parse_sender_key(b'{"record": {}}')


def test_an_export_of_version_1_still_reads() -> None:
    data = export_of(chain(2))
    old = data.replace(b'"v":2', b'"v":1', 1).replace(b',"sender_key":""', b"")
    assert b'"v":1' in old.split(b"\n")[0]
    assert b"sender_key" not in old
    export = read_export(old)  # the digest no longer matches: only the shape is read here
    assert [r.sender_key for r in export.records] == [b"", b""]
    assert check_chain(list(export.records)) == []
