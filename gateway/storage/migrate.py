"""``gateway storage migrate``: a stopped SQLite gateway's state, copied into PostgreSQL.

Theory of operation
-------------------
The source is the SQLite file of a gateway that has **stopped cleanly**: a
running gateway keeps writing, and one killed leaves committed pages in its
``-wal`` file. Both show as a ``-wal`` file beside the database, so one there
refuses the copy (start the gateway and stop it once: it checkpoints and
removes it). The source must be at this version's newest schema.

The target must be an **empty** database: the copy brings it to the newest
schema first (the same migrations a gateway runs at start), then refuses if
any of the gateway's tables holds a row, so nothing is ever merged or
overwritten.

Every table is then copied in **one PostgreSQL transaction** with ``COPY``,
in a fixed order (the spool before its deferrals), rows streamed from SQLite
in chunks so memory stays bounded whatever the size. Sequence numbers are
kept (a client's mailbox ``after=`` cursor still means the same envelope), and
each identity sequence restarts after the highest one. The lane and mailbox
counters are not copied: the target's triggers rebuild them from the rows.
Before the commit, each table's count in the target must equal the source's,
and the counters must equal what the rows add up to; otherwise nothing is
committed. So the target holds either the whole state or nothing.

The retention archive and its legal holds are copied like the rest, record by
record as stored (the hash chain covers the bytes, so it verifies the same in
PostgreSQL); the archive's head row then takes the last seq SQLite handed out,
so a record archived after the move follows the newest one copied and never
reuses a seq, and the newest record's hash must be the same on both sides.

Nothing here reads an envelope: rows are copied as bytes. A large envelope
whose bytes SQLite keeps in a segment file (gateway.storage.sqlite.segments)
is read from there and lands inline in PostgreSQL's ``data`` (TOAST).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg

from gateway.errors import StorageError
from gateway.storage.postgres.engine import describe
from gateway.storage.postgres.schema import migrate as migrate_postgres
from gateway.storage.sqlite.schema import LATEST_VERSION as SQLITE_LATEST_VERSION
from gateway.storage.sqlite.segments import REF_COLUMNS, read_range, segments_dir

CHUNK_ROWS: Final = 1_000  # rows read from SQLite at a time


#: Columns named differently in PostgreSQL (``user`` is a reserved word there).
_RENAMED: Final = {"user": "user_address"}


@dataclass(frozen=True, slots=True)
class Table:
    """One table: its columns in SQLite (same order in PostgreSQL), and what to convert."""

    name: str
    columns: tuple[str, ...]
    order_by: str
    booleans: tuple[int, ...] = ()  # positions of 0/1 columns (PostgreSQL BOOLEAN)
    identity: str | None = None  # the identity column whose sequence restarts after the copy
    segmented: bool = False  # ``data`` may be in a segment file (its reference columns follow)

    @property
    def postgres_columns(self) -> tuple[str, ...]:
        return tuple(_RENAMED.get(column, column) for column in self.columns)


_SPOOL_COLUMNS = (
    "seq",
    "envelope_id",
    "peer",
    "sender",
    "recipient",
    "created_ms",
    "expires_ms",
    "spooled_ms",
    "size",
    "burn_on_read",
    "data",
)
_MAILBOX_COLUMNS = (
    "seq",
    "envelope_id",
    "recipient",
    "sender",
    "created_ms",
    "expires_ms",
    "stored_ms",
    "size",
    "burn_on_read",
    "data",
)
_ARCHIVE_COLUMNS = (
    "seq",
    "envelope_id",
    "direction",
    "grp",
    "sender",
    "recipient",
    "key_id",
    "archived_ms",
    "delete_after_ms",
    "size",
    "prev",
    "hash",
    "wrap",
    "sender_key",
    "envelope",
)
TABLES: Final = (
    Table("spool", _SPOOL_COLUMNS, "seq", booleans=(9,), identity="seq", segmented=True),
    Table("spool_deferred", ("envelope_id", "not_before_ms", "deferrals"), "envelope_id"),
    Table("mailbox", _MAILBOX_COLUMNS, "seq", booleans=(8,), identity="seq", segmented=True),
    Table("seen_envelopes", ("envelope_id", "expires_ms"), "1"),
    Table("transactions", ("origin", "txn_id", "body_hash", "results", "at_ms"), "origin, txn_id"),
    Table("statuses", ("envelope_id", "sender", "status", "at_ms"), "envelope_id"),
    Table(
        "peer_states",
        ("peer", "failures", "backoff_until_ms", "last_success_ms", "last_error"),
        "peer",
    ),
    Table("tokens", ("token_hash", "user", "created_ms"), "token_hash"),
    Table("user_keys", ("user", "record", "updated_ms"), "user"),
    Table("retention_archive", _ARCHIVE_COLUMNS, "seq"),
    Table("retention_holds", ("user", "added_ms", "note"), "user"),
)
#: The counters the target's triggers keep: (table, counter table, key column).
_COUNTERS: Final = (("spool", "spool_lanes", "peer"), ("mailbox", "mailbox_counts", "recipient"))

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class MigrationReport:
    source: str
    target: str
    rows: dict[str, int]  # table -> rows copied (equal in source and target)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def _open_source(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StorageError(f"{path}: no such SQLite database")
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        raise StorageError(
            f"{path}: {wal.name} exists: the gateway is running, or did not stop cleanly. "
            "Stop it (or start it and stop it once, so it checkpoints), then migrate"
        )
    try:
        # immutable: no locks and no -wal/-shm files made by this reader (none may write now)
        conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: not a gateway database: {exc}") from exc
    version = int(row[0]) if row and row[0] is not None else 0
    if version != SQLITE_LATEST_VERSION:
        conn.close()
        raise StorageError(
            f"{path}: schema version {version}, this gateway's is {SQLITE_LATEST_VERSION}: "
            "start and stop this version's gateway on it once, then migrate"
        )
    return conn


def _rows(
    conn: sqlite3.Connection, table: Table, segments: Path | None = None
) -> Iterator[tuple[object, ...]]:
    columns = ", ".join(table.columns)
    if table.segmented:
        columns += ", " + REF_COLUMNS
    cursor = conn.execute(
        f"SELECT {columns} FROM {table.name} "  # noqa: S608 -- ours
        f"ORDER BY {table.order_by}"
    )
    try:
        while chunk := cursor.fetchmany(CHUNK_ROWS):
            for row in chunk:
                if table.segmented:
                    row = _inline(row, table, segments)
                if table.booleans:
                    values = list(row)
                    for index in table.booleans:
                        values[index] = bool(values[index])
                    yield tuple(values)
                else:
                    yield row
    finally:
        cursor.close()


def _inline(row: tuple[object, ...], table: Table, segments: Path | None) -> tuple[object, ...]:
    """The row with its segment's bytes in ``data`` and the reference columns cut."""
    segment, offset, length = row[-3:]
    row = row[:-3]
    if segment is None:
        return row
    data = None
    if segments is not None:
        data = read_range(segments, str(segment), int(str(offset)), int(str(length)))
    if data is None:
        raise StorageError(
            f"{table.name} row {row[0]}: its bytes are missing from segment {segment}; "
            "nothing was kept"
        )
    at = table.columns.index("data")
    return (*row[:at], data, *row[at + 1 :])


