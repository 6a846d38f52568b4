"""`gateway storage backup`: a consistent copy of a running SQLite store, segments included.

An idle store's backup holds the same envelopes byte for byte and the same
other rows, in compact segment files a gateway opens without changing a byte.
Envelopes deleted after the snapshot (their ranges zeroed) are left out, with
their live status and recounted lanes and mailboxes. A live row whose bytes are
gone is left out and named. A backup taken while another process keeps
putting and deleting large and small envelopes opens cleanly, every range
holds its own envelope, and no row live at the end is missing. Bad
destinations, a missing or foreign database and a PostgreSQL config are
refused through the command with one line.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.cli.main import main as gateway_main
from gateway.errors import StorageError
from gateway.storage.sqlite import LATEST_VERSION, open_sqlite_storage
from gateway.storage.sqlite import backup as backup_module
from gateway.storage.sqlite.backup import PARTIAL_DIR, backup_sqlite
from gateway.storage.sqlite.segments import read_range, segments_dir
from tests.integration.test_storage_segments import (
    assert_only_referenced_bytes,
    references,
    segment_files,
)
from tests.integration.test_storage_sqlite import BOB, GLOBEX, HASH, accepted, mail, spool_item

ROLL = 100_000  # a few large envelopes per segment
BIG, SMALL = 20_000, 700


def payload(envelope_id: str) -> bytes:
    """Bytes that tell which envelope they belong to; large or small by the id's hash."""
    seed = hashlib.sha256(envelope_id.encode()).digest()
    size = BIG if seed[0] % 3 else SMALL
    return (seed * (size // len(seed) + 1))[:size]


def stored(db_path: Path) -> dict[tuple[str, str], tuple[int, bytes]]:
    """(table, envelope id) -> (seq, bytes) of every envelope, read as the files hold them."""
    out: dict[tuple[str, str], tuple[int, bytes]] = {}
    directory = segments_dir(db_path)
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        for table in ("spool", "mailbox"):
            for seq, envelope_id, data, segment, offset, length in conn.execute(
                f"SELECT seq, envelope_id, data, segment, seg_offset, seg_length FROM {table}"
            ):
                if segment is not None:
                    data = read_range(directory, segment, offset, length)
                out[table, envelope_id] = (seq, data)
    return out


def other_rows(db_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows but the envelopes' places (spool and mailbox without them)."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        tables = [
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        rows = {}
        for table in tables:
            columns = [
                c[1]
                for c in conn.execute(f"PRAGMA table_info({table})")
                if c[1] not in ("data", "segment", "seg_offset", "seg_length", "applied_ms")
            ]
            rows[table] = sorted(
                conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall(), key=repr
            )
    return rows


def sequences(db_path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())


async def fill(db_path: Path) -> None:
    async with open_sqlite_storage(db_path, segment_roll_bytes=ROLL) as store:
        await store.spool_put(
            [spool_item(f"s{n}", data=payload(f"s{n}")) for n in range(12)], at_ms=1
        )
        await store.spool_defer(GLOBEX, ["s3"], at_ms=1, delay_ms=30_000, max_delay_ms=60_000)
        entries = [mail(f"m{n}", data=payload(f"m{n}")) for n in range(9)]
        await store.deliver(GLOBEX, "t1", HASH, accepted(*entries), entries, at_ms=1)
        # Holes in the segments: a backup copies the live ranges only.
        await store.spool_complete(GLOBEX, {"s0": "forwarded", "s5": "forwarded"}, at_ms=2)
        await store.mailbox_ack(BOB, ["m4"])
        await store.token_put("alice", b"\x07" * 32, at_ms=3)


def test_an_idle_store_is_backed_up_byte_for_byte_in_compact_segments(tmp_path: Path) -> None:
    source = tmp_path / "data" / "gateway.sqlite3"
    source.parent.mkdir()
    trio.run(fill, source)
    envelopes = stored(source)
    assert any(len(data) == BIG for _seq, data in envelopes.values())
    assert any(len(data) == SMALL for _seq, data in envelopes.values())
    dest = tmp_path / "backup"

    report = backup_sqlite(source, dest)

    assert report.rows == {"spool": 10, "mailbox": 8}
    assert report.dropped == 0
    assert report.complete
    assert report.database == dest / "gateway.sqlite3"
    assert sorted(os.listdir(dest)) == ["gateway.sqlite3", "gateway.sqlite3.segments"]
    assert sorted(os.listdir(source.parent)) == ["gateway.sqlite3", "gateway.sqlite3.segments"]
    assert stored(report.database) == envelopes
    assert other_rows(report.database) == other_rows(source)
    big = [data for _seq, data in envelopes.values() if len(data) >= 4096]
    assert report.segment_rows == len(big)
    assert report.segment_bytes == sum(map(len, big))
    # Compact: the backup's segments hold the live ranges end to end, nothing else.
    files = segment_files(report.database)
    assert len(files) == report.segment_files
    assert sum(f.stat().st_size for f in files) == report.segment_bytes
    assert_only_referenced_bytes(report.database)
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    assert report.database.stat().st_mode & 0o777 == 0o600
    before = {f.name: f.read_bytes() for f in files}

    async def restored() -> None:
        async with (
            open_sqlite_storage(source) as live,
            open_sqlite_storage(report.database) as copy,
        ):
            for store in (live, copy):
                assert await store.spool_stats() == await live.spool_stats()
                assert await store.mailbox_depth(BOB) == await live.mailbox_depth(BOB)
            taken = await copy.spool_take(GLOBEX, max_items=100, max_bytes=2**30, now_ms=10)
            assert [e.envelope_id for e in taken] == [
                e.envelope_id
                for e in await live.spool_take(GLOBEX, max_items=100, max_bytes=2**30, now_ms=10)
            ]
            assert "s3" not in {e.envelope_id for e in taken}  # its deferral came along
            fetched = await copy.mailbox_fetch(BOB, limit=100)
            assert [(e.seq, e.envelope_id, e.data) for e in fetched] == [
                (e.seq, e.envelope_id, e.data) for e in await live.mailbox_fetch(BOB, limit=100)
            ]
            assert await copy.token_lookup(b"\x07" * 32) == "alice"

    trio.run(restored)
    # The gateway's recovery at open found nothing to zero, cut or unlink.
    assert {f.name: f.read_bytes() for f in segment_files(report.database)} == before


async def test_envelopes_deleted_after_the_snapshot_are_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "gateway.sqlite3"
    dest = tmp_path / "backup"
    real_read = backup_module._LiveSegments.read
    deleted = False
    async with open_sqlite_storage(source, segment_roll_bytes=ROLL) as store:
        await store.spool_put(
            [spool_item(n, data=b"x" * BIG + n.encode()) for n in ("s1", "s2", "s3")], at_ms=1
        )
        await store.mailbox_put_local(
            [mail(n, data=b"y" * BIG + n.encode()) for n in ("m1", "m2")], at_ms=1
        )

        def read(self: Any, name: str, offset: int, length: int) -> bytes | None:
            # After the snapshot, before any byte is read: the gateway forwards s2 and
            # bob acknowledges m1, and their ranges are zeroed.
            nonlocal deleted
            if not deleted:
                deleted = True
                trio.from_thread.run(
                    functools.partial(store.spool_complete, GLOBEX, {"s2": "forwarded"}, at_ms=5)
                )
                trio.from_thread.run(store.mailbox_ack, BOB, ["m1"])
            return real_read(self, name, offset, length)

        monkeypatch.setattr(backup_module._LiveSegments, "read", read)
        report = await trio.to_thread.run_sync(backup_sqlite, source, dest)
        assert deleted
        assert report.dropped == 2
        assert report.rows == {"spool": 2, "mailbox": 1}
        assert report.complete

    async with open_sqlite_storage(report.database) as copy:
        taken = await copy.spool_take(GLOBEX, max_items=10, max_bytes=2**30)
        assert [(e.envelope_id, e.data) for e in taken] == [
            ("s1", b"x" * BIG + b"s1"),
            ("s3", b"x" * BIG + b"s3"),
        ]
        stats = await copy.spool_stats()
        assert (stats[GLOBEX].depth, stats[GLOBEX].bytes) == (2, 2 * (BIG + 2))
        [m2] = await copy.mailbox_fetch(BOB, limit=10)
        assert (m2.envelope_id, m2.data) == ("m2", b"y" * BIG + b"m2")
        depth = await copy.mailbox_depth(BOB)
        assert (depth.envelopes, depth.bytes) == (1, BIG + 2)
        status = await copy.status_get("s2")  # as the live store has it now
        assert status is not None
        assert status.status == "forwarded"


async def test_a_live_row_whose_bytes_are_gone_is_left_out_and_named(tmp_path: Path) -> None:
    source = tmp_path / "gateway.sqlite3"
    async with open_sqlite_storage(source, segment_roll_bytes=BIG + 10) as store:
        await store.mailbox_put_local(
            [mail(n, data=payload(n) + bytes(BIG)) for n in ("m1", "m2", "m3")], at_ms=1
        )
    refs = references(source)
    assert len(refs) == 3  # one envelope per segment
    with contextlib.closing(sqlite3.connect(source)) as conn:
        (lost,) = conn.execute("SELECT segment FROM mailbox WHERE envelope_id = 'm2'").fetchone()
    lost_file = segments_dir(source) / f"{lost}.seg"
    lost_file.unlink()

    report = backup_sqlite(source, tmp_path / "backup")

    assert not report.complete
    assert report.unreadable_count == 1
    [row] = report.unreadable
    assert (row.table, row.envelope_id, row.segment_file) == ("mailbox", "m2", lost_file)
    assert "missing" in row.problem
    assert report.rows == {"spool": 0, "mailbox": 2}
    async with open_sqlite_storage(report.database) as copy:
        assert [e.envelope_id for e in await copy.mailbox_fetch(BOB, limit=10)] == ["m1", "m3"]
        assert (await copy.mailbox_depth(BOB)).envelopes == 2


async def test_bytes_of_another_envelope_are_caught(tmp_path: Path) -> None:
    """The canonical encoding names the envelope's id: a row pointing at another
    envelope's bytes (a bug, a hand edit) is left out and named, never copied."""
    source = tmp_path / "gateway.sqlite3"

    def envelope(envelope_id: str) -> bytes:
        return f'{{"burn_on_read":false,"ciphertext":"{"A" * BIG}","id":"{envelope_id}"}}'.encode()

    async with open_sqlite_storage(source) as store:
        await store.mailbox_put_local(
            [mail(n, data=envelope(n)) for n in ("m1", "m2", "m3")], at_ms=1
        )
    with contextlib.closing(sqlite3.connect(source)) as conn:
        conn.execute(
            "UPDATE mailbox SET seg_offset = (SELECT seg_offset FROM mailbox WHERE "
            "envelope_id = 'm3') WHERE envelope_id = 'm1'"
        )
        conn.commit()
    report = backup_sqlite(source, tmp_path / "backup")
    assert [(r.envelope_id, r.problem) for r in report.unreadable] == [
        ("m1", "the bytes are not this envelope's")
    ]
    assert stored(report.database) == {
        ("mailbox", "m2"): (2, envelope("m2")),
        ("mailbox", "m3"): (3, envelope("m3")),
    }


def test_a_backup_that_fails_half_way_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "gateway.sqlite3"
    trio.run(fill, source)
    appended = 0
    real_append = backup_module._SegmentWriter.append

    def append(self: Any, data: bytes) -> tuple[str, int]:
        nonlocal appended
        appended += 1
        if appended == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, data)

    monkeypatch.setattr(backup_module._SegmentWriter, "append", append)
    made, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for dest in (made, empty):
        appended = 0
        with pytest.raises(StorageError, match="No space left on device; nothing was kept"):
            backup_sqlite(source, dest)
    assert not made.exists()
    assert os.listdir(empty) == []


def test_a_newer_schema_and_a_foreign_database_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "gateway.sqlite3"
    trio.run(fill, source)
    with contextlib.closing(sqlite3.connect(source)) as conn:
        conn.execute(
            "INSERT INTO schema_version VALUES (?, 'from the future', 0)", (LATEST_VERSION + 1,)
        )
        conn.commit()
    with pytest.raises(StorageError, match="newer than this gateway understands"):
        backup_sqlite(source, tmp_path / "b")
    foreign = tmp_path / "other.sqlite3"
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StorageError, match="not a gateway database"):
        backup_sqlite(foreign, tmp_path / "b")
    with pytest.raises(StorageError, match="no such SQLite database"):
        backup_sqlite(tmp_path / "nothing.sqlite3", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "nothing.sqlite3").exists()


# -- while another process puts and deletes ------------------------------------------
_WRITER_SCRIPT = """
import sys
import trio
from gateway.storage import EnvelopeRecord, SpoolItem
from gateway.storage.sqlite import open_sqlite_storage
from tests.integration.test_storage_backup import payload

async def writer(store, lane):
    i = 0
    while True:
        sid, mid = f"s{lane}-{i}", f"m{lane}-{i}"
        await store.spool_put([SpoolItem(
            envelope_id=sid, peer="globex.example", sender="alice@acme.example",
            recipient="bob@globex.example", created_ms=1, expires_ms=10**12,
            burn_on_read=False, data=payload(sid))], at_ms=1)
        await store.mailbox_put_local([EnvelopeRecord(
            envelope_id=mid, sender="alice@acme.example", recipient="bob@acme.example",
            created_ms=1, expires_ms=10**12, burn_on_read=False, data=payload(mid))], at_ms=1)
        print("kept", sid, mid, flush=True)
        if i % 2:
            await store.spool_complete("globex.example", {sid: "forwarded"}, at_ms=2)
            await store.mailbox_ack("bob@acme.example", [mid])
        i += 1

async def main(path):
    async with open_sqlite_storage(path, segment_roll_bytes=200_000) as store:
        async with trio.open_nursery() as nursery:
            for lane in range(4):
                nursery.start_soon(writer, store, lane)

trio.run(main, sys.argv[1])
"""


def test_a_backup_while_another_process_puts_and_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "gateway.sqlite3"
    dest = tmp_path / "backup"
    # Small chunks: the copy and the writer's deletes interleave more.
    monkeypatch.setattr(backup_module, "CHUNK_ROWS", 8)
    monkeypatch.setattr(backup_module, "CHUNK_BYTES", 64 * 1024)
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    ) as proc:
        assert proc.stdout is not None
        for lines, _line in enumerate(proc.stdout, start=1):
            if lines >= 150:
                break
        try:
            report = backup_sqlite(source, dest, roll_bytes=150_000)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert report.complete

    # Every range of the backup holds its own envelope, nothing else is in its files.
    copied = stored(report.database)
    assert copied
    for (_table, envelope_id), (_seq, data) in copied.items():
        assert data == payload(envelope_id), envelope_id
    assert sum(report.rows.values()) == len(copied)
    assert_only_referenced_bytes(report.database)

    async def reopen() -> None:
        async with open_sqlite_storage(source):  # the writer's kill -9 recovered
            pass
        async with open_sqlite_storage(report.database) as copy:
            fetched = await copy.mailbox_fetch(BOB, limit=1_000)
            assert {e.envelope_id: e.data for e in fetched} == {
                envelope_id: data
                for (table, envelope_id), (_s, data) in copied.items()
                if table == "mailbox"
            }

    trio.run(reopen)
    # No row lost: every envelope in the snapshot (seq up to the backup's last) that is
    # still in the live store at the end is in the backup, with the same bytes.
    snapshot = sequences(report.database)
    live = stored(source)
    expected = {key: value for key, value in live.items() if value[0] <= snapshot.get(key[0], 0)}
    assert expected
    assert {key: copied.get(key) for key in expected} == expected


