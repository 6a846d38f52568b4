"""The pure parts of cross-node wakeups: notification payloads, and waking every waiter."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.clientapi.mailbox_wait import MailboxWaiters
from gateway.storage.postgres.arrivals import (
    EVERYONE,
    MAX_NAMED_RECIPIENTS,
    MAX_PAYLOAD_BYTES,
    payloads,
    read_payload,
)

NODE = "0123456789abcdef"

addresses = st.builds(
    lambda user, org: f"{user}@{org}.example",
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=64),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=60),
)


def heard(texts: list[str]) -> tuple[set[str], bool]:
    users: set[str] = set()
    everyone = False
    for text in texts:
        sender, named = read_payload(text)
        assert sender == NODE
        if named is None:
            everyone = True
        else:
            users.update(named)
    return users, everyone


def test_no_recipients_no_notification() -> None:
    assert payloads(NODE, set()) == []


def test_a_few_recipients_fit_one_payload() -> None:
    texts = payloads(NODE, {"bob@acme.example", "alice@acme.example"})
    assert texts == [f"{NODE}\nalice@acme.example\nbob@acme.example"]
    assert read_payload(texts[0]) == (NODE, ["alice@acme.example", "bob@acme.example"])


@given(st.sets(addresses, min_size=1, max_size=MAX_NAMED_RECIPIENTS))
def test_recipients_round_trip_in_payloads_under_the_limit(recipients: set[str]) -> None:
    texts = payloads(NODE, recipients)
    assert all(len(text.encode()) <= MAX_PAYLOAD_BYTES for text in texts)
    assert heard(texts) == (recipients, False)


def test_the_payload_limit_is_met_exactly() -> None:
    # Each line is 100 bytes with its newline: the first payload holds as many as fit.
    recipients = {f"{i:03d}{'x' * 82}@acme.example" for i in range(200)}
    texts = payloads(NODE, recipients)
    assert len(texts) > 1
    assert max(len(text.encode()) for text in texts) <= MAX_PAYLOAD_BYTES
    assert len(texts[0].encode()) > MAX_PAYLOAD_BYTES - 100
    assert heard(texts) == (recipients, False)


def test_more_recipients_than_the_bound_wake_everyone() -> None:
    recipients = {f"user{i}@acme.example" for i in range(MAX_NAMED_RECIPIENTS + 1)}
    assert payloads(NODE, recipients) == [f"{NODE}\n{EVERYONE}"]
    assert read_payload(f"{NODE}\n{EVERYONE}") == (NODE, None)


def test_a_payload_of_someone_else_is_read_without_error() -> None:
    assert read_payload("") == ("", [])
    assert read_payload("hello") == ("hello", [])


async def test_notify_all_wakes_every_watch_but_not_later_ones() -> None:
    waiters = MailboxWaiters()
    with waiters.watch("a@acme.example") as a, waiters.watch("b@acme.example") as b:
        waiters.notify_all()
        assert a.woken
        assert b.woken
        assert waiters.watched_users == 0
        with waiters.watch("a@acme.example") as later:
            assert not later.woken
            assert not waiters.closed
