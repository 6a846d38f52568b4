"""``gateway peer card``: this org's entry for a partner's ``peers:``, ready to paste."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.cli.common import Registrar, UsageError, set_handler
from gateway.cli.pki import load_dir_config, next_key_path
from gateway.core.keytext import format_signing_key
from gateway.errors import PKIError

if TYPE_CHECKING:
    from cryptography import x509

    from gateway.config import GatewayConfig

CARD_INDENT = "  "


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "peer",
        help="this org as partners see it",
        description="What partners need to know about this gateway.",
    )
    commands = parser.add_subparsers(title="peer commands", metavar="COMMAND")
    card = commands.add_parser(
        "card",
        help="print this org's entry for a partner's peers: (endpoint, CA, pin, signing key)",
        description="Print the YAML entry a partner pastes under `peers:` in its rules: "
        "endpoint, the org CA as inline PEM, the federation certificate's SPKI pin (and the "
        "next one, after `gateway pki rotate --prepare`) and the org signing key.",
    )
    card.add_argument("--dir", default=None, metavar="DIR", help="a setup (default: .)")
    set_handler(card, run_card)
    set_handler(parser, _usage)


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError("peer: name a command: card (see `gateway peer --help`)")


def render_card(
    *,
    org: str,
    endpoints: Sequence[str],
    cas: Sequence[x509.Certificate],
    pins: list[str],
    signing_key: str,
) -> str:
    """The card's YAML. Loads with ``yaml.safe_load`` into ``{org: {endpoint, ca_pem, ...}}``.

    ``ca_pem`` holds every CA of ``cas``: two during our CA rollover.
    """
    from cryptography.hazmat.primitives import serialization

    pem = "".join(ca.public_bytes(serialization.Encoding.PEM).decode("ascii") for ca in cas)
    inner = CARD_INDENT * 2
    lines = [
        f"# {org}: paste under `peers:` in your federation rules",
        f"{org}:",
        # One URL as a string, several (nodes of one gateway) as a list.
        f"{CARD_INDENT}endpoint: "
        + (json.dumps(endpoints[0]) if len(endpoints) == 1 else json.dumps(list(endpoints))),
        f"{CARD_INDENT}ca_pem: |",
        *(f"{inner}{line}" for line in pem.splitlines()),
        f"{CARD_INDENT}pins:",
        *(f"{inner}- {pin}" for pin in pins),
        f"{CARD_INDENT}signing_key: {signing_key}",
    ]
    return "\n".join(lines) + "\n"


def card_for(config: GatewayConfig) -> str:
    from gateway.pki import dev
    from gateway.pki.certs import spki_pin

    cas = dev.load_ca_bundle(config.tls.ca)
    cert = dev.load_certificate(config.tls.cert)
    if not any(issued_by(cert, ca) for ca in cas):
        # A partner would refuse every connection: better to say so here.
        raise PKIError(f"{config.tls.cert}: is not issued by the org CA {config.tls.ca}")
    signing_key = dev.load_signing_key(config.signing_key)
    pins = [spki_pin(cert)]
    staged = next_key_path(config)
    if os.path.lexists(staged):
        # `pki rotate --prepare` ran: partners learn the next pin before it is used.
        pins.append(dev.key_pin(dev.load_ec_key(staged)))
    return render_card(
        org=config.org,
        endpoints=config.endpoints,
        cas=cas,
        pins=pins,
        signing_key=format_signing_key(dev.signing_public_key_raw(signing_key)),
    )


def run_card(args: argparse.Namespace) -> int:
    print(card_for(load_dir_config(args.dir)), end="")
    return 0


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
