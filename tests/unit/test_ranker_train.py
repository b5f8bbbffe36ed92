"""LoRA + projector training on the tiny LLM: loss falls, artifacts round-trip, resume works."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ranker.core import ADAPTER_DIR, ITEM_EMBEDDINGS, ITEM_PROJECTOR, USER_PROJECTOR, Ranker
from ranker.examples import CandidateSource, ItemFeatures
from ranker.fusion import WEIGHT_GRID
from ranker.prompts import PromptConfig
from ranker.train import LOG_FILE, TrainConfig, TrainInputs, train_ranker
from ranker.train_data import ExampleMaker, example_pool
from ranker.train_model import CHECKPOINT_DIR
from ranker.train_objective import DECAY_FLOOR, lr_factor, ranker_loss
from ranker.train_validate import spearman, tune_rank_weight
from tandem.artifacts import Manifest
from tandem.testing.data import synthetic_dataset

CONFIG = TrainConfig(
    prompt=PromptConfig.compact(
        item_soft_tokens=True, user_soft_token=True, max_history=3, persona=False
    ),
    max_steps=12,
    batch_size=4,
    lr=2e-2,
    projector_lr=2e-2,
    warmup_steps=0,
    lora_dropout=0.0,
    precision="fp32",
    steps_per_user=1,
    valid_users=4,
    eval_every=0,
    checkpoint_every=6,
)


@pytest.fixture(scope="module")
def inputs(tiny_retriever_run) -> TrainInputs:
    """Four users (so a few steps can fit them) over the tiny retriever's catalog."""
    from retriever.core import Retriever

    dataset = synthetic_dataset(num_users=4, max_len=8)
    source = CandidateSource(Retriever.load(tiny_retriever_run))
    features = ItemFeatures.build(dataset.catalog, {"i3": "a red car"}, source.item_table)
    return TrainInputs(dataset, features, source, {"u1": "Likes dramas."})


