"""Large envelopes' bytes in segment files (gateway.storage.sqlite.segments).

Appends and reads, zeroing on every delete path, unlinking of emptied
segments, the bytes of rolled-back ops, recovery at open (a torn tail, a
delete whose zeroing never ran, an unreferenced segment), restart, a second
process on the same files, and a SIGKILL in the middle of it all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gateway.errors import StorageError
from gateway.storage.sqlite import open_sqlite_storage
from gateway.storage.sqlite.schema import migrate
from gateway.storage.sqlite.segments import (
    ENVELOPE_TABLES,
    NAMED_SQL,
    REFERENCED_SQL,
    SEGMENT_SUFFIX,
    SEGMENT_THRESHOLD_BYTES,
    _coalesce,
)
from tests.integration.test_storage_sqlite import (
    BOB,
    FAR,
    GLOBEX,
    HASH,
    accepted,
    mail,
    spool_item,
)

BIG = 20_000  # past SEGMENT_THRESHOLD_BYTES
ROLL = 50_000  # two BIG envelopes per segment, the third starts the next one


def canary(name: str, size: int = BIG) -> bytes:
    marker = f"CANARY-{name}-".encode()
    return (marker * (size // len(marker) + 1))[:size]


def segment_dir(db_path: Path) -> Path:
    return Path(str(db_path) + ".segments")


def segment_files(db_path: Path) -> list[Path]:
    return sorted(p for p in segment_dir(db_path).iterdir() if p.name.endswith(SEGMENT_SUFFIX))


def segment_bytes(db_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in segment_files(db_path))


def references(db_path: Path) -> dict[str, list[tuple[int, int]]]:
    refs: dict[str, list[tuple[int, int]]] = {}
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        for table in ("spool", "mailbox"):
            for name, offset, length in conn.execute(
                f"SELECT segment, seg_offset, seg_length FROM {table} WHERE segment IS NOT NULL"
            ):
                refs.setdefault(name, []).append((offset, length))
    return refs


def assert_only_referenced_bytes(db_path: Path) -> None:
    """Every segment file is referenced, ends at its last range, and is zero between ranges."""
    refs = references(db_path)
    files = {p.name[: -len(SEGMENT_SUFFIX)]: p for p in segment_files(db_path)}
    assert set(files) <= set(refs), f"unreferenced segments: {set(files) - set(refs)}"
    assert set(refs) <= set(files), f"rows name missing segments: {set(refs) - set(files)}"
    for name, ranges in refs.items():
        content = files[name].read_bytes()
        position = 0
        for offset, length in sorted(ranges):
            assert content[position:offset].count(0) == offset - position
            position = offset + length
        assert len(content) >= position
        assert content[position:].count(0) == len(content) - position


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


async def test_large_envelopes_go_to_segments_small_ones_stay_in_rows(db_path: Path) -> None:
    big, small = canary("big"), canary("small", 500)
    assert len(small) < SEGMENT_THRESHOLD_BYTES <= len(big)
    async with open_sqlite_storage(db_path) as store:
        await store.spool_put(
            [spool_item("s-big", data=big), spool_item("s-small", data=small)], at_ms=1
        )
        entries = [mail("m-big", data=big), mail("m-small", data=small)]
        await store.deliver(GLOBEX, "t", HASH, accepted(*entries), entries, at_ms=1)
        taken = await store.spool_take(GLOBEX, max_items=10, max_bytes=2**30)
        assert [(e.envelope_id, e.data) for e in taken] == [("s-big", big), ("s-small", small)]
        fetched = await store.mailbox_fetch(BOB, limit=10)
        assert [(e.envelope_id, e.data) for e in fetched] == [("m-big", big), ("m-small", small)]
        assert (await store.mailbox_depth(BOB)).bytes == len(big) + len(small)
        # The byte bound of a take counts a segment envelope's length.
        assert len(await store.spool_take(GLOBEX, max_items=10, max_bytes=len(big))) == 1
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            rows = conn.execute(
                "SELECT envelope_id, length(data), segment IS NOT NULL FROM mailbox ORDER BY seq"
            ).fetchall()
        assert rows == [("m-big", 0, 1), ("m-small", len(small), 0)]
        assert big[:64] in segment_bytes(db_path)
        assert small[:64] not in segment_bytes(db_path)
        assert store.segment_stats() == (1, 2, 2 * len(big))
        await store.spool_complete(GLOBEX, {"s-big": "forwarded"}, at_ms=2)
        assert store.segment_stats() == (1, 1, len(big))
    assert_only_referenced_bytes(db_path)


async def test_every_delete_zeroes_its_range_at_once_and_empty_segments_go(
    db_path: Path,
) -> None:
    async with open_sqlite_storage(db_path, segment_roll_bytes=ROLL) as store:
        # Segments: [a, b], [c, done], [expired, purged] (the current one).
        names = ["a", "b", "c"]
        entries = [mail(n, data=canary(n), burn_on_read=n == "a") for n in names]
        await store.deliver(GLOBEX, "t", HASH, accepted(*entries), entries, at_ms=1)
        await store.spool_put(
            [
                spool_item("done", data=canary("done")),
                spool_item("expired", data=canary("expired"), expires_ms=100),
                spool_item("purged", data=canary("purged"), peer="initech.example"),
            ],
            at_ms=1,
        )
        assert len(segment_files(db_path)) == 3
        everything = segment_bytes(db_path)
        for name in (*names, "done", "expired", "purged"):
            assert canary(name)[:64] in everything

        # Acknowledged (a burn-on-read one among them): zero at once, no scrub needed.
        assert await store.mailbox_ack(BOB, ["a"]) == 1
        assert canary("a")[:64] not in segment_bytes(db_path)
        assert canary("b")[:64] in segment_bytes(db_path)
        assert len(segment_files(db_path)) == 3  # b still lives in the first segment
        assert await store.mailbox_ack(BOB, ["b"]) == 1
        assert len(segment_files(db_path)) == 2  # the first segment emptied: unlinked

        assert await store.spool_complete(GLOBEX, {"done": "forwarded"}, at_ms=2) == 1
        assert len(await store.spool_expire(100)) == 1
        assert await store.spool_purge(peer="initech.example", at_ms=3) == 1
        c = await store.mailbox_fetch(BOB, limit=5)
        assert [e.data for e in c] == [canary("c")]
        assert [e.envelope_id for e in await store.mailbox_expire(FAR + 1)] == ["c"]
        assert await store.scrub()

        left = segment_bytes(db_path)
        for name in (*names, "done", "expired", "purged"):
            assert canary(name)[:24] not in left, name
        # Only the current segment is left (it will be appended to), all zeros.
        assert len(segment_files(db_path)) == 1
        assert left.count(0) == len(left)
    # Closed: nothing references the current one any more, so it goes too.
    assert segment_files(db_path) == []


async def test_the_bytes_of_a_rolled_back_op_are_zeroed(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:

        def failing(name: str) -> object:
            def op(conn: sqlite3.Connection) -> None:
                segment, offset, length = store.segments.append(canary(name))
                conn.execute(
                    "INSERT INTO mailbox (envelope_id, recipient, sender, created_ms, "
                    "expires_ms, stored_ms, size, burn_on_read, data, segment, seg_offset, "
                    "seg_length) VALUES (?, ?, ?, 1, ?, 1, ?, 0, x'', ?, ?, ?)",
                    (name, BOB, "dave@globex.example", FAR, length, segment, offset, length),
                )
                raise ValueError("this op fails after its append and its insert")

            return op

        # Alone in its batch, then among others (the batch is replayed with savepoints).
        with pytest.raises(ValueError, match="fails after"):
            await store.engine.write(failing("alone"))  # type: ignore[arg-type]

        async def good(n: int) -> None:
            await store.spool_put([spool_item(f"ok{n}", data=canary(f"ok{n}"))], at_ms=1)

        async def bad() -> None:
            with pytest.raises(ValueError, match="fails after"):
                await store.engine.write(failing("among"))  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(good, 1)
            nursery.start_soon(bad)
            nursery.start_soon(good, 2)
        taken = await store.spool_take(GLOBEX, max_items=10, max_bytes=2**30)
        assert sorted(e.data for e in taken) == [canary("ok1"), canary("ok2")]
        assert await store.mailbox_fetch(BOB, limit=10) == []
        content = segment_bytes(db_path)
        assert canary("alone")[:24] not in content
        assert canary("among")[:24] not in content
        assert canary("ok1")[:64] in content
    assert_only_referenced_bytes(db_path)


async def test_open_recovers_a_torn_tail_a_lost_zeroing_and_a_stray_segment(
    db_path: Path,
) -> None:
    async with open_sqlite_storage(db_path, segment_roll_bytes=ROLL) as store:
        entries = [mail(n, data=canary(n)) for n in ("kept", "deleted")]
        await store.deliver(GLOBEX, "t", HASH, accepted(*entries), entries, at_ms=1)
    [segment] = segment_files(db_path)
    # A crash after a commit that deleted a row, before its range was zeroed:
    # here, a delete by a connection that zeroes nothing.
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("DELETE FROM mailbox WHERE envelope_id = 'deleted'")
        conn.commit()
    # A crash after an append whose batch never committed: a torn tail.
    with segment.open("ab") as tail:
        tail.write(canary("torn", 5_000))
    # A segment whose batch never committed at all.
    stray = segment_dir(db_path) / ("00" * 8 + SEGMENT_SUFFIX)
    stray.write_bytes(canary("stray"))
    size_before = segment.stat().st_size

    async with open_sqlite_storage(db_path) as store:
        content = segment_bytes(db_path)
        for gone in ("deleted", "torn", "stray"):
            assert canary(gone)[:24] not in content, gone
        assert not stray.exists()
        assert segment.stat().st_size < size_before
        [kept] = await store.mailbox_fetch(BOB, limit=5)
        assert kept.data == canary("kept")
    assert_only_referenced_bytes(db_path)


async def test_restart_reads_old_segments_and_appends_to_a_new_one(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:
        await store.spool_put([spool_item("s1", data=canary("s1"))], at_ms=1)
        await store.mailbox_put_local([mail("m1", data=canary("m1"))], at_ms=1)
    [old] = segment_files(db_path)
    async with open_sqlite_storage(db_path) as store:
        await store.spool_put([spool_item("s2", data=canary("s2"))], at_ms=1)
        assert len(segment_files(db_path)) == 2  # never appends to a segment it did not create
        taken = await store.spool_take(GLOBEX, max_items=5, max_bytes=2**30)
        assert [e.data for e in taken] == [canary("s1"), canary("s2")]
        [m1] = await store.mailbox_fetch(BOB, limit=5)
        assert m1.data == canary("m1")
        await store.spool_complete(GLOBEX, {"s1": "forwarded"}, at_ms=2)
        assert old.exists()  # m1 still lives there
        await store.mailbox_ack(BOB, ["m1"])
        assert not old.exists()
    assert_only_referenced_bytes(db_path)


async def test_rows_written_inline_before_still_read(db_path: Path) -> None:
    async with open_sqlite_storage(db_path, segment_threshold=10**9) as store:
        await store.mailbox_put_local([mail("old", data=canary("old"))], at_ms=1)
    async with open_sqlite_storage(db_path) as store:
        await store.mailbox_put_local([mail("new", data=canary("new"))], at_ms=1)
        fetched = await store.mailbox_fetch(BOB, limit=5)
        assert [e.data for e in fetched] == [canary("old"), canary("new")]
        assert await store.mailbox_ack(BOB, ["old", "new"]) == 2


async def test_a_read_drops_an_envelope_deleted_after_its_snapshot(
    store_path: Path,
) -> None:
    async with open_sqlite_storage(store_path) as store:
        await store.mailbox_put_local([mail(n, data=canary(n)) for n in ("x", "y")], at_ms=1)
        epoch = store.segments.epoch
        reader = sqlite3.connect(store_path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            rows = reader.execute(
                "SELECT seq, envelope_id, data, segment, seg_offset, seg_length FROM mailbox "
                "ORDER BY seq"
            ).fetchall()
            # x is acknowledged (and zeroed) while the reader's snapshot still shows it.
            assert await store.mailbox_ack(BOB, ["x"]) == 1
            resolved = store.segments.resolve(reader, "mailbox", rows, epoch)
        finally:
            reader.close()
        assert [(r[1], r[2]) for r in resolved] == [("y", canary("y"))]


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


async def test_a_second_process_on_the_same_files_keeps_out_of_the_first_ones_segment(
    db_path: Path,
) -> None:
    async with open_sqlite_storage(db_path) as first:
        await first.mailbox_put_local([mail("m1", data=canary("m1"))], at_ms=1)
        [current] = segment_files(db_path)
        # An admin command opens the file while the gateway runs: its recovery
        # must not cut or unlink the gateway's current segment.
        async with open_sqlite_storage(db_path, readers=1) as second:
            assert current.exists()
            [m1] = await second.mailbox_fetch(BOB, limit=5)
            assert m1.data == canary("m1")
            await second.spool_put([spool_item("s1", data=canary("s1"))], at_ms=1)
            assert len(segment_files(db_path)) == 2
            assert await second.mailbox_ack(BOB, ["m1"]) == 1
            assert current.exists()  # the first one may still append to it
        await first.mailbox_put_local([mail("m2", data=canary("m2"))], at_ms=1)
        [m2] = await first.mailbox_fetch(BOB, limit=5)
        assert m2.data == canary("m2")
        [s1] = await first.spool_take(GLOBEX, max_items=5, max_bytes=2**30)
        assert s1.data == canary("s1")
        assert canary("m1")[:24] not in segment_bytes(db_path)
    assert_only_referenced_bytes(db_path)


# -- SIGKILL while writing, completing and acknowledging large envelopes -------------
_WRITER_SCRIPT = """
import hashlib, sys
import trio
from gateway.storage import EnvelopeRecord, SpoolItem
from gateway.storage.sqlite import open_sqlite_storage

