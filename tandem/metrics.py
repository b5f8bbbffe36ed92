"""Ranking metrics for one held-out item per user, vectorised over users.

All functions take ``ranks``: the 0-based position of the target in the ranked list, with
``-1`` (or any negative) meaning "not in the list" (a miss). With a single relevant item,
Recall@K equals HitRate@K, NDCG@K is 1/log2(rank + 2) inside the top K, and MRR@K is
1/(rank + 1) inside the top K.
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (5, 10, 20)


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among all columns, pessimistic on ties.

    A column tied with the target counts as ranked above it, so constant scores cannot look
    good. Masked columns should be set to ``-inf`` by the caller; the target must not be masked.
    """
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets][:, None]
    above = (scores > target_scores).sum(axis=1)
    ties = (scores == target_scores).sum(axis=1) - 1
    return (above + ties).astype(np.int64)


def ranks_in_lists(ranked_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each target in its row of ranked item ids, -1 when absent."""
    hits = ranked_items == targets[:, None]
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1), -1).astype(np.int64)


def _in_top(ranks: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (ranks >= 0) & (ranks < k)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    return float(_in_top(ranks, k).mean()) if len(ranks) else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    return float(ndcg_per_user(ranks, k).mean()) if len(ranks) else 0.0


def mrr_at_k(ranks: np.ndarray, k: int) -> float:
    if not len(ranks):
        return 0.0
    return float(np.where(_in_top(ranks, k), 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0).mean())


def hit_rate_at_1(ranks: np.ndarray) -> float:
    return recall_at_k(ranks, 1)


def sampled_auc(target_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Mean over users of P(target > negative), ties counting one half (CIT-Rec's AUC).

    ``target_scores`` has shape [U]; ``negative_scores`` [U, N].
    """
    if not len(target_scores):
        return 0.0
    target = target_scores[:, None]
    wins = (negative_scores < target).mean(axis=1) + 0.5 * (negative_scores == target).mean(axis=1)
    return float(wins.mean())


def ranking_table(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Recall, NDCG and MRR at each K, keyed like ``"ndcg@10"``."""
    table: dict[str, float] = {}
    for k in ks:
        table[f"recall@{k}"] = recall_at_k(ranks, k)
        table[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
        table[f"mrr@{k}"] = mrr_at_k(ranks, k)
    return table


def ndcg_per_user(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's NDCG@k (a miss, rank -1 or >= k, scores 0): the unit a paired test resamples."""
    return np.where(_in_top(ranks, k), 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of mean(a - b) over users resampled with replacement (paired).

    ``a`` and ``b`` are per-user values of two systems on the same users, in the same order.
    """
    if a.shape != b.shape or not len(a):
        raise ValueError("paired bootstrap needs two equally long, non-empty per-user arrays")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):
        stop = min(start + 1000, resamples)
        picks = rng.integers(0, len(diff), size=(stop - start, len(diff)))
        means[start:stop] = diff[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)
