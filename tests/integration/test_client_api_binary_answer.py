"""The mailbox fetch's binary answer, over real sockets (docs/client-api.md, "The binary answer").

The same mailbox fetched as JSON and in the binary framing must give the same
envelopes, in the same order, under the same waiting, limit, expiry and
burn-on-read rules: each record is the stored bytes, and each JSON element is
those same bytes spliced in. What only the binary answer has (an empty
answer, the choice by ``Accept``, its counter) is tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import yaml
from prometheus_client import REGISTRY

from gateway.client.api import ClientSession
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, decode_answer
from gateway.core.encoding import b64url_encode
from gateway.core.envelope import Envelope, encode_envelope
from tests.integration.test_client_api import (
    GLOBEX,
    HOUR_MS,
    HTTP_TIMEOUT,
    NOW_MS,
    OPENAPI,
    ORG,
    SEGMENT_AT_SIZE,
    Gateway,
    _start,
    conforms,
    database_bytes,
    envelope,
    record_of,
    sample,
)

BINARY = {"accept": MEDIA_TYPE_BATCH_V1}
ANSWERS = "gateway_clientapi_mailbox_answers_total"


def canonical(element: object) -> bytes:
    return json.dumps(element, sort_keys=True, separators=(",", ":")).encode("ascii")


async def fetch(gw: Gateway, user: str, query: str = "", **headers: str) -> httpx.Response:
    return await gw.client.get(f"/v1/mailbox{query}", headers={**gw.auth(user), **headers})


async def fetch_both(gw: Gateway, user: str, query: str = "") -> tuple[list[bytes], list[bytes]]:
    """One fetch as JSON and one binary: the JSON elements' canonical encodings, the records."""
    as_json = await fetch(gw, user, query)
    assert as_json.status_code == 200
    assert as_json.headers["content-type"] == "application/json"
    binary = await fetch(gw, user, query, **BINARY)
    assert binary.status_code == 200
    assert binary.headers["content-type"] == MEDIA_TYPE_BATCH_V1
    records = decode_answer(binary.content, max_envelopes=500)
    # The JSON answer is the very same bytes, spliced: nothing was encoded for either.
    assert as_json.content == b'{"envelopes":[' + b",".join(records) + b"]}"
    return [canonical(element) for element in as_json.json()["envelopes"]], records


def requests_answered(status: int) -> float:
    """gateway_http_requests_total{status} summed over listeners (each test's has its name)."""
    return sum(
        s.value
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == "gateway_http_requests_total" and s.labels.get("status") == str(status)
    )


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _start(tmp_path, ssl_context=None, client_verify=None):
        yield gateway


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    return document


async def test_the_same_mailbox_fetched_both_ways_gives_the_same_stored_bytes(
    gw: Gateway,
) -> None:
    sent = [
        envelope("alice@acme.example", "bob@acme.example"),
        envelope("alice@acme.example", "bob@acme.example", burn_on_read=True),
        envelope("alice@acme.example", "bob@acme.example", size=SEGMENT_AT_SIZE + 100),
        envelope("alice@acme.example", "bob@acme.example", size=1),
    ]
    for env in sent[:2]:
        assert (await gw.submit("alice", env)).status_code == 202
    # One from a peer, with its group as the peer asserted it, between the local ones.
    remote = envelope("zed@globex.example", "bob@acme.example").with_group("partners")
    outcome = await gw.store.deliver(
        GLOBEX, "txn-1", b"\x00" * 32, {remote.id: "accepted"}, [record_of(remote)], at_ms=NOW_MS
    )
    assert outcome.stored == (remote.id,)
    for env in sent[2:]:
        assert (await gw.submit("alice", env)).status_code == 202
    # Past its expiry, not yet swept: in neither answer.
    stale = envelope("zed@globex.example", "bob@acme.example", created=NOW_MS - HOUR_MS)
    await gw.store.mailbox_put_local([record_of(stale)], at_ms=NOW_MS)

    kept = {e.envelope_id: e.data for e in await gw.store.mailbox_fetch(f"bob@{ORG}", limit=9)}
    order = [sent[0].id, sent[1].id, remote.id, sent[2].id, sent[3].id]
    elements, records = await fetch_both(gw, "bob")
    assert elements == records == [kept[i] for i in order]
    assert [Envelope.from_json(json.loads(r)) for r in records] == [
        *(e.with_group("engineering") for e in sent[:2]),
        remote,
        *(e.with_group("engineering") for e in sent[2:]),
    ]
    # The limit, oldest first, alike.
    elements, records = await fetch_both(gw, "bob", "?limit=2")
    assert elements == records == [kept[i] for i in order[:2]]
    # Only the caller's own mailbox, and an empty one is the empty answer in each form.
    elements, records = await fetch_both(gw, "alice")
    assert elements == records == []


