"""Per-user wakeups for mailbox long-polls.

Theory of operation
-------------------
A long-poll must not miss an arrival that lands between "the mailbox is
empty" and "start waiting". So a poller first takes a :class:`MailboxWatch`
for its user (``with waiters.watch(user) as watch:``), *then* reads the
mailbox, and only if that read was empty waits on the watch. Whoever stores
envelopes for local users (local delivery in the client API, the federation
receiver) calls :meth:`MailboxWaiters.notify` with those users *after* the
durable write; every watch taken before that call is woken, and the read it
does next sees the new envelopes. Arrivals that other nodes of the org store
in a shared database come through the storage engine
(:mod:`gateway.storage.arrivals`), which calls :meth:`MailboxWaiters.notify`,
or :meth:`MailboxWaiters.notify_all` when it cannot know who may have mail.

Each user with at least one watcher has one slot: a ``trio.Event`` and a count
of watchers. ``notify`` detaches the user's slot and sets its event, so the
next watch starts a fresh one; the last watcher to leave removes its slot. The
table therefore holds only users someone waits for right now, and
:data:`MAX_WATCHES_PER_USER` bounds how many waits one user may hold.

Waking is cheap and may be spurious (an arrival that another client of the
same user acknowledged first): pollers re-read and wait again until their
deadline. :meth:`MailboxWaiters.close` wakes everyone for shutdown; every
watch taken after it is already woken, so pollers answer at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

MAX_WATCHES_PER_USER = 16  # concurrent long-polls of one user; more are refused


class TooManyWatches(Exception):
    """``user`` already holds :data:`MAX_WATCHES_PER_USER` watches."""


@dataclass(eq=False)
class _Slot:
    event: trio.Event = field(default_factory=trio.Event)
    watchers: int = 0


class MailboxWatch:
    """One poller's interest in one user's mailbox; see the module docstring."""

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot

    @property
    def woken(self) -> bool:
        return self._slot.event.is_set()

    async def wait(self) -> None:
        """Return once an arrival for the user was notified after this watch began."""
        await self._slot.event.wait()

    async def wait_until(self, deadline: float) -> bool:
        """:meth:`wait` until ``deadline`` (trio time); ``True`` if woken, ``False`` at it."""
        with trio.move_on_at(deadline):
            await self._slot.event.wait()
        return self._slot.event.is_set()


class MailboxWaiters:
    """Wakeups by user address; one per gateway, shared by every mailbox writer."""

    def __init__(self, *, max_watches_per_user: int = MAX_WATCHES_PER_USER) -> None:
        if max_watches_per_user < 1:
            raise ValueError("max_watches_per_user must be at least 1")
        self._max = max_watches_per_user
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def watched_users(self) -> int:
        """Users someone is watching now (bounded by the open connections)."""
        return len(self._slots)

    def watchers(self, user: str) -> int:
        slot = self._slots.get(user)
        return 0 if slot is None else slot.watchers

    @contextmanager
    def watch(self, user: str) -> Iterator[MailboxWatch]:
        """A watch on ``user``'s arrivals for the ``with`` block; :class:`TooManyWatches`."""
        if self._closed:
            woken = _Slot()
            woken.event.set()
            yield MailboxWatch(woken)
            return
        slot = self._slots.get(user)
        if slot is None:
            slot = self._slots[user] = _Slot()
        if slot.watchers >= self._max:
            raise TooManyWatches(user)
        slot.watchers += 1
        try:
            yield MailboxWatch(slot)
        finally:
            slot.watchers -= 1
            # A notified slot was already detached; a newer one may stand in its place.
            if slot.watchers == 0 and self._slots.get(user) is slot:
                del self._slots[user]

    def notify(self, users: Iterable[str]) -> None:
        """Wake every watch on these users. Call after their envelopes are durable."""
        for user in users:
            slot = self._slots.pop(user, None)
            if slot is not None:
                slot.event.set()

    def notify_all(self) -> None:
        """Wake every watch taken so far (news of arrivals may have been lost)."""
        slots = list(self._slots.values())
        self._slots.clear()
        for slot in slots:
            slot.event.set()

    def close(self) -> None:
        """Wake every watch, now and from now on (shutdown: long-polls answer at once)."""
        self._closed = True
        self.notify_all()
