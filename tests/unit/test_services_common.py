"""The shared service shell: problem+json errors, request ids, body limits, auth, metrics."""

from __future__ import annotations

import json
import logging
import re
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from services.common.auth import ApiKeyDep
from services.common.context import current_request_id
from services.common.errors import PROBLEM_MEDIA_TYPE, ServiceError, problem_responses
from services.common.factory import build_app
from services.common.ids import ItemId
from services.common.logs import RequestIdFilter
from services.common.metrics import ServiceMetrics
from services.common.settings import GatewaySettings, RetrievalSettings
from tandem.testing.processes import REPO


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    item_id: ItemId
    k: int = 1


def shell(api_keys: str = "", max_body_bytes: int = 2048) -> FastAPI:
    settings = RetrievalSettings(api_keys=api_keys, max_body_bytes=max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ok() -> bool:
            return True

        app.state.readiness.add("artifacts", ok)
        yield

    app = build_app(
        title="t", description="d", settings=settings, metrics=ServiceMetrics("retrieval"),
        lifespan=lifespan,
    )  # fmt: skip

    @app.post("/echo", responses=problem_responses(401, 422))
    async def echo(body: Echo, _: ApiKeyDep) -> dict:
        return {"item_id": body.item_id, "request_id": current_request_id()}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals")

    @app.get("/teapot")
    async def teapot() -> dict:
        raise ServiceError(418, "short and stout")

    return app


async def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_unknown_fields_and_control_characters_are_422_problems():
    async with await client_for(shell()) as client:
        body = assert_problem(await client.post("/echo", json={"item_id": "a", "extra": 1}), 422)
        assert "extra" in body["detail"]
        body = assert_problem(await client.post("/echo", json={"item_id": "a\x07b"}), 422)
        assert body["errors"][0]["loc"] == "item_id"
        assert_problem(await client.post("/echo", json={"item_id": "x" * 65}), 422)
        assert_problem(await client.post("/echo", json={"item_id": "a", "k": "3"}), 422)
        assert_problem(await client.post("/echo", content=b"{not json"), 422)


async def test_unexpected_exception_is_a_500_problem_without_internals(caplog):
    async with await client_for(shell()) as client:
        with caplog.at_level(logging.ERROR):
            response = await client.get("/boom")
    body = assert_problem(response, 500)
    assert "secret" not in response.text and "Traceback" not in response.text
    logged = [r for r in caplog.records if r.name == "tandem.errors"]
    assert logged and logged[0].exc_info is not None
    assert body["request_id"]


async def test_unknown_route_and_method_are_problems():
    async with await client_for(shell()) as client:
        assert "no route" in assert_problem(await client.get("/nope"), 404)["detail"]
        assert "not allowed" in assert_problem(await client.get("/echo"), 405)["detail"]
        assert assert_problem(await client.get("/teapot"), 418)["detail"] == "short and stout"


async def test_request_id_is_accepted_generated_and_validated():
    async with await client_for(shell()) as client:
        given = await client.post("/echo", json={"item_id": "a"}, headers={"X-Request-ID": "abc-1"})
        assert given.headers["x-request-id"] == "abc-1" and given.json()["request_id"] == "abc-1"
        made = await client.post("/echo", json={"item_id": "a"})
        assert len(made.headers["x-request-id"]) == 32
        bad = await client.post("/echo", json={"item_id": "a"}, headers={"X-Request-ID": "a b"})
        assert "X-Request-ID" in assert_problem(bad, 400)["detail"]


async def test_large_bodies_are_refused_with_413():
    async with await client_for(shell(max_body_bytes=1024)) as client:
        big = json.dumps({"item_id": "a", "pad": "x" * 5000})
        response = await client.post(
            "/echo", content=big, headers={"content-type": "application/json"}
        )
        assert "larger than 1024" in assert_problem(response, 413)["detail"]

        async def chunks():  # no content-length: the limit applies while streaming
            for _ in range(10):
                yield b" " * 512

        streamed = await client.post("/echo", content=chunks())
        assert_problem(streamed, 413)


async def test_api_keys_guard_business_routes_only():
    async with await client_for(shell(api_keys="k1, k2")) as client:
        missing = assert_problem(await client.post("/echo", json={"item_id": "a"}), 401)
        assert "API key" in missing["detail"]
        wrong = await client.post("/echo", json={"item_id": "a"}, headers={"X-API-Key": "nope"})
        assert assert_problem(wrong, 401)["detail"] == "invalid API key"
        bearer = await client.post(
            "/echo", json={"item_id": "a"}, headers={"Authorization": "Bearer k2"}
        )
        assert bearer.status_code == 200
        header = await client.post("/echo", json={"item_id": "a"}, headers={"X-API-Key": "k1"})
        assert header.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_metrics_use_route_templates_and_bounded_labels():
    app = shell()
    async with await client_for(app) as client:
        await client.post("/echo", json={"item_id": "a"})
        await client.get("/nope/123")
        text = (await client.get("/metrics")).text
    assert (
        'tandem_http_requests_total{method="POST",route="/echo",service="retrieval",status="200"}'
        in text
    )
    assert 'route="<unmatched>"' in text and "/nope/123" not in text
    assert "tandem_http_request_duration_seconds_bucket" in text


async def test_readyz_reports_each_check():
    app = shell()
    async with app.router.lifespan_context(app), await client_for(app) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"artifacts": True}

        async def down() -> bool:
            raise ConnectionError("refused")

        app.state.readiness.add("redis", down)
        body = assert_problem(await client.get("/readyz"), 503)
        assert body["checks"] == {"artifacts": True, "redis": False}
        assert "redis" in body["detail"]