# -- the command ----------------------------------------------------------------------
def config_in(tmp_path: Path, storage: str = "sqlite") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"org: acme.example\nstorage: {storage}\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = gateway_main(["storage", "backup", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_backs_up_and_refuses_bad_destinations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_in(tmp_path)
    source = tmp_path / "data" / "gateway.sqlite3"
    code, _out, err = run(capsys, "-c", config, tmp_path / "b0")
    assert code == 1
    assert "does not exist: the gateway has never run" in err
    assert not (tmp_path / "b0").exists()

    source.parent.mkdir()
    trio.run(fill, source)
    code, out, err = run(capsys, "-c", config, tmp_path / "b1")
    assert (code, err) == (0, "")
    assert out.startswith(f"backed up {source} to {tmp_path / 'b1' / 'gateway.sqlite3'}: ")
    assert "18 envelope row(s)" in out
    assert "0 left out as deleted meanwhile" in out

    code, out, err = run(capsys, "-c", config, "--json", tmp_path / "b2")
    assert code == 0
    summary = json.loads(out)
    assert summary["rows"] == {"spool": 10, "mailbox": 8}
    assert summary["dropped_as_deleted"] == 0
    assert summary["segments"] == str(tmp_path / "b2" / "gateway.sqlite3.segments")

    (tmp_path / "file").write_text("x")
    (tmp_path / "partial" / PARTIAL_DIR).mkdir(parents=True)
    for dest, message in (
        (tmp_path / "b1", "is not empty (gateway.sqlite3, gateway.sqlite3.segments)"),
        (tmp_path / "file", "exists and is not a directory"),
        (tmp_path / "no" / "such", "its parent directory"),
        (tmp_path / "partial", "is a backup that did not finish: remove it"),
        (segments_dir(source) / "inside", "is inside the gateway's segment directory"),
    ):
        code, out, err = run(capsys, "-c", config, dest)
        assert code == 2, (dest, err)
        assert err.startswith("gateway: error: storage backup: "), err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "b1")) == ["gateway.sqlite3", "gateway.sqlite3.segments"]
    assert not (segments_dir(source) / "inside").exists()

    source.with_name("gateway.sqlite3-wal").unlink(missing_ok=True)
    source.write_bytes(b"not a database, just bytes " * 100)
    code, _out, err = run(capsys, "-c", config, tmp_path / "b3")
    assert code == 1
    assert "not a gateway database" in err
    assert not (tmp_path / "b3").exists()


def test_a_postgresql_gateway_is_pointed_to_pg_dump(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_in(tmp_path, "postgresql://gateway@127.0.0.1:5432/gateway")
    code, _out, err = run(capsys, "-c", config, tmp_path / "b")
    assert code == 2
    assert "uses PostgreSQL: back it up with pg_dump -Fc" in err
    assert not (tmp_path / "b").exists()


def test_a_backup_with_rows_left_out_exits_non_zero_and_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_in(tmp_path)
    source = tmp_path / "data" / "gateway.sqlite3"
    source.parent.mkdir()
    trio.run(fill, source)
    [first, *_rest] = segment_files(source)
    first.unlink()
    code, out, err = run(capsys, "-c", config, tmp_path / "b")
    assert code == 1
    assert out.startswith("backed up ")
    assert f"left out: the segment file is missing or shorter than the range ({first})" in err
    assert "because their bytes are missing from the live segment files too" in err
    assert (tmp_path / "b" / "gateway.sqlite3").is_file()
