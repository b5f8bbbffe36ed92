"""The vLLM backend against a REAL vLLM CPU server on the tiny random Llama (+ LoRA).

Tolerance: the server computes in bf16, the in-process reference in fp32, so letter
log-probabilities agree within ``BF16_TOL`` nats; rankings must agree on every pair of
candidates whose reference scores are more than ``2 * BF16_TOL`` apart (closer pairs are ties
at bf16 precision).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ranker.adapters import AdapterStore, ServerAdapters
from ranker.backends.base import RankerUnavailable, RenderedPrompt
from ranker.backends.transformers import TransformersBackend, TransformersBackendConfig
from ranker.backends.vllm import AUTO, ModelMismatchError, VLLMBackend, VLLMConfig
from ranker.prompts import PromptConfig, PromptInput, PromptItem, PromptTokenizer, render_prompt
from tandem.testing.tiny_llm import make_tiny_llm, make_tiny_tokenizer

pytestmark = pytest.mark.integration

BF16_TOL = 0.05  # nats: bf16 server vs fp32 in-process, same prompts and adapter
TITLES = (
    "Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Twelve Monkeys", "Babe",
    "Dead Man Walking", "Richard III", "Seven", "The Usual Suspects", "Mighty Aphrodite",
    "Braveheart", "Taxi Driver", "Apollo 13", "Batman Forever", "Crimson Tide", "Desperado",
    "Star Wars", "Pulp Fiction", "Quiz Show", "Shawshank Redemption", "Clerks", "Ed Wood",
)  # fmt: skip


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def make_prompts(
    model_dir: Path, count: int = 4, candidates: int = 10, hybrid: bool = True, seed: int = 0
) -> list[RenderedPrompt]:
    """Real ranker prompts (chat template, history, letters); soft rows drawn like embeddings."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        table = handle.get_tensor("model.embed_tokens.weight").numpy()
    rng = np.random.default_rng(seed)
    tok = PromptTokenizer(_tokenizer(model_dir))
    config = PromptConfig(item_soft_tokens=hybrid)
    prompts = []
    for _ in range(count):
        picks = rng.choice(len(TITLES), size=6 + candidates, replace=False)
        items = [
            PromptItem(TITLES[i], embedding=np.zeros(4, dtype=np.float32) if hybrid else None)
            for i in picks
        ]
        layout = render_prompt(PromptInput(items[:6], items[6:]), config, tok)
        soft = None
        if layout.soft_positions:
            rows = rng.normal(0.0, table.std(), size=(len(layout.soft_positions), table.shape[1]))
            soft = rows.astype(np.float32)
        prompts.append(layout.with_soft_vectors(soft))
    return prompts


