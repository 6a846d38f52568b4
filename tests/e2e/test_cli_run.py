"""`gateway run` as an admin meets it: start-up errors, SIGTERM, SIGHUP and file reloads."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from gateway.client.api import ClientSession
from gateway.devnet import DevNet, DevOrg, GatewayProcess, gateway_command

pytestmark = pytest.mark.e2e

ACME = "acme.example"
RUN_TIMEOUT = 30


def run_once(org: DevOrg) -> subprocess.CompletedProcess[str]:
    """`gateway run` expected to fail at start-up."""
    return subprocess.run(
        gateway_command("run", "-c", str(org.config_path)),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("gateway: error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def reloads(proc: GatewayProcess, result: str) -> float:
    match = re.search(
        rf'^gateway_rules_reloads_total{{result="{result}"}} (\S+)$', proc.metrics(), re.M
    )
    return float(match.group(1)) if match else 0.0


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[DevNet]:
    with DevNet(tmp_path) as dev_net:
        dev_net.add_org(ACME).write_rules(groups={"engineering": {"members": ["alice"]}})
        yield dev_net


def test_a_port_in_use_is_one_line_and_a_failure(net: DevNet) -> None:
    org = net.orgs[ACME]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((org.federation.host, org.federation.port))
        taken.listen()
        line = one_error_line(run_once(org))
    assert "federation listener: cannot listen on" in line
    assert str(org.federation.port) in line


def test_an_unreadable_certificate_is_one_line_and_a_failure(net: DevNet) -> None:
    org = net.orgs[ACME]
    (org.directory / "pki" / "gateway.pem").write_text("not a certificate\n")
    line = one_error_line(run_once(org))
    assert "gateway.pem" in line


@pytest.mark.parametrize("key", ["pki/gateway.key", "pki/client-api.key", "keys/org-signing.key"])
def test_a_key_file_open_to_the_group_is_one_line_and_a_failure(net: DevNet, key: str) -> None:
    org = net.orgs[ACME]
    path = org.directory / key
    path.chmod(0o640)
    line = one_error_line(run_once(org))
    assert line == (
        f"gateway: error: {path}: the private key file is accessible by group or others "
        f"(mode 0640); run: chmod 600 {path}"
    )


def use_storage(org: DevOrg, url: str) -> None:
    """Point the org's gateway.yaml at ``url`` (``storage:``)."""
    text = org.config_path.read_text()
    assert "\nstorage: sqlite" in text
    org.config_path.write_text(text.replace("\nstorage: sqlite", f"\nstorage: {url}"))


def test_a_postgresql_server_that_is_not_there_is_one_line(net: DevNet) -> None:
    org = net.orgs[ACME]
    use_storage(org, "postgresql://gw:s3cret@127.0.0.1:1/gateway")
    line = one_error_line(run_once(org))
    assert line.startswith("gateway: error: storage postgresql://gw@127.0.0.1:1/gateway: ")
    assert "cannot connect" in line
    assert "s3cret" not in line


def test_a_wrong_postgresql_database_is_one_line(net: DevNet, postgres_url: str) -> None:
    org = net.orgs[ACME]
    use_storage(org, postgres_url.rsplit("/", 1)[0] + "/gw_no_such_database")
    line = one_error_line(run_once(org))
    assert "cannot connect" in line
    assert 'database "gw_no_such_database" does not exist' in line


def test_a_gateway_on_postgresql_is_ready(net: DevNet, postgres_url: str) -> None:
    org = net.orgs[ACME]
    use_storage(org, postgres_url)
    net.start(ACME)
    ready = health(org)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    # No disk reserve: the database server's disk is not the gateway's to watch.
    assert ready.stdout == f'gateway: healthy: {org.metrics_url}/readyz: {{"ready":true}}\n'


def health(org: DevOrg, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command("health", "-c", str(org.config_path), *args),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def test_health_asks_the_metrics_listener_of_the_config(net: DevNet) -> None:
    org = net.orgs[ACME]
    down = health(org, "--timeout", "1")
    assert down.returncode == 1
    assert down.stdout.startswith(f"gateway: unhealthy: {org.metrics_url}/readyz: ")
    net.start(ACME)
    ready = health(org)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert ready.stdout == f'gateway: healthy: {org.metrics_url}/readyz: {{"ready":true}}\n'
    live = health(org, "--live")
    assert live.returncode == 0
    assert live.stdout == f"gateway: healthy: {org.metrics_url}/healthz: ok\n"


def test_invalid_rules_are_one_line_naming_the_place(net: DevNet) -> None:
    org = net.orgs[ACME]
    org.rules_path.write_text(org.rules_path.read_text() + "surprise: 1\n")
    line = one_error_line(run_once(org))
    assert re.search(r"rules\.yaml:\d+:\d+: surprise: unknown key", line), line


def test_a_missing_config_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        gateway_command("run", "-c", str(tmp_path / "nowhere.yaml")),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert "no such file" in one_error_line(done)


def test_sigterm_stops_cleanly_with_exit_zero(net: DevNet) -> None:
    proc = net.start(ACME)
    assert proc.process is not None
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(timeout=RUN_TIMEOUT) == 0
    assert "gateway acme.example stopped" in proc.log_tail()


def test_sighup_and_file_changes_reload_and_bad_rules_keep_the_old(net: DevNet) -> None:
    org = net.orgs[ACME]
    proc = net.start(ACME)
    assert proc.process is not None
    good = reloads(proc, "success")

    # SIGHUP: reloaded even though nothing changed.
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(proc, "success") == good + 1)

    # A broken file: refused, counted, the old rules stay in force.
    org.rules_path.write_text("version: 1\norg: acme.example\ndefault: allow\ngroups: {}\n")
    wait_until(lambda: reloads(proc, "failure") >= 1)
    assert "default" in proc.log_tail(60)
    with urllib.request.urlopen(org.metrics_url + "/readyz", timeout=5) as answer:
        assert answer.status == 200

    # A good file again: picked up by the watcher, no signal needed.
    org.write_rules(groups={"engineering": {"members": ["alice", "bob"]}})
    wait_until(lambda: reloads(proc, "success") == good + 2)
    assert proc.stop() == 0


async def test_sigterm_answers_waiting_long_polls_at_once(net: DevNet) -> None:
    org = net.orgs[ACME]
    proc = net.process(ACME)
    proc.start()
    await trio.to_thread.run_sync(proc.wait_ready)
    token = org.issue_token("alice")
    assert proc.process is not None
    async with ClientSession(org.client_url, token, ca_file=org.ca_file) as alice:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                answered: list[float] = []

                async def long_poll() -> None:
                    assert await alice.fetch(wait=60) == []
                    answered.append(trio.current_time())

                nursery.start_soon(long_poll)
                await trio.sleep(0.5)  # the poll is waiting in the gateway
                stopped_at = trio.current_time()
                proc.process.send_signal(signal.SIGTERM)
    # Answered at once, not after the poll's 60 s nor the listener's drain bound.
    assert answered[0] - stopped_at < 5
    assert await trio.to_thread.run_sync(proc.process.wait) == 0
