"""A network of orgs on loopback, for the demo, the benchmark and end-to-end tests.

Each org is set up exactly as an admin would (``gateway init``'s code, peer
cards pasted into rules) in a directory of its own, and runs as a real
``gateway run`` process. Nothing here is a shortcut the product does not
offer: it only saves typing.

Ports are picked free on 127.0.0.1 before the processes start. Every process
this module starts is stopped by :meth:`GatewayProcess.stop` or
:meth:`DevNet.close` (also on KeyboardInterrupt, through ``with DevNet(...)``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from gateway.cli.init import InitOptions, init_setup
from gateway.cli.peer import card_for
from gateway.config import GatewayConfig, HostPort, load_config

LOOPBACK = "127.0.0.1"
#: How long a gateway may take from exec to ready before we call it a failure.
READY_TIMEOUT = 30.0
#: How long a gateway may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0


#: Where :func:`free_port` looks, unless ``GATEWAY_DEVNET_PORTS=LOW-HIGH`` says
#: otherwise: below Linux's ephemeral range (32768-60999), so that no outgoing
#: connection or ``bind(0)`` takes a port between its choice and its use.
DEFAULT_PORT_RANGE = (20000, 32767)
PORT_RANGE_ENV = "GATEWAY_DEVNET_PORTS"
_handed_out: set[int] = set()


def port_range() -> tuple[int, int]:
    """The range :func:`free_port` picks from (``GATEWAY_DEVNET_PORTS``, or the default)."""
    text = os.environ.get(PORT_RANGE_ENV)
    if not text:
        return DEFAULT_PORT_RANGE
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high)
    except ValueError:
        raise ValueError(f"{PORT_RANGE_ENV} must be LOW-HIGH, got {text!r}") from None
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"{PORT_RANGE_ENV} must be within 1024-65535, got {text!r}")
    return first, last


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, never one this process
    handed out before (two orgs set up at once must not share one).

    Chosen at random in :func:`port_range`, which parallel runs (test workers)
    give each a part of, so that they do not choose the same port either.
    """
    low, high = port_range()
    for _ in range(10_000):
        port = random.randint(low, high)  # noqa: S311 -- a port, not a secret
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port on {LOOPBACK} in {low}-{high}")


