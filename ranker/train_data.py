"""What the ranker trains and validates on: batches of rendered prompts from the real data.

An example is one step of a user's training sequence: the history so far and the next item as
the target among other candidates. Two ways to pick the candidates:

- ``sampled`` (LlamaRec): the target + negatives (retriever hard negatives mixed with random
  items) in a shuffled order;
- ``retrieved`` (what serving shows): the retriever's top-20, keeping only the examples whose
  target the retriever found; a curriculum stage with fewer candidates keeps the target and a
  random subset of the others. Shown in a random order (``shuffle``, the default): in
  retriever order the letter itself is the retriever's rank, and a ranker trained that way
  learned to read the letter instead of its candidate's evidence (it matched the retriever on
  its own lists and was at chance on shuffled or random ones).

Every prompt carries the candidates' retriever scores (for signal tokens and distillation).
The example order is a seeded permutation per epoch, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Protocol

import numpy as np
import pandas as pd

from ranker.covisit import CovisitTable
from ranker.demographics import DemographicTable, attributes_of
from ranker.ease import EaseTable
from ranker.examples import CandidateSource, ItemFeatures, prompt_input, sample_candidates
from ranker.lifecycle import LifecycleTable
from ranker.prompts import PromptConfig, PromptInput, PromptLayout, PromptTokenizer, render_prompt
from ranker.run_tables import RunTables
from ranker.trends import TrendTable
from ranker.verbalizer import MAX_CANDIDATES
from tandem.data import Dataset

CANDIDATE_MODES = ("sampled", "retrieved")


@dataclass
class TrainInputs:
    """Everything training reads besides the LLM."""

    dataset: Dataset
    features: ItemFeatures
    source: CandidateSource | None = None  # the retriever: hard negatives and user vectors
    preferences: Mapping[str, str] = field(default_factory=dict)  # user_id -> text


@dataclass(frozen=True)
class ExampleConfig:
    """How examples are drawn (a slice of ``TrainConfig``)."""

    prompt: PromptConfig
    candidates: str = "sampled"  # "sampled" or "retrieved" (see the module docstring)
    num_negatives: int = MAX_CANDIDATES - 1
    hard_negative_ratio: float = 0.5  # sampled mode: share of negatives from the top-20
    steps_per_user: int = 0  # most recent steps of each user's sequence used; 0 = all
    min_history: int = 1
    part_dropout: float = 0.0  # per example, drop preference / item / user tokens
    valid_users: int = 64
    trends: bool = False  # candidates carry recent popularity at decision time (ranker.trends)
    covisit: bool = False  # candidates carry other people's co-visitation (ranker.covisit)
    demographics: bool = False  # candidates carry their lift in the user's groups
    ease: bool = False  # candidates carry the history's EASE score (ranker.ease)
    lifecycle: bool = False  # candidates carry their use so far and age (ranker.lifecycle)
    shuffle: bool = True  # retrieved mode: show the top-20 in a random order (see below)
    seed: int = 0


@dataclass
class TrainBatch:
    layouts: list[PromptLayout]
    labels: list[int]  # the target's position among each prompt's candidates
    teacher: list[np.ndarray] | None  # retriever scores in shown order (None without one)
    consumed: int  # example-order entries used (some are skipped in retrieved mode)


@dataclass
class ValidationSet:
    """LlamaRec-style validation: the validation item among the retriever's top-20."""

    layouts: list[PromptLayout]
    labels: np.ndarray  # the validation item's position among the candidates
    retriever_ranks: np.ndarray  # its retriever rank (-1 without a retriever)
    retriever_scores: np.ndarray  # [users, 20] retriever scores in candidate order ([users, 0])


class ExampleSource(Protocol):
    """Anything the training loop can draw batches from (real data or a synthetic task)."""

    def batch(self, cursor: int, size: int, num_candidates: int) -> TrainBatch: ...

    def validation_set(self) -> ValidationSet: ...


def example_pool(train: list[np.ndarray], steps_per_user: int, min_history: int) -> np.ndarray:
    """``[n, 2]`` (user, position): predict ``train[user][position]`` from what precedes it."""
    rows = []
    for user, seq in enumerate(train):
        start = max(min_history, 1)
        positions = list(range(start, len(seq)))
        if steps_per_user:
            positions = positions[-steps_per_user:]
        rows.extend((user, p) for p in positions)
    if not rows:
        raise ValueError("no training examples: sequences are too short for min_history")
    return np.asarray(rows, dtype=np.int64)


def drop_parts(inp: PromptInput, rng: np.random.Generator, rate: float) -> PromptInput:
    """Independently drop the preference, the item embeddings and the user vector."""
    if rate <= 0:
        return inp
    if rng.random() < rate:
        inp = replace(inp, preference=None)
    if rng.random() < rate:
        inp = replace(
            inp,
            history=[replace(i, embedding=None) for i in inp.history],
            candidates=[replace(i, embedding=None) for i in inp.candidates],
        )
    if rng.random() < rate:
        inp = replace(inp, user_embedding=None)
    return inp


