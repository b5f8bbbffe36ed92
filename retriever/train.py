"""Training loop: full-softmax next-item cross-entropy, AdamW, early stop on validation NDCG@10.

``fit`` trains a model on a leave-one-out split and keeps the weights of the best validation
epoch; ``train_retriever`` is the whole pipeline the CLI and ``tandem quickstart`` call (fit,
save safetensors, export ONNX, build the Faiss index, write the manifest, mark it latest).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from retriever.models import SequenceEncoder, build_model
from retriever.scoring import torch_score_fn
from retriever.windows import batches, training_windows
from tandem.data import PADDING_INDEX, Dataset, LeaveOneOutSplit
from tandem.data.split import hold_out_tail
from tandem.evaluate import evaluate_full_ranking

SELECTION_METRIC = "ndcg@10"


@dataclass
class TrainConfig:
    model: str = "lrurec"  # "sasrec" or "lrurec"
    max_len: int = 200  # longest history the encoder reads (and training window length)
    hidden: int = 64  # embedding size d
    layers: int = 2  # encoder blocks
    heads: int = 2  # attention heads (SASRec only)
    dropout: float = 0.2  # dropout in the encoder
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW decay (not on biases, norms or LRU dynamics)
    batch_size: int = 32  # training windows per step (small: more updates per epoch)
    max_epochs: int = 200  # upper bound on epochs
    max_minutes: float = 8.0  # wall-clock budget for fitting; the best epoch so far is kept
    patience: int = 20  # epochs without a better validation NDCG@10 before stopping
    grad_clip: float = 5.0  # max gradient norm
    seed: int = 42  # weights, shuffling
    index_kind: str = "flat"  # Faiss index built after training: flat (exact), ivf, hnsw
    # Each user's last N training items are never trained on (tandem.data.split.hold_out_tail):
    # a teacher for ranker training lists. Such a run is not marked latest.
    holdout_last: int = 0

    def model_options(self) -> dict[str, Any]:
        options = {
            "max_len": self.max_len,
            "hidden": self.hidden,
            "layers": self.layers,
            "dropout": self.dropout,
        }
        if self.model == "sasrec":
            options["heads"] = self.heads
        return options


@dataclass
class FitReport:
    """What fitting did: epochs run, the best one, why it stopped, and the curve."""

    epochs: int
    best_epoch: int
    best_valid: dict[str, float]
    seconds: float  # wall clock of the whole fit (training + validation)
    stopped_because: str
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_item_loss(
    model: SequenceEncoder, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over all items at every real position (padding column excluded)."""
    hidden = model.hidden_states(inputs)
    real = targets != PADDING_INDEX
    logits = hidden[real] @ model.item_embeddings().T
    logits[:, PADDING_INDEX] = float("-inf")
    return nn.functional.cross_entropy(logits, targets[real])


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        plain = name.endswith("bias") or "norm" in name or name.endswith("_log")
        (no_decay if plain else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def validate(model: SequenceEncoder, split: LeaveOneOutSplit) -> dict[str, float]:
    """Full-ranking metrics on the validation targets (history masked)."""
    result = evaluate_full_ranking(
        torch_score_fn(model), split.valid_inputs(), split.valid_target, split="valid"
    )
    return result.metrics


def fit(
    model: SequenceEncoder, split: LeaveOneOutSplit, config: TrainConfig, *, progress: bool = True
) -> FitReport:
    """Train ``model`` in place; on return it holds the best validation epoch's weights."""
    windows = training_windows(split.train, model.max_len)
    if not windows:
        raise ValueError("no training examples: every training sequence has fewer than 2 items")
    rng = np.random.default_rng(config.seed)
    optimizer = _optimizer(model, config)
    start, cpu_start = time.monotonic(), time.process_time()
    deadline = start + config.max_minutes * 60
    best_score, best_epoch, best_valid, best_state = -1.0, 0, {}, None
    curve: list[dict[str, float]] = []
    stopped = "max_epochs"
    # The bar measures the time budget (minutes), which ends most runs, not the epoch cap.
    budget_bar = tqdm(
        total=config.max_minutes,
        desc=f"{config.model}",
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{remaining} left{postfix}]",
        disable=not progress,
    )
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        losses, out_of_time = [], False
        for inputs, targets in batches(windows, config.batch_size, rng):
            loss = next_item_loss(model, torch.from_numpy(inputs), torch.from_numpy(targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            if time.monotonic() > deadline:
                out_of_time = True
                break
        valid = validate(model, split)
        score = valid[SELECTION_METRIC]
        # Wall and CPU seconds so far: CPU time stays comparable when other jobs share the host.
        curve.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                SELECTION_METRIC: score,
                "seconds": round(time.monotonic() - start, 2),
                "cpu_seconds": round(time.process_time() - cpu_start, 2),
            }
        )
        if score > best_score:
            best_score, best_epoch, best_valid = score, epoch, valid
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        budget_bar.set_postfix(
            epoch=epoch,
            loss=f"{np.mean(losses):.3f}",
            ndcg10=f"{score:.4f}",
            best=f"{best_score:.4f}@{best_epoch}",
            refresh=False,
        )
        budget_bar.update(min((time.monotonic() - start) / 60, config.max_minutes) - budget_bar.n)
        if out_of_time:
            stopped = "time_budget"
            break
        if epoch - best_epoch >= config.patience:
            stopped = "patience"
            break
    budget_bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitReport(
        epochs=len(curve),
        best_epoch=best_epoch,
        best_valid=best_valid,
        seconds=time.monotonic() - start,
        stopped_because=stopped,
        curve=curve,
    )


def train_retriever(
    dataset: Dataset, config: TrainConfig, run_root: Path, *, progress: bool = True
) -> Path:
    """Fit, then write ``run_root/<dataset>/retriever/<run-id>/`` (weights, ONNX, index,
    manifest) and mark it latest. ``run_root`` is the artifacts root. Returns the run folder."""
    from retriever.artifacts import save_run

    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.catalog.num_items, config.model_options())
    split = dataset.split()
    if config.holdout_last:
        split = hold_out_tail(split, config.holdout_last)
    report = fit(model, split, config, progress=progress)
    return save_run(model, dataset, split, config, report, run_root, latest=not config.holdout_last)
