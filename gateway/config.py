"""``gateway.yaml``: the model of one gateway's configuration, and its loader.

::

    org: acme.example                   # required; the gateway's identity
    node: gw1                           # this node's name (default: the host's name)
    data_dir: data                      # spool, mailboxes, state (mode 0700)
    rules: rules.yaml                   # federation rules
    signing_key: keys/org-signing.key   # Ed25519, signs the org's key records
    tls: {cert: pki/gateway.pem, key: pki/gateway.key, ca: pki/ca.pem}
    client_tls: {cert: pki/client-api.pem, key: pki/client-api.key, min_version: "1.3"}  # or: plain
    listen: {federation: 127.0.0.1:8443, client: 127.0.0.1:8080, metrics: 127.0.0.1:9090}
    endpoint: https://127.0.0.1:8443    # the URL partners dial (or a list: several nodes)
    storage: sqlite                     # data_dir/gateway.sqlite3, or a postgresql:// URL
    limits: {max_body_bytes: 8388608, backoff_initial: 1s, ...}
    log: {format: text, level: info}    # format: text (default) or json (JSON lines)
    audit_log: data/audit.log           # the hash-chained audit log (docs/audit.md)
    audit_max_bytes: 67108864           # rotate the audit log past this size
    oidc:                               # sign-in through OpenID Connect (docs/sign-in.md)
      providers:
        corp:
          issuer: https://idp.acme.example/realms/acme   # exactly the ID tokens' `iss`
          client_id: gateway
          client_secret_file: keys/oidc-client-secret    # only where the flow needs one
          audiences: [gateway]                           # default: [client_id]
          user_claim: preferred_username                 # which claim names the user
          groups_claim: groups
          clock_skew: 60s
          ca: pki/idp-ca.pem                             # default: the system's CAs
      session_ttl: 5m                   # gateway session tokens live this long
      refresh_ttl: 12h                  # refreshes (each re-checks the IdP) for this long
      admin_tokens: true                # false: `gateway token issue` tokens are refused

Every key but ``org`` has a default, which is the layout `gateway init` writes.
Relative paths are relative to the directory of the file, and come out
absolute. Files are not opened here: whoever uses one reports it missing.

Every mistake is a :class:`~gateway.errors.ConfigError` naming the file and the
key path (``gateway.yaml: listen.client: ...``); an unknown key is an error
that suggests the closest known one.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

from gateway.core.address import normalize_domain
from gateway.core.durations import parse_duration
from gateway.core.yamlmarks import MarkedMap, YamlSyntaxError, format_path, load_marked
from gateway.errors import AddressError, ConfigError

MAX_CONFIG_BYTES = 1024 * 1024
MAX_SIZE_LIMIT = 1 << 40  # a sanity ceiling for any count or size in `limits`
SQLITE_FILENAME = "gateway.sqlite3"
AUDIT_FILENAME = "audit.log"  # in data_dir unless `audit_log` says otherwise
DEFAULT_AUDIT_MAX_BYTES = 64 * 1024 * 1024
MIN_AUDIT_MAX_BYTES = 4096
PLAIN = "plain"  # client_tls: plain, for a client API behind a TLS-terminating proxy

DEFAULT_FEDERATION_PORT = 8443
DEFAULT_CLIENT_PORT = 8080
DEFAULT_METRICS_PORT = 9090
DEFAULT_LISTEN_HOST = "127.0.0.1"

_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str) -> HostPort:
    """``HOST:PORT`` or ``[IPv6]:PORT``; host an IP or a DNS name; port 0-65535.

    ``ValueError`` saying what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a quoted 'HOST:PORT' string, got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number in 0-65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(
                f"{text!r}: host {host!r} is neither an IP address nor a name"
            ) from None
    else:
        if ip.version == 6 and not bracketed:
            raise ValueError(f"{text!r}: write an IPv6 host in brackets, like [::1]:8443")
    return HostPort(host=host, port=int(port_text))


NODE_NAME_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")


def validate_node_name(value: object) -> str:
    """A node's name: 1-63 of a-z 0-9 . - (not at either end), like a host name."""
    if not isinstance(value, str) or not NODE_NAME_RE.fullmatch(value):
        raise ValueError(
            f"expected 1 to 63 of a-z, 0-9, '.' and '-' (not first or last), got {value!r}"
        )
    return value


