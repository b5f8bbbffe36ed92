"""Shadow scoring: a variant ranks the served candidates off the response path, never served.

A shadow answers "how differently would this ranker order what we serve, and how fast is it"
on real traffic without risking an answer: it starts only after the response is sent, runs
under its own deadline and a concurrency bound (when the bound is full the request is skipped
and counted, so a slow shadow cannot pile up work), and its failures are only counted. What it
records: the Kendall tau between the served and the shadow ordering, and its latency.

``FollowUps`` runs such work detached from the request (also the answer hook), so a hung
follow-up never holds the connection or the request's task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from services.common.metrics import GatewayMetrics

if TYPE_CHECKING:
    from ranker.prompts import PromptInput
    from services.gateway.variants import Variant

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]
InputSource = Callable[[], Awaitable["PromptInput | None"]]


def kendall_tau(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b of two score vectors over the same candidates: 1 = same order, -1 =
    reversed; a pair tied in either vector counts as neither. NaN when either is constant."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two vectors of one length, got {x.shape}, {y.shape}")
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    untied_x, untied_y = np.count_nonzero(dx), np.count_nonzero(dy)
    if not untied_x or not untied_y:
        return math.nan
    return float(np.sum(dx * dy) / math.sqrt(untied_x * untied_y))


class ShadowScorer:
    """Scores one shadow variant off the response path, under its own deadline and bound."""

    def __init__(self, variant: Variant, metrics: GatewayMetrics):
        self.variant = variant
        self.metrics = metrics
        self.label = metrics.variant_label(variant.name)
        self.slots = asyncio.Semaphore(variant.shadow_concurrency)

    async def __call__(self, inputs: InputSource, base: np.ndarray, served: np.ndarray) -> None:
        """Score the candidates ``served`` ranked (fused scores, candidate order); ``inputs``
        builds the prompt input (None: the store was down, so the request is skipped)."""
        if self.slots.locked():  # no await between this check and the acquire below
            self._count("skipped")
            return
        async with self.slots:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(self.variant.shadow_deadline_s):
                    inp = await inputs()
                    if inp is None:  # the store was down for this request: nothing to compare
                        self._count("skipped")
                        return
                    scores = await self.variant.score(inp, base)
            except TimeoutError:
                self._count("timeout")
                return
            except Exception as exc:  # a broken shadow is counted, never raised
                log.warning("shadow %s failed: %s", self.variant.name, exc)
                self._count("error")
                return
            self.metrics.shadow_duration.labels(self.label).observe(time.perf_counter() - start)
        tau = kendall_tau(served, scores)
        if not math.isnan(tau):
            self.metrics.shadow_kendall_tau.labels(self.label).observe(tau)
        self._count("scored")

    def _count(self, result: str) -> None:
        self.metrics.shadow_requests.labels(self.label, result).inc()


class FollowUps:
    """Work started after a response: detached tasks, kept referenced until they end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, jobs: Sequence[Job]) -> None:
        """Start ``jobs`` and return at once (a route passes this to its BackgroundTasks, so
        the jobs start after the response is sent but do not hold the request open)."""
        for job in jobs:
            task = asyncio.create_task(self._run(job), name="follow-up")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(job: Job) -> None:
        try:
            await job()
        except Exception:  # follow-ups never affect answers; a bug is logged, not raised
            log.exception("follow-up failed")

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
