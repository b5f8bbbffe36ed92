"""The retrieval service app in-process, on the real tiny retriever run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.common.settings import RetrievalSettings
from services.retrieval.app import create_app


@pytest.fixture(scope="session")
def loaded_retriever(tiny_retriever_run: Path):
    from retriever.core import Retriever

    return Retriever.load(tiny_retriever_run)


@pytest.fixture
async def client(loaded_retriever, tiny_retriever_run: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = RetrievalSettings(_env_file=None, retriever_run=tiny_retriever_run)
    app = create_app(settings, retriever=loaded_retriever)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://retrieval") as c,
    ):
        yield c


def some_history(retriever, n: int = 6) -> list[str]:
    return retriever.catalog.item_ids[3 : 3 + n]


async def test_retrieve_returns_k_candidates_never_from_history_or_exclude(
    client, loaded_retriever
):
    history = some_history(loaded_retriever)
    first = (await client.post("/retrieve", json={"history": history, "k": 10})).json()
    assert first["source"] == "retriever" and len(first["candidates"]) == 10
    assert first["user_embedding"] is None
    banned = [c["item_id"] for c in first["candidates"][:4]]
    again = await client.post("/retrieve", json={"history": history, "k": 10, "exclude": banned})
    returned = {c["item_id"] for c in again.json()["candidates"]}
    assert not returned & (set(history) | set(banned))
    expected = loaded_retriever.retrieve(history, 10, banned)
    assert [c["item_id"] for c in again.json()["candidates"]] == [i for i, _ in expected]


async def test_user_embedding_on_request(client, loaded_retriever):
    body = {"history": some_history(loaded_retriever), "k": 3, "include_user_embedding": True}
    out = (await client.post("/retrieve", json=body)).json()
    assert len(out["user_embedding"]) == loaded_retriever.dim


async def test_empty_history_falls_back_to_popular_items(client, loaded_retriever):
    out = (await client.post("/retrieve", json={"history": [], "k": 5})).json()
    assert out["source"] == "popularity"
    assert [c["item_id"] for c in out["candidates"]] == [i for i, _ in loaded_retriever.popular(5)]


async def test_unknown_history_items_are_a_specific_422(client, loaded_retriever):
    history = [*some_history(loaded_retriever, 2), "no-such-item"]
    response = await client.post("/retrieve", json={"history": history})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert "no-such-item" in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [{"history": ["a"], "k": 0}, {"history": ["a"], "k": 201}, {"history": ["a"], "x": 1}, {}],
)
async def test_bad_requests_are_422_problems(client, body):
    response = await client.post("/retrieve", json=body)
    assert response.status_code == 422 and response.json()["detail"]


async def test_metrics_and_readiness(client, loaded_retriever):
    await client.post("/retrieve", json={"history": some_history(loaded_retriever), "k": 2})
    text = (await client.get("/metrics")).text
    assert "tandem_retrieval_duration_seconds_count 1.0" in text
    assert 'service="retrieval"' in text
    assert (await client.get("/readyz")).json() == {
        "status": "ready",
        "checks": {"artifacts": True},
    }
