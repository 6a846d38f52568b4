"""A property-based fuzzer (schemathesis) against a live client API, checked by docs/openapi.yaml.

What is checked, for every operation of the file:

* **positive** cases (requests the file calls valid) are not refused: each
  answer is a 2xx, or one of the refusals listed in :data:`ALLOWED` below for
  that operation, each a check no schema can express (who the caller is, what
  is stored, the rules in force, relations between fields, the clock), with
  its reason code;
* **negative** cases (requests the file calls invalid) are not accepted:
  schemathesis' ``negative_data_rejection`` wants a 4xx from
  :data:`NEGATIVE_STATUSES`, and this test wants no 2xx at all, even where
  that check forgives (an unknown query parameter, which OpenAPI cannot
  forbid and this gateway refuses);
* never a 5xx, and every answer's status, content type, headers and body are
  what the file documents (schemathesis' conformance checks).

The refusals a fuzzer cannot reach on one gateway (full lanes and mailboxes,
the submission rate, a full disk, a user in no group, a failing peer) are
produced at the end of this module, each on a gateway set up for it, and held
to the file by the same conformance checks.

The gateway is :func:`tests.integration.test_client_api._start` (real sockets
on 127.0.0.1, plain HTTP, a real SQLite store and real rules, the clock fixed
at ``NOW_MS``) run by ``trio.run`` in a thread of its own, because
schemathesis calls it with a blocking HTTP client. The calls are made as
alice, a member of ``engineering`` (1000-byte envelopes, TTL 1 min to 1 day,
``send_to: [globex.example]``), through schemathesis' own bearer auth, so a
negative case that drops or spoils the token stays negative.

Two things keep the run bounded and repeatable: hypothesis is derandomized
with a fixed number of examples per operation and mode, and the mailbox
waiters are closed before the first call, so a long-poll (``wait`` up to 60)
answers at once instead of holding the fuzzer (the wait itself is tested in
test_client_api.py).

Envelopes: a schema-valid envelope drawn at random has random times and a
random sender, so the gateway would refuse nearly all of them on the clock or
``from`` alone and the storing path would go unfuzzed. So half the positive
envelope cases are made *plausible*: ``from`` alice, ``created`` now,
``expires`` an hour later and ``to`` one of a few known recipients; the rest
of each envelope is the fuzzer's and stays schema-valid. Batches get lists of
such envelopes too (their items' schema admits any value, so schemathesis
would draw none), key publications alice's own address half the time, and
key and org look-ups a few names that exist. Schemathesis also writes
integers as whole floats (``1.0``), which JSON Schema calls integers and the
gateway refuses (docs/openapi.yaml says so): such a refusal is allowed, with
its reason code, and nothing else is. The gateway never
checks an envelope's signature (only its form: 64 bytes of canonical
base64url, which the schema says); the recipient's client does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import schemathesis
import trio
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.parameters import ParameterLocation

from gateway.clientapi.tokens import issue_token
from gateway.core.address import Address
from gateway.core.envelope import new_envelope_id
from gateway.core.ratelimit import RateLimiter
from gateway.crypto.keys import UserKeys
from gateway.errors import PeerAuthError, StorageFullError
from gateway.storage.base import Bound
from tests.integration.test_client_api import (
    GLOBEX,
    HOUR_MS,
    NOW_MS,
    ORG,
    Gateway,
    _start,
    envelope,
)

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
CALLER = f"alice@{ORG}"
# Examples per operation and mode: about 40 s for the whole module on 2 cores.
MAX_EXAMPLES = 100
HTTP_TIMEOUT = 30.0  # seconds; no answer here waits for anything

# Recipients of plausible envelopes: delivered locally, queued for a peer,
# a local user in no group, a peer the group may not send to, an unknown org.
RECIPIENTS = (
    f"bob@{ORG}",
    f"zed@{GLOBEX}",
    f"mallory@{ORG}",
    "zed@initech.example",
    "zed@nowhere.example",
)

# -- what a schema-valid request may legitimately be refused with ------------------------
# The rules in force decide these (docs/rules.md); the schema cannot know them.
POLICY = frozenset(
    {
        "recipient_unknown",
        "unknown_peer",
        "peer_not_allowed",
        "too_large",  # the group's max_envelope_bytes (1000 here), below the protocol's 1 MiB
        "ttl_out_of_bounds",
        "burn_on_read_required",
        "burn_on_read_forbidden",
    }
)
# `expires` after `created` and at most 366 days later: a relation between two
# fields. `expired` and `created` too far ahead: the gateway's clock.
ENVELOPE_SEMANTIC = frozenset({"envelope_bad_time", "expired"})
# Whose envelope it is: `from` must be the token's user.
ENVELOPE_IDENTITY = frozenset({"sender_mismatch"})
# Any body may pass the listener's limits.max_body_bytes: a batch of 256
# envelopes of 1 MiB each is schema-valid (it never comes to that here).
TOO_LARGE = {413: frozenset({"body_too_large"})}

#: (method, path) -> {status: reason codes allowed for a positive case (None: any)}
ALLOWED: dict[tuple[str, str], dict[int, frozenset[str] | None]] = {
    ("GET", "/v1/me"): {200: None},
    ("POST", "/v1/envelopes"): {
        202: None,
        400: ENVELOPE_SEMANTIC,
        403: POLICY | ENVELOPE_IDENTITY,
        **TOO_LARGE,
    },
    # Each envelope's result is checked on its own, in _check_batch.
    ("POST", "/v1/envelopes/batch"): {200: None, **TOO_LARGE},
    ("GET", "/v1/mailbox"): {200: None},
    ("POST", "/v1/mailbox/ack"): {200: None, **TOO_LARGE},
    # Data-dependent: an id nobody (or somebody else) sent.
    ("GET", "/v1/status/{id}"): {200: None, 404: frozenset({"not_found"})},
    # Whose keys: only the caller's own address may be published.
    ("PUT", "/v1/keys"): {200: None, 403: frozenset({"forbidden"}), **TOO_LARGE},
    # Data-dependent: a user who published nothing or is in no group, an org that is no peer.
    ("GET", "/v1/keys/{address}"): {200: None, 404: frozenset({"not_found", "unknown_peer"})},
    ("GET", "/v1/orgs/{org}"): {200: None, 404: frozenset({"unknown_peer"})},
}
OPERATIONS = sorted(ALLOWED)

# What a schema-invalid request may be answered with: never a 2xx. 401 for a
# spoilt or missing token, 404 for a path parameter that no longer makes one
# path segment (a negated {id} with a "/" in it), 413 for an oversized body.
NEGATIVE_STATUSES = ["400", "401", "404", "405", "413"]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass(frozen=True)
class Live:
    base_url: str
    auth: dict[str, str]  # alice's Authorization header
    schema: schemathesis.BaseSchema
    envelope: Draft202012Validator  # the file's Envelope schema, for batch items


def _envelope_validator() -> Draft202012Validator:
    document = yaml.safe_load(OPENAPI.read_text())
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", DRAFT202012.create_resource(document)
    )
    return Draft202012Validator(
        {"$ref": "urn:openapi#/components/schemas/Envelope"}, registry=registry
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A client API served by trio in a thread; torn down when the module is done."""
    tmp = tmp_path_factory.mktemp("openapi-fuzz")
    started: queue.Queue[tuple[str, dict[str, str], trio.lowlevel.TrioToken, trio.CancelScope]]
    started = queue.Queue()
    failures: list[BaseException] = []

    async def serve() -> None:
        async for gateway in _start(tmp, ssl_context=None, client_verify=None):
            # Long-polls answer at once: see the module docstring.
            gateway.waiters.close()
            with trio.CancelScope() as scope:
                token = trio.lowlevel.current_trio_token()
                started.put((str(gateway.client.base_url), gateway.tokens, token, scope))
                await trio.sleep_forever()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            failures.append(exc)

    thread = threading.Thread(target=run, name="openapi-fuzz-gateway", daemon=True)
    thread.start()
    try:
        base_url, tokens, trio_token, scope = started.get(timeout=30)
    except queue.Empty:
        thread.join(timeout=5)
        raise RuntimeError(f"the gateway did not start: {failures!r}") from None
    config = schemathesis.Config.from_dict(
        {
            "base-url": base_url,
            "request-timeout": HTTP_TIMEOUT,
            "auth": {"openapi": {"bearer": {"bearer": tokens["alice"]}}},
            "checks": {"negative_data_rejection": {"expected-statuses": NEGATIVE_STATUSES}},
        }
    )
    schema = schemathesis.openapi.from_path(OPENAPI, config=config)
    try:
        yield Live(
            base_url=base_url,
            auth={"Authorization": f"Bearer {tokens['alice']}"},
            schema=schema,
            envelope=_envelope_validator(),
        )
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=trio_token)
        thread.join(timeout=30)
    assert not thread.is_alive(), "the gateway thread did not stop"
    assert not failures, failures


