"""Ranker: rendering with projectors, permutation averaging, zero-shot loading, LLM preparation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranker.core import Ranker, RankerConfig
from ranker.forward import project_soft_rows
from ranker.llm import load_tokenizer, prepare_llm
from ranker.projector import Projector, ProjectorConfig
from ranker.prompts import PromptConfig, PromptInput, PromptItem, reorder


def _input(dim: int = 6, user_dim: int = 5) -> PromptInput:
    rng = np.random.default_rng(0)
    items = [
        PromptItem(f"Item {n}", None, rng.normal(size=dim).astype(np.float32)) for n in range(12)
    ]
    return PromptInput(
        history=items[:5],
        candidates=items[5:12],
        user_embedding=rng.normal(size=user_dim).astype(np.float32),
    )


async def test_zero_shot_ranker_scores_candidates_in_their_order(tiny_llm_dir):
    ranker = Ranker.load(None, tiny_llm_dir, precision="fp32")
    await ranker.start()
    try:
        inp = _input()
        scores = await ranker.score(inp)
        assert scores.shape == (7,) and scores.dtype == np.float32
        np.testing.assert_allclose(np.exp(scores).sum(), 1.0, rtol=1e-5)
    finally:
        await ranker.close()


async def test_permutation_averaging_maps_scores_back_to_candidates(tiny_llm_dir):
    config = RankerConfig(permutations=3, shuffle=True, seed=7)
    ranker = Ranker.load(None, tiny_llm_dir, config=config, precision="fp32")
    inp = _input()
    orders = ranker.orders(inp)
    assert orders.shape == (3, 7)
    await ranker.start()
    try:
        averaged = await ranker.score(inp)
        expected = np.zeros(7)
        for order in orders:
            shown = (await ranker.backend.score([ranker.render(reorder(inp, order))]))[0]
            expected[order] += shown / 3
    finally:
        await ranker.close()
    np.testing.assert_allclose(averaged, expected, atol=1e-5)


def test_hybrid_render_fills_soft_slots_with_projected_embeddings(tiny_llm_dir):
    prompt = PromptConfig(item_soft_tokens=True, user_soft_token=True)
    item = Projector(ProjectorConfig(in_dim=6, out_dim=128))
    user = Projector(ProjectorConfig(in_dim=5, out_dim=128))
    base = Ranker.load(None, tiny_llm_dir)
    ranker = Ranker(base.tokens, RankerConfig(prompt=prompt), base.backend, item, user)
    rendered = ranker.render(_input())
    assert rendered.soft_vectors.shape == (1 + 12, 128)
    with torch.no_grad():
        expected = user(torch.from_numpy(_input().user_embedding)).numpy()
    np.testing.assert_allclose(rendered.soft_vectors[0], expected, atol=1e-6)
    with torch.no_grad():  # every row, as training's torch modules project them
        layout = ranker.layout(_input())
        trained = project_soft_rows([layout], ranker.projectors, 128).numpy()
    np.testing.assert_allclose(rendered.soft_vectors, trained, atol=1e-6)


@pytest.mark.parametrize("row_norm", [True, False])
def test_serving_projection_in_numpy_is_the_trained_module(row_norm: bool):
    """``ProjectorArrays`` (serving) computes what the ``Projector`` module (training)
    computes: layer norm, exact GELU, scale and per-slot anchors."""
    torch.manual_seed(0)
    module = Projector(ProjectorConfig(in_dim=7, out_dim=32, anchors=4, row_norm=row_norm))
    with torch.no_grad():
        module.anchor.normal_()
        module.scale.fill_(1.3)
    x = np.random.default_rng(0).normal(size=(9, 7)).astype(np.float32) * 3
    slots = np.arange(9) % 4
    with torch.no_grad():
        expected = module(torch.from_numpy(x), torch.as_tensor(slots)).numpy()
    np.testing.assert_allclose(module.arrays()(x, slots), expected, atol=1e-5)
    with pytest.raises(ValueError, match="slot anchors"):
        module.arrays()(x)


def test_soft_tokens_without_projector_are_refused(tiny_llm_dir):
    config = RankerConfig(prompt=PromptConfig(item_soft_tokens=True))
    with pytest.raises(ValueError, match="no item projector"):
        Ranker.load(None, tiny_llm_dir, config=config)


def test_wrong_embedding_size_is_a_clear_error(tiny_llm_dir):
    base = Ranker.load(None, tiny_llm_dir)
    ranker = Ranker(
        base.tokens,
        RankerConfig(prompt=PromptConfig(user_soft_token=True)),
        base.backend,
        user_projector=Projector(ProjectorConfig(in_dim=9, out_dim=128)),
    )
    with pytest.raises(ValueError, match="projector expects 9"):
        ranker.render(_input())


def test_prepare_llm_copies_a_local_checkpoint(tiny_llm_dir, tmp_path):
    out = prepare_llm(tmp_path / "llm", source=tiny_llm_dir)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert load_tokenizer(out).pad_token == "<|pad|>"
