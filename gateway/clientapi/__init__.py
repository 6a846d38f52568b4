"""The client API: what the org's own messaging clients call, on the client listener.

Bearer tokens (:mod:`.tokens`), envelope submission one at a time or in
batches, mailbox long-poll and acknowledgement (:mod:`.mailbox_wait` wakes the
polls), delivery statuses, and signed key records (:mod:`.api` wires the endpoints;
:mod:`.submission`, :mod:`.mailbox` and :mod:`.keys` answer them).
docs/client-api.md and docs/openapi.yaml are the specification.

Wiring, in the app::

    waiters = MailboxWaiters()
    api = ClientAPI(org=config.org, rules=holder, storage=store,
                    org_signing_seed=seed, waiters=waiters,
                    on_spooled=sender.wake, remote_key_lookup=federation_keys)
    router = Router()
    api.add_routes(router)
    # the federation receiver calls waiters.notify(outcome.recipients) after deliver()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.clientapi.api import ClientAPI, RemoteKeyLookup, RulesSource, no_remote_key_lookup
    from gateway.clientapi.limits import MAX_BATCH_ENVELOPES, MAX_FETCH_LIMIT, MAX_WAIT_SECONDS
    from gateway.clientapi.mailbox_wait import MailboxWaiters, MailboxWatch, TooManyWatches

# Loaded on first use (PEP 562): a command that needs only `gateway.clientapi.tokens`
# (gateway token) then does not import the whole API, sign-in and OIDC included.
_WHERE = {
    "MAX_BATCH_ENVELOPES": "limits",
    "MAX_FETCH_LIMIT": "limits",
    "MAX_WAIT_SECONDS": "limits",
    "ClientAPI": "api",
    "RemoteKeyLookup": "api",
    "RulesSource": "api",
    "no_remote_key_lookup": "api",
    "MailboxWaiters": "mailbox_wait",
    "MailboxWatch": "mailbox_wait",
    "TooManyWatches": "mailbox_wait",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "MAX_BATCH_ENVELOPES",
    "MAX_FETCH_LIMIT",
    "MAX_WAIT_SECONDS",
    "ClientAPI",
    "MailboxWaiters",
    "MailboxWatch",
    "RemoteKeyLookup",
    "RulesSource",
    "TooManyWatches",
    "no_remote_key_lookup",
]
