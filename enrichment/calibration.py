"""Cold-start calibration: content vectors mapped onto the retriever's ID item vectors.

The fusion encoder (InfoNCE) learns where an item points in the ID space, not how far or from
where: ranked by inner product against trained ID vectors, a cold item's content vector lands
below random at catalog level. Calibration fixes that, fit on warm items only:

1. **Map.** Ridge regression (closed form, with an intercept) from content features to the
   item's ID vector: ``mean + content @ weight``, the ID vector the content predicts.
2. **Level and spread.** A regression predicts a conditional mean, shrunk towards the average
   item, so no cold item would ever reach a top-k. The vector becomes
   ``mean + level * (top - mean) + spread * (content @ weight)``, where ``top`` is the mean ID
   vector of the items in probe users' top-k: ``level`` lifts cold scores towards where a
   user's recommendations score, ``spread`` sets how far content moves them.
3. **Choice by simulation.** Warm items held out of the map's fit play cold items: their ID
   rows are replaced by calibrated vectors, and (level, spread) is the grid point with the
   best recall of these pseudo-cold items among probe users' validation targets whose warm
   NDCG@10 drops by at most ``max_warm_drop`` (relative). Nothing looks at real cold items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

RIDGE_GRID = (0.1, 1.0, 10.0, 100.0)  # ridge strengths tried, relative to mean feature power
LEVEL_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
SPREAD_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)  # times the spread that matches warm scores
TOP_K = 20


@dataclass(frozen=True)
class ProbeUsers:
    """Retriever vectors of validation histories, their targets and the histories (masked)."""

    vectors: np.ndarray  # [n, d]
    targets: np.ndarray  # [n] catalog indices
    histories: list[np.ndarray]


@dataclass(frozen=True)
class ColdStartCalibration:
    """``vector = bias + spread * (content @ weight)`` for a cold item's content features."""

    weight: np.ndarray  # [content_dim, id_dim]
    bias: np.ndarray  # [id_dim]: mean + level * (top - mean)
    spread: float
    level: float
    ridge: float
    pseudo_cold_recall: float  # recall@20 of held-out warm items played as cold (probe users)
    warm_ndcg_change: float  # relative change of probe users' warm NDCG@10 in that simulation

    def apply(self, content: np.ndarray) -> np.ndarray:
        """Calibrated ID-space vectors of content features ``[n, content_dim]``."""
        content = np.asarray(content, dtype=np.float32)
        return (self.bias + self.spread * (content @ self.weight)).astype(np.float32)

    def summary(self) -> dict[str, float]:
        return {
            "calibration_ridge": round(self.ridge, 6),
            "calibration_level": self.level,
            "calibration_spread": round(self.spread, 4),
            "calibration_pseudo_cold_recall@20": round(self.pseudo_cold_recall, 4),
            "calibration_warm_ndcg@10_change": round(self.warm_ndcg_change, 4),
        }

    def save(self, path: Path) -> None:
        numbers = ("spread", "level", "ridge", "pseudo_cold_recall", "warm_ndcg_change")
        save_file(
            {"weight": self.weight.astype(np.float32), "bias": self.bias.astype(np.float32)},
            str(path),
            metadata={
                **{name: repr(float(getattr(self, name))) for name in numbers},
                "meaning": json.dumps("vector = bias + spread * (content @ weight)"),
            },
        )

    @classmethod
    def load(cls, path: Path) -> ColdStartCalibration:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        return cls(
            tensors["weight"],
            tensors["bias"],
            *(float(meta[k]) for k in ("spread", "level", "ridge")),
            *(float(meta[k]) for k in ("pseudo_cold_recall", "warm_ndcg_change")),
        )


def fit_calibration(
    content: np.ndarray,
    id_embeddings: np.ndarray,
    fit_rows: np.ndarray,
    check_rows: np.ndarray,
    probes: ProbeUsers,
    max_warm_drop: float = 0.01,
) -> ColdStartCalibration:
    """Fit the map on ``fit_rows``; choose ridge, level and spread with ``check_rows`` (warm
    items held out of the fit) played as cold items for the ``probes``."""
    if len(fit_rows) < 2 or len(check_rows) < 2 or len(probes.vectors) < 2:
        raise ValueError(
            "calibration needs at least 2 fit items, 2 held-out warm items and 2 probe users; "
            f"got {len(fit_rows)}, {len(check_rows)} and {len(probes.vectors)}"
        )
    x = np.asarray(content, dtype=np.float64)
    y = np.asarray(id_embeddings, dtype=np.float64)
    users = np.asarray(probes.vectors, dtype=np.float64)
    ridge, weight, mean = _ridge(x, y, fit_rows, check_rows, users)
    deviation = x[check_rows] @ weight
    base_spread = _matching_spread(users @ y[check_rows].T, users @ deviation.T)
    simulation = _Simulation(y, check_rows, probes)
    top = simulation.top_mean()
    best: tuple[float, float, float, float, float] | None = None  # recall, -|change|, change,
    # level, spread: the best pseudo-cold recall, then the smallest warm change
    for level in LEVEL_GRID:
        bias = mean + level * (top - mean)
        for factor in SPREAD_GRID:
            spread = base_spread * factor
            recall, change = simulation.score(bias + spread * deviation)
            if change < -max_warm_drop:
                continue
            key = (recall, -abs(change), change, level, spread)
            if best is None or key[:2] > best[:2]:
                best = key
    recall, _, change, level, spread = best if best is not None else (0.0, 0.0, 0.0, 0.0, 0.0)
    bias = mean + level * (top - mean)
    return ColdStartCalibration(
        weight.astype(np.float32), bias.astype(np.float32), spread, level, ridge, recall, change
    )


