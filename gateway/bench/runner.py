"""The benchmark's scenarios: two real gateways, two clients, the clock, and the checks.

Theory of operation
-------------------
**Setup** (not timed). :class:`~gateway.devnet.DevNet` makes two orgs in a
temporary directory, as an admin would, with rules that let ``alice`` of the
sending org reach ``bob`` of the receiving one, and starts two real
``gateway run`` processes (mTLS federation, default durable SQLite). Tokens
are issued with ``gateway token issue``. Every envelope is sealed (X25519
sealed box, Ed25519 signature) *before* the clock starts, as on users'
devices; its payload begins with its index, so an opened sample proves the
right bytes arrived.

**The run.** Submitters post batches to the sending gateway's client API
(``POST /v1/envelopes/batch``), several at once (pipelining). The *window*
is the number of envelopes in flight end to end: a submitter takes credits
before it submits, the receiver gives them back on receipt. So ``--window
1`` is one envelope at a time (unloaded latency) and ``--window 256`` keeps
256 between the two clients. The receiver long-polls the receiving
gateway's mailbox (``ClientSession.fetch``: the binary answer, each envelope's
stored bytes as a record), notes each id's receipt time, and acknowledges
before it fetches again (an unacknowledged envelope would come back and count
as a duplicate, which is the point: a second copy must show).

**The clock** runs from the first submit to the last receipt; latency is
per envelope, from just before its batch was posted to the return of the
fetch that brought it. ``--duration S`` bounds the submitting: after S
seconds no new envelope is submitted, the ones already accepted are awaited
(for at most :data:`DRAIN_GRACE` seconds), and the exactly-once check covers
the accepted ones (``complete`` says whether all N were submitted).

**Outage** (``--outage S``). The receiving gateway is stopped before the
clock starts; envelopes are submitted (the window now counts envelopes
awaiting the *sending* gateway's answer, since none can arrive) until all
are accepted; when S seconds have passed since the stop, the receiving
gateway is started again. The drain rate is the envelopes delivered after
the restart divided by the time from the first to the last receipt after it;
the time from "ready" to the first receipt (the sender's backoff) is
reported apart.

**Spool** (``--spool N``). N envelopes for a peer that is down are written
straight into the sending gateway's database (SQLite or PostgreSQL) through the storage
engine (``spool_put``, 10,000 per commit) while that gateway is stopped:
sealing and submitting a million envelopes through the API would take
minutes and measure something else. The spooled envelopes share one sealed
ciphertext and differ in their ids (a gateway never checks an end-to-end
signature: it holds no sender key). Then the gateway is started, and once
its lane has tried the dead peer and backs off (at most :data:`SPOOL_SETTLE`
seconds) its RSS is read and ``gateway peers`` is timed.

**Figures from outside.** CPU time of each gateway is ``utime + stime``
from ``/proc/<pid>/stat`` before and after the run; peak RSS is ``VmHWM``
from ``/proc/<pid>/status``; bytes on the federation wire are the TCP
payload bytes (TLS records, both directions) of the connections to the
receiving gateway's federation port, from ``ss -tin`` polled every
:data:`WIRE_POLL_INTERVAL` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from gateway.bench.databases import default_admin_url, fresh_databases
from gateway.bench.defaults import (
    DEFAULT_DURATION,
    DEFAULT_ENVELOPES,
    DEFAULT_SAMPLE,
    DEFAULT_SIZE,
    DEFAULT_WINDOW,
    STORAGES,
)
from gateway.bench.floor import FloorResult, run_floor
from gateway.bench.profile import start_recording, summarize_file
from gateway.client.api import ClientSession
from gateway.core.address import Address
from gateway.core.envelope import Envelope, encode_envelope, new_envelope_id
from gateway.crypto.envelope_crypto import max_payload_bytes, open_envelope, seal
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevNet, DevOrg, GatewayProcess, gateway_command, make_cluster
from gateway.errors import GatewayError
from gateway.federation.protocol import MAX_TRANSACTION_ENVELOPES
from gateway.storage.base import MAX_ITEMS_PER_CALL, SpoolItem
from gateway.storage.opening import open_configured_storage

SENDER_ORG: Final = "acme.example"
RECEIVER_ORG: Final = "globex.example"
SENDER_USER: Final = "alice"
RECEIVER_USER: Final = "bob"
GROUP: Final = "bench"

MAX_ENVELOPES: Final = 10_000_000
MAX_WINDOW: Final = 100_000
MAX_DURATION: Final = 86_400.0
MAX_OUTAGE: Final = 3_600.0
MAX_NODES: Final = 8

SUBMITTERS: Final = 4  # concurrent batch submissions (the client session's connections)
MAX_CLIENT_BATCH: Final = 256  # the client API's MAX_BATCH_ENVELOPES
CLIENT_BATCH_BYTES: Final = 4 * 1024 * 1024  # a batch body stays well under max_body_bytes
FETCH_LIMIT: Final = 500  # the client API's MAX_FETCH_LIMIT
FETCH_WAIT: Final = 1  # seconds of one long-poll; the loop re-checks its end between them
DRAIN_GRACE: Final = 60.0  # after the last submit, how long to wait for the rest
OUTAGE_GRACE: Final = 600.0  # after a restart, how long to wait for the spool to drain
CLIENT_TIMEOUT: Final = 60.0
TTL_MS: Final = 24 * 3600 * 1000
RULES_MAX_ENVELOPE_BYTES: Final = 1024 * 1024
SPOOL_CHUNK: Final = min(10_000, MAX_ITEMS_PER_CALL)
SPOOL_SETTLE: Final = 5.0  # at most this long for the lane to fail on the dead peer first
PEERS_RUNS: Final = 3  # `gateway peers` is timed this often; the slowest is reported
WIRE_POLL_INTERVAL: Final = 0.5
JSON_OVERHEAD_FACTOR: Final = 1.4  # base64 and field names, to size batches in bytes
MIB: Final = 1024 * 1024


class BenchError(GatewayError):
    """The benchmark could not run (a gateway did not start, a request failed)."""


# -- options -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    envelopes: int = DEFAULT_ENVELOPES
    size: int = DEFAULT_SIZE  # payload bytes per envelope (before padding and sealing)
    window: int = DEFAULT_WINDOW
    duration: float = DEFAULT_DURATION
    outage: float | None = None  # seconds the receiving gateway is down
    spool: int | None = None  # envelopes spooled for a dead peer (its own scenario)
    sample: int = DEFAULT_SAMPLE  # envelopes opened and verified after the run
    floor: bool = True
    transaction_envelopes: int | None = None  # limits.max_transaction_envelopes; None: default
    keep: Path | None = None  # keep the orgs' directories here instead of a temp dir
    profile: Path | None = None  # py-spy each gateway during the run; stacks go here
    storage: str = "sqlite"  # or "postgresql": a fresh database per org (bench.databases)
    nodes: int = 1  # gateway nodes per org (PostgreSQL only beyond one)
    postgres: str | None = None  # the admin URL that makes the databases; None: the default

    def __post_init__(self) -> None:
        if not 1 <= self.envelopes <= MAX_ENVELOPES:
            raise ValueError(f"--envelopes must be 1..{MAX_ENVELOPES}, got {self.envelopes}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"--window must be 1..{MAX_WINDOW}, got {self.window}")
        if not 0 < self.duration <= MAX_DURATION:
            raise ValueError(f"--duration must be in (0, {MAX_DURATION:.0f}] s")
        if self.outage is not None and not 0 < self.outage <= MAX_OUTAGE:
            raise ValueError(f"--outage must be in (0, {MAX_OUTAGE:.0f}] s")
        if self.spool is not None and not 1 <= self.spool <= MAX_ENVELOPES:
            raise ValueError(f"--spool must be 1..{MAX_ENVELOPES}, got {self.spool}")
        if self.transaction_envelopes is not None and not (
            1 <= self.transaction_envelopes <= MAX_TRANSACTION_ENVELOPES
        ):
            raise ValueError(
                f"--transaction-envelopes must be 1..{MAX_TRANSACTION_ENVELOPES}, "
                f"got {self.transaction_envelopes}"
            )
        if self.profile is not None and self.spool is not None:
            raise ValueError("--profile samples a delivery or outage run, not --spool")
        if self.sample < 0:
            raise ValueError(f"--sample must be 0 or more, got {self.sample}")
        if self.storage not in STORAGES:
            raise ValueError(f"--storage must be one of {', '.join(STORAGES)}, got {self.storage}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"--nodes must be 1..{MAX_NODES}, got {self.nodes}")
        if self.nodes > 1 and self.storage != "postgresql":
            raise ValueError("--nodes above 1 needs --storage postgresql (nodes share a database)")
        if self.nodes > 1 and (self.outage is not None or self.spool is not None or self.profile):
            raise ValueError(
                "--nodes above 1 measures delivery only (no --outage, --spool, --profile)"
            )
        limit = max_payload_bytes(Address.of(SENDER_USER, SENDER_ORG))
        if not 8 <= self.size <= limit:
            raise ValueError(f"--size must be 8..{limit} bytes, got {self.size}")

    @property
    def scenario(self) -> str:
        if self.spool is not None:
            return "spool"
        if self.outage is not None:
            return "outage"
        return "delivery"


# -- measurements from /proc and ss ----------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (its threads included)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # After "pid (comm) ": state is field 3, so utime (14) and stime (15) are 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_kib(pid: int, key: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


_SS_BYTES = re.compile(r"\bbytes_(sent|received):(\d+)")


def wire_bytes(port: int) -> dict[str, int] | None:
    """TCP payload bytes (sent + received) of each connection on local port ``port``.

    Keyed by the connection's address pair; None if ``ss`` is not available.
    """
    ss = shutil.which("ss")
    if ss is None:
        return None
    done = subprocess.run(
        [ss, "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    if done.returncode != 0:
        return None
    counts: dict[str, int] = {}
    key = None
    for line in done.stdout.splitlines():
        if not line.startswith((" ", "\t")):
            key = " ".join(line.split()[2:4])
            continue
        if key is not None:
            counts[key] = sum(int(n) for _, n in _SS_BYTES.findall(line))
    return counts


@dataclass
class WireMeter:
    """Polls :func:`wire_bytes`; keeps each connection's first and latest count."""

    port: int
    first: dict[str, int] = field(default_factory=dict)
    latest: dict[str, int] = field(default_factory=dict)
    available: bool = True

    def poll(self) -> None:
        counts = wire_bytes(self.port)
        if counts is None:
            self.available = False
            return
        for key, value in counts.items():
            # A connection opened after start() counts from zero.
            self.first.setdefault(key, 0)
            self.latest[key] = max(value, self.latest.get(key, 0))

    def start(self) -> None:
        counts = wire_bytes(self.port)
        if counts is None:
            self.available = False
            return
        self.first = dict(counts)
        self.latest = dict(counts)

    @property
    def total(self) -> int | None:
        if not self.available:
            return None
        return sum(value - self.first.get(key, 0) for key, value in self.latest.items())

    async def run(self) -> None:
        while self.available:
            await trio.to_thread.run_sync(self.poll)
            await trio.sleep(WIRE_POLL_INTERVAL)


