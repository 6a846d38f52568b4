"""The federation codec and the receiver's per-envelope judgement: pure, no network.

The codec must turn any bytes into a transaction or a ``ProtocolError`` and
nothing else; a broken envelope must cost only its own slot; the answer to a
transaction must be rebuildable, exactly, from the body and the stored
``{id: result}`` record. ``judge_transaction`` must apply the checks of
docs/protocol.md §4 in their order.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.address import Address
from gateway.core.envelope import Envelope, new_envelope_id
from gateway.core.rules import CompiledRules, load_rules
from gateway.errors import ProtocolError, Reason
from gateway.federation.protocol import (
    MAX_TRANSACTION_ENVELOPES,
    SERVER_NAME,
    EnvelopeResult,
    body_hash,
    check_txn_id,
    decode_results,
    decode_transaction,
    encode_results,
    encode_transaction,
    replay_results,
    result_map,
    version_document,
)
from gateway.federation.receiver import judge_transaction, mailbox_record
from gateway.pki import dev

ACME, GLOBEX, INITECH = "acme.example", "globex.example", "initech.example"
NOW = 1_700_000_000_000
HOUR = 3_600_000
DAY = 24 * HOUR


def envelope(
    sender: str = "alice@globex.example",
    recipient: str = "bob@acme.example",
    *,
    group: str | None = "engineering",
    created: int = NOW - 1000,
    ttl: int = DAY,
    size: int = 100,
    burn_on_read: bool = False,
    envelope_id: str | None = None,
) -> Envelope:
    return Envelope(
        version=1,
        id=envelope_id or new_envelope_id(),
        sender=Address.parse(sender),
        recipient=Address.parse(recipient),
        created=created,
        expires=created + ttl,
        burn_on_read=burn_on_read,
        ciphertext=b"\x01" * size,
        signature=b"\x02" * 64,
        group=group,
    )


def body_of(*items: object, origin: str = GLOBEX, destination: str = ACME) -> bytes:
    return json.dumps({"origin": origin, "destination": destination, "envelopes": items}).encode()


# -- decoding transactions -----------------------------------------------------------


def test_round_trip_keeps_every_envelope_in_order() -> None:
    sent = [envelope(), envelope(group=None), envelope(burn_on_read=True, size=1)]
    txn = decode_transaction(encode_transaction(GLOBEX, ACME, sent))
    assert (txn.origin, txn.destination) == (GLOBEX, ACME)
    assert [slot.envelope for slot in txn.slots] == sent
    assert [slot.envelope_id for slot in txn.slots] == [env.id for env in sent]
    assert all(slot.error is None for slot in txn.slots)


@given(
    st.lists(
        st.builds(
            envelope,
            group=st.none() | st.sampled_from(["engineering", "sales", "a-b_c"]),
            size=st.integers(1, 300),
            ttl=st.integers(1, 366 * DAY),
            burn_on_read=st.booleans(),
        ),
        max_size=8,
    )
)
def test_round_trip_property(sent: list[Envelope]) -> None:
    txn = decode_transaction(encode_transaction(INITECH, ACME, sent))
    assert [slot.envelope for slot in txn.slots] == sent


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff{}", "not UTF-8"),
        (b'{"envelopes": NaN}', "not JSON"),
        (b'{"envelopes": Infinity}', "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b'{"origin": "globex.example", "origin": "globex.example"}', "duplicate key"),
        (b'{"origin": "globex.example", "destination": "acme.example"}', "missing field"),
        (body_of()[:-1] + b', "extra": 1}', "unknown field(s): 'extra'"),
        (body_of(origin="not a domain"), "'origin'"),
        (body_of(destination="acme"), "'destination'"),
        (b'{"origin": 1, "destination": "acme.example", "envelopes": []}', "must be a string"),
        (
            b'{"origin": "globex.example", "destination": "acme.example", "envelopes": {}}',
            "must be a list",
        ),
    ],
)
def test_what_is_not_a_transaction_is_a_protocol_error(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_transaction(body)
    assert message in info.value.message
    assert info.value.reason is Reason.PROTOCOL


def test_an_empty_transaction_is_one() -> None:
    assert decode_transaction(body_of()).slots == ()


def test_org_names_are_normalized() -> None:
    txn = decode_transaction(body_of(origin="GLOBEX.example.", destination="Acme.Example"))
    assert (txn.origin, txn.destination) == (GLOBEX, ACME)


def test_envelope_count_is_bounded_by_the_receiver_and_by_the_protocol() -> None:
    raw = envelope().to_json()
    assert len(decode_transaction(body_of(*[raw] * 3), max_envelopes=3).slots) == 3
    with pytest.raises(ProtocolError, match="holds 4 envelopes; at most 3"):
        decode_transaction(body_of(*[raw] * 4), max_envelopes=3)
    too_many = body_of(*[{}] * (MAX_TRANSACTION_ENVELOPES + 1))
    with pytest.raises(ProtocolError, match=f"at most {MAX_TRANSACTION_ENVELOPES}"):
        decode_transaction(too_many, max_envelopes=10 * MAX_TRANSACTION_ENVELOPES)


def test_a_broken_envelope_costs_only_its_own_slot() -> None:
    good = envelope()
    bad_version = {**envelope().to_json(), "v": 3}
    no_signature = {k: v for k, v in envelope().to_json().items() if k != "signature"}
    dup_key_text = json.dumps(envelope().to_json())[:-1] + ', "v": 1}'
    body = (
        b'{"origin": "globex.example", "destination": "acme.example", "envelopes": ['
        + b",".join(
            [
                json.dumps(good.to_json()).encode(),
                json.dumps(bad_version).encode(),
                json.dumps(no_signature).encode(),
                dup_key_text.encode(),
                b'"not an object"',
                json.dumps({"id": "x" * 65}).encode(),
                json.dumps({"id": ""}).encode(),
                json.dumps({"id": 7}).encode(),
            ]
        )
        + b"]}"
    )
    slots = decode_transaction(body).slots
    assert slots[0].envelope == good
    assert [(s.envelope_id, s.error) for s in slots[1:]] == [
        (bad_version["id"], Reason.ENVELOPE_BAD_VERSION),
        (no_signature["id"], Reason.ENVELOPE_MALFORMED),
        (json.loads(dup_key_text)["id"], Reason.ENVELOPE_MALFORMED),
        (None, Reason.ENVELOPE_MALFORMED),
        (None, Reason.ENVELOPE_MALFORMED),  # an id too long to echo
        (None, Reason.ENVELOPE_MALFORMED),  # an empty id
        (None, Reason.ENVELOPE_MALFORMED),  # not a string
    ]
    assert all(slot.envelope is None for slot in slots[1:])


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_transaction(data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.lists(json_values, max_size=5), st.sampled_from([GLOBEX, "x", ""]))
def test_any_json_envelopes_give_one_slot_each(items: list[object], origin: str) -> None:
    try:
        txn = decode_transaction(body_of(*items, origin=origin))
    except ProtocolError:
        assert origin != GLOBEX
        return
    assert len(txn.slots) == len(items)
    for slot in txn.slots:
        assert (slot.envelope is None) != (slot.error is None)


# -- transaction ids and body hashes ----------------------------------------------------


# The last: the shape of an envelope id (a constant: every xdist worker collects the same ids).
@pytest.mark.parametrize("txn_id", ["a", "A-z_09", "x" * 64, "BsKLhd5qEc7R-zaqoQwQ_Q"])
def test_valid_transaction_ids(txn_id: str) -> None:
    assert check_txn_id(txn_id) == txn_id


@pytest.mark.parametrize("txn_id", ["", "x" * 65, "a/b", "a b", "a.b", "é", "a\n"])
def test_invalid_transaction_ids(txn_id: str) -> None:
    with pytest.raises(ProtocolError, match="transaction id"):
        check_txn_id(txn_id)


def test_body_hash_is_the_sha256_of_the_exact_bytes() -> None:
    body = encode_transaction(GLOBEX, ACME, [envelope()])
    assert len(body_hash(body)) == 32
    assert body_hash(body) == body_hash(bytes(body))
    assert body_hash(body) != body_hash(body + b" ")


# -- answers ---------------------------------------------------------------------------


def test_the_answer_is_rebuilt_from_the_record_and_the_body() -> None:
    first, second = envelope(), envelope()
    body = body_of(
        first.to_json(), {"v": 3, "id": "odd"}, "junk", second.to_json(), first.to_json()
    )
    txn = decode_transaction(body)
    answer = [
        EnvelopeResult(first.id, "accepted"),
        EnvelopeResult("odd", "envelope_bad_version"),
        EnvelopeResult(None, "envelope_malformed"),
        EnvelopeResult(second.id, "peer_not_allowed"),
        EnvelopeResult(first.id, "accepted"),
    ]
    recorded = result_map(answer)
    assert recorded == {
        first.id: "accepted",
        "odd": "envelope_bad_version",
        second.id: "peer_not_allowed",
    }
    assert list(recorded) == [first.id, "odd", second.id]  # body order
    assert replay_results(txn, recorded) == answer
    assert encode_results(replay_results(txn, recorded)) == encode_results(answer)


def test_a_record_that_does_not_fit_the_body_is_not_guessed_from() -> None:
    txn = decode_transaction(encode_transaction(GLOBEX, ACME, [envelope()]))
    with pytest.raises(ValueError, match="no result"):
        replay_results(txn, {})


def test_results_round_trip() -> None:
    answer = [EnvelopeResult("a", "accepted"), EnvelopeResult(None, "envelope_malformed")]
    encoded = encode_results(answer)
    assert json.loads(encoded) == {
        "results": [
            {"id": "a", "result": "accepted"},
            {"id": None, "result": "envelope_malformed"},
        ]
    }
    assert decode_results(encoded, expected=2) == answer
    assert decode_results(encoded, expected=2, ids=["a", "b"]) == answer


@pytest.mark.parametrize(
    ("body", "expected", "message"),
    [
        (b"nope", 1, "not JSON"),
        (b'{"results": []}', 1, "exactly 1 results"),
        (b"[]", 0, "exactly 0 results"),
        (b'{"results": [1]}', 1, "must be an object"),
        (b'{"results": [{"id": "a"}]}', 1, "'result'"),
        (b'{"results": [{"id": "a", "result": "Accepted!"}]}', 1, "'result'"),
        (b'{"results": [{"id": "a", "result": "x' + b"y" * 64 + b'"}]}', 1, "'result'"),
        (b'{"results": [{"id": 5, "result": "accepted"}]}', 1, "'id'"),
    ],
)
def test_bad_answers_are_refused(body: bytes, expected: int, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_results(body, expected=expected)
    assert message in info.value.message


def test_an_answer_about_other_envelopes_is_refused() -> None:
    body = encode_results([EnvelopeResult("a", "accepted"), EnvelopeResult("c", "accepted")])
    with pytest.raises(ProtocolError, match="#2 is for another envelope"):
        decode_results(body, expected=2, ids=["a", "b"])
    with pytest.raises(ValueError, match="2 ids given for 3"):
        decode_results(body, expected=3, ids=["a", "b"])


def test_version_document() -> None:
    assert version_document() == {
        "versions": ["v1"],
        "envelope_versions": [1, 2],
        "transaction_types": ["application/json", "application/vnd.gateway.txn.v2"],
        "server": SERVER_NAME,
    }
    assert SERVER_NAME.startswith("federation-gateway/")


# -- judging envelopes (docs/protocol.md §4) ------------------------------------------


@pytest.fixture(scope="module")
def rules() -> CompiledRules:
    now = datetime.now(UTC)
    pem = {
        org: textwrap.indent(dev.issue_ca(org, now=now).cert_pem().decode(), " " * 8)
        for org in (GLOBEX, INITECH)
    }
    key = "ed25519:" + "A" * 43
    text = f"""\
