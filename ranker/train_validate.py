"""Validation during training: loss, HR@1, NDCG@10, agreement with the retriever, fusion weight.

The fusion weight the gateway serves is tuned here, on the validation users' retriever scores,
so a ranker that has not learned anything useful is served at weight 0 (retriever order).
"""

from __future__ import annotations

import numpy as np
import torch

from ranker.fusion import fuse, tune_weight
from ranker.train_data import ValidationSet
from ranker.train_model import RankerModel
from ranker.verbalizer import MAX_CANDIDATES
from tandem.metrics import mrr_at_k, ndcg_at_k, recall_at_k


def ranks_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each label among its row's letters (pessimistic on ties)."""
    rows = np.arange(len(labels))
    target = logits[rows, labels][:, None]
    return ((logits > target).sum(1) + (logits == target).sum(1) - 1).astype(np.int64)


def tune_rank_weight(logits: np.ndarray, labels: np.ndarray, retriever_scores: np.ndarray):
    """The serving fusion weight with the best validation NDCG@10, and the NDCG per weight."""

    def ndcg(weight: float) -> float:
        fused = [fuse(r, s, weight) for r, s in zip(retriever_scores, logits, strict=True)]
        return ndcg_at_k(ranks_from_logits(np.stack(fused), labels), 10)

    return tune_weight(ndcg)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-row Spearman correlation of two score matrices ``[rows, n]`` (no ties assumed)."""
    ra = np.argsort(np.argsort(a, axis=1), axis=1).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=1), axis=1).astype(np.float64)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return float(np.mean((ra * rb).sum(1) / np.maximum(denom, 1e-12)))


def validate(model: RankerModel, valid: ValidationSet, batch_size: int) -> dict:
    model.train(False)
    logits, losses = [], []
    with torch.no_grad():
        for start in range(0, len(valid.layouts), batch_size):
            chunk = model.logits(valid.layouts[start : start + batch_size])
            target = torch.as_tensor(valid.labels[start : start + batch_size])
            losses.append(torch.nn.functional.cross_entropy(chunk, target, reduction="sum").item())
            logits.append(chunk.float().numpy())
    model.train(True)
    logits_all = np.concatenate(logits)
    ranks = ranks_from_logits(logits_all, valid.labels)
    retrieved = (valid.retriever_ranks >= 0).any()
    shown = np.where(valid.retriever_ranks >= 0, valid.retriever_ranks, MAX_CANDIDATES - 1)
    metrics = {
        "valid_loss": round(sum(losses) / len(valid.labels), 4),
        "valid_hr@1": round(recall_at_k(ranks, 1), 4),
        "valid_ndcg@10": round(ndcg_at_k(ranks, 10), 4),
        "valid_mrr@10": round(mrr_at_k(ranks, 10), 4),
        "valid_retriever_order_ndcg@10": round(ndcg_at_k(shown, 10), 4) if retrieved else None,
        "valid_users": len(valid.labels),
    }
    if retrieved:
        weight, curve = tune_rank_weight(logits_all, valid.labels, valid.retriever_scores)
        metrics |= {
            "rank_weight": weight,
            "valid_fused_ndcg@10": curve[str(weight)],
            "valid_spearman_to_retriever": round(spearman(logits_all, valid.retriever_scores), 4),
        }
    return metrics