def _ridge(
    x: np.ndarray, y: np.ndarray, fit_rows: np.ndarray, check_rows: np.ndarray, users: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """(ridge, weight, mean ID vector): the ridge with the lowest held-out score error."""
    x_mean, y_mean = x[fit_rows].mean(axis=0), y[fit_rows].mean(axis=0)
    xc, yc = x[fit_rows] - x_mean, y[fit_rows] - y_mean
    gram, cross = xc.T @ xc, xc.T @ yc
    power = max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    target = users @ (y[check_rows] - y_mean).T
    best: tuple[float, float, np.ndarray] | None = None
    for relative in RIDGE_GRID:
        weight = np.linalg.solve(gram + relative * power * np.eye(gram.shape[0]), cross)
        predicted = users @ ((x[check_rows] - x_mean) @ weight).T
        error = float(np.mean((predicted - target) ** 2))
        if best is None or error < best[0]:
            best = (error, relative * power, weight)
    assert best is not None
    _, ridge, weight = best
    # the intercept folds the content mean in: content @ weight is the deviation from y_mean
    return ridge, weight, y_mean - x_mean @ weight


def _matching_spread(true_scores: np.ndarray, predicted: np.ndarray) -> float:
    """The stretch giving predicted scores the per-user spread of the true ID scores."""
    true_spread = (true_scores - true_scores.mean(axis=1, keepdims=True)).std()
    spread = (predicted - predicted.mean(axis=1, keepdims=True)).std()
    return float(true_spread / spread) if np.isfinite(spread) and spread > 0 else 1.0


class _Simulation:
    """Held-out warm items played as cold: pseudo-cold recall and warm NDCG@10 change."""

    def __init__(self, ids: np.ndarray, check_rows: np.ndarray, probes: ProbeUsers):
        self.ids, self.rows = ids, np.asarray(check_rows)
        self.users = np.asarray(probes.vectors, dtype=np.float64)
        self.targets = np.asarray(probes.targets)
        self.mask = np.zeros((len(self.users), ids.shape[0]), dtype=bool)
        self.mask[:, 0] = True
        for row, history in enumerate(probes.histories):
            self.mask[row, np.asarray(history, dtype=np.int64)] = True
        self.cold_case = np.isin(self.targets, self.rows)
        absent = self.users @ ids.T
        absent[:, self.rows] = -np.inf  # before calibration these items could not be retrieved
        self.baseline = self._ndcg(absent, ~self.cold_case)

    def top_mean(self) -> np.ndarray:
        """Mean ID vector of the warm items in the probe users' top-k (history masked)."""
        scores = self.users @ self.ids.T
        scores[self.mask] = -np.inf
        scores[:, self.rows] = -np.inf
        top = np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K]
        return self.ids[top.ravel()].mean(axis=0)

    def score(self, vectors: np.ndarray) -> tuple[float, float]:
        matrix = self.ids.copy()
        matrix[self.rows] = vectors
        scores = self.users @ matrix.T
        ranks = self._ranks(scores)
        cold = ranks[self.cold_case]
        recall = float((cold < TOP_K).mean()) if len(cold) else 0.0
        ndcg = self._ndcg(scores, ~self.cold_case, ranks)
        change = ndcg / self.baseline - 1.0 if self.baseline > 0 else 0.0
        return recall, change

    def _ranks(self, scores: np.ndarray) -> np.ndarray:
        scores = np.where(self.mask, -np.inf, scores)
        target = scores[np.arange(len(scores)), self.targets]
        return (scores > target[:, None]).sum(axis=1)

    def _ndcg(self, scores: np.ndarray, cases: np.ndarray, ranks: np.ndarray | None = None):
        ranks = self._ranks(scores) if ranks is None else ranks
        ranks = ranks[cases]
        gains = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
        return float(gains.mean()) if len(gains) else 0.0
