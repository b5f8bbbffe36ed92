"""A Redis outage behind the real gateway: users read before it keep personalised answers.

The stack is real (tiny retriever in-process, a private redis-server with published features,
the gateway app wired from settings, so the near-cache comes from ``wiring``). The outage is
real too: the test's own redis-server is SIGKILLed or SIGSTOPped, never the shared 6379 one.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest

from services.common.settings import GatewaySettings
from services.gateway.wiring import Artifacts
from tests.fixtures.redis import RedisProcess
from tests.fixtures.services import gateway_client, publish_dataset

pytestmark = pytest.mark.integration

NAMESPACE = "near-cache"
DEADLINE_MS = 200
STALE = "feature_store_stale"


@pytest.fixture(scope="module")
def served(tiny_retriever_run: Path):
    from retriever.core import Retriever
    from tandem.data import Dataset

    retriever = Retriever.load(tiny_retriever_run)
    root = tiny_retriever_run.resolve().parents[2]
    return retriever, Dataset.load(root / retriever.manifest.dataset / "data")


def gateway(retriever, redis: RedisProcess) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    settings = GatewaySettings(
        _env_file=None,
        redis_url=redis.url,
        namespace=NAMESPACE,
        ranker_backend="none",
        feature_store_deadline_ms=DEADLINE_MS,
        near_cache_users=100,
        near_cache_ttl_s=60,
    )
    return gateway_client(settings, Artifacts(retriever, None, None))


async def recommend(client: httpx.AsyncClient, user_id: str) -> dict:
    response = await client.post("/recommend", json={"user_id": user_id, "k": 10})
    assert response.status_code == 200, response.text
    return response.json()


def ids(answer: dict) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


def hits(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('tandem_feature_store_near_cache_lookups_total{result="hit"}'):
            return float(line.split()[-1])
    raise AssertionError("near-cache hit counter not exported")


async def test_a_killed_redis_keeps_seen_users_personalised_and_labelled_stale(
    served, redis_process: RedisProcess
):
    retriever, dataset = served
    version = publish_dataset(redis_process.url, NAMESPACE, dataset)
    seen, unseen = dataset.interactions.user_ids[:2]
    async with gateway(retriever, redis_process) as client:
        before = await recommend(client, seen)
        assert before["degraded"] == [] and "retrieval" in before["timings_ms"]
        hits_before = hits((await client.get("/metrics")).text)

        redis_process.kill()
        during = await recommend(client, seen)
        assert STALE in during["degraded"] and "feature_store_unavailable" in during["degraded"]
        assert "retrieval" in during["timings_ms"]  # personalised: retrieved from the history
        assert ids(during) == ids(before)
        assert during["model"]["feature_version"] == version
        assert hits((await client.get("/metrics")).text) == hits_before + 1

        cold = await recommend(client, unseen)  # never read before the outage: popularity
        assert cold["degraded"] == ["feature_store_unavailable"]
        assert "retrieval" not in cold["timings_ms"]

        redis_process.start()  # back, but empty (no persistence): the store's answer wins
        after = await recommend(client, seen)
        assert STALE not in after["degraded"]


async def test_a_hung_redis_answers_stale_before_the_stage_deadline(
    served, redis_process: RedisProcess
):
    retriever, dataset = served
    publish_dataset(redis_process.url, NAMESPACE, dataset)
    seen = dataset.interactions.user_ids[0]
    async with gateway(retriever, redis_process) as client:
        before = await recommend(client, seen)
        redis_process.pause()
        try:
            start = time.perf_counter()
            during = await recommend(client, seen)
            elapsed = time.perf_counter() - start
        finally:
            redis_process.resume()
        assert STALE in during["degraded"] and "deadline_exceeded" not in during["degraded"]
        assert ids(during) == ids(before)
        assert during["timings_ms"]["feature_user"] < DEADLINE_MS
        assert elapsed < 2.0
        fresh = await recommend(client, seen)
        assert fresh["degraded"] == []
