"""The PostgreSQL schema, as an ordered list of versioned migrations.

The same rules as :mod:`gateway.storage.sqlite.schema`: ``schema_version``
holds one row per applied migration; at open, one transaction takes an
advisory lock (so two nodes starting at once cannot both migrate), reads the
highest applied version, applies every newer migration in order, records
them and commits: all of them or none (PostgreSQL's DDL is transactional). A
database whose version is higher than the newest this code knows was written
by a newer gateway and is refused, never guessed at. Append migrations; never
edit an applied one.

Why the tables look the way they do (what differs from SQLite):

* Every promise that must hold across several nodes sharing the database is a
  constraint of the database, never a check in one process: envelope ids are
  ``UNIQUE`` in the spool and the mailboxes and the ``PRIMARY KEY`` of
  ``seen_envelopes`` and ``statuses``; a received transaction is the
  ``PRIMARY KEY (origin, txn_id)`` of ``transactions``. Writers use
  ``INSERT ... ON CONFLICT``, so a race between two nodes ends in one row.
* ``spool_lanes`` and ``mailbox_counts`` are kept by triggers (per statement, from
  its transition table, since migration 5) in the same
  transaction as every insert and delete. A writer that adds envelopes locks
  the counter rows of the lanes or mailboxes it adds to (sorted, an upsert
  that returns the current counts) *before* it inserts, and holds them to
  its commit: so a bound is checked against counts no other writer can
  change meanwhile, and sequence numbers within one lane or one mailbox are
  handed out in commit order (an ``after=`` cursor never skips an arrival
  that commits late). A counter row at zero stays (readers ask ``depth > 0``):
  deleting it would race with a writer about to lock it.
* ``spool_deferred`` references its spool row ``ON DELETE CASCADE``: a
  deferral leaves with its envelope.
* ``user`` is a reserved word here: the columns are ``user_address``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

import psycopg

from gateway.errors import StorageError
from gateway.storage.sqlite.schema import Migration, check_migrations

_V1 = """
CREATE TABLE spool (
    seq          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    envelope_id  TEXT    NOT NULL UNIQUE,
    peer         TEXT    NOT NULL,
    sender       TEXT    NOT NULL,
    recipient    TEXT    NOT NULL,
    created_ms   BIGINT  NOT NULL,
    expires_ms   BIGINT  NOT NULL,
    spooled_ms   BIGINT  NOT NULL,
    size         INTEGER NOT NULL CHECK (size >= 0),
    burn_on_read BOOLEAN NOT NULL,
    data         BYTEA   NOT NULL
);
CREATE INDEX spool_lane ON spool (peer, seq);
CREATE INDEX spool_expiry ON spool (expires_ms);
CREATE INDEX spool_created ON spool (created_ms);

CREATE TABLE spool_lanes (
    peer  TEXT   PRIMARY KEY,
    depth BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);

CREATE FUNCTION spool_lane_in() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spool_lanes (peer, depth, bytes) VALUES (NEW.peer, 1, NEW.size)
    ON CONFLICT (peer) DO UPDATE
    SET depth = spool_lanes.depth + 1, bytes = spool_lanes.bytes + NEW.size;
    RETURN NULL;
END $$;
CREATE TRIGGER spool_lane_in AFTER INSERT ON spool
    FOR EACH ROW EXECUTE FUNCTION spool_lane_in();

CREATE FUNCTION spool_lane_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE spool_lanes SET depth = depth - 1, bytes = bytes - OLD.size WHERE peer = OLD.peer;
    RETURN NULL;
END $$;
CREATE TRIGGER spool_lane_out AFTER DELETE ON spool
    FOR EACH ROW EXECUTE FUNCTION spool_lane_out();

CREATE TABLE spool_deferred (
    envelope_id   TEXT    PRIMARY KEY REFERENCES spool (envelope_id) ON DELETE CASCADE,
    not_before_ms BIGINT  NOT NULL,
    deferrals     INTEGER NOT NULL CHECK (deferrals >= 1)
);

