"""What the admin commands (``gateway peers``, ``gateway spool``) share.

Theory of operation
-------------------
An admin command reads ``gateway.yaml`` (``-c``), finds the storage the
gateway uses, and runs one async function on it with ``trio.run``. It opens
its own connections (one writer, one reader) to the same SQLite file: WAL mode
lets it read while the running gateway writes, and SQLite's file lock with its
busy timeout keeps the two processes' writes apart. On PostgreSQL it opens a
pool of two connections to the same database, whose transactions keep it
apart from the nodes. So every command is safe while the gateway runs, and
sees every write the gateway has already acknowledged.

A command never creates an SQLite database: a missing file means the gateway
has never run with this config, and the command says so instead of leaving an
empty database behind. (A PostgreSQL database is created by its admin; a
command run before the gateway creates the gateway's tables in it.)

The rules file tells which peers the org federates with. A command that
cannot read it still answers from storage (the spool matters most when
something is broken) and warns on stderr.

Times shown are relative to the wall clock (``time.time()``), like the times
the gateway stores.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from gateway.cli.common import UsageError
from gateway.core.address import normalize_domain
from gateway.core.durations import parse_duration
from gateway.errors import AddressError, RulesError, StorageError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.storage.base import Storage

T = TypeVar("T")

DEFAULT_CONFIG = "gateway.yaml"
MAX_CELL_WIDTH = 60  # table cells longer than this are cut with an ellipsis (--json has all)
ELLIPSIS = "…"
WARNING_PREFIX = "gateway: warning: "
MS_PER_SECOND = 1000

# Steps of format_age: (seconds per unit, unit, seconds per sub-unit, sub-unit).
_AGE_UNITS = (
    (86400, "d", 3600, "h"),
    (3600, "h", 60, "m"),
    (60, "m", 1, "s"),
)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``-c/--config`` and ``--json``, the options every admin command takes."""
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"the gateway's config (default: ./{DEFAULT_CONFIG})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document, for scripts")


def now_ms() -> int:
    return int(time.time() * MS_PER_SECOND)


def warn(message: str) -> None:
    print(WARNING_PREFIX + message, file=sys.stderr)


# -- arguments (checked in handlers, so each mistake is one line) ---------------
def parse_peer_option(text: str) -> str:
    """``--peer``: a domain, in its canonical form."""
    try:
        return normalize_domain(text)
    except AddressError as exc:
        raise UsageError(f"--peer: {exc.message}") from exc


def parse_age_option(text: str, *, option: str = "--older-than") -> int:
    """A duration like ``90s``, ``2h``, ``1d``; whole seconds, more than zero."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from exc
    if seconds <= 0:
        raise UsageError(f"{option}: must be longer than zero, got {text!r}")
    return seconds


def parse_count_option(text: str, *, option: str, maximum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a whole number") from None
    if not 1 <= value <= maximum:
        raise UsageError(f"{option}: must be from 1 to {maximum}, got {value}")
    return value


# -- config, rules, storage -----------------------------------------------------
# The commands register their options through this module, so what only a handler
# needs (trio, the config and rules parsers, the storage engines) is imported by the
# function that runs: `gateway --help` stays cheap (tests/unit/test_cli_imports.py).
def load_admin_config(path: str) -> GatewayConfig:
    from gateway.config import load_config

    return load_config(Path(path))


@dataclass(frozen=True, kw_only=True)
class RulePeers:
    """The peers the rules name; ``peers`` is None when the rules could not be read."""

    peers: frozenset[str] | None
    problem: str | None = None  # why they could not be read, for a warning

    def contains(self, peer: str) -> bool | None:
        """True/False, or None when unknown (unreadable rules)."""
        return None if self.peers is None else peer in self.peers


def _read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def load_rule_peers(config: GatewayConfig) -> RulePeers:
    """The peers of the rules file ``config`` names; never raises for a bad file."""
    from gateway.core.rules import load_rules

    path = str(config.rules)
    try:
        rules = load_rules(_read_bytes(path), filename=path, read_file=_read_bytes)
    except OSError as exc:
        return RulePeers(
            peers=None, problem=f"cannot read the rules file {path}: {exc.strerror or exc}"
        )
    except RulesError as exc:
        return RulePeers(peers=None, problem=f"the rules do not validate: {exc}")
    return RulePeers(peers=frozenset(rules.peers))


def warn_rules(rule_peers: RulePeers) -> None:
    if rule_peers.problem is not None:
        warn(f"{rule_peers.problem}; showing what storage knows, without the rules")


def sqlite_path(config: GatewayConfig) -> Path | None:
    """The gateway's SQLite file, which must exist: a command never creates it.

    None for a PostgreSQL database (it is the server's, and opened as it is).
    """
    storage = config.storage
    if storage.engine != "sqlite" or storage.sqlite_path is None:
        return None
    path = storage.sqlite_path
    if not os.path.exists(path):
        raise StorageError(
            f"storage {path} does not exist: the gateway has never run with "
            f"{config.path} (start it with `gateway run -c {config.path}`), "
            "or data_dir/storage in the config point somewhere else"
        )
    if not os.path.isfile(path):
        raise StorageError(f"storage {path} is not a file")
    return path


def run_on_storage(config: GatewayConfig, fn: Callable[[Storage], Awaitable[T]]) -> T:
    """Open the gateway's storage, run ``fn`` on it in a fresh trio run, close it.

    Storage errors come out as :class:`StorageError`; the storage's own
    argument checks (``ValueError``) as :class:`UsageError`.
    """
    import trio

    from gateway.storage.opening import open_configured_storage

    sqlite_path(config)

    async def main() -> T:
        async with open_configured_storage(config.storage, admin=True) as store:
            return await fn(store)

    try:
        return trio.run(main)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def check_peer_option(peer: str, *, rule_peers: RulePeers, stored_peers: Collection[str]) -> None:
    """Refuse a ``--peer`` that neither the rules nor storage know; warn for one
    that only storage knows (a peer removed from the rules, with envelopes left).
    """
    in_rules = rule_peers.contains(peer)
    if in_rules or in_rules is None:
        return
    if peer in stored_peers:
        warn(f"{peer} is not a peer in the rules; acting on what storage holds for it")
        return
    known = sorted(set(rule_peers.peers or ()) | set(stored_peers))
    close = difflib.get_close_matches(peer, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    listing = ", ".join(known) if known else "none"
    raise UsageError(
        f"--peer: {peer} is not a peer in the rules and storage holds nothing for it{hint}; "
        f"known peers: {listing}"
    )


# -- output ------------------------------------------------------------------------
def format_age(seconds: float) -> str:
    """A short human age: ``45s``, ``12m05s``, ``3h20m``, ``2d04h``; negatives as ``0s``."""
    whole = max(0, int(seconds))
    for size, unit, sub_size, sub_unit in _AGE_UNITS:
        if whole >= size:
            major, rest = divmod(whole, size)
            return f"{major}{unit}{rest // sub_size:02d}{sub_unit}"
    return f"{whole}s"


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters shown as ``?``."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def cell(text: str, *, width: int = MAX_CELL_WIDTH) -> str:
    text = printable(text)
    return text if len(text) <= width else text[: width - len(ELLIPSIS)] + ELLIPSIS


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces, no trailing blanks."""
    materialized = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in materialized) for i in range(len(headers))]
    return [
        "  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip()
        for row in materialized
    ]