# -- the two orgs ------------------------------------------------------------------------


@dataclass
class Bed:
    """The test bed: two orgs, their processes, tokens and the users' keys."""

    net: DevNet
    sender: DevOrg
    receiver: DevOrg
    proc_sender: GatewayProcess
    proc_receiver: GatewayProcess
    alice: UserKeys
    bob: UserKeys
    sender_token: str = ""
    receiver_token: str = ""
    # Every node of each org, the first (sender, proc_sender...) included.
    sender_nodes: list[DevOrg] = field(default_factory=list)
    receiver_nodes: list[DevOrg] = field(default_factory=list)
    sender_procs: list[GatewayProcess] = field(default_factory=list)
    receiver_procs: list[GatewayProcess] = field(default_factory=list)


def _limits() -> dict[str, object]:
    return {"max_envelope_bytes": RULES_MAX_ENVELOPE_BYTES, "ttl": {"max": "7d"}}


# The bench measures the pipeline, not the bounds: a lane may hold any scenario's spool,
# and its one sending user may submit as fast as the pipeline takes.
BENCH_LANE_ENVELOPES = 100_000_000
BENCH_LANE_BYTES = 1 << 40
BENCH_SUBMIT_RATE = 100_000_000  # envelopes a second: one bench user is the whole org's load
# One bench user receives everything: an outage run leaves 40,000 and more for bob at
# once, far past a person's mailbox bound (limits.mailbox_max_envelopes, 10,000).
BENCH_MAILBOX_ENVELOPES = 100_000_000
BENCH_MAILBOX_BYTES = 1 << 40


