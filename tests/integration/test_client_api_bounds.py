"""Lane and mailbox bounds and the submission rate at the client API, over real sockets.

``limits.spool_max_envelopes_per_peer`` / ``spool_max_bytes_per_peer`` bound
one peer's lane and ``limits.mailbox_max_envelopes`` / ``mailbox_max_bytes``
one user's mailbox. Past a bound a submission is refused with ``503`` and
``Retry-After``, counted, and stores nothing; everything else still goes
through, and room comes back as the lane drains or the mailbox is read.
``limits.submit_rate_per_user`` / ``submit_burst_per_user`` bound how fast one
user submits: past it, ``429 rate_limited`` with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import pytest
import trio

from gateway.clientapi.api import FULL_RETRY_AFTER_SECONDS
from gateway.core.address import Address
from gateway.core.envelope import encode_envelope
from gateway.core.ratelimit import RateLimiter
from gateway.crypto.keys import UserKeys
from gateway.errors import StorageFullError
from gateway.storage.base import Bound
from tests.integration.test_client_api import (
    GLOBEX,
    NOW_MS,
    ORG,
    Gateway,
    _start,
    envelope,
    sample,
)

LANE_ENVELOPES = 3
MAILBOX_ENVELOPES = 2


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _start(
        tmp_path,
        ssl_context=None,
        client_verify=None,
        lane_bound=Bound(LANE_ENVELOPES, 10**6),
        mailbox_bound=Bound(MAILBOX_ENVELOPES, 10**6),
    ):
        yield gateway


async def test_a_full_lane_is_503_with_retry_after_and_stores_nothing(gw: Gateway) -> None:
    refused_before = sample("gateway_spool_full_refusals_total", peer=GLOBEX)
    counted_before = sample("gateway_clientapi_submissions_total", result="lane_full")
    queued = [envelope("alice@acme.example", f"u{n}@{GLOBEX}") for n in range(LANE_ENVELOPES)]
    for env in queued:
        assert (await gw.submit("alice", env)).status_code == 202  # up to the bound: fits

    over = envelope("bob@acme.example", f"zed@{GLOBEX}")
    answer = await gw.submit("bob", over)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == str(FULL_RETRY_AFTER_SECONDS)
    assert answer.json() == {
        "error": "lane_full",
        "message": "the spool for this peer is full; try again later",
    }
    await gw.assert_nothing_stored(over)
    assert sample("gateway_spool_full_refusals_total", peer=GLOBEX) == refused_before + 1
    assert sample("gateway_clientapi_submissions_total", result="lane_full") == counted_before + 1

    # A retry of an envelope the lane already holds is still answered as before.
    again = await gw.submit("alice", queued[0])
    assert (again.status_code, again.json()["status"]) == (202, "queued")

    # Local delivery does not go through the lane: still served.
    local = envelope("alice@acme.example", f"bob@{ORG}")
    assert (await gw.submit("alice", local)).status_code == 202

    # The peer takes one: there is room for one more, and one only.
    await gw.store.spool_complete(GLOBEX, {queued[0].id: "forwarded"}, at_ms=NOW_MS)
    assert (await gw.submit("bob", over)).status_code == 202
    assert (await gw.submit("bob", envelope("bob@acme.example", f"y@{GLOBEX}"))).status_code == 503


@pytest.fixture
async def gw_bytes(tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _start(
        tmp_path, ssl_context=None, client_verify=None, lane_bound=Bound(100, 4000)
    ):
        yield gateway


async def test_the_lane_bound_counts_bytes_too(gw_bytes: Gateway) -> None:
    gw = gw_bytes
    for name in ("a", "b"):
        env = envelope("alice@acme.example", f"{name}@{GLOBEX}", size=900)
        assert (await gw.submit("alice", env)).status_code == 202
    # A lane's bytes are those of the stored envelopes (encoded: ~1,400 each here).
    assert 2 * 1200 <= (await gw.store.spool_stats())[GLOBEX].bytes <= 2 * 1500
    # A third would take the lane past 4,000 bytes; a small one still fits.
    big = envelope("alice@acme.example", f"b@{GLOBEX}", size=900)
    assert (await gw.submit("alice", big)).json()["error"] == "lane_full"
    small = envelope("alice@acme.example", f"c@{GLOBEX}", size=10)
    assert (await gw.submit("alice", small)).status_code == 202


async def test_a_full_mailbox_refuses_local_delivery_and_frees_up_on_ack(gw: Gateway) -> None:
    refused_before = sample("gateway_mailbox_full_refusals_total", path="local")
    sent = [envelope("alice@acme.example", f"bob@{ORG}") for _ in range(MAILBOX_ENVELOPES)]
    for env in sent:
        assert (await gw.submit("alice", env)).status_code == 202
    over = envelope("dave@acme.example", f"bob@{ORG}")
    answer = await gw.submit("dave", over)
    assert (answer.status_code, answer.json()["error"]) == (503, "mailbox_full")
    assert answer.headers["retry-after"] == str(FULL_RETRY_AFTER_SECONDS)
    await gw.assert_nothing_stored(over)
    assert sample("gateway_mailbox_full_refusals_total", path="local") == refused_before + 1
    # Another user's mailbox is not affected.
    assert (await gw.submit("dave", envelope("dave@acme.example", f"alice@{ORG}"))).is_success

    ack = await gw.client.post(
        "/v1/mailbox/ack", json={"ids": [sent[0].id]}, headers=gw.auth("bob")
    )
    assert ack.status_code == 200, ack.text
    assert (await gw.submit("dave", over)).status_code == 202


async def test_a_batch_keeps_what_fits_and_refuses_only_what_is_full(gw: Gateway) -> None:
    for n in range(LANE_ENVELOPES):
        await gw.submit("alice", envelope("alice@acme.example", f"u{n}@{GLOBEX}"))
    for _ in range(MAILBOX_ENVELOPES):
        await gw.submit("alice", envelope("alice@acme.example", f"dave@{ORG}"))
    batch = [
        envelope("alice@acme.example", f"x@{GLOBEX}"),  # lane full
        envelope("alice@acme.example", f"bob@{ORG}"),  # room
        envelope("alice@acme.example", f"dave@{ORG}"),  # mailbox full
    ]
    answer = await gw.client.post(
        "/v1/envelopes/batch",
        content=b'{"envelopes":[' + b",".join(encode_envelope(e) for e in batch) + b"]}",
        headers=gw.auth("alice"),
    )
    assert answer.status_code == 200
    assert answer.headers["retry-after"] == str(FULL_RETRY_AFTER_SECONDS)
    results = answer.json()["results"]
    assert [r.get("error") or r["status"] for r in results] == [
        "lane_full",
        "delivered",
        "mailbox_full",
    ]
    assert [r["id"] for r in results] == [e.id for e in batch]
    await gw.assert_nothing_stored(batch[0])
    await gw.assert_nothing_stored(batch[2])
    assert batch[1].id in await gw.mailbox("bob")


@pytest.fixture
async def gw_rate(tmp_path: Path) -> AsyncIterator[Gateway]:
    # The gateway's clock stands still here: no token comes back during a test.
    async for gateway in _start(
        tmp_path, ssl_context=None, client_verify=None, submit_rate=RateLimiter(rate=0.5, burst=3)
    ):
        yield gateway


async def test_a_user_past_the_submission_rate_gets_429_with_retry_after(gw_rate: Gateway) -> None:
    gw = gw_rate
    counted_before = sample("gateway_clientapi_submissions_total", result="rate_limited")
    for _ in range(2):
        assert (await gw.submit("alice", envelope("alice@acme.example", f"bob@{ORG}"))).is_success
    batch = [envelope("alice@acme.example", f"bob@{ORG}") for _ in range(2)]
    body = b'{"envelopes":[' + b",".join(encode_envelope(e) for e in batch) + b"]}"
    refused = await gw.client.post("/v1/envelopes/batch", content=body, headers=gw.auth("alice"))
    assert refused.status_code == 429  # two envelopes, one token left: the whole batch waits
    assert refused.headers["retry-after"] == "2"  # one token short at 0.5 a second
    assert refused.json()["error"] == "rate_limited"
    for env in batch:
        await gw.assert_nothing_stored(env)
    last = envelope("alice@acme.example", f"bob@{ORG}")
    assert (await gw.submit("alice", last)).is_success  # the last token
    single = await gw.submit("alice", envelope("alice@acme.example", f"bob@{ORG}"))
    assert (single.status_code, single.json()["error"]) == (429, "rate_limited")
    assert single.headers["retry-after"] == "2"
    # Every other user has a bucket of their own.
    assert (await gw.submit("dave", envelope("dave@acme.example", f"bob@{ORG}"))).is_success
    assert (
        sample("gateway_clientapi_submissions_total", result="rate_limited") == counted_before + 3
    )


# -- the storage reserve (gateway.reserve) ---------------------------------------------


class FakeReserve:
    """A reserve the test opens and closes."""

    def __init__(self) -> None:
        self.why: str | None = None
        self.noted = 0

    async def admit(self, size: int) -> str | None:
        assert size > 0
        await trio.lowlevel.checkpoint()
        return self.why

    def note_full(self) -> None:
        self.noted += 1


@pytest.fixture
async def gw_disk(tmp_path: Path) -> AsyncIterator[tuple[Gateway, FakeReserve]]:
    reserve = FakeReserve()
    async for gateway in _start(tmp_path, ssl_context=None, client_verify=None, reserve=reserve):
        yield gateway, reserve


async def test_below_the_reserve_submissions_get_507_and_reading_goes_on(
    gw_disk: tuple[Gateway, FakeReserve],
) -> None:
    gw, reserve = gw_disk
    kept = envelope("alice@acme.example", f"bob@{ORG}")
    assert (await gw.submit("alice", kept)).status_code == 202
    refused_before = sample("gateway_storage_reserve_refusals_total", path="client")
    counted_before = sample("gateway_clientapi_submissions_total", result="insufficient_storage")

    reserve.why = "12.0 MiB available on /data, below the reserve of 20.0 MiB"
    over = envelope("alice@acme.example", f"u@{GLOBEX}")
    answer = await gw.submit("alice", over)
    assert answer.status_code == 507
    assert answer.headers["retry-after"] == str(FULL_RETRY_AFTER_SECONDS)
    # The client reads why in general terms: the gateway's disk layout stays its own.
    assert answer.json() == {
        "error": "insufficient_storage",
        "message": "the gateway is short of disk space; try again later",
    }
    await gw.assert_nothing_stored(over)
    batch = [envelope("alice@acme.example", f"bob@{ORG}") for _ in range(3)]
    body = b'{"envelopes":[' + b",".join(encode_envelope(e) for e in batch) + b"]}"
    refused = await gw.client.post("/v1/envelopes/batch", content=body, headers=gw.auth("alice"))
    assert (refused.status_code, refused.json()["error"]) == (507, "insufficient_storage")
    for env in batch:
        await gw.assert_nothing_stored(env)
    assert sample("gateway_storage_reserve_refusals_total", path="client") == refused_before + 4
    assert (
        sample("gateway_clientapi_submissions_total", result="insufficient_storage")
        == counted_before + 4
    )

    # What frees space goes on: bob reads and acknowledges.
    assert await gw.mailbox("bob") == [kept.id]
    ack = await gw.client.post("/v1/mailbox/ack", json={"ids": [kept.id]}, headers=gw.auth("bob"))
    assert ack.status_code == 200, ack.text
    assert await gw.mailbox("bob") == []

    # Room again: taken at once.
    reserve.why = None
    assert (await gw.submit("alice", over)).status_code == 202


async def test_a_write_that_finds_the_disk_full_is_507_never_500(
    gw_disk: tuple[Gateway, FakeReserve], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, reserve = gw_disk

    async def disk_full(*args: object, **kwargs: object) -> NoReturn:
        raise StorageFullError("storage gateway.sqlite3: commit failed: database or disk is full")

    monkeypatch.setattr(gw.store, "spool_put", disk_full)
    monkeypatch.setattr(gw.store, "user_keys_put", disk_full)
    remote = envelope("alice@acme.example", f"u@{GLOBEX}")
    local = envelope("alice@acme.example", f"bob@{ORG}")
    body = b'{"envelopes":[' + b",".join(encode_envelope(e) for e in (remote, local)) + b"]}"
    answer = await gw.client.post("/v1/envelopes/batch", content=body, headers=gw.auth("alice"))
    assert answer.status_code == 200
    assert answer.headers["retry-after"] == str(FULL_RETRY_AFTER_SECONDS)
    results = answer.json()["results"]
    assert [r.get("error") or r["status"] for r in results] == [
        "insufficient_storage",
        "delivered",  # the local write had room
    ]
    assert reserve.noted == 1  # closed until the next sample

    single = await gw.submit("alice", envelope("alice@acme.example", f"v@{GLOBEX}"))
    assert (single.status_code, single.json()["error"]) == (507, "insufficient_storage")

    # Any other write that meets a full disk: the HTTP layer's 507, not a 500.
    keys = UserKeys.generate(Address.of("alice", ORG)).public()
    published = await gw.client.put("/v1/keys", json=keys.to_json(), headers=gw.auth("alice"))
    assert published.status_code == 507
    assert published.json() == {"error": "insufficient_storage"}
    assert published.headers["retry-after"] == "30"
