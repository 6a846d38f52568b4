"""What every command shares: its error type, exit codes, small argument parsers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from gateway.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and the answer is "no" (denied, invalid, differs)
EXIT_USAGE = 2  # the command could not run as asked (bad arguments, missing file)

Handler = Callable[[argparse.Namespace], int]


class UsageError(ConfigError):
    """The command was asked something it cannot do; exits 2 with one line."""


class Registrar(Protocol):
    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser: ...


def set_handler(parser: argparse.ArgumentParser, handler: Handler) -> None:
    parser.set_defaults(handler=handler)


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) for argparse ``type=``; port 0-65535."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port} is out of range 0-65535")
    return host, port


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
