"""The two forms of a mailbox answer, and the choice between them (no I/O).

``GET /v1/mailbox`` answers the same envelopes, in the same order, in one of
two bodies (docs/client-api.md, "The binary answer"):

* JSON, ``{"envelopes": [...]}``: each stored envelope's bytes (its canonical
  encoding, docs/envelope.md §1) spliced in as an element, never re-encoded;
* the binary batch framing, ``application/vnd.gateway.batch.v1``
  (:mod:`gateway.core.batchframe`): each stored envelope's bytes as one
  record, exactly as kept; an empty mailbox is the header with count 0.

The request's ``Accept`` chooses (:func:`answer_media_type`, the field read
by :mod:`gateway.http.accept`): the form of the higher weight (``q``); of two
equal weights above 0, the binary answer if the field names its type, else
JSON. So no field, ``*/*``, ``application/*`` or ``application/json`` is JSON,
the bytes a client that never heard of the binary answer always got;
``application/vnd.gateway.batch.v1``, alone or beside those at no higher
weight, is binary; a field that accepts neither is ``406 not_acceptable``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, encode_batch
from gateway.errors import Reason
from gateway.http import Request, Response, json_response
from gateway.http.accept import acceptance
from gateway.http.messages import JSON_CONTENT_TYPE

#: An answer's media type -> its label in gateway_clientapi_mailbox_answers_total.
ANSWER_FORMATS: Final = {JSON_CONTENT_TYPE: "json", MEDIA_TYPE_BATCH_V1: "binary_v1"}

_JSON_HEADERS: Final = [("content-type", JSON_CONTENT_TYPE)]
_BINARY_HEADERS: Final = [("content-type", MEDIA_TYPE_BATCH_V1)]


def accept_field(request: Request) -> str | None:
    """The request's ``Accept``, its repeated fields joined as one list (RFC 9110 §5.3)."""
    values = [value for name, value in request.headers if name == "accept"]
    if not values:
        return None
    return values[0] if len(values) == 1 else ", ".join(values)


def answer_media_type(accept: str | None) -> str | None:
    """The media type to answer a fetch with; ``None`` when the field accepts neither (406)."""
    if accept is None or accept == "*/*":  # what nearly every request says: at once
        return JSON_CONTENT_TYPE
    binary = acceptance(accept, MEDIA_TYPE_BATCH_V1)
    as_json = acceptance(accept, JSON_CONTENT_TYPE)
    # A tie goes to the binary answer only when the field named it: "*/*" alone is JSON.
    if binary.quality > as_json.quality or (binary.named and 0 < binary.quality == as_json.quality):
        return MEDIA_TYPE_BATCH_V1
    if as_json.quality > 0:
        return JSON_CONTENT_TYPE
    return None


def not_acceptable() -> Response:
    """``406``: the caller's ``Accept`` allows neither answer; the body is JSON all the same."""
    return json_response(
        406,
        {
            "error": Reason.NOT_ACCEPTABLE.value,
            "message": f"the mailbox answers {JSON_CONTENT_TYPE} or {MEDIA_TYPE_BATCH_V1}",
        },
    )


def mailbox_answer(media_type: str, stored: Sequence[bytes]) -> Response:
    """``200`` with the stored envelopes' bytes, oldest first, in the chosen form."""
    if media_type == MEDIA_TYPE_BATCH_V1:
        return Response(200, list(_BINARY_HEADERS), encode_batch(stored))
    # The stored bytes are encode_envelope()'s compact JSON: spliced, not re-encoded,
    # in one join (concatenating around a join copied a 6 MiB answer three times).
    parts = [b'{"envelopes":[']
    for data in stored:
        parts += (data, b",")
    if stored:
        parts.pop()  # the comma after the last
    parts.append(b"]}")
    return Response(200, list(_JSON_HEADERS), b"".join(parts))
