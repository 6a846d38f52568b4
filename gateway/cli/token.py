"""``gateway token issue|revoke USER``: client API bearer tokens.

``issue`` prints a new token on stdout, once, and stores only its SHA-256;
USER (``alice`` or ``alice@acme.example``) must be in a group of the rules in
``gateway.yaml``. ``revoke`` removes every token of USER (whether or not the
rules still name them). Both open the storage that ``gateway.yaml`` names
directly, which is safe while the gateway runs (SQLite in WAL mode: the
gateway sees the change with its next lookup). Unlike ``gateway spool``,
they create the database if the gateway never ran: tokens are usually issued
before the first start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.common import Registrar, UsageError, set_handler
from gateway.core.address import Address
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.core.rules import CompiledRules

DEFAULT_CONFIG = "gateway.yaml"


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "token",
        help="issue and revoke client API tokens",
        description="Bearer tokens for the client API, stored hashed.",
    )
    commands = parser.add_subparsers(title="token commands", metavar="COMMAND")
    issue = commands.add_parser(
        "issue",
        help="make a token for USER and print it (once; only its hash is kept)",
        description="Make a client API token for USER (a user name or a full address of this "
        "org, in a group of the rules) and print it on stdout. It is shown only this once: "
        "the gateway keeps its SHA-256. A user may hold several tokens.",
    )
    revoke = commands.add_parser(
        "revoke",
        help="revoke every token of USER",
        description="Revoke every client API token of USER at once.",
    )
    for command in (issue, revoke):
        command.add_argument("user", metavar="USER", help="alice, or alice@your.org")
        command.add_argument(
            "-c",
            "--config",
            default=DEFAULT_CONFIG,
            metavar="FILE",
            help=f"the gateway's config (default: ./{DEFAULT_CONFIG})",
        )
    set_handler(issue, run_issue)
    set_handler(revoke, run_revoke)
    set_handler(parser, _usage)


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError("token: name a command: issue or revoke (see `gateway token --help`)")


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _rules(config: GatewayConfig) -> CompiledRules:
    from gateway.core.rules import CompiledRules, load_rules

    path = str(config.rules)
    return CompiledRules(load_rules(_read_file(path), filename=path, read_file=_read_file))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def run_issue(args: argparse.Namespace) -> int:
    import trio

    from gateway.clientapi.tokens import issue_token, resolve_user
    from gateway.config import load_config
    from gateway.observability.audit import append_event
    from gateway.storage.opening import open_configured_storage

    config = load_config(args.config)
    try:
        user = resolve_user(args.user, _rules(config))
    except ValueError as exc:
        raise UsageError(f"token issue: {exc}") from None

    async def issue() -> str:
        async with open_configured_storage(config.storage, admin=True) as storage:
            return await issue_token(storage, user, at_ms=_now_ms())

    token = trio.run(issue)
    # Audited before it is shown: a token the audit log does not know is never handed out.
    append_event(
        config.audit_path,
        "token_issued",
        max_bytes=config.audit_max_bytes,
        node=config.node,
        user=str(user),
    )
    print(token)
    print(f"token issued for {user}; it is shown only this once", file=sys.stderr)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    import trio

    from gateway.clientapi.tokens import parse_local_user, revoke_tokens
    from gateway.config import load_config
    from gateway.observability.audit import append_event
    from gateway.storage.opening import open_configured_storage

    config = load_config(args.config)
    try:
        user: Address = parse_local_user(args.user, config.org)
    except ValueError as exc:
        raise UsageError(f"token revoke: {exc}") from None

    async def revoke() -> int:
        async with open_configured_storage(config.storage, admin=True) as storage:
            return await revoke_tokens(storage, user)

    count = trio.run(revoke)
    append_event(
        config.audit_path,
        "token_revoked",
        max_bytes=config.audit_max_bytes,
        node=config.node,
        user=str(user),
        count=count,
    )
    print(f"revoked {count} token{'' if count == 1 else 's'} of {user}")
    return 0
