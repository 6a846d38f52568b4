"""The audit chain: records, appending under a lock, rotation, verification, the writer.

Files live under ``tmp_path``; several real processes append to one file to
show that the lock keeps one chain. The writer runs on trio's autojump clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.config import DEFAULT_AUDIT_MAX_BYTES, load_config
from gateway.errors import ConfigError
from gateway.observability.audit import (
    FLUSH_TIMEOUT,
    GENESIS,
    MAX_FIELD_CHARS,
    MIN_MAX_BYTES,
    AuditError,
    AuditEvent,
    AuditWriter,
    NoAudit,
    append_event,
    append_events,
    canonical_bytes,
    chain_node,
    group_chains,
    record_hash,
    seal_record,
    utc_timestamp,
    verify_files,
)
from gateway.observability.metrics import AUDIT_RECORDS_DROPPED
from gateway.rules_runtime import ReloadRecord

APPENDERS = 4
RECORDS_PER_APPENDER = 40


def denial(number: int) -> AuditEvent:
    return AuditEvent.of(
        "policy_denial",
        at=1_700_000_000.0 + number,
        direction="outbound",
        envelope_id=f"id{number:04d}",
        reason="peer_not_allowed",
        group="legal",
    )


def write_chain(path: Path, count: int, *, max_bytes: int = 1 << 20) -> list[dict[str, object]]:
    return append_events(path, [denial(n) for n in range(count)], max_bytes=max_bytes)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# -- records ---------------------------------------------------------------------------


def test_hash_covers_canonical_json_without_the_hash_field() -> None:
    record = seal_record(denial(1), seq=1, prev=GENESIS)
    body = {k: v for k, v in record.items() if k != "hash"}
    expected = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_bytes(record) == expected
    assert record["hash"] == record_hash(record)
    assert record["prev"] == GENESIS
    assert record["seq"] == 1
    assert record["ts"] == "2023-11-14T22:13:21.000Z"


def test_timestamp_is_utc_with_milliseconds() -> None:
    assert utc_timestamp(0.25) == "1970-01-01T00:00:00.250Z"


@pytest.mark.parametrize("name", ["token", "payload", "ciphertext", "signing_key", "bearer_token"])
def test_fields_that_could_hold_secrets_or_content_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="secret or content"):
        AuditEvent.of("token_issued", at=0.0, **{name: "x"})


@pytest.mark.parametrize("name", ["seq", "hash", "prev", "ts", "Bad-Name"])
def test_chain_fields_and_odd_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        AuditEvent.of("token_issued", at=0.0, **{name: "x"})


def test_unknown_kind_and_odd_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown audit record kind"):
        AuditEvent.of("coffee_made", at=0.0)
    with pytest.raises(ValueError, match="not a string"):
        AuditEvent.of("token_issued", at=0.0, user=b"bytes")  # type: ignore[arg-type]


def test_long_strings_are_cut_to_the_bound() -> None:
    event = AuditEvent.of("token_issued", at=0.0, user="u" * (MAX_FIELD_CHARS + 50))
    assert event.fields["user"] == "u" * MAX_FIELD_CHARS


# -- appending and verifying -----------------------------------------------------------


def test_an_appended_chain_verifies_with_its_count(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    records = write_chain(log, 5)
    records += write_chain(log, 3)
    assert [r["seq"] for r in records] == list(range(1, 9))
    report = verify_files([log])
    assert report.intact
    assert report.records == 8
    assert (report.first_seq, report.last_seq) == (1, 8)
    assert report.last_hash == records[-1]["hash"]
    assert (log.stat().st_mode & 0o777) == 0o600


def test_a_changed_byte_names_its_record(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 6)
    data = log.read_bytes()
    lines = lines_of(log)
    offset = sum(len(line) for line in lines[:3]) + lines[3].index(b"legal")
    log.write_bytes(data[:offset] + b"L" + data[offset + 1 :])
    report = verify_files([log])
    assert report.broken is not None
    assert (report.broken.line, report.broken.seq) == (4, 4)
    assert "changed" in report.broken.problem
    assert report.records == 3


def test_a_removed_record_breaks_the_next_one(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 6)
    lines = lines_of(log)
    log.write_bytes(b"".join(lines[:2] + lines[3:]))
    report = verify_files([log])
    assert report.broken is not None
    assert (report.broken.line, report.broken.seq) == (3, 4)
    assert "removed" in report.broken.problem


def test_a_removed_first_record_is_found(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 3)
    log.write_bytes(b"".join(lines_of(log)[1:]))
    report = verify_files([log])
    assert report.broken is not None
    assert (report.broken.line, report.broken.seq) == (1, 2)


def test_a_swapped_pair_names_the_first_record_out_of_place(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 6)
    lines = lines_of(log)
    lines[2], lines[3] = lines[3], lines[2]
    log.write_bytes(b"".join(lines))
    report = verify_files([log])
    assert report.broken is not None
    assert (report.broken.line, report.broken.seq) == (3, 4)


def test_a_line_that_is_not_a_record_is_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 2)
    with log.open("ab") as handle:
        handle.write(b'{"seq": 3}\n')
    report = verify_files([log])
    assert report.broken is not None
    assert report.broken.line == 3
    assert "prev" in report.broken.problem


def test_a_torn_tail_is_cut_off_and_recorded(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 2)
    with log.open("ab") as handle:
        handle.write(b'{"seq":3,"kind":"polic')  # a crash in the middle of a line
    assert not verify_files([log]).intact
    records = write_chain(log, 1)
    assert [r["kind"] for r in records] == ["audit_torn_tail", "policy_denial"]
    assert records[0]["discarded_bytes"] == len(b'{"seq":3,"kind":"polic')
    report = verify_files([log])
    assert report.intact
    assert report.records == 4


def test_a_damaged_last_record_stops_appending(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 1)
    log.write_bytes(b"garbage\n")
    with pytest.raises(AuditError, match="last record is damaged"):
        write_chain(log, 1)


def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    for _ in range(12):
        write_chain(log, 10, max_bytes=MIN_MAX_BYTES)
    rotated = sorted(p for p in tmp_path.iterdir() if p.name.startswith("audit.log."))
    rotated = [p for p in rotated if not p.name.endswith(".lock")]
    assert len(rotated) >= 2
    first_of_new = json.loads(lines_of(log)[0])
    assert first_of_new["kind"] == "audit_rotated"
    assert first_of_new["previous_file"] == rotated[-1].name
    last_of_old = json.loads(lines_of(rotated[-1])[-1])
    assert first_of_new["prev"] == last_of_old["hash"]
    assert first_of_new["seq"] == last_of_old["seq"] + 1

    # Rotated names sort by time: the files in that order are one chain.
    report = verify_files([*rotated, log])
    assert report.intact
    assert report.records == 120 + len(rotated)
    # The newest file alone needs the hash it follows.
    alone = verify_files([log])
    assert alone.broken is not None
    assert "--from-hash" in alone.broken.problem
    assert verify_files([log], from_hash=str(last_of_old["hash"])).intact
    # Out of order, the chain breaks at the first file's start.
    assert not verify_files([rotated[-1], *rotated[:-1], log]).intact


def test_concurrent_processes_keep_one_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from gateway.observability.audit import append_event
        for n in range({RECORDS_PER_APPENDER}):
            append_event(Path(sys.argv[1]), "token_issued", user=f"u{{sys.argv[2]}}-{{n}}")
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(log), str(i)]) for i in range(APPENDERS)
    ]
    assert all(p.wait(timeout=120) == 0 for p in processes)
    report = verify_files([log])
    assert report.intact, report.broken
    assert report.records == APPENDERS * RECORDS_PER_APPENDER
    users = {json.loads(line)["user"] for line in lines_of(log)}
    assert len(users) == APPENDERS * RECORDS_PER_APPENDER


def test_append_event_marks_the_cli_as_its_source(tmp_path: Path) -> None:
    record = append_event(tmp_path / "audit.log", "token_revoked", user="a@b.example", count=2)
    assert record["source"] == "cli"
    assert isinstance(record["actor"], str)
    assert record["actor"]


def test_append_event_translates_file_system_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises((AuditError, OSError)):
        append_event(blocker / "audit.log", "token_issued", user="a@b.example")


def test_verify_refuses_a_malformed_from_hash(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_chain(log, 1)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        verify_files([log], from_hash="abc")


# -- the gateway's writer ----------------------------------------------------------------


async def test_writer_appends_in_order_and_flushes_on_cancel(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = tmp_path / "audit.log"
    writer = AuditWriter(log, wall_clock=lambda: 1_700_000_000.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for n in range(300):
            await writer.record("policy_denial", envelope_id=f"e{n}", reason="no_group")
        nursery.cancel_scope.cancel()  # what is queued is still written
    report = verify_files([log])
    assert report.intact
    assert report.records == 300
    ids = [json.loads(line)["envelope_id"] for line in lines_of(log)]
    assert ids == [f"e{n}" for n in range(300)]


async def test_writer_waits_for_room_and_drops_only_nowait_records(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = tmp_path / "audit.log"
    writer = AuditWriter(log, capacity=2)
    before = AUDIT_RECORDS_DROPPED._value.get()
    assert writer.record_nowait("token_issued", user="a")
    assert writer.record_nowait("token_issued", user="b")
    assert not writer.record_nowait("token_issued", user="c")  # full: dropped, counted
    assert AUDIT_RECORDS_DROPPED._value.get() == before + 1

    waited = False
    async with trio.open_nursery() as nursery:

        async def deny() -> None:
            nonlocal waited
            await writer.record("policy_denial", reason="no_group")  # waits for room
            waited = True

        nursery.start_soon(deny)
        await trio.sleep(1)
        assert not waited  # backpressure: no writer yet, no room
        await nursery.start(writer.run)
        await trio.sleep(1)
        assert waited
        nursery.cancel_scope.cancel()
    kinds = [json.loads(line)["kind"] for line in lines_of(log)]
    assert kinds == ["token_issued", "token_issued", "policy_denial"]


async def test_writer_retries_a_batch_that_failed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = tmp_path / "audit.log"
    log.write_bytes(b"damaged\n")
    writer = AuditWriter(log)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.record("token_issued", user="a")
        await trio.sleep(1)
        assert log.read_bytes() == b"damaged\n"
        log.write_bytes(b"")  # the admin moved the damaged file aside
        await trio.sleep(FLUSH_TIMEOUT + 10)
        nursery.cancel_scope.cancel()
    assert verify_files([log]).records == 1


async def test_no_audit_still_refuses_secret_fields() -> None:
    await NoAudit().record("policy_denial", reason="no_group")
    with pytest.raises(ValueError, match="secret"):
        await NoAudit().record("policy_denial", token="gwt_x")


# -- config ---------------------------------------------------------------------------------


def test_config_audit_log_defaults_to_the_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("org: acme.example\ndata_dir: state\n")
    config = load_config(path)
    assert config.audit_path == tmp_path / "state" / "audit.log"
    assert config.audit_max_bytes == DEFAULT_AUDIT_MAX_BYTES


def test_config_audit_log_and_bound_can_be_set(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("org: acme.example\naudit_log: /var/log/gw/audit.log\naudit_max_bytes: 8192\n")
    config = load_config(path)
    assert config.audit_path == Path("/var/log/gw/audit.log")
    assert config.audit_max_bytes == 8192


def test_config_audit_bound_too_small_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("org: acme.example\naudit_max_bytes: 10\n")
    with pytest.raises(ConfigError, match="audit_max_bytes: must be at least 4096"):
        load_config(path)


async def test_a_reload_records_itself_and_each_peer_it_changed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = tmp_path / "audit.log"
    writer = AuditWriter(log)
    reload = ReloadRecord(
        at=0.0,
        trigger="sighup",
        ok=True,
        sha256="ab" * 32,
        summary="2 groups, 3 members, 2 peers",
        dropped_peers=("gone.example", "rekeyed.example"),
        added_peers=("new.example",),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.record_reload(reload, {"new.example", "rekeyed.example"})
        nursery.cancel_scope.cancel()
    records = [json.loads(line) for line in lines_of(log)]
    assert [(r["kind"], r.get("peer")) for r in records] == [
        ("rules_reload", None),
        ("peer_added", "new.example"),
        ("peer_removed", "gone.example"),
        ("peer_trust_changed", "rekeyed.example"),
    ]
    assert records[0]["sha256"] == "ab" * 32
    assert records[0]["result"] == "success"
    assert records[0]["peers_added"] == ["new.example"]
    assert all(r.get("rules_sha256", "ab" * 32) == "ab" * 32 for r in records)


# -- several gateway nodes: a chain each ------------------------------------------------


async def test_the_writer_names_its_node_in_every_record(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = tmp_path / "audit.log"
    writer = AuditWriter(log, node="gw2")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.record("policy_denial", envelope_id="e1", reason="no_group")
        assert writer.record_nowait("token_issued", user="a@acme.example")
        nursery.cancel_scope.cancel()
    assert [json.loads(line)["node"] for line in lines_of(log)] == ["gw2", "gw2"]
    record = append_event(log, "token_revoked", node="gw2", user="a@acme.example", count=1)
    assert record["node"] == "gw2"
    assert verify_files([log]).records == 3


def test_files_of_several_nodes_are_several_chains(tmp_path: Path) -> None:
    def chain_of(node: str | None, name: str, count: int) -> Path:
        path = tmp_path / name
        fields = {"node": node} if node is not None else {}
        events = [
            AuditEvent.of("token_issued", at=1_700_000_000.0 + n, user=f"u{n}", **fields)
            for n in range(count)
        ]
        append_events(path, events)
        return path

    gw1, gw2 = chain_of("gw1", "gw1-audit.log", 3), chain_of("gw2", "gw2-audit.log", 2)
    alone = chain_of(None, "audit.log", 1)
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    chains = group_chains([gw2, alone, gw1, empty])
    assert chains == [("gw2", [gw2]), (None, [alone, empty]), ("gw1", [gw1])]
    assert chain_node(gw1) == "gw1"
    assert [verify_files(files).records for node, files in chains if node] == [2, 3]
