"""``gateway spool ls|retry|purge``: look at, hurry and empty the outbound spool.

``ls`` lists waiting envelopes by their routing header only (id, peer, from,
to, times, size): the ciphertext never leaves the store. ``retry`` clears
peers' backoff in storage; the running sender reads that state at its next
poll and tries again. ``purge`` removes envelopes for good, each with the
delivery status ``rejected:purged`` its sender can read; the storage deletes
in small commits, so the running gateway keeps working meanwhile.

"Older than D" always means *created* more than D ago (the envelope's own
time, the one its expiry counts from), for ``ls`` and ``purge`` alike, so
``ls --older-than`` shows exactly what the same ``purge`` would remove.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.cli._storage import (
    MS_PER_SECOND,
    RulePeers,
    add_common_arguments,
    cell,
    check_peer_option,
    format_age,
    load_admin_config,
    load_rule_peers,
    now_ms,
    parse_age_option,
    parse_count_option,
    parse_peer_option,
    render_table,
    run_on_storage,
    warn_rules,
)
from gateway.cli.common import EXIT_FAILURE, EXIT_OK, Registrar, UsageError, set_handler
from gateway.storage.base import LIST_LIMIT, STATUS_PURGED, SpoolSummary, Storage

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

DEFAULT_LS_LIMIT = 50
MAX_LS_LIMIT = 100_000  # beyond this, an admin wants --json and a script, not a screen
LS_HEADERS = ("ID", "PEER", "FROM", "TO", "CREATED", "EXPIRES", "SIZE")
CONFIRM_WORDS = frozenset({"y", "yes"})


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "spool",
        help="list, retry or purge envelopes waiting for peers",
        description="The outbound spool: one lane per peer. Reads and changes the gateway's "
        "storage; safe while the gateway runs.",
    )
    commands = parser.add_subparsers(title="spool commands", metavar="COMMAND")

    ls = commands.add_parser(
        "ls",
        help="envelopes waiting, oldest first (headers only, never ciphertext)",
        description="List spooled envelopes in lane order: id, peer, from, to, age since "
        "created, time left until expiry, size. The ciphertext is never shown.",
    )
    add_common_arguments(ls)
    ls.add_argument("--peer", metavar="P", help="only the lane of peer P")
    ls.add_argument(
        "--older-than", metavar="D", help="only envelopes created more than D ago (90s, 2h, 1d)"
    )
    ls.add_argument(
        "--limit",
        default=str(DEFAULT_LS_LIMIT),
        metavar="N",
        help=f"show at most N (default {DEFAULT_LS_LIMIT}, at most {MAX_LS_LIMIT})",
    )
    set_handler(ls, run_ls)

    retry = commands.add_parser(
        "retry",
        help="clear backoff so the sender tries again at its next poll",
        description="Reset the failure count and backoff of peer P (or of every peer), and "
        "end the wait of envelopes it answered with the temporary result mailbox_full. "
        "The running sender sees it at its next poll and tries the peer again.",
    )
    add_common_arguments(retry)
    retry.add_argument("--peer", metavar="P", help="only peer P (default: every peer)")
    set_handler(retry, run_retry)

    purge = commands.add_parser(
        "purge",
        help="delete spooled envelopes for good (status rejected:purged)",
        description="Delete the spooled envelopes of peer P (or of every lane, with --all), "
        "optionally only those created more than D ago. Each gets the delivery status "
        f"{STATUS_PURGED}. Asks for confirmation unless --yes; without a terminal, "
        "--yes is required.",
    )
    add_common_arguments(purge)
    purge.add_argument("--peer", metavar="P", help="the lane of peer P")
    purge.add_argument("--all", action="store_true", help="every lane")
    purge.add_argument(
        "--older-than", metavar="D", help="only envelopes created more than D ago (90s, 2h, 1d)"
    )
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    set_handler(purge, run_purge)

    set_handler(parser, _usage)


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError("spool: name a command: ls, retry or purge (see `gateway spool --help`)")


def _seconds(ms: int) -> float:
    return ms / MS_PER_SECOND


async def _check_peer(store: Storage, peer: str | None, rule_peers: RulePeers) -> None:
    if peer is None:
        return
    stored = set(await store.spool_peers()) | {s.peer for s in await store.peer_states()}
    check_peer_option(peer, rule_peers=rule_peers, stored_peers=stored)


def _context(args: argparse.Namespace) -> tuple[GatewayConfig, RulePeers, str | None]:
    config = load_admin_config(args.config)
    peer = None if args.peer is None else parse_peer_option(args.peer)
    rule_peers = load_rule_peers(config)
    warn_rules(rule_peers)
    return config, rule_peers, peer


# -- ls ------------------------------------------------------------------------------
async def list_spool(
    store: Storage, *, peer: str | None, created_before_ms: int | None, limit: int
) -> list[SpoolSummary]:
    """Up to ``limit`` spooled envelopes in lane order, created before a time if given.

    Pages through the spool with its ``seq`` cursor (each page one short read,
    so the gateway's writer is never held up). With an age filter, the pages
    are filtered here: the oldest envelopes sit at the heads of the lanes, so
    the usual question ("what has waited for a day?") stops early.
    """
    found: list[SpoolSummary] = []
    after: int | None = None
    while len(found) < limit:
        want = LIST_LIMIT if created_before_ms is not None else min(LIST_LIMIT, limit - len(found))
        page = await store.spool_list(peer=peer, limit=want, after_seq=after)
        found.extend(
            entry
            for entry in page
            if created_before_ms is None or entry.created_ms < created_before_ms
        )
        if len(page) < want:
            break
        after = page[-1].seq
    return found[:limit]


def entry_json(entry: SpoolSummary, now_ms: int) -> dict[str, object]:
    return {
        "id": entry.envelope_id,
        "peer": entry.peer,
        "from": entry.sender,
        "to": entry.recipient,
        "seq": entry.seq,
        "created_ms": entry.created_ms,
        "expires_ms": entry.expires_ms,
        "spooled_ms": entry.spooled_ms,
        "size": entry.size,
        "age_s": _seconds(now_ms - entry.created_ms),
        "expires_in_s": _seconds(entry.expires_ms - now_ms),
    }


def entry_cells(entry: SpoolSummary, now_ms: int) -> list[str]:
    left = entry.expires_ms - now_ms
    return [
        cell(entry.envelope_id),
        cell(entry.peer),
        cell(entry.sender),
        cell(entry.recipient),
        format_age(_seconds(now_ms - entry.created_ms)) + " ago",
        "in " + format_age(_seconds(left)) if left > 0 else "expired",
        str(entry.size),
    ]


def run_ls(args: argparse.Namespace) -> int:
    limit = parse_count_option(args.limit, option="--limit", maximum=MAX_LS_LIMIT)
    older_than = None if args.older_than is None else parse_age_option(args.older_than)
    config, rule_peers, peer = _context(args)
    started = now_ms()
    before = None if older_than is None else started - older_than * MS_PER_SECOND

    async def read(store: Storage) -> tuple[list[SpoolSummary], int]:
        await _check_peer(store, peer, rule_peers)
        lanes = await store.spool_stats()
        waiting = sum(lane.depth for name, lane in lanes.items() if peer in (None, name))
        entries = await list_spool(store, peer=peer, created_before_ms=before, limit=limit)
        return entries, waiting

    entries, waiting = run_on_storage(config, read)
    at = now_ms()
    if args.json:
        print(json.dumps([entry_json(entry, at) for entry in entries], indent=2))
        return EXIT_OK
    where = f"in the lane of {peer}" if peer else "in the spool"
    if entries:
        for line in render_table(LS_HEADERS, (entry_cells(e, at) for e in entries)):
            print(line)
        age = f" created more than {args.older_than} ago" if older_than else ""
        print(f"{len(entries)} shown{age}; {waiting} waiting {where}")
    elif waiting and older_than:
        print(f"none created more than {args.older_than} ago; {waiting} waiting {where}")
    else:
        print(f"nothing waiting {where}")
    return EXIT_OK


# -- retry ---------------------------------------------------------------------------
def run_retry(args: argparse.Namespace) -> int:
    config, rule_peers, peer = _context(args)

    async def reset(store: Storage) -> list[str]:
        await _check_peer(store, peer, rule_peers)
        at = now_ms()
        waiting = [
            state.peer
            for state in await store.peer_states()
            if peer in (None, state.peer) and (state.failures > 0 or state.backoff_until_ms > at)
        ]
        await store.spool_retry(peer)
        return waiting

    reset_peers = run_on_storage(config, reset)
    if args.json:
        print(json.dumps({"reset": len(reset_peers), "peers": reset_peers}))
    elif reset_peers:
        print(
            f"backoff cleared for {len(reset_peers)} peer(s): {', '.join(reset_peers)}; "
            "the sender tries again at its next poll"
        )
    else:
        who = f"{peer} was not" if peer else "no peer was"
        print(f"{who} in backoff: nothing to reset")
    return EXIT_OK


# -- purge ---------------------------------------------------------------------------
Confirm = Callable[[str], bool]


def ask_on_terminal(question: str) -> bool:
    """Ask on the terminal; refuse outright when there is none to ask on."""
    if not sys.stdin.isatty():
        raise UsageError(
            "purge: refusing to delete without confirmation: stdin is not a terminal; "
            "add --yes to confirm"
        )
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in CONFIRM_WORDS


def run_purge(args: argparse.Namespace, *, confirm: Confirm = ask_on_terminal) -> int:
    from gateway.observability.audit import append_event

    if args.all and args.peer is not None:
        raise UsageError("purge: give --peer P or --all, not both")
    if not args.all and args.peer is None:
        raise UsageError("purge: name the lane with --peer P (or every lane with --all)")
    older_than = None if args.older_than is None else parse_age_option(args.older_than)
    config, rule_peers, peer = _context(args)
    before = None if older_than is None else now_ms() - older_than * MS_PER_SECOND
    which = f"the lane of {peer}" if peer else "every lane"
    age = f", created more than {args.older_than} ago" if older_than else ""

    async def inspect(store: Storage) -> int:
        await _check_peer(store, peer, rule_peers)
        lanes = await store.spool_stats()
        return sum(lane.depth for name, lane in lanes.items() if peer in (None, name))

    async def purge(store: Storage) -> int:
        await _check_peer(store, peer, rule_peers)
        return await store.spool_purge(peer=peer, created_before_ms=before, at_ms=now_ms())

    if not args.yes:
        waiting = run_on_storage(config, inspect)
        question = f"Delete the envelopes in {which}{age} ({waiting} waiting there) for good?"
        if not confirm(question):
            print("not confirmed: nothing purged")
            return EXIT_FAILURE
    purged = run_on_storage(config, purge)
    append_event(
        config.audit_path,
        "spool_purged",
        max_bytes=config.audit_max_bytes,
        node=config.node,
        peer=peer or "*",
        older_than_s=older_than,
        count=purged,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "purged": purged,
                    "peer": peer,
                    "older_than_s": older_than,
                    "status": STATUS_PURGED,
                }
            )
        )
    else:
        print(f"purged {purged} envelope(s) from {which}{age}; their status is {STATUS_PURGED}")
    return EXIT_OK
