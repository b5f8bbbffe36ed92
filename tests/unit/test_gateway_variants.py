"""Ranker variants in the gateway: real tiny retriever and ranker, real Redis, the app in-process.

Users are split by the stored split, answers name their variant, a promote or rollback in Redis
reaches the gateway within seconds with no failed request, shadows score off the response path
(a hanging one never slows an answer), and the answer hook sees every answer. The only stand-ins
are backends that hang or fail, to inject those faults.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from feature_store.splits import SplitStore
from ranker.backends.base import RankerUnavailable
from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from services.common.variants import VariantsConfig
from services.gateway.pipeline import AnswerHook
from services.gateway.wiring import Artifacts, RankerArtifacts, build_variants, load_artifacts
from tandem.priority import BACKGROUND_NICE, thread_niceness
from tandem.testing.stack import ITEM_DIM, make_tiny_ranker_run, publish_dataset
from tests.fixtures.services import gateway_client

USERS = [str(n) for n in range(40)]


@pytest.fixture(scope="module")
def tiny_ranker(
    tiny_retriever_run: Path, tiny_llm_dir: Path, tiny_lora_dir: Path, tmp_path_factory
):
    from ranker.core import Ranker
    from retriever.core import Retriever

    retriever = Retriever.load(tiny_retriever_run)
    run = make_tiny_ranker_run(
        tmp_path_factory.mktemp("variants") / "tiny-ranker", tiny_llm_dir, tiny_lora_dir,
        item_dim=ITEM_DIM, user_dim=retriever.dim, dataset=retriever.manifest.dataset,
    )  # fmt: skip
    return retriever, Ranker.load(run, tiny_llm_dir), run


@pytest.fixture
def published(redis_url: str, namespace: str, tiny_retriever_run: Path, tiny_ranker) -> list[str]:
    from tandem.data import Dataset

    retriever = tiny_ranker[0]
    root = tiny_retriever_run.resolve().parents[2]
    dataset = Dataset.load(root / retriever.manifest.dataset / "data")
    publish_dataset(redis_url, namespace, dataset)
    return list(dataset.interactions.user_ids)


class HangingBackend:
    """Never answers: a shadow stuck on a dead server."""

    name = "hanging"

    async def start(self) -> None: ...

    async def score(self, prompts, *, request_id=None, deadline_s=None):
        await asyncio.Event().wait()

    async def ready(self) -> bool:
        return True

    async def close(self) -> None: ...


class BrokenBackend(HangingBackend):
    async def score(self, prompts, *, request_id=None, deadline_s=None):
        raise RankerUnavailable("injected: connection refused")


def on(ranker, backend):
    other = copy.copy(ranker)
    other.backend = backend
    return other


def artifacts_for(tiny_ranker, **variants: tuple[object, float]) -> Artifacts:
    """Artifacts whose variants are (ranker, configured rank_weight) pairs."""
    retriever, ranker, run = tiny_ranker
    loaded = {
        name: RankerArtifacts(r, run, 0.5, rank_weight=weight)
        for name, (r, weight) in variants.items()
    }
    return Artifacts(retriever, ranker, run, 0.5, variants=loaded)


def config(*variants: dict, salt: str = "s") -> VariantsConfig:
    return VariantsConfig.model_validate({"salt": salt, "variants": list(variants)})


def gateway(
    artifacts: Artifacts,
    variants: VariantsConfig,
    redis_url: str,
    namespace: str,
    on_answer: AnswerHook | None = None,
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    settings = GatewaySettings(
        _env_file=None, redis_url=redis_url, namespace=namespace, variants=variants,
        variants_poll_s=0.2,
    )  # fmt: skip
    return gateway_client(settings, artifacts, on_answer=on_answer)


async def recommend(client: httpx.AsyncClient, user: str, k: int = 10) -> dict:
    response = await client.post("/recommend", json={"user_id": user, "k": k})
    assert response.status_code == 200, response.text
    return response.json()


def metric(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def wait_for(check, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_each_answer_names_the_variant_its_user_is_assigned_to(
    tiny_ranker, published, redis_url, namespace
):
    ranker = tiny_ranker[1]
    variants = config({"name": "ranked", "share": 0.5}, {"name": "plain", "share": 0.5})
    artifacts = artifacts_for(tiny_ranker, ranked=(ranker, 0.5), plain=(ranker, 0.0))
    async with gateway(artifacts, variants, redis_url, namespace) as client:
        answers = {u: await recommend(client, u) for u in published[:20]}
        text = (await client.get("/metrics")).text
    split = variants.split()
    assert {u: a["model"]["variant"] for u, a in answers.items()} == {
        u: split.assign(u) for u in answers
    }
    assert {a["model"]["variant"] for a in answers.values()} == {"ranked", "plain"}
    for answer in answers.values():
        ranked = answer["model"]["variant"] == "ranked"
        assert answer["model"]["backend"] == ("inprocess" if ranked else "none")
        assert ("ranker" in answer["timings_ms"]) == ranked
    n_ranked = sum(a["model"]["variant"] == "ranked" for a in answers.values())
    total = 'tandem_stage_duration_seconds_count{stage="total",variant='
    assert metric(text, total + '"ranked"}') == n_ranked
    assert metric(text, total + '"plain"}') == 20 - n_ranked
    assert metric(text, "tandem_variant_split_version") == 1
    assert 'tandem_variant_share{variant="plain"} 0.5' in text


async def test_a_promote_and_a_rollback_reach_the_gateway_within_seconds_without_failures(
    tiny_ranker, published, redis_url, namespace
):
    ranker = tiny_ranker[1]
    variants = config({"name": "old", "share": 0.8}, {"name": "new", "share": 0.2})
    artifacts = artifacts_for(tiny_ranker, old=(ranker, 0.5), new=(ranker, 0.0))
    users = published[:12]
    failures: list[str] = []
    seen: dict[str, str] = {}

    async def load(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for user in users:
                response = await client.post("/recommend", json={"user_id": user, "k": 5})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    seen[user] = response.json()["model"]["variant"]

    async with gateway(artifacts, variants, redis_url, namespace) as client:
        stop = asyncio.Event()
        traffic = [asyncio.create_task(load(client, stop)) for _ in range(3)]
        await asyncio.sleep(0.3)
        runner = CliRunner()
        where = ["--redis-url", redis_url, "--namespace", namespace]
        out = await asyncio.to_thread(
            runner.invoke, create_cli(), ["variants", "promote", "new", *where]
        )
        assert out.exit_code == 0, out.output
        seen.clear()
        took = await wait_for(lambda: _all(seen, users, "new"))
        out = await asyncio.to_thread(runner.invoke, create_cli(), ["variants", "rollback", *where])
        assert out.exit_code == 0, out.output
        seen.clear()
        back = await wait_for(lambda: _matches(seen, users, variants))
        stop.set()
        await asyncio.gather(*traffic)
    assert not failures
    assert took < 5 and back < 5


def create_cli():
    from tandem.cli import app

    return app


async def _all(seen: dict[str, str], users: Sequence[str], name: str) -> bool:
    return len(seen) == len(users) and set(seen.values()) == {name}


async def _matches(seen: dict[str, str], users: Sequence[str], variants: VariantsConfig) -> bool:
    split = variants.split()
    return len(seen) == len(users) and all(seen[u] == split.assign(u) for u in users)


async def test_a_split_naming_an_unknown_variant_is_refused_and_the_last_one_serves(
    tiny_ranker, published, redis_url, namespace
):
    import redis

    ranker = tiny_ranker[1]
    variants = config({"name": "a", "share": 1.0})
    async with gateway(artifacts_for(tiny_ranker, a=(ranker, 0.5)), variants, redis_url,
                       namespace) as client:  # fmt: skip
        store = SplitStore.connect(redis_url, namespace)
        doc = store.read()
        store.close()
        assert doc is not None
        alien = doc.active.model_copy(update={"version": 7, "control": "zz", "variants": (
            doc.active.variants[0].model_copy(update={"name": "zz"}),)})  # fmt: skip
        client_ = redis.Redis.from_url(redis_url)
        client_.set(store.key, doc.model_copy(update={"active": alien}).model_dump_json())
        client_.close()

        async def refused() -> bool:
            return metric((await client.get("/metrics")).text, "tandem_variant_split_errors") > 0

        await wait_for(refused)
        assert (await recommend(client, published[0]))["model"]["variant"] == "a"


async def test_a_hanging_shadow_never_delays_or_changes_the_answer(
    tiny_ranker, published, redis_url, namespace
):
    ranker = tiny_ranker[1]
    users = published[:6]
    plain = config({"name": "served", "share": 1.0})
    shadowed = config(
        {"name": "served", "share": 1.0},
        {"name": "stuck", "shadow": True, "deadline_ms": 1500, "concurrency": 1},
    )
    async with gateway(artifacts_for(tiny_ranker, served=(ranker, 0.5)), plain, redis_url,
                       namespace) as client:  # fmt: skip
        expected = {u: (await recommend(client, u))["items"] for u in users}
    artifacts = artifacts_for(
        tiny_ranker, served=(ranker, 0.5), stuck=(on(ranker, HangingBackend()), 1.0)
    )
    async with gateway(artifacts, shadowed, redis_url, namespace) as client:
        start = time.perf_counter()
        answers = {u: await recommend(client, u) for u in users}
        elapsed = time.perf_counter() - start

        async def skipped() -> bool:  # the one slot is held by the hanging scoring
            text = (await client.get("/metrics")).text
            return (
                metric(text, 'tandem_shadow_requests_total{result="skipped",variant="stuck"}') == 5
            )

        await wait_for(skipped)

        async def timed_out() -> bool:
            text = (await client.get("/metrics")).text
            return metric(text, 'tandem_shadow_requests_total{result="timeout"') == 1

        await wait_for(timed_out)
    assert elapsed < 1.5  # six answers while the shadow hung for its whole 1.5 s deadline
    assert {u: a["items"] for u, a in answers.items()} == expected
    assert all(a["degraded"] == [] and a["model"]["variant"] == "served" for a in answers.values())


async def test_a_shadow_records_rank_agreement_and_latency_and_a_broken_one_only_counts(
    tiny_ranker, published, redis_url, namespace
):
    ranker = tiny_ranker[1]
    variants = config(
        {"name": "served", "share": 1.0},
        {"name": "alone", "shadow": True, "concurrency": 4},
        {"name": "twin", "shadow": True, "concurrency": 4},
        {"name": "broken", "shadow": True},
    )
    artifacts = artifacts_for(
        tiny_ranker, served=(ranker, 0.5), alone=(ranker, 1.0), twin=(ranker, 0.5),
        broken=(on(ranker, BrokenBackend()), 1.0),
    )  # fmt: skip
    async with gateway(artifacts, variants, redis_url, namespace) as client:
        answers = [await recommend(client, u) for u in published[:4]]

        async def scored() -> bool:
            text = (await client.get("/metrics")).text
            ok = metric(text, 'tandem_shadow_requests_total{result="scored",variant="alone"}')
            bad = metric(text, 'tandem_shadow_requests_total{result="error",variant="broken"}')
            return ok == 4 and bad == 4

        await wait_for(scored, 30)
        text = (await client.get("/metrics")).text
    assert metric(text, 'tandem_shadow_kendall_tau_count{variant="alone"}') == 4
    # the same configuration as the one served orders the candidates the same way
    assert metric(text, 'tandem_shadow_kendall_tau_sum{variant="twin"}') == 4
    assert -4 <= metric(text, 'tandem_shadow_kendall_tau_sum{variant="alone"}') < 4
    assert metric(text, 'tandem_shadow_duration_seconds_count{variant="alone"}') == 4
    assert all(a["degraded"] == [] for a in answers)


async def test_the_answer_hook_sees_each_request_id_variant_and_items(
    tiny_ranker, published, redis_url, namespace
):
    ranker = tiny_ranker[1]
    seen: list[tuple[str, str, str, list[str]]] = []

    async def record(request_id: str, user: str, variant: str, item_ids: Sequence[str]) -> None:
        seen.append((request_id, user, variant, list(item_ids)))

    variants = config({"name": "a", "share": 0.5}, {"name": "b", "share": 0.5})
    artifacts = artifacts_for(tiny_ranker, a=(ranker, 0.5), b=(ranker, 0.0))
    async with gateway(artifacts, variants, redis_url, namespace, on_answer=record) as client:
        answers = [await recommend(client, u, k=5) for u in published[:6]]
        await wait_for(lambda: asyncio.sleep(0, len(seen) == 6))
    assert seen == [
        (a["request_id"], a["user_id"], a["model"]["variant"], [i["item_id"] for i in a["items"]])
        for a in answers
    ]


def test_variants_are_checked_at_start_up_with_a_clear_message(
    tiny_retriever_run: Path, tiny_llm_dir: Path, tiny_ranker, tmp_path: Path
):
    from tandem.cli import app

    run = tiny_ranker[2]
    base = {"retriever_run": tiny_retriever_run, "llm_dir": tiny_llm_dir, "rank_weight": 0.5}
    missing = config({"name": "a", "share": 1.0, "run": str(tmp_path / "no-such-run")})
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        load_artifacts(GatewaySettings(_env_file=None, variants=missing, **base))
    unfit = config(
        {"name": "a", "share": 1.0, "run": str(run), "prompt": {"candidate_signals": True}}
    )
    with pytest.raises(ValueError, match="candidate projector"):
        load_artifacts(GatewaySettings(_env_file=None, variants=unfit, **base))
    two = config({"name": "a", "share": 0.5, "run": str(run)},
                 {"name": "b", "share": 0.5, "run": str(run), "rank_weight": 0.9})  # fmt: skip
    loaded = load_artifacts(GatewaySettings(_env_file=None, variants=two, **base))
    assert loaded.variants["a"].ranker is loaded.variants["b"].ranker  # one ranker, loaded once
    shadowed = config({"name": "a", "share": 1.0, "run": str(run)},
                      {"name": "s", "shadow": True, "run": str(run)})  # fmt: skip
    loaded = load_artifacts(GatewaySettings(_env_file=None, variants=shadowed, **base))
    assert loaded.variants["a"].ranker is not loaded.variants["s"].ranker  # a shadow's own copy
    bad = '{"variants": [{"name": "a", "share": 0.7}, {"name": "a", "share": 0.3}]}'
    out = CliRunner().invoke(app, ["serve", "--role", "gateway"], env={"TANDEM_VARIANTS": bad})
    assert out.exit_code == 2 and "variant names must be unique" in out.output
    assert "Traceback" not in out.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
async def test_a_shadow_renders_and_scores_at_the_lowest_priority(
    tiny_retriever_run: Path, tiny_llm_dir: Path, tiny_ranker, redis_url: str, namespace: str
):
    run = tiny_ranker[2]
    variants = config({"name": "a", "share": 1.0, "run": str(run)},
                      {"name": "s", "shadow": True, "run": str(run)})  # fmt: skip
    settings = GatewaySettings(
        _env_file=None, retriever_run=tiny_retriever_run, llm_dir=tiny_llm_dir, rank_weight=0.5,
        variants=variants, redis_url=redis_url, namespace=namespace,
    )  # fmt: skip
    built = build_variants(settings, GatewayMetrics(), load_artifacts(settings))
    base = thread_niceness()
    loop = asyncio.get_running_loop()
    seen = {}
    for name in ("a", "s"):
        variant = built.by_name[name]
        await variant.ranker.load()
        forward = variant.ranker.backend._executor  # the model's forward thread
        seen[name] = (
            await loop.run_in_executor(variant.prompt.pool, thread_niceness),
            await loop.run_in_executor(forward, thread_niceness),
        )
        await variant.ranker.close()
        variant.prompt.close()
    assert seen["a"] == (base, min(base + settings.ranker_nice, 19))  # served prompts: as is
    assert seen["s"] == (min(base + BACKGROUND_NICE, 19),) * 2
