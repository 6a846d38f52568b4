"""News of mailbox arrivals that a storage engine hears from other processes.

Long-polls wait on :class:`~gateway.clientapi.mailbox_wait.MailboxWaiters`,
which this process's own mailbox writers notify after each durable write.
Several gateway nodes on one shared database (PostgreSQL) also need to hear
what the *other* nodes stored: an engine that can tell offers
:class:`WatchesArrivals`, and the app runs it with the waiters as the sink.
An engine that is one process (SQLite) offers nothing: every writer is local.

The sink is a small protocol, so storage never imports the client API.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Protocol, runtime_checkable

import trio


class ArrivalSink(Protocol):
    """Where arrivals are told (:class:`~gateway.clientapi.mailbox_wait.MailboxWaiters`)."""

    def notify(self, users: Iterable[str]) -> None:
        """Envelopes for ``users`` are durable: wake their waits."""

    def notify_all(self) -> None:
        """Anyone may have mail (news was lost or too long to name): wake every wait."""


@runtime_checkable
class WatchesArrivals(Protocol):
    """A storage that hears arrivals committed by other processes on the same data."""

    async def watch_arrivals(
        self,
        sink: ArrivalSink,
        *,
        on_lost: Callable[[], None] | None = None,
        spooled: Callable[[Iterable[str] | None], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Tell ``sink`` of other processes' arrivals until cancelled; started once listening.

        ``spooled(peers)`` hears :meth:`announce_spooled` of other processes
        (``None``: any lane). ``on_lost`` is called once each time the engine
        stops hearing them (a metric); when it hears again it calls
        ``sink.notify_all()`` and ``spooled(None)``.
        """

    async def announce_spooled(self, peers: Collection[str]) -> None:
        """Tell the other processes that envelopes for ``peers`` were spooled (committed)."""
