"""Can a peer tell a segmented user from one who does not exist by the answer's timing?

    .venv/bin/python benchmarks/segmentation_timing.py [--rounds 20000]

Measures, on the shipped ``federation_rules/segmented.yaml`` and in-process
(no network: the floor of what a peer could observe, since TLS and the network
only add noise), the time acme's gateway spends on:

* ``GET /federation/v1/keys/{user}`` (``KeyDirectory.get_keys`` on a real
  SQLite store) for a user the peer may see (200), a user the peer may see who
  never published (404), a segmented user who published keys (404), and a name
  in no group (404);
* judging one envelope of a transaction (``judge_transaction``) addressed to
  a user the peer may reach, a segmented user, and a name in no group.

The four kinds of name are asked in an interleaved order, round after round,
so drift of the machine hits them alike. It prints the median and the 10th and
90th percentiles per kind, and the difference of medians between the segmented
user and the name in no group; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from gateway.core.address import Address
from gateway.core.envelope import Envelope, new_envelope_id
from gateway.core.rules import CompiledRules, load_rules
from gateway.federation.keys import KeyDirectory
from gateway.federation.protocol import KEYS_PATH, decode_transaction, encode_transaction
from gateway.federation.receiver import judge_transaction
from gateway.http import Request
from gateway.storage.sqlite import open_sqlite_storage

ACME, GLOBEX = "acme.example", "globex.example"
# The shipped example the finding was made with: engineering (alice, bob) hears
# globex, legal (carol) federates with nobody.
RULES = Path(__file__).resolve().parent.parent / "federation_rules" / "segmented.yaml"
KINDS = {
    "visible, published (200)": "alice",
    "visible, not published (404)": "bob",
    "segmented, published (404)": "carol",
    "in no group (404)": "ghost",
}


def _rules() -> CompiledRules:
    return CompiledRules(load_rules(RULES.read_bytes(), filename=RULES.name))


class _Holder:
    def __init__(self, rules: CompiledRules) -> None:
        self.current = rules


def _report(title: str, samples: dict[str, list[float]], a: str, b: str) -> None:
    print(title)
    for kind, values in samples.items():
        ordered = sorted(values)
        p10, p90 = ordered[len(ordered) // 10], ordered[len(ordered) * 9 // 10]
        print(
            f"  {kind:32} median {statistics.median(values):8.2f} us"
            f"   p10 {p10:8.2f}   p90 {p90:8.2f}"
        )
    diff = statistics.median(samples[a]) - statistics.median(samples[b])
    print(f"  median({a}) - median({b}) = {diff:+.2f} us")


async def _keys(rules: CompiledRules, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_sqlite_storage(Path(tmp) / "gateway.sqlite3") as store:
            record = b'{"record":"' + b"k" * 400 + b'"}'
            for user in ("alice", "carol"):
                await store.user_keys_put(f"{user}@{ACME}", record, at_ms=1)
            directory = KeyDirectory(org=ACME, rules=_Holder(rules), storage=store)
            samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for _ in range(rounds):
                for kind, user in KINDS.items():
                    request = Request("GET", KEYS_PATH + user, peer=GLOBEX)
                    start = time.perf_counter()
                    await directory.get_keys(request, {"user": user})
                    samples[kind].append((time.perf_counter() - start) * 1e6)
    _report(
        "GET /federation/v1/keys/{user}, handler time on SQLite",
        samples,
        "segmented, published (404)",
        "in no group (404)",
    )


def _judge(rules: CompiledRules, rounds: int) -> None:
    now = 1_700_000_000_000
    kinds = {"reachable": "alice", "segmented": "carol", "in no group": "ghost"}
    bodies = {}
    for kind, user in kinds.items():
        envelope = Envelope(
            version=1,
            id=new_envelope_id(),
            sender=Address.parse(f"x@{GLOBEX}"),
            recipient=Address.of(user, ACME),
            created=now - 1000,
            expires=now + 86_400_000,
            burn_on_read=False,
            ciphertext=b"\x01" * 1024,
            signature=b"\x02" * 64,
            group=None,
        )
        bodies[kind] = decode_transaction(encode_transaction(GLOBEX, ACME, [envelope]))
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, txn in bodies.items():
            start = time.perf_counter()
            judge_transaction(txn, rules, now_ms=now)
            samples[kind].append((time.perf_counter() - start) * 1e6)
    _report("judging one envelope of a transaction", samples, "segmented", "in no group")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args()
    rules = _rules()
    trio.run(_keys, rules, args.rounds)
    _judge(rules, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
