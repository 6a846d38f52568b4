"""X.509 and TLS for federation: the dev PKI, mTLS contexts, peer identity from a certificate.

Only this package imports ``cryptography`` for certificates; envelope crypto lives in
:mod:`gateway.crypto`.
"""

# Here rather than in .dev, which imports cryptography: `gateway init --help` and
# `gateway pki --help` show it without loading the certificate code.
DEFAULT_CERT_VALIDITY_DAYS = 90
