"""The gateway app: loads artifacts and clients in the lifespan, then serves ``/recommend``
and ``/events``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.factory import build_app
from services.common.loop_lag import lag_watcher
from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from services.common.variants import DEFAULT_VARIANT
from services.gateway.attribution import build_attribution
from services.gateway.events import build_events
from services.gateway.pipeline import AnswerHook, FeatureStore, RecommendPipeline
from services.gateway.routes import router
from services.gateway.sources import CandidateSource
from services.gateway.wiring import Artifacts, build_pipeline, load_artifacts

log = logging.getLogger(__name__)


def create_app(
    settings: GatewaySettings,
    *,
    artifacts: Artifacts | None = None,
    store: FeatureStore | None = None,
    source: CandidateSource | None = None,
    on_answer: AnswerHook | None = None,
) -> FastAPI:
    """The app; pass loaded ``artifacts`` (the CLI does, to fail before binding the port).
    ``on_answer`` gets (request id, user id, variant, item ids) after each answer is sent;
    by default (``TANDEM_ATTRIBUTION``) the answer is recorded for click attribution."""
    names = settings.variants.names if settings.variants is not None else [DEFAULT_VARIANT]
    metrics = GatewayMetrics(variants=names)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = artifacts or await asyncio.to_thread(load_artifacts, settings)
        attribution = None
        if on_answer is None and settings.attribution:
            attribution = build_attribution(
                settings, metrics.registry, control=lambda: pipeline.variants.control.name
            )
        hook = attribution.on_answer if attribution is not None else on_answer
        pipeline = build_pipeline(
            settings, metrics, loaded, store=store, source=source, on_answer=hook
        )
        await pipeline.load()
        if attribution is not None:
            attribution.start()
        app.state.pipeline = pipeline
        app.state.events = build_events(settings, metrics, pipeline.catalog)
        _add_readiness(app, pipeline)
        log.info(
            "gateway ready to serve",
            extra={
                "model": pipeline.model.model_dump(),
                "retrieval": pipeline.retrieval.source.name,
            },
        )
        try:
            async with lag_watcher(metrics.event_loop_lag):
                yield
        finally:
            await app.state.events.close()
            await pipeline.close()
            if attribution is not None:
                await attribution.close()

    app = build_app(
        title="Tandem gateway",
        description="POST /recommend: sequential retrieval + LLM ranking, fused, with fallbacks. "
        "POST /events: live interactions, visible to the user's next /recommend.",
        settings=settings,
        metrics=metrics,
        lifespan=lifespan,
    )
    app.include_router(router)
    return app


def _add_readiness(app: FastAPI, pipeline: RecommendPipeline) -> None:
    checks = app.state.readiness

    async def artifacts() -> bool:
        return True

    checks.add("artifacts", artifacts)
    checks.add("retrieval", pipeline.retrieval.source.ready)
    if pipeline.user is not None:
        checks.add("feature_store", pipeline.user.store.ping)
    if any(v.ranker is not None for v in pipeline.variants.by_name.values()):
        checks.add("ranker", pipeline.variants.ready)
