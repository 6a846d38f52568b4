"""``gateway init``: a working setup for one org in one directory.

Everything is checked, and every key and certificate made in memory, before
the first byte is written; a directory that already holds a setup is refused
unless ``--force``. See docs/pki.md for what each file is.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.common import Registrar, UsageError, set_handler
from gateway.core.address import normalize_domain
from gateway.core.durations import format_duration
from gateway.errors import AddressError, ConfigError
from gateway.pki import DEFAULT_CERT_VALIDITY_DAYS

if TYPE_CHECKING:
    from gateway.config import HostPort

# The files of a setup, relative to its directory. Any of them present means
# "this directory already holds a setup".
CA_CERT = Path("pki/ca.pem")
CA_KEY = Path("pki/ca.key")
GATEWAY_CERT = Path("pki/gateway.pem")
GATEWAY_KEY = Path("pki/gateway.key")
CLIENT_API_CERT = Path("pki/client-api.pem")
CLIENT_API_KEY = Path("pki/client-api.key")
SIGNING_KEY = Path("keys/org-signing.key")
CONFIG_FILE = Path("gateway.yaml")
RULES_FILE = Path("rules.yaml")
DATA_DIR = Path("data")
SETUP_PATHS = (
    CONFIG_FILE,
    RULES_FILE,
    CA_CERT,
    CA_KEY,
    GATEWAY_CERT,
    GATEWAY_KEY,
    CLIENT_API_CERT,
    CLIENT_API_KEY,
    SIGNING_KEY,
    DATA_DIR,
)
PUBLIC_DIR_MODE = 0o755


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "init",
        help="create a config, a dev CA, certificates, the org signing key and starter rules",
        description="Write a working setup for one org into DIR: pki/ (org CA, federation "
        "and client API certificates), keys/org-signing.key, gateway.yaml, rules.yaml and "
        "data/. Refuses a directory that already holds a setup unless --force.",
    )
    # Checked in the handler rather than by argparse, so that every mistake is one line.
    parser.add_argument("--org", metavar="DOMAIN", help="the org's domain, e.g. acme.example")
    parser.add_argument("--dir", default=".", metavar="DIR", help="where to write (default: .)")
    # Unset, the default listen address: _listen fills it in, from the config code.
    parser.add_argument("--federation-listen", metavar="HOST:PORT")
    parser.add_argument("--client-listen", metavar="HOST:PORT")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT")
    parser.add_argument(
        "--endpoint",
        metavar="URL",
        help="the URL partners dial (default: https://<federation listen address>)",
    )
    parser.add_argument(
        "--validity-days",
        default=str(DEFAULT_CERT_VALIDITY_DAYS),
        metavar="N",
        help=f"validity of the gateway and client API certificates "
        f"(default {DEFAULT_CERT_VALIDITY_DAYS})",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing setup")
    set_handler(parser, run)


@dataclass(frozen=True)
class InitOptions:
    org: str
    directory: Path
    federation: HostPort
    client: HostPort
    metrics: HostPort
    endpoint: str
    validity_days: int
    force: bool


def parse_validity_days(text: str) -> int:
    from gateway.pki import dev

    try:
        days = int(text)
    except ValueError:
        raise UsageError(f"--validity-days: {text!r} is not a whole number") from None
    if not dev.MIN_CERT_VALIDITY_DAYS <= days <= dev.MAX_CERT_VALIDITY_DAYS:
        raise UsageError(
            f"--validity-days: {days} is out of range "
            f"{dev.MIN_CERT_VALIDITY_DAYS}-{dev.MAX_CERT_VALIDITY_DAYS}"
        )
    return days


def _listen(option: str, text: str | None, default_port: int) -> HostPort:
    """``HOST:PORT`` of a ``--*-listen`` option; unset, the default listen host and
    ``default_port`` (filled in here so that registering the options needs no config code).
    """
    from gateway.config import DEFAULT_LISTEN_HOST, HostPort, parse_host_port

    if text is None:
        return HostPort(DEFAULT_LISTEN_HOST, default_port)
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def parse_options(args: argparse.Namespace) -> InitOptions:
    from gateway.config import (
        DEFAULT_CLIENT_PORT,
        DEFAULT_FEDERATION_PORT,
        DEFAULT_METRICS_PORT,
        validate_endpoint,
    )

    if not args.org:
        raise UsageError("--org DOMAIN is required (the org's domain, like acme.example)")
    try:
        org = normalize_domain(args.org)
    except AddressError as exc:
        raise UsageError(f"--org: {exc}") from None
    federation = _listen("--federation-listen", args.federation_listen, DEFAULT_FEDERATION_PORT)
    endpoint_text = args.endpoint if args.endpoint is not None else f"https://{federation}"
    try:
        endpoint = validate_endpoint(endpoint_text)
    except ValueError as exc:
        raise UsageError(f"--endpoint: {exc}") from None
    return InitOptions(
        org=org,
        directory=Path(os.path.abspath(Path(args.dir).expanduser())),
        federation=federation,
        client=_listen("--client-listen", args.client_listen, DEFAULT_CLIENT_PORT),
        metrics=_listen("--metrics-listen", args.metrics_listen, DEFAULT_METRICS_PORT),
        endpoint=endpoint,
        validity_days=parse_validity_days(args.validity_days),
        force=bool(args.force),
    )


def existing_setup(directory: Path) -> list[Path]:
    """The files of a setup already present in ``directory`` (dangling links count)."""
    return [rel for rel in SETUP_PATHS if os.path.lexists(directory / rel)]


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are exactly that)."""
    return json.dumps(text)


