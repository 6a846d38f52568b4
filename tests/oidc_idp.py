"""The real test IdP (tests/idp/server.mjs, npm ``oidc-provider``) for integration and e2e tests.

:func:`ensure_installed` runs ``npm ci`` in tests/idp once (``make test`` does it
first; this covers a bare ``pytest``), under a file lock so parallel runs do not
race. :class:`IdPServer` writes the server's JSON config (users with a ``groups``
claim, an MFA ``acr``, the device flow, clients, signing keys the test made),
serves TLS with a leaf from a CA the test made, and is stopped by ``stop``.
:meth:`IdPServer.approve_device` is the person at the browser: it enters a user
code, signs in through the IdP's own forms and confirms, over real HTTPS.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, RSAKey

from tests.certs_for_tests import CertAuthority

IDP_DIR = Path(__file__).parent / "idp"
MFA_ACR = "urn:gateway:test:mfa"
PWD_ACR = "urn:gateway:test:pwd"
START_TIMEOUT = 30.0
_XSRF_RE = re.compile(r'name="xsrf" value="([^"]+)"')
_FORM_ACTION_RE = re.compile(r'<form[^>]*action="([^"]+)"')


def node_available() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def ensure_installed() -> None:
    """``npm ci`` in tests/idp unless node_modules matches package-lock.json already."""
    if not node_available():
        if os.environ.get("CI") == "true":  # in CI a missing Node.js is a failure, not a skip
            pytest.fail("the test IdP needs Node.js and npm (tests/idp)")
        pytest.skip("the test IdP needs Node.js and npm")
    lock = IDP_DIR / "package-lock.json"
    stamp = IDP_DIR / "node_modules" / ".gateway-installed"
    with open(IDP_DIR / ".install.lock", "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == lock.read_text():
            return
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=IDP_DIR,
            check=True,
            timeout=300,
        )
        stamp.write_text(lock.read_text())


def signing_jwks(*kids: str) -> dict[str, Any]:
    """Private signing keys for the IdP: an RSA key (RS256) per kid, and one EC key."""
    keys = [
        RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"}).as_dict(
            private=True
        )
        for kid in kids or ("rsa-1",)
    ]
    keys.append(
        ECKey.generate_key(
            "P-256", parameters={"kid": "ec-1", "alg": "ES256", "use": "sig"}
        ).as_dict(private=True)
    )
    return {"keys": keys}


@dataclass
class IdPUser:
    sub: str
    password: str
    groups: list[str] = field(default_factory=list)
    otp: str | None = None
    disabled: bool = False

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sub": self.sub,
            "password": self.password,
            "groups": self.groups,
            "disabled": self.disabled,
        }
        if self.otp is not None:
            out["otp"] = self.otp
        return out


def device_client(client_id: str = "gateway") -> dict[str, Any]:
    """A public client that may use the device flow, the code flow with PKCE and refresh."""
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": "none",
        "application_type": "native",  # loopback redirects on any port (RFC 8252 7.3)
        "grant_types": [
            "urn:ietf:params:oauth:grant-type:device_code",
            "authorization_code",
            "refresh_token",
        ],
        "response_types": ["code"],
        "redirect_uris": ["http://127.0.0.1/callback"],
    }


class IdPServer:
    def __init__(
        self,
        directory: Path,
        ca: CertAuthority,
        users: dict[str, IdPUser],
        *,
        clients: list[dict[str, Any]] | None = None,
        jwks: dict[str, Any] | None = None,
        ttl: dict[str, int] | None = None,
        port: int = 0,
    ) -> None:
        self.directory = directory
        self.ca = ca
        self.users = dict(users)
        self.clients = clients if clients is not None else [device_client()]
        self.jwks = jwks if jwks is not None else signing_jwks()
        self.ttl = ttl or {}
        self.port = port
        self.issuer = ""
        self._process: subprocess.Popen[str] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_path = ca.write(directory, "idp-ca")

    # -- the users file, re-read by the IdP on every account lookup -----------------
    def write_users(self) -> None:
        path = self.directory / "users.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: u.as_json() for name, u in self.users.items()}))
        tmp.replace(path)

    def disable(self, name: str) -> None:
        self.users[name].disabled = True
        self.write_users()

    # -- process ---------------------------------------------------------------------
    def start(self) -> str:
        ensure_installed()
        leaf = self.ca.issue("localhost")
        cert, key = leaf.write(self.directory, "idp")
        self.write_users()
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "cert": str(cert),
            "key": str(key),
            "users": str(self.directory / "users.json"),
            "jwks": self.jwks,
            "clients": self.clients,
            "acr_values": [PWD_ACR, MFA_ACR],
            "ttl": self.ttl,
        }
        config_path = self.directory / "idp.json"
        config_path.write_text(json.dumps(config))
        config_path.chmod(0o600)
        with open(self.directory / "idp.log", "w") as log:  # the child keeps its own copy
            self._process = subprocess.Popen(
                ["node", str(IDP_DIR / "server.mjs"), str(config_path)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(timeout=START_TIMEOUT)
            self._process.stdout.close()
            raise RuntimeError(
                f"test IdP did not start: {(self.directory / 'idp.log').read_text()}"
            )
        self.issuer = json.loads(line)["issuer"]
        self.port = int(self.issuer.rsplit(":", 1)[1])
        return self.issuer

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def http(self) -> httpx.Client:
        return httpx.Client(verify=self.ssl_context(), timeout=10.0, follow_redirects=True)

    # -- the person at the browser ---------------------------------------------------
    def approve_device(self, user_code: str, login: str, *, otp: str | None = None) -> None:
        """Enter ``user_code`` at the verification URL, sign in as ``login``, confirm."""
        user = self.users[login]
        with self.http() as browser:
            page = browser.get(f"{self.issuer}/device")
            page.raise_for_status()
            xsrf = _xsrf(page.text)
            page = browser.post(
                f"{self.issuer}/device", data={"xsrf": xsrf, "user_code": user_code}
            )
            page.raise_for_status()
            # the confirmation form: same xsrf, the code again, confirm=yes
            page = browser.post(
                f"{self.issuer}/device",
                data={"xsrf": _xsrf(page.text), "user_code": user_code, "confirm": "yes"},
            )
            page.raise_for_status()
            action = _FORM_ACTION_RE.search(page.text)
            if action is None:
                raise RuntimeError(f"no sign-in form after confirming the code: {page.text[:500]}")
            page = browser.post(
                f"{self.issuer}{action.group(1)}",
                data={"login": login, "password": user.password, "otp": otp or ""},
            )
            page.raise_for_status()
            if "success" not in page.text.lower():
                raise RuntimeError(f"device sign-in did not succeed: {page.text[:500]}")

    def browser_sign_in(self, url: str, login: str, *, otp: str | None = None) -> str:
        """The browser of the code flow: open ``url``, sign in, follow the redirects home.

        Returns the page the last redirect (the client's loopback listener) answered.
        """
        user = self.users[login]
        with httpx.Client(verify=self.ssl_context(), timeout=10.0) as browser:
            page = browser.get(url, follow_redirects=True)
            page.raise_for_status()
            action = _FORM_ACTION_RE.search(page.text)
            if action is None:
                raise RuntimeError(f"no sign-in form at the authorization URL: {page.text[:500]}")
            page = browser.post(
                f"{self.issuer}{action.group(1)}",
                data={"login": login, "password": user.password, "otp": otp or ""},
                follow_redirects=True,
            )
            page.raise_for_status()
            return page.text


def _xsrf(html: str) -> str:
    match = _XSRF_RE.search(html)
    if match is None:
        raise RuntimeError(f"no xsrf field in the IdP's page: {html[:500]}")
    return match.group(1)


@contextmanager
def running_idp(
    directory: Path, ca: CertAuthority, users: dict[str, IdPUser], **kwargs: Any
) -> Iterator[IdPServer]:
    idp = IdPServer(directory, ca, users, **kwargs)
    idp.start()
    try:
        yield idp
    finally:
        idp.stop()
