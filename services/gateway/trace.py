"""Per-request bookkeeping of ``/recommend``: the deadline, stage timings and fallbacks taken.

``Trace.attempt`` is the one place a stage gets its deadline, its fallback and its metrics, so
every stage degrades the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from services.common.fallbacks import Fallback
from services.common.metrics import GatewayMetrics
from services.common.variants import DEFAULT_VARIANT

log = logging.getLogger(__name__)
T = TypeVar("T")


class StageDeadline(Exception):
    """A stage ran past its deadline; ``overall`` when the request's own budget cut it."""

    def __init__(self, stage: str, overall: bool):
        super().__init__(f"{stage} over its deadline")
        self.stage, self.overall = stage, overall


@dataclass
class Trace:
    """Per-request bookkeeping: deadline, timings, fallbacks taken and warnings."""

    metrics: GatewayMetrics
    deadline: float  # time.monotonic() value
    variant: str = DEFAULT_VARIANT  # the ranker variant serving the request (a metric label)
    started: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def degrade(self, reason: Fallback) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)
            self.metrics.fallback(reason.value, self.variant)

    def record(self, stage: str, seconds: float) -> None:
        self.timings_ms[stage] = round(seconds * 1000, 3)
        self.metrics.observe_stage(stage, seconds, self.variant)

    async def run(self, stage: str, work: Awaitable[T], stage_deadline_s: float) -> T:
        """Await ``work`` within min(stage deadline, what is left); StageDeadline when over."""
        left = self.remaining_s()
        timeout = min(stage_deadline_s, left)
        start = time.perf_counter()
        try:
            if timeout <= 0:
                raise TimeoutError
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            raise StageDeadline(stage, overall=left <= stage_deadline_s) from None
        finally:
            if timeout <= 0 and asyncio.iscoroutine(work):
                work.close()
            self.record(stage, time.perf_counter() - start)

    async def attempt(
        self,
        stage: str,
        work: Awaitable[T],
        deadline_s: float,
        *,
        on_timeout: Fallback,
        errors: Mapping[type[BaseException], Fallback],
    ) -> T | None:
        """``work`` under the stage's deadline; None after recording the fallback taken.

        Over the stage's own deadline -> ``on_timeout``; over the request's -> deadline_exceeded;
        an exception of a type in ``errors`` -> its fallback (the first matching entry; logged).
        Anything else is a bug and propagates (the error envelope answers 500 with the request
        id; it is never disguised as degradation).
        """
        try:
            return await self.run(stage, work, deadline_s)
        except StageDeadline as exc:
            self.degrade(Fallback.DEADLINE_EXCEEDED if exc.overall else on_timeout)
        except tuple(errors) as exc:
            self.degrade(next(f for kind, f in errors.items() if isinstance(exc, kind)))
            log.warning("%s failed: %s", stage, exc)
        return None
