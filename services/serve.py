"""Running the services: the embedded stack (``tandem serve``) and the separate roles.

Embedded = one process: the gateway with the retriever in-process (no HTTP hop), the embedded
Redis (features published when the store is empty) and the in-process ranker. The roles
``gateway`` and ``retrieval`` are the separate services compose and Kubernetes run. Artifacts
load before the port is bound, so a missing run fails at once with what to do.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI

from services.common.logs import configure_logging
from services.common.settings import GatewaySettings, RetrievalSettings

Role = Literal["embedded", "gateway", "retrieval"]
GRACEFUL_SHUTDOWN_S = 10  # in-flight requests get this long after SIGTERM

log = logging.getLogger(__name__)


class StartupError(Exception):
    """Serving cannot start; the message says what is missing and how to make it."""


def build_gateway(settings: GatewaySettings, *, embedded: bool) -> FastAPI:
    """Load everything the gateway needs now (not in the lifespan) and return the app."""
    from services.gateway.app import create_app
    from services.gateway.wiring import load_artifacts, redis_url

    if embedded:
        settings = settings.model_copy(update={"retrieval_url": None})
    embedded_store = not settings.redis_url
    settings = settings.model_copy(update={"redis_url": redis_url(settings)})
    artifacts = _loaded(lambda: load_artifacts(settings))
    if embedded and settings.publish_if_empty:
        publish_if_empty(settings, artifacts.retriever.manifest.dataset)
    app = create_app(settings, artifacts=artifacts)
    if embedded_store:
        _stop_store_with(app, settings.artifacts_dir)
    return app


def build_retrieval(settings: RetrievalSettings) -> FastAPI:
    from services.common.retriever import load_retriever
    from services.retrieval.app import create_app

    return create_app(settings, retriever=_loaded(lambda: load_retriever(settings)))


def publish_if_empty(settings: GatewaySettings, dataset: str) -> int:
    """Publish the dataset's users and items when the namespace has no version yet."""
    from feature_store.dataset import publish_sources
    from feature_store.writer import FeatureWriter
    from tandem.data import Dataset

    assert settings.redis_url is not None
    writer = FeatureWriter(settings.redis_url, settings.namespace, cluster=settings.redis_cluster)
    try:
        current = writer.current_version()
        if current is not None:
            return current
        data = _loaded(lambda: Dataset.load(settings.artifacts_dir / dataset / "data"))
        log.info("feature store empty: publishing %s", dataset)
        version, _ = publish_sources(writer, data)
        return version
    finally:
        writer.close()


def _stop_store_with(app: FastAPI, artifacts_dir: Path) -> None:
    """The embedded Redis stops when the app's lifespan ends (after its clients closed).

    Exit hooks are too late: uvicorn ends a graceful shutdown by re-raising SIGTERM/SIGINT, so
    the process dies by the signal and the server would be left running as an orphan.
    """
    from feature_store.embedded import stop_embedded

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Mapping[str, Any] | None]:
        try:
            async with inner(app) as state:
                yield state
        finally:
            await asyncio.to_thread(stop_embedded, artifacts_dir, force=False)

    app.router.lifespan_context = lifespan


def _loaded(load):  # type: ignore[no-untyped-def]
    """Run a loader, turning expected failures (missing files, bad config) into StartupError."""
    try:
        return load()
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        log.debug("start-up failed", exc_info=True)
        raise StartupError(str(exc)) from exc


def run(
    role: Role,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    gateway: GatewaySettings | None = None,
    retrieval: RetrievalSettings | None = None,
) -> None:
    """Build the app for ``role`` and serve it until SIGINT/SIGTERM (graceful shutdown)."""
    if role == "retrieval":
        settings: GatewaySettings | RetrievalSettings = retrieval or RetrievalSettings()
        configure_logging(settings.log_level, "retrieval")
        app = build_retrieval(settings)
    else:
        settings = gateway or GatewaySettings()
        configure_logging(settings.log_level, "gateway")
        app = build_gateway(settings, embedded=role == "embedded")
    loop, http = server_stack(settings.server_loop, settings.server_http)
    _say_what_serves(settings.server_loop, settings.server_http, loop, http)
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop=loop,
        http=http,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def server_stack(loop: str, http: str) -> tuple[str, str]:
    """The event loop and HTTP parser uvicorn runs for ``loop`` / ``http``, "auto" resolved by
    uvicorn's own rule: uvloop and httptools when they import, else asyncio and h11.

    Resolved here so the log names what serves: the dev environment always had both (vLLM's
    FastAPI pulls them in), the image built from the base dependencies once had neither, and
    the benchmarks measured the former while production ran the latter.
    """
    if loop == "auto":
        loop = "uvloop" if _imports("uvloop") else "asyncio"
    if http == "auto":
        http = "httptools" if _imports("httptools") else "h11"
    return loop, http


def _say_what_serves(wanted_loop: str, wanted_http: str, loop: str, http: str) -> None:
    """Log the loop and parser; a warning when "auto" had to fall back."""
    missing = [
        fast
        for fast, wanted, got in (("uvloop", wanted_loop, loop), ("httptools", wanted_http, http))
        if wanted == "auto" and got != fast
    ]
    if missing:
        log.warning(
            "%s did not import: serving on %s + %s, which answered 14-21%% fewer requests "
            "per second in benchmarks/server_stack.py (`pip install .` installs them)",
            " and ".join(missing),
            loop,
            http,
        )
    else:
        log.info("serving on %s + %s", loop, http)


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def run_embedded(
    settings: GatewaySettings | None = None, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """The whole online stack in this process (what ``tandem quickstart`` ends with)."""
    run("embedded", host, port, gateway=settings)
