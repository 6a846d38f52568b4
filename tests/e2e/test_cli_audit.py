"""`gateway audit verify`, run as the real console script, and the CLI's own audit records.

Chains are written by the real admin commands (`gateway token issue|revoke`,
`gateway spool purge`) on a `gateway init` setup, or by the audit module's
appender for the rotation case; then tampered with byte by byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.observability.audit import MIN_MAX_BYTES, AuditEvent, append_events

pytestmark = pytest.mark.e2e

COMMAND_TIMEOUT = 60
_SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]
RECORDS = 8


def gateway(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        cwd=cwd,
    )


def ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = gateway(*args)
    assert result.returncode == 0, result.stderr
    return result


def chain(path: Path, count: int = RECORDS, *, max_bytes: int = 1 << 20) -> None:
    events = [
        AuditEvent.of(
            "policy_denial",
            at=1_700_000_000.0 + n,
            direction="inbound",
            envelope_id=f"env{n:03d}",
            peer="globex.example",
            reason="peer_not_allowed",
        )
        for n in range(count)
    ]
    append_events(path, events, max_bytes=max_bytes)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def tampered(result: subprocess.CompletedProcess[str], path: Path, line: int, seq: int) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"TAMPERED: {path}:{line}: record seq {seq}: "), first
    return first


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    chain(path)
    return path


def test_an_intact_log_exits_0_with_its_count(log: Path) -> None:
    result = ok("audit", "verify", log)
    assert (
        result.stdout.splitlines()[0] == f"intact: {RECORDS} record(s) (seq 1-{RECORDS}) in 1 file"
    )
    last = json.loads(lines(log)[-1])["hash"]
    assert result.stdout.splitlines()[1] == f"last hash: {last}"


def test_a_changed_byte_exits_1_naming_the_record(log: Path) -> None:
    data = bytearray(log.read_bytes())
    start = sum(len(line) for line in lines(log)[:4])
    offset = data.index(b"env004", start) + 5
    data[offset] = ord("9")  # env004 -> env009: still valid JSON, another id
    log.write_bytes(bytes(data))
    first = tampered(gateway("audit", "verify", log), log, 5, 5)
    assert "changed" in first


def test_a_removed_record_exits_1_naming_the_record_after_the_gap(log: Path) -> None:
    kept = lines(log)
    del kept[2]  # seq 3
    log.write_bytes(b"".join(kept))
    first = tampered(gateway("audit", "verify", log), log, 3, 4)
    assert "removed" in first


def test_a_swapped_pair_exits_1_naming_the_record(log: Path) -> None:
    swapped = lines(log)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    log.write_bytes(b"".join(swapped))
    tampered(gateway("audit", "verify", log), log, 6, 7)


def test_a_rotated_pair_verifies_across_files(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    while not any(p.name.startswith("audit.log.2") for p in tmp_path.iterdir()):
        chain(log, 4, max_bytes=MIN_MAX_BYTES)
    chain(log, 2, max_bytes=MIN_MAX_BYTES)
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("audit.log.2")]
    total = len(lines(old)) + len(lines(log))

    result = ok("audit", "verify", old, log)
    assert result.stdout.startswith(f"intact: {total} record(s) (seq 1-{total}) in 2 files")

    # Alone, the new file starts mid-chain: exit 1, with a hint; --from-hash fixes that.
    alone = gateway("audit", "verify", log)
    assert "--from-hash" in tampered(alone, log, 1, len(lines(old)) + 1)
    old_last = json.loads(lines(old)[-1])["hash"]
    ok("audit", "verify", "--from-hash", old_last, log)

    # Files in the wrong order are not one chain.
    assert gateway("audit", "verify", log, old).returncode == 1


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = gateway("audit", "verify", tmp_path / "nope.log")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"gateway: error: audit verify: {tmp_path / 'nope.log'}: no such file"
    )


def test_no_file_or_no_command_is_a_usage_error() -> None:
    assert gateway("audit", "verify").returncode == 2
    assert gateway("audit").returncode == 2


def test_admin_commands_append_to_one_chain(tmp_path: Path) -> None:
    directory = tmp_path / "acme"
    ok("init", "--org", "acme.example", "--dir", directory)
    config = directory / "gateway.yaml"
    token = ok("token", "issue", "alice", "-c", config).stdout.strip()
    ok("token", "issue", "bob", "-c", config)
    ok("token", "revoke", "alice", "-c", config)
    ok("spool", "purge", "--all", "--yes", "-c", config)

    log = directory / "data" / "audit.log"
    records = [json.loads(line) for line in lines(log)]
    assert [r["kind"] for r in records] == [
        "token_issued",
        "token_issued",
        "token_revoked",
        "spool_purged",
    ]
    assert [r.get("user") for r in records[:3]] == [
        "alice@acme.example",
        "bob@acme.example",
        "alice@acme.example",
    ]
    assert records[2]["count"] == 1
    assert (records[3]["peer"], records[3]["count"]) == ("*", 0)
    assert all(r["source"] == "cli" for r in records)
    assert token not in log.read_text()
    result = ok("audit", "verify", log)
    assert result.stdout.startswith("intact: 4 record(s)")


def test_the_chains_of_several_nodes_are_each_verified(tmp_path: Path) -> None:
    """Each gateway node of an org keeps its own chain; one command checks them all."""
    logs = {}
    for node in ("gw1", "gw2"):
        path = tmp_path / f"{node}.audit.log"
        events = [
            AuditEvent.of("token_issued", at=1_700_000_000.0 + n, node=node, user=f"u{n}")
            for n in range(RECORDS)
        ]
        append_events(path, events)
        logs[node] = path
    result = ok("audit", "verify", logs["gw1"], logs["gw2"])
    assert f"node gw1: intact: {RECORDS} record(s) (seq 1-{RECORDS}) in 1 file" in result.stdout
    assert f"node gw2: intact: {RECORDS} record(s)" in result.stdout

    # A change in one node's chain is named with its node; the other still verifies.
    data = lines(logs["gw2"])
    data[3] = data[3].replace(b'"u3"', b'"u9"')
    logs["gw2"].write_bytes(b"".join(data))
    tampered = gateway("audit", "verify", logs["gw1"], logs["gw2"])
    assert tampered.returncode == 1
    assert f"node gw2: TAMPERED: {logs['gw2']}:4: record seq 4" in tampered.stdout
    assert "node gw1: intact" in tampered.stdout

    # --from-hash names where one chain starts: it cannot apply to two.
    refused = gateway("audit", "verify", logs["gw1"], logs["gw2"], "--from-hash", "0" * 64)
    assert refused.returncode == 2
    assert "--from-hash applies to one chain; these files hold 2" in refused.stderr


def test_records_written_by_admin_commands_name_the_node(tmp_path: Path) -> None:
    directory = tmp_path / "acme"
    ok("init", "--org", "acme.example", "--dir", directory)
    config = directory / "gateway.yaml"
    config.write_text(config.read_text() + "node: gw7\n")
    ok("token", "issue", "alice", "-c", config)
    (record,) = [json.loads(line) for line in lines(directory / "data" / "audit.log")]
    assert record["node"] == "gw7"