def render_config(options: InitOptions) -> str:
    from gateway.config import Limits

    limits = Limits()
    limit_lines = []
    for item in fields(Limits):
        value = getattr(limits, item.name)
        if isinstance(value, float):
            shown = format_duration(int(value)) if value.is_integer() else repr(value)
        else:
            shown = str(value)
        limit_lines.append(f"  {item.name}: {shown}")
    return "\n".join(
        [
            f"# gateway.yaml for {options.org}, written by `gateway init`.",
            "# Relative paths are relative to this file. See docs/pki.md.",
            f"org: {options.org}",
            "data_dir: data",
            "rules: rules.yaml",
            f"signing_key: {SIGNING_KEY}",
            "tls:                      # federation (mTLS, TLS 1.3)",
            f"  cert: {GATEWAY_CERT}",
            f"  key: {GATEWAY_KEY}",
            f"  ca: {CA_CERT}",
            "client_tls:               # or `client_tls: plain` behind a TLS-terminating proxy",
            f"  cert: {CLIENT_API_CERT}",
            f"  key: {CLIENT_API_KEY}",
            "listen:",
            f"  federation: {_q(str(options.federation))}",
            f"  client: {_q(str(options.client))}",
            f"  metrics: {_q(str(options.metrics))}",
            f"endpoint: {_q(options.endpoint)}    # the URL partners dial",
            "storage: sqlite           # data/gateway.sqlite3; or a postgresql:// URL",
            "limits:",
            *limit_lines,
            "",
        ]
    )


def render_rules(org: str) -> str:
    return f"""\
# Federation rules for {org}, written by `gateway init`.
# Default deny: a group reaches a peer only when a rule here says so.
version: 1
org: {org}
default: deny
# One entry per partner, pasted from its `gateway peer card`, for example:
#   globex.example:
#     endpoint: https://gw.globex.example:8443
#     ca_pem: |
#       -----BEGIN CERTIFICATE-----
#       ...
#       -----END CERTIFICATE-----
#     pins: [sha256/...]
#     signing_key: ed25519:...
peers: {{}}
groups:
  # Members and no send_to/receive_from: this group talks to no peer yet.
  # Add `send_to: [globex.example]` and `receive_from: [globex.example]` to federate.
  staff:
    members: [alice, bob]
"""


def _mkdir(path: Path, mode: int, *, private: bool = False) -> None:
    """Create ``path``; a private directory gets ``mode`` even when it already existed."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        if private:
            path.chmod(mode)
    except FileExistsError:
        raise ConfigError(f"{path}: exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create directory: {exc.strerror or exc}") from None


def init_setup(options: InitOptions, *, now: datetime) -> list[str]:
    """Write the setup; returns lines to show the admin. Checks everything first."""
    from gateway.pki import dev
    from gateway.pki.certs import spki_pin

    directory = options.directory
    if os.path.lexists(directory) and not directory.is_dir():
        raise UsageError(f"--dir: {directory} exists and is not a directory")
    if not options.force:
        present = existing_setup(directory)
        if present:
            shown = ", ".join(str(p) for p in present[:3]) + (", ..." if len(present) > 3 else "")
            raise ConfigError(
                f"{directory} already holds a gateway setup ({shown}); use --force to replace it"
            )
    for rel in (Path("pki"), Path("keys"), DATA_DIR):
        target = directory / rel
        if os.path.lexists(target) and not target.is_dir():
            raise ConfigError(f"{target}: exists and is not a directory")

    # Everything made in memory before anything is written.
    ca = dev.issue_ca(options.org, now=now)
    gateway = dev.issue_gateway_cert(ca, options.org, now=now, validity_days=options.validity_days)
    client_api = dev.issue_client_api_cert(
        ca, options.client.host, now=now, validity_days=options.validity_days
    )
    signing_key = dev.generate_signing_key()
    public = dev.PUBLIC_FILE_MODE
    private = dev.PRIVATE_FILE_MODE
    files: list[tuple[Path, bytes, int]] = [
        (CA_KEY, ca.key_pem(), private),
        (CA_CERT, ca.cert_pem(), public),
        (GATEWAY_KEY, gateway.key_pem(), private),
        (GATEWAY_CERT, gateway.cert_pem(), public),
        (CLIENT_API_KEY, client_api.key_pem(), private),
        (CLIENT_API_CERT, client_api.cert_pem(), public),
        (SIGNING_KEY, dev.private_key_pem(signing_key), private),
        (RULES_FILE, render_rules(options.org).encode(), public),
        (CONFIG_FILE, render_config(options).encode(), public),
    ]

    _mkdir(directory / "pki", PUBLIC_DIR_MODE)
    _mkdir(directory / "keys", dev.PRIVATE_DIR_MODE, private=True)
    _mkdir(directory / DATA_DIR, dev.PRIVATE_DIR_MODE, private=True)
    for rel, data, mode in files:
        dev.write_file(directory / rel, data, mode=mode, replace=options.force)

    return [
        f"initialized {options.org} in {directory}",
        *(f"  {rel}" for rel, _, _ in files),
        f"  {DATA_DIR}/",
        f"federation certificate pin: {spki_pin(gateway.cert)}",
        f"next: `gateway peer card --dir {directory}` prints the entry partners paste under peers:",
    ]


def run(args: argparse.Namespace) -> int:
    options = parse_options(args)
    for line in init_setup(options, now=datetime.now(UTC)):
        print(line)
    return 0
