"""The /recommend pipeline in-process: real tiny retriever, real Redis, real tiny ranker.

Dependencies that must be down are really down (a closed port); slowness is injected with
small wrappers around the real clients, the only stand-ins here.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import shutil
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import numpy as np
import pytest

from services.common.settings import GatewaySettings
from services.gateway.ranker_choice import tuned_rank_weight
from services.gateway.sources import RemoteCandidates
from services.gateway.wiring import Artifacts, load_artifacts
from tandem.testing.processes import free_port
from tandem.testing.stack import ITEM_DIM, make_tiny_ranker_run, publish_dataset
from tests.fixtures.services import gateway_client


@pytest.fixture(scope="session")
def gateway_artifacts(
    tiny_retriever_run: Path, tiny_llm_dir: Path, tiny_lora_dir: Path, tmp_path_factory
) -> Artifacts:
    from ranker.core import Ranker
    from retriever.core import Retriever

    retriever = Retriever.load(tiny_retriever_run)
    run = make_tiny_ranker_run(
        tmp_path_factory.mktemp("ranker") / "tiny-ranker", tiny_llm_dir, tiny_lora_dir,
        item_dim=ITEM_DIM, user_dim=retriever.dim, dataset=retriever.manifest.dataset,
    )  # fmt: skip
    return Artifacts(retriever, Ranker.load(run, tiny_llm_dir), run, tuned_rank_weight=0.5)


@pytest.fixture(scope="session")
def served_dataset(tiny_retriever_run: Path, gateway_artifacts: Artifacts):
    from tandem.data import Dataset

    root = tiny_retriever_run.resolve().parents[2]
    return Dataset.load(root / gateway_artifacts.retriever.manifest.dataset / "data")


@pytest.fixture
def published(redis_url: str, namespace: str, served_dataset) -> int:
    return publish_dataset(redis_url, namespace, served_dataset)


class SlowStore:
    """The real feature-store client, behind an injected delay."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    async def read_user(self, user_id: str):
        await asyncio.sleep(self.delay_s)
        return await self.inner.read_user(user_id)

    async def read_items(self, version: int, item_ids: Sequence[str]):
        return await self.inner.read_items(version, item_ids)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


class SlowBackend:
    """The real ranker backend, behind an injected delay."""

    name = "slow"

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    async def start(self) -> None:
        await self.inner.start()

    async def score(self, prompts, *, request_id=None, deadline_s=None):
        await asyncio.sleep(self.delay_s)
        return await self.inner.score(prompts, request_id=request_id, deadline_s=deadline_s)

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def close(self) -> None:
        await self.inner.close()


def with_backend(artifacts: Artifacts, backend) -> Artifacts:
    ranker = copy.copy(artifacts.ranker)
    ranker.backend = backend
    return dataclasses.replace(artifacts, ranker=ranker)


