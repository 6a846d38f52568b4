"""Sign-in through OpenID Connect (docs/sign-in.md).

::

    idtoken   pure: ID-token checks with joserfc, the user claim to a local address
    idp       one provider: discovery and JWKS cached (bounded refresh, stale
              window, metrics); the token endpoint (device flow, refresh)

Configured by ``oidc:`` in gateway.yaml (:class:`gateway.config.OIDCConfig`).
"""