def _whole(value: object) -> object:
    """``value`` with every integral float written as an integer (``1.0`` -> ``1``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value


def _plausible(pair: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """A schema-valid envelope as alice would send it now, to ``recipient``."""
    envelope, recipient = pair
    fields = {"from": CALLER, "to": recipient, "created": NOW_MS, "expires": NOW_MS + HOUR_MS}
    return {**cast(dict[str, Any], _whole(envelope)), **fields}


def _with_body(pair: tuple[schemathesis.Case, object]) -> schemathesis.Case:
    case, body = pair
    case.body = body
    return case


def _strategy(live: Live, method: str, path: str, mode: GenerationMode) -> st.SearchStrategy[Any]:
    """The cases for one operation: schemathesis' own, and the mixes the docstring explains."""
    operation = live.schema[path][method]
    if mode is GenerationMode.NEGATIVE:
        # Left alone, schemathesis mostly spoils the token (401); with the token
        # fixed, it must spoil the parameters or the body instead. Both, half each.
        spoilt_token = operation.as_strategy(generation_mode=mode)
        if (method, path) == ("GET", "/v1/me"):  # nothing to spoil but the token
            return spoilt_token
        spoilt_input = operation.as_strategy(generation_mode=mode, headers=live.auth)
        return st.one_of(spoilt_input, spoilt_token)
    cases = operation.as_strategy(generation_mode=mode)
    envelopes = live.schema["/v1/envelopes"]["POST"].as_strategy().map(lambda case: case.body)
    plausible = st.tuples(envelopes, st.sampled_from(RECIPIENTS)).map(_plausible)
    if path == "/v1/envelopes":
        return st.one_of(cases, st.tuples(cases, plausible).map(_with_body))
    if path == "/v1/envelopes/batch":
        # The items' schema admits any value, so schemathesis draws no envelopes for them.
        items = st.lists(st.one_of(envelopes, plausible), min_size=1, max_size=8)
        batches = items.map(lambda envelopes: {"envelopes": envelopes})
        return st.one_of(cases, st.tuples(cases, batches).map(_with_body))
    if path == "/v1/keys":
        own = cases.map(lambda case: _with_body((case, {**case.body, "address": CALLER})))
        return st.one_of(cases, own)
    if path == "/v1/keys/{address}":
        known = [{"address": address} for address in (CALLER, *RECIPIENTS)]
        return st.one_of(cases, *(operation.as_strategy(path_parameters=p) for p in known))
    if path == "/v1/orgs/{org}":
        known = [{"org": org} for org in (ORG, GLOBEX, "initech.example")]
        return st.one_of(cases, *(operation.as_strategy(path_parameters=p) for p in known))
    return cases