def set_limits(org: DevOrg, values: Mapping[str, int]) -> None:
    """Edit ``limits.<name>`` lines in the org's gateway.yaml (as ``gateway init`` wrote it)."""
    text = org.config_path.read_text(encoding="utf-8")
    for name, value in values.items():
        line = re.compile(rf"^(\s*{re.escape(name)}:\s*)\d+\s*$", re.MULTILINE)
        text, found = line.subn(rf"\g<1>{value}", text)
        if found != 1:
            raise BenchError(f"{org.config_path}: no limits.{name} line to edit")
    org.config_path.write_text(text, encoding="utf-8")


def build_bed(
    base: Path,
    *,
    transaction_envelopes: int | None = None,
    databases: Mapping[str, str] | None = None,
    nodes: int = 1,
) -> Bed:
    """The two orgs; with ``databases`` (org to postgresql:// URL), ``nodes`` each on it."""
    net = DevNet(base)
    sender, receiver = net.add_org(SENDER_ORG), net.add_org(RECEIVER_ORG)
    clusters = {SENDER_ORG: [sender], RECEIVER_ORG: [receiver]}
    if databases is not None:
        for org in (sender, receiver):
            clusters[org.org] = make_cluster(org, nodes, storage=databases[org.org])
    limits = {
        "spool_max_envelopes_per_peer": BENCH_LANE_ENVELOPES,
        "spool_max_bytes_per_peer": BENCH_LANE_BYTES,
        "mailbox_max_envelopes": BENCH_MAILBOX_ENVELOPES,
        "mailbox_max_bytes": BENCH_MAILBOX_BYTES,
        "submit_rate_per_user": BENCH_SUBMIT_RATE,
        "submit_burst_per_user": BENCH_SUBMIT_RATE,
        "inbound_rate_per_peer": BENCH_SUBMIT_RATE,
        "inbound_burst_per_peer": BENCH_SUBMIT_RATE,
    }
    if transaction_envelopes is not None:
        limits["max_transaction_envelopes"] = transaction_envelopes
    for org in (*clusters[SENDER_ORG], *clusters[RECEIVER_ORG]):
        set_limits(org, limits)
    sender.write_rules(
        peers=[receiver],
        groups={GROUP: {"members": [SENDER_USER], "send_to": [RECEIVER_ORG], "limits": _limits()}},
    )
    receiver.write_rules(
        peers=[sender],
        groups={
            GROUP: {"members": [RECEIVER_USER], "receive_from": [SENDER_ORG], "limits": _limits()}
        },
    )
    procs: dict[str, list[GatewayProcess]] = {}
    for name, members in clusters.items():
        procs[name] = [net.process(name)]
        for n, node in enumerate(members[1:], start=2):
            shutil.copy(members[0].rules_path, node.rules_path)
            proc = GatewayProcess(node, base / f"{name}-{n}.log")
            net.processes[f"{name}-{n}"] = proc  # stopped with the others
            procs[name].append(proc)
    return Bed(
        net=net,
        sender=sender,
        receiver=receiver,
        proc_sender=procs[SENDER_ORG][0],
        proc_receiver=procs[RECEIVER_ORG][0],
        alice=UserKeys.generate(Address.of(SENDER_USER, SENDER_ORG)),
        bob=UserKeys.generate(Address.of(RECEIVER_USER, RECEIVER_ORG)),
        sender_nodes=clusters[SENDER_ORG],
        receiver_nodes=clusters[RECEIVER_ORG],
        sender_procs=procs[SENDER_ORG],
        receiver_procs=procs[RECEIVER_ORG],
    )


