"""What scraping ``/metrics`` costs the envelope flow: throughput with and without scrapes.

    .venv/bin/python benchmarks/scrape_overhead.py                    # 20,000 x 1 KiB, 3 rounds
    .venv/bin/python benchmarks/scrape_overhead.py --envelopes 5000 --rounds 1

Each run is a fresh pair of real ``gateway run`` processes on loopback
(:mod:`gateway.devnet`): alice@acme.example submits ``--envelopes`` sealed
envelopes of 1 KiB payload to bob@globex.example through the client API
(``--submitters`` concurrent clients, batches of ``--batch``), acme forwards
them over mTLS, and the run ends when globex has accepted every one. The
figure is envelopes per second from the first submission to that moment.

A run "with scrapes" adds a task that fetches ``/metrics`` of both gateways
``--scrapes`` times each during the flow (paced to spread over about two
thirds of it, from the previous run's duration). Both
kinds of run poll globex's ``/metrics`` every ``POLL`` seconds to see the end,
so that cost is in both. Runs alternate (without, with, ...) so drift of the
machine hits both alike; the median of each kind is reported, with the
difference in percent. It prints the figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio

from gateway.client.api import ClientSession
from gateway.core.address import Address
from gateway.core.envelope import Envelope
from gateway.crypto.envelope_crypto import seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess

ACME, GLOBEX = "acme.example", "globex.example"
PAYLOAD_BYTES = 1024
POLL = 0.25  # seconds between looks at globex's counter, in both kinds of run
ACCEPTED_LINE = (
    f'gateway_federation_envelopes_total{{direction="inbound",outcome="accepted",peer="{ACME}"}} '
)
RUN_TIMEOUT = 600.0


def scrape(org: DevOrg) -> bytes:
    with urllib.request.urlopen(org.metrics_url + "/metrics", timeout=10.0) as answer:  # noqa: S310 - loopback
        body: bytes = answer.read()
        return body


def accepted(org: DevOrg) -> int:
    for line in scrape(org).decode().splitlines():
        if line.startswith(ACCEPTED_LINE):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def make_envelopes(count: int) -> list[Envelope]:
    alice = UserKeys.generate(Address.of("alice", ACME))
    bob = UserKeys.generate(Address.of("bob", GLOBEX)).public()
    now = time.time_ns() // 1_000_000
    payload = bytes(PAYLOAD_BYTES)
    return [
        seal(payload, sender=alice, recipient=bob, created_ms=now, expires_ms=now + 3_600_000)
        for _ in range(count)
    ]


async def start(net: DevNet) -> tuple[DevOrg, DevOrg, list[GatewayProcess]]:
    acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
    acme.write_rules(
        peers=[globex], groups={"engineering": {"members": ["alice"], "send_to": [GLOBEX]}}
    )
    globex.write_rules(
        peers=[acme], groups={"partners": {"members": ["bob"], "receive_from": [ACME]}}
    )
    procs = [net.process(ACME), net.process(GLOBEX)]
    for proc in procs:
        proc.start()
        await trio.to_thread.run_sync(proc.wait_ready)
    return acme, globex, procs


async def one_run(
    base: Path,
    envelopes: list[Envelope],
    *,
    scrapes: int,
    scrape_pause: float,
    submitters: int,
    batch: int,
) -> tuple[float, int]:
    """Envelopes per second of one flow, and how many scrapes happened during it."""
    with DevNet(base) as net:
        acme, globex, _ = await start(net)
        token = acme.issue_token("alice")
        batches = [envelopes[i : i + batch] for i in range(0, len(envelopes), batch)]
        done_scrapes = 0
        finished = trio.Event()

        async def submitter(mine: list[list[Envelope]]) -> None:
            async with ClientSession(acme.client_url, token, ca_file=acme.ca_file) as client:
                for chunk in mine:
                    answers = await client.submit_batch(chunk)
                    if not all(a.ok for a in answers):
                        raise RuntimeError(f"refused: {[a.error for a in answers if not a.ok][:3]}")

        async def scraper() -> None:
            nonlocal done_scrapes
            while done_scrapes < scrapes and not finished.is_set():
                await trio.to_thread.run_sync(scrape, acme)
                await trio.to_thread.run_sync(scrape, globex)
                done_scrapes += 1
                await trio.sleep(scrape_pause)

        started = time.perf_counter()
        with trio.fail_after(RUN_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for k in range(submitters):
                    nursery.start_soon(submitter, batches[k::submitters])
                if scrapes:
                    nursery.start_soon(scraper)
                # A poll, not an event: the end is only visible in the other process.
                while True:
                    if await trio.to_thread.run_sync(accepted, globex) >= len(envelopes):
                        break
                    await trio.sleep(POLL)
                finished.set()
        elapsed = time.perf_counter() - started
        return len(envelopes) / elapsed, done_scrapes


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envelopes", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (without, with)")
    parser.add_argument("--scrapes", type=int, default=100, help="scrapes of each gateway")
    parser.add_argument("--submitters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    print(f"sealing {args.envelopes} envelopes of {PAYLOAD_BYTES} bytes ...", flush=True)
    envelopes = make_envelopes(args.envelopes)
    without: list[float] = []
    with_scrapes: list[float] = []
    with tempfile.TemporaryDirectory(prefix="scrape-overhead-") as tmp:
        for round_number in range(args.rounds):
            for scrapes, figures in ((0, without), (args.scrapes, with_scrapes)):
                base = Path(tmp) / f"r{round_number}-s{scrapes}"
                base.mkdir()
                # Spread the scrapes over about 2/3 of a flow at the last pace seen.
                pace = without[-1] if without else 2000.0
                rate, done = await one_run(
                    base,
                    envelopes,
                    scrapes=scrapes,
                    scrape_pause=len(envelopes) / pace * 0.66 / max(1, args.scrapes),
                    submitters=args.submitters,
                    batch=args.batch,
                )
                figures.append(rate)
                print(
                    f"round {round_number + 1}: {rate:8.0f} envelopes/s"
                    f"{f' with {done} scrapes of each gateway' if scrapes else ' without scrapes'}",
                    flush=True,
                )
    base_rate, scraped_rate = statistics.median(without), statistics.median(with_scrapes)
    change = (scraped_rate - base_rate) / base_rate * 100
    print(
        f"median: {base_rate:.0f} envelopes/s without scrapes, {scraped_rate:.0f} with; "
        f"change {change:+.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
