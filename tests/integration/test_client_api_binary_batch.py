"""The binary batch and the JSON batch behave alike, over real sockets (docs/client-api.md).

Every scenario runs twice, on two fresh gateways: once with each batch as
``{"envelopes": [...]}``, once as ``application/vnd.gateway.batch.v1`` with
the same envelopes as records. Statuses, results, Retry-After, the metrics'
increments and the bytes stored must be the same; only the body differs.
What only the binary body can get wrong (a broken frame, a record not in
canonical form, a record past the protocol's size) is tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import REGISTRY

from gateway.client.api import ClientSession
from gateway.clientapi import MAX_BATCH_ENVELOPES
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, encode_batch
from gateway.core.envelope import MAX_ENCODED_ENVELOPE_BYTES, Envelope, encode_envelope
from gateway.core.ratelimit import RateLimiter
from gateway.storage.base import Bound
from tests.integration.test_client_api import (
    GLOBEX,
    HOUR_MS,
    NOW_MS,
    ORG,
    Gateway,
    _start,
    envelope,
    sample,
)

Element = Envelope | dict[str, object] | list[object] | int
_COMPARED_METRICS = (
    "gateway_clientapi_submissions_total",
    "gateway_clientapi_local_deliveries_total",
    "gateway_policy_denials_total",
    "gateway_spool_full_refusals_total",
    "gateway_mailbox_full_refusals_total",
)


def json_body(elements: list[Element]) -> tuple[bytes, dict[str, str]]:
    items = [e.to_json() if isinstance(e, Envelope) else e for e in elements]
    return json.dumps({"envelopes": items}).encode(), {"content-type": "application/json"}


def binary_body(elements: list[Element]) -> tuple[bytes, dict[str, str]]:
    records = [
        encode_envelope(e)
        if isinstance(e, Envelope)
        else json.dumps(e, sort_keys=True, separators=(",", ":")).encode()
        for e in elements
    ]
    return encode_batch(records), {"content-type": MEDIA_TYPE_BATCH_V1}


BODIES = {"json": json_body, "binary": binary_body}


def metric_samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name in _COMPARED_METRICS:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@dataclass
class Seen:
    """What one run of a scenario showed."""

    answers: list[tuple[int, Any, str | None]] = field(default_factory=list)
    metrics: dict[Any, float] = field(default_factory=dict)
    stored: dict[str, bytes] = field(default_factory=dict)


Scenario = Callable[[Gateway, Callable[[list[Element]], Awaitable[httpx.Response]]], Awaitable[Any]]


async def run_both(tmp_path: Path, scenario: Scenario, **start: Any) -> dict[str, Seen]:
    """``scenario`` on a gateway per body format; a callable in ``start`` makes a fresh value."""
    seen: dict[str, Seen] = {}
    for name, make_body in BODIES.items():
        run = Seen()
        (tmp_path / name).mkdir()
        before = metric_samples()
        fresh = {key: value() if callable(value) else value for key, value in start.items()}
        async for gw in _start(tmp_path / name, ssl_context=None, client_verify=None, **fresh):

            async def post(
                elements: list[Element],
                gw: Gateway = gw,
                make_body: Callable[[list[Element]], tuple[bytes, dict[str, str]]] = make_body,
                run: Seen = run,
            ) -> httpx.Response:
                body, headers = make_body(elements)
                answer = await gw.client.post(
                    "/v1/envelopes/batch", content=body, headers={**headers, **gw.auth("alice")}
                )
                run.answers.append(
                    (answer.status_code, answer.json(), answer.headers.get("retry-after"))
                )
                return answer

            await scenario(gw, post)
            for user in ("bob", "dave"):
                for entry in await gw.store.mailbox_fetch(f"{user}@{ORG}", limit=500):
                    run.stored[entry.envelope_id] = entry.data
            for spooled in await gw.store.spool_take(GLOBEX, max_items=1000, max_bytes=10**9):
                run.stored[spooled.envelope_id] = spooled.data
        after = metric_samples()
        run.metrics = {
            k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)
        }
        seen[name] = run
    return seen


def _alike(answer: tuple[int, Any, str | None]) -> tuple[int, Any, str | None]:
    """An answer less what must differ: the message of a body refused whole names its format."""
    status, body, retry_after = answer
    if body.get("error") == "protocol_error":
        body = {"error": "protocol_error"}
    return status, body, retry_after


def assert_alike(seen: dict[str, Seen]) -> Seen:
    json_run, binary_run = seen["json"], seen["binary"]
    assert [_alike(a) for a in binary_run.answers] == [_alike(a) for a in json_run.answers]
    assert binary_run.metrics == json_run.metrics
    assert binary_run.stored == json_run.stored
    return json_run


def results(run: Seen, index: int = 0) -> list[dict[str, Any]]:
    status, body, _ = run.answers[index]
    assert status == 200, body
    return list(body["results"])


async def test_a_mixed_batch_is_answered_counted_and_stored_alike(tmp_path: Path) -> None:
    local = [envelope("alice@acme.example", f"bob@{ORG}") for _ in range(5)]
    remote = [envelope("alice@acme.example", f"u{i}@{GLOBEX}") for i in range(5)]
    too_large = envelope("alice@acme.example", f"bob@{ORG}", size=2000)  # the group's limit
    not_mine = envelope("bob@acme.example", "alice@acme.example")
    no_peer = envelope("alice@acme.example", "x@initech.example")  # not in send_to
    unknown = envelope("alice@acme.example", f"nobody@{ORG}")  # recipient in no group
    expired = envelope("alice@acme.example", f"bob@{ORG}", created=NOW_MS - 2 * HOUR_MS)
    elements: list[Element] = [
        *local[:3],
        too_large,
        *remote,
        {"v": 1, "id": "x"},
        {"id": "y" * 200},
        [1, 2],
        7,
        not_mine,
        no_peer,
        unknown,
        expired,
        *local[3:],
        local[0],  # the same envelope twice in one batch
    ]

    for_dave = envelope("alice@acme.example", f"dave@{ORG}")

    async def scenario(gw: Gateway, post: Any) -> None:
        await post(elements)
        await post([local[1], remote[2], for_dave])

    run = assert_alike(await run_both(tmp_path, scenario))
    first = results(run)
    assert len(first) == len(elements)
    assert [r.get("status") or r.get("error") for r in first] == [
        *["delivered"] * 3,
        "too_large",
        *["queued"] * 5,
        "envelope_malformed",
        "envelope_malformed",
        "envelope_malformed",
        "envelope_malformed",
        "sender_mismatch",
        "peer_not_allowed",
        "recipient_unknown",
        "expired",
        *["delivered"] * 3,
    ]
    again = results(run, 1)
    assert [r.get("status") for r in again] == ["delivered", "queued", "delivered"]
    assert len(run.stored) == len(local) + len(remote) + 1
    assert all(b'"group":"engineering"' in data for data in run.stored.values())
    assert run.metrics[("gateway_clientapi_submissions_total", (("result", "accepted"),))] == 14
    assert (
        "gateway_policy_denials_total",
        (("direction", "local"), ("reason", "too_large")),
    ) in (run.metrics)


async def test_whole_batch_refusals_are_alike(tmp_path: Path) -> None:
    """Too many envelopes, and a rate limit spent: refused whole, the same way."""

    batches: list[list[Element]] = [
        [envelope("alice@acme.example", f"bob@{ORG}")] * (MAX_BATCH_ENVELOPES + 1),
        [envelope("alice@acme.example", f"bob@{ORG}") for _ in range(2)],
        [envelope("alice@acme.example", f"bob@{ORG}") for _ in range(2)],
    ]

    async def scenario(gw: Gateway, post: Any) -> None:
        for batch in batches:
            await post(batch)

    run = assert_alike(
        await run_both(tmp_path, scenario, submit_rate=lambda: RateLimiter(rate=0.5, burst=3))
    )
    assert [status for status, _, _ in run.answers] == [400, 200, 429]
    assert run.answers[0][1]["error"] == "protocol_error"
    assert run.answers[2][1]["error"] == "rate_limited"
    assert run.answers[2][2] is not None


async def test_full_lanes_and_mailboxes_are_alike(tmp_path: Path) -> None:
    batches: list[list[Element]] = [
        [envelope("alice@acme.example", f"u{n}@{GLOBEX}") for n in range(3)],
        [envelope("alice@acme.example", f"dave@{ORG}") for _ in range(2)],
        [
            envelope("alice@acme.example", f"x@{GLOBEX}"),  # lane full
            envelope("alice@acme.example", f"bob@{ORG}"),  # room
            envelope("alice@acme.example", f"dave@{ORG}"),  # mailbox full
        ],
    ]

    async def scenario(gw: Gateway, post: Any) -> None:
        for batch in batches:
            await post(batch)

    run = assert_alike(
        await run_both(
            tmp_path, scenario, lane_bound=Bound(3, 10**6), mailbox_bound=Bound(2, 10**6)
        )
    )
    last = results(run, 2)
    assert [r.get("status") or r.get("error") for r in last] == [
        "lane_full",
        "delivered",
        "mailbox_full",
    ]
    assert run.answers[2][2] is not None  # Retry-After


# -- what only the binary body can get wrong ------------------------------------------------------
async def post_binary(gw: Gateway, body: bytes) -> httpx.Response:
    return await gw.client.post(
        "/v1/envelopes/batch",
        content=body,
        headers={"content-type": MEDIA_TYPE_BATCH_V1, **gw.auth("alice")},
    )


async def test_a_broken_frame_is_400_saying_where_and_stores_nothing(tmp_path: Path) -> None:
    async for gw in _start(tmp_path, ssl_context=None, client_verify=None):
        env = envelope("alice@acme.example", f"bob@{ORG}")
        body = encode_batch([encode_envelope(env)])
        submissions = sample("gateway_clientapi_submissions_total", result="accepted")
        answer = await post_binary(gw, body[:-1])
        assert answer.status_code == 400
        assert answer.json()["error"] == "protocol_error"
        assert "envelope #1's length" in answer.json()["message"]
        assert "(at offset 10)" in answer.json()["message"]
        await gw.assert_nothing_stored(env)
        assert sample("gateway_clientapi_submissions_total", result="accepted") == submissions
        answer = await post_binary(gw, body + b"\x00")
        assert answer.status_code == 400
        assert "follow the last envelope" in answer.json()["message"]


async def test_a_record_not_in_canonical_form_costs_only_its_slot(tmp_path: Path) -> None:
    async for gw in _start(tmp_path, ssl_context=None, client_verify=None):
        good, padded, reordered = (envelope("alice@acme.example", f"bob@{ORG}") for _ in range(3))
        records = [
            encode_envelope(good),
            json.dumps(padded.to_json(), sort_keys=True).encode(),  # whitespace
            json.dumps(reordered.to_json(), separators=(",", ":")).encode(),  # key order
            b"\xff not ascii",
            b"x" * (MAX_ENCODED_ENVELOPE_BYTES + 1),
        ]
        answer = await post_binary(gw, encode_batch(records))
        assert answer.status_code == 200
        got = answer.json()["results"]
        assert got[0] == {"id": good.id, "status": "delivered"}
        assert [(r["id"], r["error"]) for r in got[1:]] == [
            (padded.id, "envelope_malformed"),
            (reordered.id, "envelope_malformed"),
            (None, "envelope_malformed"),
            (None, "envelope_too_large"),
        ]
        assert "record #2 is not its envelope's canonical encoding" in got[1]["message"]
        assert "record #4 is not JSON" in got[3]["message"]
        await gw.assert_nothing_stored(padded)
        await gw.assert_nothing_stored(reordered)
        [stored] = await gw.store.mailbox_fetch(f"bob@{ORG}", limit=10)
        assert stored.data == encode_envelope(good.with_group("engineering"))


async def test_another_content_type_is_415_and_counted_apart(tmp_path: Path) -> None:
    async for gw in _start(tmp_path, ssl_context=None, client_verify=None):
        env = envelope("alice@acme.example", f"bob@{ORG}")
        binary_before = sample("gateway_clientapi_batch_bodies_total", format="binary_v1")
        json_before = sample("gateway_clientapi_batch_bodies_total", format="json")
        answer = await gw.client.post(
            "/v1/envelopes/batch",
            content=encode_batch([encode_envelope(env)]),
            headers={"content-type": "application/octet-stream", **gw.auth("alice")},
        )
        assert answer.status_code == 415
        assert answer.json()["error"] == "unsupported_media_type"
        await gw.assert_nothing_stored(env)
        assert (await post_binary(gw, encode_batch([encode_envelope(env)]))).status_code == 200
        no_type = await gw.client.post(
            "/v1/envelopes/batch",
            content=b'{"envelopes":[' + encode_envelope(env) + b"]}",
            headers=gw.auth("alice"),
        )
        assert no_type.json()["results"] == [{"id": env.id, "status": "delivered"}]
        assert sample("gateway_clientapi_batch_bodies_total", format="binary_v1") == (
            binary_before + 1
        )
        assert sample("gateway_clientapi_batch_bodies_total", format="json") == json_before + 1


async def test_the_reference_session_submits_binary_batches(tmp_path: Path) -> None:
    async for gw in _start(tmp_path, ssl_context=None, client_verify=None):
        batch = [envelope("alice@acme.example", f"bob@{ORG}") for _ in range(3)]
        binary_before = sample("gateway_clientapi_batch_bodies_total", format="binary_v1")
        async with ClientSession(str(gw.client.base_url), gw.tokens["alice"]) as session:
            answers = await session.submit_batch(batch)
            assert session.binary_batches
        assert [(a.envelope_id, a.status) for a in answers] == [(e.id, "delivered") for e in batch]
        assert sample("gateway_clientapi_batch_bodies_total", format="binary_v1") == (
            binary_before + 1
        )
        stored = {
            e.envelope_id: e.data for e in await gw.store.mailbox_fetch(f"bob@{ORG}", limit=9)
        }
        assert stored == {e.id: encode_envelope(e.with_group("engineering")) for e in batch}
