"""End-to-end encryption for clients: user keys, and sealing and opening envelopes.

:mod:`gateway.crypto.keys` holds a user's key pairs and their 0600 key file;
:mod:`gateway.crypto.envelope_crypto` seals a payload into an
:class:`~gateway.core.envelope.Envelope` and opens one. Only the reference
client and tests use this package: a gateway routes ciphertext and never
imports it. The scheme is specified in docs/envelope.md.
"""
