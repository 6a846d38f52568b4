"""One gateway: builds the parts from a :class:`~gateway.config.GatewayConfig` and runs them.

Theory of operation
-------------------
Start-up does everything that can fail for a reason the admin must fix
*before* it binds a port: rules are loaded and validated, key material is
read, TLS contexts are built, the database is opened and migrated. Any of
these failing is a :class:`~gateway.errors.LocalError` that ``gateway run``
prints as one line.

Then one nursery holds everything:

* three listeners on the one HTTP layer (:mod:`gateway.http`): federation
  (mTLS, the receiver), client API (the org's clients), metrics (Prometheus,
  health, readiness);
* the sender (one task per peer lane), the spool sweeper, the mailbox
  sweeper;
* the rules watcher and the SIGHUP handler (hot reload), and the federation
  listener following reloads (new CA set, dropped peers disconnected);
* the certificate watcher (:mod:`gateway.tls_runtime`): a renewed federation
  or client API certificate and key, once checked, serve new connections
  (and the sender's new connections to peers); SIGHUP reloads them too.

The listeners run in an inner nursery. SIGTERM or SIGINT makes every listener
stop accepting and finish the requests in flight (each bounded by its
``drain_timeout``); when the inner nursery is empty, the outer one is
cancelled, which stops the senders and sweepers. A transaction cut short
that way is harmless: it is resent after the restart and deduplicated by the
receiver.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx
import trio

from gateway import __version__
from gateway.archive_sweeper import run_archive_sweeper
from gateway.clientapi.api import ClientAPI
from gateway.clientapi.mailbox_wait import MailboxWaiters
from gateway.clientapi.signin import SignInAPI
from gateway.cluster import LeaseKeeper, SpoolAnnouncer
from gateway.config import GatewayConfig
from gateway.core.address import Address
from gateway.core.ratelimit import RateLimiter
from gateway.errors import StorageError
from gateway.federation.keys import KeyDirectory, fetch_remote_keys
from gateway.federation.liveness import greet_peers, hearing
from gateway.federation.receiver import Receiver
from gateway.federation.sender import Sender, SenderSettings
from gateway.federation.sweeper import run_spool_sweeper
from gateway.federation.transport import H11PeerTransport
from gateway.federation.trust import FederationTrust, follow_certificate, follow_reloads
from gateway.federation.versions import PeerVersions
from gateway.http import HTTPServer, Router, ServerLimits
from gateway.observability.audit import AuditWriter
from gateway.observability.certs import CLIENT_API, FEDERATION, ORG_CA, CertificateGauges
from gateway.observability.endpoints import MetricsEndpoints, NotReady
from gateway.observability.gauges import run_gauge_refresher
from gateway.observability.metrics import STORAGE_LISTEN_LOSSES, NodeInfo
from gateway.oidc.idp import IdP, idp_ssl_context, read_client_secret
from gateway.oidc.members import IdPMemberships
from gateway.oidc.sessions import SessionService
from gateway.pki import dev
from gateway.pki.own import OwnCertificate
from gateway.pki.tls import client_api_server_context
from gateway.reserve import SpaceReserve
from gateway.rules_runtime import ReloadRecord, RulesHolder, watch_rules_file, watch_sighup
from gateway.storage.arrivals import WatchesArrivals
from gateway.storage.base import Bound, Storage
from gateway.storage.opening import open_configured_storage
from gateway.tls_runtime import CertificateHolder, reload_all, watch_certificate_files

LOGGER = logging.getLogger("gateway.app")

#: How often expired envelopes leave the mailboxes (the spool sweeper has its own).
MAILBOX_SWEEP_INTERVAL = 60.0
#: What the org's sweeper forgets, and when (docs/storage.md, "What is stored"):
#: an envelope id an hour after its envelope expired (a receiver refuses expired
#: envelopes, so the id guards nothing after that; the hour absorbs clock skew),
#: a delivery status after 30 days, a received transaction's record after 7.
SEEN_GRACE_MS = 3_600_000
STATUS_KEEP_MS = 30 * 86_400_000
TXN_KEEP_MS = 7 * 86_400_000
#: How often the rules file is checked for changes.
RULES_POLL_INTERVAL = 2.0


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class BoundPorts:
    """Where the listeners ended up (port 0 in the config means "any free port")."""

    federation: int
    client: int
    metrics: int


def _server_limits(config: GatewayConfig, *, long_poll: bool = False) -> ServerLimits:
    limits = config.limits
    return ServerLimits(
        max_header_bytes=limits.max_header_bytes,
        max_body_bytes=limits.max_body_bytes,
        request_timeout=limits.request_timeout,
        idle_timeout=max(limits.idle_timeout, limits.long_poll_max + 5.0)
        if long_poll
        else limits.idle_timeout,
        handshake_timeout=limits.handshake_timeout,
        max_connections=limits.max_connections,
    )


async def _mailbox_sweeper(
    storage: Storage,
    *,
    clock_ms: Callable[[], int],
    interval: float,
    sweeps: Callable[[], bool] = lambda: True,
) -> None:
    """Expired envelopes leave the mailboxes (and the file's bytes: secure_delete + scrub);
    ended sessions, old dedup ids, statuses and transaction records are forgotten.

    Only on the node that runs the org's sweepers (``sweeps()``, its lease).
    """
    while True:
        if not sweeps():
            await trio.sleep(interval)
            continue
        try:
            removed = 0
            while True:
                expired = await storage.mailbox_expire(clock_ms())
                removed += len(expired)
                if not expired:
                    break
            if removed:
                LOGGER.info("mailboxes: %d expired envelope(s) removed", removed)
                await storage.scrub()
            # sign-in sessions past their refresh lifetime are forgotten here too
            now = clock_ms()
            await storage.session_delete_ended(before_ms=now)
            pruned = await storage.prune(
                seen_before_ms=max(0, now - SEEN_GRACE_MS),
                statuses_before_ms=max(0, now - STATUS_KEEP_MS),
                txns_before_ms=max(0, now - TXN_KEEP_MS),
            )
            if pruned.seen or pruned.statuses or pruned.txns:
                LOGGER.info(
                    "pruned %d dedup id(s), %d status(es), %d transaction record(s)",
                    pruned.seen,
                    pruned.statuses,
                    pruned.txns,
                )
        except StorageError as exc:  # one line, traceback at DEBUG: a disk or database fault
            LOGGER.error(  # noqa: TRY400
                "mailbox sweep failed: %s; trying again in %ss",
                exc.message,
                interval,
                exc_info=LOGGER.isEnabledFor(logging.DEBUG),
            )
        await trio.sleep(interval)


async def _wait_for_stop_signal(servers: list[HTTPServer], waiters: MailboxWaiters) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            LOGGER.info(
                "%s: stopping; listeners finish their requests in flight",
                signal.Signals(signum).name,
            )
            for server in servers:
                server.stop_accepting()
            # Long-polls answer now (with what they have) instead of holding the drain.
            waiters.close()
            return


async def run_gateway(
    config: GatewayConfig,
    *,
    clock_ms: Callable[[], int] = wall_clock_ms,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[BoundPorts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one gateway until SIGTERM/SIGINT (or until cancelled)."""
    # Users whose group comes from an IdP claim (members_from): filled from the
    # stored sessions once the storage is open, kept up to date by sign-ins.
    memberships = IdPMemberships()
    rules = RulesHolder.load(str(config.rules), idp_members=memberships)
    federation_certificate = CertificateHolder(
        FEDERATION, config.tls.cert, config.tls.key, org=config.org, ca_file=config.tls.ca
    )
    certificates_in_use = [federation_certificate]
    trust = FederationTrust(rules, own=federation_certificate, clock_ms=clock_ms)
    federation_context = trust.update()
    client_certificate: CertificateHolder | None = None
    client_context = None
    if config.client_tls is not None:
        client_certificate = CertificateHolder(
            CLIENT_API, config.client_tls.cert, config.client_tls.key
        )
        certificates_in_use.append(client_certificate)
        client_context = client_api_server_context(
            own=client_certificate.current, min_version=config.client_tls.min_version
        )
    org_signing_seed = dev.load_signing_key(config.signing_key).private_bytes_raw()
    audit = AuditWriter(config.audit_path, max_bytes=config.audit_max_bytes, node=config.node)
    async with (
        open_configured_storage(config.storage) as storage,
        contextlib.AsyncExitStack() as exits,
    ):
        # The disk of an SQLite database keeps a reserve; new envelopes wait below it.
        # A PostgreSQL server's disk is its own (a full one answers StorageFullError).
        archive = storage.archive  # the retention archive: in either engine's database
        reserve = None
        if config.storage.sqlite_path is not None:
            reserve = SpaceReserve(
                config.storage.sqlite_path.parent,
                config.limits.storage_min_free_bytes,
                reusable_bytes=storage.reusable_bytes,
            )
        transport = H11PeerTransport(
            config.org,
            None,
            None,
            rules,
            own=federation_certificate,
            timeout=config.limits.request_timeout,
            connections_per_peer=config.limits.max_inflight_transactions,
        )
        # This node's beat and leases: which peers' lanes it drives, and whether it
        # runs the org's sweepers (one SQLite node holds them all).
        # Submissions for a lane another node drives wake it there (PostgreSQL NOTIFY),
        # and so does a lane given back to the node that should drive it.
        announcer = SpoolAnnouncer(storage) if isinstance(storage, WatchesArrivals) else None
        keeper = LeaseKeeper(
            storage,
            node=config.node,
            version=__version__,
            rules_sha256=lambda: rules.sha256,
            peers=lambda: rules.current.peers.keys(),
            clock_ms=clock_ms,
            lease_time=config.limits.lease_time,
            on_released=announcer.wake if announcer is not None else None,
        )
        sender = Sender(
            leases=keeper,
            remote_wake=announcer.wake if announcer is not None else None,
            org=config.org,
            storage=storage,
            transport=transport,
            rules=rules,
            clock_ms=clock_ms,
            settings=SenderSettings.from_limits(config.limits),
            envelope_versions=PeerVersions(transport),
        )
        waiters = MailboxWaiters()
        # One bound for every way into a mailbox: a colleague's envelope or a peer's.
        mailbox_bound = Bound(config.limits.mailbox_max_envelopes, config.limits.mailbox_max_bytes)
        receiver = Receiver(
            org=config.org,
            rules=rules,
            storage=storage,
            clock_ms=clock_ms,
            on_delivered=waiters.notify,
            audit=audit,
            inbound_rate=RateLimiter(
                rate=config.limits.inbound_rate_per_peer,
                burst=config.limits.inbound_burst_per_peer,
            ),
            mailbox_bound=mailbox_bound,
            reserve=reserve,
        )

        async def remote_key_lookup(address: Address) -> bytes | None:
            # Over the peer's persistent mTLS client; ClientAPI verifies the record.
            return await fetch_remote_keys(transport, address.org, address.user)

        sessions: SessionService | None = None
        if config.oidc.providers:
            idps = {
                provider.name: IdP(
                    provider,
                    config.oidc,
                    http=await exits.enter_async_context(
                        httpx.AsyncClient(
                            verify=idp_ssl_context(provider), timeout=config.limits.request_timeout
                        )
                    ),
                    client_secret=read_client_secret(provider),
                )
                for provider in config.oidc.providers
            }
            sessions = SessionService(
                org=config.org,
                config=config.oidc,
                idps=idps,
                storage=storage,
                rules=rules,
                clock_ms=clock_ms,
                memberships=memberships,
            )
            known = await sessions.load_memberships()
            LOGGER.info("sign-in: %d provider(s), %d signed-in user(s)", len(idps), known)

        client_api = ClientAPI(
            sessions=sessions,
            admin_tokens=config.oidc.admin_tokens,
            org=config.org,
            rules=rules,
            storage=storage,
            org_signing_seed=org_signing_seed,
            waiters=waiters,
            clock_ms=clock_ms,
            on_spooled=sender.notify,
            remote_key_lookup=remote_key_lookup,
            max_wait_seconds=config.limits.long_poll_max,
            audit=audit,
            lane_bound=Bound(
                config.limits.spool_max_envelopes_per_peer, config.limits.spool_max_bytes_per_peer
            ),
            mailbox_bound=mailbox_bound,
            submit_rate=RateLimiter(
                rate=config.limits.submit_rate_per_user, burst=config.limits.submit_burst_per_user
            ),
            reserve=reserve,
            archive=archive,
        )

        federation_router, client_router, metrics_router = Router(), Router(), Router()
        receiver.add_routes(federation_router)
        KeyDirectory(org=config.org, rules=rules, storage=storage).add_routes(federation_router)
        client_api.add_routes(client_router)
        if sessions is not None:
            SignInAPI(sessions).add_routes(client_router)

        federation = HTTPServer(
            "federation",
            # Any request from a peer is news that it is up: its lane stops backing off.
            hearing(federation_router, sender.heard_from),
            ssl_context=federation_context,
            identify=trust.identify,
            limits=_server_limits(config),
        )
        client = HTTPServer(
            "client",
            client_router,
            ssl_context=client_context,
            limits=_server_limits(config, long_poll=True),
        )
        servers = [federation, client]

        async def storage_ready() -> bool:
            # A real durable write: a full disk, a lost lock or a database gone shows here.
            await storage.check_writable()
            return True

        async def listeners_ready() -> bool:
            return all(server.port is not None for server in servers)

        async def rules_ready() -> bool:
            return rules.current is not None

        async def disk_ready() -> bool:
            why = reserve.shortfall() if reserve is not None else None
            if why is not None:
                raise NotReady(why)
            return True

        checks: Mapping[str, Callable[[], Awaitable[bool]]] = {
            "rules": rules_ready,
            "storage": storage_ready,
            **({"disk": disk_ready} if reserve is not None else {}),
            "listeners": listeners_ready,
        }
        MetricsEndpoints(checks).add_routes(metrics_router)
        metrics = HTTPServer("metrics", metrics_router, limits=_server_limits(config))
        servers.append(metrics)

        unfollow = follow_reloads(rules, trust, federation)
        unfollow_own = follow_certificate(federation_certificate, trust, federation)
        if client_certificate is not None:
            client_min_version = config.client_tls.min_version if config.client_tls else "1.3"

            def client_renewed(own: OwnCertificate) -> None:
                try:
                    context = client_api_server_context(own=own, min_version=client_min_version)
                except Exception:
                    LOGGER.exception("client API: cannot build the TLS context of the new pair")
                    return
                client.set_ssl_context(context)

            client_certificate.subscribe(client_renewed)
        node_info = NodeInfo(config.node, __version__)
        node_info.show(rules.sha256)

        def reloaded(record: ReloadRecord) -> None:
            audit.record_reload(record, rules.current.peers)
            if record.ok:
                node_info.show(rules.sha256)

        unaudit = rules.subscribe_records(reloaded)
        # A reload may add or drop peers: the keeper claims or gives back their lanes now.
        unkeep = rules.subscribe_records(lambda record: keeper.round_soon())
        certificates = CertificateGauges()
        unfollow_certificates = certificates.follow(rules)
        # The federation and client API series follow the pairs in use (tls_runtime).
        own_certificates = {ORG_CA: config.tls.ca}
        try:
            async with trio.open_nursery() as root:
                await root.start(audit.run)
                audit.record_reload(rules.history[-1], rules.current.peers)  # the initial load
                await root.start(keeper.run)
                await root.start(sender.run)
                await root.start(
                    lambda *, task_status: run_spool_sweeper(
                        storage,
                        clock_ms=clock_ms,
                        sweeps=keeper.runs_sweepers,
                        peers=lambda: rules.current.peers.keys(),
                        task_status=task_status,
                    )
                )
                await root.start(
                    lambda *, task_status: run_gauge_refresher(
                        storage,
                        rules,
                        clock_ms=clock_ms,
                        own_certificates=own_certificates,
                        certificates=certificates,
                        task_status=task_status,
                    )
                )
                if reserve is not None:
                    await root.start(reserve.watch)

                def heard_spooled(peers: Iterable[str] | None) -> None:
                    # Lanes that run here send now; one handed to this node is claimed now.
                    sender.wake_lanes(peers)
                    keeper.news(peers)

                if isinstance(storage, WatchesArrivals):
                    # Long-polls here wake for envelopes other nodes store too.
                    await root.start(
                        lambda *, task_status: storage.watch_arrivals(
                            waiters,
                            on_lost=STORAGE_LISTEN_LOSSES.inc,
                            spooled=heard_spooled,
                            task_status=task_status,
                        )
                    )
                if announcer is not None:
                    await root.start(announcer.run)
                # On the node holding the sweeper lease (its deletions are also safe at once).
                await root.start(
                    lambda *, task_status: run_archive_sweeper(
                        archive,
                        clock_ms=clock_ms,
                        scrub=storage.scrub,
                        sweeps=keeper.runs_sweepers,
                        task_status=task_status,
                    )
                )
                root.start_soon(
                    lambda: _mailbox_sweeper(
                        storage,
                        clock_ms=clock_ms,
                        interval=MAILBOX_SWEEP_INTERVAL,
                        sweeps=keeper.runs_sweepers,
                    )
                )
                await root.start(
                    lambda *, task_status: watch_rules_file(
                        rules, poll_interval=RULES_POLL_INTERVAL, task_status=task_status
                    )
                )
                await root.start(
                    lambda *, task_status: watch_certificate_files(
                        certificates_in_use,
                        poll_interval=RULES_POLL_INTERVAL,
                        task_status=task_status,
                    )
                )
                if handle_signals:
                    await root.start(
                        lambda *, task_status: watch_sighup(
                            rules,
                            also=[lambda trigger: reload_all(certificates_in_use, trigger=trigger)],
                            task_status=task_status,
                        )
                    )
                async with trio.open_nursery() as listeners:
                    listen = config.listen
                    ports = BoundPorts(
                        federation=await listeners.start(
                            federation.serve, listen.federation.host, listen.federation.port
                        ),
                        client=await listeners.start(
                            client.serve, listen.client.host, listen.client.port
                        ),
                        metrics=await listeners.start(
                            metrics.serve, listen.metrics.host, listen.metrics.port
                        ),
                    )
                    LOGGER.info(
                        "gateway %s ready: federation %s:%d, client API %s:%d (%s), "
                        "metrics %s:%d; rules %s (sha256 %s)",
                        config.org,
                        listen.federation.host,
                        ports.federation,
                        listen.client.host,
                        ports.client,
                        "tls" if client_context is not None else "plain",
                        listen.metrics.host,
                        ports.metrics,
                        config.rules,
                        rules.sha256[:12],
                    )
                    task_status.started(ports)
                    # Peers that backed off from us while we were down hear we are back.
                    root.start_soon(greet_peers, transport, list(rules.current.peers))
                    if handle_signals:
                        listeners.start_soon(_wait_for_stop_signal, servers, waiters)
                # Every listener has drained: stop the rest.
                root.cancel_scope.cancel()
        finally:
            unfollow()
            unfollow_own()
            unaudit()
            unkeep()
            unfollow_certificates()
            waiters.close()
            with trio.CancelScope(shield=True):
                await transport.aclose()
    LOGGER.info("gateway %s stopped", config.org)
