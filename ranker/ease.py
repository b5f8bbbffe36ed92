"""What the whole history says: each candidate's EASE score, with the user's own row left out.

A sequence model reads the last items most; co-visitation (``ranker.covisit``) adds what
people watched *next* after them. Neither asks what the user's whole history, as a set,
predicts. EASE (Steck, 2019) does, and it is the strongest simple item-item model on
MovieLens: an item-item weight matrix ``B = I - P / diag(P)`` with ``P = (X^T X + lam I)^-1``
over the training user-item matrix ``X``, and the score of item ``j`` for a history ``h`` is
``sum_{i in h} B[i, j]``.

The requesting user's own row is left out ("other people", as the other run tables do): a
training list would otherwise find its own target through its user's co-occurrences. Taking
one row ``x`` out of ``X^T X`` is a rank-one update of ``P`` (Sherman-Morrison), so the score
without it has a closed form that costs one pass over ``P``'s rows of the history and of
``x``, never a new inverse:

    v = P x,  w = P x_h,  c = 1 - x.v,  a = x_h.v
    sum_{i in h} P'[i, j] = w_j + v_j a / c,   P'[j, j] = P_jj + v_j^2 / c
    score_j = -(sum_{i in h} P'[i, j]) / P'[j, j]   (+1 when j is in h: B'[j, j] = 0)

Training leaves out the user's whole training sequence; serving and evaluation leave out the
request's history, which for a known user is that sequence (plus what came after it; with the
ridge ``lam`` well above a history's spread, ``c`` stays positive). The ranker reads the
score standardised over the list (one column): only differences between candidates count.

Dense over the catalogue: fine for MovieLens-sized item sets (1,682 items: the counts are
5.7 MB as uint16, inverted at load in under a second); a catalogue of millions would restrict
it to its head items. Saved as the co-occurrence counts and ``lam``, so serving inverts exactly
what training inverted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EASE_FILE = "ease.safetensors"
# the ridge: EASE alone on ML-100K validation (NDCG@10, history masked) scores 0.0858 at 50,
# 0.0875 at 150, 0.0826 at 300, 0.0767 at 600 (benchmarks/ease_lambda.py)
LAMBDA = 150.0


@dataclass(frozen=True)
class EaseTable:
    counts: np.ndarray  # [num_items + 1, num_items + 1] co-occurrence X^T X (row/column 0 unused)
    lam: float
    inverse: np.ndarray  # P = (X^T X + lam I)^-1, float64

    @classmethod
    def from_counts(cls, counts: np.ndarray, lam: float = LAMBDA) -> EaseTable:
        gram = counts.astype(np.float64) + lam * np.eye(len(counts))
        return cls(counts, float(lam), np.linalg.inv(gram))

    @classmethod
    def build(cls, train: Sequence[np.ndarray], num_items: int, lam: float = LAMBDA) -> EaseTable:
        """From training sequences of item indices (1-based); repeats count once."""
        rows = np.zeros((len(train), num_items + 1), dtype=np.float32)
        for user, seq in enumerate(train):
            rows[user, np.asarray(seq, dtype=np.int64)] = 1.0
        rows[:, 0] = 0.0
        counts = np.rint(rows.T @ rows).astype(np.uint16)
        return cls.from_counts(counts, lam)

    def scores(self, history: np.ndarray, items: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Raw EASE scores ``[n]`` of ``items`` for ``history``, with the row ``own`` (item
        indices) taken out of the model. Index 0 (unknown) is never counted."""
        items = np.asarray(items, dtype=np.int64)
        h = _known(history)
        o = _known(own)
        p = self.inverse  # only the few rows and columns needed are read (np.ix_)
        w = p[np.ix_(h, items)].sum(axis=0)
        same = np.array_equal(h, o)  # serving: the history is the row left out
        v = w if same else p[np.ix_(o, items)].sum(axis=0)
        xpx = float(p[np.ix_(o, o)].sum())
        c = max(1.0 - xpx, 1e-6)
        a = xpx if same else float(p[np.ix_(h, o)].sum())
        numerator = w + v * a / c
        denominator = p[items, items] + v * v / c
        out = -numerator / denominator + np.isin(items, h)
        out[items == 0] = 0.0
        return out

    def features(
        self, history: np.ndarray, items: np.ndarray, own: np.ndarray | None = None
    ) -> np.ndarray:
        """``[n, 1]``: the scores standardised over the list (0 for a list without spread)."""
        raw = self.scores(history, items, history if own is None else own)
        spread = raw.std()
        column = (raw - raw.mean()) / spread if spread > 1e-12 else np.zeros_like(raw)
        return column.astype(np.float32)[:, None]

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"counts": np.ascontiguousarray(self.counts)}, str(path), {"lam": repr(self.lam)})

    @classmethod
    def load(cls, path: Path) -> EaseTable:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            lam = float((handle.metadata() or {})["lam"])
            counts = handle.get_tensor("counts")
        return cls.from_counts(counts, lam)


def _known(items: np.ndarray) -> np.ndarray:
    items = np.unique(np.asarray(items, dtype=np.int64))
    return items[items > 0]
