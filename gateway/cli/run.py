"""``gateway run``: serve until SIGTERM/SIGINT, reload rules on SIGHUP or a file change."""

from __future__ import annotations

import argparse

from gateway.cli.common import Registrar, set_handler


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "run",
        help="serve: federation, client API and metrics listeners",
        description="Run the gateway until SIGTERM or SIGINT. SIGHUP, or a change of the "
        "rules file, reloads the federation rules; invalid rules are refused and the last "
        "good ones stay in force.",
    )
    parser.add_argument(
        "-c",
        "--config",
        default="gateway.yaml",
        help="the gateway's configuration file (default: ./gateway.yaml)",
    )
    set_handler(parser, run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the server's modules are not needed by any other command,
    # and importing them is most of a command's start-up time (~0.3 s).
    import trio

    from gateway.app import run_gateway
    from gateway.config import load_config
    from gateway.observability.logs import configure_logging

    config = load_config(args.config)
    configure_logging(fmt="json" if config.log.format == "json" else "text", level=config.log.level)
    trio.run(run_gateway, config)
    return 0