def default_node_name() -> str:
    """The host's name, lower-cased, anything else a node name may not hold made '-'."""
    name = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()).strip(".-")[:63]
    name = name.strip(".-")
    return name if NODE_NAME_RE.fullmatch(name) else "gateway"


MAX_ENDPOINTS: Final = 8  # as many as a partner's rules take for one peer


def _endpoints(value: object) -> tuple[str, ...]:
    """One endpoint URL, or a list of 1 to MAX_ENDPOINTS distinct ones."""
    if not isinstance(value, list):
        return (validate_endpoint(value),)
    if not 1 <= len(value) <= MAX_ENDPOINTS:
        raise ValueError(f"give 1 to {MAX_ENDPOINTS} endpoint URLs, got {len(value)}")
    urls = tuple(validate_endpoint(item) for item in value)
    if len({url.rstrip("/") for url in urls}) != len(urls):
        raise ValueError("an endpoint URL is listed twice")
    return urls


def validate_endpoint(text: object) -> str:
    """An ``https://host[:port][/path]`` URL partners can dial; ``ValueError`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected an https:// URL, got {text!r}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL: {exc}") from None
    if parts.scheme != "https":
        raise ValueError(f"{text!r} must be an https:// URL")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r} must not carry a user name or password")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} must not have a query or fragment")
    if port == 0:
        raise ValueError(f"{text!r}: port 0 cannot be dialed")
    return text.rstrip("/")


@dataclass(frozen=True)
class TLSConfig:
    """The federation certificate, its key, and the org's own CA (for peer cards)."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ClientTLSConfig:
    cert: Path
    key: Path
    min_version: str = "1.3"  # "1.2" allows TLS 1.2, with ECDHE + AEAD suites only


@dataclass(frozen=True)
class ListenConfig:
    federation: HostPort = HostPort(DEFAULT_LISTEN_HOST, DEFAULT_FEDERATION_PORT)
    client: HostPort = HostPort(DEFAULT_LISTEN_HOST, DEFAULT_CLIENT_PORT)
    metrics: HostPort = HostPort(DEFAULT_LISTEN_HOST, DEFAULT_METRICS_PORT)


@dataclass(frozen=True)
class StorageConfig:
    engine: Literal["sqlite", "postgresql"]
    sqlite_path: Path | None = None
    url: str | None = field(default=None, repr=False)  # may hold a password


