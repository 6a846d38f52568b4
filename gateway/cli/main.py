"""Entry point of the ``gateway`` command.

Every command group lives in its own module with a ``register(subparsers)``
function. Every invocation imports all of them to build the parser, so a
command module imports at its top only what declaring its options needs (the
standard library, :mod:`gateway.cli.common`, the pure core); its handlers
import the rest (trio, the config and rules parsers, storage, HTTP, crypto)
when they run. ``gateway peers`` then loads what it reads and not what
``gateway client`` sends with; tests/unit/test_cli_imports.py holds every
module to this. Errors that the gateway raises on purpose end as one line on stderr
and a non-zero exit; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.cli.common import EXIT_FAILURE, EXIT_USAGE, UsageError
from gateway.core.envelope import ENVELOPE_ID_RE
from gateway.errors import GatewayError

# Command-group modules under gateway.cli, in the order `gateway --help` lists them.
COMMAND_MODULES = (
    "init",
    "run",
    "health",
    "pki",
    "peer",
    "rules",
    "peers",
    "nodes",
    "spool",
    "storage",
    "token",
    "retention",
    "audit",
    "bench",
    "client",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Federated messaging gateway: mTLS between orgs, federation rules per "
        "security group, durable store-and-forward of end-to-end encrypted envelopes.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"gateway.cli.{name}")
        module.register(subparsers)
    return parser


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error of the project's own kind inside a group from a trio nursery, if any."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    # Ctrl-C wins: it can land inside a nursery that trio then wraps in a group.
    interrupts = [exc for exc in leaves if isinstance(exc, KeyboardInterrupt)]
    if interrupts:
        return interrupts[0]
    ours = [exc for exc in leaves if isinstance(exc, GatewayError | OSError)]
    return ours[0] if ours and len(ours) == len(leaves) else None


def protect_envelope_ids(argv: Sequence[str]) -> list[str]:
    """Move envelope ids that begin with ``-`` behind ``--``.

    An envelope id is 22 characters of base64url, and one in 64 begins with
    ``-``: argparse would take ``gateway client status -5jvy...`` for an unknown
    option. No option of ours looks like an id, so such a token is an id.
    """
    args = list(argv)
    if "--" in args:
        return args
    ids = [arg for arg in args if arg.startswith("-") and ENVELOPE_ID_RE.fullmatch(arg)]
    if not ids:
        return args
    return [arg for arg in args if arg not in ids] + ["--", *ids]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(protect_envelope_ids(sys.argv[1:] if argv is None else argv))
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        try:
            return int(handler(args))
        except BaseExceptionGroup as group:
            single = _single_error(group)
            if single is None:
                raise
            raise single from group
    except UsageError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"gateway: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("gateway: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
