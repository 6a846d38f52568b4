"""The ``ssl.SSLContext`` objects of the gateway's three kinds of TLS connection.

* **Federation server** (the federation listener): TLS 1.3 only, a client
  certificate is required, and it must chain to one of the CAs the rules give
  for peers. OpenSSL checks the chain; it cannot check that the certificate's
  org matches *its own* CA's org (every peer CA is trusted at once here), so
  after the handshake the caller must pass the certificate to
  :func:`gateway.pki.identity.verify_peer_certificate`.
* **Federation client** (the sender, key lookups): TLS 1.3 only, presents the
  gateway certificate, trusts only the one CA of the peer it dials, and checks
  that the server certificate names the peer's org: pass
  ``server_hostname=<peer org>``, whatever host the endpoint URL names.
* **Client API server**: no client certificates (clients authenticate with
  bearer tokens); TLS 1.3 only unless the admin allows TLS 1.2
  (``client_tls.min_version: "1.2"``), and then TLS 1.2 offers only ECDHE
  key exchange with AEAD ciphers (:data:`CLIENT_API_TLS12_CIPHERS`): no CBC
  (LUCKY13 and its kin), no static RSA key exchange, no DHE. TLS 1.3's own
  suites are all AEAD with ephemeral keys.

Each builder presents either the files ``cert_file``/``key_file`` (read now)
or an already checked :class:`~gateway.pki.own.OwnCertificate` (``own``),
whose bytes are handed to OpenSSL through an anonymous in-memory file
(``memfd``; a private temporary directory where there is none): what was
checked is what is served, and a hot reload never reads a file half-written.
A certificate file may hold the certificate followed by its intermediates;
all of it is presented.

``ssl`` and ``OSError`` failures become :class:`~gateway.errors.PKIError` naming
the file that could not be used.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from gateway.errors import PKIError
from gateway.files import check_private
from gateway.pki.own import OwnCertificate

#: The TLS versions an admin may set as the client API's minimum.
CLIENT_API_TLS_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_CLIENT_API_MIN_TLS: Final = "1.3"
#: TLS 1.2 suites of the client API when 1.2 is allowed: forward secrecy and AEAD only.
CLIENT_API_TLS12_CIPHERS: Final = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def _load_cert_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    for path, what in ((cert_file, "certificate"), (key_file, "private key")):
        if not path.exists():
            raise PKIError(f"{path}: no such {what} file")
        if not path.is_file():
            raise PKIError(f"{path}: is not a {what} file")
    try:
        check_private(key_file, what="private key file")
    except ValueError as exc:
        raise PKIError(f"{key_file}: {exc}") from exc
    except OSError as exc:
        raise PKIError(f"{key_file}: cannot read: {exc.strerror or exc}") from exc
    try:
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except ssl.SSLError as exc:
        # OpenSSL does not say which of the two files it disliked.
        raise PKIError(
            f"{cert_file} / {key_file}: not a usable certificate and private key pair "
            f"({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise PKIError(f"{exc.filename or cert_file}: cannot read: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _memory_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths that read as ``contents``, gone when the block ends; never on a disk if avoidable."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for data in contents:
                fd = os.memfd_create("gateway-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="gateway-tls-") as directory:
        paths = []
        for index, data in enumerate(contents):
            path = os.path.join(directory, str(index))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            paths.append(path)
        yield paths


def _load_own(context: ssl.SSLContext, own: OwnCertificate) -> None:
    try:
        with _memory_files(own.cert_pem, own.key_pem) as (cert_path, key_path):
            context.load_cert_chain(certfile=cert_path, keyfile=key_path)
    except ssl.SSLError as exc:
        raise PKIError(
            f"certificate {own.describe()}: OpenSSL cannot use it with its key "
            f"({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise PKIError(f"cannot hand the certificate to OpenSSL: {exc.strerror or exc}") from exc


def _present(
    context: ssl.SSLContext,
    cert_file: Path | None,
    key_file: Path | None,
    own: OwnCertificate | None,
) -> None:
    if own is not None:
        _load_own(context, own)
    elif cert_file is not None and key_file is not None:
        _load_cert_chain(context, cert_file, key_file)
    else:
        raise ValueError("give cert_file and key_file, or own")


def check_loadable(own: OwnCertificate) -> None:
    """``PKIError`` unless OpenSSL accepts ``own`` as a server certificate and key."""
    _load_own(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), own)


def _trust(context: ssl.SSLContext, pem: bytes, *, source: str) -> None:
    try:
        context.load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise PKIError(f"{source}: not a usable CA certificate") from exc


def _tls13_only(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3


def federation_server_context(
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    own: OwnCertificate | None = None,
    trusted_ca_pems: Iterable[bytes],
) -> ssl.SSLContext:
    """mTLS server context trusting exactly ``trusted_ca_pems`` (the peers' CAs).

    With no CA at all the context still builds, and refuses every client.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(context)
    context.verify_mode = ssl.CERT_REQUIRED
    for index, pem in enumerate(trusted_ca_pems):
        _trust(context, pem, source=f"peer CA #{index + 1}")
    _present(context, cert_file, key_file, own)
    return context


def federation_client_context(
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    own: OwnCertificate | None = None,
    peer_ca_pem: bytes,
) -> ssl.SSLContext:
    """mTLS client context for one peer: trusts only that peer's CA(s), checks its name.

    Callers pass ``server_hostname=<peer org>`` when wrapping the connection.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(context)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    _trust(context, peer_ca_pem, source="peer CA")
    _present(context, cert_file, key_file, own)
    return context


def client_api_server_context(
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    own: OwnCertificate | None = None,
    min_version: str = DEFAULT_CLIENT_API_MIN_TLS,
) -> ssl.SSLContext:
    """Server context for the client API: no client certificates; see the module docstring.

    ``min_version`` is ``"1.3"`` (the default) or ``"1.2"``; ``ValueError`` otherwise.
    """
    version = CLIENT_API_TLS_VERSIONS.get(min_version)
    if version is None:
        raise ValueError(f"TLS minimum version must be one of 1.2, 1.3, not {min_version!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = version
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if version is ssl.TLSVersion.TLSv1_2:
        context.set_ciphers(CLIENT_API_TLS12_CIPHERS)  # TLS 1.2 only: 1.3's suites are fixed
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = ssl.CERT_NONE
    _present(context, cert_file, key_file, own)
    return context
