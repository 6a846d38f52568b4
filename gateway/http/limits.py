"""The bounds one listener enforces, and the words it counts refusals under.

Every limit has a named default here; ``gateway.yaml``'s ``limits`` section
(or a test) overrides them per listener. What happens at each bound:

=========================  ==================================================
max_header_bytes           request line + headers over it: 431, close
max_body_bytes             Content-Length over it: 413 before reading the
                           body; a chunked body growing over it: 413 at once;
                           then close
request_timeout            a request not fully read this long after its first
                           byte: 408, close. A new connection must also send
                           its first byte within it (else closed quietly)
idle_timeout               keep-alive connection silent this long between
                           requests: closed quietly
handshake_timeout          TLS handshake not done in time: closed, counted
send_timeout               a response not taken by the client in time: closed
drain_timeout              on graceful stop, how long in-flight requests get
                           before their connections are aborted
max_connections            open connections per listener; one more is closed
                           at once (before any TLS), counted
max_connections_per_peer   open connections per proven org on a listener with
                           ``identify``; one more gets 503 and is closed
=========================  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields

KIB = 1024
MIB = 1024 * KIB

DEFAULT_MAX_HEADER_BYTES = 16 * KIB
DEFAULT_MAX_BODY_BYTES = 8 * MIB
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONNECTIONS_PER_PEER = 16

# Label values of gateway_http_connections_refused_total{reason}: a closed set.
REFUSED_CONNECTION_LIMIT = "connection_limit"
REFUSED_PEER_CONNECTION_LIMIT = "peer_connection_limit"
REFUSED_HEADER_TOO_LARGE = "header_too_large"
REFUSED_BODY_TOO_LARGE = "body_too_large"
REFUSED_REQUEST_TIMEOUT = "request_timeout"
REFUSED_SEND_TIMEOUT = "send_timeout"
REFUSED_BAD_REQUEST = "bad_request"
REFUSED_REASONS = frozenset(
    {
        REFUSED_CONNECTION_LIMIT,
        REFUSED_PEER_CONNECTION_LIMIT,
        REFUSED_HEADER_TOO_LARGE,
        REFUSED_BODY_TOO_LARGE,
        REFUSED_REQUEST_TIMEOUT,
        REFUSED_SEND_TIMEOUT,
        REFUSED_BAD_REQUEST,
    }
)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds of one listener; sizes in bytes, times in seconds."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"server limit {spec.name} must be a number, got {value!r}")
            if not value > 0:
                raise ValueError(f"server limit {spec.name} must be positive, got {value!r}")
            if spec.type == "int" and not isinstance(value, int):
                raise ValueError(f"server limit {spec.name} must be a whole number, got {value!r}")
