"""The federation hot path's shortcuts give exactly the bytes of the obvious encodings.

* :func:`splice_transaction` (the sender joins the spool's canonical envelope
  bytes) is byte for byte :func:`encode_transaction`, and both are what
  ``json.dumps`` writes for the transaction object;
* :func:`spliced_body_holds` passes a sound spliced body and refuses every
  damaged one that would break the transaction or shift its slots;
* :func:`canonical_envelope_bytes` of the JSON object a receiver parsed (what
  it stores) is byte for byte ``encode_envelope`` of the envelope, group
  included, whatever whitespace and key order the peer used;
* :func:`encode_results` is byte for byte ``json.dumps`` of the answer.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.address import Address
from gateway.core.envelope import Envelope, encode_envelope, new_envelope_id
from gateway.errors import EnvelopeError
from gateway.federation.protocol import (
    EnvelopeResult,
    canonical_envelope_bytes,
    decode_transaction,
    encode_results,
    encode_transaction,
    splice_transaction,
    spliced_body_holds,
)
from gateway.federation.receiver import mailbox_record

ACME, GLOBEX = "acme.example", "globex.example"
NOW = 1_700_000_000_000
DAY = 86_400_000

users = st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True) | st.sampled_from(["a.b", "x_y-z", "0"])
groups = st.none() | st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    created = draw(st.integers(0, 2**50))
    return Envelope(
        version=1,
        id=new_envelope_id(),
        sender=Address.parse(f"{draw(users)}@{GLOBEX}"),
        recipient=Address.parse(f"{draw(users)}@{ACME}"),
        created=created,
        expires=created + draw(st.integers(1, 366 * DAY)),
        burn_on_read=draw(st.booleans()),
        ciphertext=draw(st.binary(min_size=1, max_size=300)),
        signature=draw(st.binary(min_size=64, max_size=64)),
        group=draw(groups),
    )


def reference_body(origin: str, destination: str, sent: list[Envelope]) -> bytes:
    """The transaction as plain json.dumps writes it, each envelope in canonical key order."""
    objects = [json.loads(encode_envelope(env)) for env in sent]
    body = {"origin": origin, "destination": destination, "envelopes": objects}
    return json.dumps(body, separators=(",", ":")).encode()


# -- the sender's spliced bodies ---------------------------------------------------------


@given(st.lists(envelopes(), max_size=6))
def test_a_spliced_body_is_byte_for_byte_the_encoded_transaction(sent: list[Envelope]) -> None:
    spliced = splice_transaction(ACME, GLOBEX, [encode_envelope(env) for env in sent])
    assert spliced == encode_transaction(ACME, GLOBEX, sent)
    assert spliced == reference_body(ACME, GLOBEX, sent)
    assert spliced_body_holds(spliced, [env.id for env in sent])
    # ...and the receiver reads back every envelope, group included.
    txn = decode_transaction(spliced)
    assert (txn.origin, txn.destination) == (ACME, GLOBEX)
    assert [slot.envelope for slot in txn.slots] == sent


def test_the_body_keeps_the_documented_field_order() -> None:
    env = Envelope(
        version=1,
        id="AAECAwQFBgcICQoLDA0ODw",
        sender=Address.parse("alice@acme.example"),
        recipient=Address.parse("bob@globex.example"),
        created=1,
        expires=2,
        burn_on_read=True,
        ciphertext=b"\x00\x01\x02",
        signature=bytes(64),
        group="eng",
    )
    body = splice_transaction(ACME, GLOBEX, [encode_envelope(env), encode_envelope(env)])
    one = (
        b'{"burn_on_read":true,"ciphertext":"AAEC","created":1,"expires":2,'
        b'"from":"alice@acme.example","group":"eng","id":"AAECAwQFBgcICQoLDA0ODw",'
        b'"signature":"' + b"A" * 86 + b'","to":"bob@globex.example","v":1}'
    )
    assert body == (
        b'{"origin":"acme.example","destination":"globex.example","envelopes":['
        + one
        + b","
        + one
        + b"]}"
    )
    assert splice_transaction(ACME, GLOBEX, []) == (
        b'{"origin":"acme.example","destination":"globex.example","envelopes":[]}'
    )


def _good(n: int) -> list[Envelope]:
    return [
        Envelope(
            version=1,
            id=new_envelope_id(),
            sender=Address.parse("alice@acme.example"),
            recipient=Address.parse("bob@globex.example"),
            created=NOW,
            expires=NOW + DAY,
            burn_on_read=False,
            ciphertext=bytes([i + 1]) * 40,
            signature=bytes(64),
            group="engineering",
        )
        for i in range(n)
    ]


def _damaged() -> list[tuple[str, bytes]]:
    first, second = (encode_envelope(env) for env in _good(2))
    return [
        ("truncated", first[:-20]),
        ("empty", b""),
        ("two objects in one entry", first + b"," + second),
        ("not an object", b"17"),
        ("not UTF-8", first[:10] + b"\xff" + first[11:]),
        ("NaN", first[:-1] + b',"x":NaN}'),
        ("duplicate key", first[:-1] + b',"v":1}'),
        ("closes the array and adds a field", b'1],"extra":[2'),
        ("closes the array and repeats a field", b'1],"envelopes":[' + first),
        ("deeply nested", b"[" * 100_000 + b"]" * 100_000),
    ]


@pytest.mark.parametrize(("case", "bad"), _damaged(), ids=[case for case, _ in _damaged()])
def test_a_damaged_entry_makes_the_spliced_body_unsound(case: str, bad: bytes) -> None:
    good = _good(3)
    datas = [encode_envelope(env) for env in good]
    ids = [env.id for env in good]
    assert spliced_body_holds(splice_transaction(ACME, GLOBEX, datas), ids)
    datas[1] = bad
    assert not spliced_body_holds(splice_transaction(ACME, GLOBEX, datas), ids), case


def test_an_entry_holding_another_id_or_in_another_place_is_caught() -> None:
    good = _good(3)
    datas = [encode_envelope(env) for env in good]
    ids = [env.id for env in good]
    assert not spliced_body_holds(splice_transaction(ACME, GLOBEX, datas), ids[::-1])
    assert not spliced_body_holds(splice_transaction(ACME, GLOBEX, datas), ids[:2])
    assert not spliced_body_holds(splice_transaction(ACME, GLOBEX, datas[:2]), ids)
    other = encode_envelope(_good(1)[0])
    assert not spliced_body_holds(splice_transaction(ACME, GLOBEX, [*datas[:2], other]), ids)


# -- the receiver's stored bytes -----------------------------------------------------------


def _reformatted(env: Envelope, rng: random.Random) -> bytes:
    """The envelope as a partner may write it: any key order, any whitespace."""
    items = list(env.to_json().items())
    rng.shuffle(items)
    text = json.dumps(dict(items), indent=rng.choice([None, 0, 2]), ensure_ascii=False)
    return text.encode()


@given(st.lists(envelopes(), min_size=1, max_size=5), st.integers(0, 2**32))
def test_stored_bytes_are_byte_for_byte_encode_envelope(sent: list[Envelope], seed: int) -> None:
    rng = random.Random(seed)
    body = (
        b'{"envelopes": ['
        + b", ".join(_reformatted(env, rng) for env in sent)
        + b'], "destination": "acme.example", "origin": "globex.example"}'
    )
    txn = decode_transaction(body)
    for slot, env in zip(txn.slots, sent, strict=True):
        assert slot.envelope == env
        assert slot.raw is not None
        assert canonical_envelope_bytes(slot.raw) == encode_envelope(env)
        record = mailbox_record(env, raw=slot.raw)
        assert record.data == encode_envelope(env) == mailbox_record(env).data
        assert (b'"group":' in record.data) == (env.group is not None)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)


@given(st.data())
def test_whatever_an_envelope_object_holds_if_it_is_accepted_its_bytes_are_canonical(
    data: st.DataObject,
) -> None:
    """Mutate one field of a valid object: accepted ones still dump to encode_envelope's bytes."""
    env = data.draw(envelopes())
    raw: dict[str, object] = dict(env.to_json())
    key = data.draw(st.sampled_from([*raw, "group", "extra"]))
    variants: list[object] = [
        data.draw(json_scalars),
        str(raw.get(key, "")).upper(),
        str(raw.get(key, "")) + "=",
        str(raw.get(key, "")) + " ",
        1 if raw.get(key) is True else True,
    ]
    raw[key] = data.draw(st.sampled_from(variants))
    try:
        parsed = Envelope.from_json(raw)
    except EnvelopeError:
        return
    assert canonical_envelope_bytes(raw) == encode_envelope(parsed)


# -- answers -------------------------------------------------------------------------------


results_strategy = st.lists(
    st.builds(
        EnvelopeResult,
        st.none()
        | st.from_regex(r"[A-Za-z0-9_-]{22}", fullmatch=True)
        | st.text(min_size=1, max_size=64),
        st.sampled_from(["accepted", "peer_not_allowed", "envelope_malformed"])
        | st.text(max_size=10),
    ),
    max_size=20,
)


@given(results_strategy)
def test_the_answer_is_byte_for_byte_what_json_dumps_writes(
    results: list[EnvelopeResult],
) -> None:
    reference = json.dumps(
        {"results": [{"id": r.envelope_id, "result": r.result} for r in results]},
        separators=(",", ":"),
    ).encode()
    assert encode_results(results) == reference
