"""``gateway health``: ask a running gateway's ``/readyz``; the container's HEALTHCHECK.

The address comes from the same ``gateway.yaml`` the gateway runs with
(``listen.metrics``), so the check follows the config instead of a port baked
into the image. A wildcard listen address (``0.0.0.0``, ``::``) is asked on
loopback.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from gateway.cli.common import EXIT_FAILURE, EXIT_OK, Registrar, UsageError, set_handler

if TYPE_CHECKING:
    from gateway.config import HostPort

#: Longest wait for the answer; Docker's own --timeout should be larger.
DEFAULT_TIMEOUT = 4.0
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapped away


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "health",
        help="exit 0 if the gateway of this config answers ready (for health checks)",
        description="Ask the metrics listener of the gateway that runs with this config for "
        "/readyz (rules loaded, storage takes a durable write, listeners up; or /healthz with "
        "--live). Exits 0 and prints one line if it answers 200, else exits 1 saying why.",
    )
    parser.add_argument(
        "-c",
        "--config",
        default="gateway.yaml",
        help="the gateway's configuration file (default: ./gateway.yaml)",
    )
    parser.add_argument(
        "--live", action="store_true", help="ask /healthz (the process serves at all)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})",
    )
    set_handler(parser, run)


def probe_url(metrics: HostPort, *, live: bool) -> str:
    """The URL that asks the metrics listener at ``metrics``, from the same host."""
    if metrics.port == 0:
        raise UsageError("listen.metrics has port 0 (a random port): there is nothing to ask")
    host = _WILDCARDS.get(metrics.host, metrics.host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{metrics.port}/{'healthz' if live else 'readyz'}"


def run(args: argparse.Namespace) -> int:
    import http.client  # with urllib.request, ~20 ms that only this command needs
    import urllib.error
    import urllib.request

    from gateway.config import load_config

    config = load_config(args.config)
    url = probe_url(config.listen.metrics, live=args.live)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as answer:  # noqa: S310 - http to ourselves
            status = answer.status
            body = answer.read(1024)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1024)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"gateway: unhealthy: {url}: {reason}")
        return EXIT_FAILURE
    text = body.decode("utf-8", "replace").strip()
    if status != 200:
        print(f"gateway: unhealthy: {url}: {status} {text}")
        return EXIT_FAILURE
    print(f"gateway: healthy: {url}: {text}")
    return EXIT_OK
