"""End-to-end crypto: user keys, sealing and opening envelopes, org-signed key records.

:mod:`gateway.crypto.keys` holds a user's key pairs and their 0600 key file;
:mod:`gateway.crypto.envelope_crypto` seals a payload into an
:class:`~gateway.core.envelope.Envelope` and opens one (only clients do: the
gateway has no key that opens an envelope); :mod:`gateway.crypto.key_records`
signs a user's *public* keys with the org signing key (the gateway does that
when a user publishes) and verifies such records (clients, and the origin
gateway before it passes a peer's record on). The schemes are specified in
docs/envelope.md and docs/client-api.md.
"""