def as_embeddings(prompt: RenderedPrompt, model_dir: Path) -> RenderedPrompt:
    """The same text prompt with every 3rd token sent as its own embedding row."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        table = handle.get_tensor("model.embed_tokens.weight")
    positions = tuple(range(0, len(prompt.token_ids), 3))
    rows = table[[prompt.token_ids[p] for p in positions]].float().numpy()
    return RenderedPrompt(
        token_ids=prompt.token_ids,
        letter_token_ids=prompt.letter_token_ids,
        soft_positions=positions,
        soft_vectors=rows,
    )


async def started(server, model: str = AUTO, model_dir: Path | None = None, **overrides):
    """A started backend; these tests check scores, not latency, so the deadline is generous
    (a shared CI host can take seconds per batch) unless a test sets its own."""
    overrides.setdefault("deadline_s", 120.0)
    backend = VLLMBackend(
        VLLMConfig(
            base_url=server.url, model_dir=model_dir or server.model_dir, model=model, **overrides
        )
    )
    await backend.start()
    return backend


async def in_process(model_dir: Path, adapter: Path, prompts) -> list[np.ndarray]:
    backend = TransformersBackend(
        TransformersBackendConfig(llm_dir=model_dir, adapter_dir=adapter, precision="fp32")
    )
    return await asyncio.to_thread(backend.score_sync, prompts)


def assert_same_ranking(served: np.ndarray, reference: np.ndarray) -> None:
    gap = float(np.max(np.abs(served - reference)))
    assert gap <= BF16_TOL, f"scores differ by {gap:.4f} nats (> {BF16_TOL})"
    for i in range(len(reference)):
        for j in range(len(reference)):
            if reference[i] - reference[j] > 2 * BF16_TOL:
                assert served[i] > served[j], f"candidates {i} and {j} swapped"


async def test_start_checks_the_server_and_picks_the_newest_adapter(vllm_server):
    backend = await started(vllm_server)
    try:
        assert backend.model == "rec-v1"
        assert backend.max_model_len == vllm_server.config.max_model_len
        assert await backend.ready()
    finally:
        await backend.close()


async def test_text_and_embedding_prompts_score_the_same(vllm_server):
    prompts = make_prompts(vllm_server.model_dir, hybrid=False)
    backend = await started(vllm_server)
    try:
        by_ids = await backend.score(prompts)
        embedded = [as_embeddings(p, vllm_server.model_dir) for p in prompts]
        by_embeddings = await backend.score(embedded)
    finally:
        await backend.close()
    for a, b in zip(by_ids, by_embeddings, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)
        assert abs(float(np.exp(a).sum()) - 1.0) < 1e-4


async def test_vllm_scores_match_the_in_process_backend(vllm_server, vllm_models):
    prompts = make_prompts(vllm_server.model_dir, hybrid=True) + make_prompts(
        vllm_server.model_dir, count=2, hybrid=False, seed=1
    )
    backend = await started(vllm_server, model="rec-v1")
    try:
        served = await backend.score(prompts, request_id="it-match")
    finally:
        await backend.close()
    reference = await in_process(vllm_models.model_dir, vllm_models.adapter_v1, prompts)
    for s, r in zip(served, reference, strict=True):
        assert_same_ranking(s, r)


async def test_prefix_cache_serves_repeated_embedding_prompts(vllm_server):
    prompt = make_prompts(vllm_server.model_dir, count=1, hybrid=True, seed=3)[0]
    backend = await started(vllm_server)

    def hits() -> float:
        text = httpx.get(f"{vllm_server.url}/metrics", timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith("vllm:prefix_cache_hits_total"))
        return float(line.split()[-1])

    try:
        first = (await backend.score([prompt]))[0]
        before = hits()
        second = (await backend.score([prompt]))[0]
        assert hits() > before, "an identical embedded prompt should hit the prefix cache"
    finally:
        await backend.close()
    np.testing.assert_allclose(first, second, atol=1e-6)


async def test_hot_loaded_adapter_changes_scores_and_rollback_restores_them(
    vllm_server, vllm_models, tmp_path
):
    prompts = make_prompts(vllm_server.model_dir, count=2, hybrid=True, seed=5)
    backend = await started(vllm_server)  # model="auto": follows the newest rec-v{n}
    admin = ServerAdapters(vllm_server.url)
    try:
        v1 = await backend.score(prompts)
        store = AdapterStore(tmp_path / "adapters")
        name, path, _ = store.export(vllm_models.adapter_v2, at_least=len(admin.loaded()) + 1)
        assert name == "rec-v2"
        await asyncio.to_thread(admin.load, name, str(path))
        assert await backend.refresh_model() == "rec-v2"
        v2 = await backend.score(prompts)
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(v1, v2, strict=True)) > 0.01
        reference = await in_process(vllm_models.model_dir, vllm_models.adapter_v2, prompts)
        for s, r in zip(v2, reference, strict=True):
            assert_same_ranking(s, r)

        assert await asyncio.to_thread(admin.rollback) == ("rec-v2", "rec-v1")
        back = await backend.score(prompts)  # 404 on rec-v2 -> re-resolves to rec-v1
        assert backend.model == "rec-v1"
        for a, b in zip(v1, back, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    finally:
        if "rec-v2" in admin.loaded():
            admin.unload("rec-v2")
        admin.close()
        await backend.close()


def test_cli_exports_loads_and_rolls_back_an_adapter(vllm_server, vllm_models, tmp_path):
    from typer.testing import CliRunner

    from tandem.cli import app

    runner = CliRunner()
    common = ["--vllm-url", vllm_server.url]
    loaded = runner.invoke(
        app,
        ["vllm", "adapter", "load", str(vllm_models.adapter_v2), *common,
         "--store", str(tmp_path / "store")],
    )  # fmt: skip
    assert loaded.exit_code == 0, loaded.output
    assert "loaded rec-v2" in loaded.output
    listed = runner.invoke(app, ["vllm", "adapter", "list", *common, "--store", str(tmp_path)])
    assert listed.exit_code == 0 and "rec-v2" in listed.output
    rolled = runner.invoke(app, ["vllm", "adapter", "rollback", *common])
    assert rolled.exit_code == 0, rolled.output
    assert "unloaded rec-v2; now serving rec-v1" in rolled.output
    again = runner.invoke(app, ["vllm", "adapter", "rollback", *common])
    assert again.exit_code != 0 and "nothing to roll back to" in again.output


async def test_start_refuses_a_server_with_other_weights_or_tokenizer(vllm_server, tmp_path):
    other_weights = make_tiny_llm(tmp_path / "other-weights", seed=1)
    with pytest.raises(ModelMismatchError, match="other weights"):
        await started(vllm_server, model_dir=other_weights)

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(vllm_server.model_dir, other_tokenizer)
    for file in other_tokenizer.glob("tokenizer*"):
        file.unlink()
    make_tiny_tokenizer(vocab_size=700).save_pretrained(other_tokenizer)
    with pytest.raises(ModelMismatchError, match="tokenizer differs"):
        await started(vllm_server, model_dir=other_tokenizer)


@pytest.mark.vllm_destructive
async def test_killing_the_engine_gives_unavailable_within_the_deadline(vllm_server):
    prompts = make_prompts(vllm_server.model_dir, count=2, hybrid=True, seed=9)
    backend = await started(vllm_server, deadline_s=3.0, breaker_failures=2)
    try:
        await backend.score(prompts)
        vllm_server.kill_engine()
        for _ in range(2):  # engine crash (500 / dropped connection), then server gone
            began = time.monotonic()
            with pytest.raises(RankerUnavailable):
                await backend.score(prompts)
            assert time.monotonic() - began < 4.0  # deadline 3 s + scheduling slack
        began = time.monotonic()
        with pytest.raises(RankerUnavailable, match="circuit open"):
            await backend.score(prompts)
        assert time.monotonic() - began < 0.5  # nothing sent: fails fast
        assert not await backend.ready()
    finally:
        await backend.close()
