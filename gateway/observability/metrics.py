"""Every Prometheus metric the gateway exports, defined once, at module level.

Names follow ``gateway_<subsystem>_<what>_<unit>``. Label values come only
from bounded sets: reason codes (:class:`gateway.errors.Reason`), listener
names, result words, and peer or group names *from the loaded rules* (anything
else is reported as ``other``, see :func:`bounded`). docs/metrics.md lists
each one; a test keeps the two equal.

Hot paths keep labelled children (``.labels(...)`` once, then ``.inc()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Container

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # type: ignore[no-untyped-call]

OTHER = "other"


def bounded(value: str, allowed: Container[str]) -> str:
    """``value`` if it is one of ``allowed`` (names from the rules), else ``other``."""
    return value if value in allowed else OTHER


# -- rules ---------------------------------------------------------------------
RULES_RELOADS = Counter(
    "gateway_rules_reloads_total",
    "Rules loads and reloads, by result (success or failure).",
    ["result"],
)
NODE_INFO = Gauge(
    "gateway_node_info",
    "1 for this gateway node, labelled with its name, its version and the SHA-256 of the "
    "rules it has in force: nodes of one org whose rules_sha256 differ run different rules.",
    ["node", "version", "rules_sha256"],
)
# -- the nodes of one org (gateway.cluster) --------------------------------------
CLUSTER_NODES_LIVE = Gauge(
    "gateway_cluster_nodes_live",
    "Gateway nodes of this org that this node saw beating at its last lease round "
    "(itself included).",
)
CLUSTER_LEASES_HELD = Gauge(
    "gateway_cluster_leases_held",
    "Leases this node holds, by kind: lane (one per peer whose sender lane it drives) "
    "or sweeper (1 on the node running the org's expiry and pruning).",
    ["kind"],
)
CLUSTER_LEASE_CHANGES = Counter(
    "gateway_cluster_lease_changes_total",
    "Leases this node acquired, took over from another node, released, lost (granted to "
    "another node while it could not renew) or let expire (the database did not answer).",
    ["change"],
)
CLUSTER_CLOCK_OFFSET = Gauge(
    "gateway_cluster_clock_offset_seconds",
    "This node's clock minus the database server's, at its last beat (PostgreSQL; 0 on "
    "SQLite, which has no clock of its own). Leases are timed by the nodes' clocks.",
)
CLUSTER_ROUND_FAILURES = Counter(
    "gateway_cluster_round_failures_total",
    "Lease rounds (beat, renew, claim) that failed on a storage error.",
)
CLUSTER_DUPLICATE_NODE = Counter(
    "gateway_cluster_duplicate_node_total",
    "Beats that found this node's row written by another live process with the same "
    "`node:` name (a configuration mistake).",
)
RULES_LOADED_TIMESTAMP = Gauge(
    "gateway_rules_loaded_timestamp_seconds",
    "Unix time at which the rules in force were loaded.",
)
POLICY_DENIALS = Counter(
    "gateway_policy_denials_total",
    "Policy decisions that denied an envelope, by direction and reason code.",
    ["direction", "reason"],
)

# -- http and tls --------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "gateway_http_requests_total",
    "HTTP requests answered, by listener and status code.",
    ["listener", "status"],
)
HTTP_CONNECTIONS_REFUSED = Counter(
    "gateway_http_connections_refused_total",
    "Connections closed by a limit of the HTTP layer, by listener and reason.",
    ["listener", "reason"],
)
TLS_HANDSHAKE_FAILURES = Counter(
    "gateway_tls_handshake_failures_total",
    "TLS handshakes that failed or whose peer identity was refused, by listener and reason.",
    ["listener", "reason"],
)

# -- federation ----------------------------------------------------------------
# A transaction is one durable commit: milliseconds, up to the request timeout.
TRANSACTION_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Store and forward: from a blink to a peer that was down for a week.
DELIVERY_LATENCY_BUCKETS = (0.05, 0.25, 1.0, 5.0, 30.0, 300.0, 3600.0, 21600.0, 86400.0, 604800.0)
FEDERATION_ENVELOPES = Counter(
    "gateway_federation_envelopes_total",
    "Envelopes exchanged with peers, by direction, peer and outcome "
    "(accepted, or the reason code).",
    ["direction", "peer", "outcome"],
)
FEDERATION_TRANSACTIONS = Counter(
    "gateway_federation_transactions_total",
    "Federation transactions, by direction, peer and result (ok, replayed, or the reason code).",
    ["direction", "peer", "result"],
)
FEDERATION_TRANSACTION_BODIES = Counter(
    "gateway_federation_transaction_bodies_total",
    "Federation transaction bodies sent or received, by direction, peer and framing "
    "(json, binary_v2).",
    ["direction", "peer", "framing"],
)
FEDERATION_TRANSACTION_DURATION = Histogram(
    "gateway_federation_transaction_duration_seconds",
    "Time to handle one federation transaction, from its request to its answer, by direction.",
    ["direction"],
    buckets=TRANSACTION_SECONDS_BUCKETS,
)
DELIVERY_LATENCY = Histogram(
    "gateway_delivery_latency_seconds",
    "From an envelope's `created` time to its arrival in a mailbox (end to end).",
    buckets=DELIVERY_LATENCY_BUCKETS,
)

# -- peers (the sender) and spool (the sweeper and observability.gauges) ------
PEER_UP = Gauge(
    "gateway_peer_up",
    "1 if the last transaction to the peer was answered, 0 if it failed.",
    ["peer"],
)
PEER_BACKOFF = Gauge(
    "gateway_peer_backoff_seconds",
    "Seconds left before the sender tries the peer again (0: not backing off).",
    ["peer"],
)
PEER_CONSECUTIVE_FAILURES = Gauge(
    "gateway_peer_consecutive_failures",
    "Failed transactions to the peer since its last success.",
    ["peer"],
)
PEER_BACKOFF_CUT = Counter(
    "gateway_peer_backoff_cut_total",
    "Backoffs ended before their time, by peer and cause: heard (an authenticated request "
    "from the peer, e.g. its greeting when it starts) or retry (gateway spool retry).",
    ["peer", "cause"],
)
PEER_TRANSACTIONS_IN_FLIGHT = Gauge(
    "gateway_peer_transactions_in_flight",
    "Transactions sent to the peer and not yet answered or failed.",
    ["peer"],
)
SPOOL_ENVELOPES = Gauge(
    "gateway_spool_envelopes",
    "Envelopes waiting in the peer's spool lane.",
    ["peer"],
)
SPOOL_OLDEST_AGE = Gauge(
    "gateway_spool_oldest_age_seconds",
    "Time since the envelope at the head of the peer's spool lane was spooled.",
    ["peer"],
)
SPOOL_EXPIRED = Counter(
    "gateway_spool_expired_total",
    "Envelopes that expired in the spool before the peer took them, by peer.",
    ["peer"],
)

SPOOL_FULL_REFUSALS = Counter(
    "gateway_spool_full_refusals_total",
    "Submissions refused because the peer's lane was at limits.spool_max_envelopes_per_peer "
    "or spool_max_bytes_per_peer (answered 503 lane_full with Retry-After), by peer.",
    ["peer"],
)
MAILBOX_FULL_REFUSALS = Counter(
    "gateway_mailbox_full_refusals_total",
    "Envelopes refused because the recipient's mailbox was at limits.mailbox_max_envelopes "
    "or mailbox_max_bytes, by path (local: a client of ours writing to a colleague, answered "
    "503 mailbox_full with Retry-After; federation: a peer's envelope, answered with the "
    "temporary result mailbox_full).",
    ["path"],
)

PEER_ENDPOINT_FAILOVERS = Counter(
    "gateway_peer_endpoint_failovers_total",
    "Times the sender switched to another of a peer's endpoints because the one in use "
    "could not be connected to, by peer.",
    ["peer"],
)

# -- storage reserve (gateway.reserve) -----------------------------------------------
STORAGE_AVAILABLE_BYTES = Gauge(
    "gateway_storage_available_bytes",
    "Space available to the store: free on the filesystem of the database plus the "
    "database's free pages, at the last sample.",
)
STORAGE_RESERVE_BYTES = Gauge(
    "gateway_storage_reserve_bytes",
    "limits.storage_min_free_bytes: below it new envelopes are refused.",
)
STORAGE_SEGMENT_FILES = Gauge(
    "gateway_storage_segment_files",
    "SQLite only: segment files holding at least one large envelope's bytes.",
)
STORAGE_SEGMENT_BYTES = Gauge(
    "gateway_storage_segment_bytes",
    "SQLite only: bytes of the envelopes kept in segment files (live ranges only).",
)
STORAGE_SEGMENT_MISSING = Gauge(
    "gateway_storage_segment_missing_envelopes",
    "SQLite only: envelopes whose segment file is missing or too short (deleted or cut by "
    "hand): their lane or mailbox cannot be read past them until they expire or are removed.",
)
STORAGE_UNAVAILABLE = Counter(
    "gateway_storage_unavailable_total",
    "Requests answered 503 storage_error (with Retry-After) because the database failed: "
    "unreachable, a connection lost, a commit that did not happen. Nothing of them was "
    "acknowledged.",
    ["listener"],
)
STORAGE_RESERVE_REFUSALS = Counter(
    "gateway_storage_reserve_refusals_total",
    "Envelopes refused because the storage reserve was reached or a write found the disk "
    "full, by path (client: 507 insufficient_storage; federation: envelopes of a "
    "transaction answered 503 insufficient_storage).",
    ["path"],
)

# -- other nodes' mailbox arrivals (gateway.storage.postgres.arrivals, wired in app) -----
STORAGE_LISTEN_LOSSES = Counter(
    "gateway_storage_listen_losses_total",
    "Times this node stopped hearing other nodes' mailbox arrivals because its PostgreSQL "
    "LISTEN connection was lost or could not be made (once per outage).",
)

# -- client api ----------------------------------------------------------------
CLIENTAPI_SUBMISSIONS = Counter(
    "gateway_clientapi_submissions_total",
    "Envelopes submitted through the client API, by result (accepted, or the reason code).",
    ["result"],
)
CLIENTAPI_BATCH_BODIES = Counter(
    "gateway_clientapi_batch_bodies_total",
    "Batch bodies taken by POST /v1/envelopes/batch, by format (json, binary_v1).",
    ["format"],
)
CLIENTAPI_MAILBOX_ANSWERS = Counter(
    "gateway_clientapi_mailbox_answers_total",
    "Mailbox answers (200) of GET /v1/mailbox, by the format the Accept field chose "
    "(json, binary_v1).",
    ["format"],
)
RETENTION_ARCHIVED = Counter(
    "gateway_retention_archived_envelopes_total",
    "Envelopes appended to the retention archive, by the group under retention and direction.",
    ["group", "direction"],
)
RETENTION_ARCHIVED_BYTES = Counter(
    "gateway_retention_archived_bytes_total",
    "Bytes (stored envelope bytes) appended to the retention archive, by group and direction.",
    ["group", "direction"],
)
RETENTION_SENDER_UNVERIFIED = Counter(
    "gateway_retention_sender_unverified_total",
    "Envelopes archived without a sender key that verifies their signature, by direction and "
    "reason: no_key_record (none found), key_record_invalid (not signed by the sender's org "
    "key), signature_invalid (the key found does not verify the envelope).",
    ["direction", "reason"],
)
RETENTION_ARCHIVE_RECORDS = Gauge(
    "gateway_retention_archive_records",
    "Records in the retention archive, as of the last archive sweep.",
)
RETENTION_ARCHIVE_OLDEST_AGE = Gauge(
    "gateway_retention_archive_oldest_age_seconds",
    "Age of the oldest record in the retention archive (0 when empty), as of the last sweep.",
)
RETENTION_ARCHIVE_DELETED = Counter(
    "gateway_retention_archive_deleted_total",
    "Archive records deleted because their group's keep had passed and no hold kept them.",
)
RETENTION_HOLDS = Gauge(
    "gateway_retention_holds",
    "Users under a legal hold (their archive records are not deleted), as of the last sweep.",
)
RETENTION_MISMATCH_REPORTS = Counter(
    "gateway_clientapi_retention_mismatch_reports_total",
    "Envelopes our clients refused because their retention copy did not match their content "
    "key (a sender that did not retain honestly), by the sender's org: local, a peer of the "
    "rules, or other.",
    ["origin"],
)
CLIENTAPI_LOCAL_DELIVERIES = Counter(
    "gateway_clientapi_local_deliveries_total",
    "Envelopes the client API wrote straight into a local mailbox (sender and recipient "
    "both of this org).",
)

# -- mailboxes (refreshed by gateway.observability.gauges) ---------------------
MAILBOX_ENVELOPES = Gauge(
    "gateway_mailbox_envelopes",
    "Envelopes waiting in local mailboxes, summed by the recipient's group (users in no "
    "group: other).",
    ["group"],
)
MAILBOX_BYTES = Gauge(
    "gateway_mailbox_bytes",
    "Bytes of the envelopes waiting in local mailboxes, summed by the recipient's group.",
    ["group"],
)

# -- certificates (gateway.observability.certs) --------------------------------
CERTIFICATE_NOT_AFTER = Gauge(
    "gateway_certificate_not_after_timestamp_seconds",
    "Unix time at which a certificate expires: own ones (federation, client_api, org_ca) "
    "and each peer's CA from the rules (labelled with the peer's org).",
    ["certificate"],
)
CERTIFICATE_RELOADS = Counter(
    "gateway_certificate_reloads_total",
    "Loads of an own certificate and key pair (start-up, file change, SIGHUP), by certificate "
    "(federation, client_api) and result (success, failure). A failure keeps the pair in use.",
    ["certificate", "result"],
)
CERTIFICATE_READ_ERRORS = Counter(
    "gateway_certificate_read_errors_total",
    "Times an own certificate file could not be read or parsed for its expiry, by certificate.",
    ["certificate"],
)

# -- audit log (gateway.observability.audit) -----------------------------------
AUDIT_RECORDS_WRITTEN = Counter(
    "gateway_audit_records_written_total",
    "Records appended to the audit log (durably, fsynced) by this process.",
)
AUDIT_RECORDS_DROPPED = Counter(
    "gateway_audit_records_dropped_total",
    "Audit records dropped because the writer's queue was full (reload records only; "
    "denials wait for room).",
)
AUDIT_WRITE_FAILURES = Counter(
    "gateway_audit_write_failures_total",
    "Attempts to append a batch to the audit log that failed (retried until written).",
)


# -- sign-in through OpenID Connect (gateway.oidc) -----------------------------------
# `provider` is a provider's name from gateway.yaml; `document` is discovery or jwks.
OIDC_FETCHES = Counter(
    "gateway_oidc_fetches_total",
    "Fetches of an IdP's discovery document or JWKS, by provider, document and result (ok, error).",
    ["provider", "document", "result"],
)
OIDC_METADATA_FETCHED = Gauge(
    "gateway_oidc_metadata_fetched_timestamp_seconds",
    "Unix time of the last successful fetch of an IdP's discovery document or JWKS.",
    ["provider", "document"],
)
OIDC_STALE_SERVES = Counter(
    "gateway_oidc_stale_serves_total",
    "Times a cached discovery document or JWKS was used because the IdP could not be reached.",
    ["provider", "document"],
)
OIDC_UNKNOWN_KID_REFRESHES = Counter(
    "gateway_oidc_unknown_kid_refreshes_total",
    "ID tokens whose kid was in no cached key: JWKS refetched, or throttled (bounded refresh).",
    ["provider", "result"],
)
OIDC_SIGNINS = Counter(
    "gateway_oidc_signins_total",
    "Sign-ins (ID token or device code exchanged for a session), by provider and result "
    "(ok, or the reason code).",
    ["provider", "result"],
)
OIDC_SESSION_REFRESHES = Counter(
    "gateway_oidc_session_refreshes_total",
    "Session refreshes (each re-checks the IdP), by provider and result (ok, or the reason code).",
    ["provider", "result"],
)


class NodeInfo:
    """``gateway_node_info`` of this process: one series, moved to each rules load."""

    def __init__(self, node: str, version: str) -> None:
        self.node = node
        self.version = version
        self._labels: tuple[str, str, str] | None = None

    def show(self, rules_sha256: str) -> None:
        labels = (self.node, self.version, rules_sha256)
        if labels == self._labels:
            return
        if self._labels is not None:
            with contextlib.suppress(KeyError):
                NODE_INFO.remove(*self._labels)
        NODE_INFO.labels(*labels).set(1)
        self._labels = labels
