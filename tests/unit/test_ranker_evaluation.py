"""Two-stage evaluation on the tiny retriever + tiny LLM: protocol bookkeeping, not quality."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.backends.transformers import TransformersBackend, TransformersBackendConfig
from ranker.core import Ranker, RankerConfig
from ranker.evaluation import EvalConfig, evaluate
from ranker.examples import CandidateSource, ItemFeatures
from ranker.fusion import WEIGHT_GRID, fuse
from ranker.projector import Projector, ProjectorConfig
from ranker.prompts import PromptConfig
from ranker.train import TrainInputs
from ranker.two_stage import fused_two_stage_ranks, retrieve
from tandem.data import Dataset
from tandem.testing.retriever import one_torch_thread


@pytest.fixture(scope="module")
def inputs(tiny_retriever_run) -> TrainInputs:
    from retriever.core import Retriever

    retriever = Retriever.load(tiny_retriever_run)
    dataset = Dataset.load(tiny_retriever_run.parents[2] / "synthetic" / "data")
    source = CandidateSource(retriever)
    features = ItemFeatures.build(dataset.catalog, {"i1": "a caption"}, source.item_table)
    return TrainInputs(dataset, features, source, {"u0": "Likes the middle of the catalog."})


@pytest.fixture(scope="module")
def ranker(inputs, tiny_llm_dir, tiny_lora_dir) -> Ranker:
    prompt = PromptConfig.compact(item_soft_tokens=True, user_soft_token=True, max_history=4)
    backend = TransformersBackend(
        TransformersBackendConfig(tiny_llm_dir, adapter_dir=tiny_lora_dir, precision="fp32")
    )
    dim = inputs.source.dim
    base = Ranker.load(None, tiny_llm_dir)
    return Ranker(
        base.tokens,
        RankerConfig(prompt=prompt),
        backend,
        Projector(ProjectorConfig(in_dim=dim, out_dim=128)),
        Projector(ProjectorConfig(in_dim=dim, out_dim=128)),
    )


def test_retriever_pass_matches_top_k_and_masks_history(inputs):
    users = retrieve(inputs, np.arange(10), "test")
    for row, history in enumerate(users.histories):
        assert not set(users.top[row]) & set(history.tolist())
        rank = users.retriever_ranks[row]
        in_top = users.targets[row] in users.top[row]
        assert in_top == (rank < 20)


def test_fusion_weight_zero_keeps_retriever_order(inputs):
    users = retrieve(inputs, np.arange(40), "test")
    hits = users.hits
    noise = [np.random.default_rng(r).normal(size=20) for r in hits]
    ranks = fused_two_stage_ranks(users, hits, noise, 0.0)
    expected = [int(np.flatnonzero(users.top[r] == users.targets[r])[0]) for r in hits]
    assert ranks[hits].tolist() == expected
    assert (np.delete(ranks, hits) == -1).all()
    np.testing.assert_allclose(
        fuse(np.zeros(3), np.arange(3.0), 1.0),
        np.arange(3.0) - np.log(np.exp(np.arange(3.0)).sum()),
    )


def test_report_covers_every_protocol(inputs, ranker, tiny_llm_dir):
    zero_shot = Ranker.load(None, tiny_llm_dir, precision="fp32")
    config = EvalConfig(max_users=12, mapb_users=1, mapb_permutations=2, fusion_users=12)
    with one_torch_thread():
        report = evaluate(ranker, inputs, config, zero_shot=zero_shot)
    assert report["users"] == 12
    hits = report["retrieved_users"]
    assert report["two_stage"]["recall@10"] <= report["retriever"]["recall@20"] + 1e-9
    assert report["two_stage"]["recall@10"] == pytest.approx(
        report["ranker_on_retrieved"]["recall@10"] * hits / 12, abs=1e-3
    )
    assert report["fused"]["weight"] in WEIGHT_GRID
    random = report["random_candidates"]
    assert random["valid_ratio"] == 1.0 and 0.0 <= random["hit_ratio@1"] <= 1.0
    assert 0.0 <= random["auc"] <= 1.0
    assert 0.0 <= random["retriever_hit_ratio@1"] <= 1.0  # the teacher, on the same lists
    assert 0.0 <= random["retriever_auc"] <= 1.0
    if hits:
        assert report["mapb"]["without_shuffling"] >= 0.0
        names = [row["variant"] for row in report["ablations"]]
        assert names == [
            "zero-shot (no LoRA), text",
            "text only",
            "+ preferences",
            "+ item soft tokens",
            "+ user token",
        ]


def test_two_stage_cli_names_a_missing_run_cleanly(tmp_path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--stage", "two", "--run", str(tmp_path / "no")])
    assert result.exit_code == 2 and "no" in result.output
    assert not isinstance(result.exception, FileNotFoundError)


def test_a_fixed_fusion_weight_measures_the_fused_figures_there(inputs, ranker):
    """``fusion_weight`` (a ranker's served weight beside another retriever) replaces the
    tuned weight in the fused figures: 0 is retriever order over the top-20, 1 the ranker's
    own order; the tuned weight is still reported."""
    fused = {}
    for weight in (0.0, 1.0):
        config = EvalConfig(
            max_users=12, ablations=False, random_candidates=False, mapb_users=0,
            fusion_users=12, fusion_weight=weight,
        )  # fmt: skip
        with one_torch_thread():
            report = evaluate(ranker, inputs, config)
        assert report["fused"]["fixed_weight"] == weight
        assert report["fused"]["weight"] in WEIGHT_GRID
        fused[weight] = report
    at_zero, share = fused[0.0], fused[0.0]["retrieved_users"] / 12  # misses count as 0
    assert at_zero["fused"]["ndcg@10"] == pytest.approx(
        at_zero["retriever_on_retrieved"]["ndcg@10"] * share, abs=1e-3
    )
    assert fused[1.0]["fused"]["ndcg@10"] == fused[1.0]["two_stage"]["ndcg@10"]
