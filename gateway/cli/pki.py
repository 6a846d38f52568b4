"""``gateway pki show``, ``rotate`` and ``ca-rollover``: the org's certificates, read and renewed.

A CA rollover replaces the org CA without an outage, in three steps that the
admin runs days apart, each leaving a state the running gateway serves from:

=========  ===========================  ===================  ===========================
step       ``tls.ca`` (``pki/ca.pem``)  CA keys              federation certificate
=========  ===========================  ===================  ===========================
before     old CA                       ca.key (old)         issued by the old CA
start      old CA + new CA              + ca.next.key (new)  unchanged
switch     old CA + new CA              ca.key (new),        re-issued by the new CA
                                        ca.previous.key      (same key: pins stay)
finish     new CA                       ca.key (new)         unchanged
=========  ===========================  ===================  ===========================

Partners trust whatever ``tls.ca`` holds (``gateway peer card`` prints all of
it): after ``start`` they install the card with both CAs, and only when all
have does ``switch`` make the gateway present a certificate from the new CA.
The gateway reloads ``tls.ca`` and ``tls.cert`` by itself (no restart).
"""

from __future__ import annotations

import argparse
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.common import Registrar, UsageError, set_handler
from gateway.cli.init import CONFIG_FILE, parse_validity_days
from gateway.errors import PKIError
from gateway.pki import DEFAULT_CERT_VALIDITY_DAYS

if TYPE_CHECKING:
    from cryptography import x509

    from gateway.config import GatewayConfig
    from gateway.pki import dev

