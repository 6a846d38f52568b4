"""The gateway's exception tree and its stable reason codes.

Every error the gateway raises on purpose is a :class:`GatewayError`. The tree
splits errors that are *ours to fix* (a bad config, bad rules, a missing
certificate, a broken database) from errors that *a remote party caused* (a
malformed envelope, a peer that is not who it claims to be). The split decides
who hears about it: a ``LocalError`` is reported to the admin and stops the
command or the start-up; a ``RemoteError`` is answered to the remote party with
its reason code, counted, and changes nothing.

::

    GatewayError                      .reason: Reason (stable, for APIs and metrics)
    ├── LocalError                    ours to fix; the message may name files and lines
    │   ├── ConfigError               gateway.yaml, command-line arguments
    │   ├── RulesError                federation rules (carries every issue found)
    │   ├── PKIError                  certificates, keys, TLS contexts
    │   └── StorageError              the database
    │       └── StorageFullError      no room on its disk: temporary, nothing stored
    ├── CapacityError                 a configured bound is reached: nothing stored, try later
    └── RemoteError                   a client or peer sent something wrong
        ├── AddressError              a `user@org` that does not parse
        ├── EnvelopeError             an envelope that does not parse or validate
        ├── EnvelopeOpenError         seal/open failed; one detail-free message, always
        │   └── RetentionWrapMismatch a signed, opened envelope with a dishonest retention copy
        ├── KeyRecordError            a signed key record failed verification; detail-free
        ├── PeerAuthError             a peer whose certificate or claims do not check out
        ├── ProtocolError             a request that breaks the wire protocol
        └── SignInError               an ID token, device code or session refused (gateway.oidc)

The message of a ``RemoteError`` may be shown to the party that caused it, but is
never forwarded to anyone else: a local client whose envelope a peer rejected
sees the reason code only, never the peer's text.

Reason codes are :class:`Reason` members. Their values are part of the
federation protocol, the client API and the metrics: never rename one, only add.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Stable reason codes. Values are wire and metric label values."""

    # -- addresses ---------------------------------------------------------
    ADDRESS_MALFORMED = "address_malformed"  # not `user@org`, empty, too long
    ADDRESS_BAD_USER = "address_bad_user"  # user part has forbidden characters
    ADDRESS_BAD_DOMAIN = "address_bad_domain"  # org part is not a valid domain

    # -- envelopes ---------------------------------------------------------
    ENVELOPE_MALFORMED = "envelope_malformed"  # not JSON, wrong types, missing fields
    ENVELOPE_BAD_VERSION = "envelope_bad_version"  # a version we do not speak
    ENVELOPE_BAD_ID = "envelope_bad_id"
    ENVELOPE_BAD_FROM = "envelope_bad_from"
    ENVELOPE_BAD_TO = "envelope_bad_to"
    ENVELOPE_BAD_TIME = "envelope_bad_time"  # expires <= created, or absurd times
    ENVELOPE_BAD_GROUP = "envelope_bad_group"  # group assertion malformed
    ENVELOPE_BAD_SIGNATURE = "envelope_bad_signature"  # signature field malformed
    ENVELOPE_TOO_LARGE = "envelope_too_large"  # over the hard protocol limit
    ENVELOPE_OPEN_FAILED = "envelope_open_failed"  # the one crypto failure
    # retention fields of a version 2 envelope malformed (partial, bad id, bad length)
    ENVELOPE_BAD_RETENTION = "envelope_bad_retention"
    # the retention copy is not the one the content key gives (the recipient's client saw it)
    RETENTION_WRAP_MISMATCH = "retention_wrap_mismatch"
    EXPIRED = "expired"
    KEY_RECORD_MALFORMED = "key_record_malformed"  # a user's public keys do not parse
    KEY_RECORD_INVALID = "key_record_invalid"  # a signed key record failed verification
    KEY_CHANGED = "key_changed"  # a contact's keys differ from those the client remembers

    # -- policy decisions (see docs/rules.md) -------------------------------
    ALLOWED = "allowed"
    NO_GROUP = "no_group"  # the local user is in no group
    PEER_NOT_ALLOWED = "peer_not_allowed"  # the group may not reach / hear that peer
    UNKNOWN_PEER = "unknown_peer"  # the org is not a peer in the rules
    RECIPIENT_UNKNOWN = "recipient_unknown"  # the local recipient does not exist
    SENDER_NOT_ORIGIN = "sender_not_origin"  # `from` is not a user of the sending org
    RECIPIENT_NOT_LOCAL = "recipient_not_local"  # `to` is not a user of this org
    TOO_LARGE = "too_large"  # over the group's max_envelope_bytes
    TTL_OUT_OF_BOUNDS = "ttl_out_of_bounds"
    BURN_ON_READ_REQUIRED = "burn_on_read_required"
    BURN_ON_READ_FORBIDDEN = "burn_on_read_forbidden"
    RETENTION_REQUIRED = "retention_required"  # the group is under retention; no retention copy
    RETENTION_KEY_UNKNOWN = "retention_key_unknown"  # a retention copy for no current key

    # -- peers and transport ------------------------------------------------
    ORIGIN_MISMATCH = "origin_mismatch"  # body `origin` is not the certificate's org
    DESTINATION_MISMATCH = "destination_mismatch"
    CERT_MISSING = "cert_missing"
    CERT_UNTRUSTED = "cert_untrusted"
    CERT_EXPIRED = "cert_expired"
    CERT_NO_ORG = "cert_no_org"  # no usable dNSName SAN
    CERT_WRONG_CA = "cert_wrong_ca"  # chain does not end in the peer's own CA
    PIN_MISMATCH = "pin_mismatch"
    HANDSHAKE_FAILED = "handshake_failed"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    PROTOCOL = "protocol_error"
    BODY_TOO_LARGE = "body_too_large"
    TXN_CONFLICT = "txn_conflict"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a transaction body type not taken (415)
    NOT_ACCEPTABLE = "not_acceptable"  # an Accept that allows no form of the answer (406)
    HEADER_TOO_LARGE = "header_too_large"  # request head over the listener's limit (431)
    REQUEST_TIMEOUT = "request_timeout"  # a request not read in time (408)
    TOO_MANY_CONNECTIONS = "too_many_connections"  # per-peer connection cap (503)
    NOT_FOUND = "not_found"  # no route for the path (404)
    METHOD_NOT_ALLOWED = "method_not_allowed"  # route exists, method does not (405)
    INTERNAL = "internal_error"  # a bug of ours; the body never says more (500)

    # -- client API (docs/client-api.md) --------------------------------------
    UNAUTHORIZED = "unauthorized"  # no, unknown or revoked bearer token (401)
    FORBIDDEN = "forbidden"  # authenticated, but not allowed to do that (403)
    SENDER_MISMATCH = "sender_mismatch"  # envelope `from` is not the token's user (403)
    ENVELOPE_ID_CONFLICT = "envelope_id_conflict"  # id already used by another envelope (409)
    PEER_UNAVAILABLE = "peer_unavailable"  # a peer could not answer a key lookup (502)
    LANE_FULL = "lane_full"  # the peer's spool lane is at its limit (503, Retry-After)
    MAILBOX_FULL = "mailbox_full"  # the recipient's mailbox is at its limit (503, Retry-After)
    RATE_LIMITED = "rate_limited"  # the user's submission rate is spent (429, Retry-After)
    # The storage reserve is reached or the disk is full: client 507, peer 503 (Retry-After)
    INSUFFICIENT_STORAGE = "insufficient_storage"

    # -- sign-in through OpenID Connect (docs/sign-in.md) ---------------------
    # (reason codes, not secrets: ruff's S105 mistakes "token" names for passwords)
    TOKEN_MALFORMED = "token_malformed"  # noqa: S105 -- not a compact JWS, or claims missing or mistyped
    TOKEN_ALGORITHM = "token_algorithm"  # noqa: S105 -- alg not in the provider's allowlist (none, HS*)
    TOKEN_UNKNOWN_KEY = "token_unknown_key"  # noqa: S105 -- kid in no key of the IdP's JWKS, even refreshed
    TOKEN_SIGNATURE = "token_signature"  # noqa: S105 -- the signature does not verify
    TOKEN_ISSUER = "token_issuer"  # noqa: S105 -- iss is not a configured provider
    TOKEN_AUDIENCE = "token_audience"  # noqa: S105 -- aud names none of the provider's audiences
    TOKEN_AZP = "token_azp"  # noqa: S105 -- several audiences and azp missing, or azp not our client
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 -- exp passed (beyond the clock skew)
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # noqa: S105 -- nbf or iat in the future (beyond the skew)
    TOKEN_NONCE = "token_nonce"  # noqa: S105 -- nonce missing or not the one sent
    USER_UNMAPPED = "user_unmapped"  # the user claim names no user of this org
    IDP_UNAVAILABLE = "idp_unavailable"  # discovery, JWKS or token endpoint unreachable (503)
    DEVICE_CODE_INVALID = "device_code_invalid"  # unknown, expired, used or replayed
    AUTHORIZATION_PENDING = "authorization_pending"  # the user has not approved yet (RFC 8628)
    SLOW_DOWN = "slow_down"  # polling too fast (RFC 8628)
    ACCESS_DENIED = "access_denied"  # the user refused at the IdP
    SESSION_EXPIRED = "session_expired"  # a session or refresh token past its lifetime
    REFRESH_REFUSED = "refresh_refused"  # the IdP refused the refresh: user disabled, grant revoked
    GROUP_CONFLICT = "group_conflict"  # the IdP's groups put the user in two groups of the rules
    MFA_REQUIRED = "mfa_required"  # the user's group requires an acr/amr the session lacks
    ADMIN_TOKENS_DISABLED = "admin_tokens_disabled"  # `oidc.admin_tokens: false`

    # -- ours ---------------------------------------------------------------
    CONFIG = "config_error"
    RULES = "rules_error"
    PKI = "pki_error"
    STORAGE = "storage_error"


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    default_reason: Reason = Reason.PROTOCOL

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason: Reason = reason if reason is not None else self.default_reason

    def __str__(self) -> str:
        return self.message