async def test_an_empty_binary_answer_is_the_header_with_count_0(gw: Gateway) -> None:
    answer = await fetch(gw, "bob", "?wait=0", **BINARY)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == MEDIA_TYPE_BATCH_V1
    assert answer.content == bytes.fromhex("47574254010000000000")
    assert gw.waiters.watched_users == 0


async def test_a_long_poll_that_times_out_answers_the_empty_binary_answer(
    gw: Gateway, autojump_clock: trio.testing.MockClock
) -> None:
    async with httpx.AsyncClient(base_url=gw.client.base_url, timeout=None) as client:
        start = trio.current_time()
        answer = await client.get("/v1/mailbox?wait=30", headers={**gw.auth("bob"), **BINARY})
        elapsed = trio.current_time() - start
    assert (answer.status_code, answer.content) == (200, bytes.fromhex("47574254010000000000"))
    assert 30 <= elapsed < 31, elapsed
    assert gw.waiters.watched_users == 0


async def test_a_long_poll_for_the_binary_answer_is_woken_by_an_arrival(gw: Gateway) -> None:
    env = envelope("alice@acme.example", "bob@acme.example")
    answers: list[httpx.Response] = []

    async def poll() -> None:
        answers.append(await fetch(gw, "bob", "?wait=30", **BINARY))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        while gw.waiters.watchers("bob@acme.example") == 0:
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        async with httpx.AsyncClient(base_url=gw.client.base_url, timeout=HTTP_TIMEOUT) as other:
            answer = await other.post(
                "/v1/envelopes", content=encode_envelope(env), headers=gw.auth("alice")
            )
        assert answer.status_code == 202
    assert trio.current_time() - start < 5
    (polled,) = answers
    assert polled.headers["content-type"] == MEDIA_TYPE_BATCH_V1
    assert decode_answer(polled.content, max_envelopes=100) == [
        encode_envelope(env.with_group("engineering"))
    ]
    assert gw.waiters.watched_users == 0


@pytest.mark.parametrize("size", [600, 800])  # in the row, in a segment file
async def test_burn_on_read_envelopes_behave_alike_in_both_forms(gw: Gateway, size: int) -> None:
    env = envelope("alice@acme.example", "bob@acme.example", burn_on_read=True, size=size)
    needle = b64url_encode(env.ciphertext)[:64].encode("ascii")
    assert (await gw.submit("alice", env)).status_code == 202
    # Fetching removes nothing, in either form, however often.
    for _ in range(2):
        elements, records = await fetch_both(gw, "bob")
        assert elements == records
        (record,) = records
        assert Envelope.from_json(json.loads(record)).burn_on_read is True
    answer = await gw.client.post("/v1/mailbox/ack", json={"ids": [env.id]}, headers=gw.auth("bob"))
    assert answer.json() == {"deleted": 1}
    assert await fetch_both(gw, "bob") == ([], [])
    assert await gw.store.scrub()
    assert needle not in database_bytes(gw)


