"""The elements of a batch body, JSON or binary: each an envelope to check, or its refusal."""

from __future__ import annotations

from typing import Final

from gateway.clientapi.outcomes import Refused, Submitted
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1
from gateway.core.envelope import MAX_ENCODED_ENVELOPE_BYTES, Envelope, encode_validated
from gateway.core.records import decode_envelope_record_json
from gateway.errors import EnvelopeError, Reason
from gateway.http.messages import JSON_CONTENT_TYPE

#: A batch body's media type -> its label in gateway_clientapi_batch_bodies_total.
BATCH_FORMATS: Final = {JSON_CONTENT_TYPE: "json", MEDIA_TYPE_BATCH_V1: "binary_v1"}
MAX_SHOWN_ID: Final = 64  # a refused element's claimed id is answered up to this length


def batch_media_type(content_type: str | None) -> str | None:
    """The batch format of a body with this Content-Type; None for one not taken (415).

    No Content-Type, or ``application/json`` with any parameters, is JSON (as
    before the binary batch existed).
    """
    if content_type is None:
        return JSON_CONTENT_TYPE
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type if media_type in BATCH_FORMATS else None


def element_item(obj: object) -> Submitted | Refused:
    """One element of a batch, a JSON value: the envelope it is, or its refusal."""
    try:
        env = Envelope.from_json(obj)
    except EnvelopeError as exc:
        claimed = obj.get("id") if isinstance(obj, dict) else None
        shown = claimed if isinstance(claimed, str) and len(claimed) <= MAX_SHOWN_ID else None
        return Refused(shown, 400, exc.reason, exc.message)
    # from_json accepts only a dict; the object is kept to encode from.
    return Submitted(env, obj if isinstance(obj, dict) else None)


def record_item(index: int, data: bytes) -> Submitted | Refused:
    """Record ``#index`` of a binary batch: judged as the JSON element it holds, once.

    A record must be its envelope's canonical encoding (docs/envelope.md §1),
    so that the bytes received are the bytes kept: compared, then stored.
    """
    if len(data) > MAX_ENCODED_ENVELOPE_BYTES:  # not parsed
        return Refused(
            None,
            400,
            Reason.ENVELOPE_TOO_LARGE,
            f"record #{index} is {len(data)} bytes; at most {MAX_ENCODED_ENVELOPE_BYTES}",
        )
    try:
        obj = decode_envelope_record_json(data)
    except ValueError:
        return Refused(
            None, 400, Reason.ENVELOPE_MALFORMED, f"record #{index} is not JSON in ASCII"
        )
    item = element_item(obj)
    if isinstance(item, Refused) or item.raw is None:
        return item
    if encode_validated(item.raw, item.env.group) != data:
        return Refused(
            item.env.id,
            400,
            Reason.ENVELOPE_MALFORMED,
            f"record #{index} is not its envelope's canonical encoding (docs/envelope.md §1)",
        )
    return Submitted(item.env, item.raw, data)
