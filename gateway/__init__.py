"""Federated messaging gateway: routes, polices and durably stores opaque E2EE envelopes."""

__version__ = "0.1.0"
