"""Exploration slots: the tail of every candidate list is reserved for cold items.

Why: calibrated content vectors (``enrichment.calibration``) put a new item on the warm items'
scale, yet at catalog level a new item almost never outscores the warm items a user's vector
favours (``benchmarks/results/enrichment.md``: catalog recall@20 of held-out items 0.0, against
0.0126 for a random order). So no new item is ever shown, and none ever gathers the
interactions that would warm it up. Reserving the last ``slots`` places of a top-k for the cold
items the user's vector scores highest gives them that exposure, while the head of the list, the
part NDCG@10 and people look at, stays the warm ranking, untouched when ``slots <= k - 10``.

The cold items' vectors stand in for their ID rows in the retriever's item table, so they also
compete in the warm search; an item already found there, in the history or excluded is skipped
when the slots are filled. Filled slots therefore score no higher than the warm items before
them, and a score-sorting consumer (the gateway's fusion) keeps them at the tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ColdSlots:
    """The catalog's cold items with their ID-space vectors, and how many slots they get."""

    indices: np.ndarray  # [n] catalog indices (1-based; 0 is padding) of the cold items
    vectors: np.ndarray  # [n, d] their vectors in the retriever's item space (calibrated)
    slots: int  # places reserved at the tail of each top-k; 0 = off

    def __post_init__(self) -> None:
        if self.slots < 0:
            raise ValueError(f"slots must be >= 0, got {self.slots}")
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.indices):
            raise ValueError(
                f"{len(self.indices)} cold items but vectors of shape {self.vectors.shape}"
            )
        if len(self.indices) and int(np.min(self.indices)) < 1:
            raise ValueError("cold item indices start at 1 (0 is padding)")

    def best(
        self, user_vector: np.ndarray, count: int, barred: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` cold items (catalog indices) the user's vector scores highest, best
        first, with their scores; items in ``barred`` are skipped."""
        if count <= 0 or not len(self.indices):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores = self.vectors @ np.asarray(user_vector, dtype=np.float32)
        allowed = np.flatnonzero(~np.isin(self.indices, barred))
        top = allowed[np.argsort(-scores[allowed], kind="stable")[:count]]
        return self.indices[top].astype(np.int64), scores[top].astype(np.float32)


def fill_cold_slots(
    items: np.ndarray,
    scores: np.ndarray,
    user_vector: np.ndarray,
    cold: ColdSlots,
    k: int,
    barred: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """A warm top list (best first, at most ``k - cold.slots`` long) completed to at most ``k``
    with the best cold items not in it and not ``barred`` (history and exclusions)."""
    reserved = min(cold.slots, k)
    items, scores = items[: k - reserved], scores[: k - reserved]
    extra, extra_scores = cold.best(user_vector, reserved, np.concatenate([barred, items]))
    return np.concatenate([items, extra]), np.concatenate([scores, extra_scores])


def table_with_cold_rows(item_vectors: np.ndarray, cold: ColdSlots) -> np.ndarray:
    """The retriever's item table with each cold item's row replaced by its cold vector."""
    if cold.vectors.shape[1] != item_vectors.shape[1]:
        raise ValueError(
            f"cold vectors have {cold.vectors.shape[1]} dimensions, the retriever's items "
            f"{item_vectors.shape[1]}"
        )
    if len(cold.indices) and int(np.max(cold.indices)) >= len(item_vectors):
        raise ValueError(
            f"cold item index {int(np.max(cold.indices))} is outside the retriever's "
            f"{len(item_vectors) - 1} items"
        )
    table = np.array(item_vectors, dtype=np.float32, copy=True)
    table[cold.indices] = cold.vectors
    return table
