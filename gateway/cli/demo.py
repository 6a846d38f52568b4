"""``gateway demo``: two orgs on loopback, narrated, proving what it shows (see gateway.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import Registrar, set_handler


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="two orgs on loopback: real mTLS, real end-to-end encryption, narrated",
        description="Set up acme.example and globex.example in a temporary directory, run both "
        "gateways, exchange messages both ways, show a denial by policy and a burn-on-read "
        "message, then prove no gateway file holds a message text. Exits 0 only if "
        "everything happened as narrated. Needs no arguments.",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR (which must not exist) and leave it for inspection",
    )
    set_handler(parser, run)


def run(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo  # keeps `gateway --help` fast

    return run_demo(keep=args.keep)
