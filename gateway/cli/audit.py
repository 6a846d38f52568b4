"""``gateway audit verify FILE [FILE...]``: check that the audit log's chain is whole.

Exit 0 with the record count and the last hash when every record is intact
and follows the one before; exit 1 naming the first bad record
(``FILE:LINE: record seq N: what is wrong``) when one was changed, removed or
reordered; exit 2 when a file is missing or the arguments are wrong. Several
files are one chain, oldest first (``audit.log.<timestamp>`` files from
rotation, then ``audit.log``); ``--from-hash`` verifies a file whose chain
starts in an earlier file that is not at hand. See docs/audit.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import EXIT_FAILURE, EXIT_OK, Registrar, UsageError, set_handler
from gateway.observability.audit import verify_files


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="verify the hash-chained audit log",
        description="The audit log: policy denials, rules reloads, peers added and removed, "
        "tokens issued and revoked, spool purges; each record holds the hash of the one "
        "before.",
    )
    commands = parser.add_subparsers(title="audit commands", metavar="COMMAND")
    verify = commands.add_parser(
        "verify",
        help="walk the chain; exit 1 naming the first record changed, removed or reordered",
        description="Walk the chain of FILE (several files: one chain, oldest first, e.g. "
        "audit.log.20250101T000000000Z audit.log). Exit 0 with the count when intact, 1 "
        "naming the first bad record, 2 for a missing file.",
    )
    verify.add_argument("files", nargs="+", metavar="FILE", help="audit log file(s), oldest first")
    verify.add_argument(
        "--from-hash",
        metavar="HEX",
        help="the hash the first record follows (the last hash of the file before it); "
        "default: the first file starts the chain",
    )
    set_handler(verify, run_verify)
    set_handler(parser, _usage)


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError("audit: name a command: verify (see `gateway audit --help`)")


def run_verify(args: argparse.Namespace) -> int:
    paths = [Path(name) for name in args.files]
    for path in paths:
        if not path.exists():
            raise UsageError(f"audit verify: {path}: no such file")
        if not path.is_file():
            raise UsageError(f"audit verify: {path}: not a file")
    from_hash = args.from_hash.lower() if args.from_hash is not None else None
    try:
        report = verify_files(paths, from_hash=from_hash)
    except ValueError as exc:
        raise UsageError(f"audit verify: {exc}") from None
    if report.broken is not None:
        print(f"TAMPERED: {report.broken}")
        print(f"{report.records} record(s) before it are intact")
        return EXIT_FAILURE
    files = f"{report.files} file{'' if report.files == 1 else 's'}"
    span = f" (seq {report.first_seq}-{report.last_seq})" if report.records else ""
    print(f"intact: {report.records} record(s){span} in {files}")
    print(f"last hash: {report.last_hash}")
    return EXIT_OK
