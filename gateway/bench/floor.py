"""The floor: the same bytes through a raw mTLS relay, with nothing of the gateway in the way.

Theory of operation
-------------------
Three parties, as in the gateway run: a *source* (the sending client), a
*relay* (in its own process, like a gateway) and a *sink* (the receiving
client). The relay accepts two TLS 1.3 connections with client certificates
(both ways verified against one throw-away CA made with
:mod:`gateway.pki.dev`); each announces its role with one byte. Everything
the source writes, the relay cuts into frames and writes to the sink, one
``send_all`` per receive (batched writes). No policy, no storage, no HTTP, no
JSON: what is left is what Python, trio and TLS cost on this machine for the
same bytes, twice over the loopback.

A frame is ``u32 length || envelope id (22 ASCII bytes) || encoded envelope``:
the id in front lets the sink check exactly-once without parsing JSON. The
source writes frames in batches of up to :data:`WRITE_BATCH_BYTES`. The sink
counts every id and fails if one is missing, unknown or seen twice.

The relay is ``python -m gateway.bench.floor --cert ... --key ... --ca ...``;
it prints its port on stdout once it listens, relays one source to one sink
and exits when the source closes.
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import trio

from gateway.pki import dev
from gateway.pki.tls import federation_client_context, federation_server_context

LOOPBACK: Final = "127.0.0.1"
RELAY_NAME: Final = "relay.floor.example"
ROLE_SOURCE: Final = b"S"
ROLE_SINK: Final = b"D"
ID_BYTES: Final = 22  # an envelope id: 16 random bytes in unpadded base64url
WRITE_BATCH_BYTES: Final = 256 * 1024  # one send_all of the source, at most
RECEIVE_BYTES: Final = 256 * 1024  # one receive_some, at most
MAX_FRAME_BYTES: Final = 2 * 1024 * 1024  # an envelope is at most 1 MiB; anything bigger is a bug
RELAY_START_TIMEOUT: Final = 30.0
FLOOR_TIMEOUT: Final = 600.0  # the whole floor run, an upper bound
_U32: Final = struct.Struct(">I")


class FloorError(Exception):
    """The floor run failed: a relay that did not start, or envelopes lost or doubled."""


@dataclass(frozen=True, slots=True)
class FloorResult:
    envelopes: int
    payload_bytes: int  # the frames' envelope bytes, in total
    seconds: float  # first write of the source to the last frame at the sink
    missing: int
    duplicates: int

    @property
    def exactly_once(self) -> bool:
        return self.missing == 0 and self.duplicates == 0

    @property
    def envelopes_per_s(self) -> float:
        return self.envelopes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class FloorPKI:
    ca: Path
    cert: Path
    key: Path


def make_pki(directory: Path) -> FloorPKI:
    """One CA and one certificate (serverAuth + clientAuth) used by all three parties."""
    now = datetime.now(UTC)
    ca = dev.issue_ca("floor.example", now=now, validity_days=2)
    leaf = dev.issue_gateway_cert(ca, RELAY_NAME, now=now, validity_days=1)
    pki = FloorPKI(directory / "ca.pem", directory / "floor.pem", directory / "floor.key")
    dev.write_file(pki.ca, ca.cert_pem(), mode=0o644, replace=True)
    dev.write_file(pki.cert, leaf.cert_pem(), mode=0o644, replace=True)
    dev.write_file(pki.key, leaf.key_pem(), mode=0o600, replace=True)
    return pki


def frame(envelope_id: str, data: bytes) -> bytes:
    body = envelope_id.encode("ascii") + data
    return _U32.pack(len(body)) + body


class FrameReader:
    """Cuts a byte stream into frames; keeps the incomplete tail for the next chunk."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes | bytearray) -> tuple[bytes, list[bytes]]:
        """(the bytes of every whole frame in order, each whole frame's body)."""
        self._buffer += chunk
        bodies: list[bytes] = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= _U32.size:
            (length,) = _U32.unpack_from(buffer, offset)
            if length > MAX_FRAME_BYTES:
                raise FloorError(f"a frame of {length} bytes: the stream is garbled")
            end = offset + _U32.size + length
            if end > len(buffer):
                break
            bodies.append(bytes(buffer[offset + _U32.size : end]))
            offset = end
        whole = bytes(buffer[:offset])
        del buffer[:offset]
        return whole, bodies

    @property
    def pending(self) -> int:
        return len(self._buffer)


# -- the relay (its own process) ------------------------------------------------------


