"""Score fusion: the ranker can only re-order what the retriever found, weighted by one knob.

Both score vectors are turned into log-probabilities over the same candidates (log-softmax),
so the weight means the same thing whatever the retriever's score scale:
``fused = (1 - w) * log_softmax(retriever) + w * log_softmax(ranker)``; w = 0 keeps the
retriever's order, w = 1 is the ranker alone. The gateway serves with this formula and the
evaluation and training tune ``w`` with it, so the weight a run recommends is the one served.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FLOOR = -1e4  # stands in for -inf (a letter the backend gave no probability) so JSON stays finite
# Weights tried when tuning: 0.0, 0.1, ..., 1.0.
WEIGHT_GRID = tuple(float(round(w, 2)) for w in np.linspace(0.0, 1.0, 11))


def log_softmax(scores: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=FLOOR, neginf=FLOOR)
    shifted = values - values.max()
    return shifted - np.log(np.exp(shifted).sum())


def fuse(retrieval: np.ndarray, ranker: np.ndarray | None, weight: float) -> np.ndarray:
    """Fused log-scores in candidate order; ``ranker=None`` means retriever order only."""
    base = log_softmax(retrieval)
    if ranker is None:
        return base
    if ranker.shape != base.shape:
        raise ValueError(f"ranker gave {ranker.shape[0]} scores for {base.shape[0]} candidates")
    return (1.0 - weight) * base + weight * log_softmax(ranker)


def order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep candidate (retriever) order."""
    return np.argsort(-scores, kind="stable")


def tune_weight(score_at: Callable[[float], float]) -> tuple[float, dict[str, float]]:
    """The grid weight with the best validation score (ties: the smaller, safer weight), and
    the score per weight, rounded for reports."""
    curve = {w: score_at(w) for w in WEIGHT_GRID}
    best = max(curve, key=lambda w: (round(curve[w], 10), -w))
    return best, {str(w): round(v, 4) for w, v in curve.items()}