SECONDS_PER_DAY = 86400


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "pki",
        help="show and rotate the org's certificates",
        description="The org CA and the certificates it issues (see docs/pki.md).",
    )
    commands = parser.add_subparsers(title="pki commands", metavar="COMMAND")

    show = commands.add_parser(
        "show",
        help="subject, SAN, SPKI pin and validity of the org's certificates",
        description="Show the CA, the federation certificate and the client API certificate "
        "of the setup in DIR (from its gateway.yaml), or every certificate in FILE.",
    )
    where = show.add_mutually_exclusive_group()
    where.add_argument("--dir", default=None, metavar="DIR", help="a setup (default: .)")
    where.add_argument("--cert", default=None, metavar="FILE", help="a PEM file")
    set_handler(show, run_show)

    rotate = commands.add_parser(
        "rotate",
        help="re-issue the federation certificate from the org CA, with a new key",
        description="Re-issue the federation certificate (tls.cert, tls.key of gateway.yaml) "
        "from the org CA. A new key changes the SPKI pin: partners who pin must add the new "
        "pin before the gateway uses it. --prepare makes the next key (beside tls.key, as "
        "<name>.next.key) and prints its pin without touching the certificate; the next "
        "rotate uses that key. --keep-key renews without changing the pin.",
    )
    rotate.add_argument("--dir", default=".", metavar="DIR", help="a setup (default: .)")
    rotate.add_argument(
        "--ca-key",
        default=None,
        metavar="FILE",
        help="the org CA's private key (default: beside tls.ca, with .key for .pem)",
    )
    rotate.add_argument(
        "--validity-days",
        default=str(DEFAULT_CERT_VALIDITY_DAYS),
        metavar="N",
        help=f"validity of the new certificate (default {DEFAULT_CERT_VALIDITY_DAYS})",
    )
    key_choice = rotate.add_mutually_exclusive_group()
    key_choice.add_argument(
        "--prepare",
        action="store_true",
        help="only make the next key and print its pin, for partners to add first",
    )
    key_choice.add_argument(
        "--keep-key", action="store_true", help="keep the current key (and so the pin)"
    )
    set_handler(rotate, run_rotate)

    rollover = commands.add_parser(
        "ca-rollover",
        help="replace the org CA without an outage: start, switch, finish",
        description="Replace the org CA in three steps, days apart (docs/operations.md, "
        "'CA rollover'). start: make the new CA; tls.ca then holds old and new, and "
        "`gateway peer card` gives partners both. switch (once every partner trusts both): "
        "re-issue the federation (and client API) certificate from the new CA, same keys. "
        "finish (once every partner has been told): tls.ca holds only the new CA, the old "
        "CA key is deleted.",
    )
    rollover.add_argument("step", choices=["start", "switch", "finish"], help="the step to run")
    rollover.add_argument("--dir", default=".", metavar="DIR", help="a setup (default: .)")
    rollover.add_argument(
        "--validity-days",
        default=str(DEFAULT_CERT_VALIDITY_DAYS),
        metavar="N",
        help="switch: validity of the re-issued certificates "
        f"(default {DEFAULT_CERT_VALIDITY_DAYS})",
    )
    set_handler(rollover, run_ca_rollover)

    set_handler(parser, lambda _args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    raise UsageError("pki: name a command: show, rotate or ca-rollover (see `gateway pki --help`)")


def load_dir_config(directory: str | None) -> GatewayConfig:
    """The ``gateway.yaml`` of a setup directory, with a clear error when there is none."""
    from gateway.config import load_config

    path = Path(directory if directory is not None else ".").expanduser()
    if not path.is_dir():
        raise UsageError(f"--dir: {path}: no such directory")
    return load_config(path / CONFIG_FILE)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def days_left(cert: x509.Certificate, *, now: datetime) -> int:
    """Whole days until ``cert`` expires (negative once it has)."""
    return math.floor((cert.not_valid_after_utc - now).total_seconds() / SECONDS_PER_DAY)


def format_san(cert: x509.Certificate) -> str:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "(none)"
    parts = [f"DNS:{name}" for name in san.get_values_for_type(x509.DNSName)]
    parts += [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(parts) if parts else "(none)"


def describe(title: str, source: Path, cert: x509.Certificate, *, now: datetime) -> list[str]:
    from gateway.pki.certs import is_ca, spki_pin

    left = days_left(cert, now=now)
    status = " (EXPIRED)" if left < 0 else ""
    if cert.not_valid_before_utc > now:
        status = " (NOT YET VALID)"
    return [
        f"{title}: {source}",
        f"  subject:     {cert.subject.rfc4514_string()}",
        f"  issuer:      {cert.issuer.rfc4514_string()}",
        f"  SAN:         {format_san(cert)}",
        f"  CA:          {'yes' if is_ca(cert) else 'no'}",
        f"  SPKI pin:    {spki_pin(cert)}",
        f"  not before:  {iso_utc(cert.not_valid_before_utc)}",
        f"  not after:   {iso_utc(cert.not_valid_after_utc)}",
        f"  days left:   {left}{status}",
    ]


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def show_lines(config: GatewayConfig, *, now: datetime) -> list[str]:
    from gateway.pki import dev

    cas = dev.load_ca_bundle(config.tls.ca)
    lines: list[str] = []
    for index, ca in enumerate(cas):
        title = "org CA" if len(cas) == 1 else f"org CA {index + 1} of {len(cas)} (CA rollover)"
        lines += describe(title, config.tls.ca, ca, now=now)
    shown = [("federation certificate", config.tls.cert)]
    if config.client_tls is not None:
        shown.append(("client API certificate", config.client_tls.cert))
    for title, path in shown:
        cert = dev.load_certificate(path)
        lines += describe(title, path, cert, now=now)
        if not any(_issued_by(cert, ca) for ca in cas):
            lines.append(f"  WARNING:     not issued by the org CA {config.tls.ca}")
    return lines


def run_show(args: argparse.Namespace) -> int:
    from gateway.pki import dev
    from gateway.pki.certs import load_certificates_pem

    now = datetime.now(UTC)
    if args.cert is not None:
        path = Path(args.cert)
        certs = load_certificates_pem(dev.read_certificate_file(path), source=str(path))
        for index, cert in enumerate(certs):
            title = "certificate" if len(certs) == 1 else f"certificate {index + 1}"
            for line in describe(title, path, cert, now=now):
                print(line)
        return 0
    for line in show_lines(load_dir_config(args.dir), now=now):
        print(line)
    return 0


def ca_key_path(config: GatewayConfig, override: str | None) -> Path:
    if override is not None:
        return Path(os.path.abspath(Path(override).expanduser()))
    return config.tls.ca.with_suffix(".key")


def next_key_path(config: GatewayConfig) -> Path:
    """Where ``rotate --prepare`` keeps the next key: ``pki/gateway.next.key``."""
    key = config.tls.key
    return key.with_name(f"{key.stem}.next{key.suffix}")


def prepare_next_key(config: GatewayConfig) -> str:
    """Make the next federation key (once) and return its pin; the certificate is untouched."""
    from gateway.pki import dev

    path = next_key_path(config)
    if not os.path.lexists(path):
        dev.write_private_key(path, dev.generate_key(), replace=False)
    return dev.key_pin(dev.load_ec_key(path))


def rotate(
    config: GatewayConfig,
    *,
    ca_key: Path,
    validity_days: int,
    keep_key: bool,
    now: datetime,
) -> tuple[str | None, str]:
    """Re-issue the federation certificate; returns (old pin or None, new pin).

    The new key is the one ``prepare_next_key`` made, if any (its pin may already
    be in partners' rules), else a fresh one; ``keep_key`` keeps the current key.
    """
    from gateway.pki import dev
    from gateway.pki.certs import spki_pin

    ca = dev.load_issuing_ca(config.tls.ca, ca_key)
    try:
        old_pin: str | None = spki_pin(dev.load_certificate(config.tls.cert))
    except PKIError:
        old_pin = None  # rotating is also how a lost or broken certificate is replaced
    staged = next_key_path(config)
    if keep_key:
        key = dev.load_ec_key(config.tls.key)
    elif os.path.lexists(staged):
        key = dev.load_ec_key(staged)
    else:
        key = dev.generate_key()
    issued = dev.issue_gateway_cert(ca, config.org, now=now, validity_days=validity_days, key=key)
    # Key first: until the certificate follows, a loader sees a mismatched pair and
    # refuses it, rather than a certificate whose key is gone.
    if not keep_key:
        dev.write_private_key(config.tls.key, key, replace=True)
    dev.write_file(config.tls.cert, issued.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=True)
    if not keep_key and os.path.lexists(staged):
        try:
            staged.unlink()
        except OSError as exc:
            raise PKIError(f"{staged}: rotated, but cannot remove: {exc.strerror}") from exc
    return old_pin, spki_pin(issued.cert)


def run_rotate(args: argparse.Namespace) -> int:
    validity_days = parse_validity_days(args.validity_days)
    config = load_dir_config(args.dir)
    if args.prepare:
        pin = prepare_next_key(config)
        print(f"next key: {next_key_path(config)}")
        print(f"next pin: {pin}")
        print(
            "give partners who pin this gateway the next pin to add beside the current one; "
            "then run `gateway pki rotate` (without --prepare) to start using it"
        )
        return 0
    old_pin, new_pin = rotate(
        config,
        ca_key=ca_key_path(config, args.ca_key),
        validity_days=validity_days,
        keep_key=bool(args.keep_key),
        now=datetime.now(UTC),
    )
    print(f"re-issued {config.tls.cert} for {config.org}, valid {validity_days} days")
    print(f"old pin: {old_pin or '(no readable certificate)'}")
    print(f"new pin: {new_pin}")
    if old_pin != new_pin:
        print(
            "partners who pin this gateway must add the new pin to their rules before they "
            "next connect; the running gateway uses the new certificate within seconds"
        )
    return 0


# -- CA rollover ----------------------------------------------------------------------


def next_ca_key_path(config: GatewayConfig) -> Path:
    """``pki/ca.next.key``: the new CA's key, from ``start`` until ``switch``."""
    key = ca_key_path(config, None)
    return key.with_name(f"{key.stem}.next{key.suffix}")


def previous_ca_key_path(config: GatewayConfig) -> Path:
    """``pki/ca.previous.key``: the old CA's key, from ``switch`` until ``finish``."""
    key = ca_key_path(config, None)
    return key.with_name(f"{key.stem}.previous{key.suffix}")


def _ca_pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def _write_ca_file(config: GatewayConfig, certs: list[x509.Certificate]) -> None:
    from gateway.pki import dev

    dev.write_file(config.tls.ca, _ca_pem(certs), mode=dev.PUBLIC_FILE_MODE, replace=True)


def ca_rollover_start(config: GatewayConfig, *, now: datetime) -> x509.Certificate:
    """Make the new CA (key in ``ca.next.key``) and add it to ``tls.ca``; returns it.

    Nothing the gateway presents changes: partners first learn to trust the new CA.
    """
    from gateway.pki import dev

    cas = dev.load_ca_bundle(config.tls.ca)
    next_key = next_ca_key_path(config)
    if len(cas) != 1 or os.path.lexists(next_key) or os.path.lexists(previous_ca_key_path(config)):
        raise PKIError(
            f"{config.tls.ca}: a CA rollover is already under way ({len(cas)} CAs); "
            "run `gateway pki ca-rollover switch` or `finish`"
        )
    dev.load_issuing_ca(config.tls.ca, ca_key_path(config, None))  # the current key is at hand
    stamp = now.astimezone(UTC).strftime("%Y-%m-%d")
    new = dev.issue_ca(config.org, now=now, common_name=f"{config.org} gateway CA {stamp}")
    # The key first: a CA file naming a CA whose key is lost would be a dead end.
    dev.write_private_key(next_key, new.key, replace=False)
    _write_ca_file(config, [cas[0], new.cert])
    return new.cert


def _reissue(config: GatewayConfig, ca: dev.Issued, *, now: datetime, validity_days: int) -> None:
    """Re-issue the federation (and client API) certificate from ``ca``, keeping the keys."""
    from gateway.pki import dev

    key = dev.load_ec_key(config.tls.key)
    issued = dev.issue_gateway_cert(ca, config.org, now=now, validity_days=validity_days, key=key)
    dev.write_file(config.tls.cert, issued.cert_pem(), mode=dev.PUBLIC_FILE_MODE, replace=True)
    if config.client_tls is not None:
        client = dev.load_certificate(config.client_tls.cert)
        if not _issued_by(client, ca.cert):
            client_key = dev.load_ec_key(config.client_tls.key)
            host = config.listen.client.host
            reissued = dev.issue_client_api_cert(
                ca, host, now=now, validity_days=validity_days, key=client_key
            )
            dev.write_file(
                config.client_tls.cert,
                reissued.cert_pem(),
                mode=dev.PUBLIC_FILE_MODE,
                replace=True,
            )


def ca_rollover_switch(config: GatewayConfig, *, now: datetime, validity_days: int) -> None:
    """Issue from the new CA from now on: re-issue our certificates, swap the CA keys."""
    from gateway.pki import dev

    cas = dev.load_ca_bundle(config.tls.ca)
    next_key = next_ca_key_path(config)
    if len(cas) != 2 or not os.path.lexists(next_key):
        raise PKIError(
            f"{config.tls.ca}: no CA rollover to switch to "
            "(run `gateway pki ca-rollover start` first)"
        )
    new = dev.load_issuing_ca(config.tls.ca, next_key)
    old_key = ca_key_path(config, None)
    old = dev.load_issuing_ca(config.tls.ca, old_key)
    # Our certificates first (the gateway accepts them: tls.ca holds both CAs), then keys.
    _reissue(config, new, now=now, validity_days=validity_days)
    dev.write_private_key(previous_ca_key_path(config), old.key, replace=False)
    dev.write_private_key(old_key, new.key, replace=True)
    try:
        next_key.unlink()
    except OSError as exc:
        raise PKIError(f"{next_key}: switched, but cannot remove: {exc.strerror}") from exc


def ca_rollover_finish(config: GatewayConfig) -> x509.Certificate:
    """Trust only the new CA: ``tls.ca`` holds it alone, the old CA's key is deleted."""
    from gateway.pki import dev

    cas = dev.load_ca_bundle(config.tls.ca)
    if len(cas) != 2 or os.path.lexists(next_ca_key_path(config)):
        raise PKIError(
            f"{config.tls.ca}: no switched CA rollover to finish "
            "(`gateway pki ca-rollover switch` comes first)"
        )
    new = dev.load_issuing_ca(config.tls.ca, ca_key_path(config, None))
    mine = [("federation certificate", config.tls.cert)]
    if config.client_tls is not None:
        mine.append(("client API certificate", config.client_tls.cert))
    for title, path in mine:
        if not _issued_by(dev.load_certificate(path), new.cert):
            raise PKIError(f"{path}: the {title} is not issued by the new CA yet; run switch")
    _write_ca_file(config, [new.cert])
    previous = previous_ca_key_path(config)
    try:
        previous.unlink(missing_ok=True)
    except OSError as exc:
        raise PKIError(f"{previous}: finished, but cannot delete: {exc.strerror}") from exc
    return new.cert


def run_ca_rollover(args: argparse.Namespace) -> int:
    config = load_dir_config(args.dir)
    now = datetime.now(UTC)
    if args.step == "start":
        new = ca_rollover_start(config, now=now)
        print(f"new CA: {new.subject.rfc4514_string()}, key {next_ca_key_path(config)}")
        print(f"{config.tls.ca} now holds the old and the new CA; nothing we present changed.")
        print(
            "next: send every partner the output of `gateway peer card` (it holds both CAs); "
            "once each has put it in its rules, run `gateway pki ca-rollover switch`"
        )
    elif args.step == "switch":
        validity_days = parse_validity_days(args.validity_days)
        ca_rollover_switch(config, now=now, validity_days=validity_days)
        print(f"re-issued {config.tls.cert} from the new CA (same key, same pin)")
        print(f"the old CA's key is kept as {previous_ca_key_path(config)} until finish")
        print(
            "the running gateway presents the new certificate within seconds; next: once "
            "partners may drop the old CA, run `gateway pki ca-rollover finish` and send them "
            "the new `gateway peer card`"
        )
    else:
        new = ca_rollover_finish(config)
        print(f"{config.tls.ca} now holds only {new.subject.rfc4514_string()}")
        print("the old CA's key is deleted; send partners the new `gateway peer card`")
    return 0
