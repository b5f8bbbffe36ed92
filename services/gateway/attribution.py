"""The gateway's side of click attribution: record each answer, export the per-variant figures.

Answers are recorded after the response is sent (the pipeline's answer hook), so a slow or
lost Redis never delays an answer; it only costs attribution, counted in
``tandem_attribution_record_failures_total``. The counters themselves live in Redis
(``feature_store.attribution``) and are shared by every gateway: each one exports the same
global figures as gauges, refreshed every ``refresh_s``; aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from feature_store.attribution import AnswerLog, VariantCounts
from feature_store.client import FeatureStoreUnavailable
from feature_store.connection import async_client
from services.common.settings import GatewaySettings
from tandem.metric_sets import per_registry
from tandem.proportions import proportion, two_proportion_test

log = logging.getLogger("tandem.gateway.attribution")


@dataclass(frozen=True)
class VariantFigures:
    """One row of the report: a variant's counts, click-through rate and test vs control."""

    counts: VariantCounts
    ctr: float  # answers with an attributed click / answers
    ctr_low: float  # Wilson 95% interval
    ctr_high: float
    mrr: float  # mean reciprocal rank of the clicked items
    ctr_difference: float  # against the control (NaN for the control itself)
    p_value: float  # two-proportion z-test against the control


def figures(counts: Sequence[VariantCounts], control: str | None) -> list[VariantFigures]:
    """The report's rows from the counters; ``control`` None or unseen = no test."""
    by_name = {c.variant: c for c in counts}
    base = by_name.get(control) if control else None
    base_rate = proportion(base.clicked_requests, base.requests) if base else None
    rows = []
    for c in counts:
        rate = proportion(c.clicked_requests, c.requests)
        test = None
        if base_rate is not None and c.variant != control:
            test = two_proportion_test(rate, base_rate)
        rows.append(
            VariantFigures(
                counts=c,
                ctr=rate.rate,
                ctr_low=float(rate.low),
                ctr_high=float(rate.high),
                mrr=c.mean_reciprocal_rank,
                ctr_difference=test.difference if test else math.nan,
                p_value=test.p_value if test else math.nan,
            )
        )
    return rows


@dataclass
class AttributionMetrics:
    requests: Gauge
    clicks: Gauge
    ctr: Gauge
    ctr_low: Gauge
    ctr_high: Gauge
    mrr: Gauge
    p_value: Gauge
    record_failures: Counter


@per_registry
def attribution_metrics(registry: CollectorRegistry = REGISTRY) -> AttributionMetrics:
    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(f"tandem_variant_{name}", doc, ["variant"], registry=registry)

    return AttributionMetrics(
        requests=gauge("requests", "Answers served by the variant (all gateways, from Redis)."),
        clicks=gauge("attributed_clicks", "Clicks attributed to the variant's answers."),
        ctr=gauge("ctr", "Answers with an attributed click / answers."),
        ctr_low=gauge("ctr_low", "Lower end of the click-through rate's Wilson 95% interval."),
        ctr_high=gauge("ctr_high", "Upper end of the click-through rate's Wilson 95% interval."),
        mrr=gauge("clicked_mrr", "Mean reciprocal rank of the variant's clicked items."),
        p_value=gauge(
            "ctr_p_value", "Two-proportion z-test of the variant's click-through vs the control."
        ),
        record_failures=Counter(
            "tandem_attribution_record_failures",
            "Answers not recorded for attribution (Redis slow or down); the answer was served.",
            registry=registry,
        ),
    )


class Attribution:
    """Records answers through ``log`` and keeps the gauges fresh while started."""

    def __init__(
        self,
        log: AnswerLog,
        control: Callable[[], str | None],
        *,
        registry: CollectorRegistry = REGISTRY,
        refresh_s: float = 15.0,
        owns_client: bool = False,
    ):
        self.log = log
        self.owns_client = owns_client  # close() closes the log's Redis client too
        self.control = control
        self.metrics = attribution_metrics(registry)
        self.refresh_s = refresh_s
        self._task: asyncio.Task | None = None
        # Stopping is a flag, not a cancel: a cancel landing inside a Redis call can be
        # swallowed by the client, and the loop would then never end.
        self._stop = asyncio.Event()

    async def on_answer(
        self, request_id: str, user_id: str, variant: str, item_ids: Sequence[str]
    ) -> None:
        """The pipeline's answer hook: never raises, a failure is counted."""
        try:
            await self.log.record(request_id, user_id, variant, item_ids)
        except FeatureStoreUnavailable as exc:
            self.metrics.record_failures.inc()
            log.debug("answer %s not recorded for attribution: %s", request_id, exc)

    async def refresh(self) -> list[VariantFigures]:
        """Read the counters once and set the gauges; returns the rows."""
        rows = figures(await self.log.counts(), self.control())
        m = self.metrics
        for row in rows:
            name = row.counts.variant
            m.requests.labels(name).set(row.counts.requests)
            m.clicks.labels(name).set(row.counts.clicks)
            m.ctr.labels(name).set(row.ctr)
            m.ctr_low.labels(name).set(row.ctr_low)
            m.ctr_high.labels(name).set(row.ctr_high)
            m.mrr.labels(name).set(row.mrr)
            m.p_value.labels(name).set(row.p_value)
        return rows

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        """Stop refreshing (within one Redis deadline) and close the client when owned."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.owns_client:
            await self.log.close()

    async def _refresh_forever(self) -> None:
        while not self._stop.is_set():
            try:
                await self.refresh()
            except FeatureStoreUnavailable as exc:
                log.debug("attribution gauges not refreshed: %s", exc)
            except Exception:  # a bug here must not kill the loop silently
                log.exception("attribution gauges refresh failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_s):
                    await self._stop.wait()


def build_attribution(
    settings: GatewaySettings, registry: CollectorRegistry, control: Callable[[], str | None]
) -> Attribution:
    """Attribution on the gateway's Redis and namespace (the events' deadline; its own pool)."""
    from services.gateway.wiring import redis_url

    deadline = settings.events_deadline_ms / 1000
    client = async_client(
        redis_url(settings),
        socket_timeout=deadline,
        connect_timeout=deadline,
        max_connections=16,
        pool_timeout=deadline,
    )
    log = AnswerLog(client, settings.namespace, deadline=deadline)
    return Attribution(log, control, registry=registry, owns_client=True)
