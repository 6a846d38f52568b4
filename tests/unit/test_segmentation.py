"""What a curious peer can learn of our users: no more than the rules let it reach.

To a peer, a user whose group does not receive from it (nor from any of its
groups) must be indistinguishable from a user who does not exist, at both
federation endpoints that name a user: the key directory and the per-envelope
results of a transaction. Same status, same code, same body, same work. Every
shape of ``receive_from`` is covered: a whole peer, a peer's group, ``*``, none.
The admin still reads the real reason (``rules explain``, the audit record).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.core.address import Address
from gateway.core.envelope import Envelope, new_envelope_id
from gateway.core.rules import CompiledRules, load_rules, reason_for_peer
from gateway.errors import Reason
from gateway.federation.keys import KeyDirectory
from gateway.federation.protocol import KEYS_PATH, decode_transaction, encode_transaction
from gateway.federation.receiver import judge_transaction
from gateway.http import Request
from tests.unit.test_rules_evaluator import peer_block

ACME, GLOBEX, INITECH = "acme.example", "globex.example", "initech.example"
NOW = 1_700_000_000_000
DAY = 86_400_000

# One user per shape of receive_from, and a name that is in no group.
WHOLE, BY_GROUP, STAR, NONE, GHOST = "wanda", "gina", "stella", "nora", "ghost"
# Who each peer may see (and send to): everyone else must look like GHOST.
VISIBLE = {GLOBEX: {WHOLE, BY_GROUP, STAR}, INITECH: {STAR}}


@pytest.fixture(scope="module")
def rules() -> CompiledRules:
    text = f"""\
version: 1
org: {ACME}
default: deny
groups:
  whole:
    members: [{WHOLE}]
    receive_from: [{GLOBEX}]
  by_group:
    members: [{BY_GROUP}]
    receive_from: [{GLOBEX}/sales]
  star:
    members: [{STAR}]
    receive_from: ["*"]
  segmented:
    members: [{NONE}]
peers:
{peer_block(GLOBEX)}{peer_block(INITECH)}"""
    return CompiledRules(load_rules(text, filename="acme.yaml"))


class _Keys:
    """Every user has published keys: only the rules decide what a peer reads."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def user_keys_get(self, user: str) -> bytes | None:
        self.asked.append(user)
        return b'{"record":"of ' + user.encode() + b'"}'


class _Rules:
    def __init__(self, rules: CompiledRules) -> None:
        self.current = rules


USERS = (WHOLE, BY_GROUP, STAR, NONE, GHOST)


@pytest.mark.parametrize("peer", [GLOBEX, INITECH])
def test_visible_to_follows_every_shape_of_receive_from(rules: CompiledRules, peer: str) -> None:
    assert {user for user in USERS if rules.visible_to(user, peer)} == VISIBLE[peer]
    assert not any(rules.visible_to(user, "stranger.example") for user in USERS)


@pytest.mark.parametrize("peer", [GLOBEX, INITECH])
async def test_the_key_directory_shows_a_peer_only_users_it_may_reach(
    rules: CompiledRules, peer: str
) -> None:
    store = _Keys()
    directory = KeyDirectory(org=ACME, rules=_Rules(rules), storage=store)
    answers: dict[str, tuple[int, Mapping[str, str], bytes]] = {}
    for user in USERS:
        response = await directory.get_keys(
            Request("GET", KEYS_PATH + user, peer=peer), {"user": user}
        )
        answers[user] = (response.status, dict(response.headers), response.body)

    for user in VISIBLE[peer]:
        assert answers[user][0] == 200
        assert answers[user][2] == b'{"record":"of ' + f"{user}@{ACME}".encode() + b'"}'
    unknown = answers[GHOST]
    assert unknown[0] == 404
    assert unknown[2] == b'{"error":"recipient_unknown"}'
    for user in set(USERS) - VISIBLE[peer]:
        assert answers[user] == unknown, user  # status, headers and body, byte for byte
    # The same work for every name: one storage read each, existing or not.
    assert store.asked == [f"{user}@{ACME}" for user in USERS]


def _envelope(recipient: str, *, sender_org: str, group: str | None) -> Envelope:
    return Envelope(
        version=1,
        id=new_envelope_id(),
        sender=Address.parse(f"someone@{sender_org}"),
        recipient=Address.of(recipient, ACME),
        created=NOW - 1000,
        expires=NOW - 1000 + DAY,
        burn_on_read=False,
        ciphertext=b"\x01" * 100,
        signature=b"\x02" * 64,
        group=group,
    )


@pytest.mark.parametrize(
    ("peer", "group"),
    [(GLOBEX, "sales"), (GLOBEX, "support"), (GLOBEX, None), (INITECH, "sales"), (INITECH, None)],
)
def test_a_transaction_answers_a_segmented_recipient_like_one_who_does_not_exist(
    rules: CompiledRules, peer: str, group: str | None
) -> None:
    sent = [_envelope(user, sender_org=peer, group=group) for user in USERS]
    txn = decode_transaction(encode_transaction(peer, ACME, sent))
    verdicts = dict(zip(USERS, judge_transaction(txn, rules, now_ms=NOW), strict=True))

    reachable = {STAR} | ({WHOLE} if peer == GLOBEX else set())
    if peer == GLOBEX and group == "sales":
        reachable.add(BY_GROUP)
    for user in USERS:
        expected = "accepted" if user in reachable else "recipient_unknown"
        assert verdicts[user].result == expected, user
    # The admin's side keeps the truth: segmented users are peer_not_allowed, the ghost unknown.
    for user in set(USERS) - reachable - {GHOST}:
        assert verdicts[user].reason == Reason.PEER_NOT_ALLOWED.value
    assert verdicts[GHOST].reason == Reason.RECIPIENT_UNKNOWN.value


def test_reason_for_peer_hides_only_the_inbound_segmentation(rules: CompiledRules) -> None:
    inbound = rules.decide_inbound(
        GLOBEX,
        Address.parse(f"x@{GLOBEX}"),
        Address.of(NONE, ACME),
        asserted_group=None,
        size=10,
        ttl_seconds=3600,
        burn_on_read=False,
    )
    assert inbound.reason is Reason.PEER_NOT_ALLOWED
    assert reason_for_peer(inbound) is Reason.RECIPIENT_UNKNOWN
    # Outbound denials are our own client's business: it reads the real reason.
    outbound = rules.decide_outbound(
        Address.of(NONE, ACME),
        Address.parse(f"bob@{GLOBEX}"),
        size=10,
        ttl_seconds=3600,
        burn_on_read=False,
    )
    assert outbound.reason is Reason.PEER_NOT_ALLOWED
    assert reason_for_peer(outbound) is Reason.PEER_NOT_ALLOWED
