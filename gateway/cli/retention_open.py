"""``gateway retention open``: check an export offline and open its records.

What is checked, in this order (docs/retention.md, "What `open` verifies"):

1. the file: the trailer's SHA-256 over every line before it, and the org's
   signature over that digest (against ``--org-key`` when given);
2. the archive: each record's hash, and the chain between consecutive ones;
3. each envelope's **sender**: the key record recorded with it must be signed
   by the sender's org key recorded beside it (for a sender of the exporting
   org, the key that signed the export; for a partner's, the one given with
   ``--sender-org-key`` when given), name the envelope's sender, and verify
   the envelope's signature. A record archived without a sender key (by an
   older version, or whose sender had published none) is marked
   ``unchecked``, not refused;
4. each envelope opens with the retention key its id names, and its retention
   copy is honest.

Each failure is named on stderr, per record; the records that did open are
still written, each with ``sender_signature`` (``verified``, ``invalid`` or
``unchecked``), and the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from gateway.cli.common import EXIT_FAILURE, EXIT_OK, UsageError
from gateway.core.archive import ArchiveRecord, Export, check_chain, parse_sender_key, read_export
from gateway.core.durations import format_time_ms
from gateway.core.envelope import Envelope, RetentionWrap, decode_envelope
from gateway.core.keytext import parse_signing_key
from gateway.crypto.envelope_crypto import open_retained
from gateway.crypto.key_records import envelope_signed_by, parse_verified_key_record
from gateway.crypto.retention_keys import RetentionKeyPair, export_signature_verifies
from gateway.errors import ConfigError, EnvelopeError, EnvelopeOpenError, KeyRecordError

# What `open` reads at most (into memory): export a shorter --from/--to range beyond it.
MAX_EXPORT_FILE_BYTES: Final = 1024**3
PRIVATE_FILE_MODE: Final = 0o600  # exports and opened text: for the compliance officer only

VERIFIED: Final = "verified"
INVALID: Final = "invalid"
UNCHECKED: Final = "unchecked"


def private_file(path: Path) -> IO[bytes]:
    """A new file only its owner may read (never an existing one: no overwrite)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return open(fd, "wb")


def _sender_org_keys(values: list[str]) -> dict[str, str]:
    keys = {}
    for value in values:
        org, sep, key = value.partition("=")
        if not sep or not org:
            raise UsageError(f"--sender-org-key {value!r}: expected ORG=KEY")
        try:
            parse_signing_key(key)
        except ValueError as exc:
            raise UsageError(f"--sender-org-key {value!r}: {exc}") from None
        keys[org] = key
    return keys


