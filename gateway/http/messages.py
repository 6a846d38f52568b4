"""Requests and responses as the gateway's handlers see them: plain values, no I/O.

A handler is ``async def handler(request: Request) -> Response``. The server
has already read the whole body (within the listener's limits), decoded the
target and, on the federation listener, proven the peer's org from its client
certificate: ``request.peer`` is that org and nothing else ever is (never a
header, never the body).

:func:`parse_target` turns an origin-form request target into a path and a
query. It refuses what would make the path ambiguous: an encoded ``/``
(``%2F``), an encoded NUL, bytes that are not UTF-8 once decoded, and a target
that is not origin-form (``*``, ``http://...``). Each refusal is a
:class:`~gateway.errors.ProtocolError` (400).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from gateway.errors import ProtocolError, Reason

JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

MAX_QUERY_FIELDS = 64  # a query string with more fields is refused (400)

# Percent escapes that would change what the path means once decoded.
_FORBIDDEN_ESCAPES = ("%2f", "%00")


@dataclass(frozen=True, slots=True)
class Request:
    """One fully read HTTP request.

    ``headers`` keeps the order and repetition of the wire, names lower-cased,
    values decoded as ISO-8859-1 (HTTP's own byte-preserving choice).
    ``peer`` is the org proven by the client certificate on a listener with an
    ``identify`` function, ``None`` elsewhere. ``remote`` is the TCP peer's
    (host, port); ``listener`` the name of the listener that read it.
    """

    method: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    peer: str | None = None
    remote: tuple[str, int] = ("", 0)
    listener: str = ""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or ``None``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or ``None``."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(slots=True)
class Response:
    """What a handler answers. The server adds Content-Length, Date and, when it
    is closing the connection, ``Connection: close``; a handler never frames."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]


def json_response(
    status: int, obj: object, *, headers: list[tuple[str, str]] | None = None
) -> Response:
    """``obj`` as compact UTF-8 JSON with ``Content-Type: application/json``."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(status, [("content-type", JSON_CONTENT_TYPE), *(headers or [])], body)


def text_response(
    status: int, text: str, *, headers: list[tuple[str, str]] | None = None
) -> Response:
    """``text`` as UTF-8 ``text/plain``."""
    return Response(
        status, [("content-type", TEXT_CONTENT_TYPE), *(headers or [])], text.encode("utf-8")
    )


def error_response(
    status: int, reason: Reason, *, headers: list[tuple[str, str]] | None = None
) -> Response:
    """The layer's one error shape: ``{"error": "<reason code>"}``."""
    return json_response(status, {"error": reason.value}, headers=headers)


def parse_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """Split an origin-form target into its decoded path and its query.

    ``/a%20b/c?x=1&x=2&y`` gives ``("/a b/c", {"x": ["1", "2"], "y": [""]})``.
    """
    if not target.startswith("/"):
        raise ProtocolError(
            f"request target {target[:80]!r} is not a path starting with '/'",
            reason=Reason.PROTOCOL,
        )
    raw_path, _, raw_query = target.partition("?")
    lowered = raw_path.lower()
    for escape in _FORBIDDEN_ESCAPES:
        if escape in lowered:
            raise ProtocolError(f"request path may not contain {escape.upper()}")
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError as exc:
        raise ProtocolError("request path is not UTF-8 once percent-decoded") from exc
    try:
        query = urllib.parse.parse_qs(
            raw_query,
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise ProtocolError("query string is not UTF-8 once percent-decoded") from exc
    except ValueError as exc:  # parse_qs: too many fields
        raise ProtocolError(f"query string has more than {MAX_QUERY_FIELDS} fields") from exc
    return path, query
