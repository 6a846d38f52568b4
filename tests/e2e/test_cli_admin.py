"""`gateway peers` and `gateway spool ls|retry|purge`, run as the real console script.

Each test gets a fresh copy of one `gateway init` setup whose rules name three
peers, and fills its SQLite storage through the storage API, as a running
gateway would have: lanes for two peers of the rules and for one peer since
removed from them, one peer in backoff, one up, one never tried. Then it runs
the commands and checks their output and, for the commands that change
something, the storage afterwards.

Times are real wall-clock times (the commands compare with ``time.time()``),
chosen far apart (minutes against days) so that a slow test run cannot move a
result across a boundary.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import yaml

from gateway.cli._storage import MAX_CELL_WIDTH, RulePeers, cell, format_age, render_table
from gateway.cli.peers import peer_rows
from gateway.config import load_config
from gateway.storage import STATUS_PURGED, STATUS_QUEUED, PeerState, SpoolItem, Storage
from gateway.storage.leases import NodeRecord, lane_lease
from gateway.storage.sqlite import open_sqlite_storage

pytestmark = pytest.mark.e2e

T = TypeVar("T")

COMMAND_TIMEOUT = 60  # seconds; generous, so that a hang fails instead of blocking
_SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]

ORG = "acme.example"
GLOBEX = "globex.example"  # in the rules, in backoff, 3 spooled
INITECH = "initech.example"  # in the rules, up, 2 spooled
UMBRELLA = "umbrella.example"  # in the rules, never tried, nothing spooled
GONE = "gone.example"  # removed from the rules, 1 spooled, state left behind
RULE_PEERS = (GLOBEX, INITECH, UMBRELLA)

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
CANARY = b"CIPHERTEXT-CANARY-7f3a"  # in every envelope's bytes; must never be printed


def gateway(
    *args: str | Path, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *map(str, args)],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def ok(*args: str | Path) -> str:
    result = gateway(*args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def fails(*args: str | Path, code: int | None = None) -> str:
    """Run a command that must fail with one line on stderr; return that line."""
    result = gateway(*args)
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def json_of(*args: str | Path) -> Any:
    return json.loads(ok(*args, "--json"))


def on_storage(setup: Path, fn: Callable[[Storage], Awaitable[T]]) -> T:
    path = load_config(setup / "gateway.yaml").storage.sqlite_path
    assert path is not None

    async def main() -> T:
        async with open_sqlite_storage(path, readers=1) as store:
            return await fn(store)

    return trio.run(main)


# -- the setup ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acme.example, whose rules name three peers, each from its own `gateway init`."""
    root = tmp_path_factory.mktemp("orgs")
    peers: dict[str, Any] = {}
    for org in RULE_PEERS:
        ok("init", "--org", org, "--dir", root / org)
        peers.update(yaml.safe_load(ok("peer", "card", "--dir", root / org)))
    acme = root / "acme"
    ok("init", "--org", ORG, "--dir", acme)
    rules = {
        "version": 1,
        "org": ORG,
        "default": "deny",
        "peers": peers,
        "groups": {"staff": {"members": ["alice", "bob"], "send_to": list(RULE_PEERS)}},
    }
    (acme / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    ok("rules", "check", acme / "rules.yaml")
    return acme


def item(envelope_id: str, peer: str, *, created_ms: int, size: int = 100) -> SpoolItem:
    return SpoolItem(
        envelope_id=envelope_id,
        peer=peer,
        sender=f"alice@{ORG}",
        recipient=f"bob@{peer}",
        created_ms=created_ms,
        expires_ms=created_ms + 7 * DAY,
        burn_on_read=False,
        data=CANARY + b"\0" * (size - len(CANARY)),
    )


# (id, peer, created this long ago, size)
ENVELOPES = (
    ("g-old-1", GLOBEX, 2 * DAY, 100),
    ("g-old-2", GLOBEX, 30 * HOUR, 200),
    ("g-new", GLOBEX, 1 * MINUTE, 300),
    ("i-1", INITECH, 10 * MINUTE, 400),
    ("i-2", INITECH, 9 * MINUTE, 500),
    ("x-1", GONE, 3 * DAY, 600),
)


async def fill(store: Storage) -> None:
    now = int(time.time() * 1000)
    for envelope_id, peer, ago, size in ENVELOPES:
        created = now - ago
        # Spooled a second after it was created: the lane's OLDEST is its head's age.
        spooled = await store.spool_put(
            [item(envelope_id, peer, created_ms=created, size=size)], at_ms=created + SECOND
        )
        assert spooled == [envelope_id]
    await store.peer_state_put(
        PeerState(
            peer=GLOBEX,
            failures=4,
            backoff_until_ms=now + HOUR,
            last_success_ms=now - 3 * HOUR,
            last_error="connect: timed out",
        )
    )
    await store.peer_state_put(PeerState(peer=INITECH, last_success_ms=now - 2 * MINUTE))
    await store.peer_state_put(
        PeerState(peer=GONE, failures=9, backoff_until_ms=now + 5 * MINUTE, last_error="refused")
    )
    # Node gw2 has driven initech's lane for 10 minutes; globex's lease ran out.
    await store.lease_claim(
        lane_lease(INITECH),
        node="gw2",
        incarnation="gw2-1",
        at_ms=now - 10 * MINUTE,
        until_ms=now + HOUR,
    )
    await store.lease_claim(
        lane_lease(GLOBEX), node="gw1", incarnation="gw1-1", at_ms=now - HOUR, until_ms=now - 1
    )
    for name, beat, rules in (("gw1", now - HOUR, "11" * 32), ("gw2", now - SECOND, "22" * 32)):
        await store.node_beat(
            NodeRecord(
                node=name,
                incarnation=f"{name}-1",
                version="9.9",
                rules_sha256=rules,
                started_ms=now - 2 * HOUR,
                beat_ms=beat,
            )
        )


@pytest.fixture
def setup(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "acme"
    shutil.copytree(template, copy, symlinks=True)
    on_storage(copy, fill)
    return copy


def config_of(setup: Path) -> tuple[str, Path]:
    return ("-c", setup / "gateway.yaml")


# -- peers -------------------------------------------------------------------------
def test_peers_json_shows_every_peer_with_its_state_and_lane(setup: Path) -> None:
    rows = json_of("peers", *config_of(setup))
    by_peer = {row["peer"]: row for row in rows}
    assert [row["peer"] for row in rows] == sorted([*RULE_PEERS, GONE])

    globex = by_peer[GLOBEX]
    assert globex["state"] == "backoff"
    assert globex["in_rules"] is True
    assert globex["failures"] == 4
    assert globex["spool_depth"] == 3
    assert globex["spool_bytes"] == 600
    assert 3500 < globex["backoff_remaining_s"] <= 3600
    assert 3 * 3600 <= globex["last_success_age_s"] < 3 * 3600 + 100
    assert 2 * 86400 - 10 < globex["oldest_age_s"] < 2 * 86400 + 100
    assert globex["last_error"] == "connect: timed out"

    initech = by_peer[INITECH]
    assert initech["state"] == "up"
    assert initech["driven_by"] == "gw2"
    assert 9 * 60 < (time.time() * 1000 - initech["driven_since_ms"]) / 1000 < 11 * 60
    assert by_peer[GLOBEX]["driven_by"] is None
    assert initech["spool_depth"] == 2
    assert initech["backoff_remaining_s"] == 0
    assert initech["last_error"] is None

    umbrella = by_peer[UMBRELLA]
    assert umbrella["state"] == "never-tried"
    assert umbrella["spool_depth"] == 0
    assert umbrella["oldest_age_s"] is None
    assert umbrella["last_success_ms"] is None

    gone = by_peer[GONE]
    assert gone["state"] == "not-in-rules"
    assert gone["in_rules"] is False
    assert gone["spool_depth"] == 1
    assert gone["failures"] == 9


def test_peers_table(setup: Path) -> None:
    lines = ok("peers", *config_of(setup)).splitlines()
    assert lines[0].split() == [
        "PEER",
        "STATE",
        "DRIVEN",
        "BY",
        "LAST",
        "SUCCESS",
        "BACKOFF",
        "UNTIL",
        "FAILURES",
        "SPOOL",
        "OLDEST",
        "LAST",
        "ERROR",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {*RULE_PEERS, GONE}
    # PEER STATE DRIVEN-BY LAST-SUCCESS(2 words) BACKOFF(2 words) FAILURES SPOOL OLDEST ERROR...
    globex = rows[GLOBEX].split()
    assert globex[1] == "backoff"
    assert globex.pop(2) == "nobody"  # its lease ran out: no node drives it now
    assert globex[2].startswith("3h")
    assert globex[3] == "ago"
    assert globex[4] == "in"
    assert globex[5].startswith(("59m", "1h00m"))
    assert globex[6:8] == ["4", "3"]
    assert globex[8].startswith(("2d00h", "1d23h"))
    assert rows[GLOBEX].endswith("connect: timed out")
    initech = rows[INITECH].split()
    assert initech[1] == "up"
    assert initech.pop(2) == "gw2"
    assert initech.pop(2).startswith(("(10m", "(9m5"))
    assert initech[4:7] == ["-", "0", "2"]
    assert initech[-1] == "-"  # no error shown for a peer that is up
    umbrella = rows[UMBRELLA].split()
    assert umbrella.pop(2) == "nobody"
    assert umbrella[1:3] == ["never-tried", "never"]
    assert umbrella[3:] == ["-", "0", "0", "-", "-"]
    assert rows[GONE].split()[1:3] == ["not-in-rules", "-"]


# Loaded by `gateway peers` only if it imported client, server or envelope code that
# it never runs (tests/unit/test_cli_imports.py holds registration to the same rule).
NOT_FOR_PEERS = (
    "httpx",
    "h11",
    "prometheus_client",
    "nacl",
    "psycopg",
    "gateway.client",
    "gateway.clientapi",
    "gateway.crypto",
    "gateway.federation",
    "gateway.http",
    "gateway.observability",
    "gateway.storage.postgres",
)


def test_peers_imports_only_what_it_reads(setup: Path) -> None:
    # An admin runs it first in an incident, against a big spool: its start-up is
    # the config, the rules and the SQLite engine, not every command's libraries.
    script = (
        "import contextlib, io, json, sys\n"
        "from gateway.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    code = main(['peers', '-c', {str(setup / 'gateway.yaml')!r}])\n"
        "print(json.dumps({'code': code, 'out': out.getvalue(), 'modules': sorted(sys.modules)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["code"] == 0, done.stderr
    assert GLOBEX in result["out"]  # it did read the storage
    modules = set(result["modules"])
    assert {"trio", "gateway.storage.sqlite", "gateway.core.rules"} <= modules
    loaded = {
        name
        for name in modules
        if any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_FOR_PEERS)
    }
    assert loaded == set()


def test_nodes_lists_each_node_live_or_gone_with_what_it_drives(setup: Path) -> None:
    nodes = {row["node"]: row for row in json_of("nodes", *config_of(setup))}
    assert set(nodes) == {"gw1", "gw2"}
    gw1, gw2 = nodes["gw1"], nodes["gw2"]
    assert (gw1["state"], gw2["state"]) == ("gone", "live")
    assert gw2["lanes"] == [INITECH]
    assert gw1["lanes"] == []  # its lease on globex ran out
    assert gw2["version"] == "9.9"
    assert gw2["rules_match_file"] is False
    assert gw2["clock_offset_ms"] is None  # SQLite has no clock of its own
    lines = ok("nodes", *config_of(setup)).splitlines()
    assert lines[0].split() == [
        "NODE", "STATE", "VERSION", "RULES", "LAST", "BEAT", "UP", "FOR", "LANES", "SWEEPER",
        "CLOCK",
    ]  # fmt: skip
    row = lines[2].split()
    assert row[:4] == ["gw2", "live", "9.9", "222222222222"]
    assert "(not this file)" in lines[2]
    assert row[-3:] == ["1", "-", "-"]


def test_peers_with_unreadable_rules_still_shows_storage(setup: Path) -> None:
    (setup / "rules.yaml").write_text("version: 1\norg: acme.example\nbogus: 1\n")
    result = gateway("peers", *config_of(setup), "--json")
    assert result.returncode == 0, result.stderr
    assert "warning: the rules do not validate" in result.stderr
    rows = {row["peer"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {GLOBEX, INITECH, GONE}  # umbrella was only known from the rules
    assert {row["in_rules"] for row in rows.values()} == {None}
    assert rows[GONE]["state"] == "backoff"  # without the rules, its own state shows


# -- spool ls ----------------------------------------------------------------------
def test_ls_lists_envelopes_in_lane_order_without_ciphertext(setup: Path) -> None:
    out = ok("spool", "ls", *config_of(setup))
    assert CANARY.decode() not in out
    assert base64.b64encode(CANARY)[:16].decode() not in out
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "PEER", "FROM", "TO", "CREATED", "EXPIRES", "SIZE"]
    assert [line.split()[0] for line in lines[1:-1]] == [e[0] for e in ENVELOPES]
    first = lines[1].split()
    assert first[1:4] == [GLOBEX, f"alice@{ORG}", f"bob@{GLOBEX}"]
    assert first[4].startswith(("2d00h", "1d23h"))
    assert first[5] == "ago"
    assert first[6] == "in"
    assert first[7].startswith(("5d00h", "4d23h"))
    assert first[8] == "100"
    assert lines[-1] == "6 shown; 6 waiting in the spool"


def test_ls_filters_by_peer_age_and_limit(setup: Path) -> None:
    entries = json_of("spool", "ls", *config_of(setup), "--peer", GLOBEX)
    assert [e["id"] for e in entries] == ["g-old-1", "g-old-2", "g-new"]
    assert {e["peer"] for e in entries} == {GLOBEX}
    assert [e["size"] for e in entries] == [100, 200, 300]
    assert all("data" not in e for e in entries)

    old = json_of("spool", "ls", *config_of(setup), "--older-than", "1d")
    assert [e["id"] for e in old] == ["g-old-1", "g-old-2", "x-1"]
    assert all(e["age_s"] > 86400 for e in old)

    old_globex = json_of("spool", "ls", *config_of(setup), "--peer", GLOBEX, "--older-than", "36h")
    assert [e["id"] for e in old_globex] == ["g-old-1"]

    assert [e["id"] for e in json_of("spool", "ls", *config_of(setup), "--limit", "2")] == [
        "g-old-1",
        "g-old-2",
    ]
    assert json_of("spool", "ls", *config_of(setup), "--peer", UMBRELLA) == []
    out = ok("spool", "ls", *config_of(setup), "--peer", INITECH, "--older-than", "1h")
    assert out.strip() == f"none created more than 1h ago; 2 waiting in the lane of {INITECH}"
    out = ok("spool", "ls", *config_of(setup), "--peer", UMBRELLA)
    assert out.strip() == f"nothing waiting in the lane of {UMBRELLA}"


def test_ls_pages_past_one_storage_page(setup: Path) -> None:
    now = int(time.time() * 1000)
    many = 2500  # more than one spool_list page (1,000)

    async def more(store: Storage) -> None:
        items = [item(f"bulk-{i:05d}", INITECH, created_ms=now - HOUR) for i in range(many)]
        await store.spool_put(items, at_ms=now)

    on_storage(setup, more)
    entries = json_of("spool", "ls", *config_of(setup), "--peer", INITECH, "--limit", "100000")
    assert len(entries) == 2 + many
    assert len({e["id"] for e in entries}) == len(entries)
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs)
    # The age filter pages too: every bulk envelope is older than 30m, i-1/i-2 are not.
    old = json_of("spool", "ls", *config_of(setup), "--older-than", "30m", "--limit", "3000")
    assert len(old) == 3 + many


# -- spool retry -------------------------------------------------------------------
def test_retry_one_peer_clears_its_backoff_only(setup: Path) -> None:
    out = ok("spool", "retry", *config_of(setup), "--peer", GLOBEX)
    assert out.startswith(f"backoff cleared for 1 peer(s): {GLOBEX}")

    async def states(store: Storage) -> dict[str, PeerState]:
        return {state.peer: state for state in await store.peer_states()}

    after = on_storage(setup, states)
    assert after[GLOBEX].failures == 0
    assert after[GLOBEX].backoff_until_ms == 0
    assert after[GLOBEX].last_success_ms is not None  # history is kept
    assert after[GONE].failures == 9  # not asked for: untouched
    assert after[GONE].backoff_until_ms > 0
    assert json_of("peers", *config_of(setup))[0]["state"] == "up"  # globex sorts first


def test_retry_every_peer(setup: Path) -> None:
    result = json_of("spool", "retry", *config_of(setup))
    assert result == {"reset": 2, "peers": [GLOBEX, GONE]}
    states = on_storage(setup, lambda store: store.peer_states())
    assert all(s.failures == 0 and s.backoff_until_ms == 0 for s in states)
    out = ok("spool", "retry", *config_of(setup))
    assert out.strip() == "no peer was in backoff: nothing to reset"
    out = ok("spool", "retry", *config_of(setup), "--peer", INITECH)
    assert out.strip() == f"{INITECH} was not in backoff: nothing to reset"


# -- spool purge -------------------------------------------------------------------
async def statuses(store: Storage) -> dict[str, str | None]:
    found = {}
    for envelope_id, *_ in ENVELOPES:
        status = await store.status_get(envelope_id)
        found[envelope_id] = None if status is None else status.status
    return found


def test_purge_removes_only_the_selected_envelopes(setup: Path) -> None:
    out = ok("spool", "purge", *config_of(setup), "--peer", GLOBEX, "--older-than", "1d", "--yes")
    assert out.startswith(f"purged 2 envelope(s) from the lane of {GLOBEX}")
    assert [e["id"] for e in json_of("spool", "ls", *config_of(setup))] == [
        "g-new",
        "i-1",
        "i-2",
        "x-1",
    ]
    assert on_storage(setup, statuses) == {
        "g-old-1": STATUS_PURGED,
        "g-old-2": STATUS_PURGED,
        "g-new": STATUS_QUEUED,
        "i-1": STATUS_QUEUED,
        "i-2": STATUS_QUEUED,
        "x-1": STATUS_QUEUED,
    }
    depth = {row["peer"]: row["spool_depth"] for row in json_of("peers", *config_of(setup))}
    assert depth == {GLOBEX: 1, INITECH: 2, UMBRELLA: 0, GONE: 1}


def test_purge_a_lane_not_in_the_rules_warns_and_purges(setup: Path) -> None:
    result = gateway("spool", "purge", *config_of(setup), "--peer", GONE, "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert f"warning: {GONE} is not a peer in the rules" in result.stderr
    assert json.loads(result.stdout) == {
        "purged": 1,
        "peer": GONE,
        "older_than_s": None,
        "status": STATUS_PURGED,
    }
    assert on_storage(setup, statuses)["x-1"] == STATUS_PURGED


def test_purge_all(setup: Path) -> None:
    result = json_of("spool", "purge", *config_of(setup), "--all", "--yes")
    assert result["purged"] == len(ENVELOPES)
    assert set(on_storage(setup, statuses).values()) == {STATUS_PURGED}
    assert ok("spool", "ls", *config_of(setup)).strip() == "nothing waiting in the spool"


def test_purge_refuses_without_a_lane_or_confirmation(setup: Path) -> None:
    assert "--peer P" in fails("spool", "purge", *config_of(setup), "--yes", code=2)
    assert "not both" in fails(
        "spool", "purge", *config_of(setup), "--all", "--peer", GLOBEX, "--yes", code=2
    )
    line = fails("spool", "purge", *config_of(setup), "--peer", GLOBEX, code=2)
    assert "stdin is not a terminal" in line
    assert "--yes" in line
    assert len(json_of("spool", "ls", *config_of(setup))) == len(ENVELOPES)


@pytest.mark.parametrize(("answer", "purged"), [("n", False), ("", False), ("yes", True)])
def test_purge_asks_on_a_terminal(setup: Path, answer: str, purged: bool) -> None:
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode() + b"\n")
        result = gateway("spool", "purge", *config_of(setup), "--peer", INITECH, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert "Traceback" not in result.stderr
    assert f"Delete the envelopes in the lane of {INITECH} (2 waiting there)" in result.stdout
    left = {e["id"] for e in json_of("spool", "ls", *config_of(setup), "--peer", INITECH)}
    if purged:
        assert result.returncode == 0, result.stderr
        assert "purged 2 envelope(s)" in result.stdout
        assert left == set()
    else:
        assert result.returncode == 1
        assert "nothing purged" in result.stdout
        assert left == {"i-1", "i-2"}


# -- bad input ----------------------------------------------------------------------
def test_missing_config(tmp_path: Path) -> None:
    for command in (("peers",), ("spool", "ls"), ("spool", "retry")):
        line = fails(*command, "-c", tmp_path / "nope.yaml", code=1)
        assert "nope.yaml: no such file" in line


def test_default_config_is_in_the_current_directory(setup: Path) -> None:
    result = subprocess.run(
        [*GATEWAY, "peers", "--json"],
        cwd=setup,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 4


def test_storage_that_was_never_created(template: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    shutil.copytree(template, fresh, symlinks=True)
    database = fresh / "data" / "gateway.sqlite3"
    assert not database.exists()
    for command in (("peers",), ("spool", "ls"), ("spool", "purge", "--all", "--yes")):
        line = fails(*command, *config_of(fresh), code=1)
        assert "does not exist: the gateway has never run" in line
    assert not database.exists()  # and the commands did not create it


def test_bad_arguments(setup: Path) -> None:
    config = config_of(setup)
    assert "--older-than: invalid duration '3x'" in fails(
        "spool", "ls", *config, "--older-than", "3x", code=2
    )
    assert "--older-than" in fails("spool", "purge", *config, "--all", "--older-than", "0s")
    assert "--limit" in fails("spool", "ls", *config, "--limit", "0", code=2)
    assert "--limit" in fails("spool", "ls", *config, "--limit", "many", code=2)
    assert "--peer" in fails("spool", "ls", *config, "--peer", "not a domain!", code=2)
    line = fails("spool", "ls", *config, "--peer", "glbex.example", code=2)
    assert "glbex.example is not a peer in the rules" in line
    assert f"did you mean {GLOBEX}?" in line
    assert "not a peer" in fails("spool", "retry", *config, "--peer", "nobody.example", code=2)
    assert "not a peer" in fails(
        "spool", "purge", *config, "--peer", "nobody.example", "--yes", code=2
    )
    assert "name a command" in fails("spool", code=2)
    # Nothing changed by any of it.
    assert len(json_of("spool", "ls", *config)) == len(ENVELOPES)


# -- the pure helpers behind the columns --------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-5, "0s"),
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (86399, "23h59m"),
        (86400, "1d00h"),
        (400 * 86400 + 5 * 3600, "400d05h"),
    ],
)
def test_format_age(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown


def test_cells_are_printable_and_bounded() -> None:
    assert cell("bad\x1b[31mred\nline") == "bad?[31mred?line"
    long = cell("x" * 500)
    assert len(long) == MAX_CELL_WIDTH
    assert long.endswith("…")
    assert render_table(("A", "LONGER"), [("xyz", "1"), ("", "")]) == [
        "A    LONGER",
        "xyz  1",
        "",
    ]


def test_peer_state_words() -> None:
    now = 10 * DAY
    known = RulePeers(peers=frozenset({GLOBEX}))

    def status(state: PeerState | None, rules: RulePeers = known) -> str:
        row = peer_rows(rule_peers=rules, states=[state] if state else [], lanes={})[0]
        return row.status(now)

    assert status(None) == "never-tried"
    assert status(PeerState(peer=GLOBEX)) == "never-tried"
    assert status(PeerState(peer=GLOBEX, last_success_ms=now - 1)) == "up"
    assert status(PeerState(peer=GLOBEX, failures=1, last_success_ms=now - 1)) == "backoff"
    # Waiting out a backoff with no failure recorded still counts as backoff.
    assert status(PeerState(peer=GLOBEX, backoff_until_ms=now + 1)) == "backoff"
    assert status(PeerState(peer=GLOBEX, backoff_until_ms=now - 1, last_success_ms=1)) == "up"
    gone = RulePeers(peers=frozenset())
    assert status(PeerState(peer=GLOBEX, last_success_ms=1), gone) == "not-in-rules"
    unknown = RulePeers(peers=None, problem="unreadable")
    rows = peer_rows(rule_peers=unknown, states=[PeerState(peer=GLOBEX)], lanes={})
    assert rows[0].in_rules is None
    assert rows[0].status(now) == "never-tried"
