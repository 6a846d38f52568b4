"""ClientSession.submit_batch: the binary batch first, JSON after a 415 (an older gateway)."""

from __future__ import annotations

import json

import httpx

from gateway.client.api import ClientSession
from gateway.core.address import Address
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, decode_batch
from gateway.core.envelope import Envelope, encode_envelope, new_envelope_id


def envelope() -> Envelope:
    return Envelope(
        version=1,
        id=new_envelope_id(),
        sender=Address.parse("alice@acme.example"),
        recipient=Address.parse("bob@globex.example"),
        created=1_700_000_000_000,
        expires=1_700_086_400_000,
        burn_on_read=False,
        ciphertext=b"\x01" * 100,
        signature=b"\x02" * 64,
    )


def session_on(handler: httpx.MockTransport) -> ClientSession:
    session = ClientSession("http://gateway.test", "gwt_token")
    session._http = httpx.AsyncClient(
        base_url="http://gateway.test", transport=handler, headers=session._http.headers
    )
    return session


def answer_all(ids: list[str]) -> httpx.Response:
    return httpx.Response(200, json={"results": [{"id": i, "status": "queued"} for i in ids]})


async def test_a_batch_goes_as_records_of_the_canonical_encodings() -> None:
    seen: list[httpx.Request] = []
    batch = [envelope(), envelope()]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        records = decode_batch(request.content, max_envelopes=256)
        assert records == [encode_envelope(e) for e in batch]
        return answer_all([e.id for e in batch])

    session = session_on(httpx.MockTransport(handle))
    answers = await session.submit_batch(batch)
    assert [a.envelope_id for a in answers] == [e.id for e in batch]
    assert all(a.ok for a in answers)
    assert seen[0].headers["content-type"] == MEDIA_TYPE_BATCH_V1
    assert seen[0].headers["authorization"] == "Bearer gwt_token"
    await session.aclose()


async def test_a_415_makes_the_session_send_json_from_then_on() -> None:
    types: list[str] = []
    batch = [envelope()]

    def older_gateway(request: httpx.Request) -> httpx.Response:
        types.append(request.headers["content-type"])
        if request.headers["content-type"] != "application/json":
            return httpx.Response(415, json={"error": "unsupported_media_type"})
        body = json.loads(request.content)
        return answer_all([item["id"] for item in body["envelopes"]])

    session = session_on(httpx.MockTransport(older_gateway))
    assert [a.envelope_id for a in await session.submit_batch(batch)] == [batch[0].id]
    assert [a.envelope_id for a in await session.submit_batch(batch)] == [batch[0].id]
    assert types == [MEDIA_TYPE_BATCH_V1, "application/json", "application/json"]
    assert session.binary_batches is False
    await session.aclose()
