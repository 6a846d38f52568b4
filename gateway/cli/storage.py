"""``gateway storage migrate``: move a stopped SQLite gateway's state into PostgreSQL.

Reads ``storage:`` of the config (it must be SQLite), copies everything into
the empty PostgreSQL database ``--to`` names (:mod:`gateway.storage.migrate`),
checks the counts, and prints them. Exit 0 when the copy is complete and
committed; 1 with one line when it refused or failed (nothing was kept); 2
for bad arguments. Afterwards, set ``storage:`` to that URL and start the
gateway. See docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from gateway.cli._storage import add_common_arguments
from gateway.cli.common import EXIT_OK, Registrar, UsageError, set_handler


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "storage",
        help="move the gateway's state between storage engines",
        description="Storage administration.",
    )
    commands = parser.add_subparsers(title="storage commands", metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate",
        help="copy a stopped SQLite gateway's state into an empty PostgreSQL database",
        description="Copy the spool, mailboxes, statuses, dedup ids, transactions, peer "
        "states, tokens and keys of the gateway's SQLite database (the gateway must be "
        "stopped) into an empty PostgreSQL database, in one transaction, and verify the "
        "counts. Nothing is kept unless all of it is. Then set `storage:` to the URL.",
    )
    add_common_arguments(migrate)
    migrate.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB of an empty database",
    )
    set_handler(migrate, run_migrate)
    set_handler(parser, _usage)


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError("storage: name a command: migrate (see `gateway storage --help`)")


def run_migrate(args: argparse.Namespace) -> int:
    # Imported here: psycopg and the copy are needed by this command only.
    from gateway.config import load_config, validate_postgres_url
    from gateway.storage.migrate import migrate_sqlite_to_postgres

    config = load_config(args.config)
    if config.storage.sqlite_path is None:
        raise UsageError(
            f"storage migrate: {config.path} already uses PostgreSQL; migrate reads an "
            "SQLite gateway's database"
        )
    try:
        url = validate_postgres_url(args.to)
    except ValueError as exc:
        raise UsageError(f"storage migrate: --to: {exc}") from None

    def progress(message: str) -> None:
        if not args.json:
            print(f"storage migrate: {message}", file=sys.stderr, flush=True)

    report = migrate_sqlite_to_postgres(config.storage.sqlite_path, url, progress=progress)
    if args.json:
        print(
            json.dumps(
                {"source": report.source, "target": report.target, "rows": report.rows},
                indent=2,
            )
        )
    else:
        width = max(len(name) for name in report.rows)
        for name, count in report.rows.items():
            print(f"{name.ljust(width)}  {count:>10,}")
        print(f"copied {report.total:,} row(s) from {report.source} to {report.target}")
        print(f"next: set `storage: {report.target}` (with its password) in {config.path}")
    return EXIT_OK
