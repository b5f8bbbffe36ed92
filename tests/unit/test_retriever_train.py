"""Training windows, the fit loop (loss falls, beats popularity, budgets), reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retriever.models import build_model
from retriever.train import FitReport, TrainConfig, fit
from retriever.windows import batches, left_pad, training_windows
from tandem.data import Dataset
from tandem.evaluate import evaluate_full_ranking
from tandem.testing.retriever import TINY_TRAIN_OPTIONS, one_torch_thread


def test_windows_cover_every_training_target_exactly_once() -> None:
    sequences = [np.arange(1, 12), np.arange(20, 23), np.array([5])]
    windows = training_windows(sequences, max_len=4)
    targets = sorted(int(t) for w in windows for t in w[1:])
    expected = sorted([*range(2, 12), 21, 22])
    assert targets == expected
    assert all(len(w) <= 5 for w in windows)
    assert any(list(w) == [7, 8, 9, 10, 11] for w in windows)  # the newest window is full


def test_left_pad_right_aligns_and_truncates_old_items() -> None:
    padded = left_pad([np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9])], length=4)
    np.testing.assert_array_equal(padded, [[0, 1, 2, 3], [0, 0, 0, 4], [6, 7, 8, 9]])


def test_batches_pair_inputs_with_next_items() -> None:
    windows = training_windows([np.arange(1, 9), np.arange(10, 14)], max_len=3)
    seen = 0
    for inputs, targets in batches(windows, 2, np.random.default_rng(0)):
        assert inputs.shape == targets.shape
        real = targets != 0
        assert np.all(inputs[real] != 0)
        assert np.all(targets[real] == inputs[real] + 1)  # consecutive ids: next item = +1
        seen += int(real.sum())
    assert seen == 7 + 3


def _fit(dataset: Dataset, name: str, **overrides) -> tuple[torch.nn.Module, FitReport]:
    config = TrainConfig(model=name, **{**TINY_TRAIN_OPTIONS, **overrides})
    torch.manual_seed(config.seed)
    model = build_model(name, dataset.catalog.num_items, config.model_options())
    with one_torch_thread():
        return model, fit(model, dataset.split(), config, progress=False)


def _popularity_ndcg(dataset: Dataset) -> float:
    split = dataset.split()
    counts = np.bincount(np.concatenate(split.train), minlength=dataset.catalog.num_items + 1)

    def score(histories: list[np.ndarray]) -> np.ndarray:
        return np.tile(counts.astype(np.float32), (len(histories), 1))

    return evaluate_full_ranking(score, split.valid_inputs(), split.valid_target).metrics["ndcg@10"]


@pytest.mark.parametrize("name", ["sasrec", "lrurec"])
def test_loss_falls_and_the_model_beats_popularity(tiny_dataset: Dataset, name: str) -> None:
    _, report = _fit(tiny_dataset, name)
    losses = [point["loss"] for point in report.curve]
    assert losses[-1] < 0.7 * losses[0]
    popularity = _popularity_ndcg(tiny_dataset)
    assert report.best_valid["ndcg@10"] > popularity + 0.2
    assert report.stopped_because == "max_epochs"


def test_the_best_epoch_is_kept_and_patience_stops_early(tiny_dataset: Dataset) -> None:
    model, report = _fit(tiny_dataset, "lrurec", lr=0.0, max_epochs=10, patience=2)
    assert report.stopped_because == "patience"
    assert report.epochs == 3 and report.best_epoch == 1
    split = tiny_dataset.split()
    from retriever.train import validate

    assert validate(model, split)["ndcg@10"] == pytest.approx(report.best_valid["ndcg@10"])


def test_time_budget_stops_after_the_current_step(tiny_dataset: Dataset) -> None:
    _, report = _fit(tiny_dataset, "sasrec", max_minutes=1e-6, max_epochs=50)
    assert report.stopped_because == "time_budget"
    assert report.epochs == 1


def test_training_is_reproducible_with_a_seed(tiny_dataset: Dataset) -> None:
    first, _ = _fit(tiny_dataset, "sasrec", max_epochs=2)
    second, _ = _fit(tiny_dataset, "sasrec", max_epochs=2)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_progress_bar_counts_the_time_budget_not_the_epoch_cap(
    tiny_dataset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    config = TrainConfig(model="lrurec", **{**TINY_TRAIN_OPTIONS, "max_epochs": 2})
    model = build_model("lrurec", tiny_dataset.catalog.num_items, config.model_options())
    with one_torch_thread():
        fit(model, tiny_dataset.split(), config, progress=True)
    shown = capsys.readouterr().err
    assert f"/{config.max_minutes:.1f} min" in shown and "left" in shown
    assert "epoch=2" in shown and f"/{config.max_epochs}" not in shown
