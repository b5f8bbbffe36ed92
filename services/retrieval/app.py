"""The retrieval service app: loads one retriever run at start-up, then serves ``/retrieve``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from services.common.factory import build_app
from services.common.metrics import RetrievalMetrics
from services.common.retriever import load_retriever
from services.common.settings import RetrievalSettings
from services.retrieval.routes import router
from services.retrieval.service import RetrievalService

if TYPE_CHECKING:
    from retriever.core import Retriever

log = logging.getLogger(__name__)


def create_app(settings: RetrievalSettings, *, retriever: Retriever | None = None) -> FastAPI:
    """The app; pass a loaded ``retriever`` to skip loading it in the lifespan."""
    metrics = RetrievalMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = retriever or await asyncio.to_thread(load_retriever, settings)
        app.state.service = RetrievalService(loaded, metrics)
        log.info("retriever loaded", extra={"run": loaded.manifest.run_id})

        async def artifacts() -> bool:
            return True

        app.state.readiness.add("artifacts", artifacts)
        yield

    app = build_app(
        title="Tandem retrieval",
        description="History -> user vector (ONNX) -> Faiss top-k, history never returned.",
        settings=settings,
        metrics=metrics,
        lifespan=lifespan,
    )
    app.include_router(router)
    return app