async def _relay(pki: FloorPKI, task_status: trio.TaskStatus[int]) -> None:
    context = federation_server_context(
        cert_file=pki.cert, key_file=pki.key, trusted_ca_pems=[pki.ca.read_bytes()]
    )
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    streams: dict[bytes, trio.SSLStream[trio.SocketStream]] = {}
    task_status.started(port)
    while len(streams) < 2:
        raw = await listeners[0].accept()
        stream = trio.SSLStream(raw, context, server_side=True)
        role = bytes(await stream.receive_some(1))
        if role not in (ROLE_SOURCE, ROLE_SINK) or role in streams:
            await stream.aclose()
            continue
        streams[role] = stream
    for listener in listeners:
        await listener.aclose()
    source, sink = streams[ROLE_SOURCE], streams[ROLE_SINK]
    reader = FrameReader()
    while True:
        chunk = await source.receive_some(RECEIVE_BYTES)
        if not chunk:
            break
        # A relay that forwards whole frames, as a router would; not a byte pipe.
        whole, _bodies = reader.feed(chunk)
        if whole:
            await sink.send_all(whole)
    await sink.aclose()
    await source.aclose()


def relay_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.floor")
    parser.add_argument("--ca", required=True, type=Path)
    parser.add_argument("--cert", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    args = parser.parse_args(argv)
    pki = FloorPKI(args.ca, args.cert, args.key)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_relay, pki)
            print(port, flush=True)

    trio.run(main)
    return 0


# -- the two clients (in the bench's process) ------------------------------------------


async def _connect(pki: FloorPKI, port: int, role: bytes) -> trio.SSLStream[trio.SocketStream]:
    context = federation_client_context(
        cert_file=pki.cert, key_file=pki.key, peer_ca_pem=pki.ca.read_bytes()
    )
    raw = await trio.open_tcp_stream(LOOPBACK, port)
    stream = trio.SSLStream(raw, context, server_hostname=RELAY_NAME)
    await stream.do_handshake()
    await stream.send_all(role)
    return stream


async def _run_clients(pki: FloorPKI, port: int, items: Sequence[tuple[str, bytes]]) -> FloorResult:
    sink = await _connect(pki, port, ROLE_SINK)
    source = await _connect(pki, port, ROLE_SOURCE)
    expected = {envelope_id for envelope_id, _ in items}
    frames = [frame(envelope_id, data) for envelope_id, data in items]
    payload = sum(len(data) for _, data in items)
    seen: set[str] = set()
    duplicates = 0
    unknown = 0
    started = 0.0
    last = 0.0

    async def send() -> None:
        nonlocal started
        started = time.perf_counter()
        batch: list[bytes] = []
        size = 0
        for one in frames:
            batch.append(one)
            size += len(one)
            if size >= WRITE_BATCH_BYTES:
                await source.send_all(b"".join(batch))
                batch, size = [], 0
        if batch:
            await source.send_all(b"".join(batch))
        await source.aclose()

    async def receive() -> None:
        nonlocal duplicates, unknown, last
        reader = FrameReader()
        while True:
            chunk = await sink.receive_some(RECEIVE_BYTES)
            if not chunk:
                break
            _whole, bodies = reader.feed(chunk)
            for body in bodies:
                envelope_id = body[:ID_BYTES].decode("ascii")
                if envelope_id in seen:
                    duplicates += 1
                elif envelope_id not in expected:
                    unknown += 1
                else:
                    seen.add(envelope_id)
            if bodies:
                last = time.perf_counter()
        if reader.pending:
            raise FloorError(f"the relay's stream ended inside a frame ({reader.pending} bytes)")
        await sink.aclose()

    with trio.fail_after(FLOOR_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(send)
    return FloorResult(
        envelopes=len(items),
        payload_bytes=payload,
        seconds=max(0.0, last - started),
        missing=len(expected - seen),
        duplicates=duplicates + unknown,
    )


def run_floor(items: Sequence[tuple[str, bytes]], *, workdir: Path | None = None) -> FloorResult:
    """Relay ``items`` (envelope id, encoded envelope) source -> relay -> sink; time it."""
    with tempfile.TemporaryDirectory(prefix="gateway-floor-", dir=workdir) as tmp:
        pki = make_pki(Path(tmp))
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.bench.floor",
                "--ca",
                str(pki.ca),
                "--cert",
                str(pki.cert),
                "--key",
                str(pki.key),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert relay.stdout is not None
            line = relay.stdout.readline().strip()
            if not line.isdigit():
                raise FloorError(f"the floor's relay did not start (it said {line!r})")
            result = trio.run(_run_clients, pki, int(line), items)
            relay.wait(RELAY_START_TIMEOUT)
            return result
        finally:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
            if relay.stdout is not None:
                relay.stdout.close()


if __name__ == "__main__":
    sys.exit(relay_main())