def _payload(index: int, size: int) -> bytes:
    head = index.to_bytes(8, "big")
    return (
        head
        + bytes((index + k) & 0xFF for k in range(min(size, 64) - 8))
        + bytes(max(0, size - 64))
    )


def seal_all(bed: Bed, count: int, size: int) -> list[Envelope]:
    now = time.time_ns() // 1_000_000
    recipient = bed.bob.public()
    return [
        seal(
            _payload(i, size),
            sender=bed.alice,
            recipient=recipient,
            created_ms=now,
            expires_ms=now + TTL_MS,
        )
        for i in range(count)
    ]


# -- the timed run ---------------------------------------------------------------------


class Window:
    """Credits for envelopes in flight; taken before submitting, given back on receipt."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._changed = trio.Event()

    async def take(self, most: int) -> int:
        while self.free == 0:
            await self._changed.wait()
        count = min(self.free, most)
        self.free -= count
        return count

    def give(self, count: int) -> None:
        self.free += count
        changed, self._changed = self._changed, trio.Event()
        changed.set()


@dataclass
class RunState:
    envelopes: Sequence[Envelope]
    index: dict[str, int]
    submit_at: list[float]
    receive_at: list[float]
    counts: list[int]
    sample_ids: frozenset[str]
    sampled: dict[str, Envelope] = field(default_factory=dict)
    next_index: int = 0
    submitted: int = 0  # accepted by the sending gateway
    submitters_done: bool = False
    received: int = 0  # distinct ids received
    duplicates: int = 0
    unknown: int = 0
    first_submit: float = math.inf
    last_accept: float = 0.0
    refused: list[str] = field(default_factory=list)


def _batch_cap(window: int, envelope_bytes: int, *, outage: bool) -> int:
    by_bytes = max(1, int(CLIENT_BATCH_BYTES / (envelope_bytes * JSON_OVERHEAD_FACTOR)))
    per_submitter = window if outage else math.ceil(window / SUBMITTERS)
    return max(1, min(MAX_CLIENT_BATCH, by_bytes, per_submitter))


async def _submitter(
    session: ClientSession,
    state: RunState,
    window: Window,
    *,
    cap: int,
    deadline: float,
    release_on_accept: bool,
) -> None:
    total = len(state.envelopes)
    while state.next_index < total and time.perf_counter() < deadline:
        wanted = min(cap, total - state.next_index)
        credits = await window.take(wanted)
        start = state.next_index
        count = min(credits, total - start)
        if count <= 0 or time.perf_counter() >= deadline:
            window.give(credits)
            return
        if count < credits:
            window.give(credits - count)
        state.next_index = start + count
        batch = state.envelopes[start : start + count]
        now = time.perf_counter()
        state.first_submit = min(state.first_submit, now)
        for i in range(start, start + count):
            state.submit_at[i] = now
        answers = await session.submit_batch(batch)
        state.last_accept = time.perf_counter()
        for envelope, answer in zip(batch, answers, strict=True):
            if not answer.ok or answer.envelope_id != envelope.id:
                state.refused.append(f"{envelope.id}: {answer.error}")
        if state.refused:
            raise BenchError(
                f"the sending gateway refused {len(state.refused)} envelope(s): "
                + "; ".join(state.refused[:3])
            )
        state.submitted += count
        if release_on_accept:
            window.give(count)


async def _submit_all(
    sessions: Sequence[ClientSession],
    state: RunState,
    window: Window,
    *,
    cap: int,
    deadline: float,
    release_on_accept: bool,
) -> None:
    try:
        async with trio.open_nursery() as nursery:
            for i in range(SUBMITTERS):
                nursery.start_soon(
                    functools.partial(
                        _submitter,
                        sessions[i % len(sessions)],
                        state,
                        window,
                        cap=cap,
                        deadline=deadline,
                        release_on_accept=release_on_accept,
                    )
                )
    finally:
        state.submitters_done = True


async def _receive_all(
    session: ClientSession, state: RunState, window: Window | None, *, grace: float
) -> None:
    """Fetch, note, acknowledge, until every accepted envelope is in (or the grace ends)."""
    grace_deadline: float | None = None
    while True:
        got = await session.fetch(wait=FETCH_WAIT, limit=FETCH_LIMIT)
        now = time.perf_counter()
        fresh = 0
        for envelope in got:
            i = state.index.get(envelope.id)
            if i is None:
                state.unknown += 1
                continue
            state.counts[i] += 1
            if state.counts[i] > 1:
                state.duplicates += 1
                continue
            state.receive_at[i] = now
            state.received += 1
            fresh += 1
            if envelope.id in state.sample_ids:
                state.sampled[envelope.id] = envelope
        # Credits go back on receipt, before the acknowledgement's round trip:
        # the submitters refill the window while the ack commits.
        if window is not None and fresh:
            window.give(fresh)
        if got:
            await session.ack([envelope.id for envelope in got])
        if state.submitters_done:
            if state.received >= state.submitted:
                break
            if grace_deadline is None:
                grace_deadline = now + grace
            elif now > grace_deadline:
                break
    # A copy delivered twice would show up after its first one was acknowledged.
    late = await session.fetch(wait=FETCH_WAIT, limit=FETCH_LIMIT)
    for envelope in late:
        i = state.index.get(envelope.id)
        if i is None:
            state.unknown += 1
        else:
            state.counts[i] += 1
            state.duplicates += 1


def _session(org: DevOrg, token: str) -> ClientSession:
    return ClientSession(
        org.client_url,
        token,
        ca_file=org.ca_file,
        timeout=CLIENT_TIMEOUT,
        max_connections=SUBMITTERS + 1,
    )


@dataclass
class ProcessFigures:
    cpu_seconds: float
    peak_rss_kib: int


def _gateway_figures(proc: GatewayProcess, cpu_before: float) -> ProcessFigures:
    assert proc.process is not None
    pid = proc.process.pid
    return ProcessFigures(cpu_seconds(pid) - cpu_before, memory_kib(pid, "VmHWM"))


def _cpu_of(proc: GatewayProcess) -> float:
    assert proc.process is not None
    return cpu_seconds(proc.process.pid)


def _org_figures(procs: Sequence[GatewayProcess], cpu_before: Sequence[float]) -> ProcessFigures:
    """An org's figures: CPU summed over its nodes, the largest peak RSS of one node."""
    each = [_gateway_figures(p, before) for p, before in zip(procs, cpu_before, strict=True)]
    return ProcessFigures(sum(f.cpu_seconds for f in each), max(f.peak_rss_kib for f in each))


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[rank]


