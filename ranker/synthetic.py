"""Sanity tasks: can the ranker's mechanism learn at all, through the real training code?

Each task makes hybrid prompts whose correct letter is fully determined by the soft tokens,
and trains the real LLM, projectors, prompts and loss on them (``ranker.train.fit``). If the
ranker cannot reach high held-out accuracy here, no amount of real data will help; if it can,
what is left to learn on real data is the data's signal, not the mechanism.

- ``point``: the candidate with the highest retriever score (the scores are shuffled, so the
  letter is not the order) — the minimal pointing a re-ranker needs;
- ``match``: the candidate that best matches the user, ``argmax u . x`` (the retriever's scores
  are noise) — what a ranker must do to add to a retriever;
- ``recent``: the candidate closest to the last history item (scores are noise).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ranker.llm import load_model, load_tokenizer
from ranker.prompts import PromptConfig, PromptInput, PromptItem, PromptTokenizer, render_prompt
from ranker.train_data import TrainBatch, ValidationSet
from ranker.verbalizer import MAX_CANDIDATES

TASKS = ("point", "match", "recent")
HELD_OUT = 1 << 30  # example indices of the held-out set start here (never trained on)


@dataclass(frozen=True)
class SyntheticConfig:
    task: str = "match"  # one of TASKS
    dim: int = 16  # user and item vector size
    history: int = 5  # history items per example
    valid_examples: int = 256  # held-out examples
    valid_candidates: int = MAX_CANDIDATES  # candidates per held-out example
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {TASKS}")


class SyntheticTask:
    """An endless, seeded stream of examples of one task (an ``ExampleSource``)."""

    def __init__(self, config: SyntheticConfig, prompt: PromptConfig, tokens: PromptTokenizer):
        self.config = config
        self.prompt = prompt
        self.tokens = tokens

    def example(self, index: int, num_candidates: int) -> tuple[PromptInput, int]:
        rng = np.random.default_rng([self.config.seed, index])
        d = self.config.dim
        user = rng.standard_normal(d).astype(np.float32)
        items = rng.standard_normal((num_candidates, d)).astype(np.float32)
        history = rng.standard_normal((self.config.history, d)).astype(np.float32)
        scores = rng.standard_normal(num_candidates)
        if self.config.task == "point":
            label = int(np.argmax(scores))
        elif self.config.task == "match":
            label = int(np.argmax(items @ user))
        else:
            unit = items / np.linalg.norm(items, axis=1, keepdims=True)
            label = int(np.argmax(unit @ history[-1]))
        inp = PromptInput(
            history=[PromptItem("item", embedding=row) for row in history],
            candidates=[PromptItem("item", embedding=row) for row in items],
            user_embedding=user,
            retriever_scores=scores,
        )
        return inp, label

    def batch(self, cursor: int, size: int, num_candidates: int = MAX_CANDIDATES) -> TrainBatch:
        layouts, labels = [], []
        for index in range(cursor, cursor + size):
            inp, label = self.example(index, num_candidates)
            layouts.append(render_prompt(inp, self.prompt, self.tokens))
            labels.append(label)
        return TrainBatch(layouts, labels, None, size)

    def validation_set(self) -> ValidationSet:
        batch = self.batch(HELD_OUT, self.config.valid_examples, self.config.valid_candidates)
        n = len(batch.labels)
        return ValidationSet(
            batch.layouts,
            np.asarray(batch.labels, dtype=np.int64),
            np.full(n, -1, dtype=np.int64),
            np.zeros((n, 0)),
        )


def train_synthetic(llm_dir: Path, task: SyntheticConfig, config, on_progress=None) -> dict:
    """Train a fresh ranker (``config``: a ``TrainConfig``) on ``task``; held-out results.

    Returns examples seen, minutes, held-out accuracy (with ``task.valid_candidates``
    candidates) and the validation curve.
    """
    from ranker.train import TrainState, fit
    from ranker.train_model import new_model, optimizer_for
    from ranker.train_validate import validate

    torch.set_num_threads(config.threads)
    tokens = PromptTokenizer(load_tokenizer(llm_dir))
    source = SyntheticTask(task, config.prompt, tokens)
    model = new_model(load_model(llm_dir), source, tokens, config)
    optimizer = optimizer_for(model, config)
    valid = source.validation_set()
    state = TrainState()
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        stopped_by = fit(
            model, source, config, state, optimizer, valid=valid, log=log, on_progress=on_progress
        )
    final = validate(model, valid, config.batch_size)
    return {
        "task": task.task,
        "examples": state.examples,
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "stopped_by": stopped_by,
        "heldout_accuracy": final["valid_hr@1"],
        "heldout_loss": final["valid_loss"],
        "candidates": task.valid_candidates,
        "chance": round(1 / task.valid_candidates, 3),
        "curve": [
            {k: v[k] for k in ("examples", "valid_hr@1", "valid_loss")} for v in state.validations
        ],
    }
