"""Why a TLS handshake failed, as one word from a small closed set (pure).

trio reports every handshake failure as ``trio.BrokenResourceError`` whose
``__cause__`` is the ``ssl.SSLError`` OpenSSL raised; the error's ``reason``
(an OpenSSL reason mnemonic) and, for a certificate that did not verify, its
``verify_code`` say what happened. Only these outcomes are distinguished, so
the metric's ``reason`` label stays bounded:

=============================  ==================================================
``cert_missing``               the client sent no certificate (``CERT_REQUIRED``)
``cert_expired``               its certificate is past ``notAfter``
``cert_untrusted``             any other verification failure (unknown CA, bad
                               signature, not yet valid, wrong usage, ...)
``handshake_timeout``          not done within the listener's handshake timeout
``handshake_failed``           everything else: not TLS at all, TLS 1.2, no
                               common cipher, the client hung up, an alert from
                               the client (which then did not like *our*
                               certificate: the local log says which)
=============================  ==================================================
"""

from __future__ import annotations

import ssl

from gateway.errors import Reason

# OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED (x509_vfy.h); stable across versions.
X509_V_ERR_CERT_HAS_EXPIRED = 10

_MISSING_CERT_REASONS = frozenset(
    {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
)

HANDSHAKE_FAILURE_REASONS = frozenset(
    {
        Reason.CERT_MISSING,
        Reason.CERT_EXPIRED,
        Reason.CERT_UNTRUSTED,
        Reason.HANDSHAKE_TIMEOUT,
        Reason.HANDSHAKE_FAILED,
    }
)

_MAX_CAUSE_DEPTH = 8  # exception chains are short; never walk a cycle forever


def find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind ``exc`` (itself, its cause or its context), if any."""
    current: BaseException | None = exc
    for _ in range(_MAX_CAUSE_DEPTH):
        if current is None:
            return None
        if isinstance(current, ssl.SSLError):
            return current
        current = current.__cause__ or current.__context__
    return None


def classify_handshake_error(exc: BaseException) -> Reason:
    """The reason code under which a failed server-side handshake is counted.

    A timeout is the caller's to report (it knows its deadline passed); every
    error seen here is one OpenSSL or the transport raised.
    """
    error = find_ssl_error(exc)
    if error is None:
        return Reason.HANDSHAKE_FAILED
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code == X509_V_ERR_CERT_HAS_EXPIRED:
            return Reason.CERT_EXPIRED
        return Reason.CERT_UNTRUSTED
    reason = getattr(error, "reason", None)
    if reason in _MISSING_CERT_REASONS:
        return Reason.CERT_MISSING
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return Reason.CERT_UNTRUSTED
    return Reason.HANDSHAKE_FAILED


def describe_ssl_error(exc: BaseException) -> str:
    """A short text for the local log: the OpenSSL reason and verify message."""
    error = find_ssl_error(exc)
    if error is None:
        return type(exc).__name__
    parts = [str(getattr(error, "reason", None) or type(error).__name__)]
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        parts.append(str(error.verify_message))
    return ": ".join(parts)