def _open_sample(bed: Bed, state: RunState) -> tuple[int, int]:
    """(sampled envelopes opened and checked, of those the ones that failed)."""
    failed = 0
    for envelope_id, envelope in state.sampled.items():
        try:
            payload = open_envelope(
                envelope, recipient=bed.bob, sender_verify_key=bed.alice.public().verify_key
            )
        except GatewayError:
            failed += 1
            continue
        if int.from_bytes(payload[:8], "big") != state.index[envelope_id]:
            failed += 1
    return len(state.sampled), failed


async def _timed_run(bed: Bed, state: RunState, options: BenchOptions) -> dict[str, Any]:
    assert bed.proc_sender.process is not None
    outage = options.outage is not None
    envelope_bytes = len(encode_envelope(state.envelopes[0]))
    cap = _batch_cap(options.window, envelope_bytes, outage=outage)
    window = Window(options.window)
    meter = WireMeter(bed.receiver.federation.port)
    await trio.to_thread.run_sync(meter.start)
    phase: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as sessions:
        # One client session per node of the sending org: the submitters take turns.
        nodes = bed.sender_nodes or [bed.sender]
        alice = [
            await sessions.enter_async_context(_session(node, bed.sender_token)) for node in nodes
        ]
        if not outage:
            async with _session(bed.receiver, bed.receiver_token) as bob, trio.open_nursery() as n:
                n.start_soon(meter.run)
                deadline = time.perf_counter() + options.duration
                n.start_soon(
                    lambda: _submit_all(
                        alice, state, window, cap=cap, deadline=deadline, release_on_accept=False
                    )
                )
                await _receive_all(bob, state, window, grace=DRAIN_GRACE)
                n.cancel_scope.cancel()
        else:
            assert options.outage is not None
            stopped_at = time.perf_counter()
            deadline = stopped_at + options.duration
            await _submit_all(
                alice, state, window, cap=cap, deadline=deadline, release_on_accept=True
            )
            phase["accept_seconds"] = state.last_accept - state.first_submit
            phase["spooled_at_restart"] = state.submitted
            await trio.sleep(max(0.0, stopped_at + options.outage - time.perf_counter()))
            phase["outage_seconds"] = time.perf_counter() - stopped_at
            await trio.to_thread.run_sync(bed.proc_receiver.start)
            await trio.to_thread.run_sync(bed.proc_receiver.wait_ready)
            ready_at = time.perf_counter()
            phase["ready_at"] = ready_at
            meter = WireMeter(bed.receiver.federation.port)
            await trio.to_thread.run_sync(meter.start)
            async with _session(bed.receiver, bed.receiver_token) as bob, trio.open_nursery() as n:
                n.start_soon(meter.run)
                await _receive_all(bob, state, None, grace=OUTAGE_GRACE)
                n.cancel_scope.cancel()
    await trio.to_thread.run_sync(meter.poll)
    phase["wire_bytes"] = meter.total
    return phase