def _has_fraction(value: object) -> bool:
    """Whether a JSON value holds a number written as a float (``1.0``, ``1e3``).

    JSON Schema calls ``1.0`` an integer; the gateway, like every strict JSON
    reader of integers, does not (docs/openapi.yaml says so, as it cannot
    say it in a schema). The fuzzer does draw such numbers for ``integer``.
    """
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_fraction(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_fraction(item) for item in value)
    return False


# The reason codes a body with an integral float is refused with.
FLOAT_REFUSALS = frozenset({"envelope_malformed", "protocol_error", "key_record_malformed"})


def _check_positive(
    live: Live, method: str, path: str, case: schemathesis.Case, status: int, body: Any
) -> None:
    if status == 400 and body.get("error") in FLOAT_REFUSALS and _has_fraction(case.body):
        return
    allowed = ALLOWED[(method, path)]
    assert status in allowed, f"schema-valid {method} {path} refused: {status} {body!r}"
    reasons = allowed[status]
    if reasons is not None:
        assert body.get("error") in reasons, f"{method} {path}: {status} {body!r}"
    if path == "/v1/envelopes/batch" and status == 200:
        _check_batch(live, case.body["envelopes"], body["results"])


def _check_batch(live: Live, items: list[Any], results: list[dict[str, Any]]) -> None:
    """Each item that is a schema-valid envelope is refused only for a semantic reason."""
    assert len(results) == len(items)
    semantic = POLICY | ENVELOPE_SEMANTIC | ENVELOPE_IDENTITY
    for item, result in zip(items, results, strict=True):
        if "error" in result and live.envelope.is_valid(item) and not _has_fraction(item):
            assert result["error"] in semantic, f"schema-valid envelope refused: {result!r}"


