"""Nodes and leases: the values both storage engines trade in, and the rule of a claim.

Several gateway nodes of one org share one database (PostgreSQL). Work that
must have one driver at a time (a peer's sender lane, the sweepers) is held
under a **lease**: one row per name, owned by one node *incarnation* (a
random id each process draws at start, so a node restarted under the same
name is a new owner, and a stale process can never pass for a live one) until
``until_ms``. Every grant to a new owner increases the lease's ``epoch``; a
renewal by the same owner keeps it. The ``(name, incarnation, epoch)`` of a
lease is its **fencing token**: a write made under a lease (a lane recording
its peer's answers) carries it and is refused, in the same database
transaction, with :class:`LeaseLostError` if the lease has been granted to
anyone since. A node that paused past its lease therefore cannot complete
envelopes the lane's new owner is driving.

A single SQLite node keeps the same tables and takes every lease itself, so
both engines run one code path (:mod:`gateway.cluster`).

Times are Unix ms from each node's clock: nodes' clocks must agree to well
within a lease (NTP); PostgreSQL records each node's offset from the database
server's clock at every beat, and ``gateway nodes`` shows it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gateway.core.address import MAX_DOMAIN_LENGTH
from gateway.errors import StorageError
from gateway.storage.base import check_batch, check_count, check_ms, check_text

MAX_NODE_LENGTH: Final = 63  # gateway.config.validate_node_name
MAX_INCARNATION_LENGTH: Final = 64
MAX_VERSION_LENGTH: Final = 64
MAX_LEASE_NAME_LENGTH: Final = 8 + MAX_DOMAIN_LENGTH
LANE_PREFIX: Final = "lane:"
#: The lease of the org's sweepers (expiry, pruning, the archive's deletions).
SWEEPER_LEASE: Final = "sweeper"
MAX_LEASES_PER_CALL: Final = 10_000


class LeaseLostError(StorageError):
    """A write under a lease that has been granted to another owner since: nothing written."""

    lease: Lease | None = None  # the grant the write carried, when one did


def lane_lease(peer: str) -> str:
    """The name of ``peer``'s sender lane lease."""
    return LANE_PREFIX + peer


def lease_peer(name: str) -> str | None:
    """The peer of a lane lease's name; None for any other lease."""
    return name[len(LANE_PREFIX) :] if name.startswith(LANE_PREFIX) else None


def check_lease_name(name: object) -> str:
    return check_text("lease name", name, MAX_LEASE_NAME_LENGTH)


@dataclass(frozen=True, kw_only=True)
class NodeRecord:
    """One gateway node as it last reported itself (its beat)."""

    node: str
    incarnation: str
    version: str
    rules_sha256: str
    started_ms: int
    beat_ms: int
    # Read back only: the node's clock minus the database server's at its last
    # beat (PostgreSQL); None where the database has no clock of its own (SQLite).
    skew_ms: int | None = None

    def __post_init__(self) -> None:
        check_text("node", self.node, MAX_NODE_LENGTH)
        check_text(f"incarnation of {self.node}", self.incarnation, MAX_INCARNATION_LENGTH)
        check_text(f"version of {self.node}", self.version, MAX_VERSION_LENGTH)
        check_text(f"rules_sha256 of {self.node}", self.rules_sha256, 64)
        check_ms(f"started_ms of {self.node}", self.started_ms)
        check_ms(f"beat_ms of {self.node}", self.beat_ms)

    def live_at(self, now_ms: int, window_ms: int) -> bool:
        """Whether it beat within ``window_ms`` before ``now_ms``."""
        return self.beat_ms > now_ms - window_ms


@dataclass(frozen=True, kw_only=True)
class Lease:
    """One lease row. ``node`` is empty for a lease nobody has held yet."""

    name: str
    node: str
    incarnation: str
    epoch: int
    since_ms: int  # when this owner was granted it
    until_ms: int  # held until then unless renewed; 0: released

    def __post_init__(self) -> None:
        check_lease_name(self.name)
        check_count(f"epoch of {self.name}", self.epoch, minimum=0, maximum=2**62)
        check_ms(f"since_ms of {self.name}", self.since_ms)
        check_ms(f"until_ms of {self.name}", self.until_ms)

    def held_at(self, now_ms: int) -> bool:
        return bool(self.node) and self.until_ms > now_ms

    def owned_by(self, incarnation: str) -> bool:
        return bool(self.node) and self.incarnation == incarnation