def _delivery(bed: Bed, options: BenchOptions) -> dict[str, Any]:
    envelopes = seal_all(bed, options.envelopes, options.size)
    sample_ids = frozenset(
        env.id for env in random.sample(envelopes, min(options.sample, len(envelopes)))
    )
    count = len(envelopes)
    state = RunState(
        envelopes=envelopes,
        index={env.id: i for i, env in enumerate(envelopes)},
        submit_at=[math.nan] * count,
        receive_at=[math.nan] * count,
        counts=[0] * count,
        sample_ids=sample_ids,
    )
    outage = options.outage is not None
    if outage:
        bed.proc_receiver.stop()
    assert bed.proc_sender.process is not None
    pid_sender = bed.proc_sender.process.pid
    sender_procs = bed.sender_procs or [bed.proc_sender]
    receiver_procs = bed.receiver_procs or [bed.proc_receiver]
    cpu_senders = [_cpu_of(proc) for proc in sender_procs]
    cpu_receivers = [0.0] * len(receiver_procs)
    receiver_pid = None
    if not outage:
        assert bed.proc_receiver.process is not None
        receiver_pid = bed.proc_receiver.process.pid
        cpu_receivers = [_cpu_of(proc) for proc in receiver_procs]
    recordings = []
    if options.profile is not None:
        # The receiver restarts during an outage run: only the sender is sampled then.
        targets = [("sender", pid_sender)] + ([("receiver", receiver_pid)] if receiver_pid else [])
        recordings = [start_recording(name, pid, options.profile) for name, pid in targets]
    client_cpu_before = time.process_time()
    try:
        phase = trio.run(_timed_run, bed, state, options)
    finally:
        written = [recording.stop() for recording in recordings]
    client_cpu = time.process_time() - client_cpu_before
    sender = _org_figures(sender_procs, cpu_senders)
    receiver = _org_figures(receiver_procs, cpu_receivers)  # restarted: from 0

    received = [i for i in range(count) if state.counts[i] > 0]
    latencies = sorted(state.receive_at[i] - state.submit_at[i] for i in received)
    last_receipt = max((state.receive_at[i] for i in received), default=math.nan)
    seconds = last_receipt - state.first_submit if received else math.nan
    ciphertext = sum(len(envelopes[i].ciphertext) for i in received)
    opened, open_failures = _open_sample(bed, state)
    lost = state.submitted - state.received
    result: dict[str, Any] = {
        "envelopes": {
            "requested": count,
            "submitted": state.submitted,
            "delivered": state.received,
            "lost": lost,
            "duplicates": state.duplicates,
            "unknown": state.unknown,
            "complete": state.submitted == count,
            "exactly_once": lost == 0 and state.duplicates == 0 and state.unknown == 0,
        },
        "envelope_bytes": len(encode_envelope(envelopes[0])),
        "ciphertext_bytes": len(envelopes[0].ciphertext),
        "seconds": seconds,
        "envelopes_per_s": state.received / seconds if received and seconds > 0 else 0.0,
        "ciphertext_mb_per_s": ciphertext / MIB / seconds if received and seconds > 0 else 0.0,
        "latency_ms": {
            "p50": _percentile(latencies, 0.50) * 1000,
            "p90": _percentile(latencies, 0.90) * 1000,
            "p99": _percentile(latencies, 0.99) * 1000,
            "max": (latencies[-1] if latencies else math.nan) * 1000,
        },
        "gateways": {
            "sender": _process_json(sender, state.received),
            "receiver": _process_json(receiver, state.received),
        },
        # Both clients share this process: their CPU per 1,000 envelopes.
        "clients_cpu_seconds_per_1000": client_cpu / state.received * 1000
        if state.received
        else None,
        "federation_wire_bytes_per_envelope": (
            phase["wire_bytes"] / state.received
            if phase.get("wire_bytes") is not None and state.received
            else None
        ),
        "sample": {"opened": opened, "failed": open_failures},
        "outage": None,
        "profile": {
            recording.name: summarize_file(path)
            for recording, path in zip(recordings, written, strict=True)
        }
        or None,
    }
    if outage:
        ready_at = phase["ready_at"]
        after = sorted(state.receive_at[i] for i in received if state.receive_at[i] >= ready_at)
        drain_seconds = after[-1] - after[0] if len(after) > 1 else math.nan
        result["outage"] = {
            "seconds": phase["outage_seconds"],
            "accepted_while_down": phase["spooled_at_restart"],
            "accept_envelopes_per_s": phase["spooled_at_restart"] / phase["accept_seconds"]
            if phase["accept_seconds"] > 0
            else None,
            "resume_after_s": after[0] - ready_at if after else None,
            "drain_seconds": drain_seconds,
            "drain_envelopes_per_s": len(after) / drain_seconds
            if after and drain_seconds > 0
            else None,
        }
    result["_floor_items"] = [(env.id, encode_envelope(env)) for env in envelopes]
    return result


