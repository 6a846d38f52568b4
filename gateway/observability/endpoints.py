"""The metrics listener's routes: ``/metrics``, ``/healthz`` and ``/readyz``.

* ``/metrics`` renders the default registry in the Prometheus text format in a
  worker thread, so a scrape never holds the trio loop for the few
  milliseconds that rendering a large registry takes.
* ``/healthz`` answers 200 while the process serves requests at all.
* ``/readyz`` answers 200 when every readiness check passes, else 503 with the
  failing parts named, and why where a check says (:class:`NotReady`):
  ``{"ready": false, "failing": ["disk"], "why": {"disk": "12.0 MiB available
  ..."}}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import trio
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway.http import Request, Response, Router, json_response, text_response

ReadinessCheck = Callable[[], Awaitable[bool]]


class NotReady(Exception):
    """A readiness check's failure with the reason ``/readyz`` shows (an operator's words)."""


#: A readiness check that takes longer than this counts as failing.
READINESS_CHECK_TIMEOUT = 2.0

#: Scrapes rendered at once; more wait (a scrape storm must not eat every thread).
_RENDER_LIMITER = trio.CapacityLimiter(2)


@dataclass(frozen=True, slots=True)
class MetricsEndpoints:
    checks: Mapping[str, ReadinessCheck]

    def add_routes(self, router: Router) -> None:
        router.add("GET", "/metrics", self._metrics)
        router.add("GET", "/healthz", self._healthz)
        router.add("GET", "/readyz", self._readyz)

    async def _metrics(self, request: Request, params: Mapping[str, str]) -> Response:
        body = await trio.to_thread.run_sync(generate_latest, REGISTRY, limiter=_RENDER_LIMITER)
        return Response(200, [("content-type", CONTENT_TYPE_LATEST)], body)

    async def _healthz(self, request: Request, params: Mapping[str, str]) -> Response:
        return text_response(200, "ok\n")

    async def _readyz(self, request: Request, params: Mapping[str, str]) -> Response:
        why: dict[str, str] = {}
        failing = await failing_checks(self.checks, why)
        if failing:
            body: dict[str, object] = {"ready": False, "failing": failing}
            if why:
                body["why"] = why
            return json_response(503, body)
        return json_response(200, {"ready": True})


async def failing_checks(
    checks: Mapping[str, ReadinessCheck], why: dict[str, str] | None = None
) -> Sequence[str]:
    """Names of the checks that fail, raise, or take too long; in the order given.

    A check that raises :class:`NotReady` puts its reason in ``why``.
    """
    failing: list[str] = []
    for name, check in checks.items():
        ok = False
        with trio.move_on_after(READINESS_CHECK_TIMEOUT):
            try:
                ok = await check()
            except NotReady as exc:
                if why is not None:
                    why[name] = str(exc)
            except Exception:  # a readiness probe reports, it never crashes the listener
                ok = False
        if not ok:
            failing.append(name)
    return failing
