"""ClientSession.fetch: asks for the binary answer, reads the form the answer names.

An older gateway ignores ``Accept`` and answers JSON: the session reads the
answer's ``Content-Type``, never assumes (docs/client-api.md, "The binary answer").
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from gateway.client.api import FETCH_ACCEPT, ClientTransportError
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, encode_batch
from gateway.core.envelope import Envelope, encode_envelope
from gateway.errors import EnvelopeError
from tests.unit.test_client_session_batches import envelope, session_on

STORED = [
    envelope().with_group("engineering"),
    dataclasses.replace(envelope(), burn_on_read=True).with_group("engineering"),
]
RECORDS = [encode_envelope(e) for e in STORED]


def binary(records: list[bytes], content_type: str = MEDIA_TYPE_BATCH_V1) -> httpx.Response:
    return httpx.Response(
        200, content=encode_batch(records), headers={"content-type": content_type}
    )


def as_json(records: list[bytes]) -> httpx.Response:
    body = b'{"envelopes":[' + b",".join(records) + b"]}"
    return httpx.Response(200, content=body, headers={"content-type": "application/json"})


def cut(answer: httpx.Response) -> httpx.Response:
    """``answer`` less its last byte."""
    content_type = answer.headers["content-type"]
    return httpx.Response(200, content=answer.content[:-1], headers={"content-type": content_type})


async def fetch_from(
    answer: httpx.Response, *, limit: int = 100
) -> tuple[list[Envelope], httpx.Request]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    session = session_on(httpx.MockTransport(handle))
    try:
        got = await session.fetch(wait=5, limit=limit)
    finally:
        await session.aclose()
    return got, seen[0]


async def test_the_fetch_asks_for_the_binary_answer_and_reads_it() -> None:
    got, request = await fetch_from(binary(RECORDS))
    assert got == STORED
    assert [encode_envelope(e) for e in got] == RECORDS
    assert request.headers["accept"] == FETCH_ACCEPT
    assert request.headers["authorization"] == "Bearer gwt_token"
    assert request.url.params["wait"] == "5"
    assert request.url.params["limit"] == "100"


async def test_a_json_answer_from_an_older_gateway_is_read_as_json() -> None:
    got, _ = await fetch_from(as_json(RECORDS))
    assert got == STORED
    # The media type decides, with any parameters and in any case.
    got, _ = await fetch_from(binary(RECORDS, f"{MEDIA_TYPE_BATCH_V1.upper()}; x=1"))
    assert got == STORED


async def test_empty_answers_in_both_forms() -> None:
    assert (await fetch_from(binary([])))[0] == []
    assert (await fetch_from(as_json([])))[0] == []


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (cut(binary(RECORDS)), "runs past the end of the body"),
        (binary([b"not json"]), "record #1 of the answer is not JSON"),
        (binary(RECORDS * 2), "an answer holds 0 to 3 envelopes"),
        (cut(as_json(RECORDS)), "answer is not JSON"),
    ],
)
async def test_a_broken_answer_is_a_transport_error(answer: httpx.Response, message: str) -> None:
    with pytest.raises(ClientTransportError, match=message):
        await fetch_from(answer, limit=3)


async def test_a_record_that_is_no_envelope_is_an_envelope_error_as_in_json() -> None:
    with pytest.raises(EnvelopeError):
        await fetch_from(binary([b'{"v":1}']))
    with pytest.raises(EnvelopeError):
        await fetch_from(as_json([b'{"v":1}']))
