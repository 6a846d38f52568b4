"""docs/openapi.yaml: a valid OpenAPI 3.1 document whose bounds are the code's own.

Three things, without a network: the file is valid OpenAPI (the 3.1
meta-schema, as schemathesis checks it) and names exactly the routes the
client API serves; every number in it is the constant the code enforces; and
every pattern accepts exactly what the code accepts, tried with Hypothesis in
both directions (strings drawn from the pattern are accepted by the code;
strings drawn from a small alphabet of the characters that matter are
accepted by the code if and only if the pattern matches them).
tests/integration/test_openapi_fuzz.py then holds the live server to it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import jsonschema_rs
import pytest
import schemathesis
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from gateway.clientapi import api as clientapi
from gateway.clientapi.mailbox_wait import MailboxWaiters
from gateway.clientapi.signin import SignInAPI
from gateway.core.address import MAX_ADDRESS_LENGTH, MAX_DOMAIN_LENGTH, Address
from gateway.core.address import normalize_domain as _normalize_domain
from gateway.core.encoding import b64url_decode_canonical, is_canonical_b64url
from gateway.core.envelope import (
    ENVELOPE_ID_RE,
    GROUP_NAME_RE,
    MAX_CIPHERTEXT_B64_CHARS,
    MAX_TIME_MS,
)
from gateway.core.rules.model import MAX_TTL_SECONDS
from gateway.errors import AddressError
from gateway.http.routing import RouteHandler
from gateway.storage.base import MAX_STATUS_LENGTH, check_status

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
DOCUMENT: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def pattern(name: str) -> re.Pattern[str]:
    return re.compile(SCHEMAS[name]["pattern"])


def operation(path: str, method: str) -> dict[str, Any]:
    return cast(dict[str, Any], DOCUMENT["paths"][path][method])


def body_schema(path: str, method: str) -> dict[str, Any]:
    content = operation(path, method)["requestBody"]["content"]["application/json"]
    return cast(dict[str, Any], content["schema"])


def query_schema(path: str, name: str) -> dict[str, Any]:
    for parameter in operation(path, "get")["parameters"]:
        if parameter["name"] == name:
            return cast(dict[str, Any], parameter["schema"])
    raise AssertionError(f"{path} has no query parameter {name}")


# -- the document --------------------------------------------------------------------------
def test_the_file_is_a_valid_openapi_3_1_document() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    schemathesis.openapi.from_path(OPENAPI).validate()
    for name, schema in SCHEMAS.items():
        Draft202012Validator.check_schema(schema)
        if "pattern" in schema:  # an ECMA-262 regex, compiled as a JSON Schema validator does
            jsonschema_rs.validator_for({"type": "string", "pattern": schema["pattern"]})
        assert name


def test_the_validation_has_teeth() -> None:
    broken = copy.deepcopy(DOCUMENT)
    broken["paths"]["/v1/me"]["get"]["responses"] = "none"
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


def test_the_file_names_exactly_the_routes_the_client_api_serves() -> None:
    served: set[tuple[str, str]] = set()

    class Recorder:
        def add(self, method: str, pattern: str, handler: RouteHandler) -> None:
            served.add((method.lower(), re.sub(r"\{[^}]*\}", "{}", pattern)))

    api = clientapi.ClientAPI(
        org="acme.example",
        rules=cast(Any, None),
        storage=cast(Any, None),
        org_signing_seed=bytes(32),
        waiters=MailboxWaiters(),
    )
    api.add_routes(cast(Any, Recorder()))
    # Sign-in (OpenID Connect) has its own handlers, on the same listener when configured.
    SignInAPI(cast(Any, None)).add_routes(cast(Any, Recorder()))
    documented = {
        (method, re.sub(r"\{[^}]*\}", "{}", path))
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert documented == served


# Signing in is how a client gets a token: those operations take none.
PUBLIC_OPERATIONS = {
    ("get", "/v1/sessions/providers"),
    ("post", "/v1/sessions/device"),
    ("post", "/v1/sessions"),
}


def test_every_operation_but_sign_in_is_authenticated_and_documents_401() -> None:
    assert DOCUMENT["security"] == [{"bearer": []}]
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            if (method, path) in PUBLIC_OPERATIONS:
                assert op["security"] == [], f"{method} {path} is sign-in: no token"
                continue
            assert "security" not in op, f"{method} {path} overrides the bearer token"
            assert "401" in op["responses"], f"{method} {path}"
            if not path.startswith("/v1/sessions"):  # a session's own end: no group needed
                assert "403" in op["responses"], f"{method} {path} (no_group)"


def test_envelope_writes_document_every_refusal_the_server_can_send() -> None:
    single = operation("/v1/envelopes", "post")["responses"]
    assert {"202", "400", "401", "403", "409", "413", "429", "503", "507"} <= set(single)
    batch = operation("/v1/envelopes/batch", "post")["responses"]
    assert {"200", "400", "401", "403", "413", "429", "507"} <= set(batch)
    for status in ("429", "503", "507"):
        ref = single[status]["$ref"].rsplit("/", 1)[1]
        headers = DOCUMENT["components"]["responses"][ref]["headers"]
        assert headers["Retry-After"]["required"] is True


# -- the numbers ---------------------------------------------------------------------------
def test_the_bounds_are_the_codes_constants() -> None:
    batch = body_schema("/v1/envelopes/batch", "post")["properties"]["envelopes"]
    assert (batch["minItems"], batch["maxItems"]) == (1, clientapi.MAX_BATCH_ENVELOPES)
    ack = body_schema("/v1/mailbox/ack", "post")["properties"]["ids"]
    assert ack["maxItems"] == clientapi.MAX_ACK_IDS
    wait = query_schema("/v1/mailbox", "wait")
    assert (wait["minimum"], wait["maximum"], wait["default"]) == (
        0,
        clientapi.MAX_WAIT_SECONDS,
        clientapi.DEFAULT_WAIT_SECONDS,
    )
    limit = query_schema("/v1/mailbox", "limit")
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (
        1,
        clientapi.MAX_FETCH_LIMIT,
        clientapi.DEFAULT_FETCH_LIMIT,
    )
    assert SCHEMAS["UnixMs"]["maximum"] == MAX_TIME_MS
    assert SCHEMAS["Ciphertext"]["maxLength"] == MAX_CIPHERTEXT_B64_CHARS
    assert SCHEMAS["Address"]["maxLength"] == MAX_ADDRESS_LENGTH
    assert SCHEMAS["Org"]["maxLength"] == MAX_DOMAIN_LENGTH
    assert SCHEMAS["Status"]["maxLength"] == MAX_STATUS_LENGTH
    ttl = SCHEMAS["Me"]["properties"]["limits"]["properties"]["ttl"]["properties"]
    assert {bound["maximum"] for bound in ttl.values()} == {MAX_TTL_SECONDS}
    assert "16 KiB" in operation("/v1/keys", "put")["responses"]["413"]["description"]
    assert clientapi.MAX_KEYS_BODY_BYTES == 16 * 1024


# -- the patterns ----------------------------------------------------------------------------
def _address_ok(text: str) -> bool:
    try:
        return str(Address.parse(text)) == text
    except AddressError:
        return False


def _org_ok(text: str) -> bool:
    try:
        return _normalize_domain(text) == text
    except AddressError:
        return False


def _b64_of(size: int) -> Callable[[str], bool]:
    def accepts(text: str) -> bool:
        try:
            return len(b64url_decode_canonical(text)) == size
        except ValueError:
            return False

    return accepts


def _ciphertext_ok(text: str) -> bool:
    return 0 < len(text) <= MAX_CIPHERTEXT_B64_CHARS and is_canonical_b64url(text)


def _status_ok(text: str) -> bool:
    try:
        return check_status(text) == text
    except ValueError:
        return False


# name in components/schemas -> (the code's own test, an alphabet of the characters that matter)
PATTERNS: dict[str, tuple[Callable[[str], bool], str]] = {
    "Address": (_address_ok, "ab0-._@A9"),
    "Org": (_org_ok, "ab0-.A9_"),
    "EnvelopeId": (lambda text: ENVELOPE_ID_RE.fullmatch(text) is not None, "AQgwb-_=+"),
    "Signature": (_b64_of(64), "AQgwb-_=+"),
    "PublicKey": (_b64_of(32), "AEQgw048b-_="),
    "Ciphertext": (_ciphertext_ok, "AEQgw0b-_="),
    "GroupName": (lambda text: GROUP_NAME_RE.fullmatch(text) is not None, "az09_-A."),
    "Status": (_status_ok, "queddlivrjct:x_ A"),
}


def _matches(name: str, text: str) -> bool:
    # The file's patterns are anchored with ^...$; Python's $ would also match
    # before a final newline, which no alphabet here contains.
    matched = pattern(name).search(text) is not None
    schema = SCHEMAS[name]
    return matched and schema.get("minLength", 0) <= len(text) <= schema.get("maxLength", 10**9)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(data=st.data())
def test_what_a_pattern_generates_the_code_accepts(name: str, data: st.DataObject) -> None:
    accepts, _ = PATTERNS[name]
    text = data.draw(st.from_regex(pattern(name), fullmatch=True).filter(lambda t: "\n" not in t))
    if _matches(name, text):  # the length bounds, beside the pattern
        assert accepts(text), text


@pytest.mark.parametrize("name", sorted(PATTERNS))
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(data=st.data())
def test_the_code_accepts_exactly_what_a_pattern_matches(name: str, data: st.DataObject) -> None:
    accepts, alphabet = PATTERNS[name]
    near = st.from_regex(pattern(name), fullmatch=True).filter(lambda t: "\n" not in t)
    mutated = st.tuples(near, st.integers(0, 400), st.sampled_from(alphabet)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
    )
    text = data.draw(st.one_of(st.text(alphabet, max_size=90), mutated, near))
    assert accepts(text) == _matches(name, text), text


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("Address", "a..b@acme.example"),
        ("Address", "alice@acme.123"),
        ("Address", "Alice@acme.example"),
        ("Address", "alice@acme.example."),
        ("Address", "a" * 65 + "@acme.example"),
        ("Address", "alice@" + ".".join(["a" * 63] * 4)),  # 255 characters of org
        ("Org", "acme"),
        ("Org", "-acme.example"),
        ("Org", "acme.example."),
        ("Ciphertext", "A"),
        ("Ciphertext", "AB"),
        ("EnvelopeId", "A" * 21 + "B"),
    ],
)
def test_edge_cases_the_pattern_and_the_code_both_refuse(name: str, text: str) -> None:
    accepts, _ = PATTERNS[name]
    assert not accepts(text)
    assert not _matches(name, text)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("Address", "a.b-c_d@x1.acme-corp.example"),
        ("Address", "a" * 64 + "@" + ".".join(["a" * 63] * 3 + ["a" * 61])),
        ("Address", "zed@acme.1-2"),
        ("Org", "xn--bcher-kva.example"),
        ("Ciphertext", "AQ"),
        ("Ciphertext", "AAE"),
    ],
)
def test_edge_cases_the_pattern_and_the_code_both_accept(name: str, text: str) -> None:
    accepts, _ = PATTERNS[name]
    assert accepts(text)
    assert _matches(name, text)
