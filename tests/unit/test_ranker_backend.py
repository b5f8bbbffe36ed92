"""The in-process backend: padding-safe batching, soft tokens, micro-batching, LoRA."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ranker.backends.base import RankerBackend, RankerUnavailable, RenderedPrompt
from ranker.backends.transformers import TransformersBackend, TransformersBackendConfig
from ranker.backends.vllm import VLLMBackend
from ranker.llm import load_model
from ranker.prompts import PromptConfig, PromptInput, PromptItem, PromptTokenizer, render_prompt
from tandem.testing.retriever import one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are fastest on one thread when other jobs share the CPU."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tok(tiny_llm_dir) -> PromptTokenizer:
    return PromptTokenizer(AutoTokenizer.from_pretrained(tiny_llm_dir))


@pytest.fixture(scope="module")
def model(tiny_llm_dir):
    return load_model(tiny_llm_dir)


def _prompts(tok: PromptTokenizer, count: int = 5) -> list[RenderedPrompt]:
    titles = [f"Item {n}" for n in range(40)]
    prompts = []
    for n in range(count):
        inp = PromptInput(
            history=[PromptItem(t) for t in titles[: 2 + 3 * n]],
            candidates=[PromptItem(t) for t in titles[n : n + 5 + 3 * n]],
        )
        prompts.append(render_prompt(inp, PromptConfig(), tok).with_soft_vectors(None))
    return prompts


def _backend(tiny_llm_dir, model=None, **options) -> TransformersBackend:
    config = TransformersBackendConfig(llm_dir=tiny_llm_dir, **{"precision": "fp32", **options})
    return TransformersBackend(config, model=model)


@pytest.mark.parametrize("backend_class", [TransformersBackend, VLLMBackend])
def test_backends_implement_the_protocol_signatures(backend_class):
    """Every protocol method exists with the protocol's parameters (names, kinds, defaults)."""
    for method in ("start", "score", "ready", "close"):
        declared = inspect.signature(getattr(RankerBackend, method))
        implemented = inspect.signature(getattr(backend_class, method))
        assert inspect.iscoroutinefunction(getattr(backend_class, method)), method
        shape = [(p.name, p.kind, p.default) for p in declared.parameters.values()]
        assert [(p.name, p.kind, p.default) for p in implemented.parameters.values()] == shape
    assert isinstance(backend_class.name, str)


async def test_the_in_process_backend_accepts_the_request_context(tiny_llm_dir, model, tok):
    backend = _backend(tiny_llm_dir, model)
    await backend.start()
    try:
        prompts = _prompts(tok, 2)
        scores = await backend.score(prompts, request_id="req-1", deadline_s=5.0)
    finally:
        await backend.close()
    for got, want in zip(scores, backend.score_sync(prompts), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_batched_scores_equal_one_by_one_scores(tiny_llm_dir, model, tok):
    prompts = _prompts(tok)
    assert len({len(p.token_ids) for p in prompts}) == len(prompts)  # padding is exercised
    backend = _backend(tiny_llm_dir, model, max_batch=8)
    batched = backend.score_sync(prompts)
    alone = [backend.score_sync([p])[0] for p in prompts]
    for b, a, p in zip(batched, alone, prompts, strict=True):
        assert b.shape == (p.num_candidates,)
        np.testing.assert_allclose(b, a, atol=1e-5)
        np.testing.assert_allclose(np.exp(b).sum(), 1.0, rtol=1e-5)


def test_bf16_scores_stay_close_to_fp32(tiny_llm_dir, model, tok):
    prompts = _prompts(tok, 3)
    fp32 = _backend(tiny_llm_dir, model).score_sync(prompts)
    bf16 = _backend(tiny_llm_dir, model, precision="bf16").score_sync(prompts)
    for a, b in zip(fp32, bf16, strict=True):
        np.testing.assert_allclose(a, b, atol=0.05)


def test_auto_precision_picks_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from ranker import forward

    assert forward.resolve_precision("fp32") == "fp32"
    assert forward.resolve_precision("bf16") == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(forward, "cpu_has_bf16", lambda native=native: native)
        assert forward.resolve_precision("auto") == expected
    with pytest.raises(ValueError, match="precision"):
        forward.resolve_precision("fp16")


def test_soft_vector_equal_to_a_token_embedding_reproduces_the_text_scores(
    tiny_llm_dir, model, tok
):
    prompt = _prompts(tok, 2)[1]
    table = model.get_input_embeddings().weight.detach()
    positions = (3, 10, len(prompt.token_ids) - 4)
    vectors = table[[prompt.token_ids[p] for p in positions]].numpy()
    hybrid = RenderedPrompt(
        token_ids=tuple(0 if n in positions else t for n, t in enumerate(prompt.token_ids)),
        letter_token_ids=prompt.letter_token_ids,
        soft_positions=positions,
        soft_vectors=vectors,
    )
    backend = _backend(tiny_llm_dir, model)
    text, soft = backend.score_sync([prompt, hybrid])
    np.testing.assert_allclose(soft, text, atol=1e-5)


def test_soft_vectors_of_the_wrong_size_are_rejected(tiny_llm_dir, model, tok):
    prompt = _prompts(tok, 1)[0]
    bad = RenderedPrompt(
        token_ids=prompt.token_ids,
        letter_token_ids=prompt.letter_token_ids,
        soft_positions=(2,),
        soft_vectors=np.zeros((1, 7), dtype=np.float32),
    )
    backend = _backend(tiny_llm_dir, model)
    backend.load()
    with pytest.raises(ValueError, match="hidden size is 128"):
        backend.score_sync([bad])


async def test_concurrent_requests_share_forward_passes(tiny_llm_dir, model, tok):
    prompts = _prompts(tok, 6)
    backend = _backend(tiny_llm_dir, model, max_batch=8, max_wait_ms=50)
    expected = backend.score_sync(prompts)
    passes = []
    original = backend.score_sync

    def counting(batch):
        passes.append(len(batch))
        return original(batch)

    backend.score_sync = counting
    await backend.start()
    try:
        results = await asyncio.gather(*(backend.score([p]) for p in prompts))
    finally:
        await backend.close()
    assert sum(passes) == len(prompts) and len(passes) < len(prompts)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got[0], want, atol=1e-5)


async def test_a_full_queue_sheds_load(tiny_llm_dir, model, tok):
    backend = _backend(tiny_llm_dir, model, max_queue=2, max_batch=1)
    await backend.start()
    try:
        with pytest.raises(RankerUnavailable, match="queue is full"):
            await backend.score(_prompts(tok, 1) * 5)
        assert await backend.ready()
    finally:
        await backend.close()
    assert not await backend.ready()


async def test_scoring_before_start_is_unavailable(tiny_llm_dir, tok):
    with pytest.raises(RankerUnavailable, match="not started"):
        await _backend(tiny_llm_dir).score(_prompts(tok, 1))


def test_lora_adapter_changes_scores(tiny_llm_dir, tiny_lora_dir, model, tok):
    prompts = _prompts(tok, 2)
    base = _backend(tiny_llm_dir, model).score_sync(prompts)
    tuned = TransformersBackend(
        TransformersBackendConfig(tiny_llm_dir, adapter_dir=tiny_lora_dir, precision="fp32")
    )
    with torch.no_grad():
        adapted = tuned.score_sync(prompts)
    assert not np.allclose(base[0], adapted[0], atol=1e-4)