def _count(conn: sqlite3.Connection | psycopg.Connection[tuple[object, ...]], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 -- ours
    return int(str(row[0])) if row is not None else 0


def migrate_sqlite_to_postgres(
    sqlite_path: Path, url: str, *, progress: Progress = lambda _: None
) -> MigrationReport:
    """Copy the whole state of ``sqlite_path`` into the empty database at ``url``.

    Raises :class:`StorageError` (one line, no password) and commits nothing
    if the source is in use or not at the newest schema, the target cannot be
    reached or is not empty, or a count differs after the copy.
    """
    target = describe(url)
    source = _open_source(sqlite_path)
    try:
        try:
            pg = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StorageError(f"storage {target}: cannot connect: {exc}") from exc
        with pg:
            migrate_postgres(pg, name=target)
            held = {table.name: _count(pg, table.name) for table in TABLES}
            if any(held.values()):
                busy = ", ".join(f"{name} {count}" for name, count in held.items() if count)
                raise StorageError(
                    f"storage {target}: not empty ({busy} rows): migrate into a new, empty database"
                )
            rows = _copy_all(source, pg, progress, segments_dir(sqlite_path))
    except psycopg.Error as exc:
        raise StorageError(f"storage {target}: the copy failed, nothing was kept: {exc}") from exc
    finally:
        source.close()
    return MigrationReport(source=str(sqlite_path), target=target, rows=rows)


def _copy_all(
    source: sqlite3.Connection,
    pg: psycopg.Connection[tuple[object, ...]],
    progress: Progress,
    segments: Path | None = None,
) -> dict[str, int]:
    rows: dict[str, int] = {}
    with pg.transaction():
        for table in TABLES:
            copied = 0
            columns = ", ".join(table.postgres_columns)
            with pg.cursor() as cursor:
                with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
                    for row in _rows(source, table, segments):
                        copy.write_row(row)
                        copied += 1
                if table.identity is not None:
                    cursor.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', "  # noqa: S608
                        f"'{table.identity}'), COALESCE(MAX({table.identity}), 1), "
                        f"MAX({table.identity}) IS NOT NULL) FROM {table.name}"
                    )
            expected = _count(source, table.name)
            landed = _count(pg, table.name)
            if not copied == expected == landed:
                raise StorageError(
                    f"{table.name}: {expected} rows in the source, {copied} copied, "
                    f"{landed} in the target; nothing was kept"
                )
            rows[table.name] = copied
            progress(f"{table.name}: {copied} row(s)")
        for counted, counters, key in _COUNTERS:
            mismatch = pg.execute(
                f"SELECT count(*) FROM (SELECT {key}, count(*) AS depth, "  # noqa: S608 -- ours
                f"sum(size) AS bytes FROM {counted} GROUP BY {key}) AS rows "
                f"FULL JOIN (SELECT * FROM {counters} WHERE depth > 0) AS counters "
                f"USING ({key}) WHERE rows.depth IS DISTINCT FROM counters.depth "
                "OR rows.bytes IS DISTINCT FROM counters.bytes"
            ).fetchone()
            if mismatch is None or int(str(mismatch[0])) != 0:
                raise StorageError(f"{counters}: the counters do not add up; nothing was kept")
        _move_archive_head(source, pg)
    return rows


def _move_archive_head(
    source: sqlite3.Connection, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """The archive's head takes SQLite's last seq; the newest record must match on both sides."""
    (last_seq,) = source.execute(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'retention_archive'), 0)"
    ).fetchone()
    pg.execute(
        "INSERT INTO retention_archive_head (one, seq) VALUES (true, %s) "
        "ON CONFLICT (one) DO UPDATE SET seq = excluded.seq",
        (int(last_seq),),
    )
    newest = "SELECT seq, hash FROM retention_archive ORDER BY seq DESC LIMIT 1"
    mine = source.execute(newest).fetchone()
    theirs = pg.execute(newest).fetchone()
    if _seq_and_hash(mine) != _seq_and_hash(theirs):
        raise StorageError(
            "retention_archive: the newest record differs after the copy; nothing was kept"
        )


def _seq_and_hash(row: tuple[object, ...] | None) -> tuple[int, bytes] | None:
    if row is None:
        return None
    seq, digest = row
    return int(str(seq)), bytes(digest)  # type: ignore[call-overload]