@pytest.fixture(scope="module")
def trained(inputs, tiny_llm_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ranker") / "run-1"
    result = train_ranker(
        inputs, tiny_llm_dir, run_dir, CONFIG, parents={"retriever": "retriever-x"}
    )
    return result


def _losses(run_dir) -> list[float]:
    lines = (run_dir / LOG_FILE).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_training_loss_falls(trained):
    losses = _losses(trained.run_dir)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3


def test_run_folder_holds_a_vllm_loadable_adapter_projectors_and_manifest(trained):
    run = trained.run_dir
    adapter = json.loads((run / ADAPTER_DIR / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32
    assert (run / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (run / ITEM_PROJECTOR).is_file() and (run / USER_PROJECTOR).is_file()
    assert (run / ITEM_EMBEDDINGS).is_file()
    manifest = Manifest.read(run)
    assert manifest.kind == "ranker" and manifest.parents == {"retriever": "retriever-x"}
    assert manifest.verify(run) == []
    assert manifest.metrics["steps"] == 12
    assert manifest.metrics["rank_weight"] in WEIGHT_GRID  # what the gateway will serve
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.bin"))


def test_saved_run_reproduces_the_validation_loss(trained, inputs, tiny_llm_dir):
    ranker = Ranker.load(trained.run_dir, tiny_llm_dir, precision="fp32")
    maker = ExampleMaker(inputs, CONFIG.examples(), ranker.tokens)
    valid = maker.validation_set()
    prompts = [layout.with_soft_vectors(ranker.project(layout)) for layout in valid.layouts]
    scores = ranker.backend.score_sync(prompts)
    loss = -np.mean([row[label] for row, label in zip(scores, valid.labels, strict=True)])
    assert loss == pytest.approx(trained.metrics["valid_loss"], abs=2e-3)


def test_resume_continues_from_the_checkpoint(trained, inputs, tiny_llm_dir, tmp_path):
    import shutil

    run_dir = tmp_path / "run-copy"
    shutil.copytree(trained.run_dir, run_dir)
    result = train_ranker(inputs, tiny_llm_dir, run_dir, replace(CONFIG, max_steps=14), resume=True)
    assert result.state.step == 14 and result.state.cursor == 14 * CONFIG.batch_size
    assert len(_losses(run_dir)) == 14
    assert (run_dir / CHECKPOINT_DIR / "optimizer.safetensors").is_file()


def test_resume_without_checkpoint_is_a_clear_error(inputs, tiny_llm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_ranker(inputs, tiny_llm_dir, tmp_path / "empty", CONFIG, resume=True)


def test_training_on_cuda_without_a_gpu_is_a_clear_cli_error(tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from tandem.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["ranker", "train", "--device", "cuda"])
    assert result.exit_code == 2
    assert "torch sees no CUDA device" in result.output
    assert not (tmp_path / "ml-100k").exists()  # refused before any run folder is made


def test_examples_cover_each_step_of_history_or_the_most_recent_ones():
    train = [np.arange(1, 6), np.arange(1, 4)]
    assert example_pool(train, 0, 1).tolist() == [
        [0, 1], [0, 2], [0, 3], [0, 4], [1, 1], [1, 2]
    ]  # fmt: skip
    assert example_pool(train, 1, 1).tolist() == [[0, 4], [1, 2]]


def test_user_token_without_retriever_is_refused(inputs, tiny_llm_dir, tmp_path):
    no_retriever = replace(inputs, source=None)
    with pytest.raises(ValueError, match="user token and candidate signals need the retriever"):
        train_ranker(no_retriever, tiny_llm_dir, tmp_path / "r", CONFIG)


def test_rank_weight_follows_whichever_signal_finds_the_item():
    labels = np.array([3, 1, 4])
    retriever = np.tile(np.linspace(2.0, 0.0, 20), (3, 1))  # candidates in retriever order
    knows = np.full((3, 20), -5.0)
    knows[np.arange(3), labels] = 5.0
    weight, curve = tune_rank_weight(knows, labels, retriever)
    assert weight > 0.0 and curve[str(weight)] == 1.0 > curve["0.0"]
    misleads = np.full((3, 20), -5.0)
    misleads[:, 19] = 5.0
    assert tune_rank_weight(misleads, np.array([0, 0, 0]), retriever)[0] == 0.0


def test_spearman_is_one_for_the_same_order_and_minus_one_reversed():
    a = np.array([[3.0, 2.0, 1.0, 0.0]])
    assert spearman(a, a * 2) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_curriculum_and_distillation_schedules():
    config = TrainConfig(curriculum=(4, 8), curriculum_examples=100, distill_weight=1.0,
                         distill_examples=200)  # fmt: skip
    assert [config.candidates_at(n) for n in (0, 99, 100, 199, 200, 10_000)] == [
        4, 4, 8, 8, 20, 20
    ]  # fmt: skip
    assert config.distill_at(0) == 1.0 and config.distill_at(100) == 0.5
    assert config.distill_at(400) == 0.0


def test_a_weight_is_served_only_when_its_validation_gain_is_real():
    from ranker.train_validate import served_weight

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, size=60)
    retriever = np.tile(np.linspace(2.0, 0.0, 20), (60, 1))
    knows = np.full((60, 20), -5.0)
    knows[np.arange(60), labels] = 5.0
    found = served_weight(knows, labels, retriever)
    assert found["rank_weight"] > 0 and found["valid_gain_ci95"][0] > 0
    lucky = np.full((60, 20), -5.0)
    lucky[np.arange(60), (labels + 1) % 20] = 5.0
    lucky[0, labels[0]] = 9.0  # right once: a tuned weight, but no real gain
    noise = served_weight(lucky, labels, retriever)
    assert noise["rank_weight"] == 0.0


def test_learning_rates_warm_up_then_decay_to_the_floor_by_examples_seen() -> None:
    assert lr_factor(0, 10) == pytest.approx(0.1)
    assert lr_factor(50, 10) == 1.0  # no decay asked: constant after warm-up
    assert lr_factor(50, 10, examples=0, decay_examples=100) == 1.0
    assert lr_factor(50, 10, examples=50, decay_examples=100) == pytest.approx(
        DECAY_FLOOR + (1 - DECAY_FLOOR) / 2
    )
    assert lr_factor(50, 10, examples=100, decay_examples=100) == pytest.approx(DECAY_FLOOR)
    assert lr_factor(50, 10, examples=900, decay_examples=100) == pytest.approx(DECAY_FLOOR)
    # a run resumed from its saved config keeps its schedule; old configs have no decay
    raw = json.loads(CONFIG.to_json())
    del raw["decay_examples"]
    assert TrainConfig.from_json(json.dumps(raw)).decay_examples == 0


def test_a_residual_loss_reads_the_retriever_plus_the_ranker() -> None:
    import torch

    teacher = [np.array([3.0, 0.0, -1.0]), np.array([0.0, 2.0, 0.0])]
    labels = [0, 1]
    silent = torch.zeros(2, 3)  # a ranker that adds nothing: the loss is the retriever's own
    expected = torch.nn.functional.cross_entropy(
        torch.log_softmax(torch.as_tensor(np.stack(teacher)).float(), dim=-1), torch.tensor(labels)
    )
    torch.testing.assert_close(ranker_loss(silent, labels, teacher, 0.0, residual=True), expected)
    plain = ranker_loss(silent, labels, teacher, 0.0)
    assert plain.item() == pytest.approx(np.log(3))  # without it, a silent ranker is at chance
    helping = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert ranker_loss(helping, labels, teacher, 0.0, residual=True) < expected
    with pytest.raises(ValueError, match="needs the retriever's scores"):
        ranker_loss(silent, labels, None, 0.0, residual=True)
    with pytest.raises(ValueError, match="distill_weight"):
        TrainConfig(residual=True, distill_weight=0.5)