CREATE TABLE mailbox (
    seq          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    envelope_id  TEXT    NOT NULL UNIQUE,
    recipient    TEXT    NOT NULL,
    sender       TEXT    NOT NULL,
    created_ms   BIGINT  NOT NULL,
    expires_ms   BIGINT  NOT NULL,
    stored_ms    BIGINT  NOT NULL,
    size         INTEGER NOT NULL CHECK (size >= 0),
    burn_on_read BOOLEAN NOT NULL,
    data         BYTEA   NOT NULL
);
CREATE INDEX mailbox_user ON mailbox (recipient, seq);
CREATE INDEX mailbox_expiry ON mailbox (expires_ms);

CREATE TABLE mailbox_counts (
    recipient TEXT   PRIMARY KEY,
    depth     BIGINT NOT NULL,
    bytes     BIGINT NOT NULL
);

CREATE FUNCTION mailbox_count_in() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mailbox_counts (recipient, depth, bytes) VALUES (NEW.recipient, 1, NEW.size)
    ON CONFLICT (recipient) DO UPDATE
    SET depth = mailbox_counts.depth + 1, bytes = mailbox_counts.bytes + NEW.size;
    RETURN NULL;
END $$;
CREATE TRIGGER mailbox_count_in AFTER INSERT ON mailbox
    FOR EACH ROW EXECUTE FUNCTION mailbox_count_in();

CREATE FUNCTION mailbox_count_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mailbox_counts SET depth = depth - 1, bytes = bytes - OLD.size
    WHERE recipient = OLD.recipient;
    RETURN NULL;
END $$;
CREATE TRIGGER mailbox_count_out AFTER DELETE ON mailbox
    FOR EACH ROW EXECUTE FUNCTION mailbox_count_out();

CREATE TABLE seen_envelopes (
    envelope_id TEXT   PRIMARY KEY,
    expires_ms  BIGINT NOT NULL
);
CREATE INDEX seen_expiry ON seen_envelopes (expires_ms);