class LocalError(GatewayError):
    """Ours to fix: configuration, rules, key material, storage."""

    default_reason = Reason.CONFIG


class ConfigError(LocalError):
    default_reason = Reason.CONFIG


class RulesError(LocalError):
    """Invalid federation rules. ``issues`` holds every problem found, in file order.

    Each issue is already formatted as ``FILE:LINE:COLUMN: key.path: message``.
    """

    default_reason = Reason.RULES

    def __init__(self, issues: list[str]) -> None:
        self.issues = list(issues)
        first = self.issues[0] if self.issues else "invalid rules"
        more = f" (and {len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        super().__init__(first + more)


class PKIError(LocalError):
    default_reason = Reason.PKI


class StorageError(LocalError):
    default_reason = Reason.STORAGE


class StorageFullError(StorageError):
    """The disk has no room for a write (SQLite's ``SQLITE_FULL``): nothing was stored.

    Temporary: answered 507 (a client) or 503 (a peer) with ``Retry-After``,
    never 500; acknowledgements and deletions run in the reserve kept for
    them (:mod:`gateway.reserve`).
    """

    default_reason = Reason.INSUFFICIENT_STORAGE


class CapacityError(GatewayError):
    """A configured bound (a lane's or a mailbox's size) leaves no room: nothing was stored.

    A temporary condition, not a fault of the caller's input: answered 503 with
    ``Retry-After``. ``full`` names what is full (peers, or users), so a caller
    with a batch can still store the items that do fit.
    """

    default_reason = Reason.LANE_FULL

    def __init__(self, message: str, *, reason: Reason, full: frozenset[str]) -> None:
        super().__init__(message, reason=reason)
        self.full = full


