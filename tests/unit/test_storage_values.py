"""The pure parts of storage: value checks, status words, migration scripts."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import Reason
from gateway.storage import EnvelopeRecord, PeerState, SpoolItem, rejected_status
from gateway.storage.base import MAX_ENVELOPE_ID_LENGTH, check_status
from gateway.storage.sqlite.schema import (
    MIGRATIONS,
    Migration,
    check_migrations,
    split_statements,
)


def record(**changes: object) -> EnvelopeRecord:
    fields: dict[str, object] = {
        "envelope_id": "e1",
        "sender": "alice@acme.example",
        "recipient": "bob@globex.example",
        "created_ms": 1,
        "expires_ms": 2,
        "burn_on_read": False,
        "data": b"ciphertext",
    }
    fields.update(changes)
    return EnvelopeRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"envelope_id": ""}, "envelope_id"),
        ({"envelope_id": "x" * (MAX_ENVELOPE_ID_LENGTH + 1)}, "envelope_id"),
        ({"sender": 7}, "sender of e1"),
        ({"recipient": ""}, "recipient of e1"),
        ({"created_ms": -1}, "created_ms of e1"),
        ({"expires_ms": True}, "expires_ms of e1"),
        ({"burn_on_read": 1}, "burn_on_read of e1"),
        ({"data": "text"}, "data of e1"),
    ],
)
def test_bad_envelope_fields_are_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record(**changes)


def test_size_is_the_length_of_the_data_and_data_stays_out_of_reprs() -> None:
    item = SpoolItem(
        envelope_id="e1",
        peer="globex.example",
        sender="alice@acme.example",
        recipient="bob@globex.example",
        created_ms=1,
        expires_ms=2,
        burn_on_read=True,
        data=b"SECRET-CIPHERTEXT",
    )
    assert item.size == len(b"SECRET-CIPHERTEXT")
    assert "SECRET" not in repr(item)
    with pytest.raises(ValueError, match="peer of e1"):
        SpoolItem(**{**item.__dict__, "peer": ""})


def test_peer_state_checks_its_fields() -> None:
    assert PeerState(peer="globex.example").failures == 0
    with pytest.raises(ValueError, match="failures"):
        PeerState(peer="globex.example", failures=-1)
    with pytest.raises(ValueError, match="backoff_until_ms"):
        PeerState(peer="globex.example", backoff_until_ms=2**63)


@pytest.mark.parametrize("status", ["queued", "forwarded", "delivered", "expired"])
def test_plain_statuses(status: str) -> None:
    assert check_status(status) == status


def test_every_reason_code_makes_a_rejected_status() -> None:
    for reason in Reason:
        assert rejected_status(reason) == f"rejected:{reason.value}"


@given(st.text(max_size=40))
def test_check_status_accepts_only_the_status_words(text: str) -> None:
    valid = text in {"queued", "forwarded", "delivered", "expired"} or (
        text.startswith("rejected:")
        and len(text) > len("rejected:")
        and text.isascii()
        and text.isprintable()
        and " " not in text
    )
    if valid:
        assert check_status(text) == text
    else:
        with pytest.raises(ValueError, match="status"):
            check_status(text)


def test_split_statements_keeps_triggers_whole() -> None:
    script = """
    CREATE TABLE a (x INTEGER);
    CREATE TRIGGER t AFTER INSERT ON a BEGIN
        UPDATE a SET x = x + 1; DELETE FROM a WHERE x > 9;
    END;
    -- a comment
    CREATE INDEX i ON a (x);
    """
    statements = split_statements(script)
    assert len(statements) == 3
    assert statements[1].startswith("CREATE TRIGGER")
    assert statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE b (x INTEGER)")


def test_the_shipped_migrations_are_numbered_and_parse() -> None:
    check_migrations(MIGRATIONS)
    conn = sqlite3.connect(":memory:")
    try:
        for migration in MIGRATIONS:
            for statement in split_statements(migration.script):
                assert sqlite3.complete_statement(statement)
                conn.execute(statement)
    finally:
        conn.close()


def test_migration_numbers_must_not_skip() -> None:
    with pytest.raises(ValueError, match="version 3"):
        check_migrations([Migration(1, "a", ""), Migration(3, "c", "")])
