"""Client API tokens: their form, the Authorization header, users, and hashed storage."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.clientapi.tokens import (
    TOKEN_LENGTH,
    TOKEN_PREFIX,
    TOKEN_RANDOM_BYTES,
    authenticate,
    bearer_token,
    is_well_formed,
    issue_token,
    new_token,
    parse_local_user,
    resolve_user,
    revoke_tokens,
    token_hash,
)
from gateway.core.address import Address
from gateway.core.rules import CompiledRules, load_rules
from gateway.storage.sqlite import open_sqlite_storage

RULES = """\
version: 1
org: acme.example
default: deny
peers: {}
groups:
  staff:
    members: [alice, bob]
"""

ALICE = Address.parse("alice@acme.example")
BOB = Address.parse("bob@acme.example")


@pytest.fixture(scope="module")
def rules() -> CompiledRules:
    return CompiledRules(load_rules(RULES, filename="rules.yaml"))


def test_a_new_token_is_the_prefix_and_32_random_bytes() -> None:
    token = new_token()
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) == TOKEN_LENGTH
    assert is_well_formed(token)
    body = token.removeprefix(TOKEN_PREFIX)
    assert len(base64.urlsafe_b64decode(body + "=")) == TOKEN_RANDOM_BYTES
    assert len({new_token() for _ in range(200)}) == 200


def test_the_stored_form_is_the_sha256_of_the_token() -> None:
    token = new_token()
    assert token_hash(token) == hashlib.sha256(token.encode()).digest()
    assert token_hash(token) != token_hash(new_token())


def test_bearer_header_forms() -> None:
    token = new_token()
    assert bearer_token(f"Bearer {token}") == token
    assert bearer_token(f"bearer {token}") == token  # the scheme is case-insensitive
    assert bearer_token(f"  BEARER   {token}  ") == token
    assert bearer_token(None) is None
    assert bearer_token("") is None
    assert bearer_token(token) is None  # no scheme
    assert bearer_token(f"Basic {token}") is None
    assert bearer_token(f"Bearer {token}x") is None
    assert bearer_token(f"Bearer {token[:-1]}") is None
    assert bearer_token("Bearer gwt_" + "A" * 42 + "B") is None  # non-canonical last character
    assert bearer_token("Bearer tok_" + token[4:]) is None


@given(st.text(max_size=80))
def test_bearer_token_never_raises_and_returns_only_well_formed_tokens(text: str) -> None:
    found = bearer_token(text)
    assert found is None or is_well_formed(found)


def test_resolve_user_accepts_a_name_or_an_address_of_the_org(rules: CompiledRules) -> None:
    assert resolve_user("alice", rules) == ALICE
    assert resolve_user("Alice@ACME.example", rules) == ALICE
    with pytest.raises(ValueError, match="in no group"):
        resolve_user("mallory", rules)
    with pytest.raises(ValueError, match=r"not a user of acme\.example"):
        resolve_user("alice@globex.example", rules)
    with pytest.raises(ValueError, match="not a user name or address"):
        resolve_user("al ice", rules)


def test_parse_local_user_does_not_need_the_rules() -> None:
    assert parse_local_user("mallory", "acme.example") == Address.parse("mallory@acme.example")
    with pytest.raises(ValueError, match="not a user of"):
        parse_local_user("a@b.example", "acme.example")


async def test_issue_authenticate_revoke_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "gateway.sqlite3"
    async with open_sqlite_storage(db) as store:
        first = await issue_token(store, ALICE, at_ms=1)
        second = await issue_token(store, ALICE, at_ms=2)
        bobs = await issue_token(store, BOB, at_ms=3)
        assert first != second
        for token in (first, second):
            assert await authenticate(store, f"Bearer {token}") == ALICE
        assert await authenticate(store, f"Bearer {bobs}") == BOB
        assert await authenticate(store, f"Bearer {new_token()}") is None
        assert await authenticate(store, None) is None

        assert await revoke_tokens(store, ALICE) == 2
        assert await authenticate(store, f"Bearer {first}") is None
        assert await authenticate(store, f"Bearer {second}") is None
        assert await authenticate(store, f"Bearer {bobs}") == BOB  # others keep theirs
        assert await revoke_tokens(store, ALICE) == 0

    # Only hashes reach the database: no token text is anywhere in its files.
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    for token in (first, second, bobs):
        assert token.encode() not in stored
        assert token.removeprefix(TOKEN_PREFIX).encode() not in stored
