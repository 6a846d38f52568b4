"""The mailbox: long-poll fetch and acknowledgement, for an authenticated caller.

Long-poll (``GET /v1/mailbox?wait=S``): a :class:`~.mailbox_wait.MailboxWatch`
is taken *before* the mailbox is read, so an arrival between the read and the
wait is not missed; an empty read then waits for a wakeup or the deadline and
reads again. What it read is answered as JSON or in the binary batch framing,
as the request's ``Accept`` chooses (:mod:`.fetch_answer`; ``406`` before any
wait when it allows neither): the same stored bytes either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from gateway.clientapi.caller import Caller
from gateway.clientapi.fetch_answer import (
    ANSWER_FORMATS,
    accept_field,
    answer_media_type,
    mailbox_answer,
    not_acceptable,
)
from gateway.clientapi.limits import (
    DEFAULT_FETCH_LIMIT,
    DEFAULT_WAIT_SECONDS,
    MAX_FETCH_LIMIT,
    MAX_WAIT_SECONDS,
)
from gateway.clientapi.mailbox_wait import MailboxWaiters, TooManyWatches
from gateway.clientapi.request_parsing import int_query
from gateway.clientapi.retention import RetentionDesk, parse_ack
from gateway.errors import Reason
from gateway.http import Request, Response, error_response, json_response
from gateway.observability.metrics import CLIENTAPI_MAILBOX_ANSWERS
from gateway.storage.base import Storage

MAILBOX_QUERY: Final = frozenset({"wait", "limit"})  # the one endpoint that takes a query


class Mailbox:
    """``GET /v1/mailbox`` and ``POST /v1/mailbox/ack``."""

    def __init__(
        self,
        *,
        storage: Storage,
        waiters: MailboxWaiters,
        clock_ms: Callable[[], int],
        max_wait_seconds: float,
        retention: RetentionDesk,
        count_denial: Callable[[str, Reason], None],
    ) -> None:
        self._storage = storage
        self._waiters = waiters
        self._clock_ms = clock_ms
        self._max_wait = max_wait_seconds
        self._retention = retention
        self._count_denial = count_denial
        self._answers = {
            media_type: CLIENTAPI_MAILBOX_ANSWERS.labels(label)
            for media_type, label in ANSWER_FORMATS.items()
        }

    async def get_mailbox(self, request: Request, caller: Caller) -> Response:
        media_type = answer_media_type(accept_field(request))
        if media_type is None:  # before any wait: the answer could not be read anyway
            return not_acceptable()
        # Any wait the protocol allows is taken; a gateway whose limits.long_poll_max is
        # shorter holds the poll that long at most (an empty answer is always possible).
        asked = int_query(request, "wait", DEFAULT_WAIT_SECONDS, 0, MAX_WAIT_SECONDS)
        wait = min(asked, self._max_wait)
        limit = int_query(request, "limit", DEFAULT_FETCH_LIMIT, 1, MAX_FETCH_LIMIT)
        deadline = trio.current_time() + wait
        while True:
            try:
                with self._waiters.watch(caller.user) as watch:
                    # Watch first, read second: an arrival in between still wakes us.
                    entries = await self._storage.mailbox_fetch(
                        caller.user, limit=limit, now_ms=self._clock_ms()
                    )
                    if entries or wait == 0 or self._waiters.closed:
                        break
                    if not await watch.wait_until(deadline):
                        break
            except TooManyWatches:
                return error_response(429, Reason.TOO_MANY_CONNECTIONS)
        self._answers[media_type].inc()
        return mailbox_answer(media_type, [entry.data for entry in entries])

    async def post_ack(self, request: Request, caller: Caller) -> Response:
        ack = parse_ack(request.body)
        unique = list(dict.fromkeys(ack.ids))
        if caller.group.retention.inbound and unique:
            kept = await self._retention.retain_acknowledged(
                user=caller.user, group=caller.group, rules=caller.rules, ack=ack, ids=unique
            )
            if isinstance(kept, str):
                self._count_denial("inbound", Reason.RETENTION_REQUIRED)
                return json_response(
                    403, {"error": Reason.RETENTION_REQUIRED.value, "message": kept}
                )
            unique = kept
        deleted = await self._storage.mailbox_ack(caller.user, unique) if unique else 0
        return json_response(200, {"deleted": deleted})