@dataclass(frozen=True)
class Limits:
    """Bounds an admin may tune. Sizes in bytes, times in seconds.

    In the file, times are durations (``90s``, ``5m``) or plain seconds.
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    # Within docs/protocol.md's advice for senders (§3, §8): a backlog drains
    # about 1.4 times as fast as with 100 (docs/performance.md); a trickle still
    # goes in small transactions, as it comes.
    max_transaction_envelopes: int = 500
    max_transaction_bytes: int = 4 * 1024 * 1024
    # Transactions in flight to one peer, each on its own persistent connection:
    # two let the sender prepare and the receiver commit at the same time
    # (docs/performance.md); 1 keeps strict lane order across transactions.
    max_inflight_transactions: int = 2
    max_connections: int = 1024  # per listener
    # A lane (per peer) and a mailbox (per user) hold at most this much; past
    # it, submissions are refused with 503 lane_full / mailbox_full.
    spool_max_envelopes_per_peer: int = 100_000
    spool_max_bytes_per_peer: int = 4 * 1024 * 1024 * 1024
    mailbox_max_envelopes: int = 10_000
    mailbox_max_bytes: int = 1024 * 1024 * 1024
    # Envelopes one user may submit: a sustained rate a second and a burst (a
    # token bucket); past it, 429 rate_limited with Retry-After. Far above what
    # a person or a normal client sends.
    submit_rate_per_user: int = 1000
    submit_burst_per_user: int = 10_000
    # Envelopes one peer may send us, the same way; past it, the transaction
    # is answered 429 with Retry-After and its sender tries again later.
    inbound_rate_per_peer: int = 20_000
    inbound_burst_per_peer: int = 200_000
    # Space kept free on the database's disk (after Postfix's queue_minfree):
    # below it new envelopes are refused (507 / 503 insufficient_storage) while
    # acknowledgements, expiry and delivery to peers go on (gateway.reserve).
    storage_min_free_bytes: int = 256 * 1024 * 1024
    request_timeout: float = 30.0
    idle_timeout: float = 60.0
    handshake_timeout: float = 10.0
    long_poll_max: float = 60.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    # Nodes sharing one database (gateway.cluster): a dead node's sender lanes
    # and sweepers are driven by another node within this time.
    lease_time: float = 10.0


MAX_INFLIGHT_TRANSACTIONS: Final = 8
MIN_LEASE_TIME: Final = 1.0  # gateway.cluster: a lease round is a fifth of it
MAX_LEASE_TIME: Final = 600.0  # per peer; each holds a connection at the peer

_SIZE_LIMITS = frozenset(
    f.name
    for f in fields(Limits)
    if f.name.startswith(("max_", "spool_", "mailbox_", "submit_", "inbound_", "storage_"))
)
_TIME_LIMITS = frozenset(f.name for f in fields(Limits)) - _SIZE_LIMITS


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # one of LOG_FORMATS
    level: str = "info"  # one of LOG_LEVELS


#: ID-token signature algorithms a provider may allow: asymmetric only, so
#: ``none`` and HMAC with a public key as the secret can never verify.
OIDC_ALGORITHMS: Final = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
DEFAULT_OIDC_ALGORITHMS: Final = ("RS256", "ES256")
DEFAULT_OIDC_SCOPES: Final = ("openid", "profile", "email", "groups", "offline_access")
MAX_OIDC_PROVIDERS: Final = 16
MAX_SESSION_TTL: Final = 3600.0  # sessions are short: the refresh is what re-checks the IdP
MAX_CLOCK_SKEW: Final = 600.0


@dataclass(frozen=True)
class OIDCProvider:
    """One OpenID Provider the org's users sign in with (``oidc.providers.NAME``)."""

    name: str
    issuer: str  # exactly the `iss` of its ID tokens; discovery is at issuer + /.well-known/...
    client_id: str
    audiences: tuple[str, ...]  # an ID token's aud must name one of these
    client_secret_file: Path | None = None  # a confidential client's secret, in a file
    user_claim: str = "preferred_username"
    groups_claim: str = "groups"
    scopes: tuple[str, ...] = DEFAULT_OIDC_SCOPES
    clock_skew: float = 60.0
    algorithms: tuple[str, ...] = DEFAULT_OIDC_ALGORITHMS
    ca: Path | None = None  # CA bundle for the IdP's TLS; None: the system's


@dataclass(frozen=True)
class OIDCConfig:
    providers: tuple[OIDCProvider, ...] = ()
    session_ttl: float = 300.0
    refresh_ttl: float = 12 * 3600.0
    admin_tokens: bool = True
    # Discovery and JWKS: refetched after metadata_max_age; on an unknown kid at
    # most once per kid_refresh_interval; served stale up to stale_for while
    # the IdP cannot be reached (then sign-in fails with idp_unavailable).
    metadata_max_age: float = 3600.0
    kid_refresh_interval: float = 60.0
    stale_for: float = 24 * 3600.0

    def provider(self, name: str) -> OIDCProvider | None:
        return next((p for p in self.providers if p.name == name), None)


@dataclass(frozen=True)
class GatewayConfig:
    path: Path  # the file this came from, absolute
    org: str
    data_dir: Path
    rules: Path
    signing_key: Path
    tls: TLSConfig
    client_tls: ClientTLSConfig | None  # None: `plain`, behind a TLS-terminating proxy
    listen: ListenConfig
    # The URL(s) partners dial: several when the org runs several gateway nodes
    # (each node's federation listener); the peer card lists them all.
    endpoints: tuple[str, ...]
    storage: StorageConfig
    limits: Limits
    log: LogConfig = LogConfig()
    audit_log: Path | None = None  # None: data_dir/audit.log
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    # This process's name among the org's gateway nodes (audit records, metrics,
    # logs); the host's name unless gateway.yaml says `node:`.
    node: str = field(default_factory=lambda: default_node_name())
    oidc: OIDCConfig = OIDCConfig()

    @property
    def audit_path(self) -> Path:
        """The audit log's file (``audit_log``, or ``audit.log`` in ``data_dir``)."""
        return self.audit_log if self.audit_log is not None else self.data_dir / AUDIT_FILENAME

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def endpoint(self) -> str:
        """The first URL partners dial (the only one, for a single node)."""
        return self.endpoints[0]