class RemoteError(GatewayError):
    """A client or a peer sent something wrong. Answered with ``reason``, counted."""

    default_reason = Reason.PROTOCOL


class AddressError(RemoteError):
    default_reason = Reason.ADDRESS_MALFORMED


class EnvelopeError(RemoteError):
    default_reason = Reason.ENVELOPE_MALFORMED


class EnvelopeOpenError(RemoteError):
    """The one error of seal/open. Its message never says what failed."""

    default_reason = Reason.ENVELOPE_OPEN_FAILED

    def __init__(self) -> None:
        super().__init__("envelope could not be opened")


class RetentionWrapMismatch(EnvelopeOpenError):
    """A signed version 2 envelope whose retention copy is not the one its content key gives.

    Raised only after the signature verified and the envelope opened, so it
    tells nothing to anyone but a sender the recipient has authenticated: that
    sender did not retain the message honestly. A subclass of
    :class:`EnvelopeOpenError`, so a caller that refuses every open failure
    refuses this one too.
    """

    default_reason = Reason.RETENTION_WRAP_MISMATCH

    def __init__(self) -> None:
        RemoteError.__init__(
            self,
            "the sender's retention copy does not match this message: "
            "it was not retained honestly; refused",
        )


class KeyRecordError(RemoteError):
    """The one error of key record verification. Its message never says what failed."""

    default_reason = Reason.KEY_RECORD_INVALID

    def __init__(self) -> None:
        super().__init__("key record is not valid")


class PeerAuthError(RemoteError):
    default_reason = Reason.CERT_UNTRUSTED


class ProtocolError(RemoteError):
    default_reason = Reason.PROTOCOL


class SignInError(RemoteError):
    """A sign-in refused: an ID token, a device code, a refresh or a session.

    The message is for the local client that signed in (it says which check
    failed, never a token); the IdP's own error text is never passed on.
    """

    default_reason = Reason.TOKEN_MALFORMED