@dataclass
class DevOrg:
    """One org's setup directory, made by ``gateway init``'s code."""

    org: str
    directory: Path
    federation: HostPort
    client: HostPort
    metrics: HostPort

    @property
    def config_path(self) -> Path:
        return self.directory / "gateway.yaml"

    @property
    def rules_path(self) -> Path:
        return self.directory / "rules.yaml"

    @property
    def ca_file(self) -> Path:
        return self.directory / "pki" / "ca.pem"

    @property
    def client_url(self) -> str:
        return f"https://{self.client.host}:{self.client.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics.host}:{self.metrics.port}"

    def issue_token(self, user: str) -> str:
        """``gateway token issue USER``, as an admin would; returns the token."""
        done = subprocess.run(
            gateway_command("token", "issue", user, "-c", str(self.config_path)),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.org}: token issue {user}: {done.stderr.strip()}")
        return done.stdout.strip()

    def config(self) -> GatewayConfig:
        return load_config(self.config_path)

    def card(self) -> str:
        return card_for(self.config())

    def write_rules(
        self,
        *,
        peers: Sequence[DevOrg] = (),
        groups: Mapping[str, Mapping[str, Any]],
        retention: Mapping[str, Any] | None = None,
    ) -> None:
        """Rules with each of ``peers``' cards pasted under ``peers:``, and ``groups``.

        ``retention`` is the org-level section (docs/retention.md), if any.
        """
        cards = "".join(
            "".join("  " + line + "\n" for line in peer.card().splitlines()) for peer in peers
        )
        text = (
            f"# rules of {self.org}, written by gateway.devnet\n"
            "version: 1\n"
            f"org: {self.org}\n"
            "default: deny\n"
            + (yaml.safe_dump({"retention": dict(retention)}, sort_keys=False) if retention else "")
            + (f"peers:\n{cards}" if peers else "peers: {}\n")
            + yaml.safe_dump({"groups": {k: dict(v) for k, v in groups.items()}}, sort_keys=False)
        )
        tmp = self.rules_path.with_suffix(".yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.rules_path)


def create_org(base: Path, org: str) -> DevOrg:
    """``gateway init --org ORG`` into ``base/ORG`` with free loopback ports."""
    federation = HostPort(LOOPBACK, free_port())
    options = InitOptions(
        org=org,
        directory=base / org,
        federation=federation,
        client=HostPort(LOOPBACK, free_port()),
        metrics=HostPort(LOOPBACK, free_port()),
        endpoint=f"https://{federation}",
        validity_days=90,
        force=False,
    )
    init_setup(options, now=datetime.now(UTC))
    return DevOrg(org, options.directory, options.federation, options.client, options.metrics)


def edit_config(org: DevOrg, **changes: Any) -> None:
    """Set top-level keys of the org's gateway.yaml (its comments are lost, its values kept)."""
    config = yaml.safe_load(org.config_path.read_text(encoding="utf-8"))
    config.update(changes)
    org.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def add_node(first: DevOrg, directory: Path) -> DevOrg:
    """Another host of ``first``'s org: a copy of its directory (certificates, keys,
    rules), without its data, with its own free loopback ports."""
    shutil.copytree(first.directory, directory, ignore=shutil.ignore_patterns("data"))
    node = DevOrg(
        first.org,
        directory,
        HostPort(LOOPBACK, free_port()),
        HostPort(LOOPBACK, free_port()),
        HostPort(LOOPBACK, free_port()),
    )
    edit_config(
        node,
        listen={
            "federation": str(node.federation),
            "client": str(node.client),
            "metrics": str(node.metrics),
        },
    )
    return node


def make_cluster(
    first: DevOrg,
    count: int,
    *,
    storage: str,
    limits: Mapping[str, object] | None = None,
) -> list[DevOrg]:
    """``first`` and ``count - 1`` more nodes of its org, all on ``storage`` (a
    postgresql:// URL), named ``<org's first label>-<n>``, whose ``endpoint:``
    lists every node's federation URL (so the org's peer card carries them all).

    Call it before writing rules; copy the rules file to every node after.
    """
    base = first.directory.parent
    nodes = [first] + [add_node(first, base / f"{first.org}-{n}") for n in range(2, count + 1)]
    endpoints = [f"https://{node.federation}" for node in nodes]
    for n, node in enumerate(nodes, start=1):
        extra: dict[str, Any] = {}
        if limits:
            config = yaml.safe_load(node.config_path.read_text(encoding="utf-8"))
            extra["limits"] = {**(config.get("limits") or {}), **limits}
        edit_config(
            node,
            node=f"{first.org.split('.')[0]}-{n}",
            storage=storage,
            endpoint=endpoints if count > 1 else endpoints[0],
            **extra,
        )
    return nodes


def gateway_command(*args: str) -> list[str]:
    """The argv that runs ``gateway`` with this interpreter (no PATH needed)."""
    return [sys.executable, "-m", "gateway", *args]


@dataclass
class GatewayProcess:
    """One ``gateway run`` process of a :class:`DevOrg`, its log in a file."""

    org: DevOrg
    log_path: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.org.org}: already running")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        env = {**os.environ, **self.extra_env}
        self.process = subprocess.Popen(
            gateway_command("run", "-c", str(self.org.config_path)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until ``/readyz`` answers 200; ``RuntimeError`` with the log's tail if not."""
        deadline = time.monotonic() + timeout
        url = self.org.metrics_url + "/readyz"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.org.org}: gateway exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as answer:  # noqa: S310 - http to loopback
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.org.org}: not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the crash the durability promises are about."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self._reap()

    def _reap(self) -> int | None:
        code = None
        if self.process is not None:
            code = self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def metrics(self) -> str:
        with urllib.request.urlopen(self.org.metrics_url + "/metrics", timeout=5.0) as answer:  # noqa: S310
            body: bytes = answer.read()
            return body.decode("utf-8")


class DevNet:
    """Several orgs in one base directory, their processes stopped on exit."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.orgs: dict[str, DevOrg] = {}
        self.processes: dict[str, GatewayProcess] = {}

    def add_org(self, org: str) -> DevOrg:
        dev_org = create_org(self.base, org)
        self.orgs[org] = dev_org
        return dev_org

    def process(self, org: str, **extra_env: str) -> GatewayProcess:
        if org not in self.processes:
            log_path = self.base / f"{org}.log"
            self.processes[org] = GatewayProcess(self.orgs[org], log_path, dict(extra_env))
        return self.processes[org]

    def start(self, org: str) -> GatewayProcess:
        proc = self.process(org)
        proc.start()
        proc.wait_ready()
        return proc

    def close(self) -> None:
        for proc in self.processes.values():
            with contextlib.suppress(Exception):
                proc.stop()

    def __enter__(self) -> DevNet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
