"""``gateway storage backup``: a consistent copy of a running SQLite gateway, segments included.

Theory of operation
-------------------
The database and its segment files (:mod:`gateway.storage.sqlite.segments`)
cannot be copied as files while the gateway runs: SQLite's online backup
copies rows, and a large envelope's row only says where its bytes are; those
bytes are zeroed as soon as a delete of the row commits. The backup takes
three steps, none of which stops the gateway's writer:

1. **The rows.** SQLite's online backup (``sqlite3.Connection.backup``, all
   pages in one step) copies the database inside one read transaction: a
   consistent snapshot. In WAL mode a reader never blocks the writer.
2. **The bytes.** For every row of the copy that names a segment range, the
   range is read from the live segment file and appended to a new segment file
   of the backup; the copy's row is pointed at its new place (the backup is
   compact: it holds only live ranges). Chunk by chunk, *after* a chunk's bytes
   were read, the live database is asked which of its rows still exist with
   the same reference. Bytes are zeroed only after the delete of their row
   commits, and a range is never reused, so a row still there after its bytes
   were read had them intact. A row gone meanwhile may have been read as
   zeros: it is left out of the backup (deleted in truth after the snapshot:
   the backup is newer for it), its delivery status taken from the live
   database, and the lane and mailbox counters are recounted from the rows.
   Bytes read are also checked against the row (length, and the envelope id
   inside a JSON envelope); a row that is still live but whose bytes are
   missing or wrong is left out and reported (the live gateway cannot read it
   either).
3. **Done means done.** Everything is built in ``DEST/.partial/``; segment
   files and the database are fsynced, then the directories; the segments
   directory and then the database are renamed into ``DEST``, and ``DEST`` is
   synced. The database file appears last, so a ``DEST`` that holds it holds
   a whole backup; an interrupted run removes ``.partial`` (a crash leaves it,
   and the next backup into that directory refuses until it is removed).

The backup's database is in rollback-journal mode (one file, no ``-wal``); a
gateway started on it switches it to WAL, and its recovery at open finds
every range referenced and nothing else in the segment files.

Cost to the running gateway: one read transaction for step 1, as long as
copying the database's pages takes (the envelopes' bytes are not in it), and
short point reads afterwards. A WAL checkpoint that must wait for readers (the
sweeper's scrub, ``TRUNCATE``) waits for step 1, as for any reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.errors import StorageError
from gateway.storage.sqlite.engine import BUSY_TIMEOUT_MS
from gateway.storage.sqlite.schema import LATEST_VERSION, current_version
from gateway.storage.sqlite.segments import (
    DIR_MODE,
    ENVELOPE_TABLES,
    FILE_MODE,
    SEGMENT_ROLL_BYTES,
    SEGMENT_SUFFIX,
    _pwrite_all,
    _sync_dir,
    segments_dir,
)

PARTIAL_DIR: Final = ".partial"  # where a backup is built inside DEST until it is whole
CHUNK_ROWS: Final = 256  # segment rows read from the copy at a time
CHUNK_BYTES: Final = 16 * 1024 * 1024  # bytes held before their rows are checked against live
MAX_REPORTED: Final = 20  # unreadable rows named one by one in the report, at most

_AMONG: Final = "IN (SELECT value FROM json_each(?))"

Row = tuple[Any, ...]  # seq, envelope_id, size, segment, seg_offset, seg_length


@dataclass(frozen=True, kw_only=True)
class Unreadable:
    """A row still in the live database whose bytes could not be copied."""

    table: str
    seq: int
    envelope_id: str
    segment_file: Path
    problem: str


@dataclass(frozen=True, kw_only=True)
class BackupReport:
    source: Path
    destination: Path  # the directory
    database: Path  # the backup's database file in it
    rows: dict[str, int]  # envelope rows in the backup, per table
    segment_rows: int  # of them, with their bytes in the backup's segment files
    segment_bytes: int
    segment_files: int
    dropped: int  # segment rows deleted in the live database after the snapshot: left out
    unreadable: tuple[Unreadable, ...]  # the first MAX_REPORTED of them
    unreadable_count: int
    snapshot_seconds: float  # the read transaction of step 1
    seconds: float

    @property
    def complete(self) -> bool:
        """Every row live at the end made it into the backup."""
        return self.unreadable_count == 0


@dataclass
class _Tally:
    segment_rows: int = 0
    dropped: int = 0
    unreadable: list[Unreadable] = field(default_factory=list)
    unreadable_count: int = 0
    recount: set[str] = field(default_factory=set)  # tables that lost rows


class _SegmentWriter:
    """The backup's segment files: appended in order, each fsynced when full or at the end."""

    def __init__(self, directory: Path, roll_bytes: int) -> None:
        directory.mkdir(mode=DIR_MODE)
        self.directory = directory
        self.roll_bytes = roll_bytes
        self.files = 0
        self.bytes = 0
        self._fd: int | None = None
        self._name = ""
        self._size = 0

    def append(self, data: bytes) -> tuple[str, int]:
        if self._fd is not None and self._size > 0 and self._size + len(data) > self.roll_bytes:
            self._finish()
        if self._fd is None:
            self._name = secrets.token_hex(8)
            path = self.directory / (self._name + SEGMENT_SUFFIX)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            self._size = 0
            self.files += 1
        offset = self._size
        _pwrite_all(self._fd, data, offset)
        self._size += len(data)
        self.bytes += len(data)
        return self._name, offset

    def _finish(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Every file and the directory on the disk."""
        self._finish()
        _sync_dir(self.directory)

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class _LiveSegments:
    """Reads ranges of the live segment files, one file open at a time (rows come in
    ``seq`` order, which is mostly append order)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._name: str | None = None
        self._fd: int | None = None

    def read(self, name: str, offset: int, length: int) -> bytes | None:
        """The range, or None when the file is gone or too short (deleted meanwhile)."""
        if name != self._name:
            self.close()
            self._name = name
            path = self.path(name)
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._fd = None
            except OSError as exc:
                raise StorageError(
                    f"cannot read segment file {path}: {exc.strerror or exc}"
                ) from exc
        if self._fd is None:
            return None
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise StorageError(
                f"cannot read segment file {self.path(name)}: {exc.strerror or exc}"
            ) from exc
        return data if len(data) == length else None

    def path(self, name: str) -> Path:
        return self.directory / (name + SEGMENT_SUFFIX)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._name = None


def _problem(data: bytes | None, envelope_id: str, size: int, length: int) -> str | None:
    """Why ``data`` cannot be the row's envelope, or None when it may be."""
    if data is None:
        return "the segment file is missing or shorter than the range"
    if len(data) != length or size != length:
        return f"{len(data)} byte(s) for a row of {size}"
    if length and data.count(0) == length:
        return "the range holds only zeros"  # a zeroed range: its row was deleted
    # An envelope as this gateway stores it is in the canonical encoding (received
    # ones too: the receiver checks or re-encodes), compact JSON that names its id
    # as '"id":"..."' (gateway.core.envelope); bytes of another envelope would not.
    if data[:2] == b'{"' and f'"id":"{envelope_id}"'.encode() not in data:
        return "the bytes are not this envelope's"
    return None


def prepare_destination(destination: Path, source: Path) -> bool:
    """Check ``destination`` (a new or empty directory, not inside the live files) and
    create it if needed; True if it was created. Raises ``ValueError``."""
    live_segments = segments_dir(source).resolve()
    resolved = destination.resolve()
    if resolved == live_segments or live_segments in resolved.parents:
        raise ValueError(f"{destination} is inside the gateway's segment directory {live_segments}")
    if destination.exists():
        if not destination.is_dir():
            raise ValueError(f"{destination} exists and is not a directory")
        try:
            entries = sorted(entry.name for entry in destination.iterdir())
        except OSError as exc:
            raise ValueError(f"cannot read {destination}: {exc.strerror or exc}") from None
        if entries:
            hint = (
                f" ({PARTIAL_DIR} is a backup that did not finish: remove it)"
                if PARTIAL_DIR in entries
                else ""
            )
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(
                f"{destination} is not empty ({shown}){hint}: a backup goes into a new "
                "or empty directory"
            )
        if not os.access(destination, os.W_OK | os.X_OK):
            raise ValueError(f"{destination} is not writable")
        return False
    if not destination.parent.is_dir():
        raise ValueError(f"{destination}: its parent directory {destination.parent} does not exist")
    try:
        destination.mkdir(mode=DIR_MODE)
    except OSError as exc:
        raise ValueError(f"cannot create {destination}: {exc.strerror or exc}") from None
    return True


def _open_live(source: Path) -> sqlite3.Connection:
    if not source.is_file():
        raise StorageError(f"{source}: no such SQLite database")
    try:
        # mode=rw: never creates a database; query_only: never writes to it.
        conn = sqlite3.connect(
            source.resolve().as_uri() + "?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
    except sqlite3.Error as exc:
        raise StorageError(f"{source}: cannot open: {exc}") from exc
    try:
        conn.execute("PRAGMA query_only = ON")
        version = current_version(conn) if _has_table(conn, "spool") else 0
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"{source}: not a gateway database: {exc}") from exc
    problem = None
    if version == 0:
        problem = f"{source}: not a gateway database (no spool, no schema_version)"
    elif version > LATEST_VERSION:
        problem = (
            f"{source}: database schema version {version} is newer than this gateway "
            f"understands (up to {LATEST_VERSION}); back it up with the newer gateway"
        )
    if problem is not None:
        conn.close()
        raise StorageError(problem)
    return conn


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def _has_segment_columns(conn: sqlite3.Connection, table: str) -> bool:
    return any(row[1] == "segment" for row in conn.execute(f"PRAGMA table_info({table})"))


def backup_sqlite(
    source: Path,
    destination: Path,
    *,
    roll_bytes: int = SEGMENT_ROLL_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> BackupReport:
    """Back up the SQLite database at ``source`` (the gateway may be running) into
    the new or empty directory ``destination``: ``destination/<source name>`` and its
    ``.segments`` directory. Raises ``ValueError`` for a bad ``destination`` and
    :class:`StorageError` for a source that cannot be backed up; either way
    nothing is left in ``destination``.
    """
    started = clock()
    source = Path(source)
    destination = Path(destination)
    live = _open_live(source)
    try:
        created = prepare_destination(destination, source)
        work = destination / PARTIAL_DIR
        final = destination / source.name
        try:
            work.mkdir(mode=DIR_MODE)
            database = work / source.name
            tally, rows, snapshot_seconds, writer = _copy(live, source, database, roll_bytes, clock)
            _sync_dir(work)
            os.rename(segments_dir(database), segments_dir(final))
            _sync_dir(destination)
            os.rename(database, final)  # last: a database in DEST means a whole backup
            _sync_dir(destination)
            work.rmdir()
            _sync_dir(destination)
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    destination.rmdir()
            if isinstance(exc, OSError):  # writing the backup: a full disk, a permission
                where = f" ({exc.filename})" if exc.filename else ""
                raise StorageError(
                    f"backup into {destination}: {exc.strerror or exc}{where}; nothing was kept"
                ) from exc
            raise
    finally:
        live.close()
    return BackupReport(
        source=source,
        destination=destination,
        database=final,
        rows=rows,
        segment_rows=tally.segment_rows,
        segment_bytes=writer.bytes,
        segment_files=writer.files,
        dropped=tally.dropped,
        unreadable=tuple(tally.unreadable),
        unreadable_count=tally.unreadable_count,
        snapshot_seconds=snapshot_seconds,
        seconds=clock() - started,
    )


def _copy(
    live: sqlite3.Connection,
    source: Path,
    database: Path,
    roll_bytes: int,
    clock: Callable[[], float],
) -> tuple[_Tally, dict[str, int], float, _SegmentWriter]:
    """Steps 1 and 2 into ``database`` (a new file) and its segments directory."""
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    writer = _SegmentWriter(segments_dir(database), roll_bytes)
    reader = _LiveSegments(segments_dir(source))
    tally = _Tally()
    copy = sqlite3.connect(database, isolation_level=None)
    try:
        began = clock()
        try:
            live.backup(copy)  # one step: one read transaction, one snapshot
        except sqlite3.Error as exc:
            raise StorageError(f"{source}: the online backup failed: {exc}") from exc
        snapshot_seconds = clock() - began
        copy.execute("PRAGMA journal_mode = DELETE")  # one file, no -wal beside it
        copy.execute("PRAGMA synchronous = FULL")
        copy.execute("PRAGMA secure_delete = ON")  # rows left out leave nothing in free pages
        copy.execute("BEGIN IMMEDIATE")
        for table in ENVELOPE_TABLES:
            if _has_segment_columns(copy, table):
                _copy_table(live, copy, table, reader, writer, tally)
        for table in sorted(tally.recount):
            _recount(copy, table)
        copy.execute("COMMIT")
        writer.close()
        (check,) = copy.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise StorageError(f"{database}: the copy does not check: {check}")
        rows = {
            table: int(copy.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608
            for table in ENVELOPE_TABLES
        }
    except sqlite3.Error as exc:
        raise StorageError(f"backup {database}: {exc}") from exc
    finally:
        writer.abort()
        reader.close()
        copy.close()
    fd = os.open(database, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return tally, rows, snapshot_seconds, writer


def _copy_table(
    live: sqlite3.Connection,
    copy: sqlite3.Connection,
    table: str,
    reader: _LiveSegments,
    writer: _SegmentWriter,
    tally: _Tally,
) -> None:
    select = (
        f"SELECT seq, envelope_id, size, segment, seg_offset, seg_length FROM {table} "  # noqa: S608
        "WHERE segment IS NOT NULL AND seq > ? ORDER BY seq LIMIT ?"
    )
    after = 0
    while rows := copy.execute(select, (after, CHUNK_ROWS)).fetchall():
        after = rows[-1][0]
        pending: list[tuple[Row, bytes | None]] = []
        held = 0
        for row in rows:
            data = reader.read(row[3], row[4], row[5])
            pending.append((row, data))
            held += len(data) if data is not None else 0
            if held >= CHUNK_BYTES:
                _settle(live, copy, table, pending, reader, writer, tally)
                pending, held = [], 0
        _settle(live, copy, table, pending, reader, writer, tally)


def _settle(
    live: sqlite3.Connection,
    copy: sqlite3.Connection,
    table: str,
    pending: Sequence[tuple[Row, bytes | None]],
    reader: _LiveSegments,
    writer: _SegmentWriter,
    tally: _Tally,
) -> None:
    """Rows whose bytes were read: those still live (same reference) keep their bytes
    in the backup; the others leave it."""
    if not pending:
        return
    seqs = [row[0] for row, _data in pending]
    # A fresh read of the live database, begun after every read of these bytes.
    still = {
        (seq, segment, offset, length)
        for seq, segment, offset, length in live.execute(
            f"SELECT seq, segment, seg_offset, seg_length FROM {table} WHERE seq {_AMONG}",  # noqa: S608
            (json.dumps(seqs),),
        )
    }
    moved: list[tuple[str, int, int]] = []
    gone: list[int] = []
    gone_ids: list[str] = []
    for row, data in pending:
        seq, envelope_id, size, name, offset, length = row
        problem = _problem(data, envelope_id, size, length)
        if (seq, name, offset, length) not in still:
            tally.dropped += 1  # deleted after the snapshot; its bytes may be zeros now
            gone_ids.append(envelope_id)
        elif problem is not None:
            tally.unreadable_count += 1
            if len(tally.unreadable) < MAX_REPORTED:
                tally.unreadable.append(
                    Unreadable(
                        table=table,
                        seq=seq,
                        envelope_id=envelope_id,
                        segment_file=reader.path(name),
                        problem=problem,
                    )
                )
        else:
            assert data is not None
            new_name, new_offset = writer.append(data)
            moved.append((new_name, new_offset, seq))
            tally.segment_rows += 1
            continue
        gone.append(seq)
    copy.executemany(f"UPDATE {table} SET segment = ?, seg_offset = ? WHERE seq = ?", moved)  # noqa: S608
    if gone:
        copy.execute(f"DELETE FROM {table} WHERE seq {_AMONG}", (json.dumps(gone),))  # noqa: S608
        tally.recount.add(table)
    if gone_ids:
        # Their status as the live database has it now (forwarded, expired, ...).
        statuses = live.execute(
            f"SELECT envelope_id, sender, status, at_ms FROM statuses WHERE envelope_id {_AMONG}",  # noqa: S608
            (json.dumps(gone_ids),),
        ).fetchall()
        copy.executemany(
            "INSERT INTO statuses (envelope_id, sender, status, at_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (envelope_id) DO UPDATE SET sender = excluded.sender, "
            "status = excluded.status, at_ms = excluded.at_ms",
            statuses,
        )


_COUNTERS: Final = {"spool": ("spool_lanes", "peer"), "mailbox": ("mailbox_counts", "recipient")}


def _recount(copy: sqlite3.Connection, table: str) -> None:
    """A lane's or mailbox's depth and bytes, from the rows left (docs/storage.md)."""
    counters, key = _COUNTERS[table]
    copy.execute(f"DELETE FROM {counters}")  # noqa: S608
    copy.execute(
        f"INSERT INTO {counters} ({key}, depth, bytes) "  # noqa: S608
        f"SELECT {key}, COUNT(*), SUM(size) FROM {table} GROUP BY {key}"
    )