# -- loading -----------------------------------------------------------------------

_TOP_KEYS = (
    "org",
    "node",
    "data_dir",
    "rules",
    "signing_key",
    "tls",
    "client_tls",
    "listen",
    "endpoint",
    "storage",
    "limits",
    "log",
    "audit_log",
    "audit_max_bytes",
    "oidc",
)
_OIDC_KEYS = (
    "providers",
    "session_ttl",
    "refresh_ttl",
    "admin_tokens",
    "metadata_max_age",
    "kid_refresh_interval",
    "stale_for",
)
_OIDC_PROVIDER_KEYS = (
    "issuer",
    "client_id",
    "client_secret_file",
    "audiences",
    "user_claim",
    "groups_claim",
    "scopes",
    "clock_skew",
    "algorithms",
    "ca",
)
_LOG_KEYS = ("format", "level")
_TLS_KEYS = ("cert", "key", "ca")
_CLIENT_TLS_KEYS = ("cert", "key", "min_version")
_CLIENT_TLS_VERSIONS = ("1.2", "1.3")
_LISTEN_KEYS = ("federation", "client", "metrics")
_LIMIT_KEYS = tuple(f.name for f in fields(Limits))

_DEFAULT_PATHS = {
    "data_dir": "data",
    "rules": "rules.yaml",
    "signing_key": "keys/org-signing.key",
    "tls.cert": "pki/gateway.pem",
    "tls.key": "pki/gateway.key",
    "tls.ca": "pki/ca.pem",
    "client_tls.cert": "pki/client-api.pem",
    "client_tls.key": "pki/client-api.key",
}


_T = TypeVar("_T")


class _Reader:
    """Reads one file's mapping, turning every mistake into ``FILE: key.path: message``."""

    def __init__(self, path: Path, root: object = None) -> None:
        self.path = path
        self.base = path.parent
        self.root = root

    def where(self, key: str, *, at_key: bool = False) -> str:
        """``FILE:LINE:COLUMN`` of the value at dotted ``key`` (as deep as it exists)."""
        node, position = self.root, None
        parts = key.split(".") if key else []
        for index, part in enumerate(parts):
            if not isinstance(node, MarkedMap) or part not in node:
                break
            last = index == len(parts) - 1
            position = node.key_position(part) if at_key and last else node.value_position(part)
            node = node[part]
        return f"{self.path}:{position}" if position is not None else str(self.path)

    def error(self, key: str, message: str, *, at_key: bool = False) -> ConfigError:
        where = self.where(key, at_key=at_key)
        return ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def mapping(self, value: object, key: str, known: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping with keys {', '.join(known)}")
        for name in value:
            if not isinstance(name, str):
                raise self.error(key, f"key {name!r} is not a string")
            if name not in known:
                where = f"{key}.{name}" if key else name
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(
                    where, f"unknown key{hint}; known keys: {', '.join(known)}", at_key=True
                )
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def path_value(self, section: Mapping[str, Any], name: str, key: str) -> Path:
        raw = section.get(name, _DEFAULT_PATHS[key])
        text = self.string(raw, key)
        return Path(os.path.normpath(self.base / Path(text).expanduser()))

    def converted(self, value: object, key: str, convert: Callable[[Any], _T]) -> _T:
        try:
            return convert(value)
        except (ValueError, AddressError) as exc:
            raise self.error(key, str(exc)) from None


def _client_tls_version(reader: _Reader, value: object) -> str:
    # YAML reads an unquoted 1.2 as a number: take it as the version it looks like.
    text = str(value) if isinstance(value, str | float) and not isinstance(value, bool) else None
    if text not in _CLIENT_TLS_VERSIONS:
        raise reader.error(
            "client_tls.min_version",
            f'expected "1.3" (the default: TLS 1.3 only) or "1.2" (TLS 1.2 too, ECDHE and '
            f"AEAD suites only), got {value!r}",
        )
    return text


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE_LIMIT:
        raise ValueError(f"expected a whole number from 1 to {MAX_SIZE_LIMIT}, got {value!r}")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, str):
        seconds: float = parse_duration(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")
    if not seconds > 0 or seconds != seconds:  # rejects 0, negatives and NaN
        raise ValueError(f"expected a duration greater than zero, got {value!r}")
    return float(seconds)


def validate_postgres_url(value: object) -> str:
    """A ``postgresql://`` (or ``postgres://``) URL; ``ValueError`` that never echoes it."""
    if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")):
        return value
    shown = "a URL" if isinstance(value, str) and "://" in value else repr(value)
    raise ValueError(f"expected a postgresql:// URL, got {shown}")


def _storage(value: object, data_dir: Path) -> StorageConfig:
    if value == "sqlite":
        return StorageConfig(engine="sqlite", sqlite_path=data_dir / SQLITE_FILENAME)
    if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")):
        return StorageConfig(engine="postgresql", url=validate_postgres_url(value))
    shown = "a URL" if isinstance(value, str) and "://" in value else repr(value)
    raise ValueError(f"expected sqlite or a postgresql:// URL, got {shown}")


def validate_issuer(text: object) -> str:
    """An ``https://`` issuer URL, kept exactly as written (it must equal ``iss``)."""
    if not isinstance(text, str):
        raise ValueError(f"expected an https:// URL, got {text!r}")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL: {exc}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{text!r} must be an https:// URL with a host (OpenID Connect 3.1.2.1)")
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"{text!r} must have no query, fragment or user name")
    return text


