"""The thin HTTP/1.1 server every listener runs: h11 over trio streams.

One :class:`HTTPServer` per listener (federation with mutual TLS, client API,
metrics). It reads each request whole within the listener's
:class:`ServerLimits`, hands it to a :data:`Handler` as a :class:`Request`
(whose ``peer`` is the org proven by the client certificate, on the
federation listener), and writes the :class:`Response` back with
``Content-Length``. :class:`Router` maps method and path to handlers.

Modules, pointing down:

* :mod:`gateway.http.messages`: ``Request``, ``Response``, response helpers,
  target parsing (pure).
* :mod:`gateway.http.routing`: ``Router`` (pure matching).
* :mod:`gateway.http.accept`: what a request's ``Accept`` says of a media type (pure).
* :mod:`gateway.http.limits`: ``ServerLimits`` and the refusal labels.
* :mod:`gateway.http.tls`: handshake failure reasons (pure).
* :mod:`gateway.http.server`: ``HTTPServer``, the I/O.
"""

from gateway.http.limits import ServerLimits
from gateway.http.messages import (
    Handler,
    Request,
    Response,
    error_response,
    json_response,
    parse_target,
    text_response,
)
from gateway.http.routing import RouteHandler, Router
from gateway.http.server import HTTPServer, Identify

__all__ = [
    "HTTPServer",
    "Handler",
    "Identify",
    "Request",
    "Response",
    "RouteHandler",
    "Router",
    "ServerLimits",
    "error_response",
    "json_response",
    "parse_target",
    "text_response",
]
