"""Storage ops in process: large envelopes inline in SQLite rows vs in segment files.

    .venv/bin/python benchmarks/segment_storage.py [--rounds N] [--sizes 1024,65536]

For each envelope size and each placement (``inline``: threshold above the
size; ``segment``: threshold 1), one store in a temporary directory runs
``rounds`` times: spool_put of a batch of 256, spool_take of them,
spool_complete (the sending gateway), then deliver of a batch of 256,
mailbox_fetch, mailbox_ack (the receiving gateway), and a scrub at the end.
Prints CPU seconds (time.process_time, all threads of this process) and wall
seconds per round, and the ciphertext MB/s through each side.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio

from gateway.storage.base import RESULT_ACCEPTED, EnvelopeRecord, SpoolItem
from gateway.storage.sqlite import open_sqlite_storage

BATCH = 256
PEER = "globex.example"
ALICE = "alice@acme.example"
BOB = "bob@acme.example"
FAR = 4_000_000_000_000


def spool_items(round_: int, data: bytes) -> list[SpoolItem]:
    return [
        SpoolItem(
            envelope_id=f"s{round_}-{i}",
            peer=PEER,
            sender=ALICE,
            recipient=f"bob@{PEER}",
            created_ms=1,
            expires_ms=FAR,
            burn_on_read=False,
            data=data,
        )
        for i in range(BATCH)
    ]


def mail(round_: int, data: bytes) -> list[EnvelopeRecord]:
    return [
        EnvelopeRecord(
            envelope_id=f"m{round_}-{i}",
            sender=f"dave@{PEER}",
            recipient=BOB,
            created_ms=1,
            expires_ms=FAR,
            burn_on_read=False,
            data=data,
        )
        for i in range(BATCH)
    ]


async def one(size: int, placement: str, rounds: int) -> dict[str, float]:
    data = os.urandom(size)
    threshold = 1 if placement == "segment" else size + 1
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = Path(tmp) / "gateway.sqlite3"
        async with open_sqlite_storage(path, segment_threshold=threshold) as store:
            figures = {"send_cpu": 0.0, "send_wall": 0.0, "recv_cpu": 0.0, "recv_wall": 0.0}
            for round_ in range(rounds):
                items = spool_items(round_, data)
                cpu, wall = time.process_time(), time.perf_counter()
                await store.spool_put(items, at_ms=1)
                taken = await store.spool_take(PEER, max_items=BATCH, max_bytes=2**40)
                assert len(taken) == BATCH
                assert taken[0].data == data
                done = await store.spool_complete(
                    PEER, {e.envelope_id: "forwarded" for e in taken}, at_ms=2
                )
                assert done == BATCH
                figures["send_cpu"] += time.process_time() - cpu
                figures["send_wall"] += time.perf_counter() - wall

                entries = mail(round_, data)
                results = {e.envelope_id: RESULT_ACCEPTED for e in entries}
                cpu, wall = time.process_time(), time.perf_counter()
                await store.deliver(PEER, f"t{round_}", b"h" * 32, results, entries, at_ms=1)
                fetched = await store.mailbox_fetch(BOB, limit=BATCH)
                assert len(fetched) == BATCH
                assert fetched[-1].data == data
                acked = await store.mailbox_ack(BOB, [e.envelope_id for e in fetched])
                assert acked == BATCH
                figures["recv_cpu"] += time.process_time() - cpu
                figures["recv_wall"] += time.perf_counter() - wall
            await store.scrub()
    return {k: v / rounds for k, v in figures.items()}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", default="1024,65536")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}")
    print(
        "size      placement  send cpu ms  send wall ms  send MB/s  "
        "recv cpu ms  recv wall ms  recv MB/s"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        for placement in ("inline", "segment"):
            f = await one(size, placement, args.rounds)
            mb = BATCH * size / 1e6
            print(
                f"{size:<9} {placement:<9}  {f['send_cpu'] * 1e3:11.1f}  "
                f"{f['send_wall'] * 1e3:12.1f}  {mb / f['send_wall']:9.1f}  "
                f"{f['recv_cpu'] * 1e3:11.1f}  {f['recv_wall'] * 1e3:12.1f}  "
                f"{mb / f['recv_wall']:9.1f}"
            )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    trio.run(main)
