"""The SQLite schema, as an ordered list of versioned migrations.

``schema_version`` holds one row per applied migration. At open, the writer
takes the write lock (``BEGIN IMMEDIATE``, so two processes opening one file at
once cannot both migrate), reads the highest applied version, applies every
newer migration of :data:`MIGRATIONS` in order, records them, and commits: all
of them or none. A database whose version is higher than the newest this code
knows was written by a newer gateway and is refused, never guessed at.

Rules for adding a migration: append ``Migration(N + 1, ...)``; never edit or
reorder an applied one (a deployed database has run it); keep each script to
plain SQL statements (no ``BEGIN``/``COMMIT``: the runner owns the transaction).

Why the tables look the way they do:

* The envelope's bytes (``data``) are the last column, so reads of the index
  columns (listings, expiry) never touch its overflow pages.
* ``spool.seq`` and ``mailbox.seq`` are ``AUTOINCREMENT``: never reused, so
  lane order is insertion order and a mailbox ``after`` cursor can't skip an
  envelope that arrives after the newest one was deleted.
* ``spool_lanes`` and ``mailbox_counts`` are kept by the store's ops, in the
  same transaction as every insert and delete, one upsert per lane or mailbox
  per op (``SqliteStorage``'s ``_counted``), so depth and bytes per lane or
  mailbox cost one row read. Until migration 7 row triggers kept them; a row
  trigger runs per envelope and copies the whole row, the envelope's bytes
  included, into its frame (at 1 KiB a third of an insert and delete's CPU,
  at 64 KiB about 200 µs of it). Every write to ``spool`` or ``mailbox`` goes
  through :mod:`gateway.storage.sqlite.store`, admin tools included.
* ``spool_deferred`` holds, per spooled envelope a peer answered with a
  temporary result, when it may go again (:meth:`SqliteStorage.spool_defer`).
* ``seen_envelopes`` remembers every envelope id a mailbox accepted until it
  expires: the receiver's dedup, across restarts and transactions.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import StorageError


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    script: str


_V1 = """
CREATE TABLE spool (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    envelope_id  TEXT    NOT NULL UNIQUE,
    peer         TEXT    NOT NULL,
    sender       TEXT    NOT NULL,
    recipient    TEXT    NOT NULL,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    spooled_ms   INTEGER NOT NULL,
    size         INTEGER NOT NULL CHECK (size >= 0),
    burn_on_read INTEGER NOT NULL CHECK (burn_on_read IN (0, 1)),
    data         BLOB    NOT NULL
);
CREATE INDEX spool_lane ON spool (peer, seq);
CREATE INDEX spool_expiry ON spool (expires_ms);
CREATE INDEX spool_created ON spool (created_ms);

CREATE TABLE spool_lanes (
    peer  TEXT    PRIMARY KEY,
    depth INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER spool_lane_in AFTER INSERT ON spool BEGIN
    INSERT INTO spool_lanes (peer, depth, bytes) VALUES (NEW.peer, 1, NEW.size)
    ON CONFLICT (peer) DO UPDATE SET depth = depth + 1, bytes = bytes + NEW.size;
END;

CREATE TRIGGER spool_lane_out AFTER DELETE ON spool BEGIN
    UPDATE spool_lanes SET depth = depth - 1, bytes = bytes - OLD.size WHERE peer = OLD.peer;
    DELETE FROM spool_lanes WHERE peer = OLD.peer AND depth <= 0;
END;

CREATE TABLE mailbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    envelope_id  TEXT    NOT NULL UNIQUE,
    recipient    TEXT    NOT NULL,
    sender       TEXT    NOT NULL,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    stored_ms    INTEGER NOT NULL,
    size         INTEGER NOT NULL CHECK (size >= 0),
    burn_on_read INTEGER NOT NULL CHECK (burn_on_read IN (0, 1)),
    data         BLOB    NOT NULL
);
CREATE INDEX mailbox_user ON mailbox (recipient, seq);
CREATE INDEX mailbox_expiry ON mailbox (expires_ms);

