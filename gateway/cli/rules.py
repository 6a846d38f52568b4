"""``gateway rules check|explain|diff``: validate, question and compare federation rules.

Exit codes follow diff(1): 0 for "yes" (valid, allowed, no difference), 1 for
"no" (invalid, denied, different), 2 when the command could not answer
(a bad argument, a missing or unreadable file, or, for explain and diff,
rules that do not validate). docs/rules.md shows the output of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Registrar, UsageError, set_handler
from gateway.core.address import Address
from gateway.core.durations import parse_duration
from gateway.core.envelope import RetentionWrap
from gateway.errors import AddressError, Reason, RulesError

if TYPE_CHECKING:
    from gateway.core.rules import CompiledRules, Decision, Rules


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "rules",
        help="validate, explain and compare federation rules",
        description="Validate federation rules, explain a decision, compare two versions.",
    )
    commands = parser.add_subparsers(title="rules commands", metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate rules files; every error as FILE:LINE:COLUMN: key.path: message",
        description="Validate each FILE completely. Exit 0 when all are valid (one summary "
        "line each), 1 when any is not (every error listed), 2 when a file cannot be read.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="a rules file")
    set_handler(check, run_check)

    explain = commands.add_parser(
        "explain",
        help="would an envelope FROM -> TO be allowed, and which rule decides",
        description="Decide one envelope as the gateway would and say which rule decided. "
        "The direction follows from which address belongs to the rules' org: outbound (FROM "
        "is ours), inbound (TO is ours, FROM at a peer) or local (both ours). Exit 0 allowed, "
        "1 denied, 2 error.",
    )
    explain.add_argument("file", metavar="FILE", help="a rules file")
    explain.add_argument("--from", dest="sender", required=True, metavar="ADDR")
    explain.add_argument("--to", dest="recipient", required=True, metavar="ADDR")
    explain.add_argument(
        "--group",
        metavar="G",
        help="inbound only: the sender's group, as its gateway asserts it",
    )
    explain.add_argument(
        "--size",
        type=_size,
        default=0,
        metavar="N",
        help="envelope size in bytes (default 0: any size limit passes)",
    )
    explain.add_argument(
        "--ttl",
        type=_duration,
        default=None,
        metavar="D",
        help="requested TTL like 1h or 2d (default: the deciding group's default TTL)",
    )
    explain.add_argument("--burn-on-read", action="store_true", help="the envelope is burn-on-read")
    explain.add_argument(
        "--envelope-version",
        type=int,
        choices=(1, 2),
        default=2,
        help="the envelope's version (default 2; version 1 has no retention copy)",
    )
    explain.add_argument(
        "--without-retention",
        action="store_true",
        help="outbound: the envelope has no retention copy (default: one for the current key)",
    )
    explain.add_argument(
        "--claim",
        action="append",
        default=[],
        type=_claim,
        metavar="NAME=VALUE",
        help="an IdP claim value of our user's sign-in (FROM if ours, else TO; repeatable), "
        "for groups with members_from, e.g. --claim groups=legal",
    )
    explain.add_argument(
        "--acr", metavar="VALUE", help="the acr of our sender's sign-in, for groups with requires"
    )
    explain.add_argument(
        "--amr",
        action="append",
        default=[],
        metavar="METHOD",
        help="an amr method of our sender's sign-in (repeatable), for groups with requires",
    )
    explain.add_argument("--json", action="store_true", help="print the decision as JSON")
    set_handler(explain, run_explain)

    diff = commands.add_parser(
        "diff",
        help="what changes in effect from OLD to NEW: reach, peers, members, limits",
        description="List every (group, peer) pair that gains or loses reach in either "
        "direction, peers added, removed or changed, members who moved, and limits that "
        "changed. Exit 0 when nothing differs in effect, 1 when something does, 2 on error.",
    )
    diff.add_argument("old", metavar="OLD", help="the rules file as it was")
    diff.add_argument("new", metavar="NEW", help="the rules file as it will be")
    set_handler(diff, run_diff)

    set_handler(parser, _usage)


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError("rules: name a command: check, explain or diff (see `gateway rules --help`)")


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a size cannot be negative")
    return value


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read_file(path: str) -> bytes:
    return Path(path).read_bytes()


def _read_rules_file(path: str) -> bytes:
    try:
        return _read_file(path)
    except OSError as exc:
        raise UsageError(f"cannot read rules file {path}: {exc.strerror or exc}") from exc


def _load(path: str) -> Rules:
    from gateway.core.rules import load_rules

    return load_rules(_read_rules_file(path), filename=path, read_file=_read_file)


def _print_issues(error: RulesError) -> None:
    for issue in error.issues:
        print(issue)


# -- check -----------------------------------------------------------------------------
def run_check(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            rules = _load(path)
        except UsageError as exc:
            print(f"gateway: error: {exc}", file=sys.stderr)
            status = EXIT_USAGE
        except RulesError as exc:
            _print_issues(exc)
            if status == EXIT_OK:
                status = EXIT_FAILURE
        else:
            print(f"{path}: ok: {rules.summary()}")
    return status


# -- explain ---------------------------------------------------------------------------
def run_explain(args: argparse.Namespace) -> int:
    from gateway.core.rules import CompiledRules

    try:
        sender = Address.parse(args.sender)
        recipient = Address.parse(args.recipient)
    except AddressError as exc:
        raise UsageError(exc.message) from exc
    try:
        rules = _load(args.file)
    except RulesError as exc:
        _print_issues(exc)
        return EXIT_USAGE
    ours = sender if sender.org == rules.org else recipient
    claims: dict[str, frozenset[str]] = {}
    for name, value in args.claim:
        claims[name] = claims.get(name, frozenset()) | {value}
    compiled = CompiledRules(rules, idp_members=_OneUser(ours.user, claims))
    decision = sign_in_decision(compiled, ours, claims, sender=sender, acr=args.acr, amr=args.amr)
    if decision is None:
        decision = explain(
            compiled,
            sender,
            recipient,
            asserted_group=args.group,
            size=args.size,
            ttl_seconds=args.ttl,
            burn_on_read=args.burn_on_read,
            with_retention=not args.without_retention,
            envelope_version=args.envelope_version,
        )
    note = compiled.retention_note(decision)
    if args.json:
        print(json.dumps(decision_json(decision, sender, recipient, note), sort_keys=True))
    else:
        lines = render_decision(decision, sender, recipient, note)
        lines.extend(_sign_in_notes(compiled, sender, args.acr, args.amr))
        print("\n".join(lines))
    return EXIT_OK if decision.allowed else EXIT_FAILURE


def _claim(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, like groups=legal, got {text!r}")
    return name.strip(), value.strip()


class _OneUser:
    """The IdP claims of the one user a question is about (``--claim``)."""

    def __init__(self, user: str, claims: dict[str, frozenset[str]]) -> None:
        self._user, self._claims = user, claims

    def claims_of(self, user: str) -> dict[str, frozenset[str]]:
        return self._claims if user == self._user else {}


def sign_in_decision(
    compiled: CompiledRules,
    ours: Address,
    claims: dict[str, frozenset[str]],
    *,
    sender: Address,
    acr: str | None,
    amr: list[str],
) -> Decision | None:
    """A denial the sign-in itself would give (two groups, or a weak sign-in), or ``None``."""
    from gateway.core.rules import Decision, Direction

    groups = compiled.groups_for(ours.user, claims)
    direction = Direction.OUTBOUND if ours == sender else Direction.INBOUND
    if len(groups) > 1:
        names = " and ".join(group.name for group in groups)
        return Decision(
            allowed=False,
            reason=Reason.GROUP_CONFLICT,
            direction=direction,
            group=None,
            peer=None,
            rule=groups[1].mark,
            detail=f"{ours.user} would be in {names}: sign-in is refused (group_conflict)",
        )
    if ours != sender or len(groups) != 1 or (acr is None and not amr):
        return None
    group = groups[0]
    if group.requires is None or group.requires.met_by(acr, tuple(amr)):
        return None
    return Decision(
        allowed=False,
        reason=Reason.MFA_REQUIRED,
        direction=direction,
        group=group.name,
        peer=None,
        rule=group.mark,
        detail=f"group {group.name} requires {group.requires}: the session is refused",
    )


def _sign_in_notes(
    compiled: CompiledRules, sender: Address, acr: str | None, amr: list[str]
) -> list[str]:
    group = compiled.group_of(sender.user) if sender.org == compiled.org else None
    if group is None or group.requires is None or acr is not None or amr:
        return []
    return [
        f"sign-in: group {group.name} requires {group.requires}; a session without it is "
        "refused (mfa_required): give --acr or --amr to check one"
    ]


def explain(
    compiled: CompiledRules,
    sender: Address,
    recipient: Address,
    *,
    asserted_group: str | None = None,
    size: int = 0,
    ttl_seconds: int | None = None,
    burn_on_read: bool = False,
    with_retention: bool = True,
    envelope_version: int = 2,
) -> Decision:
    """Decide as the gateway would, picking the direction from which address is ours.

    A version 2 outbound envelope carries a retention copy for the current
    retention key unless ``with_retention`` is false; a version 1 one has none.
    A local recipient under inbound retention receives version 2 only.
    """
    org = compiled.org
    if sender.org == org:
        if asserted_group is not None:
            raise UsageError("--group is for inbound envelopes: a peer asserts its sender's group")
        if ttl_seconds is None:
            group = compiled.group_of(sender.user)
            ttl_seconds = group.limits.ttl.default if group is not None else 0
        decision = compiled.decide_outbound(
            sender, recipient, size=size, ttl_seconds=ttl_seconds, burn_on_read=burn_on_read
        )
        org_retention = compiled.rules.retention
        wrap = None
        if with_retention and envelope_version == 2 and org_retention is not None:
            key = org_retention.key
            wrap = RetentionWrap(key.id, key.public_key, b"")
        decision = compiled.decide_retention(decision, wrap)
        return compiled.decide_recipient_retention(decision, recipient, version=envelope_version)
    if recipient.org == org:
        if ttl_seconds is None:
            group = compiled.group_of(recipient.user)
            ttl_seconds = group.limits.ttl.default if group is not None else 0
        decision = compiled.decide_inbound(
            sender.org,
            sender,
            recipient,
            asserted_group=asserted_group,
            size=size,
            ttl_seconds=ttl_seconds,
            burn_on_read=burn_on_read,
        )
        return compiled.decide_recipient_retention(decision, recipient, version=envelope_version)
    raise UsageError(f"neither {sender} nor {recipient} is an address of {org}, the rules' org")


def render_decision(
    decision: Decision, sender: Address, recipient: Address, retention: str | None = None
) -> list[str]:
    from gateway.core.rules import reason_for_peer

    verdict = "allowed" if decision.allowed else "denied"
    context = [decision.direction.value]
    if decision.group is not None:
        context.append(f"group {decision.group}")
    lines = [
        f"{verdict}: {sender} -> {recipient} ({', '.join(context)})",
        f"reason: {decision.reason.value}",
    ]
    if decision.rule is None:
        lines.append("rule: none")
    elif decision.rule.path:
        lines.append(f"rule: {decision.rule} ({decision.rule.path})")
    else:
        lines.append(f"rule: {decision.rule}")
    lines.append(f"detail: {decision.detail}")
    answer = reason_for_peer(decision)
    if answer is not decision.reason:
        lines.append(
            f"peer reads: {answer.value} (as for a user who does not exist: "
            "a peer may not learn who is in a group that does not hear it)"
        )
    if retention is not None:
        lines.append(f"retention: {retention}")
    return lines


def decision_json(
    decision: Decision, sender: Address, recipient: Address, retention: str | None = None
) -> dict[str, object]:
    from gateway.core.rules import Direction, reason_for_peer

    rule = decision.rule
    return {
        "allowed": decision.allowed,
        "reason": decision.reason.value,
        "direction": decision.direction.value,
        "from": str(sender),
        "to": str(recipient),
        "group": decision.group,
        "peer": decision.peer,
        "rule": None
        if rule is None
        else {"file": rule.file, "line": rule.line, "path": rule.path or None},
        "detail": decision.detail,
        **({"retention": retention} if retention is not None else {}),
        # The reason code the peer would read in its transaction's answer.
        **(
            {"peer_reads": reason_for_peer(decision).value}
            if decision.direction is Direction.INBOUND and not decision.allowed
            else {}
        ),
    }


# -- diff --------------------------------------------------------------------------------
def run_diff(args: argparse.Namespace) -> int:
    from gateway.core.rules import diff_rules, format_diff

    loaded: list[Rules] = []
    failed = False
    for path in (args.old, args.new):
        try:
            loaded.append(_load(path))
        except RulesError as exc:
            _print_issues(exc)
            failed = True
    if failed:
        return EXIT_USAGE
    lines = format_diff(diff_rules(loaded[0], loaded[1]))
    for line in lines:
        print(line)
    return EXIT_FAILURE if lines else EXIT_OK
