"""Issue 16's acceptance, end to end: real gateways, real IdPs, the console script.

acme.example and globex.example run as real `gateway run` processes, each
with its own IdP (the npm oidc-provider over TLS, tests/oidc_idp.py). alice
signs in with `gateway client login` (device flow: the test plays the person
at the browser), sends to bob at globex (who signed in at globex's IdP) and
reads the answer; her session token (a few seconds here) expires and is
refreshed by the client; carol, whose `legal` membership comes from the IdP's
groups claim, is segmented as a named member would be; dana's group requires
the MFA acr, so her password-only sign-in is refused with the reason; alice,
disabled at the IdP, loses access at her next refresh. acme turned
admin-issued tokens off, so one is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.devnet import DevNet, DevOrg
from tests.certs_for_tests import CertAuthority
from tests.e2e.traffic import metric_value
from tests.oidc_idp import MFA_ACR, IdPServer, IdPUser

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(sys.executable).parent / "gateway")
ACME, GLOBEX = "acme.example", "globex.example"
SESSION_TTL = 4  # seconds: short, so that expiry and refresh happen within the test
COMMAND_TIMEOUT = 60
_CODE_RE = re.compile(r"enter the code (\S+)")


def oidc_section(idp: IdPServer, *, admin_tokens: bool) -> str:
    return (
        "oidc:\n"
        "  providers:\n"
        "    corp:\n"
        f"      issuer: {idp.issuer}\n"
        "      client_id: gateway\n"
        f"      ca: {idp.ca_path}\n"
        f"  session_ttl: {SESSION_TTL}s\n"
        "  refresh_ttl: 1h\n"
        f"  admin_tokens: {'true' if admin_tokens else 'false'}\n"
    )


@dataclass
class Net:
    acme: DevOrg
    globex: DevOrg
    idps: dict[str, IdPServer]
    home: Path
    dev: DevNet

    def org_of(self, user: str) -> DevOrg:
        return self.globex if user == "bob" else self.acme

    def env(self, user: str) -> dict[str, str]:
        org = self.org_of(user)
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TOKEN"}
        env.update(
            {
                "GATEWAY_URL": org.client_url,
                "GATEWAY_KEYS": str(self.home / f"{user}.json"),
                "GATEWAY_CA": str(org.ca_file),
            }
        )
        return env

    def client(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GATEWAY, "client", *args],
            env=self.env(user),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def ok(self, user: str, *args: str) -> str:
        done = self.client(user, *args)
        assert done.returncode == 0, f"{user} {args}: {done.stderr}"
        return done.stdout

    def login(self, user: str, *, otp: str | None = None) -> subprocess.CompletedProcess[str]:
        """`gateway client login`, with the test as the person who enters the code."""
        idp = self.idps[self.org_of(user).org]
        with subprocess.Popen(
            [GATEWAY, "client", "login"],
            env=self.env(user),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            assert process.stderr is not None
            first = process.stderr.readline()
            match = _CODE_RE.search(first)
            assert match, first
            assert idp.issuer in first  # the URL where to enter it: the org's IdP
            idp.approve_device(match.group(1), user, otp=otp)
            out, rest = process.communicate(timeout=COMMAND_TIMEOUT)
            return subprocess.CompletedProcess(process.args, process.returncode, out, first + rest)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    base = tmp_path_factory.mktemp("sign-in")
    idps = {
        ACME: IdPServer(
            base / "idp-acme",
            CertAuthority.create("acme IdP CA"),
            {
                "alice": IdPUser("a-1", "alice-pw", ["engineering"], otp="111111"),
                "carol": IdPUser("c-3", "carol-pw", ["legal"]),
                "dana": IdPUser("d-4", "dana-pw", ["secure"], otp="444444"),
            },
        ),
        GLOBEX: IdPServer(
            base / "idp-globex",
            CertAuthority.create("globex IdP CA"),
            {"bob": IdPUser("b-2", "bob-pw", ["partners"])},
        ),
    }
    for idp in idps.values():
        idp.start()
    try:
        with DevNet(base) as dev:
            acme, globex = dev.add_org(ACME), dev.add_org(GLOBEX)
            acme.write_rules(
                peers=[globex],
                groups={
                    "engineering": {
                        "members_from": {"claim": "groups", "value": "engineering"},
                        "send_to": [GLOBEX],
                        "receive_from": [GLOBEX],
                    },
                    "legal": {"members_from": {"value": "legal"}},
                    "secure": {
                        "members_from": {"value": "secure"},
                        "send_to": [GLOBEX],
                        "requires": {"acr": MFA_ACR},
                    },
                    "service": {"members": ["robot"]},
                },
            )
            globex.write_rules(
                peers=[acme],
                groups={
                    "partners": {
                        "members_from": {"value": "partners"},
                        "send_to": [ACME],
                        "receive_from": [ACME],
                    }
                },
            )
            for org, admin_tokens in ((acme, False), (globex, True)):
                with org.config_path.open("a", encoding="utf-8") as config:
                    config.write(oidc_section(idps[org.org], admin_tokens=admin_tokens))
            dev.start(ACME)
            dev.start(GLOBEX)
            home = base / "home"
            home.mkdir(mode=0o700)
            yield Net(acme, globex, idps, home, dev)
    finally:
        for idp in idps.values():
            idp.stop()


def test_sign_in_send_refresh_segmentation_mfa_and_disabling(net: Net) -> None:
    started = time.monotonic()
    # alice and bob sign in at their own orgs' IdPs
    for user in ("alice", "bob"):
        done = net.login(user, otp="111111" if user == "alice" else None)
        assert done.returncode == 0, done.stderr
        assert "signed in as" in done.stderr
        session_file = net.home / f"{user}.session.json"
        assert session_file.stat().st_mode & 0o777 == 0o600
    alice_address, bob_address = f"alice@{ACME}", f"bob@{GLOBEX}"
    for user, address in (("alice", alice_address), ("bob", bob_address)):
        net.ok(user, "keygen", "--user", address)
        net.ok(user, "publish")

    # a message each way through both gateways, with sessions as the only credentials
    sent = net.ok("alice", "send", "--to", bob_address, "hello bob, signed in through SSO")
    assert sent.strip()
    lines = [json.loads(line) for line in net.ok("bob", "recv", "--wait", "20").splitlines()]
    assert [line["text"] for line in lines] == ["hello bob, signed in through SSO"]
    net.ok("bob", "send", "--to", alice_address, "hello alice")
    lines = [json.loads(line) for line in net.ok("alice", "recv", "--wait", "20").splitlines()]
    assert [line["text"] for line in lines] == ["hello alice"]

    # alice's session token expires; the client refreshes it (the gateway asks her IdP)
    before = json.loads((net.home / "alice.session.json").read_text())
    time.sleep(SESSION_TTL + 1)
    net.ok("alice", "send", "--to", bob_address, "still here after a refresh")
    after = json.loads((net.home / "alice.session.json").read_text())
    assert after["session_token"] != before["session_token"]
    assert after["refresh_token"] != before["refresh_token"]

    # carol's legal membership comes from the IdP's groups claim: segmented as before
    carol = net.login("carol")
    assert carol.returncode == 0, carol.stderr
    assert "(group legal)" in carol.stderr
    net.ok("carol", "keygen", "--user", f"carol@{ACME}")
    net.ok("carol", "publish")
    refused = net.client("carol", "send", "--to", bob_address, "may legal talk to globex?")
    assert refused.returncode != 0
    assert "peer_not_allowed" in refused.stderr

    # dana's group requires the MFA acr: a password-only sign-in is refused, saying why
    dana = net.login("dana")
    assert dana.returncode != 0
    assert "mfa_required" in dana.stderr
    assert "requires a stronger sign-in" in dana.stderr
    assert not (net.home / "dana.session.json").exists()

    # an admin-issued token is refused where acme turned them off
    robot = net.acme.issue_token("robot")
    env = {**net.env("alice"), "GATEWAY_TOKEN": robot}
    with_token = subprocess.run(
        [GATEWAY, "client", "status", "AAAAAAAAAAAAAAAAAAAAAA"],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert with_token.returncode != 0
    assert "admin_tokens_disabled" in with_token.stderr

    # disabled at the IdP: alice loses access within one session lifetime
    net.idps[ACME].disable("alice")
    time.sleep(SESSION_TTL + 1)
    cut_off = net.client("alice", "send", "--to", bob_address, "am I still in?")
    assert cut_off.returncode != 0
    assert "refresh_refused" in cut_off.stderr
    metrics = net.dev.processes[ACME].metrics()
    refused_refreshes = metric_value(
        metrics, "gateway_oidc_session_refreshes_total", provider="corp", result="refresh_refused"
    )
    assert refused_refreshes == 1
    assert (
        metric_value(metrics, "gateway_oidc_signins_total", provider="corp", result="mfa_required")
        == 1
    )
    assert metric_value(metrics, "gateway_oidc_signins_total", provider="corp", result="ok") == 2
    # the whole story, including four device-flow polls of 5 s, in well under a minute
    assert time.monotonic() - started < 120
