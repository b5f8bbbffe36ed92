"""The LlamaRec two-stage protocol's pieces: the users under evaluation with their retriever
lists, scoring prompts through a ranker, the target's rank, fusion and the paired comparison.

Every evaluated user's held-out item; the retriever ranks ALL items (history masked) and hands
its top-20 in retriever order to the ranker; a user whose item was not retrieved is a miss for
the two-stage system. ``ranker.evaluation`` assembles the report from these, and
``ranker.paper_protocols`` reuses them for the other papers' protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ranker.core import Ranker
from ranker.demographics import attributes_of
from ranker.examples import prompt_input
from ranker.fusion import fuse, tune_weight
from ranker.prompts import PromptInput
from ranker.train import TrainInputs
from ranker.verbalizer import MAX_CANDIDATES, to_candidate_order
from tandem.evaluate import masked_scores
from tandem.metrics import ndcg_at_k, ndcg_per_user, paired_bootstrap_ci, ranks_from_scores

Progress = Callable[[int], None]


@dataclass
class UserSet:
    """Users under evaluation with their histories, targets and retriever results."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray
    vectors: np.ndarray | None
    top: np.ndarray  # [U, 20] retriever order
    times: np.ndarray  # decision time per user: when the last history item was consumed
    top_scores: np.ndarray
    retriever_ranks: np.ndarray  # among all items, history masked

    @property
    def hits(self) -> np.ndarray:
        return np.flatnonzero((self.top == self.targets[:, None]).any(axis=1))


def sample_users(num_users: int, max_users: int | None, seed: int) -> np.ndarray:
    users = np.arange(num_users)
    if max_users is not None and max_users < num_users:
        users = np.sort(np.random.default_rng(seed).choice(num_users, max_users, replace=False))
    return users


def retrieve(inputs: TrainInputs, users: np.ndarray, split: str) -> UserSet:
    """Retriever full ranking (history masked, target kept) and its top-20 per user."""
    data = inputs.dataset.split()
    all_histories = data.test_inputs() if split == "test" else data.valid_inputs()
    targets = (data.test_target if split == "test" else data.valid_target)[users]
    histories = [all_histories[u] for u in users]
    source = inputs.source
    if source is None:
        raise ValueError("two-stage evaluation needs the retriever run")
    vectors = source.user_vectors(histories)
    scores = vectors @ source.item_table.T
    masked_scores(scores, histories, targets)
    ranks = ranks_from_scores(scores, targets)
    top, top_scores = source.top_k(histories, MAX_CANDIDATES, vectors)
    all_times = inputs.dataset.interactions.timestamps()
    last = -2 if split == "test" else -3  # the validation item, or the last training item
    times = np.array([all_times[u][last] for u in users], dtype=np.float64)
    return UserSet(users, histories, targets, vectors, top, times, top_scores, ranks)


def score_inputs(
    ranker: Ranker, inputs: Sequence[PromptInput], progress: Progress | None = None
) -> list[np.ndarray]:
    """Candidate-order log-probs of many inputs, through the ranker's backend in batches."""
    rendered = [ranker.render_all(inp) for inp in inputs]
    flat = [p for prompts, _ in rendered for p in prompts]
    backend = ranker.backend
    chunk = getattr(getattr(backend, "config", None), "max_batch", 8)
    scores: list[np.ndarray] = []
    for start in range(0, len(flat), chunk):
        batch = flat[start : start + chunk]
        if hasattr(backend, "score_sync"):
            scores.extend(backend.score_sync(batch))
        else:
            import asyncio

            scores.extend(asyncio.run(backend.score(batch)))
        if progress is not None:
            progress(len(batch))
    out, at = [], 0
    for prompts, orders in rendered:
        out.append(to_candidate_order(np.stack(scores[at : at + len(prompts)]), orders))
        at += len(prompts)
    return out


def rank_of(scores: np.ndarray, target: int) -> int:
    """0-based rank of candidate ``target`` (pessimistic on ties)."""
    value = scores[target]
    return int((scores > value).sum() + (scores == value).sum() - 1)


def user_input(inputs: TrainInputs, users: UserSet, r: int, candidates: np.ndarray) -> PromptInput:
    """User row ``r`` with ``candidates`` in the given order, and their retriever scores."""
    ids = inputs.dataset.interactions.user_ids
    vector = None if users.vectors is None else users.vectors[r]
    scores = None if vector is None else inputs.source.scores(vector, candidates)
    return prompt_input(
        inputs.features,
        users.histories[r],
        candidates,
        inputs.preferences.get(ids[users.users[r]]),
        vector,
        scores,
        float(users.times[r]),
        attributes_of(inputs.dataset.profile(ids[users.users[r]])),
    )


def hit_inputs(inputs: TrainInputs, users: UserSet, rows: np.ndarray) -> list[PromptInput]:
    return [user_input(inputs, users, r, users.top[r]) for r in rows]


def two_stage_ranks(users: UserSet, rows: np.ndarray, scores: list[np.ndarray]) -> np.ndarray:
    """Per user: the ranker's rank of the target for hits, -1 (a miss) otherwise."""
    ranks = np.full(len(users.users), -1, dtype=np.int64)
    for r, row_scores in zip(rows, scores, strict=True):
        position = int(np.flatnonzero(users.top[r] == users.targets[r])[0])
        ranks[r] = rank_of(row_scores, position)
    return ranks


def fused_two_stage_ranks(users: UserSet, rows, scores, weight: float) -> np.ndarray:
    """``two_stage_ranks`` of the gateway's fused score (``ranker.fusion.fuse``) at ``weight``."""
    fused = [fuse(users.top_scores[r], s, weight) for r, s in zip(rows, scores, strict=True)]
    return two_stage_ranks(users, rows, fused)


def tune_fusion(users: UserSet, rows: np.ndarray, scores: list[np.ndarray]) -> tuple[float, dict]:
    """The weight with the best validation NDCG@10 (ties: the smaller weight)."""
    return tune_weight(lambda w: ndcg_at_k(fused_two_stage_ranks(users, rows, scores, w), 10))


def paired_comparison(fused_ranks: np.ndarray, retriever_ranks: np.ndarray, seed: int) -> dict:
    """Fused two-stage vs the retriever on the same users: NDCG@10 difference, its paired
    bootstrap 95% interval, and the relative gain."""
    fused = ndcg_per_user(fused_ranks, 10)
    base = ndcg_per_user(retriever_ranks, 10)
    lo, hi = paired_bootstrap_ci(fused, base, seed=seed)
    return {
        "ndcg10_diff": round(float(fused.mean() - base.mean()), 5),
        "ndcg10_diff_ci95": [round(lo, 5), round(hi, 5)],
        "ndcg10_ratio": round(float(fused.mean() / max(base.mean(), 1e-12)), 4),
    }


def rounded(table: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in table.items()}