def test_settings_read_tandem_env(monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEYS", "a, b,,c")
    monkeypatch.setenv("TANDEM_RANK_WEIGHT", "0.25")
    monkeypatch.setenv("TANDEM_RETRIEVAL_URL", "http://retrieval:8001")
    settings = GatewaySettings(_env_file=None)
    assert [k.get_secret_value() for k in settings.api_keys] == ["a", "b", "c"]
    assert settings.rank_weight == 0.25 and settings.retrieval_url == "http://retrieval:8001"
    assert "a" not in repr(settings.api_keys)
    monkeypatch.setenv("TANDEM_RANK_WEIGHT", "2")
    with pytest.raises(ValueError, match="rank_weight"):
        GatewaySettings(_env_file=None)
    monkeypatch.setenv("TANDEM_SERVER_LOOP", "trio")  # uvicorn's loops only
    with pytest.raises(ValueError, match="server_loop"):
        RetrievalSettings(_env_file=None)


def test_missing_retriever_run_says_what_to_do(tmp_path):
    settings = RetrievalSettings(artifacts_dir=tmp_path, _env_file=None)
    with pytest.raises(FileNotFoundError, match="tandem retriever train"):
        settings.retriever_run_dir()


def test_server_stack_resolves_auto_as_uvicorn_does(monkeypatch):
    from services.serve import server_stack

    assert server_stack("auto", "auto") == ("uvloop", "httptools")
    assert server_stack("asyncio", "h11") == ("asyncio", "h11")  # an explicit choice stands
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import fails
    monkeypatch.setitem(sys.modules, "httptools", None)
    assert server_stack("auto", "auto") == ("asyncio", "h11")


def test_the_fast_loop_and_parser_are_base_dependencies():
    """The image installs the base dependencies only; without these two it served on asyncio +
    h11 while every benchmark (run where vLLM's FastAPI pulls them in) measured them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s=<>;\[]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert {"uvloop", "httptools"} <= names


async def test_log_records_carry_the_request_id_of_their_request():
    app = shell()
    log = logging.getLogger("tests.request_id")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.addFilter(RequestIdFilter())
    handler.emit = records.append  # type: ignore[method-assign]

    @app.get("/log")
    async def log_inside() -> dict:
        log.warning("inside")
        return {}

    log.addHandler(handler)
    try:
        async with await client_for(app) as client:
            response = await client.get("/log", headers={"X-Request-ID": "req-7"})
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    assert response.status_code == 200
    assert [(r.getMessage(), r.request_id) for r in records] == [  # type: ignore[attr-defined]
        ("inside", "req-7"),
        ("outside", None),
    ]


async def test_readiness_gates_limit_which_checks_cause_503():
    app = shell()
    app.state.readiness.gates = {"artifacts"}

    async def down() -> bool:
        return False

    async with app.router.lifespan_context(app), await client_for(app) as client:
        app.state.readiness.add("redis", down)
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"artifacts": True, "redis": False}


def test_readiness_gates_come_from_settings(monkeypatch):
    monkeypatch.setenv("TANDEM_READINESS_GATES", "artifacts, retrieval")
    assert RetrievalSettings(_env_file=None).readiness_gates == ["artifacts", "retrieval"]


async def test_start_up_objects_are_frozen_out_of_the_collector_while_serving():
    import gc

    app = shell()
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 0  # collections during requests skip start-up objects
    assert gc.get_freeze_count() == 0
