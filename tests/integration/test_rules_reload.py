"""Hot reload: a bad file keeps the rules in force, a good one takes effect for the next
decision, dropped peers are announced, and the file watcher and SIGHUP trigger reloads."""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import yaml
from prometheus_client import REGISTRY

from gateway.core.address import Address
from gateway.errors import Reason, RulesError
from gateway.rules_runtime import RulesHolder, watch_rules_file, watch_sighup

EXAMPLES = Path(__file__).resolve().parents[2] / "federation_rules"
_mtimes = itertools.count(1_700_000_000_000_000_000, 1_000_000_000)


def example_peer(org: str) -> dict[str, str]:
    data = yaml.safe_load((EXAMPLES / "open-to-all.yaml").read_text())
    return data["peers"][org]  # type: ignore[no-any-return]


def rules_text(
    *,
    peers: tuple[str, ...] = ("globex.example", "initech.example"),
    send_to: tuple[str, ...] = ("globex.example",),
) -> str:
    lines = ["version: 1", "org: acme.example", "default: deny", "peers:"]
    for org in peers:
        lines += [
            f"  {org}:",
            f"    endpoint: https://gw.{org}",
            f"    ca: certs/{org}.pem",
            f"    signing_key: {example_peer(org)['signing_key']}",
        ]
    lines += [
        "groups:",
        "  engineering:",
        "    members: [alice]",
        f"    send_to: [{', '.join(send_to)}]",
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    """Write, and give the file a fresh mtime: the watcher must see every write."""
    path.write_text(text)
    stamp = next(_mtimes)
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    certs = tmp_path / "certs"
    certs.mkdir()
    for org in ("globex.example", "initech.example"):
        write(certs / f"{org}.pem", example_peer(org)["ca_pem"])
    path = tmp_path / "rules.yaml"
    write(path, rules_text())
    return path


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_rules_reloads_total", {"result": result}) or 0.0


def may_send(holder: RulesHolder, peer: str) -> bool:
    decision = holder.current.decide_outbound(
        Address("alice", "acme.example"),
        Address("bob", peer),
        size=10,
        ttl_seconds=3600,
        burn_on_read=False,
    )
    return decision.allowed


async def wait_for(predicate: Callable[[], bool], *, step: float = 1.0) -> None:
    # Reloads run in a worker thread, so virtual time may pass while one runs:
    # wait for the outcome, not for a time.
    for _ in range(100_000):
        if predicate():
            return
        await trio.sleep(step)
    raise AssertionError("condition never became true")


def test_initial_load_records_and_counts(rules_file: Path) -> None:
    before = reloads("success")
    holder = RulesHolder.load(rules_file, wall_clock=lambda: 1234.5)
    assert reloads("success") == before + 1
    assert REGISTRY.get_sample_value("gateway_rules_loaded_timestamp_seconds") == 1234.5
    (record,) = holder.history
    assert (record.trigger, record.ok, record.at) == ("initial", True, 1234.5)
    assert record.sha256 == holder.sha256
    assert len(record.sha256) == 64
    assert record.summary == "1 group, 1 member, 2 peers"
    assert holder.watched_files == (
        str(rules_file),
        str(rules_file.parent / "certs/globex.example.pem"),
        str(rules_file.parent / "certs/initech.example.pem"),
    )


def test_initial_load_of_a_bad_file_raises_and_counts(rules_file: Path) -> None:
    write(rules_file, rules_text().replace("members: [alice]", "members: alice"))
    before = reloads("failure")
    with pytest.raises(RulesError) as info:
        RulesHolder.load(rules_file)
    assert info.value.issues == [
        f"{rules_file}:15:14: groups.engineering.members: expected members (a list), "
        "got string 'alice'"
    ]
    assert reloads("failure") == before + 1


async def test_broken_file_keeps_the_rules_in_force(
    rules_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = RulesHolder.load(rules_file)
    in_force, sha = holder.current, holder.sha256
    write(rules_file, rules_text(send_to=("initech.example", "umbrella.example")))
    failures = reloads("failure")
    with caplog.at_level(logging.ERROR, logger="gateway.rules"):
        record = await holder.reload(trigger="manual")
    assert record is not None
    assert not record.ok
    assert reloads("failure") == failures + 1
    assert holder.current is in_force
    assert holder.sha256 == sha
    assert may_send(holder, "globex.example")
    assert not may_send(holder, "initech.example")
    issue = (
        f"{rules_file}:16:32: groups.engineering.send_to[1]: peer umbrella.example is not "
        "defined in peers"
    )
    assert record.issues == (issue,)
    assert record.summary == issue
    assert record.sha256 is not None
    assert record.sha256 != sha
    assert issue in caplog.messages
    assert holder.history[-1] is record


async def test_valid_file_takes_effect_for_the_next_decision(rules_file: Path) -> None:
    holder = RulesHolder.load(rules_file)
    assert not may_send(holder, "initech.example")
    successes = reloads("success")
    write(rules_file, rules_text(send_to=("initech.example",)))
    record = await holder.reload()
    assert record is not None
    assert record.ok
    assert record.trigger == "manual"
    assert reloads("success") == successes + 1
    assert may_send(holder, "initech.example")
    assert not may_send(holder, "globex.example")
    assert holder.sha256 == record.sha256 != holder.history[0].sha256


async def test_dropped_peers_are_announced(rules_file: Path) -> None:
    holder = RulesHolder.load(rules_file)
    heard: list[frozenset[str]] = []
    unsubscribe = holder.subscribe(heard.append)
    # A change that drops no peer is announced with nobody dropped (the listener
    # still rebuilds its trust: an added peer's CA must be in it).
    write(rules_file, rules_text(send_to=("initech.example",)))
    await holder.reload()
    assert heard == [frozenset()]
    # Removing a peer: announced; its connections are to be closed.
    write(rules_file, rules_text(peers=("globex.example",)))
    record = await holder.reload()
    assert heard[-1] == frozenset({"initech.example"})
    assert record is not None
    assert record.dropped_peers == ("initech.example",)
    assert holder.current.peer("initech.example") is None
    # A peer now trusted through another CA: announced too.
    write(rules_file.parent / "certs/globex.example.pem", example_peer("initech.example")["ca_pem"])
    await holder.reload()
    assert heard[-1] == frozenset({"globex.example"})
    unsubscribe()
    write(rules_file, rules_text(peers=("initech.example",), send_to=("initech.example",)))
    await holder.reload()
    assert len(heard) == 3


async def test_a_failing_subscriber_does_not_stop_the_swap(rules_file: Path) -> None:
    holder = RulesHolder.load(rules_file)

    def broken(_peers: frozenset[str]) -> None:
        raise RuntimeError("boom")

    heard: list[frozenset[str]] = []
    holder.subscribe(broken)
    holder.subscribe(heard.append)
    write(rules_file, rules_text(peers=("globex.example",)))
    record = await holder.reload()
    assert record is not None
    assert record.ok
    assert heard == [frozenset({"initech.example"})]


async def test_history_is_bounded(rules_file: Path) -> None:
    holder = RulesHolder.load(rules_file, history_size=3)
    for _ in range(5):
        await holder.reload()
    assert len(holder.history) == 3


async def test_watcher_reloads_on_change(rules_file: Path, autojump_clock: trio.abc.Clock) -> None:
    holder = RulesHolder.load(rules_file)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: watch_rules_file(holder, poll_interval=2.0, task_status=task_status)
        )
        # A good change takes effect.
        write(rules_file, rules_text(send_to=("initech.example",)))
        await wait_for(lambda: len(holder.history) == 2)
        assert holder.history[-1].trigger == "file"
        assert holder.history[-1].ok
        assert may_send(holder, "initech.example")

        # A bad change is recorded once, however many polls follow, and changes nothing.
        write(rules_file, "version: [\n")
        await wait_for(lambda: len(holder.history) == 3)
        assert not holder.history[-1].ok
        await trio.sleep(60)
        assert len(holder.history) == 3
        assert may_send(holder, "initech.example")

        # The same bytes written again (a new mtime) are no reload either.
        write(rules_file, "version: [\n")
        await trio.sleep(60)
        assert len(holder.history) == 3

        # A change of a CA file alone is seen too.
        write(rules_file, rules_text())
        await wait_for(lambda: len(holder.history) == 4)
        write(
            rules_file.parent / "certs/initech.example.pem",
            example_peer("globex.example")["ca_pem"],
        )
        await wait_for(lambda: len(holder.history) == 5)
        assert holder.history[-1].ok
        assert holder.current.peer("initech.example").ca_sha256 == (  # type: ignore[union-attr]
            holder.current.peer("globex.example").ca_sha256  # type: ignore[union-attr]
        )
        nursery.cancel_scope.cancel()


async def test_watcher_tolerates_a_missing_file(
    rules_file: Path, autojump_clock: trio.abc.Clock
) -> None:
    holder = RulesHolder.load(rules_file)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: watch_rules_file(holder, poll_interval=1.0, task_status=task_status)
        )
        rules_file.unlink()
        await wait_for(lambda: len(holder.history) == 2)
        record = holder.history[-1]
        assert not record.ok
        assert record.sha256 is None
        assert "cannot read the rules file" in record.summary
        assert may_send(holder, "globex.example")
        write(rules_file, rules_text(send_to=("initech.example",)))
        await wait_for(lambda: len(holder.history) == 3)
        assert holder.history[-1].ok
        assert may_send(holder, "initech.example")
        nursery.cancel_scope.cancel()


async def test_sighup_reloads(rules_file: Path, autojump_clock: trio.abc.Clock) -> None:
    holder = RulesHolder.load(rules_file)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_sighup, holder)
        write(rules_file, rules_text(send_to=("initech.example",)))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: len(holder.history) == 2)
        assert holder.history[-1].trigger == "sighup"
        assert may_send(holder, "initech.example")
        # SIGHUP reloads even when nothing changed: the admin asked for it.
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: len(holder.history) == 3)
        assert holder.history[-1].sha256 == holder.history[-2].sha256
        nursery.cancel_scope.cancel()


async def test_watcher_rejects_a_bad_interval(rules_file: Path) -> None:
    holder = RulesHolder.load(rules_file)
    with pytest.raises(ValueError, match="positive"):
        await watch_rules_file(holder, poll_interval=0)


def test_decisions_read_one_reference(rules_file: Path) -> None:
    holder = RulesHolder.load(rules_file)
    rules = holder.current
    decision = rules.decide_outbound(
        Address("alice", "acme.example"),
        Address("bob", "initech.example"),
        size=1,
        ttl_seconds=3600,
        burn_on_read=False,
    )
    assert decision.reason is Reason.PEER_NOT_ALLOWED