def gateway(
    artifacts: Artifacts, redis_url: str, namespace: str, *, store=None, source=None, **overrides
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    settings = GatewaySettings(
        _env_file=None, redis_url=redis_url, namespace=namespace, **overrides
    )
    return gateway_client(settings, artifacts, store=store, source=source)


def first_user(dataset) -> tuple[str, list[str]]:
    user = dataset.interactions.user_ids[0]
    history = dataset.catalog.id_of(dataset.interactions.sequences()[0].tolist())
    return user, history


async def recommend(client: httpx.AsyncClient, **body) -> dict:
    response = await client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_known_user_gets_ranked_items_through_every_stage(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, history = first_user(served_dataset)
    async with gateway(gateway_artifacts, redis_url, namespace) as client:
        out = await recommend(client, user_id=user, k=7)
    assert out["degraded"] == [] and out["warnings"] == []
    assert [item["rank"] for item in out["items"]] == list(range(1, 8))
    assert not {item["item_id"] for item in out["items"]} & set(history)
    assert all(item["title"] for item in out["items"])
    scores = [item["score"] for item in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert set(out["timings_ms"]) == {
        "feature_user", "retrieval", "feature_items", "prompt", "ranker", "total",
    }  # fmt: skip
    assert out["model"]["feature_version"] == published
    assert out["model"]["ranker_run"] == "tiny-ranker" and out["model"]["backend"] == "inprocess"


async def test_rank_weight_zero_keeps_the_retriever_order(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, _ = first_user(served_dataset)
    async with gateway(gateway_artifacts, redis_url, namespace, rank_weight=0.0) as client:
        out = await recommend(client, user_id=user, k=10)
    assert [item["retrieval_rank"] for item in out["items"]] == list(range(1, 11))


async def test_rank_weight_one_follows_the_ranker_alone(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    from ranker.prompts import PromptInput, PromptItem

    user, history = first_user(served_dataset)
    retriever, ranker = gateway_artifacts.retriever, gateway_artifacts.ranker
    async with gateway(gateway_artifacts, redis_url, namespace, rank_weight=1.0) as client:
        out = await recommend(client, user_id=user, k=20, history=history)
        pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
        candidates, vector = retriever.retrieve_with_user_vector(history, 20)
        ids = [c for c, _ in candidates]
        records = await pipeline.items.store.read_items(published, ids + history[-20:])
        item = lambda i: PromptItem(records[i].title, records[i].caption, records[i].embedding)  # noqa: E731
        expected = await ranker.score(
            PromptInput(
                history=[item(i) for i in history[-20:]],
                candidates=[item(i) for i in ids],
                preference="Enjoys long dramas.",
                user_embedding=vector,
            )
        )
    by_ranker = [ids[i] for i in np.argsort(-expected, kind="stable")]
    assert [item["item_id"] for item in out["items"]] == by_ranker


def tuned_copy(run: Path, folder: Path, weight: float) -> Path:
    """A copy of a ranker run whose manifest records a tuned fusion weight."""
    from tandem.artifacts import Manifest

    shutil.copytree(run, folder)
    manifest = Manifest.read(folder)
    manifest.metrics = {**manifest.metrics, "rank_weight": weight}
    manifest.write(folder)
    return folder


def test_a_ranker_tuned_to_weight_zero_is_not_loaded_unless_forced(
    gateway_artifacts, tiny_retriever_run, tiny_llm_dir, tmp_path
):
    run = tuned_copy(gateway_artifacts.ranker_run, tmp_path / "tuned-ranker", 0.0)
    settings = GatewaySettings(
        _env_file=None, retriever_run=tiny_retriever_run, ranker_run=run, llm_dir=tiny_llm_dir
    )
    skipped = load_artifacts(settings)
    assert skipped.ranker is None and skipped.tuned_rank_weight == 0.0
    assert load_artifacts(settings.model_copy(update={"rank_weight": 0.3})).ranker is not None


async def test_the_run_tuned_weight_is_served_unless_one_is_configured(
    gateway_artifacts, served_dataset, published, redis_url, namespace, tmp_path
):
    run = tuned_copy(gateway_artifacts.ranker_run, tmp_path / "tuned-ranker", 0.0)
    tuned = dataclasses.replace(gateway_artifacts, tuned_rank_weight=tuned_rank_weight(run))
    assert tuned.tuned_rank_weight == 0.0 and tuned_rank_weight(None) is None
    user, _ = first_user(served_dataset)
    async with gateway(tuned, redis_url, namespace) as client:
        out = await recommend(client, user_id=user, k=10)
    assert out["model"]["rank_weight"] == 0.0 and out["model"]["backend"] == "none"
    assert "ranker" not in out["timings_ms"]  # weight 0: the ranker would change nothing
    assert [item["retrieval_rank"] for item in out["items"]] == list(range(1, 11))
    async with gateway(tuned, redis_url, namespace, rank_weight=0.7) as client:
        forced = await recommend(client, user_id=user, k=10)
    assert forced["model"]["rank_weight"] == 0.7 and "ranker" in forced["timings_ms"]
    async with gateway(gateway_artifacts, redis_url, namespace) as client:
        assert (await recommend(client, user_id=user, k=10))["model"]["rank_weight"] == 0.5


async def test_a_ranker_without_a_validation_tuned_weight_is_not_served_by_default(
    gateway_artifacts, tiny_retriever_run, tiny_llm_dir, tmp_path
):
    """Defaults never harm: no proof of gain on validation, no ranker (unless forced)."""
    from tandem.artifacts import Manifest

    run = tuned_copy(gateway_artifacts.ranker_run, tmp_path / "untuned-ranker", 0.0)
    manifest = Manifest.read(run)
    manifest.metrics = {}
    manifest.write(run)
    settings = GatewaySettings(
        _env_file=None, retriever_run=tiny_retriever_run, ranker_run=run, llm_dir=tiny_llm_dir
    )
    untuned = load_artifacts(settings)
    assert untuned.ranker is None and "no validation-tuned weight" in untuned.ranker_note
    forced = load_artifacts(settings.model_copy(update={"rank_weight": 0.4}))
    assert forced.ranker is not None and "configured" in forced.ranker_note


class RecordingBackend(SlowBackend):
    """The real backend, keeping what it answered (observation only, no delay)."""

    def __init__(self, inner):
        super().__init__(inner, 0.0)
        self.answers: list[np.ndarray] = []
        self.prompts: list = []

    async def score(self, prompts, *, request_id=None, deadline_s=None):
        answers = await super().score(prompts, request_id=request_id, deadline_s=deadline_s)
        self.prompts.extend(prompts)
        self.answers.extend(answers)
        return answers


async def test_a_head_ranker_run_is_served_in_process_without_an_llm(
    served_dataset, published, redis_url, namespace, tiny_retriever_run, tiny_llm_dir, tmp_path
):
    """A head run (ranker.head) loads with no LLM folder at all and its scores order the
    answer at weight 1, through the same prompt and ranker stages as the LLM."""
    from ranker.head_train import HeadTrainConfig, Teacher, train_head
    from ranker.inputs import InputRuns, load_inputs
    from ranker.llm import load_tokenizer
    from ranker.prompts import PromptTokenizer

    inputs = load_inputs(served_dataset, InputRuns(retriever=tiny_retriever_run))
    run = tmp_path / "head-1"
    train_head(inputs, [Teacher(inputs, 3)], PromptTokenizer(load_tokenizer(tiny_llm_dir)), run,
               HeadTrainConfig(epochs=2))  # fmt: skip
    settings = GatewaySettings(
        _env_file=None, retriever_run=tiny_retriever_run, ranker_run=run,
        llm_dir=tmp_path / "no-llm-here", rank_weight=1.0,
    )  # fmt: skip
    artifacts = load_artifacts(settings)
    recorder = RecordingBackend(artifacts.ranker.backend)
    user, _ = first_user(served_dataset)
    async with gateway(
        with_backend(artifacts, recorder), redis_url, namespace, rank_weight=1.0
    ) as client:
        out = await recommend(client, user_id=user, k=20)
    assert out["degraded"] == [] and {"prompt", "ranker"} <= set(out["timings_ms"])
    assert out["model"]["ranker_run"] == "head-1" and out["model"]["backend"] == "inprocess"
    (scores,) = recorder.answers
    by_head = np.argsort(-scores, kind="stable") + 1  # retrieval ranks, best first
    assert by_head.tolist() != list(range(1, 21))  # the head did re-order
    assert [item["retrieval_rank"] for item in out["items"]] == by_head.tolist()
    # The run's tables (co-visitation and EASE: the rows' last 3 columns) read the user's
    # whole stored history, however few items the prompt shows.
    async with gateway(
        with_backend(artifacts, recorder), redis_url, namespace, rank_weight=1.0,
        prompt_history=2,
    ) as client:  # fmt: skip
        await recommend(client, user_id=user, k=20)
    shown_20, shown_2 = (p.soft_vectors[:, -3:] for p in recorder.prompts)
    assert len(first_user(served_dataset)[1]) > 5
    np.testing.assert_allclose(shown_2, shown_20, atol=1e-5)


async def test_a_demographic_head_reads_the_users_attributes_from_the_store(
    served_dataset, redis_url, namespace, tiny_retriever_run, tiny_llm_dir, tmp_path
):
    """A head trained with ``demographics`` gets the user's gender / age / occupation from the
    feature store's user record: its group-lift columns are not the zeros of an unknown user."""
    from ranker.demographics import WIDTH
    from ranker.head_train import HeadTrainConfig, Teacher, train_head
    from ranker.inputs import InputRuns, load_inputs
    from ranker.llm import load_tokenizer
    from ranker.prompts import PromptTokenizer
    from tandem.data.users import UserProfile, UserProfiles

    ids = served_dataset.interactions.user_ids
    dataset = dataclasses.replace(
        served_dataset,
        users=UserProfiles.from_profiles(
            UserProfile(u, age=18 + 9 * (n % 5), gender="MF"[n % 2], occupation=f"job{n % 3}")
            for n, u in enumerate(ids)
        ),
    )
    publish_dataset(redis_url, namespace, dataset)
    inputs = load_inputs(dataset, InputRuns(retriever=tiny_retriever_run))
    run = tmp_path / "head-d"
    train_head(inputs, [Teacher(inputs, 3)], PromptTokenizer(load_tokenizer(tiny_llm_dir)), run,
               HeadTrainConfig(epochs=2, demographics=True))  # fmt: skip
    settings = GatewaySettings(
        _env_file=None, retriever_run=tiny_retriever_run, ranker_run=run,
        llm_dir=tmp_path / "no-llm-here", rank_weight=1.0,
    )  # fmt: skip
    recorder = RecordingBackend(load_artifacts(settings).ranker.backend)
    artifacts = with_backend(load_artifacts(settings), recorder)
    async with gateway(artifacts, redis_url, namespace, rank_weight=1.0) as client:
        out = await recommend(client, user_id=ids[0], k=20)
    assert out["degraded"] == []
    (prompt,) = recorder.prompts
    assert np.abs(prompt.soft_vectors[:, -WIDTH:]).sum() > 0


async def test_given_history_replaces_the_stored_one_and_unknown_ids_are_reported(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, _ = first_user(served_dataset)
    other = served_dataset.catalog.id_of(served_dataset.interactions.sequences()[5].tolist())
    async with gateway(gateway_artifacts, redis_url, namespace) as client:
        out = await recommend(client, user_id=user, history=[*other, "no-such-item"], k=20)
    returned = {item["item_id"] for item in out["items"]}
    assert not returned & set(other)
    assert any("no-such-item" in w for w in out["warnings"])
    assert out["degraded"] == []


async def test_exclude_is_honoured_and_unknown_excludes_are_warned(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, _ = first_user(served_dataset)
    async with gateway(gateway_artifacts, redis_url, namespace, rank_weight=0.0) as client:
        before = await recommend(client, user_id=user, k=5)
        banned = [item["item_id"] for item in before["items"][:3]]
        after = await recommend(client, user_id=user, k=5, exclude=[*banned, "ghost"])
    assert not {item["item_id"] for item in after["items"]} & set(banned)
    assert any("ghost" in w for w in after["warnings"])


async def test_unknown_user_without_history_gets_popular_items_as_cold_start(
    gateway_artifacts, published, redis_url, namespace
):
    async with gateway(gateway_artifacts, redis_url, namespace) as client:
        out = await recommend(client, user_id="never-seen", k=5)
        metrics = (await client.get("/metrics")).text
    popular = [i for i, _ in gateway_artifacts.retriever.popular(5)]
    assert out["degraded"] == ["cold_start"]
    assert [item["item_id"] for item in out["items"]] == popular
    assert 'tandem_fallbacks_total{reason="cold_start",variant="default"} 1.0' in metrics


async def test_feature_store_down_serves_retriever_order_or_popularity(
    gateway_artifacts, served_dataset, namespace
):
    user, history = first_user(served_dataset)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    async with gateway(gateway_artifacts, closed, namespace) as client:
        with_history = await recommend(client, user_id=user, history=history, k=10)
        without = await recommend(client, user_id=user, k=10)
        ready = await client.get("/readyz")
    assert with_history["degraded"] == ["feature_store_unavailable"]
    assert [i["retrieval_rank"] for i in with_history["items"]] == list(range(1, 11))
    assert "ranker" not in with_history["timings_ms"]
    assert without["degraded"] == ["feature_store_unavailable"]
    popular = [i for i, _ in gateway_artifacts.retriever.popular(10)]
    assert [i["item_id"] for i in without["items"]] == popular
    assert ready.status_code == 503 and ready.json()["checks"]["feature_store"] is False


async def test_retrieval_down_serves_popular_items_without_history(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, history = first_user(served_dataset)
    source = RemoteCandidates(f"http://127.0.0.1:{free_port()}")
    async with gateway(gateway_artifacts, redis_url, namespace, source=source) as client:
        out = await recommend(client, user_id=user, k=10)
        ready = await client.get("/readyz")
    assert out["degraded"] == ["retrieval_unavailable"]
    assert not {item["item_id"] for item in out["items"]} & set(history)
    assert len(out["items"]) == 10
    assert ready.json()["checks"]["retrieval"] is False


async def test_ranker_down_serves_retriever_order(
    gateway_artifacts, served_dataset, published, redis_url, namespace, tiny_llm_dir
):
    from ranker.backends.vllm import VLLMBackend, VLLMConfig

    user, _ = first_user(served_dataset)
    down = VLLMBackend(
        VLLMConfig(base_url=f"http://127.0.0.1:{free_port()}", model_dir=tiny_llm_dir)
    )
    artifacts = with_backend(gateway_artifacts, down)
    async with gateway(artifacts, redis_url, namespace, ranker_retry_s=60) as client:
        out = await recommend(client, user_id=user, k=10)
        metrics = (await client.get("/metrics")).text
    assert out["degraded"] == ["ranker_unavailable"]
    assert [i["retrieval_rank"] for i in out["items"]] == list(range(1, 11))
    assert 'tandem_fallbacks_total{reason="ranker_unavailable",variant="default"} 1.0' in metrics


class BuggyBackend(SlowBackend):
    """A backend with a genuine bug (not a typed ranker error)."""

    async def score(self, prompts, *, request_id=None, deadline_s=None):
        raise ZeroDivisionError("a bug, not an outage")


async def test_a_ranker_bug_is_a_500_not_a_disguised_fallback(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, _ = first_user(served_dataset)
    buggy = with_backend(gateway_artifacts, BuggyBackend(gateway_artifacts.ranker.backend, 0.0))
    async with gateway(buggy, redis_url, namespace) as client:
        response = await client.post("/recommend", json={"user_id": user, "k": 5})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "ZeroDivisionError" not in response.text  # no internals leave the service
    assert 'tandem_fallbacks_total{reason="ranker_unavailable",variant="default"} 0.0' in metrics
    assert "tandem_event_loop_lag_seconds_count" in metrics


async def test_slow_ranker_times_out_within_its_deadline(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, _ = first_user(served_dataset)
    slow = with_backend(gateway_artifacts, SlowBackend(gateway_artifacts.ranker.backend, 5.0))
    async with gateway(slow, redis_url, namespace, ranker_deadline_ms=150) as client:
        start = time.perf_counter()
        out = await recommend(client, user_id=user, k=10)
        elapsed = time.perf_counter() - start
    assert out["degraded"] == ["ranker_timeout"]
    assert elapsed < 1.5
    assert [i["retrieval_rank"] for i in out["items"]] == list(range(1, 11))


async def test_overall_deadline_cuts_a_slow_stage_and_says_so(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    from feature_store.client import FeatureStoreClient

    user, history = first_user(served_dataset)
    store = SlowStore(FeatureStoreClient(redis_url, namespace), delay_s=5.0)
    async with gateway(
        gateway_artifacts, redis_url, namespace, store=store, deadline_ms=200,
        feature_store_deadline_ms=1000,
    ) as client:  # fmt: skip
        start = time.perf_counter()
        out = await recommend(client, user_id=user, history=history, k=5)
        elapsed = time.perf_counter() - start
    assert "deadline_exceeded" in out["degraded"]
    assert elapsed < 1.5 and len(out["items"]) == 5


async def test_ranker_metrics_and_build_info_are_exported(
    gateway_artifacts, served_dataset, published, redis_url, namespace
):
    user, _ = first_user(served_dataset)
    async with gateway(gateway_artifacts, redis_url, namespace) as client:
        await recommend(client, user_id=user)
        text = (await client.get("/metrics")).text
    assert "tandem_ranker_hit_position_count 1.0" in text
    assert 'tandem_stage_duration_seconds_count{stage="ranker",variant="default"} 1.0' in text
    assert 'tandem_ranker_duration_seconds_count{variant="default"} 1.0' in text
    assert 'backend="inprocess"' in text and "tandem_build_info{" in text
    assert "tandem_feature_store_read_seconds" in text
    assert 'route="/recommend"' in text


async def test_bad_requests_are_problems_and_keys_are_enforced(
    gateway_artifacts, published, redis_url, namespace
):
    async with gateway(gateway_artifacts, redis_url, namespace, api_keys="s3cret") as client:
        missing = await client.post("/recommend", json={"user_id": "u0"})
        assert missing.status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        for body, needle in (
            ({"user_id": "u0", "k": 21}, "k"),
            ({"user_id": "u\x00"}, "user_id"),
            ({"user_id": "u0", "history": ["i1"] * 201}, "history"),
            ({"user_id": "u0", "exclude": ["i1"] * 201}, "exclude"),
            ({"user_id": "u0", "surprise": True}, "surprise"),
            ({}, "user_id"),
        ):
            response = await client.post("/recommend", json=body, headers=headers)
            assert response.status_code == 422, body
            assert response.headers["content-type"] == "application/problem+json"
            assert needle in response.json()["detail"]
