"""Offline evaluation of a retriever run: full ranking over all items, history masked."""

from __future__ import annotations

from pathlib import Path

from retriever.artifacts import load_model, load_run_dataset, read_manifest
from retriever.scoring import torch_score_fn
from tandem.artifacts import resolve_run
from tandem.evaluate import EvaluationResult, evaluate_full_ranking

SPLITS = ("valid", "test")


def evaluate_run(run_dir: Path, split: str = "test") -> EvaluationResult:
    """Rank every item for every user of ``split`` with the run's model (exact scores)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    run_dir = resolve_run(run_dir)
    manifest = read_manifest(run_dir)
    dataset = load_run_dataset(run_dir, manifest)
    data_split = dataset.split()
    if split == "test":
        histories, targets = data_split.test_inputs(), data_split.test_target
    else:
        histories, targets = data_split.valid_inputs(), data_split.valid_target
    model = load_model(run_dir, manifest)
    result = evaluate_full_ranking(torch_score_fn(model), histories, targets, split=split)
    result.extra["run_id"] = manifest.run_id
    return result


def store_metrics(run_dir: Path, result: EvaluationResult) -> None:
    """Record ``result`` under ``metrics[<split>]`` of the run's manifest (rehashes files)."""
    run_dir = resolve_run(run_dir)
    manifest = read_manifest(run_dir)
    manifest.metrics[result.split] = {**result.metrics, "users": result.num_users}
    manifest.write(run_dir)
