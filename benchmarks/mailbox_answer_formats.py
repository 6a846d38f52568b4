"""CPU per envelope of a mailbox answer, JSON against the binary answer (docs/performance.md).

In process, ``time.process_time``, best of 5 runs of 0.3 s each, for answers
of 100 envelopes (the default ``limit``) and 500 (the bench's): the gateway's
building of the answer body from the stored bytes
(:func:`gateway.clientapi.fetch_answer.mailbox_answer`: the JSON splice, or
the frame; and the JSON splice as ``get_mailbox`` wrote it before, three
concatenations), and the reference client's reading of it into envelopes
(``ClientSession.fetch``'s reader on an ``httpx.Response`` made from a fresh
copy of the body, as httpx's read makes one: ``Response.json()`` and
``Envelope.from_json`` per element; or the frame split and each record read
with the ciphertext cut, then ``Envelope.from_json``). The storage read and
the HTTP exchange, the same for both, are not in it.

Each figure is measured in a fresh process (this script run with ``--one``):
measured one after another in one process, the allocator's state left by one
measurement (glibc's mmap and trim thresholds move with the large blocks a
6 MiB answer frees) changed the page faults, and so the CPU, of the next by
up to 2x. Page faults are counted in: a process that allocates and frees a
large answer per fetch pays them.
Run: ``.venv/bin/python benchmarks/mailbox_answer_formats.py``.
"""

from __future__ import annotations

import functools
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from gateway.client.api import _read_mailbox_answer
from gateway.clientapi.fetch_answer import mailbox_answer
from gateway.core.address import Address
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1
from gateway.core.envelope import Envelope, encode_envelope, new_envelope_id

JSON = "application/json"


def stored_envelope(size: int) -> bytes:
    """An envelope's bytes as a mailbox keeps them: canonical, with the sender's group."""
    return encode_envelope(
        Envelope(
            version=1,
            id=new_envelope_id(),
            sender=Address.parse("alice@acme.example"),
            recipient=Address.parse("bob@globex.example"),
            created=1_800_000_000_000,
            expires=1_800_003_600_000,
            burn_on_read=False,
            ciphertext=secrets.token_bytes(size),
            signature=secrets.token_bytes(64),
            group="engineering",
        )
    )


def build(media_type: str, stored: list[bytes]) -> bytes:
    return mailbox_answer(media_type, stored).body


def build_json_before(stored: list[bytes]) -> bytes:
    """The JSON answer as get_mailbox built it before this round (the same bytes)."""
    return b'{"envelopes":[' + b",".join(stored) + b"]}"


def read(body: bytearray, media_type: str, limit: int) -> list[Envelope]:
    # The body is copied once, as httpx's read of an answer joins its chunks: the
    # allocator then sees the large block come and go per fetch, as in a client.
    answer = httpx.Response(200, content=bytes(body), headers={"content-type": media_type})
    return _read_mailbox_answer(answer, limit=limit)


def per_envelope_us(fn: Callable[[], Any], count: int) -> float:
    best = float("inf")
    for _ in range(5):
        runs, start = 0, time.process_time()
        while (spent := time.process_time() - start) < 0.3 or runs < 3:
            fn()
            runs += 1
        best = min(best, spent / runs / count * 1e6)
    return best


WHAT = ("gateway_json_before", "gateway_json", "gateway_binary", "client_json", "client_binary")


def one(size: int, count: int, what: str) -> float:
    """µs of CPU per envelope for ``what``, on an answer of ``count`` envelopes of ``size``."""
    stored = [stored_envelope(size) for _ in range(count)]
    if what == "gateway_json_before":
        assert build_json_before(stored) == build(JSON, stored)
        return per_envelope_us(functools.partial(build_json_before, stored), count)
    side, _, form = what.partition("_")
    media_type = JSON if form == "json" else MEDIA_TYPE_BATCH_V1
    if side == "gateway":
        return per_envelope_us(functools.partial(build, media_type, stored), count)
    body = bytearray(build(media_type, stored))
    got = read(body, media_type, count)
    assert [encode_envelope(e) for e in got] == stored  # the same envelopes, in order
    return per_envelope_us(functools.partial(read, body, media_type, count), count)


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        size, count, what = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        print(one(size, count, what))
        return
    print(
        "ciphertext answer | gateway json-before  json  binary (µs/env)"
        " | client json  binary (µs/env)"
    )
    for size in (1024, 65536):
        for count in (100, 500):
            figures = [
                float(
                    subprocess.run(
                        [sys.executable, __file__, "--one", str(size), str(count), what],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                )
                for what in WHAT
            ]
            print(
                f"{size:>10} {count:>6} | {figures[0]:19.2f} {figures[1]:5.2f} {figures[2]:7.2f}"
                f"          | {figures[3]:11.1f} {figures[4]:7.1f}"
            )


if __name__ == "__main__":
    main()
