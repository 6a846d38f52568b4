"""Expiry as the running gateway does it: the mailbox sweeper, on a virtual clock.

The acceptance point "expired envelopes are absent from the SQLite file's
bytes afterwards" for the sweeper that ``run_gateway`` runs (``_mailbox_sweeper``):
an envelope that expires between two sweeps is gone from ``gateway.sqlite3``
and its ``-wal`` after the second one, while an unexpired neighbour is still
found by the same search. The store's own primitives are tested in
test_storage_sqlite.py; this checks that the sweeper uses them so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.app import _mailbox_sweeper
from gateway.storage.base import EnvelopeRecord
from gateway.storage.sqlite import SqliteStorage, open_sqlite_storage

ALICE, BOB = "alice@acme.example", "bob@acme.example"
SWEEP_INTERVAL = 60.0
START_MS = 1_000_000
EXPIRES_MS = START_MS + 30_000  # between the first sweep and the second


class ScrubWatch:
    """The store, with an event set once a scrub (the sweeper's last step) returned."""

    def __init__(self, store: SqliteStorage) -> None:
        self._store = store
        self.scrubbed = trio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def scrub(self) -> bool:
        done = await self._store.scrub()
        self.scrubbed.set()
        return done


def canary(name: str, size: int = 4000) -> bytes:
    marker = f"CANARY-{name}-".encode()
    return (marker * (size // len(marker) + 1))[:size]


def file_bytes(db_path: Path) -> bytes:
    """The database, its WAL and its segment files (large envelopes' bytes)."""
    segments = Path(str(db_path) + ".segments")
    parts = [Path(str(db_path) + suffix) for suffix in ("", "-wal")]
    parts += sorted(segments.iterdir()) if segments.is_dir() else []
    return b"".join(part.read_bytes() for part in parts if part.exists())


def record(envelope_id: str, data: bytes, expires_ms: int) -> EnvelopeRecord:
    return EnvelopeRecord(
        envelope_id=envelope_id,
        sender=ALICE,
        recipient=BOB,
        created_ms=START_MS,
        expires_ms=expires_ms,
        burn_on_read=False,
        data=data,
    )


# 4,000 bytes stay in the row; 60,000 go to a segment file.
@pytest.mark.parametrize("size", [4_000, 60_000])
async def test_the_sweeper_removes_expired_ciphertext_from_the_files(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, size: int
) -> None:
    db_path = tmp_path / "gateway.sqlite3"
    expiring, kept = canary("expiring", size), canary("kept", size)
    begin = trio.current_time()

    def clock_ms() -> int:  # wall time that follows trio's virtual clock
        return START_MS + int((trio.current_time() - begin) * 1000)

    async with open_sqlite_storage(db_path) as store:
        await store.mailbox_put_local(
            [record("expiring", expiring, EXPIRES_MS), record("kept", kept, EXPIRES_MS * 10)],
            at_ms=START_MS,
        )
        assert await store.scrub()  # both are in the main file now, as after any checkpoint
        assert expiring[:64] in file_bytes(db_path)

        watched = ScrubWatch(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: _mailbox_sweeper(
                    watched,  # type: ignore[arg-type]
                    clock_ms=clock_ms,
                    interval=SWEEP_INTERVAL,
                )
            )
            await watched.scrubbed.wait()
            nursery.cancel_scope.cancel()
        # The first sweep found nothing expired (and did not scrub); the second did.
        assert trio.current_time() - begin >= SWEEP_INTERVAL

        assert [e.envelope_id for e in await store.mailbox_fetch(BOB, limit=10)] == ["kept"]
        after = file_bytes(db_path)
        assert kept[:64] in after  # the search sees what is still stored
        assert b"CANARY-expiring" not in after, "expired ciphertext is still in the files"
