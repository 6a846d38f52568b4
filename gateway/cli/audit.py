"""``gateway audit verify FILE [FILE...]``: check that the audit log's chain is whole.

Exit 0 with the record count and the last hash when every record is intact
and follows the one before; exit 1 naming the first bad record
(``FILE:LINE: record seq N: what is wrong``) when one was changed, removed or
reordered; exit 2 when a file is missing or the arguments are wrong. Several
files of one node are one chain, oldest first (``audit.log.<timestamp>``
files from rotation, then ``audit.log``); files of several gateway nodes of
the org (their records name the node) are several chains, each verified and
reported with its node's name. ``--from-hash`` verifies a file whose chain
starts in an earlier file that is not at hand. See docs/audit.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import EXIT_FAILURE, EXIT_OK, Registrar, UsageError, set_handler


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
        "audit.log.20250101T000000000Z audit.log; the files of several gateway nodes: one "
        "chain per node). Exit 0 with the count when intact, 1 naming the first bad record, "
        "2 for a missing file.",
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
    from gateway.observability.audit import group_chains, verify_files

    paths = [Path(name) for name in args.files]
    for path in paths:
        if not path.exists():
            raise UsageError(f"audit verify: {path}: no such file")
        if not path.is_file():
            raise UsageError(f"audit verify: {path}: not a file")
    from_hash = args.from_hash.lower() if args.from_hash is not None else None
    chains = group_chains(paths)
    if len(chains) > 1 and from_hash is not None:
        raise UsageError(
            f"audit verify: --from-hash applies to one chain; these files hold {len(chains)} "
            f"(nodes {', '.join(node or '(none)' for node, _ in chains)})"
        )
    status = EXIT_OK
    for node, files in chains:
        try:
            report = verify_files(files, from_hash=from_hash)
        except ValueError as exc:
            raise UsageError(f"audit verify: {exc}") from None
        prefix = f"node {node}: " if len(chains) > 1 else ""
        if report.broken is not None:
            print(f"{prefix}TAMPERED: {report.broken}")
            print(f"{prefix}{report.records} record(s) before it are intact")
            status = EXIT_FAILURE
            continue
        count = f"{report.files} file{'' if report.files == 1 else 's'}"
        span = f" (seq {report.first_seq}-{report.last_seq})" if report.records else ""
        print(f"{prefix}intact: {report.records} record(s){span} in {count}")
        print(f"{prefix}last hash: {report.last_hash}")
    return status
