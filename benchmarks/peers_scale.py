"""Scale check of the admin commands: `gateway peers` over a big spool.

    .venv/bin/python benchmarks/peers_scale.py                       # 1,000,000 envelopes, 4 peers
    .venv/bin/python benchmarks/peers_scale.py --envelopes 100000 --peers 8 --keep

It makes a setup with ``gateway init`` in a temporary directory, fills its
SQLite storage with spooled envelopes through the storage API (``spool_put``
in batches of the largest size one call allows, a few calls in flight so the
writer group-commits them), then times, as real processes:

* ``gateway --version``: the interpreter's and the CLI's start-up, the floor;
* ``gateway peers``: must stay near that floor however deep the spool is,
  since it reads the per-lane counters (``spool_stats``) and never counts;
* ``gateway spool ls --limit 50``: one short page from the head;
* ``gateway spool ls --older-than 1d``: the worst case of the age filter,
  which matches nothing here and so pages through the whole spool.

and, in-process, ``spool_stats()`` alone. It prints the figures; it asserts
nothing. The storage file takes about 300 bytes per envelope plus ``--size``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from gateway.config import load_config
from gateway.storage import SpoolItem, Storage
from gateway.storage.base import MAX_ITEMS_PER_CALL
from gateway.storage.sqlite import open_sqlite_storage

ORG = "acme.example"
DAY_MS = 86_400_000
WRITERS = 4  # spool_put calls in flight: enough for the writer to batch them
_SCRIPT = Path(sys.executable).parent / "gateway"
GATEWAY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]


def run(*args: str | Path) -> float:
    """Run ``gateway ARGS``; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(
        [*GATEWAY, *map(str, args)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=600,
    )
    return time.perf_counter() - started


def timed(label: str, repeat: int, *args: str | Path) -> None:
    times = [run(*args) for _ in range(repeat)]
    print(f"{label:<36} median {statistics.median(times) * 1000:8.1f} ms  (of {repeat})")


async def fill(path: Path, *, envelopes: int, peers: int, size: int) -> None:
    now_ms = int(time.time() * 1000)
    payload = b"\xa5" * size
    names = [f"peer{p}.example" for p in range(peers)]
    batches = trio.Semaphore(WRITERS)
    started = time.perf_counter()

    async def put(store: Storage, first: int, count: int) -> None:
        items = [
            SpoolItem(
                envelope_id=f"env-{i:09d}",
                peer=names[i % peers],
                sender=f"alice@{ORG}",
                recipient=f"bob@{names[i % peers]}",
                created_ms=now_ms,
                expires_ms=now_ms + 7 * DAY_MS,
                burn_on_read=False,
                data=payload,
            )
            for i in range(first, first + count)
        ]
        try:
            await store.spool_put(items, at_ms=now_ms)
        finally:
            batches.release()

    async with open_sqlite_storage(path) as store, trio.open_nursery() as nursery:
        for first in range(0, envelopes, MAX_ITEMS_PER_CALL):
            await batches.acquire()
            count = min(MAX_ITEMS_PER_CALL, envelopes - first)
            nursery.start_soon(put, store, first, count)
    elapsed = time.perf_counter() - started
    print(f"filled {envelopes:,} envelopes in {elapsed:.1f} s ({envelopes / elapsed:,.0f}/s)")


async def stats_time(path: Path, repeat: int) -> None:
    async with open_sqlite_storage(path, readers=1) as store:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            lanes = await store.spool_stats()
            times.append(time.perf_counter() - started)
    depth = sum(lane.depth for lane in lanes.values())
    print(
        f"{'spool_stats() in-process':<36} median {statistics.median(times) * 1000:8.3f} ms  "
        f"({len(lanes)} lanes, {depth:,} envelopes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envelopes", type=int, default=1_000_000)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size", type=int, default=100, help="bytes per envelope")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the setup and print where")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="peers-scale-"))
    try:
        setup = root / "acme"
        subprocess.run(
            [*GATEWAY, "init", "--org", ORG, "--dir", str(setup)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        config = setup / "gateway.yaml"
        database = load_config(config).storage.sqlite_path
        assert database is not None
        trio.run(lambda: fill(database, envelopes=args.envelopes, peers=args.peers, size=args.size))
        print(f"storage file: {database.stat().st_size / 1e6:,.0f} MB")
        trio.run(stats_time, database, args.repeat)
        timed("gateway --version (start-up floor)", args.repeat, "--version")
        timed("gateway peers", args.repeat, "peers", "-c", config)
        timed("gateway spool ls --limit 50", args.repeat, "spool", "ls", "-c", config)
        timed(
            "gateway spool ls --older-than 1d",
            1,
            "spool",
            "ls",
            "-c",
            config,
            "--older-than",
            "1d",
        )
        if args.keep:
            print(f"kept: {setup}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
