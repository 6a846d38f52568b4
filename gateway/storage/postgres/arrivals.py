"""Mailbox arrivals across nodes: ``NOTIFY`` in each mailbox write, ``LISTEN`` on one connection.

Theory of operation
-------------------
Every write that puts envelopes into mailboxes (``deliver``,
``mailbox_put_local``: :func:`~.writes.store_in_mailboxes`) ends with one
statement, :func:`notify_arrivals`, that queues ``pg_notify`` on
:data:`CHANNEL` in the *same* transaction. PostgreSQL delivers a
notification only if its transaction commits, and only after the commit, so
a listener that hears one and then reads the mailbox sees the envelopes; a
write that rolls back (a bound refused it, a replayed transaction) says
nothing.

A payload is lines of text: the writing engine's
:attr:`~.engine.PostgresEngine.instance_id`, then the recipients' addresses,
split over several notifications so that each stays under PostgreSQL's
8000-byte limit. More than :data:`MAX_NAMED_RECIPIENTS` recipients in one
commit send :data:`EVERYONE` instead: wake every waiter (they re-read; a
spurious wake costs one mailbox read).

Each node runs :func:`watch_arrivals`: one connection of its own (not from
the pool) does ``LISTEN``, and a worker thread blocks on it
(``Connection.notifies`` with a short timeout, so a cancelled task stops
within :data:`POLL_S`) and hands each batch of payloads to the trio side
(``trio.from_thread.run_sync``), which wakes the users' long-polls through
the :class:`~gateway.storage.arrivals.ArrivalSink`. Payloads this engine
sent are skipped: the writer in this process already woke its waiters.

**Spooled envelopes** travel the same way on :data:`SPOOL_CHANNEL`, with peer
names for addresses: a node whose client API spooled for a lane that another
node drives (its lease, gateway.cluster) tells it with
:func:`announce_spooled`, after the commit, so that node's lane sends now
rather than at its next poll. The listener hands those to the ``spooled``
callback (the sender's :meth:`~gateway.federation.sender.Sender.wake_local`).

Failure: if the connection drops (server restart, a terminated backend, a
dead network found by TCP keepalives), the listener reports the outage once
(one warning, ``on_lost``), reconnects with a backoff from
:data:`RECONNECT_INITIAL_S` to :data:`RECONNECT_MAX_S`, and once it listens
again wakes every waiter, because an arrival may have committed while no one
listened. Until then long-polls on this node still wake for this node's own
arrivals and answer at their deadline otherwise: late mail, never lost mail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Final

import psycopg
import trio

from gateway.storage.arrivals import ArrivalSink
from gateway.storage.postgres.engine import Connection, PostgresEngine, _first_line

LOGGER = logging.getLogger("gateway.storage")

CHANNEL: Final = "gateway_mailbox"
SPOOL_CHANNEL: Final = "gateway_spool"
EVERYONE: Final = "*"  # as the only recipient line: wake every waiter (no address is "*")
MAX_PAYLOAD_BYTES: Final = 7_999  # PostgreSQL refuses a payload of 8000 bytes or more
MAX_NAMED_RECIPIENTS: Final = 1_000  # recipients of one commit; more send EVERYONE
POLL_S: Final = 0.1  # the listening thread checks for cancellation this often
MAX_BATCH: Final = 1_000  # notifications handed to trio at once
RECONNECT_INITIAL_S: Final = 0.1  # first wait before connecting again after a loss
RECONNECT_MAX_S: Final = 5.0  # the longest wait between attempts
# A network that dies silently is found by TCP keepalives within about 25 s.
KEEPALIVES: Final = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


# -- payloads (pure) ---------------------------------------------------------------
def payloads(instance_id: str, recipients: Collection[str]) -> list[str]:
    """The notification payloads that tell ``recipients`` (from engine ``instance_id``)."""
    if not recipients:
        return []
    head = instance_id
    if len(recipients) > MAX_NAMED_RECIPIENTS:
        return [f"{head}\n{EVERYONE}"]
    out: list[str] = []
    lines: list[str] = [head]
    size = len(head.encode())
    for user in sorted(recipients):
        more = len(user.encode()) + 1
        if size + more > MAX_PAYLOAD_BYTES:
            if len(lines) == 1:  # one address longer than a payload: never, but bounded
                return [f"{head}\n{EVERYONE}"]
            out.append("\n".join(lines))
            lines, size = [head], len(head.encode())
            if size + more > MAX_PAYLOAD_BYTES:
                return [f"{head}\n{EVERYONE}"]
        lines.append(user)
        size += more
    out.append("\n".join(lines))
    return out


def read_payload(payload: str) -> tuple[str, list[str] | None]:
    """``(instance_id, users)`` of a payload; ``users`` is ``None`` for everyone."""
    head, _, rest = payload.partition("\n")
    users = rest.split("\n") if rest else []
    if EVERYONE in users:
        return head, None
    return head, users


# -- the writer's side (in a write transaction) -------------------------------------
def notify_arrivals(conn: Connection, instance_id: str, recipients: Collection[str]) -> None:
    """Queue the notifications for ``recipients``; sent when the transaction commits."""
    texts = payloads(instance_id, recipients)
    if texts:
        conn.execute("SELECT pg_notify(%s, p) FROM unnest(%b::text[]) AS p", (CHANNEL, texts))


async def announce_spooled(engine: PostgresEngine, peers: Collection[str]) -> None:
    """Tell the other nodes that envelopes for ``peers`` were spooled (already committed)."""
    texts = payloads(engine.instance_id, peers)
    if not texts:
        return

    def op(conn: Connection) -> None:
        # Autocommit: the statement is its own transaction, so it is sent at once.
        conn.execute("SELECT pg_notify(%s, p) FROM unnest(%b::text[]) AS p", (SPOOL_CHANNEL, texts))

    await engine.read(op)


# -- the listener's side --------------------------------------------------------------
def _open_listener(engine: PostgresEngine) -> Connection:
    """Connect and ``LISTEN`` (in a thread); closed again if the trio side gave up meanwhile."""
    conn = engine.connect_direct(**KEEPALIVES)
    try:
        conn.execute(f"LISTEN {CHANNEL}".encode())
        conn.execute(f"LISTEN {SPOOL_CHANNEL}".encode())
        trio.from_thread.check_cancelled()
    except BaseException:
        conn.close()
        raise
    return conn


def _listen_in_thread(conn: Connection, hand_over: Callable[[list[tuple[str, str]]], None]) -> None:
    """Hand over each batch of (channel, payload) heard on ``conn`` until cancelled or the
    link fails."""
    while True:
        trio.from_thread.check_cancelled()
        batch = [(n.channel, n.payload) for n in conn.notifies(timeout=POLL_S, stop_after=1)]
        if not batch:
            continue
        # Whatever came with it, in one hop to trio.
        batch.extend((n.channel, n.payload) for n in conn.notifies(timeout=0, stop_after=MAX_BATCH))
        trio.from_thread.run_sync(hand_over, batch)


async def watch_arrivals(
    engine: PostgresEngine,
    sink: ArrivalSink,
    *,
    on_lost: Callable[[], None] | None = None,
    spooled: Callable[[Iterable[str] | None], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Wake ``sink``'s waiters for arrivals other engines commit, until cancelled.

    ``spooled(peers)`` hears other nodes' :func:`announce_spooled` (``None``:
    any lane may have news). Started once the first ``LISTEN`` ran (or failed:
    the gateway does not wait for it). ``on_lost`` is called once per outage
    (a metric).
    """
    own = engine.instance_id

    def hand_over(batch: Sequence[tuple[str, str]]) -> None:
        users: set[str] = set()
        peers: set[str] = set()
        everyone = every_lane = False
        for channel, payload in batch:
            sender, named = read_payload(payload)
            if sender == own:
                continue
            if channel == SPOOL_CHANNEL:
                if named is None:
                    every_lane = True
                else:
                    peers.update(named)
            elif named is None:
                everyone = True
            else:
                users.update(named)
        if everyone:
            sink.notify_all()
        elif users:
            sink.notify(users)
        if spooled is not None and (every_lane or peers):
            spooled(None if every_lane else peers)

    started = False
    lost_since: float | None = None
    delay = RECONNECT_INITIAL_S
    while True:
        try:
            conn = await trio.to_thread.run_sync(_open_listener, engine, abandon_on_cancel=True)
        except psycopg.Error as exc:
            if lost_since is None:
                lost_since = trio.current_time()
                _report_loss(engine, exc, on_lost)
        else:
            try:
                if lost_since is not None:
                    # Arrivals committed while no one listened were never heard.
                    sink.notify_all()
                    if spooled is not None:
                        spooled(None)
                    LOGGER.info(
                        "storage %s: listening for other nodes' arrivals again after %.1fs",
                        engine.name,
                        trio.current_time() - lost_since,
                    )
                    lost_since, delay = None, RECONNECT_INITIAL_S
                if not started:
                    started = True
                    task_status.started()
                await trio.to_thread.run_sync(_listen_in_thread, conn, hand_over)
            except psycopg.Error as exc:
                lost_since = trio.current_time()
                _report_loss(engine, exc, on_lost)
            finally:
                conn.close()
        if not started:
            started = True
            task_status.started()
        await trio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)


def _report_loss(
    engine: PostgresEngine, exc: BaseException, on_lost: Callable[[], None] | None
) -> None:
    LOGGER.warning(
        "storage %s: not listening for other nodes' mailbox arrivals (%s: %s); reconnecting, "
        "meanwhile long-polls here wake for this node's arrivals only",
        engine.name,
        type(exc).__name__,
        _first_line(exc),
    )
    if on_lost is not None:
        on_lost()