def _string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of strings, got {value!r}")
    if not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError(f"expected a list of non-empty strings, got {value!r}")
    return tuple(dict.fromkeys(value))


def _algorithms(value: object) -> tuple[str, ...]:
    names = _string_list(value)
    for name in names:
        if name not in OIDC_ALGORITHMS:
            raise ValueError(
                f"{name!r} is not allowed: ID tokens must be signed with an asymmetric "
                f"algorithm, one of {', '.join(OIDC_ALGORITHMS)}"
            )
    return names


def _oidc(reader: _Reader, value: object) -> OIDCConfig:
    section = reader.mapping(value, "oidc", _OIDC_KEYS)
    raw_providers = section.get("providers", {})
    if not isinstance(raw_providers, dict) or not raw_providers:
        raise reader.error("oidc.providers", "expected a mapping of provider names to settings")
    if len(raw_providers) > MAX_OIDC_PROVIDERS:
        raise reader.error("oidc.providers", f"at most {MAX_OIDC_PROVIDERS} providers")
    providers: list[OIDCProvider] = []
    issuers: set[str] = set()
    for name, raw in raw_providers.items():
        key = f"oidc.providers.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
            raise reader.error(key, "a provider name is 1-32 of a-z, 0-9, _ and -", at_key=True)
        entry = reader.mapping(raw, key, _OIDC_PROVIDER_KEYS)
        for required in ("issuer", "client_id"):
            if required not in entry:
                raise reader.error(f"{key}.{required}", "missing")
        issuer = reader.converted(entry["issuer"], f"{key}.issuer", validate_issuer)
        if issuer in issuers:
            raise reader.error(f"{key}.issuer", "another provider has this issuer")
        issuers.add(issuer)
        client_id = reader.string(entry["client_id"], f"{key}.client_id")
        optional: dict[str, Any] = {}
        if "client_secret_file" in entry:
            secret_text = reader.string(entry["client_secret_file"], f"{key}.client_secret_file")
            optional["client_secret_file"] = Path(
                os.path.normpath(reader.base / Path(secret_text).expanduser())
            )
        if "ca" in entry:
            ca_text = reader.string(entry["ca"], f"{key}.ca")
            optional["ca"] = Path(os.path.normpath(reader.base / Path(ca_text).expanduser()))
        for claim in ("user_claim", "groups_claim"):
            if claim in entry:
                optional[claim] = reader.string(entry[claim], f"{key}.{claim}")
        if "scopes" in entry:
            scopes = reader.converted(entry["scopes"], f"{key}.scopes", _string_list)
            if "openid" not in scopes:
                raise reader.error(f"{key}.scopes", "must include openid")
            optional["scopes"] = scopes
        if "algorithms" in entry:
            optional["algorithms"] = reader.converted(
                entry["algorithms"], f"{key}.algorithms", _algorithms
            )
        if "clock_skew" in entry:
            skew = reader.converted(entry["clock_skew"], f"{key}.clock_skew", _seconds)
            if skew > MAX_CLOCK_SKEW:
                raise reader.error(f"{key}.clock_skew", f"at most {MAX_CLOCK_SKEW:.0f}s")
            optional["clock_skew"] = skew
        audiences = (
            reader.converted(entry["audiences"], f"{key}.audiences", _string_list)
            if "audiences" in entry
            else (client_id,)
        )
        providers.append(
            OIDCProvider(
                name=name, issuer=issuer, client_id=client_id, audiences=audiences, **optional
            )
        )
    values: dict[str, Any] = {}
    for name in (
        "session_ttl",
        "refresh_ttl",
        "metadata_max_age",
        "kid_refresh_interval",
        "stale_for",
    ):
        if name in section:
            values[name] = reader.converted(section[name], f"oidc.{name}", _seconds)
    if "admin_tokens" in section:
        if not isinstance(section["admin_tokens"], bool):
            raise reader.error("oidc.admin_tokens", "expected true or false")
        values["admin_tokens"] = section["admin_tokens"]
    config = OIDCConfig(providers=tuple(providers), **values)
    if config.session_ttl > MAX_SESSION_TTL:
        raise reader.error(
            "oidc.session_ttl",
            f"at most {MAX_SESSION_TTL:.0f}s: a session is short, its refresh re-checks the IdP",
        )
    if config.refresh_ttl < config.session_ttl:
        raise reader.error("oidc.refresh_ttl", "must be at least oidc.session_ttl")
    return config


