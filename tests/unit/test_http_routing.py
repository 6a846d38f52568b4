"""Routing by method and path: pure matching, and the Router as a handler."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.http import Request, Response, Router, text_response
from gateway.http.routing import NoRoute, RouteMatch


def answer(text: str):  # type: ignore[no-untyped-def]
    async def handler(request: Request, params: Mapping[str, str]) -> Response:
        return text_response(200, f"{text} {dict(sorted(params.items()))}")

    return handler


@pytest.fixture
def router() -> Router:
    r = Router()
    r.add("PUT", "/federation/v1/transactions/{txn_id}", answer("txn"))
    r.add("GET", "/federation/v1/keys/{user}", answer("keys"))
    r.add("GET", "/federation/v1/keys/self", answer("self"))
    r.add("GET", "/federation/v1/version", answer("version"))
    r.add("GET", "/", answer("root"))
    r.add("DELETE", "/mailbox/{user}/envelopes/{envelope_id}", answer("ack"))
    return r


def test_parameters_are_bound(router: Router) -> None:
    found = router.match("DELETE", "/mailbox/bob/envelopes/e1")
    assert isinstance(found, RouteMatch)
    assert found.params == {"user": "bob", "envelope_id": "e1"}
    assert found.pattern == "/mailbox/{user}/envelopes/{envelope_id}"


def test_literal_segment_wins_whatever_the_order(router: Router) -> None:
    found = router.match("GET", "/federation/v1/keys/self")
    assert isinstance(found, RouteMatch)
    assert found.params == {}
    other = router.match("GET", "/federation/v1/keys/alice")
    assert isinstance(other, RouteMatch)
    assert other.params == {"user": "alice"}


@pytest.mark.parametrize(
    "path",
    [
        "/federation/v1/transactions",  # too short
        "/federation/v1/transactions/",  # empty parameter
        "/federation/v1/transactions/t1/extra",  # too long
        "/federation/v2/version",
        "/federation/v1/version/",  # trailing slash is another path
        "",
        "//",
    ],
)
def test_unknown_paths_have_no_route(router: Router, path: str) -> None:
    assert router.match("PUT", path) == NoRoute(())


def test_wrong_method_lists_the_allowed_ones(router: Router) -> None:
    assert router.match("POST", "/federation/v1/keys/self") == NoRoute(("GET", "HEAD"))
    assert router.match("GET", "/federation/v1/transactions/t1") == NoRoute(("PUT",))


def test_head_is_served_by_get(router: Router) -> None:
    found = router.match("HEAD", "/federation/v1/version")
    assert isinstance(found, RouteMatch)


async def test_router_is_a_handler(router: Router) -> None:
    ok = await router(Request("PUT", "/federation/v1/transactions/t-9"))
    assert (ok.status, ok.body) == (200, b"txn {'txn_id': 't-9'}")
    missing = await router(Request("GET", "/nowhere"))
    assert missing.status == 404
    assert json.loads(missing.body) == {"error": "not_found"}
    wrong = await router(Request("DELETE", "/federation/v1/version"))
    assert wrong.status == 405
    assert ("allow", "GET, HEAD") in wrong.headers
    assert json.loads(wrong.body) == {"error": "method_not_allowed"}


@pytest.mark.parametrize(
    ("method", "pattern", "message"),
    [
        ("get", "/x", "upper-case"),
        ("GET", "x", "must start with '/'"),
        ("GET", "/a/{id}/{id}", "names {id} twice"),
        ("GET", "/a/x{id}", "literal or one {name}"),
        ("GET", "/a/{1d}", "literal or one {name}"),
        ("PUT", "/federation/v1/transactions/{other}", "clashes with PUT"),
    ],
)
def test_bad_routes_are_refused_when_added(
    router: Router, method: str, pattern: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        router.add(method, pattern, answer("x"))


segment = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/"), min_size=1)


@given(st.lists(segment, min_size=2, max_size=2))
def test_any_segment_binds_to_a_parameter(parts: list[str]) -> None:
    r = Router()
    r.add("GET", "/a/{first}/b/{second}", answer("x"))
    found = r.match("GET", f"/a/{parts[0]}/b/{parts[1]}")
    assert isinstance(found, RouteMatch)
    assert found.params == {"first": parts[0], "second": parts[1]}
