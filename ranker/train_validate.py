"""Validation during training: loss, HR@1, NDCG@10, agreement with the retriever, fusion weight.

The fusion weight the gateway serves is tuned here, on the validation users' retriever scores,
and kept only when the gain it buys is real: the paired bootstrap 95% interval of the per-user
NDCG@10 difference (fused minus retriever order) must exclude 0. Otherwise the served weight is
0 — a ranker not shown to help is not served — and the best weight is still recorded.
"""

from __future__ import annotations

import numpy as np
import torch

from ranker.fusion import fuse, tune_weight
from ranker.train_data import ValidationSet
from ranker.train_model import RankerModel
from ranker.train_objective import retriever_log_softmax
from ranker.verbalizer import MAX_CANDIDATES
from tandem.metrics import (
    mrr_at_k,
    ndcg_at_k,
    ndcg_per_user,
    paired_bootstrap_ci,
    recall_at_k,
)


def ranks_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each label among its row's letters (pessimistic on ties)."""
    rows = np.arange(len(labels))
    target = logits[rows, labels][:, None]
    return ((logits > target).sum(1) + (logits == target).sum(1) - 1).astype(np.int64)


def fused_ranks(logits, labels, retriever_scores, weight: float) -> np.ndarray:
    fused = [fuse(r, s, weight) for r, s in zip(retriever_scores, logits, strict=True)]
    return ranks_from_logits(np.stack(fused), labels)


def tune_rank_weight(logits: np.ndarray, labels: np.ndarray, retriever_scores: np.ndarray):
    """The fusion weight with the best validation NDCG@10, and the NDCG per weight."""
    return tune_weight(lambda w: ndcg_at_k(fused_ranks(logits, labels, retriever_scores, w), 10))


def served_weight(
    logits: np.ndarray, labels: np.ndarray, retriever_scores: np.ndarray, seed: int = 0
) -> dict:
    """The tuned weight, the interval of its gain over retriever order, and the weight to serve
    (the tuned one if the interval excludes 0, else 0)."""
    best, curve = tune_rank_weight(logits, labels, retriever_scores)
    fused = ndcg_per_user(fused_ranks(logits, labels, retriever_scores, best), 10)
    base = ndcg_per_user(fused_ranks(logits, labels, retriever_scores, 0.0), 10)
    lo, hi = paired_bootstrap_ci(fused, base, seed=seed) if best > 0 else (0.0, 0.0)
    return {
        "rank_weight": best if lo > 0 else 0.0,
        "rank_weight_best": best,
        "valid_fused_ndcg@10": curve[str(best)],
        "valid_gain_ci95": [round(lo, 5), round(hi, 5)],
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-row Spearman correlation of two score matrices ``[rows, n]`` (no ties assumed)."""
    ra = np.argsort(np.argsort(a, axis=1), axis=1).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=1), axis=1).astype(np.float64)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return float(np.mean((ra * rb).sum(1) / np.maximum(denom, 1e-12)))


def letter_logits_of(model: RankerModel, layouts, batch_size: int) -> np.ndarray:
    """``[n, C]`` letter logits of ``layouts`` in evaluation mode, batch by batch, on the CPU
    (the model may live on a GPU); the model goes back to training mode."""
    model.train(False)
    with torch.no_grad():
        chunks = [
            model.logits(layouts[start : start + batch_size]).float().cpu().numpy()
            for start in range(0, len(layouts), batch_size)
        ]
    model.train(True)
    return np.concatenate(chunks)


def validate(
    model: RankerModel, valid: ValidationSet, batch_size: int, residual: bool = False
) -> dict:
    """Validation metrics; ``valid_loss`` is the trained loss (with ``residual``: of the
    retriever's log-softmax plus the logits), the ranks are the ranker's alone."""
    logits_all = letter_logits_of(model, valid.layouts, batch_size)
    trained = torch.from_numpy(logits_all)
    if residual:
        trained = trained + retriever_log_softmax(valid.retriever_scores)
    losses = torch.nn.functional.cross_entropy(
        trained, torch.as_tensor(valid.labels), reduction="none"
    )
    ranks = ranks_from_logits(logits_all, valid.labels)
    retrieved = (valid.retriever_ranks >= 0).any()
    shown = np.where(valid.retriever_ranks >= 0, valid.retriever_ranks, MAX_CANDIDATES - 1)
    metrics = {
        "valid_loss": round(float(losses.mean()), 4),
        "valid_hr@1": round(recall_at_k(ranks, 1), 4),
        "valid_ndcg@10": round(ndcg_at_k(ranks, 10), 4),
        "valid_mrr@10": round(mrr_at_k(ranks, 10), 4),
        "valid_retriever_order_ndcg@10": round(ndcg_at_k(shown, 10), 4) if retrieved else None,
        "valid_users": len(valid.labels),
    }
    if retrieved:
        metrics |= served_weight(logits_all, valid.labels, valid.retriever_scores)
        metrics["valid_spearman_to_retriever"] = round(
            spearman(logits_all, valid.retriever_scores), 4
        )
    return metrics
