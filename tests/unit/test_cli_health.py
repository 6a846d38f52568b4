"""`gateway health`: which URL it asks for a given `listen.metrics`."""

from __future__ import annotations

import pytest

from gateway.cli.common import UsageError
from gateway.cli.health import probe_url
from gateway.config import HostPort


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "http://127.0.0.1:9090/readyz"),
        ("0.0.0.0", "http://127.0.0.1:9090/readyz"),
        ("::", "http://[::1]:9090/readyz"),
        ("::1", "http://[::1]:9090/readyz"),
        ("10.1.2.3", "http://10.1.2.3:9090/readyz"),
        ("gw.acme.example", "http://gw.acme.example:9090/readyz"),
    ],
)
def test_wildcards_are_asked_on_loopback(host: str, expected: str) -> None:
    assert probe_url(HostPort(host, 9090), live=False) == expected


def test_live_asks_healthz() -> None:
    assert probe_url(HostPort("127.0.0.1", 9191), live=True) == "http://127.0.0.1:9191/healthz"


def test_a_random_port_cannot_be_asked() -> None:
    with pytest.raises(UsageError, match="port 0"):
        probe_url(HostPort("127.0.0.1", 0), live=False)
