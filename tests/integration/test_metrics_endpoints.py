"""The metrics listener's routes over a real socket: /metrics, /healthz, /readyz."""

from __future__ import annotations

import httpx
import pytest
import trio

from gateway.http import HTTPServer, Router
from gateway.observability import endpoints
from gateway.observability.endpoints import MetricsEndpoints, NotReady, ReadinessCheck


async def ok() -> bool:
    return True


async def says_no() -> bool:
    return False


async def raises() -> bool:
    raise RuntimeError("storage is gone")


async def short_of_space() -> bool:
    raise NotReady("5.0 MiB available on /data, at the reserve of 8.0 MiB")


async def hangs() -> bool:
    await trio.sleep_forever()
    raise AssertionError("not reached")


async def get(checks: dict[str, ReadinessCheck], path: str) -> httpx.Response:
    router = Router()
    MetricsEndpoints(checks).add_routes(router)
    server = HTTPServer("metrics", router)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}{path}")
        nursery.cancel_scope.cancel()
    return answer


async def test_readyz_is_200_when_every_check_passes() -> None:
    answer = await get({"rules": ok, "storage": ok, "listeners": ok}, "/readyz")
    assert (answer.status_code, answer.json()) == (200, {"ready": True})


async def test_readyz_names_every_failing_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "READINESS_CHECK_TIMEOUT", 0.2)
    checks = {"rules": ok, "storage": raises, "listeners": says_no, "disk": hangs}
    with trio.fail_after(10):
        answer = await get(checks, "/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"ready": False, "failing": ["storage", "listeners", "disk"]}


async def test_readyz_says_why_where_a_check_does() -> None:
    answer = await get({"rules": ok, "disk": short_of_space, "listeners": says_no}, "/readyz")
    assert answer.status_code == 503
    assert answer.json() == {
        "ready": False,
        "failing": ["disk", "listeners"],
        "why": {"disk": "5.0 MiB available on /data, at the reserve of 8.0 MiB"},
    }


async def test_healthz_and_metrics() -> None:
    assert (await get({}, "/healthz")).status_code == 200
    answer = await get({}, "/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "# TYPE gateway_http_requests_total counter" in answer.text
    assert "_created" not in answer.text