def _invalid_part_never_sent(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """Whether the only invalid part of a negative case never reached the server.

    Schemathesis negates a query by adding parameters; one whose value is an
    empty list is sent as nothing at all (``?limit=1`` for ``{"limit": 1,
    "x": []}``), so the request on the wire is a valid one.
    """
    assert case.meta is not None
    negated = {location for location, part in case.meta.components.items() if part.mode.is_negative}
    declared = {parameter.name for parameter in case.operation.query}
    extra = set(case.query or {}) - declared
    sent = set(parse_qs(urlsplit(response.request.url).query, keep_blank_values=True))
    return negated == {ParameterLocation.QUERY} and bool(extra) and not extra & sent


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value
)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=lambda v: str(v))
def test_the_server_does_what_the_openapi_file_says(
    live: Live, method: str, path: str, mode: GenerationMode
) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_strategy(live, method, path, mode))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=live.base_url, timeout=HTTP_TIMEOUT)
        case.validate_response(response, checks=CHECKS)
        if mode is GenerationMode.POSITIVE:
            body = response.json() if response.content else None
            _check_positive(live, method, path, case, response.status_code, body)
        elif 200 <= response.status_code < 300:
            # Stricter than negative_data_rejection, which forgives some negations
            # (an extra query parameter, one OpenAPI cannot forbid): this gateway
            # refuses every one of them, when it gets to see them.
            assert _invalid_part_never_sent(case, response), "schema-invalid request accepted"

    fuzz()


# -- the refusals a fuzzer does not reach -------------------------------------------------
# Full lanes and mailboxes, the submission rate, a full disk, a user in no group, an
# oversized key body, a peer that fails: each needs a gateway set up for it. Every
# answer is held to the file by the same schemathesis checks (status, content type,
# headers such as Retry-After, body). Not not_a_server_error: 502, 503 and 507 are
# documented answers here, each asserted by its status and reason code.
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def document() -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_path(OPENAPI)


def documented(
    document: schemathesis.BaseSchema,
    method: str,
    template: str,
    response: httpx.Response,
    *,
    status: int,
    error: str | None = None,
    **path_parameters: str,
) -> None:
    """``response`` is ``status`` (with ``error``) and everything about it is as the file says."""
    assert response.status_code == status, response.text
    if error is not None:
        assert response.json()["error"] == error
    case = document[template][method].Case(path_parameters=path_parameters or None)
    case.validate_response(response, checks=CONFORMANCE)


@pytest.fixture
async def gw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway like the fuzzer's, with the bounds ``request.param`` names."""
    bounds: dict[str, Any] = getattr(request, "param", {})
    async for gateway in _start(tmp_path, ssl_context=None, client_verify=None, **bounds):
        yield gateway


class _Reserve:
    """A storage reserve that is always short: every submission is 507."""

    async def admit(self, size: int) -> str | None:
        await trio.lowlevel.checkpoint()
        return "1 MiB free, below the reserve"

    def note_full(self) -> None:
        pass


@pytest.mark.parametrize(
    "gw", [{"lane_bound": Bound(1, 10**6), "mailbox_bound": Bound(1, 10**6)}], indirect=True
)
async def test_full_lanes_and_mailboxes_answer_as_documented(
    gw: Gateway, document: schemathesis.BaseSchema
) -> None:
    stored = [envelope(CALLER, f"bob@{ORG}"), envelope(CALLER, f"zed@{GLOBEX}")]
    for env in stored:
        documented(document, "POST", "/v1/envelopes", await gw.submit("alice", env), status=202)
    for recipient, error in ((f"bob@{ORG}", "mailbox_full"), (f"zed@{GLOBEX}", "lane_full")):
        full = await gw.submit("alice", envelope(CALLER, recipient))
        documented(document, "POST", "/v1/envelopes", full, status=503, error=error)
    batch = [envelope(CALLER, f"bob@{ORG}"), envelope(CALLER, f"zed@{GLOBEX}")]
    answer = await gw.client.post(
        "/v1/envelopes/batch",
        json={"envelopes": [env.to_json() for env in batch]},
        headers=gw.auth("alice"),
    )
    documented(document, "POST", "/v1/envelopes/batch", answer, status=200)
    assert answer.headers["retry-after"] == "30"
    # An id someone else's envelope holds: a conflict.
    taken = envelope(f"bob@{ORG}", f"dave@{ORG}", envelope_id=stored[0].id)
    conflict = await gw.submit("bob", taken)
    documented(document, "POST", "/v1/envelopes", conflict, status=409)


@pytest.mark.parametrize("gw", [{"submit_rate": RateLimiter(rate=0.01, burst=1)}], indirect=True)
async def test_the_submission_rate_answers_as_documented(
    gw: Gateway, document: schemathesis.BaseSchema
) -> None:
    first = await gw.submit("alice", envelope(CALLER, f"bob@{ORG}"))
    documented(document, "POST", "/v1/envelopes", first, status=202)
    again = await gw.submit("alice", envelope(CALLER, f"bob@{ORG}"))
    documented(document, "POST", "/v1/envelopes", again, status=429, error="rate_limited")
    batch = await gw.client.post(
        "/v1/envelopes/batch",
        json={"envelopes": [envelope(CALLER, f"bob@{ORG}").to_json()]},
        headers=gw.auth("alice"),
    )
    documented(document, "POST", "/v1/envelopes/batch", batch, status=429)


