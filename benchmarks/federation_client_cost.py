"""What the federation client costs per transaction: httpx (before) vs the lean h11 client.

    .venv/bin/python benchmarks/federation_client_cost.py --httpx-from af74c61
    .venv/bin/python benchmarks/federation_client_cost.py --httpx-from af74c61 --rounds 5

A real local TLS server (our ``HTTPServer`` with federation mTLS, in a child
process so that its CPU is not ours) answers every transaction with a
precomputed answer. In this process each client sends ``--count``
transactions one after another (window 1): bodies of 1, 100 (the default
batch) and 500 envelopes of 1 KiB (binary framing as the sender writes them). For each it
reports the CPU this process spent per transaction (``time.process_time``)
and the median round trip (wall clock). The httpx client is the
``HttpxPeerTransport`` of commit ``--httpx-from``, loaded from git; the lean
one is the tree's ``H11PeerTransport``. Rounds alternate the two clients, so
drift of a shared machine hits both alike; medians over rounds are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

from gateway.core.address import Address
from gateway.core.envelope import Envelope, encode_envelope, new_envelope_id
from gateway.core.keytext import format_signing_key
from gateway.federation.framing import decode_framed_transaction, encode_framed_transaction
from gateway.federation.protocol import (
    ACCEPTED,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_TXN_V2,
    EnvelopeResult,
    encode_results,
)
from gateway.pki import dev
from gateway.rules_runtime import RulesHolder

ORG = "acme.example"
PEER = "globex.example"
SIGNING_KEY = format_signing_key(bytes(range(32)))


def _side(directory: Path, org: str) -> None:
    now = datetime.now(UTC)
    ca = dev.issue_ca(org, now=now)
    issued = dev.issue_gateway_cert(ca, org, now=now)
    dev.write_file(directory / f"{org}.pem", issued.cert_pem(), mode=0o644, replace=True)
    dev.write_private_key(directory / f"{org}.key", issued.key, replace=True)
    (directory / f"{org}-ca.pem").write_bytes(ca.cert_pem())


def _serve(directory: Path) -> None:
    """The child: globex's federation listener, answering from a cache of answers."""
    from gateway.http.messages import Request, Response
    from gateway.http.server import HTTPServer
    from gateway.pki.tls import federation_server_context

    context = federation_server_context(
        cert_file=directory / f"{PEER}.pem",
        key_file=directory / f"{PEER}.key",
        trusted_ca_pems=[(directory / f"{ORG}-ca.pem").read_bytes()],
    )
    answers: dict[int, bytes] = {}

    async def handler(request: Request) -> Response:
        answer = answers.get(len(request.body))
        if answer is None:
            txn = decode_framed_transaction(request.body)
            results = [EnvelopeResult(slot.envelope_id, ACCEPTED) for slot in txn.slots]
            answer = answers[len(request.body)] = encode_results(results)
        return Response(200, [("content-type", MEDIA_TYPE_JSON)], answer)

    server = HTTPServer("federation", handler, ssl_context=context, identify=lambda _s: ORG)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            print(port, flush=True)

    trio.run(main)


def _body(envelopes: int, size: int) -> tuple[bytes, str]:

    now = int(time.time() * 1000)
    items = []
    for _ in range(envelopes):
        envelope = Envelope(
            version=1,
            id=new_envelope_id(),
            sender=Address.parse(f"alice@{ORG}"),
            recipient=Address.parse(f"bob@{PEER}"),
            created=now,
            expires=now + 86_400_000,
            burn_on_read=False,
            ciphertext=os.urandom(size),
            signature=os.urandom(64),
            group="engineering",
        )
        items.append(encode_envelope(envelope))
    return encode_framed_transaction(ORG, PEER, items), MEDIA_TYPE_TXN_V2


def _old_transport_class(commit: str) -> Any:
    source = subprocess.run(
        ["git", "show", f"{commit}:gateway/federation/transport.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "httpx_transport_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("httpx_transport_before", path)
    assert spec is not None
    assert spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.HttpxPeerTransport


async def _measure(
    transport_class: Any,
    directory: Path,
    rules: RulesHolder,
    body: bytes,
    media: str,
    count: int,
    expected: int,
) -> tuple[float, float]:
    from gateway.federation.sender import new_txn_id

    transport = transport_class(
        ORG, directory / f"{ORG}.pem", directory / f"{ORG}.key", rules, timeout=30.0
    )
    try:
        for _ in range(20):  # warm up: the connection, caches
            await transport.send_transaction(
                PEER, new_txn_id(), body, expected=expected, content_type=media
            )
        times = []
        cpu0 = time.process_time()
        for _ in range(count):
            t0 = time.perf_counter()
            await transport.send_transaction(
                PEER, new_txn_id(), body, expected=expected, content_type=media
            )
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
    finally:
        await transport.aclose()
    return cpu / count * 1e6, statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--httpx-from", default="af74c61", help="commit of the httpx transport")
    parser.add_argument("--count", type=int, default=2000, help="transactions of 1 envelope")
    parser.add_argument("--count-large", type=int, default=200, help="of 500 envelopes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve)
        return
    from gateway.federation.transport import H11PeerTransport

    clients = {"httpx": _old_transport_class(args.httpx_from), "h11": H11PeerTransport}
    directory = Path(tempfile.mkdtemp(prefix="fedclient-"))
    _side(directory, ORG)
    _side(directory, PEER)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        (directory / "rules.yaml").write_text(
            "\n".join(
                [
                    "version: 1",
                    f"org: {ORG}",
                    "default: deny",
                    "peers:",
                    f"  {PEER}:",
                    f"    endpoint: https://127.0.0.1:{port}",
                    f"    ca: {PEER}-ca.pem",
                    f"    signing_key: {SIGNING_KEY}",
                    "groups:",
                    "  engineering:",
                    "    members: [alice]",
                    '    send_to: ["*"]',
                ]
            )
            + "\n"
        )
        rules = RulesHolder.load(directory / "rules.yaml")
        cases = [
            ("1 x 1 KiB", 1, args.count),
            ("100 x 1 KiB", 100, args.count_large),
            ("500 x 1 KiB", 500, args.count_large),
        ]
        figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for label, envelopes, count in cases:
            body, media = _body(envelopes, 1024)
            for _ in range(args.rounds):
                for name, cls in clients.items():
                    result = trio.run(
                        _measure, cls, directory, rules, body, media, count, envelopes
                    )
                    figures.setdefault((label, name), []).append(result)
        print(f"load average: {os.getloadavg()}")
        print(f"{'transaction':<14}{'client':<7}{'CPU us/txn':>12}{'RTT p50 us':>12}   rounds")
        for (label, name), runs in figures.items():
            cpu = statistics.median(r[0] for r in runs)
            rtt = statistics.median(r[1] for r in runs)
            detail = ", ".join(f"{r[0]:.0f}/{r[1]:.0f}" for r in runs)
            print(f"{label:<14}{name:<7}{cpu:>12.0f}{rtt:>12.0f}   {detail}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
