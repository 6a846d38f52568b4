"""What became of a transaction sent to a peer, in our words (pure).

:class:`FailureKind` is the closed set of words the metrics and the backoff
use; :class:`TransportError` carries one, with the HTTP status and
``Retry-After`` when the peer answered. :func:`interpret_answer` turns an
answer into results or an error; :func:`translate_error` (the lean h11
client's failures) and :func:`translate_httpx_error` (httpx's) turn a failure
to get an answer into one. Our messages never carry the peer's text.
"""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Final

from gateway.errors import ProtocolError, Reason, RemoteError
from gateway.federation.h11client import (
    AnswerTooLarge,
    ConnectError,
    LeanHTTPError,
    LeanTimeout,
    RequestInvalid,
)
from gateway.federation.pinning import PinMismatchError
from gateway.federation.protocol import EnvelopeResult, decode_results
from gateway.http.tls import classify_handshake_error, describe_ssl_error, find_ssl_error

if TYPE_CHECKING:
    import httpx

MAX_RETRY_AFTER_SECONDS: Final = 86_400.0  # a Retry-After beyond a day is not believed
REASON_CODES: Final = frozenset(reason.value for reason in Reason)
_MAX_REPORTED_CODE: Final = 40  # characters of a peer's error code kept in our message


class FailureKind(enum.StrEnum):
    """Why a transaction was not answered: the metric label, a closed set."""

    CONNECT = "connect"  # no TCP connection (refused, unreachable, DNS)
    TIMEOUT = "timeout"  # connect, write or read took too long
    TLS = "tls"  # the handshake failed (certificate not trusted, wrong name, ...)
    PIN_MISMATCH = "pin_mismatch"  # the server's key matches none of the rules' pins
    NETWORK = "network"  # the connection broke, or the peer spoke broken HTTP
    HTTP_429 = "http_429"
    HTTP_503 = "http_503"
    HTTP_5XX = "http_5xx"  # any other 5xx
    TXN_CONFLICT = "txn_conflict"  # 409: the peer knows this txn id with another body
    TOO_LARGE = "too_large"  # 413: the batch is over the peer's body limit
    HTTP_4XX = "http_4xx"  # any other 4xx (415 included): a bug on one side, or rules that disagree
    HTTP_OTHER = "http_other"  # a status the protocol never answers (1xx, 3xx, 2xx but 200)
    BAD_ANSWER = "bad_answer"  # 200, but not a valid answer to this transaction
    UNKNOWN_PEER = "unknown_peer"  # not a peer in the rules in force
    LOCAL = "local"  # ours to fix: our certificate files, the endpoint URL
    INTERNAL = "internal"  # a bug of ours (an unexpected exception)


