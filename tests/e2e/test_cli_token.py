"""`gateway token issue|revoke`, run as the real console script on a `gateway init` setup.

The database is read back with Python's own sqlite3 module (not the gateway's
storage code) to see that only the SHA-256 of a token is kept, and the
gateway's authentication is asked whether the printed token opens the
account, before and after revocation.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.clientapi.tokens import authenticate
from gateway.core.address import Address
from gateway.storage.sqlite import open_sqlite_storage

pytestmark = pytest.mark.e2e

COMMAND_TIMEOUT = 60  # seconds; generous, so that a hang fails instead of blocking
_SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]
TOKEN_RE = re.compile(r"gwt_[A-Za-z0-9_-]{43}")
DAVE = Address.parse("dave@acme.example")


def gateway(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        cwd=cwd,
    )


def ok(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = gateway(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: error: ")
    return lines[0]


@pytest.fixture
def org(tmp_path: Path) -> Path:
    directory = tmp_path / "acme"
    ok("init", "--org", "acme.example", "--dir", directory)
    rules = directory / "rules.yaml"
    text = rules.read_text()
    assert "members: [alice, bob]" in text
    rules.write_text(text.replace("members: [alice, bob]", "members: [alice, bob, dave]"))
    return directory


def stored_tokens(directory: Path) -> list[tuple[bytes, str]]:
    with sqlite3.connect(directory / "data" / "gateway.sqlite3") as conn:
        rows = conn.execute("SELECT token_hash, user FROM tokens ORDER BY user").fetchall()
    return [(bytes(h), str(u)) for h, u in rows]


async def user_of(directory: Path, token: str) -> Address | None:
    async with open_sqlite_storage(directory / "data" / "gateway.sqlite3") as store:
        return await authenticate(store, f"Bearer {token}")


async def test_issue_prints_a_token_once_and_stores_only_its_hash(org: Path) -> None:
    config = org / "gateway.yaml"
    first = ok("token", "issue", "dave", "-c", config)
    token = first.stdout.strip()
    assert TOKEN_RE.fullmatch(token), first.stdout
    assert first.stdout == token + "\n"  # stdout is the token alone: scripts can capture it
    assert "only this once" in first.stderr
    assert token not in first.stderr

    assert stored_tokens(org) == [(hashlib.sha256(token.encode()).digest(), "dave@acme.example")]
    on_disk = b"".join(p.read_bytes() for p in (org / "data").iterdir() if p.is_file())
    assert token.encode() not in on_disk
    assert await user_of(org, token) == DAVE

    # A full address works too, and from the setup directory the config is found by default.
    second = ok("token", "issue", "Dave@acme.example", cwd=org).stdout.strip()
    assert second != token
    assert len(stored_tokens(org)) == 2
    assert await user_of(org, second) == DAVE


async def test_revoke_removes_every_token_of_the_user(org: Path) -> None:
    config = org / "gateway.yaml"
    dave_tokens = [ok("token", "issue", "dave", "-c", config).stdout.strip() for _ in range(2)]
    alice = ok("token", "issue", "alice", "-c", config).stdout.strip()

    revoked = ok("token", "revoke", "dave", "-c", config)
    assert revoked.stdout.strip() == "revoked 2 tokens of dave@acme.example"
    for token in dave_tokens:
        assert await user_of(org, token) is None
    assert await user_of(org, alice) == Address.parse("alice@acme.example")
    assert [user for _, user in stored_tokens(org)] == ["alice@acme.example"]

    again = ok("token", "revoke", "dave@acme.example", "-c", config)
    assert again.stdout.strip() == "revoked 0 tokens of dave@acme.example"


def test_revoke_works_for_a_user_no_longer_in_the_rules(org: Path) -> None:
    config = org / "gateway.yaml"
    ok("token", "issue", "dave", "-c", config)
    rules = org / "rules.yaml"
    rules.write_text(rules.read_text().replace("alice, bob, dave", "alice, bob"))
    revoked = ok("token", "revoke", "dave", "-c", config)
    assert revoked.stdout.strip() == "revoked 1 token of dave@acme.example"


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("mallory", "mallory@acme.example is in no group of the rules"),
        ("dave@globex.example", "dave@globex.example is not a user of acme.example"),
        ("not a user!", "is not a user name or address"),
    ],
)
def test_issue_for_a_bad_user_is_a_one_line_error(org: Path, user: str, message: str) -> None:
    line = one_line_error(gateway("token", "issue", user, "-c", org / "gateway.yaml"))
    assert message in line
    assert not (org / "data" / "gateway.sqlite3").exists() or stored_tokens(org) == []


def test_a_missing_config_is_a_one_line_error(tmp_path: Path) -> None:
    line = one_line_error(gateway("token", "issue", "dave", "-c", tmp_path / "nope.yaml"))
    assert "nope.yaml" in line


def test_token_without_a_command_is_a_usage_error() -> None:
    result = gateway("token")
    assert result.returncode == 2
    assert "issue or revoke" in result.stderr