def _process_json(figures: ProcessFigures, delivered: int) -> dict[str, Any]:
    return {
        "cpu_seconds": figures.cpu_seconds,
        "cpu_seconds_per_1000": figures.cpu_seconds / delivered * 1000 if delivered else None,
        "peak_rss_mb": figures.peak_rss_kib / 1024,
    }


# -- the spool scenario ------------------------------------------------------------------


async def _fill_spool(bed: Bed, count: int, template: Envelope) -> float:
    config = bed.sender.config()
    started = time.perf_counter()
    async with open_configured_storage(config.storage) as store:
        at_ms = time.time_ns() // 1_000_000
        done = 0
        while done < count:
            chunk = min(SPOOL_CHUNK, count - done)
            items = []
            for _ in range(chunk):
                env = dataclasses.replace(template, id=new_envelope_id())
                items.append(
                    SpoolItem(
                        envelope_id=env.id,
                        sender=str(env.sender),
                        recipient=str(env.recipient),
                        created_ms=env.created,
                        expires_ms=env.expires,
                        burn_on_read=env.burn_on_read,
                        data=encode_envelope(env),
                        peer=RECEIVER_ORG,
                    )
                )
            spooled = await store.spool_put(items, at_ms=at_ms)
            if len(spooled) != chunk:
                raise BenchError(f"spool_put stored {len(spooled)} of {chunk}")
            done += chunk
    return time.perf_counter() - started


async def _until_backing_off(bed: Bed) -> None:
    config = bed.sender.config()
    with trio.move_on_after(SPOOL_SETTLE):
        async with open_configured_storage(config.storage, admin=True) as store:
            while True:
                state = await store.peer_state_get(RECEIVER_ORG)
                if state is not None and state.failures > 0:
                    return
                await trio.sleep(0.1)


