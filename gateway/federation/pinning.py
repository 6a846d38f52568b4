"""Pinning a peer's key inside the TLS handshake.

The rules may pin a peer's SPKI digests. The check runs in the handshake
itself, in a subclass of ``ssl.SSLObject`` installed as the client context's
``sslobject_class`` (trio's ``SSLStream`` builds its TLS object with
``context.wrap_bio``, which uses it): the connection breaks before our
Finished message leaves, so a server that fails the pin never sees our
certificate or a byte of a request.
"""

from __future__ import annotations

import ssl

from cryptography import x509

from gateway.pki.certs import spki_sha256


class PinMismatchError(ssl.SSLError):
    """Raised from the handshake when the server's key matches none of the pins."""


def pinned_sslobject_class(pins: frozenset[bytes], *, org: str) -> type[ssl.SSLObject]:
    """An ``ssl.SSLObject`` subclass whose handshake also requires one of ``pins``.

    Install it as ``context.sslobject_class`` on a client context: trio's
    ``SSLStream`` builds its TLS object with ``context.wrap_bio``, which uses it.
    """
    if not pins:
        raise ValueError("pinning needs at least one pin")

    class PinnedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()  # raises SSLWantReadError until the handshake is done
            der = self.getpeercert(binary_form=True)
            if not der:
                raise PinMismatchError(f"{org}: the server presented no certificate")
            if spki_sha256(x509.load_der_x509_certificate(der)) not in pins:
                raise PinMismatchError(f"{org}: the server's key matches none of its pins")

    return PinnedSSLObject
