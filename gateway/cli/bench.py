"""``gateway bench``: two gateways on loopback, measured end to end and against the floor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.bench.databases import ADMIN_URL_ENV, DEFAULT_ADMIN_URL
from gateway.bench.defaults import (
    DEFAULT_DURATION,
    DEFAULT_ENVELOPES,
    DEFAULT_SAMPLE,
    DEFAULT_SIZE,
    DEFAULT_WINDOW,
    STORAGES,
)
from gateway.cli.common import EXIT_FAILURE, EXIT_OK, Registrar, UsageError, set_handler


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure two gateways end to end, and the raw floor, on loopback",
        description="Two orgs in a temporary directory, two real `gateway run` processes "
        "(mTLS, durable SQLite), a sending and a receiving client; then the same bytes "
        "through a raw mTLS relay (the floor). Exits non-zero unless every envelope "
        "arrived exactly once. See docs/performance.md.",
    )
    parser.add_argument("--envelopes", type=int, default=DEFAULT_ENVELOPES, metavar="N")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, metavar="BYTES", help="payload bytes"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="W",
        help="envelopes in flight between the two clients",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        metavar="S",
        help="stop submitting after S seconds and report what got through",
    )
    parser.add_argument(
        "--outage",
        type=float,
        default=None,
        metavar="S",
        help="stop the receiving gateway for S seconds; report the drain rate",
    )
    parser.add_argument(
        "--spool",
        type=int,
        default=None,
        metavar="N",
        help="spool N envelopes for a dead peer; report sender RSS and `gateway peers` time",
    )
    parser.add_argument(
        "--transaction-envelopes",
        type=int,
        default=None,
        metavar="N",
        help="set limits.max_transaction_envelopes of both gateways (default: as init writes)",
    )
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="K")
    parser.add_argument("--no-floor", action="store_true", help="skip the raw relay floor")
    parser.add_argument(
        "--keep", type=Path, default=None, metavar="DIR", help="keep the orgs' files under DIR"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="sample each gateway with py-spy during the run: collapsed stacks in DIR, "
        "and its busiest functions in the report",
    )
    parser.add_argument(
        "--storage",
        choices=STORAGES,
        default="sqlite",
        help="each org's storage: its SQLite file (default), or a fresh PostgreSQL database "
        "made (and dropped) through --postgres",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="N",
        help="gateway nodes per org, sharing its database (needs --storage postgresql); "
        "the sending client spreads its submissions over them",
    )
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL",
        help="admin URL of the PostgreSQL server the databases are made on "
        f"(default: ${ADMIN_URL_ENV}, else {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    set_handler(parser, run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the bench's machinery (clients, httpx, psycopg) is for this command.
    from gateway.bench.report import missing_fields, render_table, to_json
    from gateway.bench.runner import BenchOptions, run_bench

    try:
        options = BenchOptions(
            envelopes=args.envelopes,
            size=args.size,
            window=args.window,
            duration=args.duration,
            outage=args.outage,
            spool=args.spool,
            sample=args.sample,
            floor=not args.no_floor,
            transaction_envelopes=args.transaction_envelopes,
            keep=args.keep,
            profile=args.profile,
            storage=args.storage,
            nodes=args.nodes,
            postgres=args.postgres,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    def progress(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    report = run_bench(options, progress=progress)
    missing = missing_fields(report)
    if missing:
        raise AssertionError(f"bench report lacks {', '.join(missing)}")  # a bug of ours
    print(to_json(report) if args.json else render_table(report))
    return EXIT_OK if report["ok"] else EXIT_FAILURE