def decide_claim(
    row: Lease | None,
    *,
    name: str,
    node: str,
    incarnation: str,
    at_ms: int,
    until_ms: int,
    take_from: str | None = None,
) -> Lease | None:
    """The lease after ``incarnation`` claims ``name`` at ``at_ms``; None if another holds it.

    Ours already: extended, same epoch (a renewal). Free, released or expired:
    granted to us with the next epoch. Held by another owner until after
    ``at_ms``: not ours (None), unless that owner is ``take_from``, the
    incarnation this node's own restart replaced (it is dead: its leases
    need not run out first). Engines run this on the row they locked.
    """
    if row is not None and row.owned_by(incarnation):
        return Lease(
            name=name,
            node=node,
            incarnation=incarnation,
            epoch=row.epoch,
            since_ms=row.since_ms,
            until_ms=max(until_ms, row.until_ms),
        )
    if row is not None and row.held_at(at_ms) and row.incarnation != take_from:
        return None
    return Lease(
        name=name,
        node=node,
        incarnation=incarnation,
        epoch=(row.epoch if row is not None else 0) + 1,
        since_ms=at_ms,
        until_ms=until_ms,
    )


def check_claim(name: str, node: str, incarnation: str, at_ms: int, until_ms: int) -> None:
    """Argument checks of a claim or renewal (a caller's bug: ``ValueError``)."""
    check_lease_name(name)
    check_text("node", node, MAX_NODE_LENGTH)
    check_text("incarnation", incarnation, MAX_INCARNATION_LENGTH)
    check_ms("at_ms", at_ms)
    check_ms("until_ms", until_ms)
    if until_ms <= at_ms:
        raise ValueError(f"until_ms ({until_ms}) must be after at_ms ({at_ms})")


LEASE_COLUMNS: Final = "name, node, incarnation, epoch, since_ms, until_ms"
NODE_COLUMNS: Final = "node, incarnation, version, rules_sha256, started_ms, beat_ms"


def lease_from_row(row: Sequence[Any]) -> Lease:
    """A lease from a row of :data:`LEASE_COLUMNS` (both engines)."""
    name, node, incarnation, epoch, since_ms, until_ms = row
    return Lease(
        name=str(name),
        node=str(node),
        incarnation=str(incarnation),
        epoch=int(epoch),
        since_ms=int(since_ms),
        until_ms=int(until_ms),
    )


def node_from_row(row: Sequence[Any]) -> NodeRecord:
    """A node from a row of :data:`NODE_COLUMNS`, then optionally its skew (both engines)."""
    return NodeRecord(
        node=str(row[0]),
        incarnation=str(row[1]),
        version=str(row[2]),
        rules_sha256=str(row[3]),
        started_ms=int(row[4]),
        beat_ms=int(row[5]),
        skew_ms=None if len(row) < 7 or row[6] is None else int(row[6]),
    )


def check_renewal(
    names: Collection[str], node: str, incarnation: str, at_ms: int, until_ms: int
) -> list[str]:
    """The sorted, distinct names of a renewal, its arguments checked (both engines)."""
    wanted = sorted(set(names))
    check_batch("leases_renew names", wanted)
    for name in wanted:
        check_claim(name, node, incarnation, at_ms, until_ms)
    return wanted


def check_leave(node: str, incarnation: str, at_ms: int) -> None:
    """Argument checks of ``node_leave`` (both engines)."""
    check_text("node", node, MAX_NODE_LENGTH)
    check_text("incarnation", incarnation, MAX_INCARNATION_LENGTH)
    check_ms("at_ms", at_ms)


def fence_refused(fence: Lease) -> LeaseLostError:
    error = LeaseLostError(
        f"lease {fence.name} (epoch {fence.epoch}) is no longer this node's: "
        "another node has been granted it; nothing was written"
    )
    error.lease = fence
    return error
