"""From dataset indices to ``PromptInput``: item features, retriever candidates, negatives.

Training and offline evaluation both describe a user by catalog indices; these helpers turn
them into prompt items (title, caption, multimodal embedding), ask the retriever for its user
vector and top-k (history masked, as in serving), and draw the 19 negatives of a training
example (retriever hard negatives mixed with random items).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ranker.prompts import PromptInput, PromptItem
from tandem.data import PADDING_INDEX, Catalog


@dataclass
class ItemFeatures:
    """What a prompt may show of each item, by catalog index (row 0 is padding)."""

    titles: list[str]
    captions: list[str | None]
    embeddings: np.ndarray | None = None  # [num_items + 1, d]: item soft-token inputs
    ids: list[str] | None = None  # item id per row (row 0, padding, is "")

    @classmethod
    def build(
        cls,
        catalog: Catalog,
        captions: Mapping[str, str] | None = None,
        embeddings: np.ndarray | None = None,
    ) -> ItemFeatures:
        captions = captions or {}
        ids = catalog.item_ids
        if embeddings is not None and embeddings.shape[0] != len(ids) + 1:
            raise ValueError(
                f"item embeddings have {embeddings.shape[0]} rows; the catalog needs "
                f"{len(ids) + 1} (items + padding row)"
            )
        titles = ["", *catalog.frame["title"].astype(str).tolist()]
        return cls(
            titles=titles,
            captions=[None, *(captions.get(i) for i in ids)],
            embeddings=None if embeddings is None else np.asarray(embeddings, np.float32),
            ids=["", *ids],
        )

    @property
    def embedding_dim(self) -> int | None:
        return None if self.embeddings is None else int(self.embeddings.shape[1])

    def item(self, index: int) -> PromptItem:
        embedding = None if self.embeddings is None else self.embeddings[index]
        item_id = None if self.ids is None else self.ids[index]
        return PromptItem(self.titles[index], self.captions[index], embedding, item_id)


class CandidateSource:
    """The retriever seen by the ranker: user vectors and inner-product top-k over items."""

    def __init__(self, retriever):
        self.retriever = retriever
        table = retriever.item_embeddings()
        if hasattr(table, "detach"):
            table = table.detach().cpu().numpy()
        self.item_table = np.asarray(table, dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.item_table.shape[1])

    def scores(self, vector: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The retriever's scores of ``items`` (catalog indices) for one user vector."""
        return self.item_table[items] @ vector

    def user_vectors(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        vectors = self.retriever.user_vectors([np.asarray(h, dtype=np.int64) for h in histories])
        if hasattr(vectors, "detach"):
            vectors = vectors.detach().cpu().numpy()
        return np.asarray(vectors, dtype=np.float32)

    def top_k(
        self, histories: Sequence[np.ndarray], k: int, vectors: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``[B, k]`` item indices best first (history and padding masked), and their scores."""
        vectors = self.user_vectors(histories) if vectors is None else vectors
        scores = vectors @ self.item_table.T
        scores[:, PADDING_INDEX] = -np.inf
        for row, history in enumerate(histories):
            scores[row, np.asarray(history, dtype=np.int64)] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)


def sample_candidates(
    rng: np.random.Generator,
    target: int,
    history: np.ndarray,
    retrieved: np.ndarray,
    num_items: int,
    num_negatives: int = 19,
    hard_ratio: float = 0.5,
) -> tuple[np.ndarray, int]:
    """``num_negatives`` negatives + the target in a random order, and the target's position.

    ``round(hard_ratio * num_negatives)`` negatives come from ``retrieved`` (the retriever's top
    list, target removed); the rest are uniform over items outside the history.
    """
    seen = set(history.tolist()) | {target}
    hard_pool = [i for i in retrieved.tolist() if i not in seen]
    n_hard = min(round(hard_ratio * num_negatives), len(hard_pool))
    chosen = list(rng.choice(hard_pool, size=n_hard, replace=False)) if n_hard else []
    taken = seen | set(chosen)
    if num_items - len(taken) < num_negatives - n_hard:
        raise ValueError(f"only {num_items} items: not enough for {num_negatives} negatives")
    while len(chosen) < num_negatives:
        item = int(rng.integers(1, num_items + 1))
        if item not in taken:
            chosen.append(item)
            taken.add(item)
    candidates = np.array([target, *chosen], dtype=np.int64)
    rng.shuffle(candidates)
    return candidates, int(np.flatnonzero(candidates == target)[0])


def prompt_input(
    features: ItemFeatures,
    history: np.ndarray,
    candidates: np.ndarray,
    preference: str | None = None,
    user_vector: np.ndarray | None = None,
    retriever_scores: np.ndarray | None = None,
    timestamp: float | None = None,
    user_attributes: Mapping[str, object] | None = None,
) -> PromptInput:
    """A ``PromptInput`` for catalog indices (history oldest first, candidates in shown order)."""
    return PromptInput(
        history=[features.item(int(i)) for i in history],
        candidates=[features.item(int(i)) for i in candidates],
        preference=preference,
        user_embedding=user_vector,
        retriever_scores=retriever_scores,
        timestamp=timestamp,
        user_attributes=user_attributes,
    )
