"""Benchmark of the federation rules: load+validate time and the median cost of a decision.

    .venv/bin/python benchmarks/rules_bench.py     # 10,000 groups, 1,000 peers, 100,000 members
    .venv/bin/python benchmarks/rules_bench.py --groups 100 --peers 10 --members 1000

It generates one rules file (every peer with its own inline CA certificate,
minted here; the CA keys are thrown away), loads and validates it the way the
gateway does (``load_rules`` from bytes, then ``CompiledRules``), and times
random outbound and inbound decisions in batches. It prints the figures; it
asserts nothing (targets: load+validate < 2 s, median decision < 5 us).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import random
import statistics
import sys
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from gateway.core.address import Address
from gateway.core.keytext import format_signing_key
from gateway.core.rules import CompiledRules, load_rules

ORG = "acme.example"
BATCH = 200  # decisions per timed batch: perf_counter's own cost is spread over them
REPEAT = 3  # loads timed; the median is reported


def _ca_pem(org: str, key: ed25519.Ed25519PrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{org} federation CA")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def generate_rules(*, groups: int, peers: int, members: int, seed: int = 1) -> str:
    """A valid rules file of the given size; every group reaches a few peers."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible file, not a secret
    lines = ["version: 1", f"org: {ORG}", "default: deny", "peers:" if peers else "peers: {}"]
    for p in range(peers):
        org = f"peer{p}.example"
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        pin = "sha256/" + base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii")
        lines += [
            f"  {org}:",
            f"    endpoint: https://gw.{org}:8443",
            "    ca_pem: |",
            *(f"      {line}" for line in _ca_pem(org, key).splitlines()),
            f"    pins: [{pin}]",
            f"    signing_key: {format_signing_key(raw)}",
        ]
    lines.append("groups:" if groups else "groups: {}")
    per_group, extra = divmod(members, groups) if groups else (0, 0)
    user = 0
    for g in range(groups):
        count = per_group + (1 if g < extra else 0)
        names = ", ".join(f"user{user + i}" for i in range(count))
        user += count
        lines += [f"  group{g}:", f"    members: [{names}]"]
        if peers:
            targets = sorted({f"peer{rng.randrange(peers)}.example" for _ in range(3)})
            sources = sorted(
                {f"peer{rng.randrange(peers)}.example" for _ in range(2)}
                | {f"peer{rng.randrange(peers)}.example/partners"}
            )
            lines.append(f"    send_to: [{', '.join(targets)}]")
            lines.append(f"    receive_from: [{', '.join(sources)}]")
        if g % 2 == 0:
            lines += [
                "    limits:",
                "      max_envelope_bytes: 65536",
                "      ttl: {min: 1m, default: 1d, max: 7d}",
                "      burn_on_read: optional",
            ]
    return "\n".join(lines) + "\n"


def _median_per_decision(decide: Callable[..., object], cases: list[tuple[object, ...]]) -> float:
    samples = []
    for start in range(0, len(cases) - BATCH + 1, BATCH):
        batch = cases[start : start + BATCH]
        t0 = time.perf_counter()
        for case in batch:
            decide(*case)
        samples.append((time.perf_counter() - t0) / len(batch))
    return statistics.median(samples)


def run(
    *, groups: int, peers: int, members: int, decisions: int, repeat: int = REPEAT
) -> dict[str, float]:
    text = generate_rules(groups=groups, peers=peers, members=members).encode()
    loads, compiles = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        rules = load_rules(text, filename="bench.yaml")
        t1 = time.perf_counter()
        compiled = CompiledRules(rules)
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        compiles.append(t2 - t1)

    # Half the questions are about a peer the sender's group may reach (allowed),
    # half about a random peer (mostly denied): both paths are timed.
    rng = random.Random(2)  # noqa: S311 - reproducible questions
    users = [Address(user, ORG) for group in rules.groups.values() for user in group.members]
    users = users or [Address("nobody", ORG)]
    peer_orgs = list(rules.peers) or ["nobody.example"]

    def reachable(user: Address, inbound: bool) -> str:
        group = compiled.group_of(user.user)
        refs = (group.receive_from if inbound else group.send_to) if group is not None else ()
        if refs and rng.random() < 0.5:
            return rng.choice(refs).peer
        return rng.choice(peer_orgs)

    outbound = []
    for _ in range(decisions):
        sender = rng.choice(users)
        outbound.append((sender, Address("bob", reachable(sender, False))))
    inbound = []
    for _ in range(decisions):
        recipient = rng.choice(users)
        origin = reachable(recipient, True)
        inbound.append((origin, Address("bob", origin), recipient))

    def out(sender: Address, recipient: Address) -> object:
        return compiled.decide_outbound(
            sender, recipient, size=1000, ttl_seconds=3600, burn_on_read=False
        )

    def into(origin: str, sender: Address, recipient: Address) -> object:
        return compiled.decide_inbound(
            origin,
            sender,
            recipient,
            asserted_group="partners",
            size=1000,
            ttl_seconds=3600,
            burn_on_read=False,
        )

    return {
        "bytes": float(len(text)),
        "load_validate_s": statistics.median(loads),
        "compile_s": statistics.median(compiles),
        "outbound_median_us": _median_per_decision(out, list(outbound)) * 1e6,
        "inbound_median_us": _median_per_decision(into, list(inbound)) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--peers", type=int, default=1_000)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=REPEAT, help="loads to time (median)")
    args = parser.parse_args(argv)
    if min(args.groups, args.peers, args.members) < 0 or args.decisions < BATCH:
        parser.error(f"sizes must be >= 0 and --decisions >= {BATCH}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.members and not args.groups:
        parser.error("members need at least one group")
    figures = run(
        groups=args.groups,
        peers=args.peers,
        members=args.members,
        decisions=args.decisions,
        repeat=args.repeat,
    )
    print(
        f"rules: {args.groups} groups, {args.peers} peers, {args.members} members "
        f"({figures['bytes'] / 1e6:.1f} MB of YAML)"
    )
    print(f"load+validate: {figures['load_validate_s']:.3f} s (median of {args.repeat})")
    print(f"compile:       {figures['compile_s']:.3f} s")
    print(
        f"load+validate+compile: {figures['load_validate_s'] + figures['compile_s']:.3f} s "
        "(target < 2 s)"
    )
    print(f"outbound decision, median: {figures['outbound_median_us']:.2f} us (target < 5 us)")
    print(f"inbound decision, median:  {figures['inbound_median_us']:.2f} us (target < 5 us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