CREATE TABLE transactions (
    origin    TEXT   NOT NULL,
    txn_id    TEXT   NOT NULL,
    body_hash BYTEA  NOT NULL,
    results   TEXT   NOT NULL,
    at_ms     BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
CREATE INDEX transactions_age ON transactions (at_ms);

CREATE TABLE statuses (
    envelope_id TEXT   PRIMARY KEY,
    sender      TEXT   NOT NULL,
    status      TEXT   NOT NULL CHECK (
        status IN ('queued', 'forwarded', 'delivered', 'expired')
        OR (status LIKE 'rejected:_%')
    ),
    at_ms       BIGINT NOT NULL
);
CREATE INDEX statuses_age ON statuses (at_ms);

CREATE TABLE peer_states (
    peer             TEXT    PRIMARY KEY,
    failures         BIGINT  NOT NULL CHECK (failures >= 0),
    backoff_until_ms BIGINT  NOT NULL,
    last_success_ms  BIGINT,
    last_error       TEXT
);

CREATE TABLE tokens (
    token_hash   BYTEA  PRIMARY KEY,
    user_address TEXT   NOT NULL,
    created_ms   BIGINT NOT NULL
);
CREATE INDEX tokens_user ON tokens (user_address);

CREATE TABLE user_keys (
    user_address TEXT   PRIMARY KEY,
    record       BYTEA  NOT NULL,
    updated_ms   BIGINT NOT NULL
);
"""

# Sign-in sessions (gateway.oidc.sessions), as in SQLite's migration 4.
_V2 = """
CREATE TABLE sessions (
    session_id         TEXT    PRIMARY KEY,
    user_address       TEXT    NOT NULL,
    provider           TEXT    NOT NULL,
    access_hash        BYTEA   NOT NULL UNIQUE,
    access_expires_ms  BIGINT  NOT NULL,
    refresh_hash       BYTEA   NOT NULL UNIQUE,
    refresh_expires_ms BIGINT  NOT NULL,
    created_ms         BIGINT  NOT NULL,
    idp_refresh_token  TEXT,
    idp_groups         TEXT    NOT NULL,
    acr                TEXT,
    amr                TEXT    NOT NULL
);
CREATE INDEX sessions_ended ON sessions (refresh_expires_ms);
"""

# Nodes and leases (gateway.storage.leases), as in SQLite's migration 5, plus
# each node's clock offset from the server's at its last beat.
_V3 = """
CREATE TABLE nodes (
    node         TEXT   PRIMARY KEY,
    incarnation  TEXT   NOT NULL,
    version      TEXT   NOT NULL,
    rules_sha256 TEXT   NOT NULL,
    started_ms   BIGINT NOT NULL,
    beat_ms      BIGINT NOT NULL,
    skew_ms      BIGINT
);
CREATE TABLE leases (
    name         TEXT   PRIMARY KEY,
    node         TEXT   NOT NULL,
    incarnation  TEXT   NOT NULL,
    epoch        BIGINT NOT NULL,
    since_ms     BIGINT NOT NULL,
    until_ms     BIGINT NOT NULL
);
"""

# The retention archive (gateway.storage.postgres.archive), as SQLite's migrations
# 3 and 6, plus one row that every append locks to its commit (an upsert that
# returns it): appends from all nodes are serialised on it, so the hash chain stays
# one chain. It holds the last seq handed out (never reused, even after deletion).
_V4 = """
CREATE TABLE retention_archive (
    seq             BIGINT  PRIMARY KEY,
    envelope_id     TEXT    NOT NULL,
    direction       TEXT    NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    grp             TEXT    NOT NULL,
    sender          TEXT    NOT NULL,
    recipient       TEXT    NOT NULL,
    key_id          TEXT    NOT NULL,
    archived_ms     BIGINT  NOT NULL,
    delete_after_ms BIGINT  NOT NULL,
    size            INTEGER NOT NULL CHECK (size >= 0),
    prev            BYTEA   NOT NULL,
    hash            BYTEA   NOT NULL,
    wrap            BYTEA   NOT NULL,
    sender_key      BYTEA   NOT NULL,
    envelope        BYTEA   NOT NULL,
    UNIQUE (envelope_id, direction)
);
CREATE INDEX retention_archive_by_time ON retention_archive (archived_ms);
CREATE INDEX retention_archive_by_deletion ON retention_archive (delete_after_ms);
CREATE INDEX retention_archive_by_sender ON retention_archive (sender);
CREATE INDEX retention_archive_by_recipient ON retention_archive (recipient);

CREATE TABLE retention_archive_head (
    one  BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    seq  BIGINT  NOT NULL CHECK (seq >= 0)
);
INSERT INTO retention_archive_head (one, seq) VALUES (true, 0);

CREATE TABLE retention_holds (
    user_address TEXT   PRIMARY KEY,
    added_ms     BIGINT NOT NULL,
    note         TEXT   NOT NULL
);
"""

# The lane and mailbox counters kept per statement, not per row: one upsert per
# lane or mailbox a statement touches, from its transition table, instead of
# one trigger call and one upsert per envelope (a batch of 256 envelopes for one
# lane was 256 updates of the same counter row). Counters are upserted in key
# order, as writers lock them.
_V5 = """
DROP TRIGGER spool_lane_in ON spool;
DROP TRIGGER spool_lane_out ON spool;
DROP TRIGGER mailbox_count_in ON mailbox;
DROP TRIGGER mailbox_count_out ON mailbox;
DROP FUNCTION spool_lane_in();
DROP FUNCTION spool_lane_out();
DROP FUNCTION mailbox_count_in();
DROP FUNCTION mailbox_count_out();

CREATE FUNCTION spool_lanes_in() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spool_lanes (peer, depth, bytes)
    SELECT peer, count(*), sum(size) FROM new_rows GROUP BY peer ORDER BY peer
    ON CONFLICT (peer) DO UPDATE
    SET depth = spool_lanes.depth + excluded.depth, bytes = spool_lanes.bytes + excluded.bytes;
    RETURN NULL;
END $$;
CREATE TRIGGER spool_lanes_in AFTER INSERT ON spool
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION spool_lanes_in();

CREATE FUNCTION spool_lanes_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE spool_lanes AS l SET depth = l.depth - d.n, bytes = l.bytes - d.b
    FROM (SELECT peer, count(*) AS n, sum(size) AS b FROM old_rows GROUP BY peer) AS d
    WHERE l.peer = d.peer;
    RETURN NULL;
END $$;
CREATE TRIGGER spool_lanes_out AFTER DELETE ON spool
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION spool_lanes_out();

CREATE FUNCTION mailbox_counts_in() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mailbox_counts (recipient, depth, bytes)
    SELECT recipient, count(*), sum(size) FROM new_rows GROUP BY recipient ORDER BY recipient
    ON CONFLICT (recipient) DO UPDATE
    SET depth = mailbox_counts.depth + excluded.depth,
        bytes = mailbox_counts.bytes + excluded.bytes;
    RETURN NULL;
END $$;
CREATE TRIGGER mailbox_counts_in AFTER INSERT ON mailbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION mailbox_counts_in();

CREATE FUNCTION mailbox_counts_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mailbox_counts AS m SET depth = m.depth - d.n, bytes = m.bytes - d.b
    FROM (SELECT recipient, count(*) AS n, sum(size) AS b FROM old_rows GROUP BY recipient) AS d
    WHERE m.recipient = d.recipient;
    RETURN NULL;
END $$;
CREATE TRIGGER mailbox_counts_out AFTER DELETE ON mailbox
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION mailbox_counts_out();
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "spool (with deferrals), mailboxes, dedup, transactions, statuses, peers, tokens, keys",
        _V1,
    ),
    Migration(2, "sessions: sign-in sessions through OpenID Connect", _V2),
    Migration(3, "nodes and leases: which node drives each lane and the sweepers", _V3),
    Migration(4, "retention_archive (with its head row) and retention_holds", _V4),
    Migration(5, "lane and mailbox counters kept per statement (transition tables)", _V5),
)
LATEST_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description TEXT    NOT NULL,
    applied_ms  BIGINT  NOT NULL
)
"""

#: The advisory lock every migrating node takes (any constant; "gateway" in ASCII).
MIGRATION_LOCK: Final = 0x67617465776179


def current_version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(str(row[0])) if row is not None else 0


def migrate(
    conn: psycopg.Connection[tuple[object, ...]],
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    name: str = "database",
) -> int:
    """Bring the database up to the newest version in one transaction; return it.

    ``conn`` must be in autocommit mode and outside a transaction. Raises
    :class:`StorageError` for a database from a newer gateway or a migration
    that fails (which leaves the database as it was).
    """
    check_migrations(migrations)
    latest = migrations[-1].version if migrations else 0
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            version = current_version(conn)
            if version > latest:
                raise StorageError(
                    f"storage {name}: database schema version {version} is newer than this "
                    f"gateway understands (up to {latest}); run the newer gateway, or restore "
                    "a backup made by this version"
                )
            conn.execute(_VERSION_TABLE)
            now_ms = int(time.time() * 1000)  # a record for humans, not logic
            for migration in migrations[version:]:
                conn.execute(migration.script.encode())
                conn.execute(
                    "INSERT INTO schema_version (version, description, applied_ms) "
                    "VALUES (%s, %s, %s)",
                    (migration.version, migration.description, now_ms),
                )
    except psycopg.Error as exc:
        raise StorageError(f"storage {name}: schema migration failed: {exc}") from exc
    return latest