def run_open(args: argparse.Namespace) -> int:
    keys: dict[str, RetentionKeyPair] = {}
    for key_path in args.key:
        pair = RetentionKeyPair.load(key_path)
        keys[pair.id] = pair
    sender_org_keys = _sender_org_keys(args.sender_org_key)
    try:
        size = args.file.stat().st_size
        if size > MAX_EXPORT_FILE_BYTES:
            raise UsageError(
                f"{args.file}: larger than {MAX_EXPORT_FILE_BYTES} bytes; "
                "export shorter ranges (--from, --to)"
            )
        data = args.file.read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.file}: cannot read: {exc.strerror or exc}") from None
    try:
        export = read_export(data)
    except ValueError as exc:
        print(f"gateway: {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    problems = check_export(export, args.org_key)
    senders = SenderKeys(
        org=str(export.header.get("org")), org_key=export.org_key, partners=sender_org_keys
    )
    unchecked: list[int] = []
    lines = list(open_records(export.records, keys, senders, problems, unchecked))
    if args.out is not None:
        with private_file(args.out) as out:
            for line in lines:
                out.write(line.encode("utf-8"))
    else:
        for line in lines:
            sys.stdout.write(line)
    for problem in problems:
        print(f"gateway: {args.file}: {problem}", file=sys.stderr)
    if unchecked:
        print(
            f"gateway: {args.file}: {len(unchecked)} record(s) carry no sender key "
            "(archived before this version, or the sender had published none): their "
            "sender signature was not checked",
            file=sys.stderr,
        )
    print(
        f"opened {len(lines)} of {len(export.records)} record(s) of {export.header.get('org')}",
        file=sys.stderr,
    )
    return EXIT_FAILURE if problems else EXIT_OK


def check_export(export: Export, required_key: str | None) -> list[str]:
    """Problems with the file as a whole: its digest, its signature, the chain."""
    problems: list[str] = []
    if export.body_sha256 != export.claimed_sha256:
        problems.append("the SHA-256 in the trailer does not match the file: altered or cut")
    try:
        signer = parse_signing_key(export.org_key)
    except ValueError:
        problems.append("the trailer's org key is malformed")
    else:
        if required_key is not None and export.org_key != required_key:
            problems.append(f"signed by {export.org_key}, not the org key required")
        if not export_signature_verifies(signer, export.claimed_sha256, export.signature):
            problems.append("the org's signature over the file does not verify")
    problems.extend(check_chain(export.records))
    return problems


@dataclass(frozen=True, slots=True)
class SenderKeys:
    """Which org keys may vouch for a sender's key record."""

    org: str  # the exporting org
    org_key: str  # the key that signed the export (checked against --org-key)
    partners: Mapping[str, str]  # --sender-org-key: org -> the key required of its records

    def check(self, record: ArchiveRecord, env: Envelope) -> str | None:
        """Why ``env``'s sender signature does not verify with ``record``'s key, or None."""
        sender = env.sender
        try:
            org_key_text, key_record = parse_sender_key(record.sender_key)
            org_key = parse_signing_key(org_key_text)
        except ValueError:
            return "its recorded sender key is malformed"
        required = self.org_key if sender.org == self.org else self.partners.get(sender.org)
        if required is not None and org_key_text != required:
            return (
                f"the key record of {sender} is vouched for by {org_key_text}, not by "
                f"{sender.org}'s key {required}"
            )
        try:
            verified = parse_verified_key_record(
                key_record, org_verify_key=org_key, expected_address=sender
            )
        except KeyRecordError:
            return f"the recorded key record of {sender} is not signed by {org_key_text}"
        if not envelope_signed_by(env, verified.verify_key):
            return (
                f"the signature of {sender} does not verify with the key recorded for it "
                f"(issued {format_time_ms(verified.issued_ms)}): the envelope or the key "
                "was altered"
            )
        return None


def open_records(
    records: tuple[ArchiveRecord, ...],
    keys: dict[str, RetentionKeyPair],
    senders: SenderKeys,
    problems: list[str],
    unchecked: list[int],
) -> Iterator[str]:
    """One JSON line per record that opens; a problem per failed check, per record."""
    for record in records:
        where = f"record {record.seq}: envelope {record.envelope_id}"
        try:
            env = decode_envelope(record.envelope)
        except EnvelopeError:
            problems.append(f"{where} does not open")
            continue
        if env.id != record.envelope_id:
            problems.append(f"record {record.seq}: holds envelope {env.id}, not its own id")
            continue
        if str(env.sender) != record.sender:
            problems.append(f"{where}: the record names sender {record.sender}, not {env.sender}")
        if not record.sender_key:
            signature = UNCHECKED
            unchecked.append(record.seq)
        elif (why := senders.check(record, env)) is not None:
            signature = INVALID
            problems.append(f"{where}: sender signature INVALID: {why}")
        else:
            signature = VERIFIED
        pair = keys.get(record.key_id)
        if pair is None:
            problems.append(f"record {record.seq}: no key file given for key id {record.key_id}")
            continue
        try:
            # An inbound record's copy is the recipient's, beside the envelope.
            wrap = (
                RetentionWrap(record.key_id, pair.public_key, record.wrap) if record.wrap else None
            )
            payload = open_retained(env, retention_secret=pair.secret, wrap=wrap)
        except (EnvelopeError, EnvelopeOpenError):
            problems.append(f"{where} does not open")
            continue
        message = {
            "id": env.id,
            "from": str(env.sender),
            "to": str(env.recipient),
            "sent": format_time_ms(env.created),
            "archived": format_time_ms(record.archived_ms),
            "group": record.group,
            "direction": record.direction,
            "key_id": record.key_id,
            "burn_on_read": env.burn_on_read,
            "sender_signature": signature,
            "text": payload.decode("utf-8", errors="replace"),
        }
        yield json.dumps(message, ensure_ascii=False, sort_keys=True) + "\n"
