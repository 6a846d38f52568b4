"""CPU per envelope of a client batch, JSON against the binary batch (docs/performance.md).

In process, ``time.process_time``, best of 5 runs of 0.3 s each: the gateway's
handling of a batch body up to the bytes it stores (the JSON body parsed, each
element judged and encoded with the group; or the frame split, each record
read, judged, checked canonical and the group spliced in), and the client's
encoding of the body. The checks both formats share (rules, storage) are not
in it. Run: ``.venv/bin/python benchmarks/client_batch_formats.py``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from gateway.clientapi.batch_body import element_item, record_item
from gateway.clientapi.outcomes import Submitted
from gateway.clientapi.request_parsing import object_body
from gateway.core.address import Address
from gateway.core.batchframe import decode_batch, encode_batch
from gateway.core.envelope import (
    Envelope,
    encode_envelope,
    encode_validated,
    new_envelope_id,
    with_group_member,
)

GROUP = "engineering"


def envelope(size: int) -> Envelope:
    return Envelope(
        version=1,
        id=new_envelope_id(),
        sender=Address.parse("alice@acme.example"),
        recipient=Address.parse("bob@globex.example"),
        created=1_800_000_000_000,
        expires=1_800_003_600_000,
        burn_on_read=False,
        ciphertext=secrets.token_bytes(size),
        signature=secrets.token_bytes(64),
    )


def gateway_json(body: bytes) -> list[bytes]:
    stored = []
    for element in object_body(body, "batch", {"envelopes"})["envelopes"]:  # type: ignore[union-attr]
        item = element_item(element)
        assert isinstance(item, Submitted)
        assert item.raw is not None
        stored.append(encode_validated(item.raw, GROUP))
    return stored


def gateway_binary(body: bytes) -> list[bytes]:
    stored = []
    for index, record in enumerate(decode_batch(body, max_envelopes=256), 1):
        item = record_item(index, record)
        assert isinstance(item, Submitted)
        assert item.data is not None
        stored.append(with_group_member(item.data, item.env.group, GROUP))
    return stored


def client_json(envelopes: list[Envelope]) -> bytes:
    return b'{"envelopes":[' + b",".join(map(encode_envelope, envelopes)) + b"]}"


def client_binary(envelopes: list[Envelope]) -> bytes:
    return encode_batch([encode_envelope(e) for e in envelopes])


def per_envelope_us(fn: Callable[[Any], object], arg: object, count: int) -> float:
    best = float("inf")
    for _ in range(5):
        runs, start = 0, time.process_time()
        while (spent := time.process_time() - start) < 0.3 or runs < 3:
            fn(arg)
            runs += 1
        best = min(best, spent / runs / count * 1e6)
    return best


def main() -> None:
    print("ciphertext batch | gateway json  binary (µs/env) | client json  binary (µs/env)")
    for size in (1024, 65536):
        for count in (64, 256):
            envelopes = [envelope(size) for _ in range(count)]
            json_body, binary_body = client_json(envelopes), client_binary(envelopes)
            assert gateway_json(json_body) == gateway_binary(binary_body)
            figures = (
                per_envelope_us(gateway_json, json_body, count),
                per_envelope_us(gateway_binary, binary_body, count),
                per_envelope_us(client_json, envelopes, count),
                per_envelope_us(client_binary, envelopes, count),
            )
            print(
                f"{size:>10} {count:>5} | {figures[0]:12.1f} {figures[1]:7.1f}"
                f"          | {figures[2]:11.1f} {figures[3]:7.1f}"
            )


if __name__ == "__main__":
    main()
