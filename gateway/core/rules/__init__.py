"""Federation rules: the model, the loader, the evaluator and the diff.

``load_rules(text, filename=..., read_file=...)`` validates a rules file and
returns :class:`Rules` (or raises ``RulesError`` with every issue);
``CompiledRules(rules)`` answers policy questions; ``diff_rules(old, new)``
says what changes in effect. docs/rules.md is the admin's guide.
"""

from gateway.core.rules.diff import RulesDiff, diff_rules, format_diff
from gateway.core.rules.evaluator import CompiledRules, Decision, IdPMembers, reason_for_peer
from gateway.core.rules.loader import ReadFile, load_rules
from gateway.core.rules.model import (
    BurnOnRead,
    ClaimMatch,
    Direction,
    Group,
    Limits,
    Mark,
    Peer,
    PeerRef,
    Rules,
    SignInRequirement,
    TtlBounds,
)

__all__ = [
    "BurnOnRead",
    "ClaimMatch",
    "CompiledRules",
    "Decision",
    "Direction",
    "Group",
    "IdPMembers",
    "Limits",
    "Mark",
    "Peer",
    "PeerRef",
    "ReadFile",
    "Rules",
    "RulesDiff",
    "SignInRequirement",
    "TtlBounds",
    "diff_rules",
    "format_diff",
    "load_rules",
    "reason_for_peer",
]
