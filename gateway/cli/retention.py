"""``gateway retention keygen|export|open|hold``: the compliance officer's tools.

docs/retention.md is the guide.

``keygen`` and ``open`` run **offline**, on the compliance officer's machine:
``keygen`` writes the retention key pair (secret 0600) and prints the public
key and id for the rules; ``open`` reads an export, checks its SHA-256, the
org's signature and the archive's hash chain, opens each retained envelope
with the retention secret keys given (one per key id: old archives need old
keys) and writes JSON Lines with sender, recipient, times and text.

``export`` and ``hold`` run beside the gateway (they open its storage, SQLite
or PostgreSQL, safely while it runs, and append to its audit log): ``export`` writes the archive
records of a time range (optionally of one user) as a self-verifying file
signed with the org signing key; ``hold add|remove|ls`` manages legal holds,
which keep a user's records past their group's ``keep``. The gateway holds no
retention secret key and cannot open what it exports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from gateway.cli._storage import run_on_storage
from gateway.cli.common import EXIT_FAILURE, EXIT_OK, Registrar, UsageError, set_handler
from gateway.core.address import Address
from gateway.core.archive import (
    header_line,
    record_line,
    trailer_line,
)
from gateway.core.durations import format_time_ms
from gateway.core.envelope import MAX_TIME_MS
from gateway.core.keytext import format_retention_key, format_signing_key
from gateway.errors import AddressError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.storage.archive import Archive

T = TypeVar("T")

DEFAULT_CONFIG = "gateway.yaml"


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "retention",
        help="compliance retention: keys, archive export, offline opening, legal holds",
        description="The compliance officer's tools for the retention archive (docs/retention.md).",
    )
    commands = parser.add_subparsers(title="retention commands", metavar="COMMAND")

    keygen = commands.add_parser(
        "keygen",
        help="make a retention key pair (offline); print the public key for the rules",
        description="Write a new X25519 retention key pair to FILE (mode 0600) and print the "
        "`retention.key` entry for the rules. Run it on the compliance officer's machine: "
        "the secret opens every archive made for this key and never goes to a gateway.",
    )
    keygen.add_argument("--id", required=True, dest="key_id", help="the key's id, e.g. acme-2026")
    keygen.add_argument("--out", type=Path, help="the key file (default ./retention-ID.key)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    set_handler(keygen, run_keygen)

    export = commands.add_parser(
        "export",
        help="write the archive records of a time range as a self-verifying file",
        description="Write the archive records archived in [FROM, TO) (of one user with --user) "
        "as JSON Lines with a trailer signed by the org signing key. The file holds "
        "ciphertext only: `gateway retention open` needs the retention secret key.",
    )
    _config_option(export)
    export.add_argument("--from", dest="start", default="0", help="ISO date/time or Unix ms")
    export.add_argument("--to", dest="end", default=None, help="ISO date/time or Unix ms (now)")
    export.add_argument("--user", default=None, help="only records sent or received by ADDR")
    export.add_argument("--out", type=Path, required=True, help="the export file to write")
    set_handler(export, run_export)

    opener = commands.add_parser(
        "open",
        help="check and open an export with the retention secret key(s) (offline)",
        description="Check an export (SHA-256, the org's signature, the hash chain, each "
        "envelope's sender signature against the sender key recorded with it), open "
        "each envelope with the retention key whose id it names, and print one JSON line "
        "per message: id, from, to, sent, archived, group, direction, key_id, "
        "sender_signature, text. Exit 1 if anything did not check out or open.",
    )
    opener.add_argument("file", type=Path, metavar="FILE")
    opener.add_argument(
        "--key", type=Path, action="append", required=True, help="a retention key file (repeat)"
    )
    opener.add_argument("--org-key", help="the org's signing key (ed25519:...) to require")
    opener.add_argument(
        "--sender-org-key",
        action="append",
        default=[],
        metavar="ORG=KEY",
        help="a partner org's signing key (ed25519:...) its senders' key records must carry "
        "(repeat)",
    )
    opener.add_argument("--out", type=Path, help="write the JSON Lines here (mode 0600)")
    set_handler(opener, _run_open)

    hold = commands.add_parser("hold", help="legal holds: keep a user's records past keep")
    holds = hold.add_subparsers(title="hold commands", metavar="COMMAND")
    add = holds.add_parser("add", help="hold USER's archive records until removed")
    add.add_argument("user", metavar="ADDR")
    add.add_argument("--note", default="", help="why (a case number): kept with the hold")
    remove = holds.add_parser("remove", help="end the hold on USER")
    remove.add_argument("user", metavar="ADDR")
    listing = holds.add_parser("ls", help="list the holds")
    listing.add_argument("--json", action="store_true")
    for command in (add, remove, listing):
        _config_option(command)
    set_handler(add, run_hold_add)
    set_handler(remove, run_hold_remove)
    set_handler(listing, run_hold_ls)
    set_handler(hold, _usage)
    set_handler(parser, _usage)


def _run_open(args: argparse.Namespace) -> int:
    from gateway.cli.retention_open import run_open  # it imports the envelope crypto

    return run_open(args)


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError(
        "retention: name a command: keygen, export, open or hold (see `gateway retention --help`)"
    )


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, metavar="FILE", help="the gateway's config"
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_time(text: str) -> int:
    """Unix ms from ``1700000000000``, ``2026-12-04`` or ``2026-12-04T05:00:00Z`` (UTC)."""
    if text.isdigit():
        value = int(text)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"not a time: {text!r} (ISO 8601, or Unix milliseconds)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        value = int(moment.timestamp() * 1000)
    if not 0 <= value <= MAX_TIME_MS:
        raise UsageError(f"time out of range: {text!r}")
    return value


def _address(text: str) -> str:
    try:
        return str(Address.parse(text))
    except AddressError as exc:
        raise UsageError(f"{text!r}: {exc.message}") from None


# -- keygen -------------------------------------------------------------------------


def run_keygen(args: argparse.Namespace) -> int:
    from gateway.crypto.retention_keys import RetentionKeyPair, default_key_path

    try:
        pair = RetentionKeyPair.generate(args.key_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    path = args.out if args.out is not None else default_key_path(pair.id)
    pair.save(path, overwrite=args.force)
    print(f"# retention key {pair.id}: secret written to {path} (0600); keep it offline")
    print("retention:")
    print(f"  key: {{id: {pair.id}, public_key: {format_retention_key(pair.public_key)}}}")
    return EXIT_OK


# -- export ---------------------------------------------------------------------------


async def _write_export(
    archive: Archive,
    out: IO[bytes],
    header: dict[str, object],
    *,
    start: int,
    end: int,
    user: str | None,
    seed: bytes,
) -> int:
    """Stream the records page by page into ``out``, then the signed trailer; how many."""
    from gateway.crypto.key_records import org_verify_key
    from gateway.crypto.retention_keys import sign_export
    from gateway.storage.archive import MAX_RECORDS_PER_READ

    digest = hashlib.sha256()
    count = after = 0
    line = header_line(header)
    digest.update(line)
    out.write(line)
    while True:
        page = await archive.records(
            from_ms=start, to_ms=end, user=user, after_seq=after, limit=MAX_RECORDS_PER_READ
        )
        for record in page:
            line = record_line(record)
            digest.update(line)
            out.write(line)
        count += len(page)
        if len(page) < MAX_RECORDS_PER_READ:
            break
        after = page[-1].seq
    body = digest.digest()
    out.write(
        trailer_line(
            count=count,
            body_sha256=body,
            signature=sign_export(seed, body),
            org_key=format_signing_key(org_verify_key(seed)),
        )
    )
    return count


def run_export(args: argparse.Namespace) -> int:
    from gateway.cli.retention_open import private_file
    from gateway.config import load_config
    from gateway.observability.audit import append_event
    from gateway.pki import dev

    config = load_config(args.config)
    start = parse_time(args.start)
    end = parse_time(args.end) if args.end is not None else _now_ms() + 1
    user = _address(args.user) if args.user is not None else None
    seed = dev.load_signing_key(config.signing_key).private_bytes_raw()
    header: dict[str, object] = {
        "org": config.org,
        "from": start,
        "to": end,
        "user": user,
        "exported": _now_ms(),
    }

    with private_file(args.out) as out:
        try:
            count = run_on_storage(
                config,
                lambda storage: _write_export(
                    storage.archive, out, header, start=start, end=end, user=user, seed=seed
                ),
            )
        except BaseException:
            # A file cut short by a failure is not left behind to be taken for an export.
            out.close()
            args.out.unlink(missing_ok=True)
            raise
    try:
        append_event(
            config.audit_path,
            "retention_export",
            max_bytes=config.audit_max_bytes,
            user=user,
            records=count,
            start_ms=start,
            end_ms=end,
        )
    except BaseException:
        # An export the audit log does not know is not left behind.
        args.out.unlink(missing_ok=True)
        raise
    print(f"exported {count} record(s) to {args.out}", file=sys.stderr)
    return EXIT_OK


# -- holds -----------------------------------------------------------------------------


def _run_on_archive(config: GatewayConfig, work: Callable[[Archive], Awaitable[T]]) -> T:
    return run_on_storage(config, lambda storage: work(storage.archive))


def run_hold_add(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.observability.audit import append_event

    config = load_config(args.config)
    user = _address(args.user)
    added = _run_on_archive(
        config, lambda archive: archive.hold_add(user, at_ms=_now_ms(), note=args.note)
    )
    if added:
        append_event(
            config.audit_path,
            "retention_hold_added",
            max_bytes=config.audit_max_bytes,
            user=user,
            note=args.note,
        )
    print(f"{user}: {'held' if added else 'already held'}")
    return EXIT_OK


def run_hold_remove(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.observability.audit import append_event

    config = load_config(args.config)
    user = _address(args.user)
    removed = _run_on_archive(config, lambda archive: archive.hold_remove(user))
    if removed:
        append_event(
            config.audit_path, "retention_hold_removed", max_bytes=config.audit_max_bytes, user=user
        )
    print(f"{user}: {'hold removed' if removed else 'was not held'}")
    return EXIT_OK if removed else EXIT_FAILURE


def run_hold_ls(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    config = load_config(args.config)
    holds = _run_on_archive(config, lambda archive: archive.holds())
    if args.json:
        for hold in holds:
            print(json.dumps({"user": hold.user, "since": hold.added_ms, "note": hold.note}))
    else:
        for hold in holds:
            print(f"{hold.user}\tsince {format_time_ms(hold.added_ms)}\t{hold.note}")
    return EXIT_OK
