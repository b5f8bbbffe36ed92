"""The FastAPI shell both services share: error handlers, middleware, operational routes."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

import tandem
from services.common.errors import Problem, install_error_handlers
from services.common.health import ReadinessChecks, router
from services.common.metrics import ServiceMetrics
from services.common.middleware import RequestMiddleware
from services.common.settings import ServiceSettings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def build_app(
    *,
    title: str,
    description: str,
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    lifespan: Lifespan,
) -> FastAPI:
    """An app whose state holds settings, metrics and readiness checks before start-up."""
    app = FastAPI(
        title=title,
        description=description,
        version=tandem.__version__,
        lifespan=_frozen_after(lifespan),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = list(settings.api_keys)
    app.state.readiness = ReadinessChecks(settings.readiness_gates)
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _frozen_after(lifespan: Lifespan) -> Lifespan:
    """``lifespan``, then ``gc.freeze()`` once everything is loaded.

    Start-up leaves millions of long-lived objects (torch, transformers, tables); without the
    freeze every full collection during a request walks all of them again, a pause of several
    milliseconds that lands on whichever request triggers it. Frozen, a collection sees only
    what requests allocate.
    """

    @asynccontextmanager
    async def frozen(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app):
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()

    return frozen


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the Problem model the problem+json responses refer to."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = Problem.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        app.openapi_schema = schema
    return app.openapi_schema