def without_accept(gw: Gateway, user: str) -> httpx.Request:
    request = gw.client.build_request("GET", "/v1/mailbox", headers=gw.auth(user))
    del request.headers["accept"]
    return request


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/*", "application/json"),
        ("application/json", "application/json"),
        ("application/json; charset=utf-8", "application/json"),
        (MEDIA_TYPE_BATCH_V1, MEDIA_TYPE_BATCH_V1),
        (f"{MEDIA_TYPE_BATCH_V1}, application/json;q=0.5", MEDIA_TYPE_BATCH_V1),
        (f"application/json;q=0.9, {MEDIA_TYPE_BATCH_V1}", MEDIA_TYPE_BATCH_V1),
        (f"{MEDIA_TYPE_BATCH_V1};q=0.5, application/json", "application/json"),
        ("text/html", 406),
        ("application/json;q=0", 406),
        (f"{MEDIA_TYPE_BATCH_V1};q=0, text/plain", 406),
    ],
)
async def test_accept_chooses_the_form_or_406(
    gw: Gateway, accept: str | None, expected: str | int
) -> None:
    env = envelope("alice@acme.example", "bob@acme.example")
    assert (await gw.submit("alice", env)).status_code == 202
    before = {form: sample(ANSWERS, format=form) for form in ("json", "binary_v1")}
    refused_before = requests_answered(406)
    if accept is None:
        answer = await gw.client.send(without_accept(gw, "bob"))
    else:
        answer = await fetch(gw, "bob", accept=accept)
    counted = {form: sample(ANSWERS, format=form) - before[form] for form in before}
    if expected == 406:
        assert answer.status_code == 406
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {
            "error": "not_acceptable",
            "message": f"the mailbox answers application/json or {MEDIA_TYPE_BATCH_V1}",
        }
        assert counted == {"json": 0, "binary_v1": 0}
        assert requests_answered(406) == refused_before + 1
        return
    assert answer.status_code == 200
    assert answer.headers["content-type"] == expected
    stored = encode_envelope(env.with_group("engineering"))
    if expected == MEDIA_TYPE_BATCH_V1:
        assert decode_answer(answer.content, max_envelopes=100) == [stored]
        assert counted == {"json": 0, "binary_v1": 1}
    else:
        assert answer.content == b'{"envelopes":[' + stored + b"]}"
        assert counted == {"json": 1, "binary_v1": 0}


async def test_406_comes_before_any_wait_and_after_the_token(
    gw: Gateway, openapi: dict[str, Any]
) -> None:
    start = trio.current_time()
    answer = await fetch(gw, "bob", "?wait=30", accept="text/html")
    assert answer.status_code == 406
    assert trio.current_time() - start < 5
    assert gw.waiters.watched_users == 0
    conforms(openapi, "/v1/mailbox", "get", 406, answer.json())
    stranger = await gw.client.get("/v1/mailbox", headers={"accept": "text/html"})
    assert stranger.status_code == 401
    misspelt = await fetch(gw, "bob", "?limt=5", accept="text/html")
    assert misspelt.status_code == 400


async def test_the_reference_session_fetches_the_binary_answer(gw: Gateway) -> None:
    sent = [envelope("alice@acme.example", "bob@acme.example", size=s) for s in (10, 900, 5)]
    for env in sent:
        assert (await gw.submit("alice", env)).status_code == 202
    binary_before = sample(ANSWERS, format="binary_v1")
    json_before = sample(ANSWERS, format="json")
    async with ClientSession(str(gw.client.base_url), gw.tokens["bob"]) as session:
        got = await session.fetch(limit=2)
        assert got == [e.with_group("engineering") for e in sent[:2]]
        assert await session.fetch() == [e.with_group("engineering") for e in sent]
        assert await session.ack([e.id for e in sent]) == 3
        assert await session.fetch(wait=0) == []
    assert sample(ANSWERS, format="binary_v1") == binary_before + 3
    assert sample(ANSWERS, format="json") == json_before