def subset_in_order(
    rng: np.random.Generator, top: np.ndarray, target_at: int, size: int
) -> np.ndarray:
    """Positions of ``size`` candidates of ``top``: the target and random others, in order."""
    if size >= len(top):
        return np.arange(len(top))
    others = np.delete(np.arange(len(top)), target_at)
    picked = rng.choice(others, size=size - 1, replace=False)
    return np.sort(np.append(picked, target_at))


class ExampleMaker:
    """Builds the training and validation prompts of one run from the dataset and retriever."""

    def __init__(self, inputs: TrainInputs, config: ExampleConfig, tokens: PromptTokenizer):
        if config.candidates not in CANDIDATE_MODES:
            raise ValueError(f"candidates must be one of {CANDIDATE_MODES}")
        if config.candidates == "retrieved" and inputs.source is None:
            raise ValueError("retrieved candidates need the retriever run")
        self.inputs = inputs
        self.config = config
        self.tokens = tokens
        self.split = inputs.dataset.split()
        self.user_ids = inputs.dataset.interactions.user_ids
        self.num_items = inputs.dataset.catalog.num_items
        self.pool = example_pool(self.split.train, config.steps_per_user, config.min_history)
        self.times = inputs.dataset.interactions.timestamps()
        self.attributes = [attributes_of(inputs.dataset.profile(u)) for u in self.user_ids]
        self.tables = self._build_tables(config)
        self.index_of = {item_id: n for n, item_id in enumerate(inputs.features.ids or [])}

    def _build_tables(self, config: ExampleConfig) -> RunTables:
        """The run tables ``config`` asks for, from training interactions only."""
        train = self.split.train
        trends = covisit = demographics = ease = lifecycle = None
        times = np.concatenate([t[: len(s)] for t, s in zip(self.times, train, strict=True)])
        if config.trends:
            trends = TrendTable.build(times, np.concatenate(train), self.num_items)
        if config.covisit:
            covisit = CovisitTable.build(train, self.num_items)
        if config.demographics:
            demographics = DemographicTable.build(self.attributes, train, self.num_items)
        if config.ease:
            ease = EaseTable.build(train, self.num_items)
        if config.lifecycle:
            lifecycle = LifecycleTable.build(times, np.concatenate(train), self.num_items)
        return RunTables(trends, covisit, demographics, ease, lifecycle)

    @lru_cache(maxsize=2)  # noqa: B019 - one maker per run; the cache holds two permutations
    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.pool))

    def pairs(self, cursor: int, count: int) -> np.ndarray:
        """Entries ``cursor .. cursor + count`` of the endless seeded example order."""
        rows = []
        for k in range(cursor, cursor + count):
            epoch, at = divmod(k, len(self.pool))
            rows.append(self.pool[self._epoch(epoch)[at]])
        return np.asarray(rows, dtype=np.int64)

    def _preference(self, user: int) -> str | None:
        return self.inputs.preferences.get(self.user_ids[user])

    def _vectors_and_top(self, histories: list[np.ndarray]):
        """User vectors, the retriever's top-20 and their scores (empty without a retriever)."""
        source = self.inputs.source
        if source is None:
            empty = np.zeros((len(histories), 0))
            return [None] * len(histories), empty.astype(np.int64), empty
        vectors = source.user_vectors(histories)
        top, scores = source.top_k(histories, MAX_CANDIDATES, vectors)
        return list(vectors), top, scores

    def _scores(self, vector: np.ndarray | None, candidates: np.ndarray) -> np.ndarray | None:
        if vector is None or self.inputs.source is None:
            return None
        return self.inputs.source.scores(vector, candidates)

    def _render(
        self,
        inp: PromptInput,
        rng: np.random.Generator | None = None,
        own: np.ndarray | None = None,
    ) -> PromptLayout:
        """``own``: the user's training sequence, left out of every run table's counts."""
        if rng is not None:
            inp = drop_parts(inp, rng, self.config.part_dropout)
        inp = self.tables.apply(inp, self.index_of, own)
        return render_prompt(inp, self.config.prompt, self.tokens)

    def batch(self, cursor: int, size: int, num_candidates: int = MAX_CANDIDATES) -> TrainBatch:
        """``size`` examples from ``cursor`` on; each depends on its (user, position) alone."""
        layouts, labels, teacher = [], [], []
        consumed = 0
        while len(layouts) < size:
            want = size - len(layouts)
            chunk = self.pairs(
                cursor + consumed, want if self.config.candidates == "sampled" else 2 * want
            )
            histories = [self.split.train[u][:p] for u, p in chunk]
            vectors, top, _ = self._vectors_and_top(histories)
            for row, (user, position) in enumerate(chunk):
                consumed += 1
                target = int(self.split.train[user][position])
                rng = np.random.default_rng([self.config.seed, int(user), int(position)])
                if self.config.candidates == "retrieved":
                    found = np.flatnonzero(top[row] == target)
                    if not len(found):
                        continue
                    keep = subset_in_order(rng, top[row], int(found[0]), num_candidates)
                    if self.config.shuffle:
                        keep = rng.permutation(keep)
                    candidates = top[row][keep]
                    label = int(np.flatnonzero(candidates == target)[0])
                else:
                    candidates, label = sample_candidates(
                        rng,
                        target,
                        histories[row],
                        top[row],
                        self.num_items,
                        min(self.config.num_negatives, num_candidates - 1),
                        self.config.hard_negative_ratio,
                    )
                scores = self._scores(vectors[row], candidates)
                inp = prompt_input(
                    self.inputs.features,
                    histories[row],
                    candidates,
                    self._preference(user),
                    vectors[row],
                    scores,
                    float(self.times[user][position - 1]),  # decided after the last history item
                    self.attributes[user],
                )
                layouts.append(self._render(inp, rng, self.split.train[user]))
                labels.append(label)
                teacher.append(scores)
                if len(layouts) == size:
                    break
        has_teacher = all(t is not None for t in teacher)
        return TrainBatch(layouts, labels, teacher if has_teacher else None, consumed)

    def validation_set(self, split: str = "valid") -> ValidationSet:
        """Prompts for the validation item, its position, its retriever rank and scores.

        As LlamaRec validates: users whose validation item is in the retriever's top-20, the
        candidates in retriever order (so the retriever's own order is the baseline to beat).
        Without a retriever: the item and 19 random negatives in a seeded order (rank -1).
        ``split="test"``: the same for the test item (benchmarks only; training never reads it).
        """
        order = np.random.default_rng(self.config.seed + 1).permutation(self.split.num_users)
        wanted = self.config.valid_users
        if split == "test":
            inputs, targets = self.split.test_inputs(), self.split.test_target
        else:
            inputs, targets = self.split.valid_inputs(), self.split.valid_target
        chosen: list[tuple] = []
        for start in range(0, len(order), 256):
            chunk = order[start : start + 256]
            chunk_histories = [inputs[u] for u in chunk]
            chunk_vectors, top, scores = self._vectors_and_top(chunk_histories)
            for row, user in enumerate(chunk):
                target = int(targets[user])
                if top.shape[1] and target not in top[row]:
                    continue
                chosen.append(
                    (
                        int(user),
                        chunk_histories[row],
                        target,
                        chunk_vectors[row],
                        top[row],
                        scores[row],
                    )
                )
            if len(chosen) >= wanted:
                break
        layouts, labels, retriever_ranks, top_scores = [], [], [], []
        for user, history, target, vector, top, scores in chosen[:wanted]:
            if len(top):
                candidates = top
                retriever_ranks.append(int(np.flatnonzero(top == target)[0]))
            else:
                rng = np.random.default_rng([self.config.seed + 2, user])
                candidates, _ = sample_candidates(rng, target, history, top, self.num_items)
                retriever_ranks.append(-1)
            inp = prompt_input(
                self.inputs.features,
                history,
                candidates,
                self._preference(user),
                vector,
                self._scores(vector, candidates),
                float(self.times[user][len(history) - 1]),
                self.attributes[user],
            )
            layouts.append(self._render(inp))
            labels.append(int(np.flatnonzero(candidates == target)[0]))
            top_scores.append(scores)
        return ValidationSet(
            layouts,
            np.asarray(labels, dtype=np.int64),
            np.asarray(retriever_ranks, dtype=np.int64),
            np.asarray(top_scores, dtype=np.float64).reshape(len(layouts), -1),
        )


def with_side_features(inputs: TrainInputs) -> TrainInputs:
    """Item rows extended with popularity (training interactions only), year and genres."""
    from ranker.signals import side_features

    if inputs.features.embeddings is None:
        raise ValueError("side features extend item rows: the item table is missing")
    catalog = inputs.dataset.catalog
    counts = np.zeros(catalog.num_items + 1, dtype=np.int64)
    for seq in inputs.dataset.split().train:
        np.add.at(counts, seq, 1)
    frame = catalog.frame
    years = [None if y is None or y is pd.NA else int(y) for y in frame["year"].tolist()]
    side = side_features([tuple(g) for g in frame["genres"]], years, counts)
    table = np.concatenate([inputs.features.embeddings, side], axis=1)
    return replace(inputs, features=replace(inputs.features, embeddings=table))