class TransportError(RemoteError):
    """A transaction that was not answered; the envelopes stay spooled for a retry.

    ``kind`` is the bounded label; ``status`` the HTTP status if there was one;
    ``retry_after`` the peer's ``Retry-After`` in seconds, if it gave one.
    """

    default_reason = Reason.PROTOCOL

    def __init__(
        self,
        message: str,
        *,
        kind: FailureKind,
        reason: Reason | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


def translate_error(exc: LeanHTTPError, peer: str) -> TransportError:
    """The :class:`TransportError` for a failure of the lean client on the way to ``peer``."""
    pinned = _pin_mismatch(exc, peer)
    if pinned is not None:
        return pinned
    if isinstance(exc, LeanTimeout):
        return TransportError(
            f"{peer}: timed out ({type(exc).__name__})",
            kind=FailureKind.TIMEOUT,
            reason=Reason.REQUEST_TIMEOUT,
        )
    if isinstance(exc, AnswerTooLarge):
        return TransportError(f"{peer}: {exc}", kind=FailureKind.BAD_ANSWER, status=exc.status)
    if find_ssl_error(exc) is not None:
        return TransportError(
            f"{peer}: TLS failed: {describe_ssl_error(exc)}",
            kind=FailureKind.TLS,
            reason=classify_handshake_error(exc),
        )
    if isinstance(exc, ConnectError):  # no SSLError behind it: TCP, or a handshake cut off
        return TransportError(f"{peer}: cannot connect: {exc}", kind=FailureKind.CONNECT)
    if isinstance(exc, RequestInvalid):
        return TransportError(f"{peer}: the request cannot be sent: {exc}", kind=FailureKind.LOCAL)
    return TransportError(
        f"{peer}: connection failed ({type(exc).__name__})", kind=FailureKind.NETWORK
    )


def _pin_mismatch(exc: BaseException, peer: str) -> TransportError | None:
    current: BaseException | None = exc
    for _ in range(8):  # short chains; never walk a cycle
        if current is None:
            break
        if isinstance(current, PinMismatchError):
            return TransportError(
                str(current.args[0]) if current.args else f"{peer}: pin mismatch",
                kind=FailureKind.PIN_MISMATCH,
                reason=Reason.PIN_MISMATCH,
            )
        current = current.__cause__ or current.__context__
    return None


def translate_httpx_error(exc: httpx.HTTPError, peer: str) -> TransportError:
    """The :class:`TransportError` for an httpx exception on the way to ``peer``.

    Transactions, key lookups and version documents no longer go through
    httpx; this stays for any httpx call towards a peer, and its test.
    """
    import httpx

    pinned = _pin_mismatch(exc, peer)
    if pinned is not None:
        return pinned
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(
            f"{peer}: timed out ({type(exc).__name__})",
            kind=FailureKind.TIMEOUT,
            reason=Reason.REQUEST_TIMEOUT,
        )
    if find_ssl_error(exc) is not None:
        return TransportError(
            f"{peer}: TLS failed: {describe_ssl_error(exc)}",
            kind=FailureKind.TLS,
            reason=classify_handshake_error(exc),
        )
    if isinstance(exc, httpx.ConnectError):
        return TransportError(f"{peer}: cannot connect: {exc}", kind=FailureKind.CONNECT)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return TransportError(
            f"{peer}: the endpoint URL cannot be used: {exc}", kind=FailureKind.LOCAL
        )
    return TransportError(
        f"{peer}: connection failed ({type(exc).__name__})", kind=FailureKind.NETWORK
    )


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delta form; an HTTP date is ignored)."""
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > len("86400000"):
        return None
    return min(float(value), MAX_RETRY_AFTER_SECONDS)


def _error_code(body: bytes) -> str | None:
    """The peer's ``{"error": code}`` if the code is one of ours, for our log."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    code = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(code, str) and len(code) <= _MAX_REPORTED_CODE and code in REASON_CODES:
        return code
    return None


_STATUS_KINDS: Final = {
    409: FailureKind.TXN_CONFLICT,
    413: FailureKind.TOO_LARGE,
    429: FailureKind.HTTP_429,
    503: FailureKind.HTTP_503,
}
_OK = 200


def interpret_answer(
    peer: str, status: int, body: bytes, *, expected: int, retry_after: str | None = None
) -> list[EnvelopeResult]:
    """The results of a ``200``, or the :class:`TransportError` any other status means."""
    if status == _OK:
        try:
            return decode_results(body, expected=expected)
        except ProtocolError as exc:
            raise TransportError(
                f"{peer}: 200 but not a valid answer: {exc}", kind=FailureKind.BAD_ANSWER
            ) from exc
    kind = _STATUS_KINDS.get(status)
    if kind is None:
        if 500 <= status <= 599:
            kind = FailureKind.HTTP_5XX
        elif 400 <= status <= 499:
            kind = FailureKind.HTTP_4XX
        else:
            kind = FailureKind.HTTP_OTHER
    code = _error_code(body)
    raise TransportError(
        f"{peer}: HTTP {status}" + (f" ({code})" if code else ""),
        kind=kind,
        status=status,
        retry_after=parse_retry_after(retry_after),
    )
