"""A tiny trained retriever run (LRURec on the synthetic dataset) for tests and benchmarks."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from tandem.testing.data import synthetic_dataset
from tandem.torch_threads import torch_threads

TINY_TRAIN_OPTIONS = {
    "max_len": 20,
    "hidden": 16,
    "layers": 1,
    "dropout": 0.0,
    "lr": 1e-2,
    "batch_size": 16,
    "max_epochs": 8,
    "patience": 100,
}


def one_torch_thread() -> AbstractContextManager[None]:
    """Tiny models train ~2x faster on one thread on a shared 2-core machine."""
    return torch_threads(1)


def train_tiny_run(root: Path, model: str = "lrurec", **overrides) -> Path:
    """Train and save a tiny run under ``root`` (the artifacts root); returns the run folder."""
    from retriever.train import TrainConfig, train_retriever

    dataset = synthetic_dataset()
    dataset.save(root / dataset.name / "data")
    config = TrainConfig(model=model, **{**TINY_TRAIN_OPTIONS, **overrides})
    with one_torch_thread():
        return train_retriever(dataset, config, root, progress=False)
