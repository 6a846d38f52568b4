"""Segmented networks, proven: two orgs' inside networks, one exchange network.

Five network namespaces stand in for five machines' worth of network (names
carry this test run's pid, so runs never collide; every one is deleted in
teardown, also on failure)::

    acme-in   10.1.0.2 ─veth─ 10.1.0.1 acme-gw   10.9.0.11 ─veth─┐
                                                                 ├─ br0 10.9.0.1, exchange
    globex-in 10.2.0.2 ─veth─ 10.2.0.1 globex-gw 10.9.0.12 ─veth─┘

Each org's clients live on its inside network and route everything through
their gateway (default route); each gateway namespace has forwarding off and
its default route to the exchange namespace, a router that forwards and
routes both inside networks at the gateways: the worst a partner on that
network could do. A ``gateway run`` process runs in each gateway namespace with its client
API on the inside address, its federation listener on the exchange address
and its metrics on loopback; the reference client runs in the inside ones.

Binding a listener to one address is not enough on Linux: a host answers on
any of its addresses whichever interface a packet came in on (the "weak host"
model), so an inside client whose route points at the gateway reaches the
federation listener on the gateway's exchange address. The fixture shows that
first, then adds the two policy-routing rules docs/operations.md gives (no
packet from the inside leg to the exchange address, none from the exchange
leg to the inside address), and the tests prove, with real TCP connects, TLS
handshakes and messages:

* each org's clients reach their own gateway's client API, and no other;
* nothing from one inside network reaches any address of the other (a service
  listens there, so "refused" would mean a packet got through: only
  unreachable or a timeout count);
* the federation listener does not answer on the inside network, the client
  API and metrics not on the exchange network;
* messages still flow both ways through the gateways.

Runs as root on Linux (``ip netns``); skipped elsewhere, failed on Linux
without root rather than silently skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from gateway.config import HostPort
from gateway.devnet import DevOrg

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="network namespaces are Linux only"
    ),
]

GATEWAY: Final = str(Path(sys.executable).parent / "gateway")
PYTHON: Final = sys.executable
ACME, GLOBEX = "acme.example", "globex.example"
ALICE, BOB = f"alice@{ACME}", f"bob@{GLOBEX}"

FEDERATION_PORT: Final = 8443
CLIENT_PORT: Final = 8080
METRICS_PORT: Final = 9090
SERVICE_PORT: Final = 7000  # an ordinary service on each inside network
EXCHANGE_HOST: Final = "10.9.0.1"

#: Bounds on every wait.
COMMAND_TIMEOUT: Final = 30.0
READY_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 1.5  # a dropped packet is a timeout: keep it short
RECV_WAIT: Final = 20  # seconds a `client recv` long-polls for a message

# Not reached: no answer at all, or an ICMP error (no forwarding, prohibit rule).
UNREACHED: Final = frozenset({"unreachable", "timeout"})
# Reached the host, nothing listening on that address: the listener is bound elsewhere.
REFUSED: Final = "refused"

# Run inside a namespace: connect to each target at once, optionally TLS and an
# HTTP request on top, and print one JSON object {"host:port": result}.
PROBE: Final = r"""
import concurrent.futures, errno, json, socket, ssl, sys
targets = json.loads(sys.argv[1])
timeout = float(sys.argv[2])
def probe(t):
    out = {}
    try:
        sock = socket.create_connection((t["host"], t["port"]), timeout=timeout)
    except TimeoutError:
        return {"tcp": "timeout"}
    except ConnectionRefusedError:
        return {"tcp": "refused"}
    except OSError as exc:
        unreachable = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM}
        return {"tcp": "unreachable" if exc.errno in unreachable else repr(exc)}
    out["tcp"] = "open"
    with sock:
        if t.get("tls"):
            try:
                ctx = ssl.create_default_context(cafile=t["tls"]["ca"])
                with ctx.wrap_socket(sock, server_hostname=t["tls"]["name"]) as tls:
                    out["tls"] = "ok"
                    if t.get("http"):
                        tls.sendall(b"GET " + t["http"].encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")
                        out["http"] = tls.recv(4096).split(b"\r\n")[0].decode()
            except (OSError, ssl.SSLError) as exc:
                out["tls"] = repr(exc)
    return out
with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
    results = list(pool.map(probe, targets))
print(json.dumps({f'{t["host"]}:{t["port"]}': r for t, r in zip(targets, results)}))
"""

# Run inside a gateway namespace: exit 0 if /readyz answers 200.
READY: Final = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=1.0) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError:
    sys.exit(1)
"""

# Run inside an inside namespace: accept and close connections until killed.
LISTEN: Final = r"""
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    conn.close()
"""


@dataclass(frozen=True)
class Site:
    """One org: its inside network, its gateway's two legs, its namespaces."""

    org: str
    short: str  # acme, globex
    inside_net: str  # the /24's first three octets
    exchange_ip: str
    prefix: str  # namespace name prefix of this run

    @property
    def gateway_inside_ip(self) -> str:
        return f"{self.inside_net}.1"

    @property
    def client_ip(self) -> str:
        return f"{self.inside_net}.2"

    @property
    def inside_ns(self) -> str:
        return f"{self.prefix}-{self.short}-in"

    @property
    def gateway_ns(self) -> str:
        return f"{self.prefix}-{self.short}-gw"

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of this org's inside network and of its gateway."""
        return (self.client_ip, self.gateway_inside_ip, self.exchange_ip)


def run(argv: Sequence[str], *, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, env=env
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def ip(ns: str, command: str) -> None:
    """``ip -n NS COMMAND...``; ``command`` is split on spaces."""
    run(["ip", "-n", ns, *command.split()])


@dataclass
class Segmented:
    base: Path
    acme: Site
    globex: Site
    exchange_ns: str
    orgs: dict[str, DevOrg] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    #: Probes taken before the policy-routing rules were added (the weak host model).
    before_rules: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)

    @property
    def sites(self) -> tuple[Site, Site]:
        return (self.acme, self.globex)

    # -- the network ---------------------------------------------------------------------
    def add_namespace(self, ns: str, *, forward: bool = False) -> None:
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        ip(ns, "link set lo up")
        # A new namespace may inherit the host's ip_forward; say it outright.
        run(in_ns(ns, "sysctl", "-q", "-w", f"net.ipv4.ip_forward={int(forward)}"))

    def build(self) -> None:
        ex = self.exchange_ns
        self.add_namespace(ex, forward=True)  # a router: it forwards whatever it can
        ip(ex, "link add br0 type bridge")
        ip(ex, f"addr add {EXCHANGE_HOST}/24 dev br0")
        ip(ex, "link set br0 up")
        for site in self.sites:
            gw, inside = site.gateway_ns, site.inside_ns
            self.add_namespace(gw)
            self.add_namespace(inside)
            # Made inside the namespaces: no interface ever appears on the host.
            ip(gw, f"link add in0 type veth peer name eth0 netns {inside}")
            ip(gw, f"link add ex0 type veth peer name {site.short} netns {ex}")
            ip(gw, f"addr add {site.gateway_inside_ip}/24 dev in0")
            ip(gw, f"addr add {site.exchange_ip}/24 dev ex0")
            ip(gw, "link set in0 up")
            ip(gw, "link set ex0 up")
            ip(gw, f"route add default via {EXCHANGE_HOST}")
            ip(inside, f"addr add {site.client_ip}/24 dev eth0")
            ip(inside, "link set eth0 up")
            ip(inside, f"route add default via {site.gateway_inside_ip}")
            ip(ex, f"link set {site.short} master br0 up")
            # The hostile exchange host routes this org's inside network at its gateway.
            ip(ex, f"route add {site.inside_net}.0/24 via {site.exchange_ip}")

    def add_host_rules(self) -> None:
        """The strong host model by policy routing, as docs/operations.md gives it."""
        for site in self.sites:
            gw = site.gateway_ns
            # The local table must come after our rules, so move it from 0 to 100.
            ip(gw, "rule add pref 100 lookup local")
            ip(gw, "rule del pref 0")
            ip(gw, f"rule add pref 10 iif in0 to {site.exchange_ip} prohibit")
            ip(gw, f"rule add pref 11 iif ex0 to {site.gateway_inside_ip} prohibit")

    # -- the gateways ---------------------------------------------------------------------
    def init_org(self, site: Site) -> DevOrg:
        directory = self.base / site.short
        federation = HostPort(site.exchange_ip, FEDERATION_PORT)
        client = HostPort(site.gateway_inside_ip, CLIENT_PORT)
        metrics = HostPort("127.0.0.1", METRICS_PORT)
        run(
            [
                *(GATEWAY, "init", "--org", site.org, "--dir", str(directory)),
                *("--federation-listen", str(federation), "--client-listen", str(client)),
                *("--metrics-listen", str(metrics)),
            ]
        )
        org = DevOrg(site.org, directory, federation, client, metrics)
        self.orgs[site.org] = org
        return org

    def spawn(self, ns: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                in_ns(ns, *argv), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.processes.append(proc)
        return proc

    def start_gateway(self, site: Site) -> subprocess.Popen[bytes]:
        config = self.orgs[site.org].config_path
        return self.spawn(site.gateway_ns, [GATEWAY, "run", "-c", str(config)], self.log(site))

    def log(self, site: Site) -> Path:
        return self.base / f"{site.short}.log"

    def wait_ready(self, site: Site, proc: subprocess.Popen[bytes]) -> None:
        url = f"http://127.0.0.1:{METRICS_PORT}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{site.org} exited early:\n{self.log_tail(site)}")
            check = subprocess.run(
                in_ns(site.gateway_ns, PYTHON, "-c", READY, url),
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
            if check.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"{site.org} not ready in {READY_TIMEOUT} s:\n{self.log_tail(site)}")

    def log_tail(self, site: Site) -> str:
        lines = self.log(site).read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-30:])

    # -- looking -----------------------------------------------------------------------------
    def probe(
        self, ns: str, targets: Sequence[tuple[str, int]], *, tls: dict[str, object] | None = None
    ) -> dict[str, dict[str, str]]:
        """What a TCP connect (and TLS, HTTP, per ``tls``) from ``ns`` sees at each target."""
        wanted = [{"host": host, "port": port, **(tls or {})} for host, port in targets]
        out = run(in_ns(ns, PYTHON, "-c", PROBE, json.dumps(wanted), str(CONNECT_TIMEOUT)))
        result: dict[str, dict[str, str]] = json.loads(out)
        return result

    def client(self, site: Site, user: str, *args: str) -> str:
        env = {
            **os.environ,
            "GATEWAY_URL": self.orgs[site.org].client_url,
            "GATEWAY_TOKEN": self.tokens[user],
            "GATEWAY_KEYS": str(self.base / "home" / f"{user}.json"),
            "GATEWAY_CA": str(self.orgs[site.org].ca_file),
        }
        return run(in_ns(site.inside_ns, GATEWAY, "client", *args), env=env)

    def receive(self, site: Site, user: str) -> list[dict[str, str]]:
        out = self.client(site, user, "recv", "--wait", str(RECV_WAIT))
        return [json.loads(line) for line in out.splitlines()]

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "tests/e2e/test_segmented_networks.py builds network namespaces with `ip netns` "
            "and must run as root on Linux; run it as root or deselect it "
            "(-k 'not segmented')",
            pytrace=False,
        )
    if shutil.which("ip") is None:
        pytest.fail("`ip` (iproute2) is not installed; this test needs it", pytrace=False)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Segmented]:
    require_root()
    prefix = f"gwseg{os.getpid()}"
    base = tmp_path_factory.mktemp("segmented")
    seg = Segmented(
        base=base,
        acme=Site(ACME, "acme", "10.1.0", "10.9.0.11", prefix),
        globex=Site(GLOBEX, "globex", "10.2.0", "10.9.0.12", prefix),
        exchange_ns=f"{prefix}-exchange",
    )
    try:
        seg.build()
        acme, globex = seg.init_org(seg.acme), seg.init_org(seg.globex)
        acme.write_rules(
            peers=[globex],
            groups={
                "engineering": {"members": ["alice"], "send_to": [GLOBEX], "receive_from": [GLOBEX]}
            },
        )
        globex.write_rules(
            peers=[acme],
            groups={"partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]}},
        )
        seg.tokens = {"alice": acme.issue_token("alice"), "bob": globex.issue_token("bob")}
        (base / "home").mkdir(mode=0o700)
        started = [(site, seg.start_gateway(site)) for site in seg.sites]
        for site in seg.sites:
            seg.spawn(site.inside_ns, [PYTHON, "-c", LISTEN, str(SERVICE_PORT)], base / "svc.log")
        for site, proc in started:
            seg.wait_ready(site, proc)
        # Before the rules: bound to the right addresses, still reachable across legs.
        for site in seg.sites:
            seg.before_rules[site.inside_ns] = seg.probe(
                site.inside_ns, [(site.exchange_ip, FEDERATION_PORT)]
            )
        seg.before_rules[seg.exchange_ns] = seg.probe(
            seg.exchange_ns, [(s.gateway_inside_ip, CLIENT_PORT) for s in seg.sites]
        )
        seg.add_host_rules()
        yield seg
    finally:
        seg.close()


def tcp(results: dict[str, dict[str, str]], host: str, port: int) -> str:
    return results[f"{host}:{port}"]["tcp"]


# -- the tests -----------------------------------------------------------------------------
def test_binding_alone_leaves_each_listener_reachable_through_the_other_leg(
    net: Segmented,
) -> None:
    """The weak host model, seen before the rules: why docs/operations.md asks for them."""
    for site in net.sites:
        assert tcp(net.before_rules[site.inside_ns], site.exchange_ip, FEDERATION_PORT) == "open"
        before = net.before_rules[net.exchange_ns]
        assert tcp(before, site.gateway_inside_ip, CLIENT_PORT) == "open"


def test_each_orgs_clients_reach_only_their_own_gateways_client_api(net: Segmented) -> None:
    for site, other in ((net.acme, net.globex), (net.globex, net.acme)):
        ca = str(net.orgs[site.org].ca_file)
        own = net.probe(
            site.inside_ns,
            [(site.gateway_inside_ip, CLIENT_PORT)],
            tls={"tls": {"ca": ca, "name": site.gateway_inside_ip}, "http": "/v1/me"},
        )
        answer = own[f"{site.gateway_inside_ip}:{CLIENT_PORT}"]
        # A TLS handshake with the org's CA, and the API asking for a token.
        assert (answer["tcp"], answer["tls"]) == ("open", "ok")
        assert answer["http"].startswith("HTTP/1.1 401")
        # Not the other org's (on either of its legs), nor its own on the exchange leg:
        # no packet even gets there.
        elsewhere = net.probe(
            site.inside_ns,
            [(site.exchange_ip, CLIENT_PORT)]
            + [(address, CLIENT_PORT) for address in other.addresses[1:]],
        )
        reached = {k: v["tcp"] for k, v in elsewhere.items() if v["tcp"] not in UNREACHED}
        assert reached == {}, f"from {site.inside_ns}"


def test_nothing_from_one_inside_network_reaches_the_other(net: Segmented) -> None:
    ports = (SERVICE_PORT, CLIENT_PORT, FEDERATION_PORT, METRICS_PORT)
    for site, other in ((net.acme, net.globex), (net.globex, net.acme)):
        targets = [(address, port) for address in other.addresses for port in ports]
        targets += [(EXCHANGE_HOST, FEDERATION_PORT)]  # nor the exchange network
        seen = net.probe(site.inside_ns, targets)
        reached = {k: v["tcp"] for k, v in seen.items() if v["tcp"] not in UNREACHED}
        assert reached == {}, f"from {site.inside_ns}"
    # Control: the service that was not reached is there, for its own network.
    for site in net.sites:
        own = net.probe(site.inside_ns, [(site.client_ip, SERVICE_PORT)])
        assert tcp(own, site.client_ip, SERVICE_PORT) == "open"


def test_federation_does_not_answer_inside_nor_the_client_api_on_the_exchange(
    net: Segmented,
) -> None:
    for site in net.sites:
        inside = net.probe(
            site.inside_ns,
            [
                (site.gateway_inside_ip, FEDERATION_PORT),
                (site.gateway_inside_ip, METRICS_PORT),
                (site.exchange_ip, FEDERATION_PORT),
            ],
        )
        # The host answers on its inside address, but nothing listens there ...
        assert tcp(inside, site.gateway_inside_ip, FEDERATION_PORT) == REFUSED
        assert tcp(inside, site.gateway_inside_ip, METRICS_PORT) == REFUSED
        # ... and its exchange address is not to be had from the inside leg.
        assert tcp(inside, site.exchange_ip, FEDERATION_PORT) in UNREACHED

        ca = str(net.orgs[site.org].ca_file)
        federation = net.probe(
            net.exchange_ns,
            [(site.exchange_ip, FEDERATION_PORT)],
            tls={"tls": {"ca": ca, "name": site.org}},
        )
        # On the exchange network the federation listener answers, as the org.
        assert federation[f"{site.exchange_ip}:{FEDERATION_PORT}"] == {"tcp": "open", "tls": "ok"}
        exchange = net.probe(
            net.exchange_ns,
            [
                (site.exchange_ip, CLIENT_PORT),
                (site.exchange_ip, METRICS_PORT),
                (site.gateway_inside_ip, CLIENT_PORT),
                (site.client_ip, SERVICE_PORT),
            ],
        )
        assert tcp(exchange, site.exchange_ip, CLIENT_PORT) == REFUSED
        assert tcp(exchange, site.exchange_ip, METRICS_PORT) == REFUSED
        # Routing the inside network at the gateway does not get a partner in either.
        assert tcp(exchange, site.gateway_inside_ip, CLIENT_PORT) in UNREACHED
        assert tcp(exchange, site.client_ip, SERVICE_PORT) in UNREACHED


def test_messages_still_flow_both_ways_through_the_gateways(net: Segmented) -> None:
    for site, user, address in ((net.acme, "alice", ALICE), (net.globex, "bob", BOB)):
        net.client(site, user, "keygen", "--user", address)
        assert "published the keys of" in net.client(site, user, "publish")

    there = net.client(net.acme, "alice", "send", "--to", BOB, "over the exchange").strip()
    [line] = net.receive(net.globex, "bob")
    assert (line["id"], line["from"], line["text"]) == (there, ALICE, "over the exchange")

    back = net.client(net.globex, "bob", "send", "--to", ALICE, "and back").strip()
    [line] = net.receive(net.acme, "alice")
    assert (line["id"], line["from"], line["text"]) == (back, BOB, "and back")