version: 1
org: acme.example
default: deny
peers:
  globex.example:
    endpoint: https://gw.globex.example
    signing_key: {key}
    ca_pem: |
{pem[GLOBEX]}
  initech.example:
    endpoint: https://gw.initech.example
    signing_key: {key}
    ca_pem: |
{pem[INITECH]}
groups:
  engineering:
    members: [bob]
    receive_from: [globex.example]
    limits:
      max_envelope_bytes: 1000
      ttl: {{min: 1h, default: 1d, max: 2d}}
  secret:
    members: [sam]
    receive_from: [globex.example]
    limits: {{burn_on_read: required}}
  archive:
    members: [arnold]
    receive_from: ["*"]
    limits: {{burn_on_read: forbidden}}
  partners:
    members: [carol]
    receive_from: [globex.example/sales]
"""
    return CompiledRules(load_rules(text, filename="acme.yaml"))


def judge(rules: CompiledRules, *envelopes: Envelope, origin: str = GLOBEX) -> list[str]:
    """The real reason of each verdict (what logs, metrics and audit see)."""
    txn = decode_transaction(encode_transaction(origin, ACME, envelopes))
    return [v.reason for v in judge_transaction(txn, rules, now_ms=NOW)]


def answered(rules: CompiledRules, *envelopes: Envelope, origin: str = GLOBEX) -> list[str]:
    """What the peer reads for each envelope."""
    txn = decode_transaction(encode_transaction(origin, ACME, envelopes))
    return [v.result for v in judge_transaction(txn, rules, now_ms=NOW)]


@pytest.mark.parametrize(
    ("env", "result"),
    [
        (envelope(), "accepted"),
        (envelope(size=1001), "too_large"),
        (envelope(ttl=HOUR - 1000), "ttl_out_of_bounds"),
        (envelope(ttl=3 * DAY), "ttl_out_of_bounds"),
        (envelope(created=NOW - DAY - 1), "expired"),
        (envelope(created=NOW + 5 * 60_000 + 1), "envelope_bad_time"),
        (envelope(created=NOW + 5 * 60_000), "accepted"),  # within the clock skew
        (envelope(recipient="sam@acme.example"), "burn_on_read_required"),
        (envelope(recipient="sam@acme.example", burn_on_read=True), "accepted"),
        (envelope(recipient="arnold@acme.example", burn_on_read=True), "burn_on_read_forbidden"),
        (envelope(recipient="carol@acme.example", group="sales"), "accepted"),
        (envelope(recipient="carol@acme.example", group="support"), "peer_not_allowed"),
        (envelope(recipient="carol@acme.example", group=None), "peer_not_allowed"),
        (envelope(recipient="nobody@acme.example"), "recipient_unknown"),
        (envelope(recipient="bob@initech.example"), "recipient_not_local"),
        (envelope(sender="eve@initech.example"), "sender_not_origin"),
    ],
)
def test_each_check_gives_its_reason(rules: CompiledRules, env: Envelope, result: str) -> None:
    assert judge(rules, env) == [result]


def test_a_peer_reads_a_segmented_recipient_as_one_who_does_not_exist(
    rules: CompiledRules,
) -> None:
    segmented = [
        envelope(recipient="carol@acme.example", group="support"),  # another group of globex
        envelope(recipient="carol@acme.example", group=None),
    ]
    assert judge(rules, *segmented) == ["peer_not_allowed", "peer_not_allowed"]
    assert answered(rules, *segmented) == ["recipient_unknown", "recipient_unknown"]
    assert answered(rules, envelope(recipient="nobody@acme.example")) == ["recipient_unknown"]
    # From a peer no group hears, every user reads alike, too large or not.
    assert answered(rules, envelope(sender="i@initech.example", size=5000), origin=INITECH) == [
        "recipient_unknown"
    ]
    # Limits are told only to a peer the recipient's group hears.
    assert answered(rules, envelope(size=1001)) == ["too_large"]


def test_checks_come_in_the_documented_order(rules: CompiledRules) -> None:
    # Expired and from a third org: the clock speaks first.
    assert judge(rules, envelope(sender="eve@initech.example", created=NOW - 2 * DAY)) == [
        "expired"
    ]
    # From a third org and for an unknown user: the sender speaks first.
    assert judge(rules, envelope(sender="eve@initech.example", recipient="x@acme.example")) == [
        "sender_not_origin"
    ]
    # Not allowed and too large: the rule speaks before the limits.
    assert judge(rules, envelope(sender="i@initech.example", size=5000), origin=INITECH) == [
        "peer_not_allowed"
    ]


def test_a_repeated_id_is_answered_like_its_first_slot_and_never_stored(
    rules: CompiledRules,
) -> None:
    first = envelope()
    same_id_elsewhere = envelope(recipient="nobody@acme.example", envelope_id=first.id)
    txn = decode_transaction(encode_transaction(GLOBEX, ACME, [first, same_id_elsewhere, first]))
    verdicts = judge_transaction(txn, rules, now_ms=NOW)
    assert [v.result for v in verdicts] == ["accepted"] * 3
    assert [v.to_store for v in verdicts] == [True, False, False]

    broken = {**envelope().to_json(), "v": 9}
    txn = decode_transaction(body_of(broken, {**envelope().to_json(), "id": broken["id"]}))
    assert [v.result for v in judge_transaction(txn, rules, now_ms=NOW)] == [
        "envelope_bad_version"
    ] * 2


def test_only_accepted_envelopes_are_stored_and_denials_carry_the_rule(
    rules: CompiledRules,
) -> None:
    txn = decode_transaction(
        encode_transaction(GLOBEX, ACME, [envelope(), envelope(recipient="carol@acme.example")])
    )
    accepted, denied = judge_transaction(txn, rules, now_ms=NOW)
    assert accepted.to_store
    assert not denied.to_store
    assert denied.decision is not None
    assert denied.decision.group == "partners"
    assert denied.decision.rule is not None
    assert denied.decision.rule.file == "acme.yaml"


def test_the_mailbox_record_keeps_the_canonical_envelope() -> None:
    env = envelope(burn_on_read=True)
    record = mailbox_record(env)
    assert (record.envelope_id, record.sender, record.recipient) == (
        env.id,
        "alice@globex.example",
        "bob@acme.example",
    )
    assert (record.created_ms, record.expires_ms, record.burn_on_read) == (
        env.created,
        env.expires,
        True,
    )
    assert Envelope.from_json(json.loads(record.data)) == env