CREATE TABLE mailbox_counts (
    recipient TEXT    PRIMARY KEY,
    depth     INTEGER NOT NULL,
    bytes     INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER mailbox_count_in AFTER INSERT ON mailbox BEGIN
    INSERT INTO mailbox_counts (recipient, depth, bytes) VALUES (NEW.recipient, 1, NEW.size)
    ON CONFLICT (recipient) DO UPDATE SET depth = depth + 1, bytes = bytes + NEW.size;
END;

CREATE TRIGGER mailbox_count_out AFTER DELETE ON mailbox BEGIN
    UPDATE mailbox_counts SET depth = depth - 1, bytes = bytes - OLD.size
    WHERE recipient = OLD.recipient;
    DELETE FROM mailbox_counts WHERE recipient = OLD.recipient AND depth <= 0;
END;

CREATE TABLE seen_envelopes (
    envelope_id TEXT    PRIMARY KEY,
    expires_ms  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX seen_expiry ON seen_envelopes (expires_ms);

CREATE TABLE transactions (
    origin    TEXT    NOT NULL,
    txn_id    TEXT    NOT NULL,
    body_hash BLOB    NOT NULL,
    results   TEXT    NOT NULL,
    at_ms     INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
) WITHOUT ROWID;
CREATE INDEX transactions_age ON transactions (at_ms);

CREATE TABLE statuses (
    envelope_id TEXT    PRIMARY KEY,
    sender      TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (
        status IN ('queued', 'forwarded', 'delivered', 'expired')
        OR (status LIKE 'rejected:_%')
    ),
    at_ms       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX statuses_age ON statuses (at_ms);

CREATE TABLE peer_states (
    peer             TEXT    PRIMARY KEY,
    failures         INTEGER NOT NULL CHECK (failures >= 0),
    backoff_until_ms INTEGER NOT NULL,
    last_success_ms  INTEGER,
    last_error       TEXT
) WITHOUT ROWID;

CREATE TABLE tokens (
    token_hash BLOB    PRIMARY KEY,
    user       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX tokens_user ON tokens (user);

CREATE TABLE user_keys (
    user       TEXT    PRIMARY KEY,
    record     BLOB    NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Envelopes a peer answered with a temporary result (``mailbox_full``): not sent
# again before ``not_before_ms``. A side table, not spool columns: a column added
# to ``spool`` would sit after ``data``, and reading it would walk the envelope's
# overflow pages on every take. Its rows leave with their spool row.
_V2 = """
CREATE TABLE spool_deferred (
    envelope_id   TEXT    PRIMARY KEY,
    not_before_ms INTEGER NOT NULL,
    deferrals     INTEGER NOT NULL CHECK (deferrals >= 1)
) WITHOUT ROWID;

CREATE TRIGGER spool_deferred_out AFTER DELETE ON spool BEGIN
    DELETE FROM spool_deferred WHERE envelope_id = OLD.envelope_id;
END;
"""

# The retention archive (docs/retention.md): append-only but for deletion after
# `delete_after_ms` (unless a hold names the sender or the recipient), each row
# hash-chained to the one before (gateway.core.archive). The envelope's bytes last.
_V3 = """
CREATE TABLE retention_archive (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    envelope_id     TEXT    NOT NULL,
    direction       TEXT    NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    grp             TEXT    NOT NULL,
    sender          TEXT    NOT NULL,
    recipient       TEXT    NOT NULL,
    key_id          TEXT    NOT NULL,
    archived_ms     INTEGER NOT NULL,
    delete_after_ms INTEGER NOT NULL,
    size            INTEGER NOT NULL,
    prev            BLOB    NOT NULL,
    hash            BLOB    NOT NULL,
    wrap            BLOB    NOT NULL,
    envelope        BLOB    NOT NULL,
    UNIQUE (envelope_id, direction)
);
CREATE INDEX retention_archive_by_time ON retention_archive (archived_ms);
CREATE INDEX retention_archive_by_deletion ON retention_archive (delete_after_ms);

CREATE TABLE retention_holds (
    user     TEXT    PRIMARY KEY,
    added_ms INTEGER NOT NULL,
    note     TEXT    NOT NULL
) WITHOUT ROWID;
"""

# Sign-in sessions (gateway.oidc.sessions): one row per session, found by the
# hash of its session token or of its refresh token; lists are JSON arrays.
_V4 = """
CREATE TABLE sessions (
    session_id         TEXT    PRIMARY KEY,
    user               TEXT    NOT NULL,
    provider           TEXT    NOT NULL,
    access_hash        BLOB    NOT NULL UNIQUE,
    access_expires_ms  INTEGER NOT NULL,
    refresh_hash       BLOB    NOT NULL UNIQUE,
    refresh_expires_ms INTEGER NOT NULL,
    created_ms         INTEGER NOT NULL,
    idp_refresh_token  TEXT,
    idp_groups         TEXT    NOT NULL,
    acr                TEXT,
    amr                TEXT    NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_ended ON sessions (refresh_expires_ms);
"""

# Nodes and leases (gateway.storage.leases): one SQLite node keeps them too.
_V5 = """
CREATE TABLE nodes (
    node         TEXT    PRIMARY KEY,
    incarnation  TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    rules_sha256 TEXT    NOT NULL,
    started_ms   INTEGER NOT NULL,
    beat_ms      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE leases (
    name         TEXT    PRIMARY KEY,
    node         TEXT    NOT NULL,
    incarnation  TEXT    NOT NULL,
    epoch        INTEGER NOT NULL,
    since_ms     INTEGER NOT NULL,
    until_ms     INTEGER NOT NULL
) WITHOUT ROWID;
"""

# The sender's key with each archive record (gateway.core.archive.sender_key_blob):
# empty for records archived before, whose hash does not cover it.
_V6 = """
ALTER TABLE retention_archive ADD COLUMN sender_key BLOB NOT NULL DEFAULT x'';
"""

# The lane and mailbox counters leave their row triggers for the store's ops
# (the module docstring says why); ``spool_deferred_out`` stays.
_V7 = """
DROP TRIGGER spool_lane_in;
DROP TRIGGER spool_lane_out;
DROP TRIGGER mailbox_count_in;
DROP TRIGGER mailbox_count_out;
"""

# Large envelopes' bytes in segment files (gateway.storage.sqlite.segments): a row
# holds either its bytes in ``data`` (``segment`` NULL) or an empty ``data`` and
# where its bytes are. Rows written before keep their bytes inline and read as before.
_V8 = """
ALTER TABLE spool ADD COLUMN segment TEXT;
ALTER TABLE spool ADD COLUMN seg_offset INTEGER;
ALTER TABLE spool ADD COLUMN seg_length INTEGER;
ALTER TABLE mailbox ADD COLUMN segment TEXT;
ALTER TABLE mailbox ADD COLUMN seg_offset INTEGER;
ALTER TABLE mailbox ADD COLUMN seg_length INTEGER;
"""

# Which rows name a segment: asked at every open (recovery, under the write
# lock) and when a segment may have emptied. Without these, both walk every row
# of the spool and the mailboxes (a million spooled: over a second, the live
# gateway's commits held up meanwhile). Partial, so small envelopes, kept
# inline, cost them nothing.
_V9 = """
CREATE INDEX spool_segment ON spool(segment, seg_offset, seg_length) WHERE segment IS NOT NULL;
CREATE INDEX mailbox_segment ON mailbox(segment, seg_offset, seg_length) WHERE segment IS NOT NULL;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "spool, mailboxes, dedup, transactions, statuses, peers, tokens, keys", _V1),
    Migration(2, "spool_deferred: envelopes a peer answered with a temporary result", _V2),
    Migration(3, "retention_archive and retention_holds", _V3),
    Migration(4, "sessions: sign-in sessions through OpenID Connect", _V4),
    Migration(5, "nodes and leases: which node drives each lane and the sweepers", _V5),
    Migration(6, "retention_archive.sender_key: the key that verified the sender", _V6),
    Migration(7, "spool_lanes and mailbox_counts kept by the store's ops, not row triggers", _V7),
    Migration(8, "spool and mailbox: large envelopes' bytes in segment files", _V8),
    Migration(9, "indexes of the rows whose bytes are in segment files", _V9),
)
LATEST_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description TEXT    NOT NULL,
    applied_ms  INTEGER NOT NULL
)
"""


def split_statements(script: str) -> list[str]:
    """Split an SQL script into whole statements (triggers' ``BEGIN ... END`` kept whole).

    Needed because ``executescript`` would commit the migration's transaction.
    """
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statement = pending.strip()
            if statement.rstrip(";").strip():
                statements.append(statement)
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement at the end of a script: {pending.strip()!r}")
    return statements


def check_migrations(migrations: Sequence[Migration]) -> None:
    """Versions must run 1, 2, 3, ... with no gap: a typo must not skip a step."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(
                f"migration #{expected} has version {migration.version}; versions must be 1, 2, ..."
            )


def current_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if row is None:
        return 0
    (version,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(version)


def _refuse_newer(version: int, latest: int, path: str) -> None:
    if version > latest:
        raise StorageError(
            f"storage {path}: database schema version {version} is newer than this "
            f"gateway understands (up to {latest}); run the newer gateway, or restore "
            "a backup made by this version"
        )


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    path: str = "database",
) -> int:
    """Bring the database up to the newest version in one transaction; return it.

    ``conn`` must be in autocommit mode (``isolation_level=None``) and outside
    a transaction. Raises :class:`StorageError` for a database from a newer
    gateway or a migration that fails (which leaves the database as it was).
    """
    check_migrations(migrations)
    latest = migrations[-1].version if migrations else 0
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = current_version(conn)
            _refuse_newer(version, latest, path)
            conn.execute(_VERSION_TABLE)
            now_ms = int(time.time() * 1000)  # a record for humans, not logic
            for migration in migrations[version:]:
                for statement in split_statements(migration.script):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, description, applied_ms) "
                    "VALUES (?, ?, ?)",
                    (migration.version, migration.description, now_ms),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StorageError(f"storage {path}: schema migration failed: {exc}") from exc
    return latest
