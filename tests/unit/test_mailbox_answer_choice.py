"""Which form a mailbox fetch is answered in: the Accept field read, the choice made (pure).

:mod:`gateway.http.accept` reads the field (RFC 9110 §12.5.1, kept small);
:func:`gateway.clientapi.fetch_answer.answer_media_type` chooses JSON, the
binary answer, or ``None`` (406). docs/client-api.md, "The binary answer",
states the rule these tables hold the code to.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.clientapi.fetch_answer import (
    accept_field,
    answer_media_type,
    mailbox_answer,
    not_acceptable,
)
from gateway.core.batchframe import MEDIA_TYPE_BATCH_V1, decode_answer
from gateway.http import Request
from gateway.http.accept import Acceptance, acceptance

JSON = "application/json"
BINARY = MEDIA_TYPE_BATCH_V1


@pytest.mark.parametrize(
    ("accept", "media_type", "expected"),
    [
        (None, JSON, Acceptance(1.0, named=False)),
        ("", JSON, Acceptance(1.0, named=False)),  # no media range in it: no field
        (" , ", BINARY, Acceptance(1.0, named=False)),
        ("*/*", JSON, Acceptance(1.0, named=False)),
        ("application/*", BINARY, Acceptance(1.0, named=False)),
        ("text/*", JSON, Acceptance(0.0, named=False)),
        ("application/json", JSON, Acceptance(1.0, named=True)),
        ("Application/JSON; charset=utf-8", JSON, Acceptance(1.0, named=True)),
        ("application/json", BINARY, Acceptance(0.0, named=False)),
        ("application/json;q=0.5", JSON, Acceptance(0.5, named=True)),
        ("application/json; Q=0.25; ext=1", JSON, Acceptance(0.25, named=True)),
        ("application/json;q=0", JSON, Acceptance(0.0, named=True)),
        ("application/json;q=1.000", JSON, Acceptance(1.0, named=True)),
        # the most specific range decides, whatever the weights of the others
        ("*/*;q=0.1, application/*;q=0.2, application/json;q=0.3", JSON, Acceptance(0.3, True)),
        ("application/json;q=0, */*", JSON, Acceptance(0.0, named=True)),
        ("application/json;q=0, */*", BINARY, Acceptance(1.0, named=False)),
        ("application/*;q=0.4, */*;q=0.9", BINARY, Acceptance(0.4, named=False)),
        # equally specific: the highest weight
        ("application/json;q=0.2, application/json;q=0.7", JSON, Acceptance(0.7, True)),
        # not a media range, or not a qvalue: skipped
        ("json, application/json;q=0.5", JSON, Acceptance(0.5, named=True)),
        ("*/json, application/json;q=0.5", JSON, Acceptance(0.5, named=True)),
        ("application/json;q=2, text/plain", JSON, Acceptance(0.0, named=False)),
        ("application/json;q=0.1234, text/plain", JSON, Acceptance(0.0, named=False)),
        ("application/json;q=abc", JSON, Acceptance(1.0, named=False)),  # nothing left: no field
    ],
)
def test_what_the_field_says_of_a_media_type(
    accept: str | None, media_type: str, expected: Acceptance
) -> None:
    assert acceptance(accept, media_type) == expected


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        # what clients that never heard of the binary answer send: JSON, as always
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/*", JSON),
        ("application/json", JSON),
        ("application/json, text/plain, */*", JSON),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", JSON),
        # the binary type named: binary, unless JSON weighs more
        (BINARY, BINARY),
        (BINARY.upper(), BINARY),
        (f"{BINARY}, application/json;q=0.5", BINARY),
        (f"application/json;q=0.5, {BINARY}", BINARY),
        (f"application/json, {BINARY}", BINARY),  # a tie, named: binary
        (f"*/*, {BINARY}", BINARY),
        (f"{BINARY};q=0.3, */*;q=0.3", BINARY),
        (f"{BINARY};q=0.5, application/json", JSON),
        (f"{BINARY};q=0.5, */*", JSON),
        (f"{BINARY};q=0, application/json", JSON),
        # JSON refused, anything else welcome: the binary answer is what is left
        ("application/json;q=0, */*", BINARY),
        # neither: 406
        ("text/html", None),
        ("application/json;q=0", None),
        (f"{BINARY};q=0", None),
        (f"{BINARY};q=0, application/json;q=0, */*", None),
        ("*/*;q=0", None),
        ("application/xml, image/*", None),
    ],
)
def test_the_form_chosen(accept: str | None, chosen: str | None) -> None:
    assert answer_media_type(accept) == chosen


@given(st.text(max_size=80))
def test_any_field_gives_a_form_or_none(accept: str) -> None:
    assert answer_media_type(accept) in {JSON, BINARY, None}


def test_repeated_fields_are_one_list() -> None:
    def request(*values: str) -> Request:
        return Request("GET", "/v1/mailbox", headers=[("accept", v) for v in values])

    assert accept_field(request()) is None
    assert accept_field(request("application/json")) == "application/json"
    joined = accept_field(request("text/html", BINARY))
    assert joined == f"text/html, {BINARY}"
    assert answer_media_type(joined) == BINARY


def test_both_forms_carry_the_stored_bytes_as_they_are() -> None:
    stored = [b'{"a":1}', b'{"b":"' + b"x" * 70_000 + b'"}']
    as_json = mailbox_answer(JSON, stored)
    assert (as_json.status, as_json.headers) == (200, [("content-type", JSON)])
    assert as_json.body == b'{"envelopes":[' + stored[0] + b"," + stored[1] + b"]}"
    binary = mailbox_answer(BINARY, stored)
    assert (binary.status, binary.headers) == (200, [("content-type", BINARY)])
    assert decode_answer(binary.body, max_envelopes=2) == stored
    empty = mailbox_answer(BINARY, [])
    assert empty.body == bytes.fromhex("47574254010000000000")
    assert mailbox_answer(JSON, []).body == b'{"envelopes":[]}'
    refused = not_acceptable()
    assert refused.status == 406
    assert b'"error":"not_acceptable"' in refused.body
