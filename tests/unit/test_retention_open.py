"""`gateway retention open` checks each envelope's sender signature offline.

Exports are built here as the gateway builds them (records chained, the file
signed with the org key), including from an archive whose rows someone
rewrote and re-chained (a database administrator: the gateway then signs an
export of what it finds): the chain and the file's signature verify, and only
the sender's own signature, checked against the key recorded with the
envelope, shows what was changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from gateway.cli.common import EXIT_FAILURE, EXIT_OK
from gateway.cli.retention_open import run_open
from gateway.core.address import Address
from gateway.core.archive import (
    ZERO_HASH,
    ArchiveItem,
    ArchiveRecord,
    export_lines,
    record_hash,
    sender_key_blob,
    trailer_line,
)
from gateway.core.envelope import Envelope, encode_envelope
from gateway.core.keytext import format_signing_key
from gateway.crypto.envelope_crypto import seal_v2
from gateway.crypto.key_records import org_verify_key, sign_key_record
from gateway.crypto.keys import UserKeys
from gateway.crypto.retention_keys import RetentionKeyPair, sign_export

ORG_SEED = bytes(range(32))
GLOBEX_SEED = bytes(range(1, 33))
ORG_KEY = format_signing_key(org_verify_key(ORG_SEED))
GLOBEX_KEY = format_signing_key(org_verify_key(GLOBEX_SEED))
NOW = 1_800_000_000_000
ALICE = Address.parse("alice@acme.example")
BOB = Address.parse("bob@globex.example")
TEXT = b"the Q3 numbers, for the record"

RETENTION = RetentionKeyPair.generate("acme-2026")
ALICE_KEYS = UserKeys.generate(ALICE)
BOB_KEYS = UserKeys.generate(BOB)


def sealed(sender: UserKeys = ALICE_KEYS, recipient: UserKeys = BOB_KEYS) -> Envelope:
    return seal_v2(
        TEXT,
        sender=sender,
        recipient=recipient.public(),
        created_ms=NOW,
        expires_ms=NOW + 3_600_000,
        retention_key_id=RETENTION.id,
        retention_public_key=RETENTION.public_key,
    )


def key_of(keys: UserKeys, *, seed: bytes = ORG_SEED) -> bytes:
    """The sender key a gateway archives: the org-signed record and that org's key."""
    record = sign_key_record(keys.public(), org_signing_seed=seed, issued_ms=NOW - 1)
    return sender_key_blob(org_key=format_signing_key(org_verify_key(seed)), record=record.encode())


def export(path: Path, archived: list[tuple[Envelope, bytes]]) -> Path:
    """An export of ``archived`` (envelope, sender key), chained and signed by the org."""
    records, prev = [], ZERO_HASH
    for seq, (env, sender_key) in enumerate(archived, start=1):
        item = ArchiveItem(
            env.id,
            "finance",
            "outbound",
            str(env.sender),
            str(env.recipient),
            RETENTION.id,
            NOW + 86_400_000,
            encode_envelope(env),
            sender_key=sender_key,
        )
        digest = record_hash(seq, item, archived_ms=NOW, prev=prev)
        records.append(
            ArchiveRecord(
                seq,
                item.envelope_id,
                item.group,
                item.direction,
                item.sender,
                item.recipient,
                item.key_id,
                NOW,
                item.delete_after_ms,
                item.envelope,
                prev,
                digest,
                sender_key=sender_key,
            )
        )
        prev = digest
    body = b"".join(export_lines({"org": "acme.example"}, records))
    digest = hashlib.sha256(body).digest()
    path.write_bytes(
        body
        + trailer_line(
            count=len(records),
            body_sha256=digest,
            signature=sign_export(ORG_SEED, digest),
            org_key=ORG_KEY,
        )
    )
    return path


def open_export(
    tmp_path: Path, path: Path, capsys: pytest.CaptureFixture[str], *partners: str
) -> tuple[int, list[dict[str, object]], str]:
    key_file = tmp_path / "acme-2026.key"
    if not key_file.exists():
        RETENTION.save(key_file)
    args = argparse.Namespace(
        file=path, key=[key_file], org_key=ORG_KEY, sender_org_key=list(partners), out=None
    )
    status = run_open(args)
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def test_each_envelope_is_verified_against_the_key_recorded_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sealed()
    status, [message], err = open_export(
        tmp_path, export(tmp_path / "x.jsonl", [(env, key_of(ALICE_KEYS))]), capsys
    )
    assert status == EXIT_OK, err
    assert (message["id"], message["text"]) == (env.id, TEXT.decode())
    assert message["sender_signature"] == "verified"


def test_a_tampered_ciphertext_is_caught_though_chain_and_file_signature_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sealed()
    flipped = bytearray(env.ciphertext)
    flipped[0] ^= 1
    tampered = dataclasses.replace(env, ciphertext=bytes(flipped))
    good = sealed()
    path = export(
        tmp_path / "x.jsonl", [(tampered, key_of(ALICE_KEYS)), (good, key_of(ALICE_KEYS))]
    )
    status, messages, err = open_export(tmp_path, path, capsys)
    assert status == EXIT_FAILURE
    assert (
        f"record 1: envelope {env.id}: sender signature INVALID: the signature of "
        f"{ALICE} does not verify with the key recorded for it" in err
    )
    assert "does not match the file" not in err  # the insider re-signed the file
    assert "its hash does not match" not in err  # and re-chained the records
    # The other record is verified and written.
    assert [(m["id"], m["sender_signature"]) for m in messages] == [(good.id, "verified")]


def test_a_wrong_recorded_key_is_caught_and_the_message_marked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sealed()
    mallory = UserKeys.generate(ALICE)  # alice's address, other keys, signed by the org
    path = export(tmp_path / "x.jsonl", [(env, key_of(mallory))])
    status, [message], err = open_export(tmp_path, path, capsys)
    assert status == EXIT_FAILURE
    assert "sender signature INVALID" in err
    assert message["sender_signature"] == "invalid"
    assert message["text"] == TEXT.decode()  # it opens: the mark says what is wrong


def test_a_key_record_not_signed_by_the_senders_org_is_caught(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sealed()
    # Alice's real keys, vouched for by another org's key than the one that signed the export.
    path = export(tmp_path / "x.jsonl", [(env, key_of(ALICE_KEYS, seed=GLOBEX_SEED))])
    status, _, err = open_export(tmp_path, path, capsys)
    assert status == EXIT_FAILURE
    assert f"vouched for by {GLOBEX_KEY}, not by acme.example's key {ORG_KEY}" in err


def test_a_partners_sender_is_checked_against_the_org_key_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sealed(sender=BOB_KEYS, recipient=ALICE_KEYS)
    path = export(tmp_path / "x.jsonl", [(env, key_of(BOB_KEYS, seed=GLOBEX_SEED))])
    status, [message], err = open_export(tmp_path, path, capsys, f"globex.example={GLOBEX_KEY}")
    assert status == EXIT_OK, err
    assert message["sender_signature"] == "verified"
    status, _, err = open_export(tmp_path, path, capsys, f"globex.example={ORG_KEY}")
    assert status == EXIT_FAILURE
    assert f"not by globex.example's key {ORG_KEY}" in err


def test_a_record_without_a_sender_key_is_marked_unchecked_not_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = sealed()
    status, [message], err = open_export(
        tmp_path, export(tmp_path / "x.jsonl", [(env, b"")]), capsys
    )
    assert status == EXIT_OK, err
    assert message["sender_signature"] == "unchecked"
    assert "1 record(s) carry no sender key" in err
