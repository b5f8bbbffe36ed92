"""Full-ranking evaluation: every item is a candidate, the user's history is masked.

This is the protocol of LlamaRec / MLLM4Rec (leave-one-out, ranking against ALL items, not a
sample of negatives). It is model-agnostic: callers pass a batch scoring function
``histories -> scores [B, num_items + 1]`` (column 0 is padding), so the same code evaluates a
retriever, a baseline, or a peer's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.table import Table

from tandem.data import PADDING_INDEX
from tandem.metrics import DEFAULT_KS, ranking_table, ranks_from_scores

ScoreFn = Callable[[list[np.ndarray]], np.ndarray]


@dataclass
class EvaluationResult:
    """Per-user ranks (0-based among all unmasked items) and the metric table they give."""

    split: str
    ranks: np.ndarray
    metrics: dict[str, float]
    ks: tuple[int, ...] = DEFAULT_KS
    extra: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.ranks)

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "users": self.num_users,
            "metrics": self.metrics,
            **({"extra": self.extra} if self.extra else {}),
        }


def masked_scores(scores: np.ndarray, histories: Sequence[np.ndarray], targets: np.ndarray) -> None:
    """In place: padding and each user's history get ``-inf``; the target keeps its score.

    The target is kept even when the user consumed it before (repeat datasets), so a repeat is
    ranked like any other item rather than dropped to the bottom.
    """
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets].copy()
    scores[:, PADDING_INDEX] = -np.inf
    for row, history in enumerate(histories):
        scores[row, history] = -np.inf
    scores[rows, targets] = target_scores


def full_ranking_ranks(
    score_fn: ScoreFn,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """0-based rank of each target among all items (pessimistic on ties), history masked."""
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets")
    if (targets <= PADDING_INDEX).any():
        raise ValueError("targets must be real item indices (>= 1), not padding")
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        batch = list(histories[start : start + batch_size])
        batch_targets = targets[start : start + batch_size]
        scores = np.array(score_fn(batch), dtype=np.float32, copy=True)
        if scores.ndim != 2 or scores.shape[0] != len(batch):
            raise ValueError(f"score_fn returned shape {scores.shape} for {len(batch)} histories")
        if int(batch_targets.max()) >= scores.shape[1]:
            raise ValueError(
                f"score_fn returned {scores.shape[1]} columns but a target index is "
                f"{int(batch_targets.max())}: scores need num_items + 1 columns"
            )
        masked_scores(scores, batch, batch_targets)
        ranks[start : start + len(batch)] = ranks_from_scores(scores, batch_targets)
    return ranks


def evaluate_full_ranking(
    score_fn: ScoreFn,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    split: str = "test",
    ks: tuple[int, ...] = DEFAULT_KS,
    batch_size: int = 256,
) -> EvaluationResult:
    """Ranks plus Recall/NDCG/MRR at each K (``"ndcg@10"`` style keys)."""
    ranks = full_ranking_ranks(score_fn, histories, targets, batch_size=batch_size)
    return EvaluationResult(split=split, ranks=ranks, metrics=ranking_table(ranks, ks), ks=ks)


def render_table(result: EvaluationResult, title: str = "Full-ranking metrics") -> Table:
    """One row per K with Recall, NDCG and MRR, for the CLI."""
    table = Table(title=f"{title}: {result.num_users} users, {result.split} split")
    for column in ("K", "Recall", "NDCG", "MRR"):
        table.add_column(column, justify="right")
    for k in result.ks:
        m = result.metrics
        table.add_row(
            str(k), f"{m[f'recall@{k}']:.4f}", f"{m[f'ndcg@{k}']:.4f}", f"{m[f'mrr@{k}']:.4f}"
        )
    return table