def _read_yaml(path: Path) -> object:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (make one with `gateway init`)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        document = load_marked(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 text") from None
    except YamlSyntaxError as exc:
        raise ConfigError(f"{path}:{exc.position}: not valid YAML: {exc.problem}") from None
    if document.problems:
        problem = document.problems[0]
        raise ConfigError(
            f"{path}:{problem.position}: {format_path(problem.path)}: {problem.message}"
        )
    return document.root


def load_config(path: Path | str) -> GatewayConfig:
    """Read and check ``gateway.yaml``; ``ConfigError`` naming the file and key on any mistake."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    document = _read_yaml(path)
    reader = _Reader(path, document)
    if document is None:
        raise reader.error("", "is empty; it needs at least `org: <your domain>`")
    top = reader.mapping(document, "", _TOP_KEYS)

    if "org" not in top:
        raise reader.error("org", "missing; write the org's domain, like `org: acme.example`")
    org = reader.converted(reader.string(top["org"], "org"), "org", normalize_domain)

    data_dir = reader.path_value(top, "data_dir", "data_dir")
    rules = reader.path_value(top, "rules", "rules")
    signing_key = reader.path_value(top, "signing_key", "signing_key")

    tls_section = reader.mapping(top.get("tls", {}), "tls", _TLS_KEYS)
    tls = TLSConfig(
        cert=reader.path_value(tls_section, "cert", "tls.cert"),
        key=reader.path_value(tls_section, "key", "tls.key"),
        ca=reader.path_value(tls_section, "ca", "tls.ca"),
    )

    client_tls: ClientTLSConfig | None
    raw_client_tls = top.get("client_tls", {})
    if raw_client_tls == PLAIN:
        client_tls = None
    else:
        if isinstance(raw_client_tls, str):
            raise reader.error(
                "client_tls", f"expected a mapping or `plain`, got {raw_client_tls!r}"
            )
        section = reader.mapping(raw_client_tls, "client_tls", _CLIENT_TLS_KEYS)
        client_tls = ClientTLSConfig(
            cert=reader.path_value(section, "cert", "client_tls.cert"),
            key=reader.path_value(section, "key", "client_tls.key"),
            min_version=_client_tls_version(reader, section.get("min_version", "1.3")),
        )

    listen_section = reader.mapping(top.get("listen", {}), "listen", _LISTEN_KEYS)
    defaults = ListenConfig()
    listen = ListenConfig(
        **{
            name: reader.converted(listen_section[name], f"listen.{name}", parse_host_port)
            if name in listen_section
            else getattr(defaults, name)
            for name in _LISTEN_KEYS
        }
    )

    if "endpoint" in top:
        endpoints = reader.converted(top["endpoint"], "endpoint", _endpoints)
    else:
        endpoints = (f"https://{org}:{listen.federation.port}",)

    storage = reader.converted(
        top.get("storage", "sqlite"), "storage", lambda v: _storage(v, data_dir)
    )

    limits_section = reader.mapping(top.get("limits", {}), "limits", _LIMIT_KEYS)
    limit_values: dict[str, Any] = {}
    for name, value in limits_section.items():
        convert = _positive_int if name in _SIZE_LIMITS else _seconds
        limit_values[name] = reader.converted(value, f"limits.{name}", convert)
    limits = Limits(**limit_values)
    if limits.max_transaction_bytes > limits.max_body_bytes:
        raise reader.error(
            "limits.max_transaction_bytes",
            f"{limits.max_transaction_bytes} is more than limits.max_body_bytes "
            f"({limits.max_body_bytes}); a transaction would never fit in a request",
        )
    if not 1 <= limits.max_inflight_transactions <= MAX_INFLIGHT_TRANSACTIONS:
        raise reader.error(
            "limits.max_inflight_transactions",
            f"must be within 1..{MAX_INFLIGHT_TRANSACTIONS}, "
            f"got {limits.max_inflight_transactions}",
        )
    if not MIN_LEASE_TIME <= limits.lease_time <= MAX_LEASE_TIME:
        raise reader.error(
            "limits.lease_time",
            f"must be within {MIN_LEASE_TIME:g}s..{MAX_LEASE_TIME:g}s, got {limits.lease_time:g}s",
        )
    if limits.backoff_initial > limits.backoff_max:
        raise reader.error(
            "limits.backoff_initial",
            f"{limits.backoff_initial}s is more than limits.backoff_max ({limits.backoff_max}s)",
        )

    log_section = reader.mapping(top.get("log", {}), "log", _LOG_KEYS)
    log_values: dict[str, str] = {}
    for name, allowed in (("format", LOG_FORMATS), ("level", LOG_LEVELS)):
        if name in log_section:
            value = log_section[name]
            if value not in allowed:
                raise reader.error(
                    f"log.{name}", f"expected one of {', '.join(allowed)}, got {value!r}"
                )
            log_values[name] = value
    log = LogConfig(**log_values)

    audit_log = data_dir / AUDIT_FILENAME
    if "audit_log" in top:
        audit_text = reader.string(top["audit_log"], "audit_log")
        audit_log = Path(os.path.normpath(reader.base / Path(audit_text).expanduser()))
    audit_max_bytes = reader.converted(
        top.get("audit_max_bytes", DEFAULT_AUDIT_MAX_BYTES), "audit_max_bytes", _positive_int
    )
    if audit_max_bytes < MIN_AUDIT_MAX_BYTES:
        raise reader.error(
            "audit_max_bytes", f"must be at least {MIN_AUDIT_MAX_BYTES}, got {audit_max_bytes}"
        )

    node = (
        reader.converted(top["node"], "node", validate_node_name)
        if "node" in top
        else default_node_name()
    )
    oidc = _oidc(reader, top["oidc"]) if "oidc" in top else OIDCConfig()

    return GatewayConfig(
        node=node,
        path=path,
        org=org,
        data_dir=data_dir,
        rules=rules,
        signing_key=signing_key,
        tls=tls,
        client_tls=client_tls,
        listen=listen,
        endpoints=endpoints,
        storage=storage,
        limits=limits,
        log=log,
        audit_log=audit_log,
        audit_max_bytes=audit_max_bytes,
        oidc=oidc,
    )
