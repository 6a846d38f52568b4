"""The HTTP layer's pure parts: targets, responses, limits, handshake reasons."""

from __future__ import annotations

import json
import math
import ssl
import urllib.parse

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ProtocolError, Reason
from gateway.http import Request, ServerLimits, json_response, parse_target, text_response
from gateway.http.messages import MAX_QUERY_FIELDS
from gateway.http.tls import classify_handshake_error, describe_ssl_error

# -- targets ---------------------------------------------------------------------------


def test_target_is_split_and_decoded() -> None:
    path, query = parse_target("/a%20b/c%C3%A9?x=1&x=2&y&z=%2F")
    assert path == "/a b/cé"
    assert query == {"x": ["1", "2"], "y": [""], "z": ["/"]}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("*", "starting with '/'"),
        ("http://host/x", "starting with '/'"),
        ("/a%2Fb", "%2F"),
        ("/a%2fb", "%2F"),
        ("/a%00b", "%00"),
        ("/%ff", "not UTF-8"),
        ("/?q=%ff", "not UTF-8"),
        ("/?" + "&".join(f"k{i}=v" for i in range(MAX_QUERY_FIELDS + 1)), "more than"),
    ],
)
def test_bad_targets_are_protocol_errors(target: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        parse_target(target)
    assert caught.value.reason is Reason.PROTOCOL


path_segment = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"),
    max_size=20,
)


@given(st.lists(path_segment, min_size=1, max_size=5))
def test_quoted_paths_decode_back(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    target = "/" + "/".join(urllib.parse.quote(s, safe="") for s in segments)
    assert parse_target(target) == (path, {})


@given(st.text(max_size=200))
def test_any_target_parses_or_is_a_protocol_error(target: str) -> None:
    try:
        path, query = parse_target(target)
    except ProtocolError:
        return
    assert path.startswith("/")
    assert isinstance(query, dict)


# -- requests and responses ------------------------------------------------------------


def test_request_header_and_query_lookups() -> None:
    request = Request("GET", "/", query={"a": ["1", "2"]}, headers=[("x-one", "1"), ("x-one", "2")])
    assert request.header("X-One") == "1"
    assert request.header("x-two") is None
    assert request.query_value("a") == "1"
    assert request.query_value("b") is None


def test_response_helpers() -> None:
    response = json_response(201, {"é": [1, None]}, headers=[("x-a", "b")])
    assert response.status == 201
    assert response.headers == [("content-type", "application/json"), ("x-a", "b")]
    assert json.loads(response.body) == {"é": [1, None]}
    text = text_response(200, "héllo")
    assert text.headers == [("content-type", "text/plain; charset=utf-8")]
    assert text.body == "héllo".encode()


# -- limits ------------------------------------------------------------------------------


def test_default_limits() -> None:
    limits = ServerLimits()
    assert limits.max_header_bytes == 16 * 1024
    assert limits.max_body_bytes == 8 * 1024 * 1024
    assert (limits.request_timeout, limits.idle_timeout, limits.handshake_timeout) == (10, 60, 10)
    assert (limits.max_connections, limits.max_connections_per_peer) == (1024, 16)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_body_bytes", 0, "must be positive"),
        ("request_timeout", -1.0, "must be positive"),
        ("idle_timeout", math.nan, "must be positive"),
        ("max_connections", 1.5, "must be a whole number"),
        ("max_header_bytes", True, "must be a number"),
        ("handshake_timeout", "10", "must be a number"),
    ],
)
def test_bad_limits_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"{field} {message}"):
        ServerLimits(**{field: value})  # type: ignore[arg-type]


# -- handshake failure reasons ----------------------------------------------------------


def _broken(cause: BaseException) -> trio.BrokenResourceError:
    error = trio.BrokenResourceError()
    error.__cause__ = cause
    return error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] something")
    error.reason = reason
    return error


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    error.verify_code = code
    error.verify_message = message
    return error


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), Reason.CERT_MISSING),
        (_verify_error(10, "certificate has expired"), Reason.CERT_EXPIRED),
        (_verify_error(20, "unable to get local issuer certificate"), Reason.CERT_UNTRUSTED),
        (_verify_error(9, "certificate is not yet valid"), Reason.CERT_UNTRUSTED),
        (_ssl_error("CERTIFICATE_VERIFY_FAILED"), Reason.CERT_UNTRUSTED),
        (_ssl_error("HTTP_REQUEST"), Reason.HANDSHAKE_FAILED),
        (_ssl_error("UNSUPPORTED_PROTOCOL"), Reason.HANDSHAKE_FAILED),
        (_ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED"), Reason.HANDSHAKE_FAILED),
        (ConnectionResetError(), Reason.HANDSHAKE_FAILED),
    ],
)
def test_handshake_errors_are_classified(cause: BaseException, reason: Reason) -> None:
    assert classify_handshake_error(_broken(cause)) is reason


def test_handshake_error_description_is_short() -> None:
    error = _broken(_verify_error(10, "certificate has expired"))
    assert describe_ssl_error(error) == "CERTIFICATE_VERIFY_FAILED: certificate has expired"
    assert describe_ssl_error(trio.BrokenResourceError()) == "BrokenResourceError"
