"""X.509 and TLS for federation: the dev PKI, mTLS contexts, peer identity from a certificate.

Only this package imports ``cryptography`` for certificates; envelope crypto lives in
:mod:`gateway.crypto`.
"""
