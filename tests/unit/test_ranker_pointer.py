"""The CPU ranker recipe: candidate signal tokens, letter anchors, the terse prompt, pruning,
and a sanity task the tiny LLM must learn through the real training loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ranker.core import Ranker
from ranker.forward import collate, letter_logits
from ranker.llm import kept_layers, load_model, load_tokenizer, prune_layers
from ranker.projector import Projector, ProjectorConfig
from ranker.prompts import (
    CANDIDATE_SLOT,
    PromptConfig,
    PromptError,
    PromptInput,
    PromptItem,
    PromptTokenizer,
    render_prompt,
    reorder,
)
from ranker.signals import candidate_signals, side_features, signal_dim
from ranker.synthetic import SyntheticConfig, SyntheticTask, train_synthetic
from ranker.train import TrainConfig
from tandem.metrics import ndcg_per_user, paired_bootstrap_ci


def _input(n: int = 5, d: int = 4, seed: int = 0) -> PromptInput:
    rng = np.random.default_rng(seed)
    items = [
        PromptItem(f"t{k}", embedding=rng.standard_normal(d), item_id=str(k)) for k in range(n)
    ]
    history = [PromptItem("h", embedding=rng.standard_normal(d)) for _ in range(3)]
    return PromptInput(
        history=history,
        candidates=items,
        user_embedding=rng.standard_normal(d),
        retriever_scores=rng.standard_normal(n),
    )


def test_signals_carry_the_user_item_dot_product_and_the_score_order():
    inp = _input()
    rows = candidate_signals(
        inp.user_embedding,
        np.stack([c.embedding for c in inp.candidates]),
        np.stack([h.embedding for h in inp.history]),
        inp.retriever_scores,
    )
    d = 4
    assert rows.shape == (5, signal_dim(d, d))
    dots = np.stack([c.embedding for c in inp.candidates]) @ inp.user_embedding
    np.testing.assert_allclose(rows[:, d : 2 * d].sum(axis=1), dots, rtol=1e-5)
    rank = rows[:, -3]  # 0 for the best retriever score
    assert rank[np.argmax(inp.retriever_scores)] == 0.0
    assert rank[np.argmin(inp.retriever_scores)] == 1.0


def test_relative_signals_keep_the_dot_product_order_and_differences_only():
    inp = _input(n=8, d=4, seed=3)
    items = np.stack([c.embedding for c in inp.candidates])
    history = np.stack([h.embedding for h in inp.history])
    rows = candidate_signals(inp.user_embedding, items, history, inp.retriever_scores, None, True)
    d = 4
    assert rows.shape == (8, signal_dim(d, d))
    np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=1e-5)  # centred over the list
    dots = items @ inp.user_embedding
    relative_dots = rows[:, d : 2 * d].sum(axis=1)  # one scale for the group: order and ratios kept
    assert np.argsort(relative_dots).tolist() == np.argsort(dots).tolist()
    np.testing.assert_allclose(
        np.diff(relative_dots) / np.diff(relative_dots)[0],
        np.diff(dots) / np.diff(dots)[0],
        rtol=1e-4,
    )
    # Shifting every score leaves the list unchanged; a constant column becomes 0, not NaN.
    shifted = candidate_signals(
        inp.user_embedding, items, history, inp.retriever_scores + 5.0, np.ones((8, 2)), True
    )
    np.testing.assert_allclose(shifted[:, : rows.shape[1]], rows, atol=1e-5)
    assert np.all(shifted[:, rows.shape[1] :] == 0.0)


def test_model_free_signals_hold_nothing_of_the_retrievers_vector_space():
    inp = _input(n=6, d=4, seed=5)
    side = np.random.default_rng(6).standard_normal((6, 3))
    items = np.concatenate([np.stack([c.embedding for c in inp.candidates]), side], axis=1)
    history = np.concatenate([np.stack([h.embedding for h in inp.history]), side[:3]], axis=1)
    rows = candidate_signals(
        inp.user_embedding, items, history, inp.retriever_scores, None, True, False
    )
    assert rows.shape == (6, signal_dim(3, 0))
    other_user = candidate_signals(
        -inp.user_embedding, items, history, inp.retriever_scores, None, True, False
    )
    np.testing.assert_array_equal(rows, other_user)  # the scores carry the user, nothing else
    assert PromptConfig.pointer().reads_retriever_space
    free = PromptConfig.pointer(signal_embeddings=False, user_soft_token=False)
    assert not free.reads_retriever_space


def test_a_projector_without_row_norm_keeps_the_size_of_its_input():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    normed, raw = Projector(ProjectorConfig(6, 8)), Projector(ProjectorConfig(6, 8, row_norm=False))
    raw.load_state_dict(normed.state_dict())
    torch.testing.assert_close(normed(x), normed(3 * x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw(x), raw(3 * x))


def test_a_narrow_projector_still_starts_at_the_token_embeddings_size(tiny_llm_dir):
    from ranker.train_model import calibrated_projector

    llm = load_model(tiny_llm_dir)
    sample = np.random.default_rng(0).standard_normal((40, 12)).astype(np.float32)
    projector = calibrated_projector(llm, sample, seed=0, row_norm=False, hidden_dim=4)
    assert projector.fc1.out_features == 4 and projector.config.hidden_dim == 4
    with torch.no_grad():
        out = projector(torch.from_numpy(sample))
    target = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    torch.testing.assert_close(out.pow(2).mean().sqrt(), target, rtol=1e-3, atol=1e-6)


def test_a_projector_saved_before_row_norm_loads_with_it_on(tmp_path):
    from safetensors.torch import save_file

    projector = Projector(ProjectorConfig(6, 8, row_norm=False))
    config = {k: v for k, v in vars(projector.config).items() if k != "row_norm"}
    tensors = {k: v.contiguous() for k, v in projector.state_dict().items()}
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata={"config": json.dumps(config)})
    assert Projector.load(tmp_path / "p.safetensors").config.row_norm is True


def test_side_features_standardise_popularity_and_spell_out_genres():
    table = side_features(
        [("Drama",), ("Comedy", "Drama"), ()], [1990, None, 2000], np.array([0, 1, 10, 100])
    )
    assert table.shape == (4, 4) and not table[0].any()
    assert table[3, 0] > table[2, 0] > table[1, 0]  # popularity from training counts
    assert table[2, 1] == 0.0  # a missing year is the mean
    assert table[2, 2:].tolist() == [1.0, 1.0] and table[3, 2:].tolist() == [0.0, 0.0]


def test_pointer_prompt_is_short_and_names_each_candidate_slot(tiny_llm_dir):
    tokens = PromptTokenizer(load_tokenizer(tiny_llm_dir))
    layout = render_prompt(_input(), PromptConfig.pointer(), tokens)
    assert layout.text.count(CANDIDATE_SLOT) == 5 and "<user>" in layout.text
    assert layout.soft_kinds == ("user",) + ("candidate",) * 5
    assert layout.soft_slots == (-1, 0, 1, 2, 3, 4)
    assert len(layout.token_ids) < 40
    shuffled = render_prompt(reorder(_input(), [4, 3, 2, 1, 0]), PromptConfig.pointer(), tokens)
    # the signal rows travel with their candidates when the order changes
    np.testing.assert_allclose(shuffled.soft_inputs[1], layout.soft_inputs[5])


def test_pointer_prompt_without_retriever_scores_is_a_clear_error(tiny_llm_dir):
    from dataclasses import replace

    tokens = PromptTokenizer(load_tokenizer(tiny_llm_dir))
    with pytest.raises(PromptError, match="retriever's scores"):
        render_prompt(replace(_input(), retriever_scores=None), PromptConfig.pointer(), tokens)


def test_letter_logits_equal_the_full_lm_head(tiny_llm_dir):
    model = load_model(tiny_llm_dir)
    tokens = PromptTokenizer(load_tokenizer(tiny_llm_dir))
    ids = [tokens.encode("Pick the candidate Answer:"), tokens.encode("Answer:")]
    batch = collate(ids, [(), ()], [tokens.letter_ids[:5], tokens.letter_ids[:3]], 0)
    with torch.no_grad():
        picked = letter_logits(model, batch)
        full = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits[:, -1]
    expected = full.gather(1, batch.letter_ids).masked_fill(~batch.letter_mask, float("-inf"))
    torch.testing.assert_close(picked, expected, rtol=1e-4, atol=1e-4)


def test_pruning_keeps_the_bottom_and_top_layers(tiny_llm_dir):
    assert kept_layers(30, 4) == [0, 1, 28, 29] and kept_layers(30, 1) == [0]
    model = load_model(tiny_llm_dir)
    assert prune_layers(model, 1) == [0] and model.config.num_hidden_layers == 1
    assert len(model.model.layers) == 1


POINT = TrainConfig(
    prompt=PromptConfig.pointer(),
    lr=3e-3,
    projector_lr=3e-3,
    warmup_steps=5,
    batch_size=32,
    max_steps=60,
    precision="fp32",
    lora_dropout=0.0,
    eval_every=0,
    threads=1,
    aux_weight=1.0,
    curriculum=(4,),  # 4 candidates throughout: the tiny model must learn in seconds
    curriculum_examples=10**9,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
)


@pytest.mark.parametrize(
    ("task", "relative", "steps", "floor"),
    [("point", False, 60, 0.6), ("match", False, 100, 0.5), ("match", True, 100, 0.5)],
)
def test_the_tiny_ranker_learns_a_task_the_soft_tokens_determine(
    tiny_llm_dir, task, relative, steps, floor
):
    """Through the real loop: LLM, projectors with anchors, prompt, losses. Chance is 0.25."""
    from dataclasses import replace

    task_config = SyntheticConfig(task=task, valid_examples=128, valid_candidates=4)
    config = replace(POINT, max_steps=steps, prompt=PromptConfig.pointer(relative_signals=relative))
    result = train_synthetic(tiny_llm_dir, task_config, config)
    assert result["examples"] == steps * 32
    assert result["heldout_accuracy"] >= floor, result


def test_without_anchors_or_letters_the_candidates_cannot_be_named(tiny_llm_dir):
    from dataclasses import replace

    with pytest.raises(ValueError, match="letter anchors"):
        train_synthetic(
            tiny_llm_dir, SyntheticConfig(task="point"), replace(POINT, letter_anchors=False)
        )


def test_synthetic_labels_follow_their_rule(tiny_llm_dir):
    tokens = PromptTokenizer(load_tokenizer(tiny_llm_dir))
    match = SyntheticTask(SyntheticConfig(task="match"), PromptConfig.pointer(), tokens)
    inp, label = match.example(7, 20)
    dots = np.stack([c.embedding for c in inp.candidates]) @ inp.user_embedding
    assert label == int(np.argmax(dots))
    point = SyntheticTask(SyntheticConfig(task="point"), PromptConfig.pointer(), tokens)
    inp, label = point.example(7, 20)
    assert label == int(np.argmax(inp.retriever_scores))


def test_ranker_fills_item_rows_from_its_own_table(tiny_llm_dir):
    from ranker.core import ItemTable, RankerConfig

    inp = _input(n=3)
    rows = np.arange(4 * 4, dtype=np.float32).reshape(4, 4)
    table = ItemTable(["0", "1", "2"], rows)
    filled = table.fill(inp)
    np.testing.assert_array_equal(filled.candidates[2].embedding, rows[3])
    assert filled.history[0].embedding is inp.history[0].embedding  # no id: left as given
    with pytest.raises(ValueError, match="candidate projector"):
        Ranker(
            load_tokenizer(tiny_llm_dir),
            RankerConfig(prompt=PromptConfig.pointer(user_soft_token=False)),
            None,
            None,
        )


def test_paired_bootstrap_interval_excludes_zero_only_for_a_real_difference():
    rng = np.random.default_rng(0)
    base = ndcg_per_user(rng.integers(-1, 30, size=900), 10)
    better = np.maximum(base, ndcg_per_user(rng.integers(-1, 5, size=900), 10))
    lo, hi = paired_bootstrap_ci(better, base, resamples=2000)
    assert 0 < lo < hi
    lo, hi = paired_bootstrap_ci(base, base[rng.permutation(900)], resamples=2000)
    assert lo < 0 < hi


def test_trends_are_causal_and_windowed(tmp_path):
    from ranker.trends import DAY, TrendTable

    t0 = 1_000 * DAY
    times = np.array([t0, t0, t0 + 3 * DAY, t0 + 20 * DAY])
    table = TrendTable.build(times, np.array([1, 1, 2, 1]), num_items=3)
    same_day = table.features(t0 + 10, np.array([1, 2]))
    assert same_day[:, 0].tolist() == [0.0, 0.0]  # nothing before the decision's day counts
    week = table.features(t0 + 5 * DAY, np.array([1, 2]))
    np.testing.assert_allclose(week[:, 0], np.log1p([2, 1]))
    later = table.features(t0 + 12 * DAY, np.array([1, 2]))
    assert later[:, 0].tolist() == [0.0, 0.0]  # out of the 7-day window
    np.testing.assert_allclose(later[:, 1], np.log1p([2, 1]))  # still in the 30-day one
    np.testing.assert_allclose(
        table.features(None, np.array([1])), table.features(t0 + 99 * DAY, np.array([1]))
    )
    table.save(tmp_path / "t.safetensors")
    again = TrendTable.load(tmp_path / "t.safetensors")
    assert again.start == table.start and np.array_equal(again.cumulative, table.cumulative)


def test_trend_context_follows_its_candidate_when_reordered(tiny_llm_dir):
    from dataclasses import replace

    inp = replace(_input(), candidate_context=np.arange(10, dtype=np.float32).reshape(5, 2))
    tokens = PromptTokenizer(load_tokenizer(tiny_llm_dir))
    layout = render_prompt(inp, PromptConfig.pointer(), tokens)
    shuffled = render_prompt(reorder(inp, [4, 3, 2, 1, 0]), PromptConfig.pointer(), tokens)
    assert layout.soft_inputs[1][-2:].tolist() == [0.0, 1.0]
    assert shuffled.soft_inputs[1][-2:].tolist() == [8.0, 9.0]


def test_an_adapter_is_never_served_on_an_llm_with_other_layers(tiny_llm_dir, tmp_path):
    from ranker.core import check_llm_layers
    from tandem.artifacts import Manifest

    run = tmp_path / "run"
    run.mkdir()
    Manifest(kind="ranker", run_id="run", dataset="d", config={"llm_layers": 5},
             data_fingerprint="x").write(run)  # fmt: skip
    with pytest.raises(ValueError, match="5-layer LLM"):
        check_llm_layers(run, tiny_llm_dir)
    Manifest(kind="ranker", run_id="run", dataset="d", config={"llm_layers": 2},
             data_fingerprint="x").write(run)  # fmt: skip
    check_llm_layers(run, tiny_llm_dir)  # the tiny LLM has 2 layers


def test_an_item_table_knows_the_retriever_it_was_built_on():
    from ranker.core import ItemTable

    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)  # row 0 padding
    table = ItemTable(["a", "b", "c"], np.concatenate([vectors, np.ones((4, 2))], axis=1))
    assert table.matches(["a", "b", "c"], vectors)
    assert not table.matches(["a", "b", "c"], vectors + 1.0)  # another retriever run
    assert not table.matches(["a", "b", "z"], vectors)  # another catalog