@pytest.mark.parametrize("gw", [{"reserve": _Reserve()}], indirect=True)
async def test_a_full_disk_answers_as_documented(
    gw: Gateway, document: schemathesis.BaseSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = await gw.submit("alice", envelope(CALLER, f"bob@{ORG}"))
    documented(document, "POST", "/v1/envelopes", single, status=507)
    batch = await gw.client.post(
        "/v1/envelopes/batch",
        json={"envelopes": [envelope(CALLER, f"bob@{ORG}").to_json()]},
        headers=gw.auth("alice"),
    )
    documented(document, "POST", "/v1/envelopes/batch", batch, status=507)

    async def disk_full(*args: object, **kwargs: object) -> NoReturn:
        raise StorageFullError("database or disk is full")

    monkeypatch.setattr(gw.store, "user_keys_put", disk_full)
    monkeypatch.setattr(gw.store, "mailbox_ack", disk_full)
    keys = UserKeys.generate(Address.parse(CALLER)).public().to_json()
    published = await gw.client.put("/v1/keys", json=keys, headers=gw.auth("alice"))
    documented(document, "PUT", "/v1/keys", published, status=507)
    ack = await gw.client.post(
        "/v1/mailbox/ack", json={"ids": [new_envelope_id()]}, headers=gw.auth("alice")
    )
    documented(document, "POST", "/v1/mailbox/ack", ack, status=507)


async def test_other_refusals_answer_as_documented(
    gw: Gateway, document: schemathesis.BaseSchema
) -> None:
    # A token whose user the rules put in no group: 403 no_group everywhere.
    ghost = await issue_token(gw.store, Address.of("ghost", ORG), at_ms=NOW_MS)
    headers = {"authorization": f"Bearer {ghost}"}
    for method, template, path, parameters in (
        ("GET", "/v1/me", "/v1/me", {}),
        ("GET", "/v1/mailbox", "/v1/mailbox", {}),
        ("GET", "/v1/orgs/{org}", f"/v1/orgs/{ORG}", {"org": ORG}),
    ):
        answer = await gw.client.request(method, path, headers=headers)
        documented(document, method, template, answer, status=403, error="no_group", **parameters)
    # No token: 401 with WWW-Authenticate, on every operation.
    some_id = new_envelope_id()
    anonymous = await gw.client.get(f"/v1/status/{some_id}")
    documented(document, "GET", "/v1/status/{id}", anonymous, status=401, id=some_id)
    # A key body over 16 KiB.
    big = await gw.client.put("/v1/keys", content=b" " * 20_000, headers=gw.auth("alice"))
    documented(document, "PUT", "/v1/keys", big, status=413, error="body_too_large")
    # A peer that cannot be asked, or answers a record that does not verify.
    gw.remote_records[f"zed@{GLOBEX}"] = PeerAuthError("peer is down")
    down = await gw.client.get(f"/v1/keys/zed@{GLOBEX}", headers=gw.auth("alice"))
    zed = {"address": f"zed@{GLOBEX}"}
    documented(document, "GET", "/v1/keys/{address}", down, status=502, **zed)
    gw.remote_records[f"zed@{GLOBEX}"] = b'{"v": 1}'
    forged = await gw.client.get(f"/v1/keys/zed@{GLOBEX}", headers=gw.auth("alice"))
    documented(document, "GET", "/v1/keys/{address}", forged, status=502, **zed)
    # A status that exists, and a key record that does.
    sent = envelope(CALLER, f"zed@{GLOBEX}")
    await gw.submit("alice", sent)
    status = await gw.client.get(f"/v1/status/{sent.id}", headers=gw.auth("alice"))
    documented(document, "GET", "/v1/status/{id}", status, status=200, id=sent.id)
    keys = UserKeys.generate(Address.parse(CALLER)).public().to_json()
    await gw.client.put("/v1/keys", json=keys, headers=gw.auth("alice"))
    record = await gw.client.get(f"/v1/keys/{CALLER}", headers=gw.auth("bob"))
    documented(document, "GET", "/v1/keys/{address}", record, status=200, address=CALLER)
    mailbox = await gw.client.get("/v1/mailbox", headers=gw.auth("bob"))
    documented(document, "GET", "/v1/mailbox", mailbox, status=200)
