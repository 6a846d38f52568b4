"""``gateway storage``: back up a running SQLite gateway, or move its state into PostgreSQL.

``backup DEST``: a consistent copy of the SQLite database and its segment
files while the gateway runs (:mod:`gateway.storage.sqlite.backup`), into a new
or empty directory. Exit 0 when the backup is whole; 1 when it failed (nothing
is left in DEST), or when it was written but left out rows whose bytes are
missing from the live store too (each named on stderr); 2 for bad arguments
(DEST not empty, a PostgreSQL config: use pg_dump).

``migrate``: reads ``storage:`` of the config (it must be SQLite), copies
everything into the empty PostgreSQL database ``--to`` names
(:mod:`gateway.storage.migrate`), checks the counts, and prints them. Exit 0
when the copy is complete and committed; 1 with one line when it refused or
failed (nothing was kept); 2 for bad arguments. Afterwards, set ``storage:`` to
that URL and start the gateway.

See docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.cli._storage import add_common_arguments, sqlite_path
from gateway.cli.common import EXIT_FAILURE, EXIT_OK, Registrar, UsageError, set_handler


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "storage",
        help="back up the gateway's SQLite state, or move it into PostgreSQL",
        description="Storage administration.",
    )
    commands = parser.add_subparsers(title="storage commands", metavar="COMMAND")
    backup = commands.add_parser(
        "backup",
        help="a consistent copy of a (running) SQLite gateway's database and segment files",
        description="Copy the gateway's SQLite database and the segment files of its large "
        "envelopes into DEST, a new or empty directory, while the gateway runs: an online "
        "snapshot of the database, then the bytes of every envelope it names. To restore, "
        "stop the gateway, put DEST's database file and its .segments directory in place, "
        "start it. A PostgreSQL gateway is backed up with pg_dump.",
    )
    add_common_arguments(backup)
    backup.add_argument(
        "destination", metavar="DEST", help="a new or empty directory for the backup"
    )
    set_handler(backup, run_backup)
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
    raise UsageError("storage: name a command: backup, migrate (see `gateway storage --help`)")


def run_backup(args: argparse.Namespace) -> int:
    # Imported here: needed by this command only.
    from gateway.config import load_config
    from gateway.storage.sqlite.backup import backup_sqlite

    config = load_config(args.config)
    if config.storage.sqlite_path is None:
        raise UsageError(
            f"storage backup: {config.path} uses PostgreSQL: back it up with pg_dump -Fc "
            "(or the server's base backups and WAL archiving); see docs/operations.md"
        )
    source = sqlite_path(config)
    assert source is not None
    try:
        report = backup_sqlite(source, Path(args.destination))
    except ValueError as exc:
        raise UsageError(f"storage backup: {exc}") from None
    if args.json:
        print(
            json.dumps(
                {
                    "source": str(report.source),
                    "database": str(report.database),
                    "segments": str(report.database) + ".segments",
                    "rows": report.rows,
                    "segment_rows": report.segment_rows,
                    "segment_bytes": report.segment_bytes,
                    "segment_files": report.segment_files,
                    "dropped_as_deleted": report.dropped,
                    "unreadable": report.unreadable_count,
                    "unreadable_rows": [
                        {
                            "table": row.table,
                            "seq": row.seq,
                            "envelope_id": row.envelope_id,
                            "segment_file": str(row.segment_file),
                            "problem": row.problem,
                        }
                        for row in report.unreadable
                    ],
                    "snapshot_seconds": round(report.snapshot_seconds, 3),
                    "seconds": round(report.seconds, 3),
                },
                indent=2,
            )
        )
    else:
        rows = sum(report.rows.values())
        print(
            f"backed up {report.source} to {report.database}: {rows:,} envelope row(s) "
            f"({report.segment_rows:,} with {report.segment_bytes:,} segment byte(s) in "
            f"{report.segment_files} file(s)), {report.dropped:,} left out as deleted "
            f"meanwhile, in {report.seconds:.2f} s (snapshot {report.snapshot_seconds:.2f} s)"
        )
    for row in report.unreadable:
        print(
            f"gateway: error: storage backup: {row.table} row {row.seq} (envelope "
            f"{row.envelope_id}) left out: {row.problem} ({row.segment_file})",
            file=sys.stderr,
        )
    if not report.complete:
        more = report.unreadable_count - len(report.unreadable)
        print(
            f"gateway: error: storage backup: {report.unreadable_count:,} envelope(s) left out "
            + (f"({more:,} not named) " if more else "")
            + "because their bytes are missing from the live segment files too; the backup "
            f"in {report.destination} is otherwise whole",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


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