def data(envelope_id):
    seed = hashlib.sha256(envelope_id.encode()).digest()
    return seed * (20_000 // len(seed))

async def writer(store, lane):
    i = 0
    while True:
        sid, mid = f"s{lane}-{i}", f"m{lane}-{i}"
        await store.spool_put([SpoolItem(
            envelope_id=sid, peer="globex.example", sender="alice@acme.example",
            recipient="bob@globex.example", created_ms=1, expires_ms=10**12,
            burn_on_read=False, data=data(sid))], at_ms=1)
        await store.mailbox_put_local([EnvelopeRecord(
            envelope_id=mid, sender="alice@acme.example", recipient="bob@acme.example",
            created_ms=1, expires_ms=10**12, burn_on_read=False, data=data(mid))], at_ms=1)
        print("kept", sid, mid, flush=True)
        if i % 2:
            await store.spool_complete("globex.example", {sid: "forwarded"}, at_ms=2)
            await store.mailbox_ack("bob@acme.example", [mid])
            print("gone", sid, mid, flush=True)
        i += 1

async def main(path):
    async with open_sqlite_storage(path, segment_roll_bytes=400_000) as store:
        async with trio.open_nursery() as nursery:
            for lane in range(4):
                nursery.start_soon(writer, store, lane)

trio.run(main, sys.argv[1])
"""


def _data(envelope_id: str) -> bytes:
    seed = hashlib.sha256(envelope_id.encode()).digest()
    return seed * (20_000 // len(seed))


def test_sigkill_loses_nothing_and_leaves_nothing_unreferenced(db_path: Path) -> None:
    kept: set[str] = set()
    gone: set[str] = set()
    lines = 0
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            what, *ids = line.split()
            (kept if what == "kept" else gone).update(ids)
            lines += 1
            if lines >= 200:
                os.kill(proc.pid, signal.SIGKILL)
                break
        for line in proc.stdout:
            what, *ids = line.split()
            (kept if what == "kept" else gone).update(ids)
        proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert gone

    async def check() -> None:
        async with open_sqlite_storage(db_path) as store:
            spooled = {
                e.envelope_id: e.data
                for e in await store.spool_take(GLOBEX, max_items=10_000, max_bytes=2**40)
            }
            mailed = {e.envelope_id: e.data for e in await store.mailbox_fetch(BOB, limit=1_000)}
            held = spooled | mailed
            for envelope_id in kept - gone:
                assert held.get(envelope_id) == _data(envelope_id), envelope_id
            assert not (set(held) & gone)
            for envelope_id, data in held.items():
                assert data == _data(envelope_id)
            content = segment_bytes(db_path)
            for envelope_id in gone:
                assert _data(envelope_id)[:64] not in content, envelope_id

    trio.run(check)
    assert_only_referenced_bytes(db_path)


async def test_deleted_ranges_give_their_disk_space_back(db_path: Path) -> None:
    async with open_sqlite_storage(db_path) as store:
        entries = [mail(f"m{n}", data=os.urandom(200_000)) for n in range(10)]
        await store.mailbox_put_local(entries, at_ms=1)
        [segment] = segment_files(db_path)
        before = segment.stat().st_blocks * 512
        assert before >= 2_000_000
        assert await store.mailbox_ack(BOB, [f"m{n}" for n in range(9)]) == 9
        # Past PUNCH_AFTER_BYTES of zeros: punched at once, no scrub needed.
        after = segment.stat().st_blocks * 512
        assert after < 400_000, (before, after)
        assert segment.stat().st_size >= 2_000_000  # the file keeps its length: offsets hold
        [last] = await store.mailbox_fetch(BOB, limit=5)
        assert last.data == entries[-1].data


def test_which_rows_name_a_segment_is_read_from_an_index_not_every_row(db_path: Path) -> None:
    # Asked at every open under the write lock, and whenever a segment may
    # have emptied: a walk of a million spooled small envelopes held up the
    # live gateway's commits (and `gateway peers`) for over a second.
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        migrate(conn, path=str(db_path))
        for table in ENVELOPE_TABLES:
            for sql, args in ((REFERENCED_SQL, ()), (NAMED_SQL, ("s-1",))):
                plan = conn.execute("EXPLAIN QUERY PLAN " + sql.format(table=table), args)
                details = [row[3] for row in plan]
                assert details == [
                    f"SEARCH {table} USING COVERING INDEX {table}_segment "
                    + ("(segment>?)" if sql is REFERENCED_SQL else "(segment=?)")
                ]


def test_adjacent_and_overlapping_ranges_are_zeroed_in_one_write() -> None:
    ranges = [("b", 0, 10), ("a", 30, 5), ("a", 10, 10), ("a", 20, 10), ("a", 50, 1)]
    assert _coalesce(ranges) == [("a", 10, 25), ("a", 50, 1), ("b", 0, 10)]


async def test_a_segment_directory_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    db = tmp_path / "gateway.sqlite3"
    segment_dir(db).write_bytes(b"not a directory")
    with pytest.raises(StorageError, match="segment files"):
        async with open_sqlite_storage(db):
            pass


async def test_fetches_racing_acks_never_see_zeroed_bytes(db_path: Path) -> None:
    """Reader threads and the trio thread read while the writer zeroes and unlinks."""
    count = 400
    payload = {f"m{n}": os.urandom(9_000) + n.to_bytes(4, "big") for n in range(count)}
    async with open_sqlite_storage(db_path, segment_roll_bytes=200_000) as store:
        entries = [mail(i, data=d) for i, d in payload.items()]
        for start in range(0, count, 100):
            await store.mailbox_put_local(entries[start : start + 100], at_ms=1)
        acked = 0
        checked = 0

        async def ack() -> None:
            nonlocal acked
            for start in range(0, count, 10):
                await store.mailbox_ack(BOB, [f"m{n}" for n in range(start, start + 10)])
                acked = start + 10

        async def fetch() -> None:
            nonlocal checked
            while acked < count:
                for entry in await store.mailbox_fetch(BOB, limit=50):
                    assert entry.data == payload[entry.envelope_id]
                    checked += 1
                for entry in await store.mailbox_fetch(BOB, limit=2):  # the trio thread's read
                    assert entry.data == payload[entry.envelope_id]
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            nursery.start_soon(fetch)
            nursery.start_soon(ack)
        assert await store.mailbox_fetch(BOB, limit=5) == []
        assert checked > 0
    assert_only_referenced_bytes(db_path)
    assert segment_files(db_path) == []


async def test_an_envelope_whose_segment_file_is_gone_is_named_logged_once_and_counted(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment file deleted by hand: reads of its mailbox fail loudly, naming the
    envelope and the file, once in the log; the gauge's count goes when the row does."""
    async with open_sqlite_storage(db_path, segment_roll_bytes=BIG + 10) as store:
        await store.mailbox_put_local([mail(n, data=canary(n)) for n in ("m1", "m2")], at_ms=1)
        await store.spool_put([spool_item("s1", data=canary("s1"))], at_ms=1)
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            (name,) = conn.execute(
                "SELECT segment FROM mailbox WHERE envelope_id = 'm1'"
            ).fetchone()
        lost = segment_dir(db_path) / f"{name}{SEGMENT_SUFFIX}"
        lost.unlink()
        assert store.segment_missing() == 0
        for _ in range(3):
            with pytest.raises(StorageError) as caught:
                await store.mailbox_fetch(BOB, limit=5)
            assert (
                f"the bytes of 1 mailbox envelope(s) are missing: m1 (row 1) in {lost}"
                in caught.value.message
            )
        logged = [r.getMessage() for r in caplog.records if "are missing" in r.getMessage()]
        assert logged == [
            f"segment file {lost}: the bytes of mailbox envelope m1 (row 1, {BIG} bytes at 0) "
            "are missing; its mailbox cannot be read past it until it expires or is removed"
        ]
        assert store.segment_missing() == 1
        # The lane is not touched by the mailbox's loss.
        [s1] = await store.spool_take(GLOBEX, max_items=5, max_bytes=2**30)
        assert s1.data == canary("s1")
        # Once the row goes (acknowledged here; expiry or a purge alike), so does the count.
        assert await store.mailbox_ack(BOB, ["m1"]) == 1
        assert store.segment_missing() == 0
        [m2] = await store.mailbox_fetch(BOB, limit=5)
        assert m2.data == canary("m2")


async def test_a_segment_file_that_cannot_be_read_is_a_storage_error(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a missing file (permissions, an I/O error): a StorageError, not an OSError
    that would end the task reading."""
    from gateway.storage.sqlite import segments as segments_module

    def unreadable(directory: Path, segment: str) -> int:
        raise PermissionError(13, "Permission denied", str(directory / segment))

    async with open_sqlite_storage(db_path) as store:
        await store.mailbox_put_local([mail("m1", data=canary("m1"))], at_ms=1)
        monkeypatch.setattr(segments_module, "_open_for_read", unreadable)
        with pytest.raises(StorageError, match="Permission denied"):
            await store.mailbox_fetch(BOB, limit=5)
