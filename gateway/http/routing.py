"""Routing a request to its handler by method and path (pure matching).

A pattern is a path of ``/``-separated segments; a segment is either literal
text or ``{name}``, which matches any one non-empty segment and hands it to the
handler as ``params[name]``::

    router = Router()
    router.add("PUT", "/federation/v1/transactions/{txn_id}", put_transaction)
    server = HTTPServer("federation", router, ...)

    async def put_transaction(request: Request, params: Mapping[str, str]) -> Response:
        txn_id = params["txn_id"]

When several patterns match a path, the one with a literal segment where the
others have a parameter, earliest, wins (``/keys/self`` over
``/keys/{user}``), whatever the order they were added in. A path that matches
no pattern gets 404; one whose pattern exists but not for the method gets 405
with ``Allow``. ``HEAD`` is served by the ``GET`` handler (the server sends no
body). Paths are compared after percent-decoding, which
:func:`~gateway.http.messages.parse_target` makes unambiguous by refusing
``%2F``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from gateway.errors import Reason
from gateway.http.messages import Request, Response, error_response

RouteHandler = Callable[[Request, Mapping[str, str]], Awaitable[Response]]

_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_METHOD_RE = re.compile(r"[A-Z]+")


@dataclass(frozen=True, slots=True)
class _Segment:
    text: str  # the literal text, or the parameter's name
    is_param: bool


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: str
    segments: tuple[_Segment, ...]
    handler: RouteHandler

    def bind(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for segment, part in zip(self.segments, parts, strict=True):
            if segment.is_param:
                if not part:
                    return None
                params[segment.text] = part
            elif segment.text != part:
                return None
        return params

    @property
    def specificity(self) -> tuple[bool, ...]:
        return tuple(not s.is_param for s in self.segments)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    handler: RouteHandler
    params: Mapping[str, str]
    pattern: str


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No handler: ``allowed`` is empty for 404, the path's methods for 405."""

    allowed: tuple[str, ...]


def _parse_pattern(pattern: str) -> tuple[_Segment, ...]:
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/'")
    segments: list[_Segment] = []
    seen: set[str] = set()
    for part in pattern[1:].split("/"):
        param = _PARAM_RE.fullmatch(part)
        if param is not None:
            name = param.group(1)
            if name in seen:
                raise ValueError(f"route pattern {pattern!r} names {{{name}}} twice")
            seen.add(name)
            segments.append(_Segment(name, is_param=True))
        elif "{" in part or "}" in part:
            raise ValueError(
                f"route pattern {pattern!r}: segment {part!r} must be literal or one {{name}}"
            )
        else:
            segments.append(_Segment(part, is_param=False))
    return tuple(segments)


class Router:
    """A table of (method, pattern) -> handler; itself a server ``Handler``."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, method: str, pattern: str, handler: RouteHandler) -> None:
        """Route ``method`` on ``pattern`` to ``handler``; ``ValueError`` on a clash."""
        if not _METHOD_RE.fullmatch(method):
            raise ValueError(f"route method {method!r} must be upper-case letters, like GET")
        segments = _parse_pattern(pattern)
        shape = tuple(None if s.is_param else s.text for s in segments)
        for route in self._routes:
            same_shape = tuple(None if s.is_param else s.text for s in route.segments) == shape
            if route.method == method and same_shape:
                raise ValueError(
                    f"route {method} {pattern} clashes with {route.method} {route.pattern}"
                )
        self._routes.append(_Route(method, pattern, segments, handler))

    def match(self, method: str, path: str) -> RouteMatch | NoRoute:
        if not path.startswith("/"):
            return NoRoute(())
        parts = path[1:].split("/")
        wanted = "GET" if method == "HEAD" else method
        best: tuple[_Route, dict[str, str]] | None = None
        allowed: set[str] = set()
        for route in self._routes:
            params = route.bind(parts)
            if params is None:
                continue
            allowed.add(route.method)
            if route.method != wanted:
                continue
            if best is None or route.specificity > best[0].specificity:
                best = (route, params)
        if best is not None:
            route, params = best
            return RouteMatch(route.handler, params, route.pattern)
        if "GET" in allowed:
            allowed.add("HEAD")
        return NoRoute(tuple(sorted(allowed)))

    async def __call__(self, request: Request) -> Response:
        found = self.match(request.method, request.path)
        if isinstance(found, RouteMatch):
            return await found.handler(request, found.params)
        if found.allowed:
            return error_response(
                405, Reason.METHOD_NOT_ALLOWED, headers=[("allow", ", ".join(found.allowed))]
            )
        return error_response(404, Reason.NOT_FOUND)
