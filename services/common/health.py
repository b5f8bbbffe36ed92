"""Operational endpoints every service exposes: liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from services.common.errors import problem_response, problem_responses

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT_S = 1.0


class Liveness(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str
    checks: dict[str, bool] = Field(description="Every check; only the gating ones cause 503.")


class ReadinessChecks:
    """Named async checks (artifacts loaded, Redis reachable, ...), run concurrently."""

    def __init__(self, gates: list[str] | None = None) -> None:
        self.checks: dict[str, Check] = {}
        self.gates = set(gates or ())  # empty: every check gates readiness

    def ready(self, results: dict[str, bool]) -> bool:
        gating = [ok for name, ok in results.items() if not self.gates or name in self.gates]
        return bool(results) and all(gating)

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def run(self) -> dict[str, bool]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._one(self.checks[n]) for n in names))
        return dict(zip(names, results, strict=True))

    @staticmethod
    async def _one(check: Check) -> bool:
        try:
            return bool(await asyncio.wait_for(check(), CHECK_TIMEOUT_S))
        except Exception as exc:
            log.warning("readiness check failed: %s", exc)
            return False


router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    """Alive: the process answers. Says nothing about its dependencies."""
    return Liveness()


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
async def readyz(request: Request) -> Readiness | Response:
    """Ready: artifacts loaded and every dependency reachable; 503 names what is not."""
    readiness: ReadinessChecks = request.app.state.readiness
    checks = await readiness.run()
    if readiness.ready(checks):
        return Readiness(status="ready", checks=checks)
    failing = ", ".join(name for name, ok in checks.items() if not ok) or "start-up"
    return problem_response(503, f"not ready: {failing}", instance="/readyz", checks=checks)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this service's metrics."""
    body = request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