def _spool(bed: Bed, options: BenchOptions) -> dict[str, Any]:
    assert options.spool is not None
    (template,) = seal_all(bed, 1, options.size)
    template = template.with_group(GROUP)
    bed.proc_sender.stop()
    fill_seconds = trio.run(_fill_spool, bed, options.spool, template)
    bed.net.start(SENDER_ORG)
    # Measure a gateway at rest on its spool: once its lane tried the dead peer,
    # failed and backs off (its state says so), or after SPOOL_SETTLE seconds.
    trio.run(_until_backing_off, bed)
    assert bed.proc_sender.process is not None
    pid = bed.proc_sender.process.pid
    timings = []
    depth = None
    for _ in range(PEERS_RUNS):
        started = time.perf_counter()
        done = subprocess.run(
            gateway_command("peers", "--json", "-c", str(bed.sender.config_path)),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        timings.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise BenchError(f"gateway peers failed: {done.stderr.strip()}")
        rows = {row["peer"]: row for row in json.loads(done.stdout)}
        depth = rows.get(RECEIVER_ORG, {}).get("spool_depth")
    return {
        "envelopes": options.spool,
        "fill_seconds": fill_seconds,
        "fill_envelopes_per_s": options.spool / fill_seconds if fill_seconds > 0 else None,
        "sender_rss_mb": memory_kib(pid, "VmRSS") / 1024,
        "sender_peak_rss_mb": memory_kib(pid, "VmHWM") / 1024,
        "peers_seconds": max(timings),
        "peers_spool_depth": depth,
        "depth_matches": depth == options.spool,
    }


# -- the whole benchmark -----------------------------------------------------------------


def run_bench(
    options: BenchOptions, *, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run one scenario (and the floor) and return the report as a JSON-ready dict."""
    with contextlib.ExitStack() as stack:
        if options.keep is not None:
            options.keep.mkdir(parents=True, exist_ok=True)
            base = Path(tempfile.mkdtemp(prefix="bench-", dir=options.keep))
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        databases = None
        if options.storage == "postgresql":
            admin = options.postgres or default_admin_url()
            progress("making a PostgreSQL database per org")
            made = stack.enter_context(fresh_databases(admin, ["sender", "receiver"]))
            databases = {SENDER_ORG: made["sender"], RECEIVER_ORG: made["receiver"]}
        progress(
            f"setting up two orgs in {base}"
            + (f", {options.nodes} nodes each" if options.nodes > 1 else "")
        )
        bed = build_bed(
            base,
            transaction_envelopes=options.transaction_envelopes,
            databases=databases,
            nodes=options.nodes,
        )
        stack.enter_context(bed.net)
        bed.sender_token = bed.sender.issue_token(SENDER_USER)
        bed.receiver_token = bed.receiver.issue_token(RECEIVER_USER)
        _start(bed.sender_procs)
        report: dict[str, Any] = {
            "scenario": options.scenario,
            "options": {
                "envelopes": options.envelopes,
                "size": options.size,
                "window": options.window,
                "duration": options.duration,
                "outage": options.outage,
                "spool": options.spool,
                "transaction_envelopes": options.transaction_envelopes,
                "storage": options.storage,
                "nodes": options.nodes,
            },
            "machine": {
                "cores": os.cpu_count(),
                "cores_usable": len(os.sched_getaffinity(0)),
                "cpu_model": cpu_model(),
            },
        }
        if options.spool is not None:
            progress(f"spooling {options.spool} envelopes for a peer that is down")
            report["spool"] = _spool(bed, options)
            report["ok"] = bool(report["spool"]["depth_matches"])
            return report
        _start(bed.receiver_procs)
        progress(f"sealing {options.envelopes} envelopes of {options.size} bytes")
        delivery = _delivery_with_progress(bed, options, progress)
        floor_items = delivery.pop("_floor_items")
        report.update(delivery)
        report["spool"] = None
        for proc in (*bed.sender_procs, *bed.receiver_procs):
            if proc.stop() != 0:
                raise BenchError(f"{proc.org.org}: gateway did not stop cleanly")
        floor: FloorResult | None = None
        if options.floor:
            progress("the floor: the same bytes through a raw mTLS relay")
            floor = run_floor(floor_items, workdir=None)
        report["floor"] = _floor_json(floor, report["envelopes_per_s"])
        report["ok"] = bool(
            report["envelopes"]["exactly_once"]
            and report["sample"]["failed"] == 0
            and (floor is None or floor.exactly_once)
        )
        return report
    raise AssertionError("unreachable")  # pragma: no cover


def _start(procs: Sequence[GatewayProcess]) -> None:
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.wait_ready()


def _delivery_with_progress(
    bed: Bed, options: BenchOptions, progress: Callable[[str], None]
) -> dict[str, Any]:
    progress(
        f"running: window {options.window}"
        + (f", outage {options.outage:g} s" if options.outage is not None else "")
    )
    return _delivery(bed, options)


def _floor_json(floor: FloorResult | None, gateway_rate: float) -> dict[str, Any] | None:
    if floor is None:
        return None
    rate = floor.envelopes_per_s
    return {
        "envelopes": floor.envelopes,
        "seconds": floor.seconds,
        "envelopes_per_s": rate,
        "mb_per_s": floor.payload_bytes / MIB / floor.seconds if floor.seconds > 0 else 0.0,
        "missing": floor.missing,
        "duplicates": floor.duplicates,
        "exactly_once": floor.exactly_once,
        "ratio": gateway_rate / rate if rate > 0 else None,
    }
